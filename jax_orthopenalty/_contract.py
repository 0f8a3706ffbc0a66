r"""The two contractions of the penalty, each in the formulation that is fastest for its shape.

Everything the penalty and its closed-form gradient compute that is not :math:`O(mn^2)`
is one of two contractions over the groups :math:`\Phi_i` (:math:`l \times n`):

* :func:`gram`: :math:`C_i = \Phi_i^\top \Phi_i`, shaped ``(groups..., n, n)``;
* :func:`apply`: :math:`\Phi_i M_i`, shaped like ``phi``.

For complex ``phi`` the Gram is :math:`C_i = \Phi_i^H \Phi_i` (the first operand
conjugated, in every formulation) and the product stays :math:`\Phi_i M_i`.

Both are written once as an ``einsum`` over the layout's subscripts (the definition,
and the fallback). How XLA lowers that einsum depends a lot on the shape: a group axis
in the middle of ``phi`` (the default ``(l, m, n)`` layout) makes it a batched dot with
its batch dimension in the middle, and tiny groups (:math:`n \le 8`) make it thousands
of tiny matmuls, each far below the cost of the call. So the formulation is chosen
statically, from the shapes, at trace time:

``"batched"``
  Transpose ``phi`` once to ``(groups..., vectors..., n)`` (a no-op when it is already
  in that order, for example a 2-D ``phi`` or ``m = 1``) and do one batch-first
  ``dot_general``, with the einsum's ``precision`` and ``preferred_element_type``;
  only the operand order differs. One wide group (``m = 1``, ``n >= 64``) takes the
  Gram as the "NT" product of ``(n, l)`` with itself, which XLA's CPU backend runs
  faster. The default.

``"halves"``
  The Gram for ``n >= 1024``: :math:`C = [[A^\top A, A^\top B], [B^\top A, B^\top B]]`
  for the column halves :math:`[A\ B]`, three quarter-size dots instead of four (the
  lower block is the transpose of the upper), so :math:`C` is exactly symmetric.

``"unrolled"``
  Tiny groups (at least 8 of them), at full precision. The Gram matrix is a sum of
  :math:`l` outer products :math:`\sum_a \phi_a \phi_a^\top` of the rows
  :math:`\phi_a` of every group, unrolled over the rows (``n <= 8, l <= 128`` or
  ``n <= 16, l <= 32``; on one device only, as the rows may be sharded); the product
  :math:`\Phi_i M_i` is a sum of :math:`n` broadcast products, column :math:`d` of
  :math:`\Phi_i` times row :math:`d` of :math:`M_i`, unrolled over the columns
  (``n <= 8``). XLA fuses each into one elementwise loop over ``phi``, vectorised
  across the groups, instead of a batch of :math:`4 \times 4` matmuls; a copy loop
  (:func:`_materialize`) keeps the small matrices from being fused into, and
  recomputed by, the loop over ``phi``. Products and sums are in the accumulation
  dtype (float32 for bfloat16/float16), as ``preferred_element_type`` asks of the
  dot; used only where the dot would run at full precision too (``HIGHEST``, or
  float32 and float64 on CPU, where XLA ignores ``precision``), so the arithmetic is
  the same and only the summation order differs.

``"einsum"``
  The definition itself, for empty arrays.

Under :func:`jax.vmap` each call is traced at its unbatched shape, where the batch is
invisible to :func:`choose`. So :func:`gram` and :func:`apply` are
:func:`jax.custom_batching.custom_vmap` functions whose rule moves the batch axis to
the front of ``phi`` and makes it one more group axis: ``jax.vmap`` over any number of
axes runs the formulation, and the code, of the direct call that has those axes as
group axes. Their derivatives (a ``custom_jvp``: the bilinear product rule, in the
same formulations) are plain JAX, so forward and reverse mode of any order work.

The thresholds below were measured on a 2-core AVX-512 Xeon (a KVM guest) with
``benchmarks/bench_grad.py`` (see ``docs/performance.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching, lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ._layout import Layout
from ._matrix import adjoint

__all__ = ["Formulation", "apply", "choose", "explicit_sharding", "gram", "group_out_sharding"]

Formulation = Literal["einsum", "batched", "halves", "unrolled"]

HALVES_MIN_COLUMNS = 1024
"""The Gram matrix is built from the column halves (3 dots, not 4) from this many columns."""

UNROLL_MIN_GROUPS = 8
"""The unrolled formulations are used from this many groups ..."""

UNROLL_MAX_COLUMNS = 8
"""The product is unrolled (over the columns) for groups of at most this many columns."""

UNROLL_GRAM = ((8, 128), (16, 32))
"""The Gram matrix is unrolled (over the rows) for ``n <= 8, l <= 128`` or ``n <= 16, l <= 32``."""


def _is_static(size: Any) -> bool:
    """Whether ``size`` is a known integer, not a symbolic dimension of ``jax.export``."""
    return isinstance(size, (int, np.integer))


def _full_precision(precision: Any) -> bool:
    """Whether ``precision`` asks the dot for full float32 (or better) arithmetic."""
    if isinstance(precision, (tuple, list)):
        return all(_full_precision(p) for p in precision)
    try:
        return lax.Precision(precision) == lax.Precision.HIGHEST
    except (ValueError, TypeError):
        return False


def choose(
    layout: Layout,
    shape: Sequence[int],
    dtype: Any,
    precision: Any,
    which: Literal["gram", "apply"],
) -> Formulation:
    """The formulation of one contraction, from static shapes, dtype and precision.

    Args:
      layout: the layout of ``phi``.
      shape: ``phi``'s shape.
      dtype: the dtype the contraction computes in (the accumulation dtype).
      precision: the requested matmul precision.
      which: ``"gram"`` or ``"apply"``.

    Returns:
      ``"einsum"``, ``"batched"``, ``"halves"`` or ``"unrolled"``.
    """
    m, l, n = layout.sizes(shape)
    if not all(map(_is_static, (m, l, n))):
        # A symbolic size (shape polymorphism, as jax.export traces) is unknown here:
        # comparing it with a threshold would be inconclusive. The dot is right for
        # every size, and a symbolic size is >= 1, never empty.
        return (
            "halves"
            if which == "gram" and _is_static(n) and n >= HALVES_MIN_COLUMNS
            else "batched"
        )
    if m * l * n == 0:
        return "einsum"
    # The unrolled forms compute every product and sum at the accumulation dtype's
    # full precision. That is what the dot does at HIGHEST; lower precisions ask for
    # the hardware's fast matmul modes, which only the dot can give.
    full = _full_precision(precision) or (
        jax.default_backend() == "cpu" and jnp.dtype(dtype).itemsize >= 4
    )
    # Below a few groups there is nothing to vectorise across (and the gain is a
    # microsecond or two): keep the dot.
    tiny = full and m >= UNROLL_MIN_GROUPS
    if tiny and which == "apply" and n <= UNROLL_MAX_COLUMNS:
        return "unrolled"
    # The unrolled Gram slices the rows of the vector axes. Where those may be
    # sharded over devices every slice becomes a collective; the dot partitions into
    # local dots and one all-reduce of the Gram. So on several devices, the dot.
    if (
        tiny
        and which == "gram"
        and any(n <= nc and l <= lr for nc, lr in UNROLL_GRAM)
        and jax.device_count() == 1
    ):
        return "unrolled"
    if which == "gram" and n >= HALVES_MIN_COLUMNS:
        return "halves"
    return "batched"


# --------------------------------------------------------------------------- helpers
#
# No reshapes: merging group (or vector) axes into one would make the SPMD partitioner
# gather a sharded axis. Transposes and dot_general with several batch and contracting
# dimensions keep every axis, so a sharding on any of them carries through.


def _batch_first_perm(layout: Layout) -> tuple[int, ...]:
    return (*layout.group_axes, *layout.vector_axes, layout.column_axis)


def _batch_first(layout: Layout, x: jax.Array) -> jax.Array:
    """``x`` as ``(groups..., vectors..., n)``; a no-op when already in that order."""
    return jnp.transpose(x, _batch_first_perm(layout))


def _from_batch_first(layout: Layout, y: jax.Array) -> jax.Array:
    """The inverse of :func:`_batch_first`."""
    return jnp.transpose(y, tuple(int(a) for a in np.argsort(_batch_first_perm(layout))))


def _columns_first(layout: Layout, x: jax.Array) -> jax.Array:
    """``x`` as ``(groups..., n, vectors...)``: the rows of ``Phi_i^T``."""
    return jnp.transpose(x, (*layout.group_axes, layout.column_axis, *layout.vector_axes))


def _gram_dot_nt(
    layout: Layout, x: jax.Array, y: jax.Array, precision: Any, acc: Any
) -> jax.Array:
    """``x_i y_i^T`` for columns-first ``x``, ``y``: ``(groups..., n_x, n_y)``."""
    g, k = len(layout.group_axes), len(layout.vector_axes)
    vectors, groups = tuple(range(g + 1, g + 1 + k)), tuple(range(g))
    return lax.dot_general(
        x,
        y,
        ((vectors, vectors), (groups, groups)),
        precision=precision,
        preferred_element_type=acc,
    )


def _use_nt(layout: Layout, shape: Sequence[int]) -> bool:
    # One group, wide (n >= 64, below the halves): contracting the minor axes of
    # (n, l) against itself is the "NT" product that XLA's CPU backend hands to its
    # faster library kernel (13% at (1152, 1, 256)); with one group the transposed
    # copy is the only phi-sized temporary. With many groups the second transpose
    # of phi would be a second phi-sized buffer; for the halves it measured slower.
    m, _, n = layout.sizes(shape)
    return _is_static(m) and _is_static(n) and m == 1 and n >= 64


def _gram_dot(layout: Layout, x: jax.Array, y: jax.Array, precision: Any, acc: Any) -> jax.Array:
    """``x_i^T y_i`` for batch-first ``x``, ``y``: ``(groups..., n_x, n_y)``."""
    g, k = len(layout.group_axes), len(layout.vector_axes)
    vectors, groups = tuple(range(g, g + k)), tuple(range(g))
    return lax.dot_general(
        x,
        y,
        ((vectors, vectors), (groups, groups)),
        precision=precision,
        preferred_element_type=acc,
    )


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """``x``'s sharding where it is part of its type (an Explicit mesh axis), else None.

    On an Explicit mesh a contraction over a sharded axis must say where its result
    lives (``out_sharding``); the einsums do, so such input takes the einsum.
    """
    sharding = jax.typeof(x).sharding
    if not isinstance(sharding, NamedSharding):
        return None
    mesh = sharding.mesh
    if mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return None
    return sharding


def group_out_sharding(layout: Layout, x: jax.Array, trailing: int) -> NamedSharding | None:
    """For a contraction of ``x`` over its vector (or column) axes, on an Explicit mesh:
    the result ``(groups..., *trailing)`` keeps the groups' sharding and is replicated on
    the rest, so JAX inserts the reduction over a sharded vector axis."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return None
    spec = (*sharding.spec, *(None,) * (x.ndim - len(sharding.spec)))
    groups = (spec[a] for a in layout.group_axes)
    out = PartitionSpec(*groups, *(None,) * trailing)  # type: ignore[no-untyped-call]
    return NamedSharding(sharding.mesh, out)


# --------------------------------------------------------------------------- vmap
#
# Under jax.vmap a function is traced at its unbatched shape, so `choose` would see
# the groups of one call only (often m = 1) and pick the dot, which vmap then turns
# into one tiny matmul per batch element. `gram` and `apply` are custom_vmap
# functions instead: their batching rule moves vmap's axis to the front of phi and
# makes it one more group axis, so a vmapped call runs exactly the formulation, and
# the code, of the direct call with the batch as groups. custom_vmap has no
# transpose, so each is wrapped in a custom_jvp whose tangent is the bilinear
# product rule written with the same (unwrapped) formulations: forward mode,
# linearize and reverse mode (grad of the closed-form gradient) then go through
# plain JAX, and only the primal goes through custom_vmap.


def _fold(layout: Layout) -> Layout:
    """The layout of ``phi`` with vmap's batch axis in front, as one more group axis."""
    return Layout(
        layout.ndim + 1, tuple(a + 1 for a in layout.vector_axes), layout.column_axis + 1
    )


def _with_batch(x: jax.Array, size: int, batched: bool) -> jax.Array:
    """``x`` with a leading batch axis of ``size``: broadcast where vmap left it unbatched."""
    return x if batched else jnp.broadcast_to(x, (size, *x.shape))


# --------------------------------------------------------------------------- gram


def gram(layout: Layout, phi: jax.Array, *, precision: Any, acc: Any) -> jax.Array:
    r"""The Gram matrices :math:`\Phi_i^H\Phi_i`, ``(groups..., n, n)``, in ``acc``.

    Equal to ``jnp.einsum(layout.gram_subscripts, phi.conj(), phi, precision=precision,
    preferred_element_type=acc)`` up to the order of summation (``conj`` is the
    identity for real ``phi``). Under :func:`jax.vmap`
    the batch axis becomes a group axis (see above).
    """

    def primal(p: jax.Array) -> jax.Array:
        return _gram(layout, p, p, precision, acc)

    def vmap_rule(size: int, in_batched: list[bool], p: jax.Array) -> tuple[jax.Array, bool]:
        # custom_vmap calls this only when p is batched, with the batch axis in front.
        return gram(_fold(layout), p, precision=precision, acc=acc), True

    inner = custom_batching.custom_vmap(primal)
    inner.def_vmap(vmap_rule)

    def jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
        # d(P^H P) = P^H dP + (P^H dP)^H: exactly Hermitian (symmetric), as C is.
        (p,), (dp,) = primals, tangents
        # The primal through `outer`, not `inner`: at the next order of
        # differentiation it is this rule again, never custom_vmap, which has none.
        y = _gram(layout, p, dp, precision, acc)
        return outer(p), y + adjoint(y)

    outer = jax.custom_jvp(inner)
    outer.defjvp(jvp)
    out: jax.Array = outer(phi)
    return out


def _gram(layout: Layout, x: jax.Array, y: jax.Array, precision: Any, acc: Any) -> jax.Array:
    """``x_i^H y_i`` for every group, ``(groups..., n, n)``, in the chosen formulation.

    Each formulation conjugates its first operand after its transposes, so that
    ``y is x`` still shares them.
    """
    explicit = explicit_sharding(x) is not None
    how = "einsum" if x.size == 0 or explicit else choose(layout, x.shape, acc, precision, "gram")
    if how == "unrolled":
        return _gram_unrolled(layout, x, y, acc)
    if how == "halves" and x is y:
        return _gram_halves(layout, x, precision, acc)
    if how in ("batched", "halves"):
        return _gram_batched(layout, x, y, precision, acc)
    return jnp.einsum(
        layout.gram_subscripts,
        jnp.conj(x),
        y,
        precision=precision,
        preferred_element_type=acc,
        out_sharding=group_out_sharding(layout, x, 2),
    )


def _gram_batched(
    layout: Layout, x: jax.Array, y: jax.Array, precision: Any, acc: Any
) -> jax.Array:
    if _use_nt(layout, x.shape):
        tx = _columns_first(layout, x)
        ty = tx if y is x else _columns_first(layout, y)
        return _gram_dot_nt(layout, jnp.conj(tx), ty, precision, acc)
    tx = _batch_first(layout, x)
    ty = tx if y is x else _batch_first(layout, y)
    return _gram_dot(layout, jnp.conj(tx), ty, precision, acc)


def _gram_halves(layout: Layout, phi: jax.Array, precision: Any, acc: Any) -> jax.Array:
    # C = [[A^H A, A^H B], [B^H A, B^H B]] for the column halves [A B]: the lower
    # block is the adjoint of the upper one, so three quarter-size dots do it.
    t = _batch_first(layout, phi)
    n = t.shape[-1]
    a, b = t[..., : n // 2], t[..., n // 2 :]
    ca, cb = jnp.conj(a), jnp.conj(b)
    aa, bb = _gram_dot(layout, ca, a, precision, acc), _gram_dot(layout, cb, b, precision, acc)
    ab = _gram_dot(layout, ca, b, precision, acc)
    return jnp.concatenate(
        [
            jnp.concatenate([aa, ab], axis=-1),
            jnp.concatenate([adjoint(ab), bb], axis=-1),
        ],
        axis=-2,
    )


def _gram_unrolled(layout: Layout, x: jax.Array, y: jax.Array, acc: Any) -> jax.Array:
    # Vectors first, columns last; the transpose and the row slices fuse into the
    # one loop that sums the outer products of the rows.
    perm = (*layout.vector_axes, *layout.group_axes, layout.column_axis)
    tx = jnp.transpose(x, perm).astype(acc)
    ty = tx if y is x else jnp.transpose(y, perm).astype(acc)
    tx = jnp.conj(tx)
    rows = np.ndindex(*tx.shape[: len(layout.vector_axes)])
    first = next(rows)
    total = _outer(tx[first], ty[first])
    for index in rows:
        total = total + _outer(tx[index], ty[index])
    return _materialize(total)


def _outer(a: jax.Array, b: jax.Array) -> jax.Array:
    return a[..., :, None] * b[..., None, :]


def _materialize(x: jax.Array) -> jax.Array:
    """``x``, computed once into a buffer of its own.

    XLA fuses cheap elementwise producers into their consumers even when the
    consumer reads each element many times: an elementwise Gram matrix (or the
    small matrix ``M`` built from it) would be recomputed for every element of
    ``phi``, 16 times the work at ``(16, m, 4)``. ``lax.optimization_barrier`` does
    not stop that on CPU (it is expanded before fusion), a reduce is handed to a
    slow library kernel, and a one-trip loop is simplified away; a two-trip loop
    copying the halves of ``x`` is a boundary that every backend keeps. It costs two
    copies of the ``m n^2`` numbers (into the loop's buffer, and the halves), and one
    buffer of that size.
    """
    # Split along the last axis (a column axis of the small matrices): the group axes
    # may be sharded, and a dynamic slice of a sharded axis would gather it. Keeping
    # x's shape (no flat view) keeps the producer's loop vectorised.
    axis = x.ndim - 1
    size = x.shape[axis] if x.ndim else 0
    if size < 2:
        return x
    half = size // 2

    def copy_half(i: jax.Array, buf: jax.Array) -> jax.Array:
        part = lax.dynamic_slice_in_dim(x, i * half, half, axis)
        return lax.dynamic_update_slice_in_dim(buf, part, i * half, axis)

    # The buffer starts as x itself, not zeros: one small buffer fewer (a zeros init
    # is shared between the loops and copied), and the same two copies.
    out: jax.Array = lax.fori_loop(0, 2, copy_half, x)
    if size % 2:
        last = lax.slice_in_dim(x, size - 1, size, axis=axis)
        out = lax.dynamic_update_slice_in_dim(out, last, size - 1, axis)
    return out


# --------------------------------------------------------------------------- apply


def apply(layout: Layout, phi: jax.Array, m: jax.Array, *, precision: Any) -> jax.Array:
    r""":math:`\Phi_i M_i` for every group, shaped like ``phi``, in ``m``'s dtype.

    Equal to ``jnp.einsum(layout.apply_subscripts, phi.astype(m.dtype), m,
    precision=precision, preferred_element_type=m.dtype)`` up to the order of summation.
    Under :func:`jax.vmap` the batch axis becomes a group axis (see above).
    """

    def primal(p: jax.Array, w: jax.Array) -> jax.Array:
        return _apply(layout, p, w, precision)

    def vmap_rule(
        size: int, in_batched: list[bool], p: jax.Array, w: jax.Array
    ) -> tuple[jax.Array, bool]:
        # An unbatched operand (phi, or M when only beta is batched) is broadcast.
        p, w = _with_batch(p, size, in_batched[0]), _with_batch(w, size, in_batched[1])
        return apply(_fold(layout), p, w, precision=precision), True

    inner = custom_batching.custom_vmap(primal)
    inner.def_vmap(vmap_rule)

    def jvp(
        primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        # Bilinear: d(P M) = dP M + P dM.
        (p, w), (dp, dw) = primals, tangents
        tangent = _apply(layout, dp, w, precision) + _apply(layout, p, dw, precision)
        return outer(p, w), tangent  # `outer`: see gram's rule

    outer = jax.custom_jvp(inner)
    outer.defjvp(jvp)
    out: jax.Array = outer(phi, m)
    return out


def _apply(layout: Layout, phi: jax.Array, m: jax.Array, precision: Any) -> jax.Array:
    """``phi_i m_i`` for every group in the chosen formulation, in ``m``'s dtype."""
    explicit = explicit_sharding(phi)
    if phi.size == 0 or explicit is not None:
        how: Formulation = "einsum"
    else:
        how = choose(layout, phi.shape, m.dtype, precision, "apply")
    x = phi.astype(m.dtype)
    if how == "unrolled":
        return _apply_unrolled(layout, x, m)
    if how in ("batched", "halves"):
        return _apply_batched(layout, x, m, precision)
    return jnp.einsum(
        layout.apply_subscripts,
        x,
        m,
        precision=precision,
        preferred_element_type=m.dtype,
        out_sharding=explicit,
    )


def _apply_batched(layout: Layout, x: jax.Array, m: jax.Array, precision: Any) -> jax.Array:
    t = _batch_first(layout, x)
    g = len(layout.group_axes)
    groups = tuple(range(g))
    y = lax.dot_general(  # (groups..., vectors..., n): batch dims first, as in t
        t,
        m,
        (((t.ndim - 1,), (g,)), (groups, groups)),
        precision=precision,
        preferred_element_type=m.dtype,
    )
    return _from_batch_first(layout, y)


def _apply_unrolled(layout: Layout, x: jax.Array, m: jax.Array) -> jax.Array:
    # (Phi M)[..., c] = sum_d Phi[..., d] M[d, c]: column d broadcast along the column
    # axis times row d of M broadcast along the vector axes; one fused loop.
    m = _materialize(m)  # built once, not once for every element of phi
    total: jax.Array | None = None
    for d in range(x.shape[layout.column_axis]):
        column = lax.slice_in_dim(x, d, d + 1, axis=layout.column_axis)
        term = column * layout.on_columns(m[..., d, :])
        total = term if total is None else total + term
    assert total is not None  # n >= 1: empty shapes take the einsum
    return total
