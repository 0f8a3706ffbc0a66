r"""Layouts from module types: :func:`dimension_numbers_for` for flax and equinox models.

Which axes of a parameter are its vectors, which its columns, follows from the module
that owns it, not from its name or shape: a flax ``Dense`` kernel is ``(in, out)``, an
equinox ``Linear`` weight ``(out, in)``, a conv kernel has spatial axes, a
``DenseGeneral`` has head axes. :data:`TABLE` holds one row per module type (the docs
page prints it), and :func:`dimension_numbers_for` walks a model's module tree and
gives each parameter the layout of its owner's row.

flax and equinox stay optional: neither is imported here. A model of theirs means the
framework is loaded, so its classes are looked up in ``sys.modules`` when a model is
given.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, NamedTuple

import jax

from ._select import OrthoDims

__all__ = ["TABLE", "Row", "dimension_numbers_for", "markdown_table"]

# The roles of a parameter's own axes. VECTOR axes are flattened into the vectors;
# CHANNEL is the vector run whose last axis becomes the columns when the layout is
# wide (n > l); COLUMN is the run whose last axis indexes the columns (its other
# axes are groups); GROUP axes are groups.
VECTOR, CHANNEL, COLUMN, GROUP = "vector", "channel", "column", "group"


class Row(NamedTuple):
    """One module type's layout: the data the docs table prints.

    Attributes:
      framework: ``"linen"``, ``"nnx"`` or ``"equinox"``.
      modules: the class names, looked up in ``flax.linen``, ``flax.nnx`` or
        ``equinox.nn`` (a name missing there is left out); subclasses match too.
      param: the name of the parameter (the attribute, or the key in linen's params);
        ``"*"`` for every parameter of the module.
      axes: the parameter's own axes as runs ``(name, role)``, in order; a name that
        starts with ``*`` is a run of ``sizes(module)[name]`` axes. Empty: skipped.
      sizes: the lengths of the starred runs, from the module's attributes.
      when: the condition on the module's attributes under which the row applies, as
        the docs print it, and as a predicate; ``None``: always.
    """

    framework: str
    modules: tuple[str, ...]
    param: str
    axes: tuple[tuple[str, str], ...] = ()
    sizes: Callable[[Any], dict[str, int]] | None = None
    when: tuple[str, Callable[[Any], bool]] | None = None


def _tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _spatial(attr: str) -> Callable[[Any], dict[str, int]]:
    return lambda m: {"*spatial": len(_tuple(getattr(m, attr)))}


def _grouped(attr: str) -> tuple[str, Callable[[Any], bool]]:
    return (f"{attr} > 1", lambda m: getattr(m, attr) != 1)


def _transposed() -> tuple[str, Callable[[Any], bool]]:
    return ("transpose_kernel=True", lambda m: bool(m.transpose_kernel))


_IN_OUT = (("in", CHANNEL), ("out", COLUMN))
_HWIO = (("*spatial", VECTOR), ("in", CHANNEL), ("out", COLUMN))
_HWOI = (("*spatial", VECTOR), ("out", COLUMN), ("in", CHANNEL))
_OIHW = (("out", COLUMN), ("in", CHANNEL), ("*spatial", VECTOR))
_GENERAL = (("*batch", GROUP), ("*in", CHANNEL), ("*out", COLUMN))
_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm", "InstanceNorm")

TABLE: tuple[Row, ...] = (
    Row("linen", ("Dense",), "kernel", _IN_OUT),
    Row(
        "linen",
        ("DenseGeneral",),
        "kernel",
        _GENERAL,
        lambda m: {
            "*batch": len(_tuple(m.batch_dims)),
            "*in": len(_tuple(m.axis)),
            "*out": len(_tuple(m.features)),
        },
    ),
    Row("linen", ("Conv",), "kernel", when=_grouped("feature_group_count")),
    Row("linen", ("ConvTranspose",), "kernel", _HWOI, _spatial("kernel_size"), _transposed()),
    Row("linen", ("Conv", "ConvTranspose"), "kernel", _HWIO, _spatial("kernel_size")),
    Row("linen", ("Embed",), "embedding"),
    Row("linen", _NORMS, "*"),
    Row("nnx", ("Linear",), "kernel", _IN_OUT),
    Row(
        "nnx",
        ("LinearGeneral",),
        "kernel",
        _GENERAL,
        lambda m: {
            "*batch": len(m.batch_axis),
            "*in": len(m.in_features),
            "*out": len(m.out_features),
        },
    ),
    Row("nnx", ("Conv",), "kernel", when=_grouped("feature_group_count")),
    Row("nnx", ("ConvTranspose",), "kernel", _HWOI, _spatial("kernel_size"), _transposed()),
    Row("nnx", ("Conv", "ConvTranspose"), "kernel", _HWIO, _spatial("kernel_size")),
    Row("nnx", ("Embed",), "embedding"),
    Row("nnx", _NORMS, "*"),
    Row("equinox", ("Linear",), "weight", (("out", COLUMN), ("in", CHANNEL))),
    Row("equinox", ("Conv", "ConvTranspose"), "weight", when=_grouped("groups")),
    Row(
        "equinox",
        ("Conv", "ConvTranspose"),
        "weight",
        _OIHW,
        lambda m: {"*spatial": m.num_spatial_dims},
    ),
    Row("equinox", ("Embedding",), "weight"),
    Row("equinox", _NORMS[:4], "*"),
)
"""Module type -> layout, one row each; :func:`markdown_table` prints it for the docs.

Rows are tried in order; the first whose class (or a base of the module's class),
parameter and condition match gives the layout. A parameter no row matches is skipped.
"""

_PACKAGES = MappingProxyType({"linen": "flax.linen", "nnx": "flax.nnx", "equinox": "equinox.nn"})


# --------------------------------------------------------------------------- layouts


def _roles(row: Row, module: Any) -> list[tuple[str, bool]]:
    """The role of each of the parameter's own axes, and whether it ends its run."""
    sizes = row.sizes(module) if row.sizes is not None else {}
    roles: list[tuple[str, bool]] = []
    for name, role in row.axes:
        count = sizes[name] if name.startswith("*") else 1
        roles += [(role, k == count - 1) for k in range(count)]
    return roles


def _layout(row: Row, module: Any, shape: tuple[int, ...], where: str) -> OrthoDims | None:
    """The :class:`OrthoDims` of a parameter of ``shape``, by ``row``; leading axes
    beyond the row's own (a stack of layers) are groups."""
    if not row.axes:
        return None
    roles = _roles(row, module)
    extra = len(shape) - len(roles)
    if extra < 0:
        names = ", ".join(name for name, _ in row.axes)
        raise ValueError(
            f"dimension_numbers_for: the parameter at {where} has shape {shape}, but a "
            f"{type(module).__name__}'s {row.param!r} has {len(roles)} axes ({names})."
        )
    vectors = [extra + k for k, (role, _) in enumerate(roles) if role in (VECTOR, CHANNEL)]
    column = next(extra + k for k, (role, last) in enumerate(roles) if role == COLUMN and last)
    if shape[column] > math.prod(shape[a] for a in vectors):
        # Wide: more columns than the vectors' length, so orthonormal rows instead.
        # The old column is the vector; the last channel axis indexes the columns;
        # any other vector axes (a conv's spatial axes) become groups.
        channel = max(extra + k for k, (role, _) in enumerate(roles) if role == CHANNEL)
        vectors, column = [column], channel
    vector_axis: int | tuple[int, ...] = vectors[0] if len(vectors) == 1 else tuple(vectors)
    return OrthoDims(vector_axis, -1 if column == len(shape) - 1 else column)


def _row_for(framework: str, module: Any, param: str) -> Row | None:
    package = sys.modules[_PACKAGES[framework]]
    for row in TABLE:
        classes = tuple(getattr(package, name) for name in row.modules if hasattr(package, name))
        if (
            row.framework == framework
            and isinstance(module, classes)
            and row.param in ("*", param)
            and (row.when is None or row.when[1](module))
        ):
            return row
    return None


def _dims(framework: str, module: Any, param: str, leaf: Any, where: str) -> OrthoDims | None:
    if module is None:
        return None
    row = _row_for(framework, module, param)
    return None if row is None else _layout(row, module, tuple(leaf.shape), where)


def _key(k: Any) -> Any:
    """A path entry as a plain name or index."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


# --------------------------------------------------------------------------- frameworks


def _equinox(model: Any) -> Any:
    import equinox as eqx  # loaded already: the model is one of its Modules

    owners: dict[tuple[Any, ...], tuple[Any, str]] = {}

    def walk(module: Any, prefix: tuple[Any, ...]) -> None:
        def inner(x: Any) -> bool:
            return isinstance(x, eqx.Module) and x is not module

        for path, child in jax.tree_util.tree_flatten_with_path(module, is_leaf=inner)[0]:
            if isinstance(child, eqx.Module) and child is not module:
                walk(child, prefix + path)
            elif len(path) == 1:  # an attribute of this module
                owners[prefix + path] = (module, str(_key(path[0])))

    walk(model, ())

    def one(path: tuple[Any, ...], leaf: Any) -> OrthoDims | None:
        module, name = owners.get(path, (None, ""))
        return _dims("equinox", module, name, leaf, jax.tree_util.keystr(path))

    return jax.tree_util.tree_map_with_path(one, eqx.filter(model, eqx.is_array))


def _nnx(model: Any) -> Any:
    from flax import nnx  # loaded already: the model is one of its Modules

    modules = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}

    def one(path: tuple[Any, ...], leaf: Any) -> OrthoDims | None:
        keys = tuple(_key(k) for k in path)
        module = modules.get(keys[:-1])
        return _dims("nnx", module, str(keys[-1]), leaf, jax.tree_util.keystr(path))

    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return jax.tree_util.tree_map_with_path(one, params)


def _linen(model: Any, params: Any, inputs: tuple[Any, ...], apply_kwargs: dict[str, Any]) -> Any:
    import flax.core  # loaded already: the model is one of its Modules
    import flax.errors
    import flax.linen as nn

    if params is None:
        raise TypeError(
            "dimension_numbers_for: a flax linen Module needs its params and example "
            "inputs, as for model.apply: dimension_numbers_for(model, params, x)."
        )
    is_variables = isinstance(params, dict | flax.core.FrozenDict) and "params" in params
    variables = params if is_variables else {"params": params}
    modules: dict[tuple[str, ...], list[Any]] = {}

    def record(next_fun: Any, args: Any, kw: Any, context: Any) -> Any:
        module = context.module
        if module.scope is not None:
            modules.setdefault(tuple(module.scope.path), []).append(module)
        return next_fun(*args, **kw)

    kwargs = {"mutable": flax.core.DenyList("params"), "rngs": {"dropout": jax.random.key(0)}}
    kwargs |= apply_kwargs
    try:
        with nn.intercept_methods(record):
            jax.eval_shape(lambda v, a: model.apply(v, *a, **kwargs), variables, inputs)
    except (flax.errors.ScopeParamNotFoundError, flax.errors.ScopeParamShapeError) as e:
        raise TypeError(
            f"dimension_numbers_for: the params do not match the {type(model).__name__} model: {e}"
        ) from e

    def one(path: tuple[Any, ...], leaf: Any) -> OrthoDims | None:
        keys = tuple(str(_key(k)) for k in path)
        if is_variables:
            if keys[0] != "params":
                return None
            keys = keys[1:]
        where = jax.tree_util.keystr(path)
        for module in modules.get(keys[:-1], []):
            row = _row_for("linen", module, keys[-1])
            if row is not None:
                return _layout(row, module, tuple(leaf.shape), where)
        return None

    return jax.tree_util.tree_map_with_path(one, params)


def _framework(model: Any) -> str:
    """``"equinox"``, ``"nnx"`` or ``"linen"``: whose Module ``model`` is."""
    for framework, package, cls in (
        ("equinox", "equinox", "Module"),
        ("nnx", "flax.nnx", "Module"),
        ("linen", "flax.linen", "Module"),
    ):
        loaded = sys.modules.get(package)
        if loaded is not None and isinstance(model, getattr(loaded, cls)):
            return framework
    raise TypeError(
        "dimension_numbers_for: `model` must be an equinox Module, a flax nnx Module or "
        f"a flax linen Module, got {type(model).__name__}."
    )


# --------------------------------------------------------------------------- public


def dimension_numbers_for(
    model: Any, params: Any = None, *inputs: Any, **apply_kwargs: Any
) -> Any:
    r"""The layout of every parameter of a flax or equinox model, from its module types.

    Gives each parameter the :class:`OrthoDims` that makes the penalty, landing and
    projection constrain what the user means: the weight vectors of the output units,
    one group per layer of a stack. For a parameter of rank ``r`` with groups
    :math:`\Phi_i` of size :math:`l \times n`,

    .. math::

        \Phi_i^\top \Phi_i = I_n \quad (n \le l), \qquad
        \Phi_i \Phi_i^\top = I_l \quad (n > l:\ \text{the rows instead}).

    The layouts, per module type (the table in the docs' *Layouts* page is printed
    from the same data, :data:`TABLE`):

    * ``Dense``/``Linear``: the columns are the output units; flax's ``(in, out)``
      kernel is the default layout, equinox's ``(out, in)`` weight has the vectors on
      the last axis.
    * ``Conv``/``ConvTranspose``, any spatial rank: one column per output channel, its
      vector the spatial and input axes flattened (flax ``(*spatial, in, out)``,
      or ``(*spatial, out, in)`` with ``transpose_kernel=True``; equinox
      ``(out, in, *spatial)``). Grouped convolutions are skipped.
    * ``DenseGeneral``/``LinearGeneral``, so the attention kernels: the contracted
      axes are the vectors, the last output axis the columns, the other output (and
      batch) axes groups: q, k, v ``(d, heads, head_dim)`` are ``heads`` groups of
      ``d x head_dim``, the output ``(heads, head_dim, d)`` one group of
      ``(heads * head_dim) x d``.
    * Leading axes beyond the module's own (``nn.scan``, ``nn.vmap``, ``nnx.vmap``,
      ``nnx.scan``, ``eqx.filter_vmap``) are group axes: one group per layer.
    * Wide (:math:`n > l`): the output axis becomes the vectors and the input axis the
      columns (orthonormal rows), with any other vector axes (a conv's spatial axes)
      as groups; for a kernel with spatial extent 1 (a 1x1 conv) these are exactly
      the orthonormal rows, for a larger one each tap's rows.
    * ``None`` (skipped): biases, embeddings, the scales and offsets of
      ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm`` and ``InstanceNorm``, and
      every parameter of a module type not in the table.

    The module tree is walked, so the layers inside custom modules are found.

    Args:
      model: an ``equinox.Module``, a ``flax.nnx.Module``, or a ``flax.linen.Module``.
      params: for linen only: the ``params`` collection (``variables["params"]``), or
        the whole ``variables`` dict that ``model.init`` returns (a dict with a
        ``"params"`` key), which gives every other collection ``None``.
      *inputs: for linen only: example inputs of ``model.apply`` (arrays or
        ``jax.ShapeDtypeStruct``); the model is traced once under
        ``jax.eval_shape`` (no computation) to see its modules.
      **apply_kwargs: for linen only: keyword arguments of ``model.apply``
        (``train=False``, ``method=...``, ``rngs=...``; by default every collection
        but ``params`` is mutable and a ``"dropout"`` stream is given).

    Returns:
      A pytree of :class:`OrthoDims` or ``None``, for ``dimension_numbers`` of
      :func:`add_orthogonality_penalty`, :func:`tree_orthogonality_penalty`,
      :func:`landing` and :func:`project_orthonormal`, with the structure of the
      params they are given:

      * equinox: of ``eqx.filter(model, eqx.is_array)`` (a Module of the same type);
      * nnx: of ``nnx.state(model, nnx.Param)``, pure (``nnx.as_pure``), as
        ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` passes the params to ``tx``
        (the optimizer's ``init`` gets the same state with ``Variable`` leaves:
        the layouts match those too);
      * linen: of ``params`` as given.

    Raises:
      TypeError: if ``model`` is none of these; if a linen model comes without
        ``params``, or ``params`` do not match it; if an equinox or nnx model comes
        with ``params`` or inputs (their layouts come from the model alone).
      ValueError: if a parameter has fewer axes than its module type's own.

    Examples:
      >>> import equinox as eqx, jax, optax
      >>> import jax_orthopenalty as jop
      >>> model = eqx.nn.Sequential([
      ...     eqx.nn.Conv2d(3, 8, 3, key=jax.random.key(0)),
      ...     eqx.nn.Linear(8, 4, key=jax.random.key(1)),
      ... ])
      >>> dims = jop.dimension_numbers_for(model)
      >>> dims.layers[0].weight          # (out, in, h, w): 8 columns of length 3 * 3 * 3
      OrthoDims(vector_axis=(1, 2, 3), column_axis=0)
      >>> dims.layers[1].weight          # (out, in): 4 columns of length 8
      OrthoDims(vector_axis=1, column_axis=0)
      >>> dims.layers[0].bias is None
      True
      >>> tx = optax.chain(jop.add_orthogonality_penalty(1e-3, dimension_numbers=dims),
      ...                  optax.sgd(1e-2))
      >>> state = tx.init(eqx.filter(model, eqx.is_array))

      A flax linen model needs its params and example inputs:

      >>> import flax.linen as nn, jax.numpy as jnp
      >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(32)])
      >>> x = jnp.ones((1, 8))
      >>> params = mlp.init(jax.random.key(0), x)["params"]
      >>> dims = jop.dimension_numbers_for(mlp, params, x)
      >>> dims["layers_0"]["kernel"]     # (8, 4): 4 columns of length 8
      OrthoDims(vector_axis=0, column_axis=-1)
      >>> dims["layers_2"]["kernel"]     # (4, 32), wide: 4 rows of length 32
      OrthoDims(vector_axis=1, column_axis=0)
    """
    framework = _framework(model)
    if framework == "linen":
        return _linen(model, params, inputs, apply_kwargs)
    if params is not None or inputs or apply_kwargs:
        raise TypeError(
            f"dimension_numbers_for: an {'equinox' if framework == 'equinox' else 'nnx'} "
            "model holds its parameters: call dimension_numbers_for(model), without "
            "params or inputs."
        )
    return _equinox(model) if framework == "equinox" else _nnx(model)


# --------------------------------------------------------------------------- docs

_PREFIX = MappingProxyType({"linen": "nn.", "nnx": "nnx.", "equinox": "eqx.nn."})


def _run_names(row: Row, role: str) -> list[str]:
    return [name for name, r in row.axes if r == role]


def _split(name: str) -> tuple[str, str]:
    """The last axis of a run, and the rest: ``*out`` -> ``*out[-1]``, ``*out[:-1]``."""
    return (f"{name}[-1]", f"{name}[:-1]") if name.startswith("*") else (name, "")


def _cells(row: Row) -> list[str]:
    if not row.axes:
        return ["", "skipped (`None`)", "", "", ""]
    (column_run,) = _run_names(row, COLUMN)
    (channel_run,) = _run_names(row, CHANNEL)
    column, column_rest = _split(column_run)
    channel, channel_rest = _split(channel_run)
    groups = _run_names(row, GROUP)
    vectors = [name for name, role in row.axes if role in (VECTOR, CHANNEL)]
    wide_groups = [*_run_names(row, VECTOR), channel_rest, *groups, column_rest]

    def code(names: list[str]) -> str:
        names = [n for n in names if n]
        return ", ".join(f"`{n}`" for n in names) if names else "none"

    shape = "`(" + ", ".join(name for name, _ in row.axes) + ")`"
    return [
        shape,
        code(vectors),
        code([column]),
        code([*groups, column_rest]),
        f"vectors {code([column])}, columns {code([channel])}, groups {code(wide_groups)}",
    ]


def markdown_table() -> str:
    """:data:`TABLE` as the Markdown table of docs/layouts.md (which a test checks)."""
    lines = [
        "| module | parameter | own axes | vectors (l) | columns (n) | groups | if n > l |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in TABLE:
        module = ", ".join(f"`{_PREFIX[row.framework]}{name}`" for name in row.modules)
        if row.when is not None:
            module += f" with `{row.when[0]}`"
        param = "every parameter" if row.param == "*" else f"`{row.param}`"
        shape, *rest = _cells(row)
        lines.append("| " + " | ".join([module, param, shape or "", *rest]) + " |")
    return "\n".join(lines) + "\n"
