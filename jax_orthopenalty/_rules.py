r"""Entrywise norms and subgradient conventions.

The penalty applies an entrywise function :math:`f` to the Gram residual
:math:`X = \Phi^\top\Phi - I` and sums. Its backward pass needs :math:`f'(X)`.
This module turns the user's ``norm`` and ``subgradient`` options into one
:class:`Rule`: a pair of pure ``jax.Array -> jax.Array`` functions, ``value`` and
``derivative``, that the penalty applies to ``X``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp

__all__ = [
    "SQUARED",
    "Norm",
    "Rule",
    "Subgradient",
    "deadzone",
    "huber",
    "make_rule",
]


@dataclasses.dataclass(frozen=True)
class deadzone:
    r"""The subgradient convention that treats a band around the kink as the kink.

    .. math::

        s(x) = \begin{cases} \operatorname{sign}(x) & |x| > \mathrm{tol} \\
                             0 & |x| \le \mathrm{tol} \end{cases}

    Near orthonormality the entries of :math:`\Phi_i^\top\Phi_i - I` are small
    differences whose sign is decided by rounding. ``deadzone`` gives them a zero
    derivative, which stops the L1 gradient from chattering around the minimum.
    ``deadzone(0.0)`` is the ``"zero"`` convention. A ``tol`` below the resolution
    of the dtype (for example ``1e-9`` in float32, where entries near zero are
    still representable) is legal; it then only catches entries that are that
    small, which in practice makes it behave like ``"zero"``.

    Args:
      tol: the half-width of the band, a finite float ``>= 0``.

    The instance is the convention, to pass as ``subgradient=``. It is hashable
    and compared by value, so equal tolerances share a jit cache entry.

    Raises:
      ValueError: if ``tol`` is negative, NaN or infinite.
      TypeError: if ``tol`` is not a real number.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> phi = jnp.eye(3)[:, None, :] * 1.0001    # one group, nearly orthonormal
      >>> jop.orthogonality_penalty_grad(phi, subgradient=jop.deadzone(1e-3)).max()
      Array(0., dtype=float32)
    """

    tol: float

    def __post_init__(self) -> None:
        _check_positive_real("tol", self.tol, allow_zero=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        # |x| <= tol is the kink's band: derivative 0 there. NaN fails the test
        # and falls through to sign(NaN) = NaN, so it propagates. (The residuals are
        # floating; anything else is compared as a float, also under strict promotion.)
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.result_type(float))
        return jnp.where(jnp.abs(x) <= self.tol, jnp.zeros_like(x), jnp.sign(x))


@dataclasses.dataclass(frozen=True)
class huber:
    r"""The Huber norm: the Moreau envelope of :math:`|x|`, a smooth L1.

    .. math::

        h_\delta(x) = \begin{cases} \dfrac{x^2}{2\delta} & |x| \le \delta \\[4pt]
                                    |x| - \dfrac{\delta}{2} & |x| > \delta
                      \end{cases}
        \qquad
        h_\delta'(x) = \operatorname{clip}(x / \delta, -1, 1)

    It is quadratic within ``delta`` of the minimum, so the gradient shrinks to 0
    there instead of jumping between :math:`\pm 1`, and equals :math:`|x|` minus a
    constant farther out. As ``delta -> 0`` it tends to the ``"l1"`` norm. It is
    smooth, so the ``subgradient`` option does not apply to it.

    Note the scale: ``optax.losses.huber_loss(x, delta=d)`` is ``d * huber(d)(x)``.

    Args:
      delta: the width of the quadratic zone, a finite float ``> 0``.

    The instance is the norm, to pass as ``norm=``, with ``value`` and
    ``derivative`` methods. It is hashable and compared by value.

    Raises:
      ValueError: if ``delta`` is not positive and finite.
      TypeError: if ``delta`` is not a real number.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> phi = jnp.array([[2.0], [0.0]])           # one group, one column, |x| = 3
      >>> jop.orthogonality_penalty(phi, norm=jop.huber(1.0))
      Array(2.5, dtype=float32)
    """

    delta: float

    def __post_init__(self) -> None:
        _check_positive_real("delta", self.delta, allow_zero=False)

    def value(self, x: jax.Array) -> jax.Array:
        ax = jnp.abs(x)
        return jnp.where(ax <= self.delta, 0.5 * x * x / self.delta, ax - 0.5 * self.delta)

    def derivative(self, x: jax.Array) -> jax.Array:
        return jnp.clip(x / self.delta, -1.0, 1.0)


Norm: TypeAlias = Literal["l1", "squared"] | huber
"""The entrywise norm f applied to X = Phi_i^T Phi_i - I before summing.

``"l1"`` is |x| (with a kink at 0, see :data:`Subgradient`), ``"squared"`` is x**2
(the Frobenius² "soft orthogonality" penalty), :class:`huber` is a smooth L1.
"""

Subgradient: TypeAlias = (
    Literal["zero", "positive", "negative"] | deadzone | Callable[[jax.Array], jax.Array]
)
"""The derivative of |x| that the ``"l1"`` norm's gradient uses, a static option.

``"zero"`` (sign(0) = 0, the minimum-norm subgradient: the gradient at an exactly
orthonormal Phi is 0), ``"positive"`` (sign(0) = +1, what ``jax.grad(jnp.abs)``
gives), ``"negative"`` (sign(0) = -1), :class:`deadzone` (0 in a band around 0), or
a callable mapping an array x to an array s of its shape with values in [-1, 1].
"""


def _check_positive_real(name: str, x: object, *, allow_zero: bool) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"`{name}` must be a real number (a Python float), got {x!r}.")
    bound = "finite and >= 0" if allow_zero else "finite and > 0"
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {bound}, got {x!r}.")


# The three named conventions for d|x|/dx. All equal sign(x) away from 0 and
# differ only at x == 0. jnp.sign(NaN) is NaN, so NaN propagates in every one.
def _sign_zero(x: jax.Array) -> jax.Array:
    # sign(0) = 0: the minimum-norm element of the subdifferential [-1, 1].
    return jnp.sign(x)


def _sign_positive(x: jax.Array) -> jax.Array:
    # sign(0) = +1: what jax.grad(jnp.abs) returns at 0.
    return jnp.where(x == 0, jnp.ones_like(x), jnp.sign(x))


def _sign_negative(x: jax.Array) -> jax.Array:
    # sign(0) = -1.
    return jnp.where(x == 0, -jnp.ones_like(x), jnp.sign(x))


_NAMED_SUBGRADIENTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "zero": _sign_zero,
    "positive": _sign_positive,
    "negative": _sign_negative,
}


def _square(x: jax.Array) -> jax.Array:
    return x * x


def _twice(x: jax.Array) -> jax.Array:
    return 2 * x


@dataclasses.dataclass(frozen=True)
class Rule:
    """An entrywise function and the derivative the backward pass uses.

    Hashable and compared by value, so it can be a static argument.
    """

    value: Callable[[jax.Array], jax.Array]
    derivative: Callable[[jax.Array], jax.Array]


SQUARED = Rule(_square, _twice)
"""The ``"squared"`` norm's rule (its double-sided term has an exact n x n form)."""


def make_rule(norm: Norm, subgradient: Subgradient) -> Rule:
    """Validates ``norm`` and ``subgradient`` and returns their :class:`Rule`.

    Raises:
      ValueError: for an unknown name.
      TypeError: for an option of the wrong kind.
    """
    derivative = _subgradient_fn(subgradient)
    if isinstance(norm, huber):
        return Rule(norm.value, norm.derivative)
    if isinstance(norm, str):
        if norm == "l1":
            return Rule(jnp.abs, derivative)
        if norm == "squared":
            return SQUARED
        raise ValueError(
            f"`norm` must be 'l1', 'squared' or jax_orthopenalty.huber(delta), got {norm!r}."
        )
    raise TypeError(
        f"`norm` must be 'l1', 'squared' or jax_orthopenalty.huber(delta), got {norm!r} "
        f"of type {type(norm).__name__}."
    )


def _subgradient_fn(subgradient: Subgradient) -> Callable[[jax.Array], jax.Array]:
    if isinstance(subgradient, str):
        try:
            return _NAMED_SUBGRADIENTS[subgradient]
        except KeyError:
            raise ValueError(
                "`subgradient` must be 'zero', 'positive', 'negative', "
                f"jax_orthopenalty.deadzone(tol) or a callable, got {subgradient!r}."
            ) from None
    if isinstance(subgradient, jax.Array):
        raise TypeError(
            "`subgradient` must be static (a name, deadzone(tol) or a Python callable), "
            "not an array. Under optax.inject_hyperparams, name it in static_args: "
            'static_args=("subgradient",).'
        )
    if callable(subgradient):
        return subgradient
    raise TypeError(
        "`subgradient` must be 'zero', 'positive', 'negative', "
        f"jax_orthopenalty.deadzone(tol) or a callable, got {subgradient!r} "
        f"of type {type(subgradient).__name__}."
    )
