r"""What a tree-wide transform selects, in which layout: one line per leaf.

:func:`summary` runs the selection of :func:`add_orthogonality_penalty` (``mask``
first, then ``dimension_numbers``: the same ``_select``) on a pytree of parameters
and prints what it decided, so that a layout nobody meant (a conv kernel taken
along its height, a classifier head whose columns cannot be orthonormal) is seen
before training, not after.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ._conv_layout import ConvLayout
from ._layout import zero_parts
from ._select import (
    DimensionNumbers,
    MaskOrFn,
    check_mask,
    default_skip,
    masked_paths,
    masked_view,
    select,
    shape_and_dtype,
)

__all__ = ["summary"]

_HEADER = ("leaf", "shape", "dtype", "selected", "vectors", "column", "groups", "l", "n", "notes")


def _axes_text(axes: tuple[int, ...]) -> str:
    return str(axes[0]) if len(axes) == 1 else str(axes)


def _notes(x: Any, axes: Any, ndim: int, l: int, n: int, default: bool) -> str:
    notes = []
    if n > l:
        notes.append("n > l: use the rows")
    if default and ndim >= 3:
        notes.append("rank >= 3 by default: see dimension_numbers_for")
    groups, columns = zero_parts(x, axes.vector_axes, axes.column_axes)
    if groups:
        notes.append(f"{groups} all-zero group{'s' * (groups > 1)}: landing can't move")
    if columns:
        notes.append(f"{columns} zero column{'s' * (columns > 1)}: landing can't move")
    return "; ".join(notes)


def _selected(
    x: Any, shape: tuple[int, ...], dtype: Any, dims: Any, default: bool
) -> tuple[str, ...]:
    """The columns from "selected" on, for a leaf ``dims`` selects."""
    try:
        axes = dims.layout(len(shape))
        if isinstance(axes, ConvLayout):
            axes.check_kernel(shape)
    except (ValueError, TypeError) as e:
        return ("error", "", "", "", "", "", str(e))
    if not jnp.issubdtype(dtype, jnp.inexact):
        # What the transforms raise on it (check_phi): listed as an error, not selected.
        return ("error", "", "", "", "", "", f"dtype {dtype} is not floating")
    if isinstance(axes, ConvLayout):
        return _operator(shape, axes)
    columns = axes.column_axes
    groups = math.prod(s for a, s in enumerate(shape) if a not in (*axes.vector_axes, *columns))
    l = math.prod(shape[a] for a in axes.vector_axes)
    n = math.prod(shape[a] for a in columns)
    return (
        "yes",
        _axes_text(axes.vector_axes),
        _axes_text(columns),
        str(groups),
        str(l),
        str(n),
        _notes(x, axes, len(shape), l, n, default),
    )


def _operator(shape: tuple[int, ...], layout: ConvLayout) -> tuple[str, ...]:
    """A ConvDims leaf: the operator view. l and n are the two sides of the condition
    (rows: n = M/G out channels against l = C S^d per group; columns: the reverse)."""
    m, c = layout.channels(shape)
    rows = layout.rows(shape)
    shifts = math.prod(2 * k - 1 for k in layout.reduced_size(shape))
    stride = "x".join(map(str, layout.stride))
    view = (
        f"operator rows: M/G = {m} <= C S^d = {c}"
        if rows
        else f"operator columns: M/G = {m} > C S^d = {c}"
    )
    groups = math.prod(layout.operator_shape(shape))
    l, n = (c, m) if rows else (m, c)
    notes = f"{view}; {shifts} shift{'s' * (shifts != 1)}, stride {stride}"
    return ("yes", layout.kernel_layout, "operator", str(groups), str(l), str(n), notes)


def _row(path: Any, x: Any, masked: bool, dims: Any, default: bool) -> tuple[str, ...]:
    where = jax.tree_util.keystr(path) or "(root)"
    blank = ("",) * 6
    known = shape_and_dtype(x)
    if known is None:
        return (where, "", "", f"no: not an array ({type(x).__name__})", *blank)
    shape, dtype = known
    head = (where, str(tuple(shape)), str(dtype))
    if masked:
        return (*head, "no: masked out by `mask`", *blank)
    if dims is None:
        # dims is None under the default selection exactly where default_skip says why.
        reason = default_skip(x) if default else "`dimension_numbers` gives None"
        return (*head, f"no: {reason}", *blank)
    return (*head, *_selected(x, shape, dtype, dims, default))


def summary(
    params: Any, *, mask: MaskOrFn = None, dimension_numbers: DimensionNumbers = None
) -> str:
    r"""One line per leaf: whether the transforms penalise it, and in which layout.

    The leaves and layouts are chosen exactly as :func:`add_orthogonality_penalty`,
    :func:`tree_orthogonality_penalty`, :func:`landing` and
    :func:`project_orthonormal` choose them for the same ``mask`` and
    ``dimension_numbers`` (the same code). For every leaf the line gives its path,
    shape and dtype; whether it is selected, or why not (masked out, ``None`` in
    ``dimension_numbers``, or under the default selection a rank below 2 or a
    dtype that is not floating); and for a selected leaf its vector axes (contracted
    in the Gram matrix, flattened together: their sizes multiply to :math:`l`), its
    column axis (:math:`n` columns), and the number of groups (the product of the
    other axes). The notes flag what is likely not meant:

    * ``n > l``: more columns than the vectors' length. The :math:`n` columns of a
      group cannot be orthonormal, so the penalty cannot reach 0 and
      :func:`landing` and :func:`project_orthonormal` raise. The rows can be:
      swap the axes (:func:`dimension_numbers_for` does), or skip the leaf.
    * a rank >= 3 leaf under the default layout (``dimension_numbers=None``): a
      conv kernel or a stack of layers, taken with its first axis as the vectors.
      :func:`dimension_numbers_for` gives the layout a module means.
    * all-zero groups (concrete params only): :func:`landing` leaves them at zero,
      as its field vanishes at :math:`X = 0`.
    * ``error`` (in the selected column): the layout does not fit the leaf; the
      notes give the error the transforms raise.

    Args:
      params: a pytree of parameters: arrays, or anything with ``shape`` and
        ``dtype`` (``jax.ShapeDtypeStruct``, the output of ``jax.eval_shape``).
      mask: as in :func:`add_orthogonality_penalty`.
      dimension_numbers: as in :func:`add_orthogonality_penalty`.

    Returns:
      A table as a string (print it): a header, one line per leaf, and a last line
      with the number of leaves and groups selected.

    Raises:
      ValueError, TypeError: a ``mask`` or ``dimension_numbers`` that does not match
        the params, as the transforms raise.

    Examples:
      A conv kernel, its bias and a wide classifier head, under the default layout:

      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> params = {"conv": jnp.ones((3, 3, 3, 8)), "bias": jnp.zeros(8), "head": jnp.ones((8, 10))}
      >>> print(jop.summary(params))
      leaf      shape         dtype    selected        vectors  column  groups  l  n   notes
      ['bias']  (8,)          float32  no: rank 1 < 2
      ['conv']  (3, 3, 3, 8)  float32  yes             0        3       9       3  8   n > l: use the rows; rank >= 3 by default: see dimension_numbers_for
      ['head']  (8, 10)       float32  yes             0        1       1       8  10  n > l: use the rows
      selected: 2 of 3 leaves, 10 groups

      and in the layouts meant: one group per conv kernel (the receptive fields of
      the 8 output channels), the head's rows.

      >>> dims = {"conv": jop.OrthoDims((0, 1, 2), 3), "bias": None, "head": jop.OrthoDims(1, 0)}
      >>> print(jop.summary(params, dimension_numbers=dims))
      leaf      shape         dtype    selected                            vectors    column  groups  l   n  notes
      ['bias']  (8,)          float32  no: `dimension_numbers` gives None
      ['conv']  (3, 3, 3, 8)  float32  yes                                 (0, 1, 2)  3       1       27  8
      ['head']  (8, 10)       float32  yes                                 1          0       1       10  8
      selected: 2 of 3 leaves, 2 groups
    """  # noqa: E501
    check_mask(mask)
    view = masked_view(params, mask)
    hidden = masked_paths(view)
    dims_at = {leaf.path: leaf.dims for leaf in select(view, dimension_numbers)[1]}
    rows: list[tuple[str, ...]] = [_HEADER]
    count = groups = 0
    # None leaves (equinox's empty fields, an absent bias) are no parameters: not listed.
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        masked = any(path[:k] in hidden for k in range(len(path) + 1))
        row = _row(path, x, masked, dims_at.get(path), dimension_numbers is None)
        rows.append(row)
        if row[3] == "yes":
            count += 1
            groups += int(row[6] or 0)
    widths = [max(len(r[k]) for r in rows) for k in range(len(_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"selected: {count} of {len(rows) - 1} leaves, {groups} group{'s' * (groups != 1)}"
    )
    return "\n".join(lines)
