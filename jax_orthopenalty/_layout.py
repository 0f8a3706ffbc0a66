r"""Which axes of ``phi`` are what, and the checks on ``phi`` and ``beta``.

Everything here runs at trace time on shapes and Python values, before any array
arithmetic: the :class:`Layout` of ``phi`` (its vector, column and group axes, and the
einsum subscripts of the two contractions), the :class:`Axes` a user names (several
column axes are folded into one by a reshape, at the edge, so the math below sees one),
and the checks on ``phi`` and the strengths. It imports nothing from the package: the
contractions (:mod:`._contract`), the options (:mod:`._options`) and everything above
build on it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "DEFAULT_PRECISION",
    "NORMALIZE_EPS",
    "Axes",
    "ColumnAxis",
    "Layout",
    "VectorAxis",
    "accumulation_dtype",
    "check_beta",
    "check_phi",
    "make_axes",
    "make_layout",
    "real_dtype",
    "zero_parts",
]

DEFAULT_PRECISION = jax.lax.Precision.HIGHEST
"""The default matmul precision of the Gram matrix: full float32 on GPU and TPU."""

NORMALIZE_EPS = 1e-12
r"""The default ``normalize_eps``: ``normalize=True`` divides column :math:`j` by
:math:`\sqrt{\max(|\phi_j|^2, \epsilon)}`, :math:`\epsilon = 10^{-12}` as
``tf.math.l2_normalize`` (and so Keras 2's ``OrthogonalRegularizer``) does; Keras 3's
floor of :math:`10^{-7}` on the norm is ``normalize_eps=1e-14``."""

VectorAxis = int | Sequence[int]
ColumnAxis = int | Sequence[int]


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

    def sizes(self, shape: Sequence[Any]) -> tuple[Any, Any, Any]:
        """``(m, l, n)``: the number of groups, the vectors' length, the columns per group."""
        m = math.prod(shape[a] for a in self.group_axes)
        l = math.prod(shape[a] for a in self.vector_axes)
        return m, l, shape[self.column_axis]

    def group_shape(self, shape: Sequence[Any]) -> tuple[Any, ...]:
        """The shape of the group axes, in their order in ``phi``."""
        return tuple(shape[a] for a in self.group_axes)

    def on_groups(self, x: jax.Array) -> jax.Array:
        """A ``(groups...)`` array, broadcastable against ``phi`` (size 1 on the rest)."""
        return jnp.expand_dims(x, (*self.vector_axes, self.column_axis))

    def on_columns(self, rows: jax.Array) -> jax.Array:
        """A ``(groups..., n)`` array in ``phi``'s axis order, size 1 on the vector axes."""
        order = (*self.group_axes, self.column_axis)
        perm = sorted(range(len(order)), key=order.__getitem__)
        return jnp.expand_dims(jnp.transpose(rows, perm), self.vector_axes)

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


def _axis_tuple(name: str, axis: object, ndim: int) -> tuple[int, ...]:
    """One axis or a non-empty tuple of distinct axes, normalised to non-negative ints."""
    if isinstance(axis, (tuple, list)):
        if not axis:
            raise ValueError(f"`{name}` must be an int or a non-empty tuple of ints, got ().")
        axes = tuple(_normalize_axis(name, a, ndim) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"`{name}`={tuple(axis)} names an axis twice.")
        return axes
    return (_normalize_axis(name, axis, ndim),)


@dataclasses.dataclass(frozen=True)
class Axes:
    """The axes a user names: vectors (flattened together) and columns (likewise).

    Several column axes are folded into one, last, by :meth:`fold` (a transpose and a
    reshape), and :attr:`inner` is the :class:`Layout` of the folded array; with one
    column axis both are the identity. Errors name ``vector_axis`` and ``column_axis``.
    """

    ndim: int
    vector_axes: tuple[int, ...]
    column_axes: tuple[int, ...]

    @functools.cached_property
    def _perm(self) -> tuple[int, ...]:
        rest = tuple(a for a in range(self.ndim) if a not in self.column_axes)
        return (*rest, *self.column_axes)

    @functools.cached_property
    def inner(self) -> Layout:
        """The layout of :meth:`fold`'s result."""
        if len(self.column_axes) == 1:
            return Layout(self.ndim, self.vector_axes, self.column_axes[0])
        rest = self._perm[: self.ndim - len(self.column_axes)]
        vectors = tuple(rest.index(a) for a in self.vector_axes)
        return Layout(len(rest) + 1, vectors, len(rest))

    def fold(self, x: jax.Array) -> jax.Array:
        """``x`` with its column axes merged into one, last (``x`` itself for one axis)."""
        if len(self.column_axes) == 1:
            return x
        t = jnp.transpose(x, self._perm)
        k = len(self.column_axes)
        return t.reshape((*t.shape[: self.ndim - k], math.prod(t.shape[self.ndim - k :])))

    def unfold(self, y: jax.Array, shape: Sequence[Any]) -> jax.Array:
        """The inverse of :meth:`fold`, for an array of the original ``shape``."""
        if len(self.column_axes) == 1:
            return y
        t = y.reshape(tuple(shape[a] for a in self._perm))
        return jnp.transpose(t, tuple(int(a) for a in np.argsort(self._perm)))


def make_axes(ndim: int, vector_axis: VectorAxis, column_axis: ColumnAxis) -> Axes:
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
    vector_axes = _axis_tuple("vector_axis", vector_axis, ndim)
    column_axes = _axis_tuple("column_axis", column_axis, ndim)
    if set(column_axes) & set(vector_axes):
        raise ValueError(
            f"`column_axis`={column_axis} overlaps `vector_axis`={vector_axis}: "
            "an axis is either contracted (vector) or indexes the columns, not both."
        )
    return Axes(ndim, vector_axes, column_axes)


def make_layout(ndim: int, vector_axis: VectorAxis, column_axis: int) -> Layout:
    """Validates the axes for a ``phi`` of rank ``ndim`` with one column axis."""
    return make_axes(ndim, vector_axis, column_axis).inner


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


def zero_parts(
    x: Any, vector_axes: tuple[int, ...], column_axes: tuple[int, ...]
) -> tuple[int, int]:
    """``(groups, columns)``: how many groups of a concrete ``x`` are all zero, and how many
    zero columns the other groups hold. ``(0, 0)`` for a traced or abstract ``x``, and for
    an array that spans devices of other processes (it is not copied here)."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, (jax.Array, np.ndarray)):
        return 0, 0
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return 0, 0  # spread over several processes (jax.distributed): no host copy here
    if x.size == 0:
        return 0, 0
    columns = np.all(np.asarray(x) == 0, axis=vector_axes, keepdims=True)
    groups = np.all(columns, axis=column_axes, keepdims=True)
    return int(np.sum(groups)), int(np.sum(columns & ~groups))


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of ``dtype``'s values: float32 for complex64, the dtype itself if real."""
    return jnp.dtype(np.empty(0, jnp.dtype(dtype)).real.dtype)
