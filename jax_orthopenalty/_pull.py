r"""One leaf's penalty, pull and error, matrix or conv; and when to apply the pull.

:func:`pull` is the closed-form gradient of one selected leaf scaled by :math:`\beta`
(a scalar, or one number per group), together with each group's error
:math:`\max_{jk} |X_i|_{jk}` from the same Gram matrix; :func:`value` and :func:`error`
are the leaf's penalty and error. Each takes the layout the selection validated: a
:class:`~._layout.Layout` (the matrix penalty) or a :class:`~._conv_layout.ConvLayout`
(the conv operator's, whose groups are its operators). :func:`check_every`,
:func:`times` and :func:`lazily` implement ``every=k`` (lazy regularisation): the steps
with count 0, k, 2k, ... add :math:`k` times the pull, the others form no Gram matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import _penalty
from ._conv import conv_error, conv_penalty, conv_pull
from ._conv_layout import ConvLayout
from ._family import backward, forward
from ._layout import Layout
from ._options import Options, make_spec

__all__ = ["check_every", "error", "lazily", "pull", "times", "value"]

AnyLayout = Layout | ConvLayout

_INT32_MAX = int(np.iinfo(np.int32).max)


def pull(
    phi: jax.Array, scale: jax.Array, layout: AnyLayout, options: Options
) -> tuple[jax.Array, jax.Array]:
    """``(scale * dL/dphi, error per group)`` of a checked leaf, from one Gram matrix.

    ``scale`` is a real scalar or a ``(groups...)`` array: one :math:`\beta_i` per group.
    """
    if isinstance(layout, ConvLayout):
        _check_conv(options)
        return conv_pull(phi, scale, layout, options.rule, options.precision)
    spec = make_spec(phi, layout, options)
    res = forward(spec, phi, error=True)
    grad = backward(spec, phi, res, scale.astype(res.total.dtype))
    assert res.error is not None
    return grad.astype(phi.dtype), res.error


def value(phi: jax.Array, beta: Any, layout: AnyLayout, options: Options) -> jax.Array:
    """The penalty of a checked leaf (the custom_vjp: its gradient is the closed form)."""
    if isinstance(layout, ConvLayout):
        _check_conv(options)
        return conv_penalty(phi, beta, layout, options.rule, options.precision)
    return _penalty.penalty(phi, beta, layout, options)


def error(phi: jax.Array, layout: AnyLayout, options: Options) -> jax.Array:
    """``max |X_jk|`` per group (per operator, for a conv kernel) of a checked leaf."""
    if isinstance(layout, ConvLayout):
        _check_conv(options)
        return conv_error(phi, layout, options.precision)
    return _penalty.error(phi, layout, options)


def _check_conv(options: Options) -> None:
    """A conv operator takes the entrywise norms, without the matrix family's options."""
    if options.rule.per_group:
        raise ValueError(
            f"norm={options.rule.name} is a per-group matrix norm; a ConvDims leaf takes "
            "the entrywise norms ('l1', 'squared', huber(delta))."
        )
    flags = [
        name for name in ("off_diagonal", "normalize", "double_sided") if getattr(options, name)
    ]
    if flags:
        raise ValueError(
            f"{', '.join(f'`{f}=True`' for f in flags)}: an option of the matrix penalty, "
            "not defined for a ConvDims leaf (the conv operator's penalty); give the leaf an "
            "OrthoDims (its flattened kernel) or drop the option."
        )


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
