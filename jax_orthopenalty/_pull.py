r"""One leaf's pull, and when to apply it: shared by the soft penalty and the constraint.

:func:`pull` is the closed-form gradient of one selected leaf scaled by :math:`\beta`
(a scalar, or one number per group), together with each group's error
:math:`\max_{jk} |X_i|_{jk}` from the same Gram matrix. :func:`check_every`,
:func:`times` and :func:`lazily` implement ``every=k`` (lazy regularisation): the steps
with count 0, k, 2k, ... add :math:`k` times the pull, the others form no Gram matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from ._family import backward, forward
from ._layout import Layout
from ._options import Options, make_spec

__all__ = ["check_every", "lazily", "pull", "times"]

_INT32_MAX = int(np.iinfo(np.int32).max)


def pull(
    phi: jax.Array, scale: jax.Array, layout: Layout, options: Options
) -> tuple[jax.Array, jax.Array]:
    """``(scale * dL/dphi, error per group)`` of a checked leaf, from one Gram matrix.

    ``scale`` is a real scalar or a ``(groups...)`` array: one :math:`\beta_i` per group.
    """
    spec = make_spec(phi, layout, options)
    res = forward(spec, phi)
    grad = backward(spec, phi, res, scale.astype(res.total.dtype))
    return grad.astype(phi.dtype), res.error


def check_every(every: object) -> int | jax.Array:
    """``every``: an int >= 1, the period of lazy regularisation.

    A Python (or NumPy, or concrete JAX) integer is static. A traced integer scalar,
    which is what ``optax.inject_hyperparams`` passes unless ``every`` is in
    ``static_args``, is taken as it is: the period is then read at run time.
    """
    if isinstance(every, jax.core.Tracer):
        if every.shape != () or not jnp.issubdtype(every.dtype, jnp.integer):
            raise TypeError(f"`every` must be an integer scalar, got a traced {every.aval}.")
        return cast(jax.Array, every)
    is_int_array = getattr(every, "shape", None) == () and jnp.issubdtype(
        getattr(every, "dtype", None) or np.float64, jnp.integer
    )
    if isinstance(every, (bool, np.bool_)) or not (isinstance(every, int) or is_int_array):
        raise TypeError(
            "`every` must be an int >= 1 (the period of lazy regularisation), got "
            f"{every!r} of type {type(every).__name__}."
        )
    period = int(cast(Any, every))
    if period < 1:
        raise ValueError(
            f"`every` must be >= 1 (apply the penalty every k-th step), got {period}."
        )
    if period > _INT32_MAX:
        # The step count is an int32 (saturating, as optax's): a longer period never
        # comes round, and count % period would overflow at the first update.
        raise ValueError(
            f"`every` must be at most {_INT32_MAX} (the step count is an int32), got {period}."
        )
    return period


def times(period: int | jax.Array, strength: jax.Array) -> jax.Array:
    """``period * strength`` in strength's dtype; NaN for a traced period below 1."""
    if isinstance(period, int):
        return strength if period == 1 else period * strength
    k = period.astype(strength.dtype)
    return jnp.where(period >= 1, k, jnp.nan) * strength


def lazily(
    count: jax.Array, period: int | jax.Array, add: Callable[[Any], Any], updates: Any
) -> Any:
    """``add(updates)`` on the steps whose count is a multiple of ``period``, else the
    updates unchanged; the other branch forms no Gram matrix (under ``jax.vmap`` the
    ``lax.cond`` becomes a select, and both run)."""
    if isinstance(period, int) and period == 1:
        return add(updates)
    return jax.lax.cond(count % period == 0, add, lambda u: u, updates)
