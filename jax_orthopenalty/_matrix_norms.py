r"""The matrix norms of the family: the spectral norm (exact or estimated) and the max norm.

An entrywise norm is a sum over the entries of :math:`X_i = \Phi_i^\top\Phi_i - I`; these
are functions of the whole :math:`n \times n` matrix, one value per group. Each is a
``joint(x) -> (value, F)`` over ``x`` of shape ``(groups..., n, n)``: ``value`` has the
group shape, and ``F`` is the :math:`n \times n` subgradient of the group's value with
respect to :math:`X_i`, so the penalty's backward pass is still
:math:`\beta\,\Phi_i (F_i + F_i^\top)`: one matmul.

Kinks are resolved by the minimum-norm element of the subdifferential, scaled by the
``sign`` convention (the ``subgradient`` option) where the derivative of :math:`|t|` is
needed:

* spectral, :math:`\lVert X\rVert_2 = \max_j |\lambda_j|` with :math:`X = V \Lambda V^\top`:
  :math:`F = \frac{1}{k} \sum_{j \in T} s(\lambda_j)\, v_j v_j^\top` over the set
  :math:`T` of the :math:`k` eigenvalues whose modulus ties for the largest;
* max, :math:`\max_{jk} |X_{jk}|`: :math:`F = \frac{1}{k} \sum_{e \in T} s(X_e)\, E_e`
  over the :math:`k` entries :math:`e` whose modulus ties for the largest.

Both derivative rules are differentiable again (grad of grad, Hessians): the
spectral one by the Daleckii-Krein formula (a ``custom_jvp``), which stays finite where
eigenvalues repeat; the max one is piecewise constant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._matrix import max_or_nan

__all__ = ["MaxRule", "SpectralRule", "power_start"]

Sign = Callable[[jax.Array], jax.Array]

HIGHEST = jax.lax.Precision.HIGHEST

TIE_ULPS = 4
r"""Eigenvalue moduli within ``TIE_ULPS * n * eps * top`` of the largest, ``top``, tie
with it (``eps`` of the accumulation dtype): the backward error of ``eigh``, so that a
repeated eigenvalue that comes out of the solver split by rounding still counts once per
copy."""


def _nonfinite(x: jax.Array) -> jax.Array:
    """Per group: whether any entry of ``x`` is NaN or infinite.

    Entry by entry: a sum of finite entries can overflow, and would flag a group
    whose value is exact."""
    return ~jnp.all(jnp.isfinite(x), axis=(-2, -1))


def _poison(bad: jax.Array, value: jax.Array, f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """NaN in the value and in F of every group flagged ``bad``: never a finite answer."""
    nan = jnp.asarray(jnp.nan, value.dtype)
    return jnp.where(bad, nan, value), jnp.where(bad[..., None, None], nan, f)


def _sandwich(v: jax.Array, d: jax.Array) -> jax.Array:
    """V diag(d) V^T, batched, at full precision."""
    return jnp.einsum("...ij,...j,...kj->...ik", v, d, v, precision=HIGHEST)


# --------------------------------------------------------------------------- spectral


def _spectral_parts(
    x: jax.Array, squared: bool, sign: Sign
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Eigen-decomposition, the top set and the weights c with F = V diag(c) V^T."""
    n = x.shape[-1]
    lam, v = jnp.linalg.eigh(x, symmetrize_input=True)
    mod = jnp.abs(lam)
    top = max_or_nan(mod, axis=-1, keepdims=True)
    eps = float(np.finfo(x.dtype).eps)
    # Ties: within the solver's backward error of the largest modulus (see TIE_ULPS).
    # At X = 0 every eigenvalue is exactly 0 and ties. NaN ties with nothing: k = 0.
    in_top = mod >= top - TIE_ULPS * n * eps * top
    k = jnp.sum(in_top, axis=-1, keepdims=True).astype(x.dtype)
    # The derivative of |lambda| (or of lambda^2) at each top eigenvalue, averaged over
    # the top set: the minimum-norm element of the subdifferential. sign(0) is the
    # convention's and only matters at X = 0 (then every eigenvalue is 0).
    slope = 2 * lam if squared else _sign_of_eigenvalues(sign, lam)
    c = jnp.where(in_top, slope, 0) / k
    value = top[..., 0] ** 2 if squared else top[..., 0]
    return value, lam, v, c, k, in_top


def _sign_of_eigenvalues(sign: Sign, lam: jax.Array) -> jax.Array:
    # A user's callable is checked where it is applied (see _rules._Checked): say that
    # here it is applied to the eigenvalues, not to X itself.
    on = getattr(sign, "on", None)
    return on(lam, "the eigenvalues of X") if on is not None else sign(lam)


def _spectral_joint(x: jax.Array, squared: bool, sign: Sign) -> tuple[jax.Array, jax.Array]:
    value, _, v, c, _, _ = _spectral_parts(x, squared, sign)
    return _poison(_nonfinite(x), value, _sandwich(v, c))


_spectral_exact = jax.custom_jvp(_spectral_joint, nondiff_argnums=(1, 2))


@_spectral_exact.defjvp
def _spectral_exact_jvp(
    squared: bool, sign: Sign, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    # F = V diag(c(lambda)) V^T is a spectral function of X with c piecewise constant
    # (s / k on the top set) or, for squared, piecewise linear (2 lambda / k on it).
    # Daleckii-Krein: dF = V (K o (V^T dX V)) V^T with K_ij = (c_i - c_j) /
    # (lambda_i - lambda_j), and c'(lambda_i) where they are equal. c' is 0, or 2 / k
    # within the top set for squared, where K_ij = 2 / k for every pair in it: set
    # exactly, not left to the rounding of a difference over a tiny gap. Repeated
    # eigenvalues give a finite K (0 between equal weights), never 1 / 0.
    (x,), (dx,) = primals, tangents
    bad = _nonfinite(x)
    value, lam, v, c, k, in_top = _spectral_parts(x, squared, sign)
    f = _sandwich(v, c)
    sym = 0.5 * (dx + jnp.swapaxes(dx, -1, -2))
    rot = jnp.einsum("...ji,...jk,...kl->...il", v, sym, v, precision=HIGHEST)
    gap = lam[..., :, None] - lam[..., None, :]
    diff = c[..., :, None] - c[..., None, :]
    same = gap == 0
    kernel = jnp.where(same, 0, diff / jnp.where(same, 1, gap))
    if squared:
        both = in_top[..., :, None] & in_top[..., None, :]
        kernel = jnp.where(both, 2 / k[..., None], kernel)
    df = jnp.einsum("...ij,...jk,...lk->...il", v, kernel * rot, v, precision=HIGHEST)
    dvalue = jnp.sum(f * sym, axis=(-2, -1))
    value, f = _poison(bad, value, f)
    dvalue, df = _poison(bad, dvalue, df)
    return (value, f), (dvalue, df)


def power_start(n: int) -> np.ndarray:
    r"""The fixed start vector of the power iteration: :math:`b_j = \{j\varphi^{-1}\}`.

    The fractional parts of :math:`j (\sqrt 5 - 1)/2`, :math:`j = 1, \dots, n`: a
    deterministic, equidistributed stand-in for SRIP's uniform draw from
    :math:`[0, 1)^n`, with distinct non-zero entries (so it is orthogonal to no
    :math:`e_j` and no :math:`e_j - e_k`). Unnormalised; the estimate does not depend
    on its scale.
    """
    j = np.arange(1, n + 1, dtype=np.float64)
    return np.mod(j * (math.sqrt(5.0) - 1.0) / 2.0, 1.0)


def _norm_last(w: jax.Array) -> jax.Array:
    """|w| over the last axis, with a finite derivative at 0 and NaN kept."""
    s = jnp.sum(w * w, axis=-1, keepdims=True)
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1)), s)


def _unit(w: jax.Array) -> jax.Array:
    nrm = _norm_last(w)
    return w / jnp.where(nrm > 0, nrm, 1)


def _power_value(x: jax.Array, squared: bool, iterations: int) -> jax.Array:
    """|X v_k| (or its square), v_k the k-th normalised power iterate from b."""
    b = jnp.asarray(power_start(x.shape[-1]), x.dtype)
    v = jnp.broadcast_to(_unit(b), x.shape[:-1])

    def step(_: int, v: jax.Array) -> jax.Array:
        return _unit(jnp.einsum("...jk,...k->...j", x, v, precision=HIGHEST))

    # The first step outside the loop: the carry then starts with x's type (under
    # shard_map, varying over x's mesh axes), not the constant b's.
    v = jax.lax.fori_loop(1, iterations, step, step(0, v))
    xv = jnp.einsum("...jk,...k->...j", x, v, precision=HIGHEST)
    if squared:
        return jnp.sum(xv * xv, axis=-1)
    return _norm_last(xv)[..., 0]


# --------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class SpectralRule:
    """``x -> (value, F)`` for the spectral norm; hashable and compared by value."""

    squared: bool
    iterations: int | None
    sign: Sign

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.shape[-1] == 0:
            return jnp.zeros(x.shape[:-2], x.dtype), x
        if self.iterations is None:
            return _spectral_exact(x, self.squared, self.sign)
        # The estimate's own derivative (through the iterates), on the small matrices:
        # value and gradient agree exactly. b is fixed, so nothing is random.
        value, vjp = jax.vjp(lambda a: _power_value(a, self.squared, self.iterations or 0), x)
        (f,) = vjp(jnp.ones_like(value))
        return _poison(_nonfinite(x), value, f)


@dataclasses.dataclass(frozen=True)
class MaxRule:
    """``x -> (value, F)`` for the max norm; hashable and compared by value."""

    sign: Sign

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.shape[-1] == 0:
            return jnp.zeros(x.shape[:-2], x.dtype), x
        mod = jnp.abs(x)
        top = max_or_nan(mod, axis=(-2, -1), keepdims=True)
        # Ties are exact equality of the computed moduli, split evenly (the minimum-norm
        # subgradient; what jax.grad of jnp.max does). The derivative of |X_e| at the
        # arg-max is the convention's sign, which only matters if the max is 0 (X = 0).
        # NaN ties with nothing: k = 0 and F = 0 / 0 = NaN.
        tied = mod == top
        k = jnp.sum(tied, axis=(-2, -1), keepdims=True).astype(x.dtype)
        f = jnp.where(tied, self.sign(x), 0) / k
        f = jax.lax.stop_gradient(f)
        # The value is `top`; written so that its derivative is exactly F (the
        # convention), at every order, instead of autodiff's choice at the kink.
        value = jax.lax.stop_gradient(top[..., 0, 0]) + jnp.sum(
            f * (x - jax.lax.stop_gradient(x)), axis=(-2, -1)
        )
        return value, f
