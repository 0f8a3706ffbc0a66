r"""Step 1 of the data path: which axes of ``phi`` are what, and every static option.

Everything here runs at trace time on shapes and Python values, before any array
arithmetic: the :class:`Layout` of ``phi`` (its vector, column and group axes, and
the einsum subscripts of the two contractions), the checks on ``phi`` and ``beta``,
and the :class:`Spec` that bundles a validated layout with the entrywise
:class:`~jax_orthopenalty._rules.Rule` and the family flags. The contraction module
(:mod:`._contract`) and the penalty (:mod:`._penalty`) both build on it; it imports
neither.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._rules import Norm, Rule, Subgradient, make_rule, subgradient_fn

__all__ = [
    "DEFAULT_PRECISION",
    "NORMALIZE_EPS",
    "Layout",
    "Spec",
    "VectorAxis",
    "accumulation_dtype",
    "check_beta",
    "check_flag",
    "check_normalize_eps",
    "check_phi",
    "make_layout",
    "make_spec",
    "real_dtype",
]

DEFAULT_PRECISION = jax.lax.Precision.HIGHEST
"""The default matmul precision of the Gram matrix: full float32 on GPU and TPU."""

NORMALIZE_EPS = 1e-12
r"""The default ``normalize_eps``: ``normalize=True`` divides column :math:`j` by
:math:`\sqrt{\max(|\phi_j|^2, \epsilon)}`, :math:`\epsilon = 10^{-12}` as
``tf.math.l2_normalize`` (and so Keras 2's ``OrthogonalRegularizer``) does; Keras 3's
floor of :math:`10^{-7}` on the norm is ``normalize_eps=1e-14``."""

VectorAxis = int | Sequence[int]


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of ``phi`` are vectors, columns and groups; all non-negative."""

    ndim: int
    vector_axes: tuple[int, ...]
    column_axis: int

    @property
    def group_axes(self) -> tuple[int, ...]:
        used = {*self.vector_axes, self.column_axis}
        return tuple(a for a in range(self.ndim) if a not in used)

    # einsum subscripts: one letter per axis of phi; the column axis gets a second
    # letter for the other side of the Gram matrix.
    @functools.cached_property
    def _letters(self) -> str:
        return string.ascii_letters[: self.ndim]

    @functools.cached_property
    def _column_twin(self) -> str:
        return string.ascii_letters[self.ndim]

    def _with(self, axis: int, letter: str) -> str:
        s = list(self._letters)
        s[axis] = letter
        return "".join(s)

    @functools.cached_property
    def gram_subscripts(self) -> str:
        """``phi, phi -> (groups..., n, n)``."""
        groups = "".join(self._letters[a] for a in self.group_axes)
        c, d = self._letters[self.column_axis], self._column_twin
        return f"{self._letters},{self._with(self.column_axis, d)}->{groups}{c}{d}"

    @functools.cached_property
    def apply_subscripts(self) -> str:
        """``phi, (groups..., n, n) -> phi``: the right product Phi_i M_i."""
        groups = "".join(self._letters[a] for a in self.group_axes)
        c, d = self._letters[self.column_axis], self._column_twin
        return f"{self._with(self.column_axis, d)},{groups}{d}{c}->{self._letters}"

    @functools.cached_property
    def _vector_twins(self) -> str:
        return string.ascii_letters[self.ndim + 1 : self.ndim + 1 + len(self.vector_axes)]

    def _with_vector_twins(self) -> str:
        s = list(self._letters)
        for a, t in zip(self.vector_axes, self._vector_twins, strict=True):
            s[a] = t
        return "".join(s)

    @functools.cached_property
    def row_gram_subscripts(self) -> str:
        """``phi, phi -> (groups..., *vector, *vector)``: Phi_i Phi_i^T."""
        groups = "".join(self._letters[a] for a in self.group_axes)
        vec = "".join(self._letters[a] for a in self.vector_axes)
        return f"{self._letters},{self._with_vector_twins()}->{groups}{vec}{self._vector_twins}"

    @functools.cached_property
    def left_apply_subscripts(self) -> str:
        """``(groups..., *vector, *vector), phi -> phi``: the left product H_i Phi_i."""
        groups = "".join(self._letters[a] for a in self.group_axes)
        vec = "".join(self._letters[a] for a in self.vector_axes)
        return f"{groups}{vec}{self._vector_twins},{self._with_vector_twins()}->{self._letters}"


def _normalize_axis(name: str, axis: object, ndim: int) -> int:
    # Python and NumPy integers, as jnp.sum takes them; bools are not axes.
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {axis!r} of type {type(axis).__name__}.")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`{name}`={axis} is out of range for phi of rank {ndim} "
            f"(expected -{ndim} <= axis < {ndim})."
        )
    return axis % ndim


def make_layout(ndim: int, vector_axis: VectorAxis, column_axis: int) -> Layout:
    """Validates the axes for a ``phi`` of rank ``ndim``."""
    if ndim + 1 > len(string.ascii_letters):
        raise ValueError(
            f"`phi` must have rank at most {len(string.ascii_letters) - 1} (one einsum "
            f"letter per axis, and one more for the Gram matrix), got rank {ndim}."
        )
    if ndim < 2:
        raise ValueError(
            f"`phi` must have rank >= 2 (vectors and columns), got rank {ndim}. "
            "A single vector is not a group: reshape it to (l, 1)."
        )
    if isinstance(vector_axis, (tuple, list)):
        if not vector_axis:
            raise ValueError("`vector_axis` must be an int or a non-empty tuple of ints, got ().")
        vector_axes = tuple(_normalize_axis("vector_axis", a, ndim) for a in vector_axis)
        if len(set(vector_axes)) != len(vector_axes):
            raise ValueError(f"`vector_axis`={tuple(vector_axis)} names an axis twice.")
    else:
        vector_axes = (_normalize_axis("vector_axis", vector_axis, ndim),)
    column = _normalize_axis("column_axis", column_axis, ndim)
    if column in vector_axes:
        raise ValueError(
            f"`column_axis`={column_axis} overlaps `vector_axis`={vector_axis}: "
            "an axis is either contracted (vector) or indexes the columns, not both."
        )
    return Layout(ndim, vector_axes, column)


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything static about one penalty: hashable, so it is a static argument."""

    layout: Layout
    rule: Rule
    precision: Any
    off_diagonal: bool
    normalize: bool
    double_sided: bool
    normalize_eps: float = NORMALIZE_EPS


def check_normalize_eps(value: object) -> float:
    """``normalize_eps``: a static, finite, positive Python float (or int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "`normalize_eps` must be a Python float (static, the floor on the squared "
            f"column norm), got {value!r} of type {type(value).__name__}. Under "
            "optax.inject_hyperparams, name it in static_args: "
            'static_args=("normalize_eps",).'
        )
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`normalize_eps` must be finite and > 0, got {value!r}.")
    return float(value)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a Python bool, got {value!r}.")
    return value


def make_spec(
    phi: jax.Array,
    *,
    vector_axis: VectorAxis,
    column_axis: int,
    norm: Norm,
    subgradient: Subgradient,
    precision: Any,
    off_diagonal: bool,
    normalize: bool,
    double_sided: bool,
    normalize_eps: float = NORMALIZE_EPS,
) -> Spec:
    """Validates every static option against ``phi`` (at trace time)."""
    spec = Spec(
        layout=make_layout(phi.ndim, vector_axis, column_axis),
        rule=make_rule(norm, subgradient),
        precision=precision,
        off_diagonal=check_flag("off_diagonal", off_diagonal),
        normalize=check_flag("normalize", normalize),
        double_sided=check_flag("double_sided", double_sided),
        normalize_eps=check_normalize_eps(normalize_eps),
    )
    if jnp.issubdtype(phi.dtype, jnp.complexfloating) and spec.rule.per_group:
        # The matrix norms' derivative rules (eigh's Daleckii-Krein jvp, the max's
        # ties) are derived for real symmetric X only.
        raise TypeError(
            f"norm={norm!r} does not support complex `phi` ({jnp.dtype(phi.dtype)}): the "
            "unitary penalty on Phi^H Phi - I is defined for the entrywise norms ('l1', "
            "'squared', huber(delta))."
        )
    if spec.double_sided and spec.rule.per_group:
        # The row term of a matrix norm is not a sum over entries of the l x l residual:
        # for the spectral norm it is max(column term, [l > n]), so it adds nothing but a
        # constant; the max norm's would be one more arg-max. Neither is implemented.
        raise ValueError(
            f"`double_sided=True` is not supported with norm={norm!r}: it is defined for "
            "the entrywise norms ('l1', 'squared', huber). For the spectral norm the row "
            "term ||Phi Phi^T - I||_2 equals the column term (or 1 when l > n)."
        )
    layout = spec.layout
    if double_sided and phi.ndim + 1 + len(layout.vector_axes) > len(string.ascii_letters):
        raise ValueError(
            f"`double_sided=True` supports `phi` of rank at most "
            f"{len(string.ascii_letters) - 1 - len(layout.vector_axes)} with "
            f"{len(layout.vector_axes)} vector axes (one einsum letter per axis), "
            f"got rank {phi.ndim}."
        )
    groups = tuple(phi.shape[a] for a in layout.group_axes)
    n = phi.shape[layout.column_axis]
    dtype = accumulation_dtype(phi.dtype)
    if not isinstance(norm, str) or norm == "l1":
        # The residuals the rule's derivative is applied to, at their real shapes.
        vectors = tuple(phi.shape[a] for a in layout.vector_axes)
        shapes = [(*groups, n, n)] + ([(*groups, *vectors, *vectors)] if double_sided else [])
        for shape in shapes:
            _check_derivative(spec.rule.derivative, subgradient, shape, dtype)
    if spec.rule.per_group and not isinstance(subgradient, str):
        # A matrix norm applies the convention to eigenvalues or entries, not to X:
        # check the callable itself (a wrong shape would broadcast silently in F).
        _check_derivative(subgradient_fn(subgradient), subgradient, (*groups, n, n), dtype)
    return spec


def _check_derivative(
    fn: Callable[[jax.Array], jax.Array], subgradient: Subgradient, shape: Any, dtype: Any
) -> None:
    """The derivative maps an array ``x`` to a floating array of ``x``'s shape.

    Real for a real ``x``, complex for a complex one.
    """
    probe = jax.ShapeDtypeStruct(shape, dtype)  # type: ignore[no-untyped-call]
    try:
        out = jax.eval_shape(fn, probe)
    except Exception as e:  # the user's callable failed on the real residual's shape
        raise TypeError(
            f"`subgradient` {subgradient!r} failed on the residual X of shape {shape} "
            f"({jnp.dtype(dtype)}): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != probe.shape:
        got = getattr(out, "shape", type(out).__name__)
        raise TypeError(
            f"`subgradient` {subgradient!r} must map an array x to an array of x's shape, "
            f"got {got} for the residual X of shape {probe.shape}."
        )
    if jnp.issubdtype(dtype, jnp.complexfloating):
        # For complex x the derivative of |x| is x / |x| away from 0: complex. A real
        # result is a convention written for real residuals (sign of the real part?),
        # not a subgradient of |x|; it would be cast and used silently.
        if not jnp.issubdtype(out.dtype, jnp.complexfloating):
            raise TypeError(
                f"`subgradient` {subgradient!r} must return a complex array for the "
                f"complex residual X ({jnp.dtype(dtype)}): the derivative of |x| is x / |x| "
                f"away from 0, with |s| <= 1 at 0. Got dtype {out.dtype}."
            )
    elif not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"`subgradient` {subgradient!r} must return a real floating array, got dtype "
            f"{out.dtype} for the residual X of dtype {jnp.dtype(dtype)}."
        )


def check_phi(phi: ArrayLike) -> jax.Array:
    r"""Converts ``phi`` to an array and checks its dtype: real floating, or complex
    (``complex64``, ``complex128``: unitary groups, :math:`\Phi_i^H\Phi_i - I`)."""
    if not hasattr(phi, "dtype"):
        phi = jnp.asarray(phi, dtype=float)
    if jnp.issubdtype(phi.dtype, jax.dtypes.prng_key):
        # A typed key array (jax.random.key): its dtype is not a NumPy one.
        raise TypeError(
            f"`phi` must have a floating dtype, got a PRNG key array ({phi.dtype}): a "
            "key is not a parameter to penalise. Skip the leaf (None in dimension_numbers)."
        )
    dtype = jnp.dtype(phi.dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            "`phi` must have a floating dtype (float16, bfloat16, float32, float64, "
            f"complex64, complex128), got {dtype}."
        )
    return jnp.asarray(phi)


def check_beta(beta: ArrayLike, acc: jnp.dtype, name: str = "beta") -> jax.Array:
    """Converts a strength (``beta``, or another one named ``name``) to a real scalar array.

    Integers become ``acc``, the dtype the strength is used in (the accumulation
    dtype: float32 for bfloat16 and float16 ``phi``).

    A concrete ``beta`` (a Python or NumPy number, or a JAX array that is not being
    traced) is checked against ``acc``, by its exact value:

    * it must be finite and ``>= 0``: a negative strength rewards non-orthogonality
      without bound, and NaN or Inf would make every gradient non-finite;
    * it must not overflow ``acc`` (``1e39`` for float32, also under
      ``jax_enable_x64``, where it is a float64 until it is used);
    * if it is not 0, it must be at least ``acc``'s smallest normal number
      (``1.2e-38`` for float32): XLA flushes subnormal numbers to zero (XLA:CPU
      does, and GPUs and TPUs compute without them), so a ``1e-40`` would act as 0
      and give a finite wrong value. Rejected, not computed: a strength 38 orders
      of magnitude below 1 is a units mistake, and float64 ``phi`` takes it.

    Each raises here rather than at the end of a training run. A traced ``beta``
    cannot be checked; NaN in it propagates to the value and gradient.
    """
    if isinstance(beta, (bool, np.bool_, str, bytes)):
        raise TypeError(
            f"`{name}` must be a real scalar (a float, an int or a scalar array), got {beta!r}."
        )
    if isinstance(beta, int):
        try:  # a Python int of any size: as the float it means, or a clear error
            beta = float(beta)
        except OverflowError:
            raise ValueError(f"`{name}`={beta} is too large for a float.") from None
    if isinstance(beta, float):
        # Checked as the Python float it is: jnp.asarray would round it to inf or 0.
        _check_strength(name, beta, beta, acc)
    try:
        beta_arr = jnp.asarray(beta)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(
            f"`{name}` must be a real scalar (a float, an int or a scalar array), got {beta!r} "
            f"of type {type(beta).__name__}."
        ) from e
    if beta_arr.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar, got an array of shape {beta_arr.shape}.")
    if not jnp.issubdtype(beta_arr.dtype, jnp.integer) and not jnp.issubdtype(
        beta_arr.dtype, jnp.floating
    ):
        raise TypeError(f"`{name}` must be a real scalar, got dtype {beta_arr.dtype}.")
    if not jnp.issubdtype(beta_arr.dtype, jnp.floating):
        beta_arr = beta_arr.astype(acc)
    if not isinstance(beta_arr, jax.core.Tracer):
        # A NumPy number by its own value (a float64 with x64 off is still exact here).
        exact = beta if isinstance(beta, (np.generic, np.ndarray)) else beta_arr
        _check_strength(name, beta, float(np.asarray(exact).astype(np.float64)), acc)
    return beta_arr


def _check_strength(name: str, beta: object, value: float, acc: jnp.dtype) -> None:
    """``value`` (``beta`` exactly, as a Python float) is a strength ``acc`` can hold."""
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(
            f"`{name}` must be finite and >= 0 (in {jnp.dtype(acc)}), got {beta!r}. "
            "A negative strength rewards non-orthogonality without bound."
        )
    info = np.finfo(acc)
    if value > float(info.max):
        raise ValueError(
            f"`{name}`={beta!r} overflows {jnp.dtype(acc)} (max {float(info.max):.3g}), the "
            "dtype it is used in (phi's, or float32 for bfloat16 and float16 phi): the "
            "result would be inf or NaN."
        )
    if 0 < value < float(info.smallest_normal):
        raise ValueError(
            f"`{name}`={beta!r} is below the smallest normal {jnp.dtype(acc)} "
            f"({float(info.smallest_normal):.3g}), the dtype it is used in: XLA flushes "
            "such subnormal numbers to zero, so it would act as 0. Use 0, a normal value, "
            "or float64 params (under jax_enable_x64)."
        )


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """float32 for the half types; the dtype itself otherwise (complex64 stays complex64)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype  # type: ignore[no-any-return]


def zero_groups(x: Any, layout: Layout) -> int:
    """How many groups of a concrete ``x`` are all zero (0 for a traced or abstract x)."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, (jax.Array, np.ndarray)):
        return 0
    if x.size == 0:
        return 0
    zero = np.all(np.asarray(x) == 0, axis=(*layout.vector_axes, layout.column_axis))
    return int(np.sum(zero))


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of ``dtype``'s values: float32 for complex64, the dtype itself if real."""
    return jnp.dtype(np.empty(0, jnp.dtype(dtype)).real.dtype)
