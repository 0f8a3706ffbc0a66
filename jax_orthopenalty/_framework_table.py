r"""The module-type table of :func:`dimension_numbers_for`, and the layouts it gives.

Which axes of a parameter are its vectors, which its columns, follows from the module
that owns it, not from its name or shape: a flax ``Dense`` kernel is ``(in, out)``, an
equinox ``Linear`` weight ``(out, in)``, a conv kernel has spatial axes, a
``DenseGeneral`` has head axes, an ``Einsum`` kernel's axes are named by its equation.
:data:`TABLE` holds one row per module type (the docs page prints it with
:func:`markdown_table`); :func:`layout` turns a row, the module and the parameter's
shape into an :class:`OrthoDims`. No framework is imported here: rows name classes,
looked up in ``sys.modules`` by the walker (``_frameworks.py``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, NamedTuple

from ._select import OrthoDims

__all__ = ["PACKAGES", "TABLE", "Row", "layout", "markdown_table", "own_shape", "skip_why"]

# The roles of a parameter's own axes. VECTOR axes are flattened into the vectors;
# CHANNEL is a vector run the docs name as the columns when the layout is wide
# (n > l); COLUMN is the run whose last axis indexes the columns (its other axes
# are groups); GROUP axes are groups.
VECTOR, CHANNEL, COLUMN, GROUP = "vector", "channel", "column", "group"


class Row(NamedTuple):
    """One module type's layout: the data the docs table prints.

    Attributes:
      framework: ``"linen"``, ``"nnx"`` or ``"equinox"``.
      modules: the class names, looked up in ``flax.linen``, ``flax.nnx`` or
        ``equinox.nn`` (``"recurrent.DenseParams"``: in ``flax.linen.recurrent``; a
        name missing there is left out); subclasses match too.
      param: the name of the parameter (the attribute, or the key in linen's params);
        ``"*"`` for every parameter of the module.
      axes: the parameter's own axes as runs ``(name, role)``, in order; a name that
        starts with ``*`` is a run of ``sizes(module)[name]`` axes. Empty: skipped.
      sizes: the lengths of the starred runs, from the module's attributes.
      when: the condition on the module's attributes under which the row applies, as
        the docs print it, and as a predicate; ``None``: always.
      shape: the parameter's own shape from the module's attributes (``None`` where
        an attribute does not give a size), to find a stacked axis (``nnx.vmap``,
        ``eqx.filter_vmap``) wherever it sits; ``None``: stacked axes lead. linen
        records the own shape during the trace instead.
      why: for a skipped row, the reason :func:`skip_reasons` gives.
      roles: a function of the module giving each own axis's role (``Einsum``: from
        its equation), instead of ``axes``; ``axes`` then holds what the docs print.
    """

    framework: str
    modules: tuple[str, ...]
    param: str
    axes: tuple[tuple[str, str], ...] = ()
    sizes: Callable[[Any], dict[str, int]] | None = None
    when: tuple[str, Callable[[Any], bool]] | None = None
    shape: Callable[[Any], tuple[int | None, ...]] | None = None
    why: str = ""
    roles: Callable[[Any], list[str]] | None = None


def _tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _spatial(attr: str) -> Callable[[Any], dict[str, int]]:
    return lambda m: {"*spatial": len(_tuple(getattr(m, attr)))}


def _grouped(attr: str) -> tuple[str, Callable[[Any], bool]]:
    return (f"{attr} > 1", lambda m: getattr(m, attr) != 1)


def _transposed() -> tuple[str, Callable[[Any], bool]]:
    return ("transpose_kernel=True", lambda m: bool(m.transpose_kernel))


def _size(x: Any) -> int | None:
    return x if isinstance(x, int) else None  # equinox's "scalar" has no size axis


def _einsum_roles(module: Any) -> list[str]:
    """Per kernel letter: contracted with the input -> VECTOR; in the output only ->
    COLUMN (the last such letter; earlier ones GROUP, as ``DenseGeneral``'s heads);
    in the input, the kernel and the output (a batch letter) -> GROUP."""
    spec = str(getattr(module, "einsum_str", None) or "").replace(" ", "")
    lhs, _, out = spec.partition("->")
    x, _, kernel = lhs.partition(",")
    roles = [GROUP if c in x and c in out else VECTOR if c not in out else COLUMN for c in kernel]
    columns = [k for k, r in enumerate(roles) if r == COLUMN]
    for k in columns[:-1]:
        roles[k] = GROUP
    return roles


_IN_OUT = (("in", CHANNEL), ("out", COLUMN))
_OUT_IN = (("out", COLUMN), ("in", CHANNEL))
_HWIO = (("*spatial", VECTOR), ("in", CHANNEL), ("out", COLUMN))
_HWOI = (("*spatial", VECTOR), ("out", COLUMN), ("in", CHANNEL))
_OIHW = (("out", COLUMN), ("in", CHANNEL), ("*spatial", VECTOR))
_LOCAL = (("*positions", GROUP), ("taps * in", CHANNEL), ("out", COLUMN))
_GENERAL = (("*batch", GROUP), ("*in", CHANNEL), ("*out", COLUMN))
_EINSUM = (("letters", CHANNEL), ("out-only letter", COLUMN))
_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm", "InstanceNorm")
_NORM_WHY = "a normalisation layer's scale or offset"
_EMBED_WHY = "an embedding table: its rows are tokens, not weight vectors"
_GROUPED_WHY = "a grouped convolution: its groups mix no channels across groups"


def _nnx_conv(m: Any) -> tuple[int | None, ...]:
    groups = m.feature_group_count
    return (*_tuple(m.kernel_size), m.in_features // groups, m.out_features)


def _nnx_conv_t(m: Any) -> tuple[int | None, ...]:
    k = _tuple(m.kernel_size)
    if m.transpose_kernel:
        return (*k, m.out_features, m.in_features)
    return (*k, m.in_features, m.out_features)


def _nnx_general(m: Any) -> tuple[int | None, ...]:
    batch = tuple(m.batch_axis[k] for k in sorted(m.batch_axis))
    return (*batch, *_tuple(m.in_features), *_tuple(m.out_features))


def _eqx_conv(m: Any) -> tuple[int | None, ...]:
    return (m.out_channels, m.in_channels // m.groups, *m.kernel_size)


def _eqx_cell(gates: int, param: str) -> Callable[[Any], tuple[int | None, ...]]:
    inputs = "input_size" if param == "weight_ih" else "hidden_size"
    return lambda m: (gates * m.hidden_size, getattr(m, inputs))


TABLE: tuple[Row, ...] = (
    Row("linen", ("Dense", "recurrent.DenseParams"), "kernel", _IN_OUT),
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
    Row("linen", ("Einsum",), "kernel", _EINSUM, roles=_einsum_roles),
    Row("linen", ("Conv",), "kernel", when=_grouped("feature_group_count"), why=_GROUPED_WHY),
    Row("linen", ("ConvTranspose",), "kernel", _HWOI, _spatial("kernel_size"), _transposed()),
    Row("linen", ("Conv", "ConvTranspose"), "kernel", _HWIO, _spatial("kernel_size")),
    Row("linen", ("ConvLocal",), "kernel", _LOCAL, lambda m: {"*positions": len(m.kernel_size)}),
    Row("linen", ("Embed",), "embedding", why=_EMBED_WHY),
    Row("linen", _NORMS, "*", why=_NORM_WHY),
    Row("nnx", ("Linear",), "kernel", _IN_OUT, shape=lambda m: (m.in_features, m.out_features)),
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
        shape=_nnx_general,
    ),
    Row(
        "nnx",
        ("Einsum",),
        "kernel",
        _EINSUM,
        roles=_einsum_roles,
        shape=lambda m: tuple(m.kernel_shape),
    ),
    Row("nnx", ("Conv",), "kernel", when=_grouped("feature_group_count"), why=_GROUPED_WHY),
    Row(
        "nnx",
        ("ConvTranspose",),
        "kernel",
        _HWOI,
        _spatial("kernel_size"),
        _transposed(),
        shape=_nnx_conv_t,
    ),
    Row("nnx", ("Conv",), "kernel", _HWIO, _spatial("kernel_size"), shape=_nnx_conv),
    Row("nnx", ("ConvTranspose",), "kernel", _HWIO, _spatial("kernel_size"), shape=_nnx_conv_t),
    Row("nnx", ("Embed",), "embedding", why=_EMBED_WHY),
    Row("nnx", _NORMS, "*", why=_NORM_WHY),
    Row(
        "equinox",
        ("Linear",),
        "weight",
        _OUT_IN,
        shape=lambda m: (_size(m.out_features), _size(m.in_features)),
    ),
    Row("equinox", ("GRUCell",), "weight_ih", _OUT_IN, shape=_eqx_cell(3, "weight_ih")),
    Row("equinox", ("GRUCell",), "weight_hh", _OUT_IN, shape=_eqx_cell(3, "weight_hh")),
    Row("equinox", ("LSTMCell",), "weight_ih", _OUT_IN, shape=_eqx_cell(4, "weight_ih")),
    Row("equinox", ("LSTMCell",), "weight_hh", _OUT_IN, shape=_eqx_cell(4, "weight_hh")),
    Row("equinox", ("Conv", "ConvTranspose"), "weight", when=_grouped("groups"), why=_GROUPED_WHY),
    Row(
        "equinox",
        ("Conv", "ConvTranspose"),
        "weight",
        _OIHW,
        lambda m: {"*spatial": m.num_spatial_dims},
        shape=_eqx_conv,
    ),
    Row("equinox", ("Embedding",), "weight", why=_EMBED_WHY),
    Row("equinox", _NORMS[:4], "*", why=_NORM_WHY),
    Row("equinox", ("StateIndex",), "*", why="layer state (eqx.nn.State), not a parameter"),
)
"""Module type -> layout, one row each; :func:`markdown_table` prints it for the docs.

Rows are tried in order; the first whose class (or a base of the module's class),
parameter and condition match gives the layout. A parameter no row matches is skipped.
"""

PACKAGES = MappingProxyType({"linen": "flax.linen", "nnx": "flax.nnx", "equinox": "equinox.nn"})


# --------------------------------------------------------------------------- layouts


def _roles(row: Row, module: Any) -> list[str]:
    """The role of each of the parameter's own axes; a COLUMN run's last axis is the
    column, its other axes groups."""
    if row.roles is not None:
        return row.roles(module)
    sizes = row.sizes(module) if row.sizes is not None else {}
    roles: list[str] = []
    for name, role in row.axes:
        count = sizes[name] if name.startswith("*") else 1
        run = [role] * count
        if role == COLUMN:
            run = [GROUP] * (count - 1) + [COLUMN]
        roles += run
    return roles


def own_shape(row: Row, module: Any) -> tuple[int | None, ...] | None:
    """The parameter's own shape from the module's attributes, or None if unknown."""
    return None if row.shape is None else row.shape(module)


def _placements(
    shape: tuple[int, ...], own: tuple[int | None, ...] | None, rank: int
) -> list[tuple[int, ...]]:
    """Where the parameter's ``rank`` own axes can sit in ``shape``, in order: the
    other (stacked) axes are groups. Without ``own``, the stacked axes lead."""
    if own is None or len(own) != rank:
        return [tuple(range(len(shape) - rank, len(shape)))]
    return [
        at
        for at in itertools.combinations(range(len(shape)), rank)
        if all(size is None or shape[a] == size for a, size in zip(at, own, strict=True))
    ]


def _dims_at(roles: list[str], at: tuple[int, ...], shape: tuple[int, ...]) -> OrthoDims:
    vectors = [a for a, role in zip(at, roles, strict=True) if role in (VECTOR, CHANNEL)]
    (column,) = [a for a, role in zip(at, roles, strict=True) if role == COLUMN]
    if shape[column] > math.prod(shape[a] for a in vectors):
        # Wide: more columns than the vectors' length, so the orthonormal rows of the
        # flattened (l, n) matrix: the old column is the vector, the old vector axes
        # (flattened together, as for the vectors) index the columns.
        rows = vectors[0] if len(vectors) == 1 else tuple(vectors)
        return OrthoDims(column, rows)
    vector_axis: int | tuple[int, ...] = vectors[0] if len(vectors) == 1 else tuple(vectors)
    return OrthoDims(vector_axis, -1 if column == len(shape) - 1 else column)


def layout(
    row: Row,
    module: Any,
    shape: tuple[int, ...],
    where: str,
    own: tuple[int | None, ...] | None = None,
) -> OrthoDims | None:
    """The :class:`OrthoDims` of a parameter of ``shape`` at ``where``, by ``row``.

    ``own`` is the parameter's own shape (linen: recorded in the trace; else from
    the module's attributes): axes of ``shape`` beyond it (a stack of layers, an
    ensemble) are groups, wherever they sit.
    """
    if not row.axes:
        return None
    roles = _roles(row, module)
    if COLUMN not in roles or not {VECTOR, CHANNEL} & set(roles):
        return None
    name = type(module).__name__
    if len(shape) < len(roles):
        names = ", ".join(n for n, _ in row.axes)
        raise ValueError(
            f"dimension_numbers_for: the parameter at {where} has shape {shape}, but a "
            f"{name}'s {row.param!r} has {len(roles)} axes ({names})."
        )
    own = own if own is not None else own_shape(row, module)
    found = _placements(shape, own, len(roles))
    options = {_dims_at(roles, at, shape) for at in found}
    if len(options) == 1:
        return options.pop()
    stacked = [tuple(a for a in range(len(shape)) if a not in at) for at in found]
    leading = tuple(range(len(shape) - len(roles), len(shape)))
    if leading in found:
        # nn.scan, nnx.scan, eqx.filter_vmap and nn.vmap's default stack in front: where
        # the own axes also fit last (2 layers of 2 heads), the stacked axes lead. Said,
        # since a stack elsewhere whose sizes happen to fit is then taken wrongly.
        warnings.warn(
            f"dimension_numbers_for: the parameter at {where} has shape {shape}, and a "
            f"{name}'s own {row.param!r} is {own}: the stacked axes could be any of "
            f"{stacked}; taking the leading ones, as nn.scan, nnx.scan and "
            "eqx.filter_vmap stack. If this leaf is stacked elsewhere (nn.vmap or "
            "nnx.vmap on another axis), give its OrthoDims by hand.",
            UserWarning,
            stacklevel=4,
        )
        return _dims_at(roles, leading, shape)
    raise ValueError(
        f"dimension_numbers_for: the parameter at {where} has shape {shape}, and a "
        f"{name}'s own {row.param!r} is {own}: "
        + (
            f"the stacked axes (nn.vmap, nnx.vmap, eqx.filter_vmap) could be any of "
            f"{stacked}, which give different layouts. Give this leaf's OrthoDims by hand."
            if found
            else "it does not fit."
        )
    )


def skip_why(row: Row, module: Any) -> str:
    """Why ``row`` gives ``module``'s parameter no layout."""
    name = type(module).__name__
    if row.why:
        return f"{name} {row.param if row.param != '*' else 'parameter'}: {row.why}"
    return f"{name} {row.param}: no contracted and no output-only axis in its einsum_str"


# --------------------------------------------------------------------------- docs

_PREFIX = MappingProxyType({"linen": "nn.", "nnx": "nnx.", "equinox": "eqx.nn."})
_EINSUM_CELLS = (
    "`einsum_str`'s kernel letters",
    "kernel letters contracted with the input",
    "the last kernel letter only in the output",
    "the other kernel letters (in the output)",
    "vectors: the column letter; columns: the contracted letters",
)


def _run_names(row: Row, role: str) -> list[str]:
    return [name for name, r in row.axes if r == role]


def _cells(row: Row) -> list[str]:
    if not row.axes:
        return ["", f"skipped (`None`): {row.why}", "", "", ""]
    if row.roles is not None:
        return list(_EINSUM_CELLS)
    (column_run,) = _run_names(row, COLUMN)
    column, column_rest = (
        (f"{column_run}[-1]", f"{column_run}[:-1]")
        if column_run.startswith("*")
        else (column_run, "")
    )
    groups = [*_run_names(row, GROUP), column_rest]
    vectors = [name for name, role in row.axes if role in (VECTOR, CHANNEL)]

    def code(names: list[str]) -> str:
        names = [n for n in names if n]
        return ", ".join(f"`{n}`" for n in names) if names else "none"

    shape = "`(" + ", ".join(name for name, _ in row.axes) + ")`"
    return [
        shape,
        code(vectors),
        code([column]),
        code(groups),
        f"vectors {code([column])}, columns {code(vectors)}, groups {code(groups)}",
    ]


def _name(framework: str, name: str) -> str:
    if name == "recurrent.DenseParams":
        return f"`{_PREFIX[framework]}OptimizedLSTMCell`'s `DenseParams`"
    return f"`{_PREFIX[framework]}{name}`"


def markdown_table() -> str:
    """:data:`TABLE` as the Markdown table of docs/layouts.md (which a test checks)."""
    lines = [
        "| module | parameter | own axes | vectors (l) | columns (n) | groups | if n > l |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in TABLE:
        module = ", ".join(_name(row.framework, name) for name in row.modules)
        if row.when is not None:
            module += f" with `{row.when[0]}`"
        param = "every parameter" if row.param == "*" else f"`{row.param}`"
        lines.append("| " + " | ".join([module, param, *_cells(row)]) + " |")
    return "\n".join(lines) + "\n"
