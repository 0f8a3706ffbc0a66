r"""The penalty's forward and backward math, family options included.

Notation, for one group :math:`\Phi_i` (an :math:`l \times n` matrix whose columns are
the vectors that should be orthonormal):

.. math::

    C_i = \Phi_i^\top \Phi_i, \qquad X_i = C_i - I_n, \qquad
    L = \beta \sum_i \sum_{jk} f(X_i)_{jk}, \qquad
    \frac{\partial L}{\partial \Phi_i} = \beta\, \Phi_i \bigl(F_i + F_i^\top\bigr),
    \quad F_i = f'(X_i).

:func:`forward` forms :math:`C_i` once (:mod:`._contract`) and keeps the small
:math:`n \times n` matrix :math:`F_i`; :func:`backward` is one matmul with
:math:`\Phi_i`. The family options change only the small matrices:

* ``off_diagonal``: :math:`F_i` and :math:`f(X_i)` are zero on the diagonal.
* ``normalize``: the Gram of the unit-norm columns is :math:`D_i C_i D_i` with
  :math:`D_i = \operatorname{diag}(1/\nu_j)`, :math:`\nu_j = \sqrt{\max(C_{jj}, \epsilon)}`,
  and the gradient through the normalisation folds into the same small matrix:
  :math:`\Phi_i \bigl(D_i W_i D_i - \operatorname{diag}(c_j [C_{jj} > \epsilon] / \nu_j^3)\bigr)`
  with :math:`W_i = \beta (F_i + F_i^\top)` and :math:`c_j = (C_i D_i W_i)_{jj}`.
* ``double_sided``: adds :math:`\sum f(\Psi_i\Psi_i^\top - I_l)`, whose gradient
  :math:`(H_i + H_i^\top)\Psi_i` is a second, :math:`l \times l`, product (for the
  squared norm an exact identity in :math:`X_i` instead: no :math:`l \times l` matrix).

:math:`\beta` (``scale`` in :func:`backward`) is a scalar, or one number per group (the
target constraint's multipliers): it scales :math:`W_i` and the row terms of group
:math:`i`. :mod:`._penalty` wraps the two in the ``custom_vjp``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from . import _contract
from ._layout import Layout, accumulation_dtype, real_dtype
from ._matrix import abs2, adjoint, eye_like, max_or_nan
from ._options import Spec

__all__ = ["Gram", "Residual", "backward", "forward", "gram_residual", "group_error"]


def _gram(spec: Spec, phi: jax.Array, acc: Any) -> jax.Array:
    # The einsum over ``gram_subscripts``, in the formulation fastest for the shape.
    return _contract.gram(spec.layout, phi, precision=spec.precision, acc=acc)


def _apply(spec: Spec, phi: jax.Array, m: jax.Array) -> jax.Array:
    """Phi_i M_i for every group, in ``m``'s dtype."""
    # The einsum over ``apply_subscripts``, in the formulation fastest for the shape.
    return _contract.apply(spec.layout, phi, m, precision=spec.precision)


@dataclasses.dataclass(frozen=True)
class Residual:
    """What the forward pass computes and the backward pass reuses."""

    total: jax.Array  # sum of f over every entry (the value / beta)
    f_prime: jax.Array  # F = f'(X), (groups..., n, n), diagonal zeroed if off_diagonal
    gram: jax.Array | None  # C, kept only for normalize
    inv_norm: jax.Array | None  # 1 / nu, (groups..., n), only for normalize
    row_f_prime: jax.Array | None  # f'(Y) for double_sided, (groups..., *vec, *vec)
    row_w: jax.Array | None  # double_sided, squared: 4 X, (groups..., n, n)
    row_rho: jax.Array | None  # ... and off_diagonal: 4 (|psi_a|^2 - 1), per row of phi
    col_scale: jax.Array | None  # normalize: the exact power of 2 phi was scaled by
    error: jax.Array | None  # max |X_jk| per group, (groups...); only where asked for


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
    m, l, _ = layout.sizes(psi.shape)
    total = jnp.sum(abs2(x)) + jnp.asarray(m * (l - x.shape[-1]), real_dtype(x.dtype))
    if not spec.off_diagonal:
        return total, 4 * x, None
    p = psi.astype(x.dtype)
    rho = jnp.sum(abs2(p), axis=layout.column_axis, keepdims=True) - 1
    return total - jnp.sum(rho * rho), 4 * x, (4 * rho).astype(x.dtype)


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
class Gram:
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


def gram_residual(spec: Spec, phi: jax.Array, acc: Any) -> Gram:
    if not spec.normalize:
        gram = _gram(spec, phi, acc)
        eye = eye_like(gram)
        return Gram(phi, None, gram, gram - eye, eye, None, None)
    if jnp.iscomplexobj(phi):  # the scale of the moduli, as a real array
        col_scale = _column_scale(spec.layout, jnp.abs(phi), real_dtype(acc)).astype(phi.dtype)
    else:
        col_scale = _column_scale(spec.layout, phi, acc)
    phi = phi * col_scale
    gram = _gram(spec, phi, acc)
    eye = eye_like(gram)
    sq = jnp.real(jnp.diagonal(gram, axis1=-2, axis2=-1))  # |phi_j|^2
    inv_norm = jax.lax.rsqrt(jnp.maximum(sq, spec.normalize_eps))
    r = inv_norm.astype(acc)
    x = gram * r[..., :, None] * r[..., None, :] - eye
    # A normalised column has |psi_j|^2 = 1 identically, so X_jj = 0 with zero
    # derivative. Say so exactly instead of leaving 1 - |psi_j|^2 ~ 1e-16 to the
    # kink's convention. NaN fails `sq > eps` and stays.
    unit_diagonal = (eye == 1) & (sq > spec.normalize_eps)[..., None, :]
    x = jnp.where(unit_diagonal, 0, x)
    return Gram(phi, col_scale, gram, x, eye, inv_norm, unit_diagonal)


def forward(spec: Spec, phi: jax.Array, *, error: bool = False) -> Residual:
    acc = accumulation_dtype(phi.dtype)
    g = gram_residual(spec, phi, acc)
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
        if spec.rule.row_form == "gram":
            row_total, row_w, row_rho = _row_block_squared(spec, residual, psi)
        else:
            row_total, row_f_prime = _row_block(spec, psi, acc)
        total = total + row_total
    return Residual(
        total=total,
        f_prime=f_prime,
        gram=g.gram if spec.normalize else None,
        inv_norm=inv_norm,
        row_f_prime=row_f_prime,
        row_w=row_w,
        row_rho=row_rho,
        col_scale=g.col_scale,
        # Only where asked (the constraint): the custom_vjp saves its residual, so an
        # unused error would be computed on every backward pass.
        error=group_error(x) if error else None,
    )


def group_error(x: jax.Array) -> jax.Array:
    """``max |x_jk|`` per group of a ``(groups..., n, n)`` residual: NaN stays NaN, and an
    empty group (n = 0) is 0."""
    if x.shape[-1] == 0:
        return jnp.zeros(x.shape[:-2], real_dtype(x.dtype))
    return max_or_nan(jnp.abs(x), axis=(-2, -1))


def _normalized(spec: Spec, phi: jax.Array, inv_norm: jax.Array) -> jax.Array:
    """Psi = Phi D in the accumulation dtype: ``inv_norm`` broadcast onto the column axis."""
    acc = accumulation_dtype(phi.dtype)
    return phi.astype(acc) * spec.layout.on_columns(inv_norm).astype(acc)


def backward(spec: Spec, phi: jax.Array, res: Residual, scale: jax.Array) -> jax.Array:
    """d(scale * total)/d phi, in the accumulation dtype, in jax.grad's convention.

    For complex phi everything below computes the steepest-ascent direction G,
    ``d total = Re sum(conj(G) d phi)`` (for the residuals' Hermitian F, W is
    F + F^H); ``jax.grad`` of a real function of complex input returns conj(G).
    """
    scale = scale.astype(res.f_prime.dtype)  # real, or as complex for complex phi
    small = _trailing(scale, 2)  # one beta per group: on W_i's rows and columns
    w = small * (res.f_prime + adjoint(res.f_prime))
    if res.row_w is not None:
        w = w + small * res.row_w  # the squared double-sided term folds into W
    if not spec.normalize:
        grad = _apply(spec, phi, w) + _row_terms(spec, scale, res, phi.astype(w.dtype))
        return jnp.conj(grad)
    assert res.col_scale is not None
    # The forward pass ran on phi * s (s per column, exact): d/dphi = s d/d(phi s).
    grad = _normalized_backward(spec, phi * res.col_scale, res, w, scale)
    return jnp.conj(res.col_scale.astype(grad.dtype) * grad)


def _trailing(scale: jax.Array, axes: int) -> jax.Array:
    """A scalar as it is; a per-group ``(groups...)`` scale with ``axes`` more of size 1."""
    return scale if scale.ndim == 0 else scale.reshape((*scale.shape, *(1,) * axes))


def _row_terms(spec: Spec, scale: jax.Array, res: Residual, psi: jax.Array) -> jax.Array | int:
    """The double-sided term's part of the gradient (w.r.t. Psi) that W does not hold."""
    if res.row_f_prime is not None:
        return _left(spec, scale, res.row_f_prime, psi)
    if res.row_rho is not None:
        per_group = scale if scale.ndim == 0 else spec.layout.on_groups(scale)
        return -(per_group * res.row_rho) * psi
    return 0


def _normalized_backward(
    spec: Spec, phi: jax.Array, res: Residual, w: jax.Array, scale: jax.Array
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
    cube = spec.layout.on_columns(live * r**3).astype(w.dtype)
    return g * spec.layout.on_columns(rc) - phi_acc * dots.astype(w.dtype) * cube


def _left(spec: Spec, scale: jax.Array, row_f_prime: jax.Array, psi: jax.Array) -> jax.Array:
    """(H + H^H) Psi, scaled: the double-sided term's gradient with respect to Psi."""
    k = len(spec.layout.vector_axes)
    g = len(spec.layout.group_axes)
    perm = (*range(g), *range(g + k, g + 2 * k), *range(g, g + k))
    h = _trailing(scale, 2 * k) * (row_f_prime + jnp.conj(jnp.transpose(row_f_prime, perm)))
    return jnp.einsum(
        spec.layout.left_apply_subscripts,
        h,
        psi,
        precision=spec.precision,
        preferred_element_type=h.dtype,
        out_sharding=_contract.explicit_sharding(psi),
    )


jax.tree_util.register_dataclass(
    Residual,
    data_fields=[
        "total",
        "f_prime",
        "gram",
        "inv_norm",
        "row_f_prime",
        "row_w",
        "row_rho",
        "col_scale",
        "error",
    ],
    meta_fields=[],
)
