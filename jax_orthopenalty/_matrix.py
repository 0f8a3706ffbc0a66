r"""Helpers on stacks of small matrices, ``(groups..., n, n)``: the bottom of the package.

Every module that works with Gram matrices needs the same few operations on them: the
conjugate transpose, :math:`|x|^2`, an identity that broadcasts against the stack, the
Hermitian part, and a maximum that keeps NaN. They live here once; this module imports
nothing from the package.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["abs2", "adjoint", "eye_like", "max_or_nan", "sym"]


def adjoint(a: jax.Array) -> jax.Array:
    """The conjugate transpose of the last two axes (the transpose, for real ``a``)."""
    return jnp.conj(jnp.swapaxes(a, -1, -2))


def sym(a: jax.Array) -> jax.Array:
    """The Hermitian (symmetric, if real) part of a stack of matrices."""
    return 0.5 * (a + adjoint(a))


def abs2(x: jax.Array) -> jax.Array:
    """:math:`|x|^2` entrywise, real: ``x * x``, or Re² + Im² for complex ``x``."""
    if jnp.iscomplexobj(x):
        re, im = jnp.real(x), jnp.imag(x)
        return re * re + im * im
    return x * x


def eye_like(c: jax.Array) -> jax.Array:
    """The identity in ``c``'s dtype, broadcastable against a ``(groups..., n, n)`` stack."""
    n = c.shape[-1]
    return jnp.eye(n, dtype=c.dtype).reshape((1,) * (c.ndim - 2) + (n, n))


def max_or_nan(x: jax.Array, axis: Any, keepdims: bool = False) -> jax.Array:
    """``jnp.max`` that is NaN wherever the reduced slice has a NaN.

    XLA:CPU's vectorised max reduction does not always propagate NaN: with NaN and
    infinities in one slice it can return inf, or even the reduction's initial value
    -inf. NaN in, NaN out needs the check written out.
    """
    top = jnp.max(x, axis=axis, keepdims=keepdims)
    return jnp.where(jnp.any(jnp.isnan(x), axis=axis, keepdims=keepdims), jnp.nan, top)
