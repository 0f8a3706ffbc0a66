r"""The polar factor of every group: matmuls near orthonormal, exact derivatives everywhere.

For a group :math:`Y` (:math:`l \times n`, :math:`n \le l`, full rank) with Gram matrix
:math:`C = Y^\top Y = I + E`, the polar factor is

.. math::

    Q = Y C^{-1/2} = Y (I + E)^{-1/2} = Y \sum_{k \ge 0} \binom{-1/2}{k} E^k,

the series converging for :math:`\|E\|_2 < 1`. After an optimizer step from
orthonormal parameters :math:`\|E\|` is small (of the order of the step), so a few
terms give :math:`Q` to the dtype's precision. :func:`polar` evaluates the series
truncated at degree :math:`d`, choosing :math:`d` per call from a bound on
:math:`\|E\|_2` over all groups, as the lowest degree whose tail is below
:math:`\sqrt{l}\,u` (:math:`u` the unit roundoff, :math:`l` the vectors' length).
That is the rounding error the Gram matrix's entries, dot products of length
:math:`l`, already carry (the typical size, Higham and Mary 2019; measured: 1e-6 in
the spectral norm of the float32 :math:`E` for :math:`l = 784`), and :math:`Q`
inherits half of it (:math:`dQ = -Y\,dE/2`) whatever the degree; a tail below
that far below it would buy no accuracy, only products. So:

* :math:`\|E\|_F` (no matmul) first: degree 1, :math:`Q = Y(I - E/2)`, costs one Gram
  matrix and one product, as the soft penalty's gradient does;
* otherwise :math:`E^2` (one :math:`n \times n` product), and the tighter bound
  :math:`\rho = \|E^2\|_F^{1/2} \ge \|E\|_2` (:math:`E` is symmetric): the
  smallest degree of :data:`DEGREES` whose tail
  :math:`\sum_{k > d} |c_k| \rho^k \le |c_{d+1}| \rho^{d+1} / (1 - \rho)`
  (the :math:`|c_k|` decrease) is below :math:`\sqrt{l}\,u`, evaluated by
  Horner's rule in :math:`E^2` (degree :math:`d` costs :math:`\lfloor d/2 \rfloor`
  products, :math:`E^2` included);
* beyond degree 8's radius (for :math:`l = 784`: 0.27 in float32, 0.03 in float64),
  the exact routes:
  :math:`Y C^{-1/2}` from an ``eigh`` of :math:`C` where every
  :math:`\|E_i\|_F \le 1/2` (:math:`\kappa(C) \le 3`, so squaring the condition
  number costs nothing), else the thin SVD :math:`U V^\top` of every group (a first
  step from a random start, rank-deficient groups, NaN).

Why the series, and not a Newton-Schulz iteration: Newton-Schulz works on
:math:`l \times n` matrices, three products with :math:`Y` per iteration; the series
works on the :math:`n \times n` :math:`E` and touches :math:`Y` twice in all (the
Gram matrix and the final product), which is also all that crosses devices when the
vectors are sharded (one all-reduce of :math:`C`). Its truncation error is known in
advance from the bound, so the degree is chosen, not iterated to convergence; a
Padé form would need a solve. The degree is one ``lax.cond`` and one ``lax.switch``
on scalars: under ``jax.jit`` only the chosen branch runs. Under ``jax.vmap`` a
``cond`` on a batched predicate becomes a ``select`` that runs every branch, the SVD
included: for a batch of leaves, stack them as group axes instead.

**Derivatives.** :func:`polar` is a ``custom_jvp``: with :math:`H = Q^\top Y`
(symmetric positive definite),

.. math::

    dQ = Q\,\Omega + (I - QQ^\top)\, dY\, H^{-1}, \qquad
    H\Omega + \Omega H = Q^\top dY - dY^\top Q,

the Sylvester (Lyapunov) equation solved in the eigenbasis of :math:`H` with the
denominators :math:`h_i + h_j > 0`: no eigenvalue gaps, so it is exact at
orthonormal :math:`Y` and at repeated singular values. The solve (and :math:`H^{-1}`,
the solution for the right side :math:`2I`) is a ``lax.custom_linear_solve``, whose
derivatives are again solves with the same operator, so every order of forward and
reverse mode is exact and NaN-free for finite full-rank input; none of it
differentiates an ``eigh``.

Complex groups (the nearest matrix with orthonormal columns, :math:`Q^H Q = I`) take
the same routes with conjugate transposes: :math:`E` and :math:`H` are Hermitian, and
the Lyapunov operator's transpose, needed by reverse mode, is the solve with
:math:`\overline{H}`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from . import _contract
from ._layout import Layout, real_dtype
from ._matrix import abs2, adjoint, eye_like, max_or_nan, sym

__all__ = ["DEGREES", "NEAR_ORTHONORMAL", "polar", "radii", "vector_length"]

DEGREES = (1, 2, 4, 6, 8)
"""The degrees of the truncated series :func:`polar` chooses from (0 to 4 products)."""

NEAR_ORTHONORMAL = 0.5
"""Beyond the series, groups within this Frobenius distance of orthonormal (every one,
``||C_i - I||_F``) take the polar factor from an ``eigh`` of the Gram matrix; otherwise
every group takes the SVD."""


def _coefficients(degree: int) -> list[float]:
    """:math:`\\binom{-1/2}{k}`, k = 0 ... degree: 1, -1/2, 3/8, -5/16, ..."""
    out = [1.0]
    for k in range(1, degree + 1):
        out.append(out[-1] * -(2 * k - 1) / (2 * k))
    return out


@functools.cache
def radii(dtype: Any, length: int = 1) -> tuple[float, ...]:
    r"""Per degree of :data:`DEGREES`: the largest bound :math:`\rho` on
    :math:`\|E\|_2` for which the series' tail is below :math:`\sqrt{l}\,u`, the
    typical rounding error of a Gram entry of vectors of length ``length``
    (:math:`u`: ``dtype``'s unit roundoff, half its epsilon)."""
    target = float(np.finfo(dtype).eps) / 2 * math.sqrt(max(length, 1))
    out = []
    for d in DEGREES:
        c = abs(_coefficients(d + 1)[-1])
        lo, hi = 0.0, 1.0
        for _ in range(200):  # the tail bound is increasing in rho: bisect
            mid = (lo + hi) / 2
            if c * mid ** (d + 1) / (1 - mid) <= target:
                lo = mid
            else:
                hi = mid
        out.append(lo)
    return tuple(out)


def vector_length(layout: Layout, shape: tuple[Any, ...]) -> int:
    """:math:`l`, the length of a group's vectors (1 where a vector axis is symbolic:
    the tightest tolerance)."""
    sizes = [shape[a] for a in layout.vector_axes]
    return math.prod(sizes) if all(isinstance(s, int) for s in sizes) else 1


# --------------------------------------------------------------------------- helpers


def _mm(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """The product of ``(groups..., n, n)`` stacks: the groups' sharding carries through."""
    return jnp.matmul(a, b, precision=precision)


def _frobenius(e: jax.Array) -> jax.Array:
    """The largest Frobenius norm over all groups: NaN if any group has NaN."""
    return jnp.sqrt(max_or_nan(jnp.sum(abs2(e), axis=(-2, -1)), axis=None))


def _cross(layout: Layout, a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    r""":math:`A_i^H B_i`, ``(groups..., n, n)``: plain JAX, for the derivative rule."""
    return jnp.einsum(
        layout.gram_subscripts,
        jnp.conj(a),
        b,
        precision=precision,
        preferred_element_type=a.dtype,
        out_sharding=_contract.group_out_sharding(layout, a, 2),
    )


def _times(layout: Layout, a: jax.Array, m: jax.Array, precision: Any) -> jax.Array:
    r""":math:`A_i M_i`, shaped like ``a``: plain JAX, for the derivative rule."""
    return jnp.einsum(
        layout.apply_subscripts,
        a,
        m,
        precision=precision,
        preferred_element_type=a.dtype,
        out_sharding=_contract.explicit_sharding(a),
    )


# --------------------------------------------------------------------------- routes


def _series(e: jax.Array, e2: jax.Array | None, degree: int, precision: Any) -> jax.Array:
    r""":math:`\sum_{k \le d} c_k E^k` by Horner's rule in :math:`E^2`, blocks
    :math:`c_{2j} I + c_{2j+1} E`: :math:`\lfloor d/2 \rfloor - 1` products."""
    c = _coefficients(degree)
    eye = eye_like(e)

    def block(j: int) -> jax.Array:
        b = c[2 * j] * eye
        return b + c[2 * j + 1] * e if 2 * j + 1 <= degree else b

    top = degree // 2
    if top == 0:
        return block(0)
    assert e2 is not None
    # An even degree ends in the scalar block c_d I: its product with E^2 is free.
    acc = c[degree] * e2 if degree % 2 == 0 else _mm(e2, block(top), precision)
    for j in range(top - 1, 0, -1):
        acc = _mm(e2, block(j) + acc, precision)
    return block(0) + acc


def _polar_eigh(layout: Layout, y: jax.Array, c: jax.Array, precision: Any) -> jax.Array:
    w, v = jnp.linalg.eigh(c)
    inv_sqrt = _mm(v * jax.lax.rsqrt(w)[..., None, :].astype(v.dtype), adjoint(v), precision)
    return _contract.apply(layout, y, inv_sqrt, precision=precision)


def _polar_svd(layout: Layout, y: jax.Array, precision: Any) -> jax.Array:
    perm = (*layout.group_axes, *layout.vector_axes, layout.column_axis)
    t = jnp.transpose(y, perm)
    g = len(layout.group_axes)
    sharding = _contract.explicit_sharding(t)
    if sharding is not None:
        # The SVD needs every group whole on one device: gather the vector and column
        # axes explicitly (the group axes stay sharded), and give the result back the
        # input's sharding so that the branches of the cond agree. On an Auto mesh
        # XLA's partitioner inserts the same gather.
        spec = (*sharding.spec, *(None,) * (t.ndim - len(sharding.spec)))
        whole = PartitionSpec(*spec[:g], *(None,) * (t.ndim - g))  # type: ignore[no-untyped-call]
        t = jax.sharding.reshard(t, NamedSharding(sharding.mesh, whole))  # type: ignore[no-untyped-call]
    l = math.prod(t.shape[g:-1])
    # Only the vector axes are merged (into l): the group axes stay batch axes.
    u, _, vt = jnp.linalg.svd(t.reshape((*t.shape[:g], l, t.shape[-1])), full_matrices=False)
    q = jnp.matmul(u, vt, precision=precision).reshape(t.shape)
    if sharding is not None:
        q = jax.sharding.reshard(q, sharding)  # type: ignore[no-untyped-call]
    return jnp.transpose(q, tuple(int(a) for a in np.argsort(perm)))


SVD_SCOPE = "polar_svd_fallback"
"""The name scope of the SVD route: its ops (and any gather of a sharded group) carry
it in their HLO ``op_name`` metadata."""


def _named_svd(layout: Layout, y: jax.Array, precision: Any) -> jax.Array:
    with jax.named_scope(SVD_SCOPE):
        # LAPACK's SVD iterates for ever on a matrix with an Inf (NumPy's too): a group
        # with a non-finite entry goes in as zeros and comes out as NaN, never a hang.
        finite = jnp.all(
            jnp.isfinite(y), axis=(*layout.vector_axes, layout.column_axis), keepdims=True
        )
        q = _polar_svd(layout, jnp.where(finite, y, jnp.zeros_like(y)), precision)
        return jnp.where(finite, q, jnp.full_like(q, jnp.nan))


def _polar_exact(
    layout: Layout, y: jax.Array, c: jax.Array, e: jax.Array, precision: Any
) -> jax.Array:
    distance2 = jnp.sum(abs2(e), axis=(-2, -1))
    near = jnp.all(distance2 <= NEAR_ORTHONORMAL**2)  # False for NaN
    return cast(
        jax.Array,
        jax.lax.cond(
            near,
            lambda: _polar_eigh(layout, y, c, precision),
            lambda: _named_svd(layout, y, precision),
        ),
    )


def _polar_primal(layout: Layout, y: jax.Array, precision: Any) -> jax.Array:
    c = sym(_contract.gram(layout, y, precision=precision, acc=y.dtype))
    e = c - eye_like(c)
    bounds = radii(real_dtype(y.dtype), vector_length(layout, y.shape))  # complex64: float32's

    def first() -> jax.Array:
        return _contract.apply(layout, y, _series(e, None, 1, precision), precision=precision)

    def higher() -> jax.Array:
        e2 = _mm(e, e, precision)
        rho = jnp.sqrt(_frobenius(e2))  # >= ||E||_2, as E is Hermitian
        # The first degree whose radius holds; NaN passes every test and falls back.
        index = jnp.sum(~(rho <= jnp.asarray(bounds[1:], rho.dtype)))

        def truncated(degree: int) -> Callable[[], jax.Array]:
            m = functools.partial(_series, e, e2, degree, precision)
            return lambda: _contract.apply(layout, y, m(), precision=precision)

        branches = [truncated(d) for d in DEGREES[1:]]
        branches.append(lambda: _polar_exact(layout, y, c, e, precision))
        return cast(jax.Array, jax.lax.switch(index, branches))

    return cast(jax.Array, jax.lax.cond(_frobenius(e) <= bounds[0], first, higher))


# --------------------------------------------------------------------------- derivatives


def _lyapunov(h: jax.Array, k: jax.Array, precision: Any) -> jax.Array:
    r"""The solution :math:`X` of :math:`HX + XH = K` for Hermitian positive definite
    :math:`H`, per group; differentiable to any order without differentiating ``eigh``."""

    def matvec(x: jax.Array) -> jax.Array:
        return _mm(h, x, precision) + _mm(x, h, precision)

    def eigen_solve(hh: jax.Array, b: jax.Array) -> jax.Array:
        w, v = jnp.linalg.eigh(hh)
        inner = _mm(_mm(adjoint(v), b, precision), v, precision)
        inner = inner / (w[..., :, None] + w[..., None, :]).astype(inner.dtype)
        return _mm(_mm(v, inner, precision), adjoint(v), precision)

    if not jnp.issubdtype(h.dtype, jnp.complexfloating):
        # The operator is self-adjoint: the transposed solve is the solve.
        return cast(
            jax.Array,
            jax.lax.custom_linear_solve(matvec, k, lambda _, b: eigen_solve(h, b), symmetric=True),
        )
    # Complex: the transpose of X -> HX + XH is X -> H^T X + X H^T, with H^T = conj(H).
    return cast(
        jax.Array,
        jax.lax.custom_linear_solve(
            matvec,
            k,
            lambda _, b: eigen_solve(h, b),
            transpose_solve=lambda _, b: eigen_solve(jnp.conj(h), b),
        ),
    )


def polar(layout: Layout, y: jax.Array, *, precision: Any) -> jax.Array:
    r"""The polar factor of every group of ``y`` (in ``y``'s dtype, float32 or wider).

    Routes, costs and derivatives: see the module docstring.
    """

    @jax.custom_jvp
    def fn(x: jax.Array) -> jax.Array:
        return _polar_primal(layout, x, precision)

    @fn.defjvp
    def fn_jvp(
        primals: tuple[jax.Array], tangents: tuple[jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        (x,), (dx,) = primals, tangents
        q = fn(x)  # through fn: the next order of differentiation is this rule again
        h = sym(_cross(layout, q, x, precision))
        qt_dx = _cross(layout, q, dx, precision)
        omega = _lyapunov(h, qt_dx - adjoint(qt_dx), precision)
        # 2I in the type of h (its shape, and under shard_map its varying axes).
        h_inv = _lyapunov(h, 2 * eye_like(h) + jnp.zeros_like(h), precision)
        # (I - Q Q^T) dX H^{-1}: never an l x l matrix.
        normal = _times(layout, dx, h_inv, precision) - _times(
            layout, q, _mm(qt_dx, h_inv, precision), precision
        )
        return q, _times(layout, q, omega, precision) + normal

    out: jax.Array = fn(y)
    return out
