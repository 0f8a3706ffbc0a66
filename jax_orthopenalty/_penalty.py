r"""Steps 2-4 of the data path: Gram residual, entrywise rule, one matmul; the custom_vjp.

Notation, for one group :math:`\Phi_i` (an :math:`l \times n` matrix whose columns are
the vectors that should be orthonormal):

.. math::

    C_i = \Phi_i^\top \Phi_i, \qquad X_i = C_i - I_n, \qquad
    L = \beta \sum_i \sum_{jk} f(X_i)_{jk}, \qquad
    \frac{\partial L}{\partial \Phi_i} = \beta\, \Phi_i \bigl(F_i + F_i^\top\bigr),
    \quad F_i = f'(X_i).

The forward pass forms :math:`C_i` once and keeps the small :math:`n \times n` matrix
:math:`\beta (F_i + F_i^\top)`; the backward pass is one matmul with :math:`\Phi_i`.
The family options change only the small matrices:

* ``off_diagonal``: :math:`F_i` and :math:`f(X_i)` are zero on the diagonal.
* ``normalize``: the Gram of the unit-norm columns is :math:`D_i C_i D_i` with
  :math:`D_i = \operatorname{diag}(1/\nu_j)`, :math:`\nu_j = \sqrt{\max(C_{jj}, \epsilon)}`,
  and the gradient through the normalisation folds into the same small matrix:
  :math:`\Phi_i \bigl(D_i W_i D_i - \operatorname{diag}(c_j [C_{jj} > \epsilon] / \nu_j^3)\bigr)`
  with :math:`W_i = \beta (F_i + F_i^\top)` and :math:`c_j = (C_i D_i W_i)_{jj}`.
* ``double_sided``: adds :math:`\sum f(\Psi_i\Psi_i^\top - I_l)`, whose gradient
  :math:`(H_i + H_i^\top)\Psi_i` is a second, :math:`l \times l`, product.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _contract
from ._layout import (
    DEFAULT_PRECISION,
    NORMALIZE_EPS,
    Layout,
    Spec,
    VectorAxis,
    accumulation_dtype,
    check_beta,
    check_flag,
    check_normalize_eps,
    check_phi,
    make_layout,
    make_spec,
    real_dtype,
)
from ._matrix_norms import max_or_nan
from ._rules import SQUARED, Norm, Subgradient, make_rule

__all__ = [
    "orthogonality_error",
    "orthogonality_penalty",
    "orthogonality_penalty_grad",
]


# --------------------------------------------------------------------------- math


def _eye(n: int, ndim: int, dtype: Any) -> jax.Array:
    return jnp.eye(n, dtype=dtype).reshape((1,) * (ndim - 2) + (n, n))


def _adjoint(a: jax.Array) -> jax.Array:
    """The conjugate transpose of the last two axes (the transpose, for real ``a``)."""
    return jnp.conj(jnp.swapaxes(a, -1, -2))


def _gram(spec: Spec, phi: jax.Array, acc: Any) -> jax.Array:
    # The einsum over ``gram_subscripts``, in the formulation fastest for the shape.
    return _contract.gram(spec.layout, phi, precision=spec.precision, acc=acc)


def _apply(spec: Spec, phi: jax.Array, m: jax.Array) -> jax.Array:
    """Phi_i M_i for every group, in ``m``'s dtype."""
    # The einsum over ``apply_subscripts``, in the formulation fastest for the shape.
    return _contract.apply(spec.layout, phi, m, precision=spec.precision)


@dataclasses.dataclass(frozen=True)
class _Residual:
    """What the forward pass computes and the backward pass reuses."""

    total: jax.Array  # sum of f over every entry (the value / beta)
    f_prime: jax.Array  # F = f'(X), (groups..., n, n), diagonal zeroed if off_diagonal
    gram: jax.Array | None  # C, kept only for normalize
    inv_norm: jax.Array | None  # 1 / nu, (groups..., n), only for normalize
    row_f_prime: jax.Array | None  # f'(Y) for double_sided, (groups..., *vec, *vec)
    row_w: jax.Array | None  # double_sided, squared: 4 X, (groups..., n, n)
    row_rho: jax.Array | None  # ... and off_diagonal: 4 (|psi_a|^2 - 1), per row of phi
    col_scale: jax.Array | None  # normalize: the exact power of 2 phi was scaled by


def _row_block(spec: Spec, psi: jax.Array, acc: Any) -> tuple[jax.Array, jax.Array]:
    """The double-sided term: sum f(Psi Psi^T - I_l) and f'(Psi Psi^T - I_l)."""
    layout = spec.layout
    vec_shape = tuple(psi.shape[a] for a in layout.vector_axes)
    lsize = math.prod(vec_shape)
    row = jnp.einsum(  # Psi Psi^H
        layout.row_gram_subscripts,
        psi,
        jnp.conj(psi),
        precision=spec.precision,
        preferred_element_type=acc,
        out_sharding=_contract.group_out_sharding(layout, psi, 2 * len(layout.vector_axes)),
    )
    eye = jnp.eye(lsize, dtype=acc).reshape((1,) * len(layout.group_axes) + vec_shape + vec_shape)
    y = row - eye
    fy, dy = spec.rule.value(y), _derivative(spec, y, axes=tuple(range(-2 * len(vec_shape), 0)))
    if spec.off_diagonal:
        fy, dy = fy * jnp.real(1 - eye), dy * (1 - eye)
    return jnp.sum(fy), dy


def _row_block_squared(
    spec: Spec, x: jax.Array, psi: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    r"""The double-sided term for ``norm="squared"``, from the n x n residual alone.

    With :math:`Y = \Psi\Psi^\top - I_l` and :math:`X = \Psi^\top\Psi - I_n`,
    :math:`\|\Psi\Psi^\top\|^2 = \|\Psi^\top\Psi\|^2` gives
    :math:`\|Y\|^2 = \|X\|^2 + l - n`, with gradient :math:`4\Psi X` with respect to
    :math:`\Psi`. Without the diagonal, :math:`\sum_{a \ne b} Y_{ab}^2 = \|X\|^2 -
    \sum_a \rho_a^2 + l - n` for the rows' :math:`\rho_a = |\psi_a|^2 - 1`, with
    gradient :math:`4\Psi X - 4\rho \odot \Psi`. Both are exact identities; no
    :math:`l \times l` matrix is formed. For complex :math:`\Psi` the same holds with
    :math:`\Psi\Psi^H`, :math:`\Psi^H\Psi` and moduli :math:`|Y_{ab}|^2`.

    Returns:
      The term's sum, :math:`4X` and (off-diagonal only) :math:`4\rho`, shaped like
      ``psi`` with size 1 on the column axis.
    """
    layout = spec.layout
    m = math.prod(psi.shape[a] for a in layout.group_axes)
    l = math.prod(psi.shape[a] for a in layout.vector_axes)
    total = jnp.sum(_abs2(x)) + jnp.asarray(m * (l - x.shape[-1]), real_dtype(x.dtype))
    if not spec.off_diagonal:
        return total, 4 * x, None
    p = psi.astype(x.dtype)
    rho = jnp.sum(_abs2(p), axis=layout.column_axis, keepdims=True) - 1
    return total - jnp.sum(rho * rho), 4 * x, (4 * rho).astype(x.dtype)


def _abs2(x: jax.Array) -> jax.Array:
    """|x|^2, real: x * x, or Re^2 + Im^2 for complex x."""
    if jnp.iscomplexobj(x):
        re, im = jnp.real(x), jnp.imag(x)
        return re * re + im * im
    return x * x


def _derivative(spec: Spec, x: jax.Array, axes: tuple[int, ...] = (-2, -1)) -> jax.Array:
    """The rule's derivative at ``x``, NaN for a whole group where ``x`` left float range.

    Where a Gram matrix overflows, the signs (or clipped slopes) of the infinite
    entries are finite but say nothing about the gradient, which would come out
    finite and wrong. So every group with a non-finite residual entry gets a NaN
    derivative, and its gradient is NaN: exact or non-finite, never finite and wrong.
    """
    return _nan_where_nonfinite(spec.rule.derivative(x).astype(x.dtype), x, axes)


def _nan_where_nonfinite(d: jax.Array, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    finite = jnp.all(jnp.isfinite(x), axis=axes, keepdims=True)
    return jnp.where(finite, d, jnp.nan)


def _value_and_derivative(spec: Spec, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rule's value and derivative (as :func:`_derivative`) at the n x n residual.

    One call of the rule, so a matrix norm decomposes each group once.
    """
    fx, d = spec.rule(x)
    return fx, _nan_where_nonfinite(d.astype(x.dtype), x, (-2, -1))


@dataclasses.dataclass(frozen=True)
class _Gram:
    """The Gram matrix and the residual X the entrywise function is applied to."""

    phi: jax.Array  # the Phi the Gram was formed from: scaled by col_scale for normalize
    col_scale: jax.Array | None  # normalize: the exact power of 2 per column, else None
    gram: jax.Array  # C = Phi_i^T Phi_i, (groups..., n, n)
    x: jax.Array  # X = C - I, or D C D - I for normalize
    eye: jax.Array  # I_n, broadcastable against x
    inv_norm: jax.Array | None  # 1 / nu, (groups..., n), only for normalize
    unit_diagonal: jax.Array | None  # where X_jj is exactly 0 by construction


def _column_scale(layout: Layout, phi: jax.Array, acc: Any) -> jax.Array:
    """For ``normalize``: a power of two that brings a column's largest |entry| below 2^32.

    Cosines do not change when a column is scaled, and a power of two scales exactly,
    so the normalised penalty runs on ``phi * scale``, where |phi_j|^2 cannot overflow
    (float32 overflows from column norms of 2^64). Columns below 2^32 keep the scale 1;
    the scale of the others is 2^(32 - e) >= 2^-96 for a largest entry in
    [2^(e-1), 2^e): a normal number, which flush-to-zero leaves alone. NaN and Inf
    fail the test and keep the scale 1, so they still propagate. Shaped to broadcast
    against ``phi``.
    """
    big = jnp.max(jnp.abs(phi), axis=layout.vector_axes, keepdims=True, initial=0).astype(acc)
    _, e = jnp.frexp(big)
    # ones_like, not ones(shape): on an Explicit mesh the ones carry big's sharding,
    # which the select inside ldexp requires of its operands.
    return jnp.ldexp(jnp.ones_like(big, phi.dtype), jnp.where(big >= 2.0**32, 32 - e, 0))


def _residual(spec: Spec, phi: jax.Array, acc: Any) -> _Gram:
    if not spec.normalize:
        gram = _gram(spec, phi, acc)
        eye = _eye(gram.shape[-1], gram.ndim, acc)
        return _Gram(phi, None, gram, gram - eye, eye, None, None)
    if jnp.iscomplexobj(phi):  # the scale of the moduli, as a real array
        col_scale = _column_scale(spec.layout, jnp.abs(phi), real_dtype(acc)).astype(phi.dtype)
    else:
        col_scale = _column_scale(spec.layout, phi, acc)
    phi = phi * col_scale
    gram = _gram(spec, phi, acc)
    eye = _eye(gram.shape[-1], gram.ndim, acc)
    sq = jnp.real(jnp.diagonal(gram, axis1=-2, axis2=-1))  # |phi_j|^2
    inv_norm = jax.lax.rsqrt(jnp.maximum(sq, spec.normalize_eps))
    r = inv_norm.astype(acc)
    x = gram * r[..., :, None] * r[..., None, :] - eye
    # A normalised column has |psi_j|^2 = 1 identically, so X_jj = 0 with zero
    # derivative. Say so exactly instead of leaving 1 - |psi_j|^2 ~ 1e-16 to the
    # kink's convention. NaN fails `sq > eps` and stays.
    unit_diagonal = (eye == 1) & (sq > spec.normalize_eps)[..., None, :]
    x = jnp.where(unit_diagonal, 0, x)
    return _Gram(phi, col_scale, gram, x, eye, inv_norm, unit_diagonal)


def _forward(spec: Spec, phi: jax.Array) -> _Residual:
    acc = accumulation_dtype(phi.dtype)
    g = _residual(spec, phi, acc)
    x, eye, inv_norm, unit_diagonal = g.x, g.eye, g.inv_norm, g.unit_diagonal
    residual = x  # unmasked: the squared double-sided term is an identity in X
    if spec.off_diagonal:
        # X with its diagonal zeroed goes into the norm (entrywise or matrix), and F
        # comes out with its diagonal zeroed. Products, not selects: NaN and Inf on the
        # diagonal still reach the value, and make the group's derivative NaN.
        x = x * (1 - eye)
    fx, f_prime = _value_and_derivative(spec, x)
    if unit_diagonal is not None:
        f_prime = jnp.where(unit_diagonal, 0, f_prime)
    if spec.off_diagonal:
        f_prime = f_prime * (1 - eye)
    total = jnp.sum(fx)
    row_f_prime = row_w = row_rho = None
    if spec.double_sided:
        psi = phi if inv_norm is None else _normalized(spec, g.phi, inv_norm)
        if spec.rule == SQUARED:
            row_total, row_w, row_rho = _row_block_squared(spec, residual, psi)
        else:
            row_total, row_f_prime = _row_block(spec, psi, acc)
        total = total + row_total
    return _Residual(
        total=total,
        f_prime=f_prime,
        gram=g.gram if spec.normalize else None,
        inv_norm=inv_norm,
        row_f_prime=row_f_prime,
        row_w=row_w,
        row_rho=row_rho,
        col_scale=g.col_scale,
    )


def _normalized(spec: Spec, phi: jax.Array, inv_norm: jax.Array) -> jax.Array:
    """Psi = Phi D in the accumulation dtype: ``inv_norm`` broadcast onto the column axis."""
    acc = accumulation_dtype(phi.dtype)
    return phi.astype(acc) * _contract.on_columns(spec.layout, inv_norm).astype(acc)


def _backward(spec: Spec, phi: jax.Array, res: _Residual, scale: jax.Array) -> jax.Array:
    """d(scale * total)/d phi, in the accumulation dtype, in jax.grad's convention.

    For complex phi everything below computes the steepest-ascent direction G,
    ``d total = Re sum(conj(G) d phi)`` (for the residuals' Hermitian F, W is
    F + F^H); ``jax.grad`` of a real function of complex input returns conj(G).
    """
    scale = scale.astype(res.f_prime.dtype)  # real, or as complex for complex phi
    w = scale * (res.f_prime + _adjoint(res.f_prime))
    if res.row_w is not None:
        w = w + scale * res.row_w  # the squared double-sided term folds into W
    if not spec.normalize:
        grad = _apply(spec, phi, w) + _row_terms(spec, scale, res, phi.astype(w.dtype))
        return jnp.conj(grad)
    assert res.col_scale is not None
    # The forward pass ran on phi * s (s per column, exact): d/dphi = s d/d(phi s).
    grad = _normalized_backward(spec, phi * res.col_scale, res, w, scale)
    return jnp.conj(res.col_scale.astype(grad.dtype) * grad)


def _row_terms(spec: Spec, scale: jax.Array, res: _Residual, psi: jax.Array) -> jax.Array | int:
    """The double-sided term's part of the gradient (w.r.t. Psi) that W does not hold."""
    if res.row_f_prime is not None:
        return _left(spec, scale, res.row_f_prime, psi)
    if res.row_rho is not None:
        return -(scale * res.row_rho) * psi
    return 0


def _normalized_backward(
    spec: Spec, phi: jax.Array, res: _Residual, w: jax.Array, scale: jax.Array
) -> jax.Array:
    assert res.gram is not None and res.inv_norm is not None
    r = res.inv_norm  # real; rc: in W's dtype (complex for complex phi)
    rc = r.astype(w.dtype)
    # Through Psi = Phi D with nu = sqrt(max(C_jj, eps)); d nu / d phi is 0 where
    # C_jj <= eps, which is where the max picks eps.
    sq = jnp.real(jnp.diagonal(res.gram, axis1=-2, axis2=-1))
    live = (sq > spec.normalize_eps).astype(r.dtype)
    if res.row_f_prime is None and res.row_rho is None:
        # One matmul: Phi (D W D - diag(c_j live_j / nu_j^3)), c_j = Re (C D W)_jj
        # (real already for real phi; for complex, d nu_j = Re(phi_j^H d phi_j) / nu_j).
        c = jnp.einsum("...jk,...k,...kj->...j", res.gram, rc, w, precision=spec.precision)
        m = w * rc[..., :, None] * rc[..., None, :]
        d = (jnp.real(c) * live * r**3).astype(w.dtype)
        m = m - jnp.vectorize(jnp.diag, signature="(n)->(n,n)")(d)
        return _apply(spec, phi, m)
    phi_acc = phi.astype(w.dtype)
    psi = _normalized(spec, phi, r)
    g = _apply(spec, psi, w) + _row_terms(spec, scale, res, psi)
    dots = jnp.real(jnp.sum(jnp.conj(phi_acc) * g, axis=spec.layout.vector_axes, keepdims=True))
    cube = _contract.on_columns(spec.layout, live * r**3).astype(w.dtype)
    return g * _contract.on_columns(spec.layout, rc) - phi_acc * dots.astype(w.dtype) * cube


def _left(spec: Spec, scale: jax.Array, row_f_prime: jax.Array, psi: jax.Array) -> jax.Array:
    """(H + H^H) Psi, scaled: the double-sided term's gradient with respect to Psi."""
    k = len(spec.layout.vector_axes)
    g = len(spec.layout.group_axes)
    perm = (*range(g), *range(g + k, g + 2 * k), *range(g, g + k))
    h = scale * (row_f_prime + jnp.conj(jnp.transpose(row_f_prime, perm)))
    return jnp.einsum(
        spec.layout.left_apply_subscripts,
        h,
        psi,
        precision=spec.precision,
        preferred_element_type=h.dtype,
        out_sharding=_contract.explicit_sharding(psi),
    )


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _penalty(spec: Spec, phi: jax.Array, beta: jax.Array) -> jax.Array:
    return _penalty_fwd(spec, phi, beta)[0]


def _penalty_fwd(
    spec: Spec, phi: jax.Array, beta: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, _Residual]]:
    res = _forward(spec, phi)
    value = (beta.astype(res.total.dtype) * res.total).astype(real_dtype(phi.dtype))
    return value, (phi, beta, res)


def _penalty_bwd(
    spec: Spec, saved: tuple[jax.Array, jax.Array, _Residual], ct: jax.Array
) -> tuple[jax.Array, jax.Array]:
    phi, beta, res = saved
    # Make no assumption about what the residual beta is: after jax.checkpoint, scan
    # or cond it can come back as a typed Python scalar constant rather than an array.
    beta = jnp.asarray(beta)
    ct = jnp.asarray(ct).astype(res.total.dtype)
    grad = _backward(spec, phi, res, ct * beta.astype(ct.dtype))
    return grad.astype(phi.dtype), (ct * res.total).astype(beta.dtype)


_penalty.defvjp(_penalty_fwd, _penalty_bwd)

jax.tree_util.register_dataclass(
    _Residual,
    data_fields=[
        "total",
        "f_prime",
        "gram",
        "inv_norm",
        "row_f_prime",
        "row_w",
        "row_rho",
        "col_scale",
    ],
    meta_fields=[],
)


# --------------------------------------------------------------------------- public


def _prepare(phi: ArrayLike, beta: ArrayLike, **options: Any) -> tuple[Spec, jax.Array, jax.Array]:
    phi_arr = check_phi(phi)
    spec = make_spec(phi_arr, **options)
    beta_arr = check_beta(beta, real_dtype(accumulation_dtype(phi_arr.dtype)))
    return spec, phi_arr, beta_arr


def _varying_axes(x: jax.Array) -> frozenset[Any]:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.9: ManualAxisType(varying=...)
    axes = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
    return frozenset(axes)


def _same_varying_axes(phi: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
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
    column_axis: int = -1,
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

    where :math:`f` is the entrywise ``norm`` (:math:`|x|` by default, so the
    gradient is :math:`2\beta\,\Phi_i\,\operatorname{sign}(\Phi_i^\top\Phi_i - I)`).
    The derivative with respect to the :math:`l`-vector ``Phi[:, i, b]`` is column
    ``b`` of that matrix.

    It is defined with :func:`jax.custom_vjp`: the forward pass forms each Gram
    matrix once, and the backward pass is one matmul per group, where autodiff
    of the plain expression does the Gram and two matmuls. At the kink of
    :math:`|x|` the derivative follows ``subgradient``; the default ``"zero"`` takes
    :math:`\operatorname{sign}(0) = 0`, so the gradient at an exactly orthonormal
    :math:`\Phi` is exactly 0. (``jax.grad(jnp.abs)(0.0)`` is 1, so autodiff of the
    plain expression gives a non-zero gradient there.)

    Forward mode on the penalty itself (:func:`jax.jvp`, :func:`jax.jacfwd`) is
    not defined for a ``custom_vjp`` function and raises ``TypeError``; use
    :func:`orthogonality_penalty_grad`, plain differentiable JAX, for it.
    Derivatives of the gradient work either way: reverse over reverse
    (``jax.grad(lambda p: jnp.vdot(jax.grad(penalty)(p), v))``) and forward over
    reverse (:func:`jax.hessian`) differentiate the plain-JAX backward pass.

    Args:
      phi: the parameter tensor, rank >= 2, real floating dtype.
      beta: the strength :math:`\beta`: a Python float or int, a NumPy or JAX
        scalar, weak- or strong-typed, which may be traced (a schedule). Its
        gradient is the unscaled penalty. A concrete ``beta`` must be finite and
        ``>= 0``; a traced one is not checked (NaN in it propagates).
      vector_axis: the axis (or tuple of axes, flattened together, for example a
        conv kernel's ``(0, 1, 2)``) of the :math:`l`-vectors: contracted in the Gram.
      column_axis: the axis that indexes the :math:`n` vectors of a group. Every axis
        that is neither a vector nor the column axis is a group axis.
      norm: :math:`f`. Entrywise, summed over the entries: ``"l1"``
        (:math:`|x|`), ``"squared"`` (:math:`x^2`, the Frobenius² "soft
        orthogonality" penalty) or :func:`huber` ``(delta)``. Per group:
        ``"spectral"`` or :func:`spectral` ``(squared=False, iterations=None)``
        (:math:`\lVert X_i\rVert_2`, the largest :math:`|\lambda|`; squared: SRIP),
        ``"max"`` (:math:`\max_{jk} |X_i|_{jk}`; mutual coherence with
        ``off_diagonal=True, normalize=True``). Every one keeps the one-matmul
        backward pass :math:`\beta\,\Phi_i (F_i + F_i^\top)`.
      subgradient: the derivative of :math:`|x|` wherever the norm needs it
        (``"l1"``; ``"max"`` and ``"spectral"`` at :math:`X_i = 0`): ``"zero"``
        (sign(0) = 0, default), ``"positive"`` (sign(0) = 1, what autodiff does),
        ``"negative"`` (sign(0) = -1), :func:`deadzone` ``(tol)``, or a callable
        ``x -> s`` with values in [-1, 1]. Ignored by the smooth norms. Static.
      precision: the matmul precision (:class:`jax.lax.Precision`). ``HIGHEST`` by
        default: near orthonormality :math:`\Phi^\top\Phi - I` is a small
        difference that TF32 or one-pass bfloat16 matmuls get wrong.
      off_diagonal: leave the diagonal of :math:`\Phi_i^\top\Phi_i - I` out (BigGAN,
        Sonnet, Keras): only the angles are penalised, not the norms.
      normalize: scale the columns to unit norm first, dividing by
        :math:`\sqrt{\max(|\phi_j|^2, \epsilon)}`, so the penalty acts on cosines
        (Keras). The gradient goes through the normalisation. The diagonal of a
        normalised column's Gram is exactly 1; a zero column has cosines 0 and
        :math:`X_{jj} = -1`, with a finite gradient.
      double_sided: also add :math:`\sum f(\Phi_i\Phi_i^\top - I_l)` (DSO). It can
        only be 0 for square groups (:math:`l = n`); for :math:`l \neq n` its
        minimum is positive and it pulls towards a tight frame. Memory: with
        ``norm="squared"`` it comes from the :math:`n \times n` residual exactly
        (:math:`\lVert\Phi_i\Phi_i^\top - I_l\rVert^2 = \lVert X_i\rVert^2 + l - n`);
        the other norms form an :math:`l \times l` residual per group, :math:`m l^2`
        numbers. Entrywise norms only (``ValueError`` with ``"spectral"`` or ``"max"``).
      normalize_eps: the floor :math:`\epsilon` on the squared column norm under
        ``normalize``: column :math:`j` is divided by
        :math:`\sqrt{\max(|\phi_j|^2, \epsilon)}`. ``1e-12`` (default) is
        ``tf.math.l2_normalize`` (Keras 2), ``1e-14`` is Keras 3's floor of
        :math:`10^{-7}` on the norm. A static, finite, positive Python float.

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
        overlapping, a non-scalar ``beta``, a concrete ``beta`` that is negative,
        NaN or infinite, an unknown ``norm`` or ``subgradient`` name, a
        ``normalize_eps`` that is not finite and positive, ``double_sided`` with a
        matrix norm.
      TypeError: a non-floating or complex ``phi``, a ``beta`` that is not a real
        number, options of the wrong type, a ``subgradient`` whose output at the
        residual's shape has another shape or a non-floating dtype.

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
    spec, phi_arr, beta_arr = _prepare(
        phi,
        beta,
        vector_axis=vector_axis,
        column_axis=column_axis,
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
        normalize_eps=normalize_eps,
    )
    return _penalty(spec, *_same_varying_axes(phi_arr, beta_arr))


def orthogonality_penalty_grad(
    phi: ArrayLike,
    beta: ArrayLike = 1.0,
    *,
    vector_axis: VectorAxis = 0,
    column_axis: int = -1,
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
      norm: ``"l1"``, ``"squared"``, :func:`huber` ``(delta)``, ``"spectral"``,
        :func:`spectral` ``(...)`` or ``"max"``.
      subgradient: the kink convention (``"l1"``, and ``"max"``/``"spectral"`` at 0).
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
    spec, phi_arr, beta_arr = _prepare(
        phi,
        beta,
        vector_axis=vector_axis,
        column_axis=column_axis,
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
        normalize_eps=normalize_eps,
    )
    res = _forward(spec, phi_arr)
    scale = beta_arr.astype(res.total.dtype)
    return _backward(spec, phi_arr, res, scale).astype(phi_arr.dtype)


def orthogonality_error(
    phi: ArrayLike,
    *,
    vector_axis: VectorAxis = 0,
    column_axis: int = -1,
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
    phi_arr = check_phi(phi)
    spec = Spec(
        layout=make_layout(phi_arr.ndim, vector_axis, column_axis),
        rule=make_rule("l1", "zero"),
        precision=precision,
        off_diagonal=check_flag("off_diagonal", off_diagonal),
        normalize=check_flag("normalize", normalize),
        double_sided=False,
        normalize_eps=check_normalize_eps(normalize_eps),
    )
    acc = accumulation_dtype(phi_arr.dtype)
    g = _residual(spec, phi_arr, acc)
    x = jnp.abs(g.x)
    if off_diagonal:
        x = x * jnp.real(1 - g.eye)  # a product: NaN on the diagonal still shows
    if x.shape[-1] == 0:
        return jnp.zeros(x.shape[:-2], x.dtype)
    return max_or_nan(x, axis=(-2, -1))
