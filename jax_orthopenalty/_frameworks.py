r"""Layouts from module types: :func:`dimension_numbers_for` for flax and equinox models.

The walkers: each finds, for every parameter of a model, the module that owns it (an
equinox Module's pytree, nnx's graph, or a linen model's modules recorded with
``nn.intercept_methods`` during one abstract ``apply``), and gives it the layout of its
row in :data:`TABLE` (``_framework_table.py``), or the reason it gets none.

flax and equinox stay optional: neither is imported here. A model of theirs means the
framework is loaded, so its classes are looked up in ``sys.modules`` when a model is
given.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import warnings
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from ._framework_table import PACKAGES, TABLE, Row, layout, markdown_table, skip_why

__all__ = ["TABLE", "Row", "dimension_numbers_for", "markdown_table", "skip_reasons"]


@dataclasses.dataclass(frozen=True)
class _Found:
    """One parameter's layout, or why it has none; ``warn``: the user should hear."""

    dims: Any  # OrthoDims | ConvDims | None
    why: str | None = None
    warn: bool = False
    # (framework, module, parameter name, shape) of a parameter that has a row
    owner: tuple[str, Any, str, tuple[int, ...]] | None = None


_NOT_REACHED = (
    "no module owning it ran in the traced call (a branch not taken, such as a head "
    "used only with train=True, or a module reached only by another method=)"
)


def _classes(framework: str, names: tuple[str, ...]) -> tuple[type, ...]:
    package = sys.modules[PACKAGES[framework]]
    out = []
    for name in names:
        where, _, attr = name.rpartition(".")
        owner = sys.modules.get(f"{PACKAGES[framework]}.{where}") if where else package
        if owner is not None and hasattr(owner, attr):
            out.append(getattr(owner, attr))
    return tuple(out)


def _row_for(framework: str, module: Any, param: str) -> Row | None:
    for row in TABLE:
        if (
            row.framework == framework
            and isinstance(module, _classes(framework, row.modules))
            and row.param in ("*", param)
            and (row.when is None or row.when[1](module))
        ):
            return row
    return None


def _known(framework: str, module: Any) -> bool:
    """Whether ``module``'s type has a row (for some parameter) in the table."""
    return any(
        row.framework == framework and isinstance(module, _classes(framework, row.modules))
        for row in TABLE
    )


def _found(
    framework: str,
    module: Any,
    param: str,
    leaf: Any,
    where: str,
    own: tuple[int | None, ...] | None = None,
) -> _Found:
    """The layout of ``module``'s parameter ``param``, or why it has none."""
    if module is None:
        return _Found(None, _NOT_REACHED, warn=True)
    name = type(module).__name__
    row = _row_for(framework, module, param)
    if row is None:
        if _known(framework, module):
            return _Found(None, f"{name} {param}: not a weight matrix of its type")
        return _Found(None, f"unknown module type {name}", warn=True)
    shape = tuple(jnp.shape(leaf))
    dims = layout(row, module, shape, where, own)
    why = None if dims is not None else skip_why(row, module)
    return _Found(dims, why, owner=(framework, module, param, shape))


def _key(k: Any) -> Any:
    """A path entry as a plain name or index."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


# --------------------------------------------------------------------------- equinox


def _equinox(model: Any) -> Any:
    import equinox as eqx  # loaded already: the model is one of its Modules

    owners: dict[tuple[Any, ...], tuple[Any, str]] = {}

    def walk(module: Any, prefix: tuple[Any, ...]) -> None:
        def inner(x: Any) -> bool:
            return isinstance(x, eqx.Module) and x is not module

        for path, child in jax.tree_util.tree_flatten_with_path(module, is_leaf=inner)[0]:
            if isinstance(child, eqx.Module) and child is not module:
                walk(child, prefix + path)
            else:  # in an attribute of this module (an array, or a container of them)
                owners[prefix + path] = (module, str(_key(path[0])))

    walk(model, ())

    def one(path: tuple[Any, ...], leaf: Any) -> _Found:
        module, name = owners.get(path, (None, ""))
        return _found("equinox", module, name, leaf, jax.tree_util.keystr(path))

    return jax.tree_util.tree_map_with_path(one, eqx.filter(model, _is_array_like))


def _is_array_like(x: Any) -> bool:
    """An array, or an abstract one (``eqx.filter_eval_shape``, ``jax.eval_shape``)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


# --------------------------------------------------------------------------- nnx


def _nnx(model: Any) -> Any:
    from flax import nnx  # loaded already: the model is one of its Modules

    modules = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}

    def one(path: tuple[Any, ...], leaf: Any) -> _Found:
        keys = tuple(_key(k) for k in path)
        module = modules.get(keys[:-1])
        return _found("nnx", module, str(keys[-1]), leaf, jax.tree_util.keystr(path))

    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return jax.tree_util.tree_map_with_path(one, params)


# --------------------------------------------------------------------------- linen


_Owners = dict[tuple[str, ...], list[tuple[Any, dict[str, tuple[int, ...]]]]]


def _recorder(owners: _Owners) -> Callable[..., Any]:
    """An ``nn.intercept_methods`` interceptor recording each module that runs and the
    shapes of its own params as it sees them (inside ``nn.vmap``/``nn.scan``: one
    member's, so a stacked axis is found wherever it sits)."""
    import flax.linen as nn

    def record(next_fun: Any, args: Any, kw: Any, context: Any) -> Any:
        out = next_fun(*args, **kw)
        module = context.module
        if module.scope is None:
            return out
        mine = nn.meta.unbox(module.variables).get("params", {})
        own = {k: tuple(jnp.shape(v)) for k, v in mine.items() if hasattr(v, "shape")}
        if isinstance(module, nn.Einsum) and module.einsum_str is None:
            if context.method_name != "__call__":
                return out
            # The equation given at call time.
            spec = kw.get("einsum_str", args[1] if len(args) > 1 else None)
            module = module.clone(parent=None, einsum_str=spec)
        owners.setdefault(tuple(context.module.scope.path), []).append((module, own))
        return out

    return record


def _under_axes(fn: Callable[[], Any], names: list[Any]) -> Any:
    """``fn()`` inside a size-1 ``jax.vmap`` per axis name, so that the collectives of a
    data-parallel model (``BatchNorm(axis_name=...)``, ``lax.pmean``) find their axis."""
    for name in names:
        fn = (lambda f, n: lambda: jax.vmap(lambda _: f(), axis_name=n)(jnp.zeros(1)))(fn, name)
    return fn()


def _trace_linen(model: Any, variables: Any, inputs: tuple[Any, ...], kwargs: Any) -> _Owners:
    """The modules that run in ``model.apply(variables, *inputs, **kwargs)``, by path."""
    import flax.linen as nn

    names: list[Any] = []
    while True:
        owners: _Owners = {}
        try:
            with nn.intercept_methods(_recorder(owners)):
                jax.eval_shape(
                    lambda v, a: _under_axes(lambda: model.apply(v, *a, **kwargs), names),
                    variables,
                    inputs,
                )
            return owners
        except NameError as e:  # a collective over an axis the trace has not bound
            # jax says "unbound axis name: N" or "Found an unbound axis name: N. To fix ..."
            found = re.search(r"unbound axis name: (.+?)(?:\. |$)", str(e))
            if found is None or found.group(1) in names or len(names) > 8:
                raise
            names.append(found.group(1))


def _what_to_pass(model: Any, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    method = kwargs.get("method") or "__call__"
    fn = getattr(model, method) if isinstance(method, str) else method
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        signature = str(method)
    else:  # the names and kinds, not the annotations
        bare = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
        plain = sig.replace(parameters=bare, return_annotation=sig.empty)
        signature = f"{getattr(fn, '__name__', method)}{plain}"
    given = ", ".join([f"{len(inputs)} input(s)", *(f"{k}=" for k in kwargs)])
    return (
        f"its {type(model).__name__}.{signature} was given {given}. Pass what "
        "model.apply needs after the params: the example inputs "
        "(dimension_numbers_for(model, params, x, ...)), the keyword arguments its "
        "call requires (train=False, deterministic=True, ...), and "
        "rngs={'name': jax.random.key(0), ...} for every random stream it draws"
    )


def _linen(model: Any, params: Any, inputs: tuple[Any, ...], apply_kwargs: dict[str, Any]) -> Any:
    import flax.core  # loaded already: the model is one of its Modules
    import flax.errors

    if params is None:
        raise TypeError(
            "dimension_numbers_for: a flax linen Module needs its params and example "
            "inputs, as for model.apply: dimension_numbers_for(model, params, x)."
        )
    is_variables = isinstance(params, dict | flax.core.FrozenDict) and "params" in params
    variables = params if is_variables else {"params": params}
    # "params" draws only for other collections (SpectralNorm's u): params are immutable.
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    given = apply_kwargs.get("rngs")
    rngs |= given if isinstance(given, dict) else {} if given is None else {"params": given}
    kwargs = {"mutable": flax.core.DenyList("params")} | apply_kwargs | {"rngs": rngs}
    try:
        owners = _trace_linen(model, variables, inputs, kwargs)
    except (flax.errors.ScopeParamNotFoundError, flax.errors.ScopeParamShapeError) as e:
        raise TypeError(
            f"dimension_numbers_for: the params do not match the {type(model).__name__} model: {e}"
        ) from e
    except (TypeError, ValueError, flax.errors.FlaxError) as e:
        raise TypeError(
            f"dimension_numbers_for: tracing the {type(model).__name__} model failed "
            f"({type(e).__name__}: {e}); {_what_to_pass(model, inputs, apply_kwargs)}."
        ) from e
    return _linen_layouts(owners, params, is_variables)


def _linen_layouts(owners: _Owners, params: Any, is_variables: bool) -> Any:
    """Every leaf's layout from the recorded ``owners``; a box (``nn.Partitioned``,
    ``nn.LogicallyPartitioned``) keeps its place and metadata, its value the layout."""
    from flax.core import meta

    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        if isinstance(leaf, meta.AxisMetadata):
            return leaf.replace_boxed(one(path, leaf.unbox()))
        keys = tuple(str(_key(k)) for k in path)
        if is_variables:
            if keys[0] != "params":
                return _Found(None, f"in the {keys[0]!r} collection, not a parameter")
            keys = keys[1:]
        where = jax.tree_util.keystr(path)
        candidates = owners.get(keys[:-1], [])
        for module, own in candidates:
            if _row_for("linen", module, keys[-1]) is not None:
                return _found("linen", module, keys[-1], leaf, where, own.get(keys[-1]))
        module = candidates[0][0] if candidates else None
        return _found("linen", module, keys[-1], leaf, where)

    return jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)
    )


# --------------------------------------------------------------------------- public


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


def _walk(
    model: Any, params: Any, inputs: tuple[Any, ...], apply_kwargs: dict[str, Any], conv: str
) -> Any:
    """A pytree of ``_Found``, one per parameter, with the structure of the params."""
    if conv not in ("kernel", "operator"):
        raise ValueError(
            f'dimension_numbers_for: `conv` must be "kernel" or "operator", got {conv!r}.'
        )
    framework = _framework(model)
    if framework == "linen":
        found = _linen(model, params, inputs, apply_kwargs)
    elif params is not None or inputs or apply_kwargs:
        raise TypeError(
            f"dimension_numbers_for: an {'equinox' if framework == 'equinox' else 'nnx'} "
            "model holds its parameters: call dimension_numbers_for(model), without "
            "params or inputs."
        )
    else:
        found = _equinox(model) if framework == "equinox" else _nnx(model)
    return _as_operator(found) if conv == "operator" else found


def _is_found(x: Any) -> bool:
    return isinstance(x, _Found)


_SPATIAL = "DHW"
_KERNEL_PARAM = MappingProxyType({"linen": "kernel", "nnx": "kernel", "equinox": "weight"})


def _leading_stack(dims: Any, ndim: int, rank: int) -> bool:
    """Whether a kernel of ``ndim`` axes has its own ``rank`` axes last (any stacked
    axes lead, as ``ConvDims`` takes them), by its kernel layout ``dims``."""
    extra = ndim - rank
    if extra == 0:
        return True
    if dims is None:
        return False
    axes = [*_tuple(dims.vector_axis), *_tuple(dims.column_axis)]
    return all(a % ndim >= extra for a in axes)


def _conv_dims(framework: str, module: Any, shape: tuple[int, ...], kernel: Any) -> Any:
    """A conv kernel's ``ConvDims``: its layout, stride, dilation and groups, from
    the module's attributes; ``None`` if stacked axes do not lead, or over 3-D."""
    # ConvDims lives in _select (0.4): looked up when asked for, typed Any.
    conv_dims = importlib.import_module("._select", __package__).ConvDims
    if framework == "equinox":
        rank, stride, dilation, groups = (
            module.num_spatial_dims,
            module.stride,
            module.dilation,
            module.groups,
        )
    else:
        rank = len(_tuple(module.kernel_size))
        stride, dilation = module.strides or 1, module.kernel_dilation or 1
        groups = module.feature_group_count
    if rank > len(_SPATIAL) or not _leading_stack(kernel, len(shape), rank + 2):
        return None
    spatial = _SPATIAL[len(_SPATIAL) - rank :]
    kernel_layout = "OI" + spatial if framework == "equinox" else spatial + "IO"
    return conv_dims(
        kernel_layout=kernel_layout,
        stride=_int_or_tuple(stride),
        dilation=_int_or_tuple(dilation),
        feature_group_count=int(groups),
    )


def _int_or_tuple(x: Any) -> int | tuple[int, ...]:
    return int(x) if isinstance(x, int) else tuple(int(k) for k in x)


def _tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _as_operator(found: Any) -> Any:
    """``conv="operator"``: every Conv kernel's entry becomes its ``ConvDims``; a
    ConvTranspose (or a stacked conv) keeps its kernel layout, with a warning."""

    def one(f: _Found) -> _Found:
        if f.owner is None:
            return f
        framework, module, param, shape = f.owner
        if param != _KERNEL_PARAM[framework]:
            return f
        if isinstance(module, _classes(framework, ("ConvTranspose",))):
            why = (
                f"{type(module).__name__}: operator orthogonality of transposed convs is "
                "not supported; the kernel layout is kept"
            )
            return dataclasses.replace(f, why=why, warn=True)
        if not isinstance(module, _classes(framework, ("Conv",))):
            return f
        dims = _conv_dims(framework, module, shape, f.dims)
        if dims is None:
            why = (
                f"{type(module).__name__}: stacked axes that do not lead, or over 3 "
                "spatial axes: no ConvDims; the kernel layout is kept"
            )
            return dataclasses.replace(f, why=why, warn=True)
        return _Found(dims, None, owner=f.owner)

    return jax.tree.map(one, found, is_leaf=_is_found)


def _warn(model: Any, found: Any) -> None:
    """One UserWarning for the parameters skipped for a reason the user should hear
    (and the convs whose operator layout could not be given), and one if nothing at
    all gets a layout."""
    entries = jax.tree_util.tree_flatten_with_path(found, is_leaf=_is_found)[0]
    name = type(model).__name__
    for skipped, what in ((True, "get no layout (None)"), (False, "keep their kernel layout")):
        loud = [
            f"{jax.tree_util.keystr(p) or 'the root'} ({f.why})"
            for p, f in entries
            if f.warn and (f.dims is None) == skipped
        ]
        if loud:
            warnings.warn(
                f"dimension_numbers_for: {len(loud)} parameter(s) of the {name} model "
                f"{what}: {'; '.join(loud)}. Give their layouts by hand if they should "
                "be penalised otherwise.",
                UserWarning,
                stacklevel=3,
            )
    if all(f.dims is None for _, f in entries):
        warnings.warn(
            f"dimension_numbers_for: no parameter of the {name} model gets a layout, so "
            "every transform given these dimension_numbers does nothing; "
            "skip_reasons(...) says why per parameter.",
            UserWarning,
            stacklevel=3,
        )


def dimension_numbers_for(
    model: Any,
    params: Any = None,
    *inputs: Any,
    conv: Literal["kernel", "operator"] = "kernel",
    **apply_kwargs: Any,
) -> Any:
    r"""The layout of every parameter of a flax or equinox model, from its module types.

    Each parameter gets the :class:`OrthoDims` of its module type's row in the table
    of the *Layouts* page (printed from the same data): the columns are the output
    units, their vectors the contracted (input, spatial) axes, and every other axis a
    group: heads, a per-position axis, the layers of a stack (``nn.scan``,
    ``nn.vmap``, ``nnx.vmap``, ``eqx.filter_vmap``, wherever the stacked axis sits).
    Wide (:math:`n > l`), the rows of the flattened :math:`l \times n` matrix instead:

    .. math::

        \Phi_i^\top \Phi_i = I_n \quad (n \le l), \qquad
        \Phi_i \Phi_i^\top = I_l \quad (n > l).

    Biases, embeddings, norms and grouped convs are skipped (``None``); a parameter
    that no module in the table owns is skipped with a ``UserWarning`` naming it
    (:func:`skip_reasons` gives every leaf's reason).

    Args:
      model: an ``equinox.Module`` (concrete, or abstract from
        ``eqx.filter_eval_shape``), a ``flax.nnx.Module``, or a ``flax.linen.Module``.
      params: for linen only: ``variables["params"]`` (boxed by
        ``nn.with_logical_partitioning`` or not), or the whole ``variables`` dict.
      *inputs: for linen only: example inputs of ``model.apply`` (arrays or
        ``jax.ShapeDtypeStruct``); traced once under ``jax.eval_shape``, inside a
        size-1 named axis for each axis name its collectives use.
      conv: ``"kernel"`` (the default): conv kernels get the flattened layout of the
        table; ``"operator"``: every ``Conv`` kernel gets a ``ConvDims`` with its
        kernel layout, stride, dilation and groups, for the penalty on the
        convolution operator (a ``ConvTranspose`` keeps its kernel layout, with a
        warning: operator orthogonality of transposed convs is not supported).
      **apply_kwargs: for linen only: keyword arguments of ``model.apply``
        (``train=False``, ``method=...``, ``rngs=...``; by default every collection
        but ``params`` is mutable, and ``"params"`` and ``"dropout"`` streams are
        given, to which ``rngs`` adds).

    Returns:
      A pytree of :class:`OrthoDims` or ``None`` with the structure of the params the
      transforms get: ``eqx.filter(model, eqx.is_array)`` (abstract leaves kept);
      ``nnx.as_pure(nnx.state(model, nnx.Param))``; linen's ``params`` as given, a
      box holding its leaf's layout.

    Raises:
      TypeError: if ``model`` is none of these; if a linen model comes without
        ``params``, the params do not match it, or its trace fails (the message says
        what ``apply`` needs); if an equinox or nnx model comes with params or inputs.
      ValueError: if a parameter has fewer axes than its module type's own, or a
        stacked axis could sit at several places that give different layouts.

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
    found = _walk(model, params, inputs, apply_kwargs, conv)
    _warn(model, found)
    return jax.tree.map(lambda f: f.dims, found, is_leaf=_is_found)


def skip_reasons(
    model: Any,
    params: Any = None,
    *inputs: Any,
    conv: Literal["kernel", "operator"] = "kernel",
    **apply_kwargs: Any,
) -> Any:
    """Why :func:`dimension_numbers_for` gives each parameter no layout.

    Takes the same arguments and returns a pytree of the same structure: ``None``
    where a parameter gets an :class:`OrthoDims`, else the reason as a string
    (``"unknown module type Foo"``, ``"Dense bias: not a weight matrix of its type"``,
    ``"Embed embedding: an embedding table: ..."``). It warns about nothing.

    Examples:
      >>> import equinox as eqx, jax
      >>> from jax_orthopenalty._frameworks import skip_reasons
      >>> reasons = skip_reasons(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
      >>> reasons.weight is None, reasons.bias
      (True, 'Linear bias: not a weight matrix of its type')
    """
    found = _walk(model, params, inputs, apply_kwargs, conv)
    return jax.tree.map(lambda f: f.why, found, is_leaf=_is_found)
