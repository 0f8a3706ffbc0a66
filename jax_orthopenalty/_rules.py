r"""Norms and subgradient conventions: one :class:`Rule` per norm, from one table.

The penalty applies a norm :math:`f` to each Gram residual
:math:`X_i = \Phi_i^\top\Phi_i - I` and sums. Its backward pass needs the
:math:`n \times n` derivative :math:`F_i = \partial f / \partial X_i`. This module turns
the user's ``norm`` and ``subgradient`` options into one :class:`Rule`, whose
``joint(x) -> (value, F)`` the penalty applies to ``x`` of shape
``(groups..., n, n)``: for an entrywise norm (``"l1"``, ``"squared"``, :class:`huber`)
``value`` is :math:`f` entry by entry, for a matrix norm (:class:`spectral`, ``"max"``,
see :mod:`._matrix_norms`) one value per group; either way the total is its sum.

A named norm is one row of :data:`NORMS`, and a parametrised one (:class:`huber`,
:class:`spectral`) has a ``rule`` method; the :class:`Rule` carries what the norm can do
(complex residuals, a double-sided form, whether the kink convention applies), so the
code above asks the rule instead of comparing names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp

from ._matrix import abs2
from ._matrix_norms import MaxRule, SpectralRule

__all__ = [
    "NORMS",
    "Norm",
    "Rule",
    "Subgradient",
    "complex_sign",
    "deadzone",
    "huber",
    "make_rule",
    "sign",
    "spectral",
    "subgradient_fn",
]

Sign = Callable[[jax.Array], jax.Array]


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
        # and falls through to sign(NaN) = NaN, so it propagates. For complex x the
        # band is on the modulus, and sign(x) = x / |x|. (The residuals are floating;
        # anything else is compared as a float, also under strict promotion.)
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(jnp.result_type(float))
        return jnp.where(jnp.abs(x) <= self.tol, jnp.zeros_like(x), sign(x))


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
        ax = jnp.abs(x)  # for complex x: h_delta(|x|)
        return jnp.where(ax <= self.delta, 0.5 * ax * ax / self.delta, ax - 0.5 * self.delta)

    def derivative(self, x: jax.Array) -> jax.Array:
        if jnp.iscomplexobj(x):
            # h'(|x|) x / |x| = x / max(|x|, delta), with the outer branch written as
            # the overflow-safe sign(x) (|x| can overflow where x does not).
            return jnp.where(jnp.abs(x) <= self.delta, x / self.delta, sign(x))
        return jnp.clip(x / self.delta, -1.0, 1.0)

    def rule(self, sign: Sign) -> Rule:
        """The :class:`Rule` of this norm (smooth: ``sign`` does not apply)."""
        del sign
        return Rule(repr(self), self.value, self.derivative, smooth=True)


@dataclasses.dataclass(frozen=True)
class spectral:
    r"""The spectral norm of each Gram residual, exact or estimated (SRIP).

    .. math::

        f(X_i) = \lVert X_i \rVert_2 = \max_j |\lambda_j(X_i)|, \qquad
        X_i = \Phi_i^\top\Phi_i - I, \qquad
        \frac{\partial f}{\partial \Phi_i} = 2\, s\, \Phi_i v v^\top,

    with :math:`X_i v = \lambda v`, :math:`|\lambda|` the largest and
    :math:`s = \operatorname{sign}(\lambda)`. ``squared=True`` gives
    :math:`\lVert X_i\rVert_2^2`, the SRIP penalty of Bansal, Chen and Wang (2018),
    with gradient :math:`2\lambda \cdot 2\, \Phi_i v v^\top`. The backward pass is
    still one matmul with :math:`\Phi_i`: the small matrix is :math:`F_i = s\,v v^\top`.
    ``off_diagonal`` and ``normalize`` apply to :math:`X_i` before the norm
    (``off_diagonal`` zeroes its diagonal).

    **Exact** (``iterations=None``, the default): ``jnp.linalg.eigh`` of every
    :math:`n \times n` :math:`X_i`, :math:`O(n^3)` per group on top of the Gram matrix's
    :math:`O(l n^2)`; fine for the usual :math:`n \le` a few hundred.

    **Ties and the kink.** Where the largest :math:`|\lambda|` is shared by :math:`k`
    eigenvalues (a repeated eigenvalue, or :math:`\lambda` and :math:`-\lambda`), the
    gradient uses the minimum-norm subgradient
    :math:`F_i = \frac1k \sum_{j \in T} s(\lambda_j)\, v_j v_j^\top`. The solver splits
    a repeated eigenvalue by rounding, so moduli within
    :math:`4 n \epsilon \max_j|\lambda_j|` of the largest count as tied
    (:math:`\epsilon` of the accumulation dtype). At :math:`X_i = 0` (exactly
    orthonormal columns, for example a signed permutation) every eigenvalue is 0 and
    :math:`s` is the ``subgradient`` convention's :math:`\operatorname{sign}(0)`:
    ``"zero"`` (the default) gives :math:`F_i = 0`, so the gradient there is exactly 0;
    ``"positive"`` gives :math:`I/n`; :class:`deadzone` ``(tol)`` gives 0 wherever
    :math:`\lVert X_i\rVert_2 \le \mathrm{tol}`. ``squared=True`` is differentiable at
    0 and ignores the convention.

    **Estimated** (``iterations=k``): :math:`k` power iterations from the fixed start
    vector :math:`b_j = \{j (\sqrt5 - 1)/2\}` (fractional parts, :math:`j = 1..n`; no
    randomness), :math:`v_0 = b / \lVert b\rVert`,
    :math:`v_{t+1} = X v_t / \lVert X v_t\rVert`, and the value
    :math:`\lVert X v_k\rVert` (squared for ``squared=True``): :math:`O(k n^2)` per
    group. It is an estimate from below, :math:`\le \lVert X_i\rVert_2`, and 0 if
    :math:`b` happens to be orthogonal to every top eigenvector. Its gradient is the
    exact gradient of the estimate (through the iterates, on the :math:`n \times n`
    matrices), so value and gradient agree; the ``subgradient`` convention does not
    apply (the gradient is 0 where the estimate is 0). ``spectral(squared=True,
    iterations=1)`` is the SRIP authors' formula :math:`\lVert X (Xb / \lVert Xb\rVert)
    \rVert^2`, with this :math:`b` in place of their fresh ``torch.rand`` draw.

    Not combinable with ``double_sided=True``: :math:`\lVert \Phi\Phi^\top - I_l\rVert_2`
    is :math:`\max(\lVert \Phi^\top\Phi - I_n\rVert_2, [l > n])`, which adds nothing
    but a constant.

    Args:
      squared: penalise :math:`\lVert X_i\rVert_2^2` (SRIP) instead of
        :math:`\lVert X_i\rVert_2`. A Python bool.
      iterations: ``None`` for the exact norm, or the number ``k >= 1`` of power
        iterations of the estimate. A Python int.

    The instance is the norm, to pass as ``norm=``; ``norm="spectral"`` is
    ``spectral()``. It is hashable and compared by value.

    Raises:
      TypeError: if ``squared`` is not a bool or ``iterations`` not an int or None.
      ValueError: if ``iterations < 1``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> phi = jnp.diag(jnp.array([2.0, 1.0, 0.5]))    # X = diag(3, 0, -0.75)
      >>> jop.orthogonality_penalty(phi, norm=jop.spectral())
      Array(3., dtype=float32)
      >>> jop.orthogonality_penalty(phi, norm=jop.spectral(squared=True))   # SRIP
      Array(9., dtype=float32)
      >>> jop.orthogonality_penalty_grad(phi, norm="spectral")   # 2 s Phi v v^T, v = e_1
      Array([[4., 0., 0.],
             [0., 0., 0.],
             [0., 0., 0.]], dtype=float32)
      >>> jop.orthogonality_penalty_grad(jnp.eye(3), norm="spectral").max()  # X = 0
      Array(0., dtype=float32)

    References:
      Bansal, Chen and Wang, *Can We Gain More from Orthogonality Regularizations in
      Training Deep CNNs?*, NeurIPS 2018 (SRIP).
    """

    squared: bool = False
    iterations: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.squared, bool):
            raise TypeError(f"`squared` must be a Python bool, got {self.squared!r}.")
        k = self.iterations
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int):
                raise TypeError(f"`iterations` must be None or a Python int, got {k!r}.")
            if k < 1:
                raise ValueError(f"`iterations` must be >= 1 (or None for exact), got {k}.")

    def rule(self, sign: Sign) -> Rule:
        """The :class:`Rule` of this norm: one value and one F per group."""
        joint = SpectralRule(self.squared, self.iterations, sign)
        # Complex X: eigh's Daleckii-Krein jvp is derived for real symmetric X only.
        # Double-sided: ||Phi Phi^T - I||_2 = max(||X||_2, [l > n]) adds a constant only.
        return Rule(
            repr(self), _First(joint), _Second(joint), joint, complex_ok=False, row_form=None
        )


Norm: TypeAlias = Literal["l1", "squared", "spectral", "max"] | huber | spectral
"""The norm f applied to each X_i = Phi_i^T Phi_i - I; the penalty sums it over groups.

The names are the rows of :data:`NORMS`; :class:`huber` and :class:`spectral` take
parameters.

Entrywise (summed over the entries too): ``"l1"`` is |x| (with a kink at 0, see
:data:`Subgradient`), ``"squared"`` is x**2 (the Frobenius² "soft orthogonality"
penalty), :class:`huber` is a smooth L1. Per matrix: ``"spectral"`` (= :class:`spectral`
``()``) is the spectral norm ||X_i||_2 (``spectral(squared=True)``: SRIP), ``"max"`` is
max_jk |X_i|_jk (mutual coherence with ``off_diagonal=True, normalize=True``).
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


def complex_sign(x: jax.Array) -> jax.Array:
    r"""``x / |x|`` for complex ``x``, 0 at 0: the derivative of :math:`|x|`.

    :math:`d|x| = \operatorname{Re}(\overline{s}\, dx)` with :math:`s = x / |x|`.
    Computed on ``x`` divided by :math:`\max(|\mathrm{Re}\, x|, |\mathrm{Im}\, x|)`,
    so it is exact in direction where :math:`|x|` overflows (``x`` finite) or
    underflows; NaN stays NaN. Differentiable away from 0 (``jnp.sign``'s derivative
    is 0 everywhere, wrong for complex ``x``), with derivative 0 at 0.
    """
    re, im = jnp.real(x), jnp.imag(x)
    big = jnp.maximum(jnp.abs(re), jnp.abs(im))
    zero = big == 0  # NaN is not 0: it falls through and propagates
    big = jnp.where(zero, 1, big)
    re, im = re / big, im / big  # modulus in [1, sqrt(2)], or 0 at 0
    mod = jnp.sqrt(jnp.where(zero, 1, re * re + im * im))  # no 1/sqrt(0) in the tangent
    return jnp.where(zero, jnp.zeros_like(x), jax.lax.complex(re / mod, im / mod))


def sign(x: jax.Array) -> jax.Array:
    """``jnp.sign`` for real ``x``; :func:`complex_sign`, ``x / |x|``, for complex ``x``."""
    return complex_sign(x) if jnp.iscomplexobj(x) else jnp.sign(x)


# The three named conventions for d|x|/dx. All equal sign(x) away from 0 and
# differ only at x == 0. jnp.sign(NaN) is NaN, so NaN propagates in every one.
# For complex x, sign(x) = x / |x| and the subdifferential of |x| at 0 is the unit
# disk {|s| <= 1}: 0 is its minimum-norm element, +1 and -1 are points of it.
def _sign_zero(x: jax.Array) -> jax.Array:
    # sign(0) = 0: the minimum-norm element of the subdifferential [-1, 1] (or of
    # the unit disk, for complex x: what jax.grad(jnp.abs) returns at 0j).
    return sign(x)


def _sign_positive(x: jax.Array) -> jax.Array:
    # sign(0) = +1: what jax.grad(jnp.abs) returns at a real 0.
    return jnp.where(x == 0, jnp.ones_like(x), sign(x))


def _sign_negative(x: jax.Array) -> jax.Array:
    # sign(0) = -1.
    return jnp.where(x == 0, -jnp.ones_like(x), sign(x))


_NAMED_SUBGRADIENTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "zero": _sign_zero,
    "positive": _sign_positive,
    "negative": _sign_negative,
}


def _twice(x: jax.Array) -> jax.Array:
    return 2 * x


@dataclasses.dataclass(frozen=True)
class Rule:
    """A norm, the derivative the backward pass uses, and what the norm can do.

    On ``x`` of shape ``(..., n, n)``: entrywise rules give ``value`` and ``derivative``
    entry by entry; a matrix rule (``joint`` set, :attr:`per_group`) gives
    ``joint(x) -> (value, F)`` with one value per group (the last two axes reduced) and
    ``F`` of ``x``'s shape. Either way the penalty sums ``value`` and uses ``F`` in its
    one matmul. Hashable and compared by value, so it can be a static argument.

    Attributes:
      name: the norm as the user wrote it, for error messages.
      complex_ok: whether complex residuals (unitary groups) are supported.
      row_form: the double-sided term: ``"entrywise"`` (the l x l residual, entry by
        entry), ``"gram"`` (an exact identity in the n x n residual: the squared
        norm), or ``None`` (not defined).
      smooth: differentiable everywhere, so the ``subgradient`` convention does not apply.
    """

    name: str
    value: Callable[[jax.Array], jax.Array]
    derivative: Callable[[jax.Array], jax.Array]
    joint: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None
    complex_ok: bool = True
    row_form: Literal["entrywise", "gram"] | None = "entrywise"
    smooth: bool = False

    @property
    def per_group(self) -> bool:
        """Whether ``value`` reduces each group's matrix to one number (a matrix norm)."""
        return self.joint is not None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(value, F)`` in one pass (one eigendecomposition for the spectral norm)."""
        if self.joint is not None:
            return self.joint(x)
        return self.value(x), self.derivative(x)


@dataclasses.dataclass(frozen=True)
class _First:
    """The value half of a ``joint``, as a hashable callable."""

    joint: Callable[[jax.Array], tuple[jax.Array, jax.Array]]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.joint(x)[0]


@dataclasses.dataclass(frozen=True)
class _Second:
    """The derivative half of a ``joint``, as a hashable callable."""

    joint: Callable[[jax.Array], tuple[jax.Array, jax.Array]]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.joint(x)[1]


SQUARED = Rule("'squared'", abs2, _twice, smooth=True, row_form="gram")
"""The ``"squared"`` norm's rule (its double-sided term has an exact n x n form)."""


def _max_rule(sign: Sign) -> Rule:
    joint = MaxRule(sign)
    # The arg-max of a complex X's moduli has no derivative rule here; the row term
    # would be one more arg-max over the l x l residual: neither is implemented.
    return Rule("'max'", _First(joint), _Second(joint), joint, complex_ok=False, row_form=None)


NORMS: Mapping[str, Callable[[Sign], Rule]] = MappingProxyType(
    {
        "l1": lambda sign: Rule("'l1'", jnp.abs, sign),
        "squared": lambda sign: SQUARED,
        "spectral": lambda sign: spectral().rule(sign),
        "max": _max_rule,
    }
)
r"""The named norms: each maps the derivative of :math:`|x|` (the kink convention) to
its :class:`Rule`. ``"l1"`` is :math:`|x|` entry by entry, ``"squared"`` :math:`|x|^2`
(the Frobenius² "soft orthogonality" penalty), ``"spectral"`` :math:`\lVert X_i\rVert_2`
per group (= :class:`spectral` ``()``), ``"max"`` :math:`\max_{jk} |X_i|_{jk}` per group
(mutual coherence with ``off_diagonal=True, normalize=True``)."""

_NORMS = (
    ", ".join(repr(name) for name in NORMS)
    + ", jax_orthopenalty.huber(delta) or jax_orthopenalty.spectral(squared=..., iterations=...)"
)


def make_rule(norm: Norm, subgradient: Subgradient) -> Rule:
    """Validates ``norm`` and ``subgradient`` and returns their :class:`Rule`.

    Raises:
      ValueError: for an unknown name.
      TypeError: for an option of the wrong kind.
    """
    derivative = subgradient_fn(subgradient)
    if isinstance(norm, str):
        if norm not in NORMS:
            raise ValueError(f"`norm` must be {_NORMS}, got {norm!r}.")
        return dataclasses.replace(NORMS[norm](derivative), name=repr(norm))
    if isinstance(norm, (huber, spectral)):
        return norm.rule(derivative)
    raise TypeError(f"`norm` must be {_NORMS}, got {norm!r} of type {type(norm).__name__}.")


def subgradient_fn(subgradient: Subgradient) -> Callable[[jax.Array], jax.Array]:
    """Validates ``subgradient`` and returns the derivative of |x| it names."""
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
    if isinstance(subgradient, deadzone):
        return subgradient
    if callable(subgradient):
        return _Checked(subgradient)
    raise TypeError(
        "`subgradient` must be 'zero', 'positive', 'negative', "
        f"jax_orthopenalty.deadzone(tol) or a callable, got {subgradient!r} "
        f"of type {type(subgradient).__name__}."
    )


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A user's ``subgradient`` callable, checked where it is applied: on the real
    residual (or its eigenvalues), at trace time, with no probe trace of its own."""

    fn: Callable[[jax.Array], jax.Array]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.on(x, "the residual X")

    def on(self, x: jax.Array, what: str) -> jax.Array:
        """``fn(x)``, or a TypeError naming ``subgradient`` and ``what`` ``x`` is."""
        where = f"{what} of shape {x.shape} ({jnp.dtype(x.dtype)})"
        try:
            out = self.fn(x)
        except Exception as e:  # the user's callable failed on the real residual
            raise TypeError(
                f"`subgradient` {self.fn!r} failed on {where}: {type(e).__name__}: {e}"
            ) from e
        shape = getattr(out, "shape", None)
        if shape != x.shape:
            got = type(out).__name__ if shape is None else shape
            raise TypeError(
                f"`subgradient` {self.fn!r} must map an array x to an array of x's shape, "
                f"got {got} for {what} of shape {x.shape}."
            )
        dtype = jnp.dtype(getattr(out, "dtype", None) or jnp.float32)
        if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
            # For complex x the derivative of |x| is x / |x| away from 0: complex. A real
            # result is a convention written for real residuals, not a subgradient of |x|.
            raise TypeError(
                f"`subgradient` {self.fn!r} must return a complex array for the complex "
                f"residual X ({jnp.dtype(x.dtype)}): the derivative of |x| is x / |x| away "
                f"from 0, with |s| <= 1 at 0. Got dtype {dtype}."
            )
        if not jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`subgradient` {self.fn!r} must return a real floating array, got dtype "
                f"{dtype} for {what} of dtype {jnp.dtype(x.dtype)}."
            )
        return jnp.asarray(out)
