r"""The penalty as users call it: the ``custom_vjp`` and the three public functions.

:func:`orthogonality_penalty` is a ``jax.custom_vjp`` whose forward pass is
:func:`._family.forward` (one Gram matrix per group, keeping the small
:math:`n \times n` derivative) and whose backward pass is :func:`._family.backward`
(one matmul per group); :func:`orthogonality_penalty_grad` runs the same two as plain
JAX, so forward mode works through it; :func:`orthogonality_error` is the residual's
largest entry per group.

Each public function validates its options once (:func:`._options.make_options`) and
its axes (:func:`._layout.make_axes`, several column axes folded into one), then calls a
core (:func:`penalty`, :func:`penalty_grad`, :func:`error`) that takes the validated
layout and options: the transforms call the cores directly, per leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._family import Residual, backward, forward, gram_residual, group_error
from ._layout import (
    DEFAULT_PRECISION,
    NORMALIZE_EPS,
    ColumnAxis,
    Layout,
    VectorAxis,
    accumulation_dtype,
    check_beta,
    check_phi,
    make_axes,
    real_dtype,
)
from ._matrix import eye_like
from ._options import Options, Spec, make_options, make_spec
from ._rules import Norm, Subgradient

__all__ = [
    "error",
    "orthogonality_error",
    "orthogonality_penalty",
    "orthogonality_penalty_grad",
    "penalty",
    "penalty_grad",
    "same_varying_axes",
]


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _penalty(spec: Spec, phi: jax.Array, beta: jax.Array) -> jax.Array:
    return _penalty_fwd(spec, phi, beta)[0]


def _penalty_fwd(
    spec: Spec, phi: jax.Array, beta: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Residual]]:
    res = forward(spec, phi)
    value = (beta.astype(res.total.dtype) * res.total).astype(real_dtype(phi.dtype))
    return value, (phi, beta, res)


def _penalty_bwd(
    spec: Spec, saved: tuple[jax.Array, jax.Array, Residual], ct: jax.Array
) -> tuple[jax.Array, jax.Array]:
    phi, beta, res = saved
    # Make no assumption about what the residual beta is: after jax.checkpoint, scan
    # or cond it can come back as a typed Python scalar constant rather than an array.
    beta = jnp.asarray(beta)
    ct = jnp.asarray(ct).astype(res.total.dtype)
    grad = backward(spec, phi, res, ct * beta.astype(ct.dtype))
    return grad.astype(phi.dtype), (ct * res.total).astype(beta.dtype)


_penalty.defvjp(_penalty_fwd, _penalty_bwd)

# --------------------------------------------------------------------------- public


def penalty(phi: jax.Array, beta: ArrayLike, layout: Layout, options: Options) -> jax.Array:
    """The penalty of a checked ``phi`` in a validated ``layout`` (one column axis)."""
    spec = make_spec(phi, layout, options)
    beta_arr = check_beta(beta, real_dtype(accumulation_dtype(phi.dtype)))
    return _penalty(spec, *same_varying_axes(phi, beta_arr))


def penalty_grad(phi: jax.Array, beta: ArrayLike, layout: Layout, options: Options) -> jax.Array:
    """The closed-form gradient of a checked ``phi`` in a validated ``layout``."""
    spec = make_spec(phi, layout, options)
    beta_arr = check_beta(beta, real_dtype(accumulation_dtype(phi.dtype)))
    res = forward(spec, phi)
    return backward(spec, phi, res, beta_arr.astype(res.total.dtype)).astype(phi.dtype)


def error(phi: jax.Array, layout: Layout, options: Options) -> jax.Array:
    """``max |X_jk|`` per group of a checked ``phi`` (the options' family flags apply)."""
    g = gram_residual(make_spec(phi, layout, options), phi, accumulation_dtype(phi.dtype))
    x = g.x * (1 - eye_like(g.x)) if options.off_diagonal else g.x  # NaN on it still shows
    return group_error(x)


def _public(
    core: Callable[[jax.Array, Layout], jax.Array],
    phi: ArrayLike,
    vector_axis: VectorAxis,
    column_axis: ColumnAxis,
    *,
    like_phi: bool = False,
) -> jax.Array:
    """``core(phi, layout)`` with ``phi``'s column axes folded into one; a result
    ``like_phi`` is unfolded back to ``phi``'s shape (group axes keep their order)."""
    phi_arr = check_phi(phi)
    axes = make_axes(phi_arr.ndim, vector_axis, column_axis)
    out = core(axes.fold(phi_arr), axes.inner)
    return axes.unfold(out, phi_arr.shape) if like_phi else out


def _varying_axes(x: jax.Array) -> frozenset[Any]:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.9: ManualAxisType(varying=...)
    axes = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
    return frozenset(axes)


def same_varying_axes(phi: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``phi`` and ``beta`` cast to vary over the same manual (``shard_map``) mesh axes.

    Inside ``shard_map`` the penalty of a sharded ``phi`` is a per-shard value, varying
    over the mesh axes that ``phi`` varies over, while a constant or replicated
    ``beta`` is invariant. A custom_vjp backward rule must return cotangents of its
    inputs' types, so both enter it varying over the union of their axes
    (``jax.lax.pcast(..., to="varying")``); autodiff then transposes the cast to a
    ``psum``, which is the total derivative of the invariant input.
    """
    phi_axes, beta_axes = _varying_axes(phi), _varying_axes(beta)
    if beta_axes - phi_axes:
        phi = jax.lax.pcast(phi, tuple(sorted(beta_axes - phi_axes)), to="varying")
    if phi_axes - beta_axes:
        beta = jax.lax.pcast(beta, tuple(sorted(phi_axes - beta_axes)), to="varying")
    return phi, beta


def orthogonality_penalty(
    phi: ArrayLike,
    beta: ArrayLike = 1.0,
    *,
    vector_axis: VectorAxis = 0,
    column_axis: ColumnAxis = -1,
    norm: Norm = "l1",
    subgradient: Subgradient = "zero",
    precision: Any = DEFAULT_PRECISION,
    off_diagonal: bool = False,
    normalize: bool = False,
    double_sided: bool = False,
    normalize_eps: float = NORMALIZE_EPS,
) -> jax.Array:
    r"""The orthogonality penalty, with a closed-form backward pass.

    For a tensor whose groups are the :math:`l \times n` matrices :math:`\Phi_i`
    (``Phi[:, i, :]`` in the default ``(l, m, n)`` layout),

    .. math::

        L(\Phi) = \beta \sum_i \sum_{jk} f\bigl(\Phi_i^\top \Phi_i - I_n\bigr)_{jk},
        \qquad
        \frac{\partial L}{\partial \Phi_i} = \beta\, \Phi_i \bigl(F_i + F_i^\top\bigr),
        \quad F_i = f'\bigl(\Phi_i^\top \Phi_i - I_n\bigr),

    :math:`f` the ``norm`` (:math:`|x|` by default: the gradient is
    :math:`2\beta\,\Phi_i\,\operatorname{sign}(\Phi_i^\top\Phi_i - I)`, and its column
    ``b`` the derivative with respect to the :math:`l`-vector ``Phi[:, i, b]``).
    A :func:`jax.custom_vjp`: the forward pass forms each Gram matrix once, the
    backward pass is one matmul per group (autodiff of the plain expression does two).
    At the kink the derivative follows ``subgradient``: under the default ``"zero"``
    the gradient at an exactly orthonormal :math:`\Phi` is exactly 0, where
    ``jax.grad(jnp.abs)(0.0) == 1`` makes plain autodiff push it off the minimum.

    Forward mode on the penalty itself (:func:`jax.jvp`, :func:`jax.jacfwd`) raises
    ``TypeError`` (``custom_vjp``); use :func:`orthogonality_penalty_grad`, plain JAX.
    Derivatives of the gradient work: reverse over reverse, and forward over reverse
    (:func:`jax.hessian`) through the plain-JAX backward pass.

    Args:
      phi: the parameter tensor, rank >= 2, floating: real, or complex for unitary
        groups (:math:`\Phi_i^H\Phi_i - I`, the entrywise norms).
      beta: the strength :math:`\beta`: a Python float or int, a NumPy or JAX
        scalar, weak- or strong-typed, which may be traced (a schedule). Its
        gradient is the unscaled penalty. A concrete ``beta`` must be finite and
        ``>= 0``; a traced one is not checked (NaN in it propagates).
      vector_axis: the axis (or tuple of axes, flattened together, for example a
        conv kernel's ``(0, 1, 2)``) of the :math:`l`-vectors: contracted in the Gram.
      column_axis: the axis that indexes the :math:`n` vectors of a group. Every axis
        that is neither a vector nor the column axis is a group axis.
      norm: :math:`f` (see :data:`Norm`): entrywise ``"l1"`` (:math:`|x|`),
        ``"squared"`` or :func:`huber` ``(delta)``; per group ``"spectral"`` /
        :func:`spectral` (SRIP with ``squared=True``) or ``"max"``. Every one keeps the
        one-matmul backward pass :math:`\beta\,\Phi_i (F_i + F_i^\top)`.
      subgradient: the derivative of :math:`|x|` wherever the norm needs it (see
        :data:`Subgradient`): ``"zero"`` (sign(0) = 0, default), ``"positive"`` (what
        autodiff does), ``"negative"``, :func:`deadzone` ``(tol)``, or a callable
        ``x -> s`` with values in [-1, 1]. Ignored by the smooth norms. Static.
      precision: the matmul precision (:class:`jax.lax.Precision`). ``HIGHEST`` by
        default: near orthonormality :math:`\Phi^\top\Phi - I` is a small
        difference that TF32 or one-pass bfloat16 matmuls get wrong.
      off_diagonal: leave the diagonal of :math:`\Phi_i^\top\Phi_i - I` out (BigGAN,
        Sonnet, Keras): only the angles are penalised, not the norms.
      normalize: scale the columns to unit norm first, dividing by
        :math:`\sqrt{\max(|\phi_j|^2, \epsilon)}`, so the penalty acts on cosines
        (Keras); the gradient goes through the normalisation.
      double_sided: also add :math:`\sum f(\Phi_i\Phi_i^\top - I_l)` (DSO), which is 0
        only for square groups. Entrywise norms only; with ``"squared"`` it is an exact
        identity in the :math:`n \times n` residual, the others form an
        :math:`l \times l` one per group (docs' *Failure modes*: its memory).
      normalize_eps: the floor :math:`\epsilon` on the squared column norm under
        ``normalize``, a static positive float: ``1e-12`` (default) as
        ``tf.math.l2_normalize`` (Keras 2), ``1e-14`` for Keras 3.

    Returns:
      The scalar penalty, in ``phi``'s dtype (accumulated in float32 for
      bfloat16 and float16).

    Non-finite input and overflow: NaN and Inf in ``phi`` reach the value and the
    gradient. A group whose Gram residual leaves float range (column norms beyond
    about :math:`2^{64}` in float32 and bfloat16) gets the value ``inf`` (or NaN) and
    a NaN gradient: exact or non-finite, never finite and wrong. Inside
    :func:`jax.shard_map` the penalty of a shard is that shard's groups' penalty, a
    per-shard value to ``psum``; ``beta``'s gradient is summed over the shards.

    Raises:
      ValueError: rank < 2 (or beyond the einsum letters), axes out of range or
        overlapping, a non-scalar ``beta``, a concrete ``beta`` that is negative or
        not finite, an unknown ``norm`` or ``subgradient``, a bad ``normalize_eps``,
        ``double_sided`` with a matrix norm.
      TypeError: a non-floating ``phi``, a complex ``phi`` with a matrix norm, a
        ``beta`` that is not a real number, options of the wrong type, a
        ``subgradient`` whose result has another shape or a non-floating dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> phi = jnp.stack([jnp.eye(3), 2 * jnp.eye(3)], axis=1)   # (l, m, n) = (3, 2, 3)
      >>> jop.orthogonality_penalty(phi, 0.5)          # 0.5 * (0 + 3 * |4 - 1|)
      Array(4.5, dtype=float32)
      >>> jax.grad(jop.orthogonality_penalty)(phi)[:, 0, :]   # orthonormal: exactly 0
      Array([[0., 0., 0.],
             [0., 0., 0.],
             [0., 0., 0.]], dtype=float32)

    References:
      Brock et al., *Neural Photo Editing with Introspective Adversarial Networks*,
      ICLR 2017. Bansal, Chen and Wang, *Can We Gain More from Orthogonality
      Regularizations in Training Deep CNNs?*, NeurIPS 2018.
    """
    options = make_options(
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
        normalize_eps=normalize_eps,
    )
    return _public(
        lambda p, layout: penalty(p, beta, layout, options), phi, vector_axis, column_axis
    )


def orthogonality_penalty_grad(
    phi: ArrayLike,
    beta: ArrayLike = 1.0,
    *,
    vector_axis: VectorAxis = 0,
    column_axis: ColumnAxis = -1,
    norm: Norm = "l1",
    subgradient: Subgradient = "zero",
    precision: Any = DEFAULT_PRECISION,
    off_diagonal: bool = False,
    normalize: bool = False,
    double_sided: bool = False,
    normalize_eps: float = NORMALIZE_EPS,
) -> jax.Array:
    r"""The closed-form gradient of :func:`orthogonality_penalty`, as plain JAX.

    .. math::

        \frac{\partial L}{\partial \Phi_i} = \beta\, \Phi_i \bigl(F_i + F_i^\top\bigr)
        = 2\beta\, \Phi_i\, \operatorname{sign}\bigl(\Phi_i^\top\Phi_i - I\bigr)
        \quad\text{(for the default L1 norm)}

    It is the same computation as the penalty's backward pass, so it equals
    ``jax.grad(orthogonality_penalty)`` for the same options, but it is an ordinary
    differentiable function: :func:`jax.jvp`, :func:`jax.jacfwd` and Hessian-vector
    products in forward-over-reverse mode work through it. For the L1 norm the
    sign is piecewise constant, so its derivative is
    :math:`\beta V_i (F_i + F_i^\top)` in the direction :math:`V`.

    Args:
      phi: the parameter tensor (see :func:`orthogonality_penalty`).
      beta: the strength, a Python float or a scalar array.
      vector_axis: the axis or axes of the vectors.
      column_axis: the axis of the columns.
      norm: the norm :math:`f` (see :data:`Norm`).
      subgradient: the kink convention (see :data:`Subgradient`).
      precision: the matmul precision, ``HIGHEST`` by default.
      off_diagonal: leave the diagonal out.
      normalize: penalise the cosines of unit-norm columns.
      double_sided: add the :math:`\Phi_i\Phi_i^\top - I` term.
      normalize_eps: the floor on the squared column norm under ``normalize``.

    Returns:
      An array of ``phi``'s shape and dtype.

    Raises:
      ValueError, TypeError: as :func:`orthogonality_penalty`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> phi = jnp.array([[2.0, 0.0], [0.0, 1.0]])     # one group: columns of norm 2, 1
      >>> jop.orthogonality_penalty_grad(phi)          # 2 * phi * sign(diag(3, 0))
      Array([[4., 0.],
             [0., 0.]], dtype=float32)
      >>> v = jnp.ones_like(phi)
      >>> jax.jvp(jop.orthogonality_penalty_grad, (phi,), (v,))[1]   # beta V (G + G^T)
      Array([[2., 0.],
             [2., 0.]], dtype=float32)
    """
    options = make_options(
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
        normalize_eps=normalize_eps,
    )
    return _public(
        lambda p, layout: penalty_grad(p, beta, layout, options),
        phi,
        vector_axis,
        column_axis,
        like_phi=True,
    )


def orthogonality_error(
    phi: ArrayLike,
    *,
    vector_axis: VectorAxis = 0,
    column_axis: ColumnAxis = -1,
    precision: Any = DEFAULT_PRECISION,
    off_diagonal: bool = False,
    normalize: bool = False,
    normalize_eps: float = NORMALIZE_EPS,
) -> jax.Array:
    r"""How far each group is from orthonormal, for logging and tests.

    .. math::

        e_i = \max_{jk} \bigl|\Phi_i^\top\Phi_i - I\bigr|_{jk}

    It is 0 exactly when the columns of :math:`\Phi_i` are orthonormal;
    :math:`e_i \le \epsilon` means every squared column norm is within
    :math:`\epsilon` of 1 and every inner product within :math:`\epsilon` of 0.
    Log it with the options you train with: ``off_diagonal=True`` leaves the
    diagonal out (the largest :math:`|\cos|` between columns with
    ``normalize=True``), which is what a BigGAN- or Keras-style penalty drives to 0.

    Args:
      phi: the parameter tensor (see :func:`orthogonality_penalty`).
      vector_axis: the axis or axes of the vectors.
      column_axis: the axis of the columns.
      precision: the matmul precision, ``HIGHEST`` by default.
      off_diagonal: leave the diagonal out (only the inner products count).
      normalize: measure the unit-norm columns (cosines), as
        :func:`orthogonality_penalty` does with ``normalize=True``.
      normalize_eps: the floor on the squared column norm under ``normalize``.

    Returns:
      An array over the group axes, in their order in ``phi`` (a scalar for a 2-D
      ``phi``), in ``phi``'s dtype, or float32 for bfloat16 and float16 input.
      An empty column axis gives 0. NaN in a group gives NaN for that group.

    Raises:
      ValueError, TypeError: for a bad layout or dtype, as
        :func:`orthogonality_penalty`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> phi = jnp.stack([jnp.eye(2), jnp.array([[1.0, 0.5], [0.0, 1.0]])], axis=1)
      >>> jop.orthogonality_error(phi)                 # per group, shape (m,)
      Array([0. , 0.5], dtype=float32)
      >>> jop.orthogonality_error(2 * jnp.eye(2), off_diagonal=True)   # angles only
      Array(0., dtype=float32)
    """
    options = make_options(
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        normalize_eps=normalize_eps,
    )
    return _public(lambda p, layout: error(p, layout, options), phi, vector_axis, column_axis)
