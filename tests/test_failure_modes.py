"""Failure modes, each pinned to an exact, documented behaviour (docs/failure-modes.md).

NaN and Inf propagate; overflow thresholds; n > l; zero columns under ``normalize``;
a deadzone below the dtype's resolution; complex input; where ``optax.apply_if_finite``
goes; and hygiene: no global state, bitwise determinism, no leaked jax config.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_orthopenalty as jop

import reference as ref

NORMS: list[Any] = ["l1", "squared", jop.huber(0.5)]
FAMILIES: list[dict[str, bool]] = [
    {},
    {"off_diagonal": True},
    {"normalize": True},
    {"double_sided": True},
    {"normalize": True, "off_diagonal": True, "double_sided": True},
]


@pytest.fixture(autouse=True)
def _x64_stays_off() -> Iterator[None]:
    # Catches a leak from any module that ran before this one, and from these tests.
    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64


def _value_and_grads(phi: jax.Array, **opts: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Value, autodiff gradient and closed-form gradient, under one jit (as in training)."""

    def f(p: jax.Array) -> jax.Array:
        return jop.orthogonality_penalty(p, 0.5, **opts)

    @jax.jit
    def run(p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        value, auto = jax.value_and_grad(f)(p)
        return value, auto, jop.orthogonality_penalty_grad(p, 0.5, **opts)

    return run(phi)


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: "+".join(f) or "plain")
def test_nonfinite_input_propagates(bad: float, norm: Any, family: dict[str, bool]) -> None:
    """One bad entry in group 1 of (l, m, n) = (4, 3, 3): the value is not finite,
    group 1's gradient has non-finite entries, and groups 0 and 2 are untouched."""
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(4, 3, 3)).astype(np.float32)
    poisoned = clean.copy()
    poisoned[2, 1, 0] = bad
    opts = {"norm": norm, **family}
    _, auto_clean, _ = _value_and_grads(jnp.asarray(clean), **opts)
    value, auto, closed = _value_and_grads(jnp.asarray(poisoned), **opts)
    assert not np.isfinite(float(value))
    if np.isnan(bad):
        assert np.isnan(float(value))
    for g in (auto, closed):
        g = np.asarray(g)
        assert not np.isfinite(g[:, 1, :]).all()
        np.testing.assert_array_equal(g[:, [0, 2], :], np.asarray(auto_clean)[:, [0, 2], :])
    np.testing.assert_array_equal(np.isfinite(auto), np.isfinite(closed))


@pytest.mark.parametrize(
    "subgradient", ["zero", "positive", "negative", jop.deadzone(0.1)], ids=str
)
def test_nan_propagates_through_every_convention(subgradient: Any) -> None:
    # A NaN on the diagonal, with off_diagonal=True: multiplied by 0, still NaN.
    phi = jnp.eye(3)[:, None, :].at[0, 0, 0].set(jnp.nan)
    for opts in ({}, {"off_diagonal": True}):
        value, auto, closed = _value_and_grads(phi, subgradient=subgradient, **opts)
        assert np.isnan(float(value))
        assert np.isnan(np.asarray(auto)).any() and np.isnan(np.asarray(closed)).any()


def test_inf_with_off_diagonal_reads_nan() -> None:
    """The diagonal is dropped by multiplying with 0, and inf * 0 = NaN: an Inf input
    gives a NaN (not inf) value under off_diagonal=True. Non-finite either way. (An
    Inf times an exact 0 in the Gram reads NaN too: [[inf, 0], [0, 1]] gives NaN.)"""
    phi = jnp.asarray(np.random.default_rng(0).normal(size=(3, 1, 3)), jnp.float32)
    phi = phi.at[0, 0, 0].set(jnp.inf)
    assert float(jop.orthogonality_penalty(phi)) == np.inf
    assert np.isnan(float(jop.orthogonality_penalty(phi, off_diagonal=True)))
    assert np.isnan(float(jop.orthogonality_penalty(jnp.array([[jnp.inf, 0], [0, 1.0]]))))


def test_orthogonality_error_propagates_nan() -> None:
    phi = jnp.stack([jnp.eye(2), jnp.eye(2).at[0, 1].set(jnp.nan)], axis=1)
    err = np.asarray(jop.orthogonality_error(phi))
    assert err[0] == 0.0 and np.isnan(err[1])


# --------------------------------------------------------------------------- overflow


def _one(x: float, dtype: Any) -> jax.Array:
    return jnp.full((1, 1), x, dtype)


def test_float32_l1_overflow_threshold() -> None:
    """1x1 phi = [[x]]: X = x^2 - 1. In float32 the Gram overflows at x = 2^64
    (x^2 = 2^128 > FLT_MAX): the value is inf and the gradient NaN. An infinite
    Gram entry says nothing reliable about the sign of its residual (see the next
    test), so its group's gradient is non-finite, never finite and wrong."""
    below, above = _one(2.0**63, jnp.float32), _one(2.0**64, jnp.float32)
    assert float(jop.orthogonality_penalty(below)) == 2.0**126
    assert float(jop.orthogonality_penalty_grad(below)[0, 0]) == 2.0**64
    assert float(jop.orthogonality_penalty(above)) == np.inf
    assert float(jop.orthogonality_penalty(above, norm=jop.huber(1.0))) == np.inf
    for opts in ({}, {"norm": jop.huber(1.0)}):
        assert np.isnan(float(jop.orthogonality_penalty_grad(above, **opts)[0, 0]))
        assert np.isnan(float(jax.grad(jop.orthogonality_penalty)(above, **opts)[0, 0]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("opts", [{}, {"norm": jop.huber(1.0)}, {"norm": "squared"}])
def test_overflowing_gram_gives_a_nan_gradient_per_group(opts: dict[str, Any], dtype: Any) -> None:
    """The case that opened the issue: the exact Gram of [[1e20, 1e20], [1e20, -1e20]]
    is diag(2e40, 2e40), but float32 (the accumulation dtype of bfloat16 too) computes
    an infinite off-diagonal entry whose true value is 0, and the signs made from it
    gave the finite, wrong gradient [[4e20, 4e20], [0, 0]] (exact: 2 phi). Now the
    overflowing group's gradient is NaN and its value inf; a second, ordinary group
    in the same tensor keeps its exact gradient."""
    bad = jnp.array([[1e20, 1e20], [1e20, -1e20]], dtype)
    good = 2 * jnp.eye(2, dtype=dtype)
    phi = jnp.stack([bad, good], axis=1)  # (l, m, n) = (2, 2, 2)
    for g in (
        jax.grad(jop.orthogonality_penalty)(phi, **opts),
        jop.orthogonality_penalty_grad(phi, **opts),
    ):
        assert g.dtype == dtype
        assert np.isnan(np.asarray(g[:, 0, :], np.float32)).all()
        want = (opts == {"norm": "squared"} and 4 * 3 * 2.0) or 2 * 2.0  # 2 beta f'(3) * 2
        np.testing.assert_array_equal(np.asarray(g[:, 1, :], np.float32), want * np.eye(2))
    assert float(jop.orthogonality_penalty(bad, **opts)) == np.inf


def test_float16_entries_that_overflow_float16_stay_exact_or_inf() -> None:
    """float16 input accumulates in float32, which cannot overflow from float16
    entries (at most 65504^2 * l): only the casts back to float16 can, and they
    round to inf. The gradient of [[300, 300], [300, -300]] is exact; its value
    (3.6e5) is inf in float16."""
    phi = jnp.array([[300.0, 300.0], [300.0, -300.0]], jnp.float16)
    assert float(jop.orthogonality_penalty(phi)) == np.inf
    np.testing.assert_array_equal(jax.grad(jop.orthogonality_penalty)(phi), 2 * phi)
    big = jnp.full((2, 1), 60000.0, jnp.float16)  # gradient 2 x (2 x^2 - 1) * ... overflows
    g = jop.orthogonality_penalty_grad(big, norm="squared")
    assert (np.asarray(g, np.float32) == np.inf).all()


def test_float32_squared_overflow_threshold() -> None:
    """Squared: X^2 overflows first, at x = 2^32 (X = 2^64, X^2 = 2^128). The
    gradient 4 X x = 2^98 is still finite there; at x = 2^64 X is inf and so is it."""
    opts = {"norm": "squared"}
    assert np.isfinite(float(jop.orthogonality_penalty(_one(2.0**31, jnp.float32), **opts)))
    assert float(jop.orthogonality_penalty(_one(2.0**32, jnp.float32), **opts)) == np.inf
    g = jop.orthogonality_penalty_grad(_one(2.0**32, jnp.float32), **opts)
    assert float(g[0, 0]) == 2.0**98
    g = jop.orthogonality_penalty_grad(_one(2.0**64, jnp.float32), **opts)
    assert not np.isfinite(float(g[0, 0]))


@pytest.mark.parametrize(
    ("opts", "value"),
    [
        ({}, "inf"),
        ({"norm": jop.huber(1.0)}, "inf"),
        ({"norm": "squared"}, "inf"),
        ({"off_diagonal": True}, "nan"),
        ({"double_sided": True}, "inf"),
    ],
    ids=["l1", "huber", "squared", "off_diagonal", "double_sided"],
)
def test_float32_entries_1e20(opts: dict[str, Any], value: str) -> None:
    """Normal data times 1e20 in float32: the Gram overflows (|C| ~ 1e40). The value
    is inf (NaN with off_diagonal: inf * 0 on the diagonal), and every gradient is
    NaN: the Gram's infinite entries do not say what the gradient is."""
    rng = np.random.default_rng(0)
    phi = jnp.asarray(rng.normal(size=(4, 2, 3)) * 1e20, jnp.float32)
    assert np.isfinite(np.asarray(phi)).all()
    v, auto, closed = _value_and_grads(phi, **opts)
    if value == "inf":
        assert float(v) == np.inf
    else:
        assert np.isnan(float(v))
    for g in (auto, closed):
        assert np.isnan(np.asarray(g)).all()


def test_half_precision_accumulates_in_float32() -> None:
    """float16 max is 65504. A column (200, 200) has C = 80000, beyond float16: the
    Gram is accumulated in float32, so only the final cast of the value can overflow."""
    col = np.full((2, 1), 200.0)  # C = 80000 > float16 max, exact in float32
    phi = jnp.asarray(col, jnp.float16)
    # The value 79999 is not representable in float16: rounding gives inf (>= 65520).
    assert float(jop.orthogonality_penalty(phi)) == np.inf
    # The half-scaled value 0.5 * 79999 is representable: the Gram did not overflow.
    v = jop.orthogonality_penalty(phi, 0.5)
    assert v.dtype == jnp.float16
    assert float(v) == float(np.float16(0.5 * 79999.0))
    g = jop.orthogonality_penalty_grad(phi)
    assert g.dtype == jnp.float16 and float(g[0, 0]) == 400.0
    # bfloat16 has float32's range: the same input is finite.
    vb = jop.orthogonality_penalty(jnp.asarray(col, jnp.bfloat16))
    assert vb.dtype == jnp.bfloat16 and np.isfinite(float(vb))


def test_float16_value_overflow_threshold() -> None:
    """A single float16 column [[x]]: the value x^2 - 1 overflows float16 at x = 256
    (65535 rounds to inf), not at 255 (65024); the gradient 2 x stays finite."""
    assert float(jop.orthogonality_penalty(_one(255.0, jnp.float16))) == 65024.0
    assert float(jop.orthogonality_penalty(_one(256.0, jnp.float16))) == np.inf
    assert float(jop.orthogonality_penalty_grad(_one(256.0, jnp.float16))[0, 0]) == 512.0


def test_normalize_is_scale_invariant_up_to_float32_max() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 2, 3)).astype(np.float32)
    want = float(jop.orthogonality_penalty(base, normalize=True))
    want_grad = np.asarray(jop.orthogonality_penalty_grad(base, normalize=True, norm="squared"))
    for c in (1e19, 1e20, 1e30, 1e38):
        huge = jnp.asarray(base * np.float32(c))
        assert np.isfinite(np.asarray(huge)).all()
        np.testing.assert_allclose(
            float(jop.orthogonality_penalty(huge, normalize=True)), want, rtol=1e-5
        )
        # L(c Phi) = L(Phi), so grad L(c Phi) = grad L(Phi) / c (for c = 1e38 that is
        # ~1e-39, below float32's normal range, so it is only checked to be finite).
        grad = np.asarray(jop.orthogonality_penalty_grad(huge, normalize=True, norm="squared"))
        assert np.isfinite(grad).all()
        if c <= 1e30:
            np.testing.assert_allclose(grad * c, want_grad, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(jop.orthogonality_error(huge, normalize=True)),
            np.asarray(jop.orthogonality_error(base, normalize=True)),
            rtol=1e-5,
        )


# --------------------------------------------------------------------------- n > l


def _mercedes() -> np.ndarray:
    # Three unit-norm-times-sqrt(2/3) vectors at 120 degrees: orthonormal rows.
    t = 2 * np.pi * np.arange(3) / 3
    return np.sqrt(2 / 3) * np.stack([np.cos(t), np.sin(t)])


def test_more_columns_than_vectors_minimum_values() -> None:
    """For l x n with n > l the minimum of both ||Phi^T Phi - I||_F^2 and the entrywise
    L1 norm is n - l (docs/failure-modes.md has the proof). Squared: attained by any
    Phi with orthonormal rows. L1: only where Phi^T Phi is a *diagonal* projection,
    i.e. l orthonormal columns and n - l zero ones; a tight frame is not a minimiser."""
    frame = _mercedes()  # 2 x 3, frame @ frame.T = I_2
    np.testing.assert_allclose(frame @ frame.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(ref.penalty_and_grad(frame, norm="squared")[0], 1.0)
    np.testing.assert_allclose(ref.penalty_and_grad(frame, norm="l1")[0], 3.0)  # > 1
    drop = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for norm in ("l1", "squared"):
        np.testing.assert_allclose(ref.penalty_and_grad(drop, norm=norm)[0], 1.0)
    # The library agrees, raises nothing, and both points are stationary for "squared".
    for phi, norm, want in [(frame, "squared", 1.0), (frame, "l1", 3.0), (drop, "l1", 1.0)]:
        p = jnp.asarray(phi, jnp.float32)
        np.testing.assert_allclose(float(jop.orthogonality_penalty(p, norm=norm)), want, 1e-6)
    g = jop.orthogonality_penalty_grad(jnp.asarray(frame, jnp.float32), norm="squared")
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-6)
    # off_diagonal: the angles alone can all be 0 (drop the extra columns): minimum 0.
    assert float(jop.orthogonality_penalty(jnp.asarray(drop), off_diagonal=True)) == 0.0
    # double_sided adds Phi Phi^T - I_l, which is 0 at both minimisers: still n - l.
    np.testing.assert_allclose(
        ref.penalty_and_grad(frame, norm="squared", double_sided=True)[0], 1.0
    )
    np.testing.assert_allclose(ref.penalty_and_grad(drop, norm="l1", double_sided=True)[0], 1.0)


def test_more_columns_than_vectors_cosines_welch_bound() -> None:
    """normalize + off_diagonal + squared, nonzero columns: sum_{j != k} cos^2 is at
    least n^2 / l - n (the Welch bound), 1.5 for (l, n) = (2, 3), attained by the
    equiangular frame; a zero column escapes it (its cosines read 0)."""
    opts: dict[str, Any] = {"norm": "squared", "normalize": True, "off_diagonal": True}
    frame = jnp.asarray(_mercedes(), jnp.float32)
    np.testing.assert_allclose(float(jop.orthogonality_penalty(frame, **opts)), 1.5, rtol=1e-6)
    rng = np.random.default_rng(5)
    phi = rng.normal(size=(2, 300, 3))
    values = [ref.penalty_and_grad(phi[:, i, :], **opts)[0] for i in range(300)]
    assert min(values) >= 1.5 - 1e-12
    drop = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(jop.orthogonality_penalty(drop, **opts)) == 0.0


@pytest.mark.parametrize("norm", ["l1", "squared"])
def test_more_columns_than_vectors_lower_bound(norm: str) -> None:
    """n - l = 2 bounds (l, n) = (3, 5) groups from below: random ones of every scale,
    and rotated, permuted, slightly perturbed minimisers, where the bound is tight."""
    rng = np.random.default_rng(1)
    groups = list(rng.normal(size=(100, 3, 5)) * rng.uniform(0.05, 2.0, size=(100, 1, 1)))
    drop = np.eye(3, 5)  # 3 orthonormal columns, 2 zero ones
    rows = np.linalg.qr(rng.normal(size=(5, 3)))[0].T  # orthonormal rows
    base = drop if norm == "l1" else rows
    for _ in range(100):
        q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        perm = np.eye(5)[rng.permutation(5)]
        groups.append(q @ base @ perm + 1e-3 * rng.normal(size=(3, 5)))
    per_group = np.array([ref.penalty_and_grad(g, norm=norm)[0] for g in groups])
    assert per_group.min() >= 2.0 - 1e-12
    assert per_group[100:].min() < 2.0 + 0.05  # the bound is tight, not vacuous


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
@pytest.mark.parametrize("norm", ["l1", "squared"])
def test_more_columns_than_vectors_optimisation_reaches_n_minus_l(norm: str) -> None:
    """Adam with a decaying step, from a random start, converges to n - l = 2 for
    (l, n) = (3, 5) in every group, never below; for L1 to a diagonal projection."""
    phi = 0.5 * jax.random.normal(jax.random.key(1), (3, 8, 5))
    opt = optax.adam(optax.exponential_decay(0.05, 300, 0.1))

    def loss(p: jax.Array) -> jax.Array:
        return jop.orthogonality_penalty(p, norm=norm)

    @jax.jit
    def run(p: jax.Array) -> jax.Array:
        def body(carry: Any, _: None) -> tuple[Any, None]:
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=1200)
        return p

    p = np.asarray(run(phi), np.float64)
    values = np.array([ref.penalty_and_grad(p[:, i, :], norm=norm)[0] for i in range(8)])
    assert (values >= 2.0 - 1e-9).all()
    np.testing.assert_allclose(values, 2.0, atol=2e-3)
    if norm == "l1":
        gram = np.einsum("aij,aik->ijk", p, p)
        off = gram * (1 - np.eye(5))
        np.testing.assert_allclose(off, 0.0, atol=2e-3)  # diagonal projection
        np.testing.assert_allclose(
            np.sort(np.diagonal(gram, axis1=1, axis2=2)),
            np.tile([0, 0, 1, 1, 1], (8, 1)),
            atol=2e-3,
        )


# --------------------------------------------------------------------------- zero column


ZERO_COL = np.array([[1.0, 0.0, 0.6], [0.0, 0.0, 0.8], [0.0, 0.0, 0.0]])  # column 1 is 0


@pytest.mark.parametrize(
    ("norm", "subgradient", "value"),
    [
        ("l1", "zero", 2.2),  # |X_11| = |0 - 1| = 1, plus 2 * |cos(phi_0, phi_2)| = 1.2
        ("squared", "zero", 1.72),  # 1 + 2 * 0.36
        (jop.huber(0.5), "zero", 1.45),  # (1 - 0.25) + 2 * 0.36
    ],
    ids=["l1", "squared", "huber"],
)
def test_zero_column_normalize_value_and_zero_gradient(
    norm: Any, subgradient: str, value: float
) -> None:
    """normalize divides by nu = sqrt(max(|phi_j|^2, 1e-12)) = 1e-6 for a zero column:
    psi_j = 0, so X_jj = -1 and X_jk = 0. Finite value; the column's gradient is
    exactly 0 (every term it gets is multiplied by f'(0) = 0)."""
    phi = jnp.asarray(ZERO_COL, jnp.float32)
    opts = {"norm": norm, "subgradient": subgradient, "normalize": True}
    v, auto, closed = _value_and_grads(phi, **opts)
    np.testing.assert_allclose(float(v), 0.5 * value, rtol=1e-6)
    want_v, want_g = ref.penalty_and_grad(ZERO_COL, 0.5, **opts)
    np.testing.assert_allclose(float(v), want_v, rtol=1e-6)
    for g in (auto, closed):
        assert np.isfinite(np.asarray(g)).all()
        assert (np.asarray(g)[:, 1] == 0.0).all()
        np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-6)
    off = jop.orthogonality_penalty(phi, norm=norm, normalize=True, off_diagonal=True)
    np.testing.assert_allclose(
        float(off), value - float(ref.entrywise(norm, "zero")[0](-1.0)), rtol=1e-6
    )


@pytest.mark.parametrize(("subgradient", "sign"), [("positive", 1.0), ("negative", -1.0)])
def test_zero_column_normalize_one_sided_convention_is_huge(subgradient: str, sign: float) -> None:
    """With sign(0) = +-1 the zero column receives sign * 2 beta / nu * sum_k psi_k
    = +-2e6 * (1.6, 0.8, 0): finite, but a million times the usual scale."""
    phi = jnp.asarray(ZERO_COL, jnp.float32)
    opts = {"subgradient": subgradient, "normalize": True}
    _, auto, closed = _value_and_grads(phi, **opts)
    want = sign * 0.5 * 2e6 * np.array([1.6, 0.8, 0.0])
    for g in (auto, closed):
        np.testing.assert_allclose(np.asarray(g)[:, 1], want, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(closed), ref.penalty_and_grad(ZERO_COL, 0.5, **opts)[1], rtol=1e-5, atol=1e-6
    )


def test_zero_column_normalize_one_sided_overflows_float16() -> None:
    """The same 2e6-scale gradient is beyond float16 (max 65504): it comes back as a
    signed inf from finite input. bfloat16 (float32's range) keeps it finite; the
    default "zero" convention gives exactly 0 in every dtype."""
    g16 = jop.orthogonality_penalty_grad(
        jnp.asarray(ZERO_COL, jnp.float16), normalize=True, subgradient="positive"
    )
    np.testing.assert_array_equal(np.asarray(g16[:, 1], np.float32), [np.inf, np.inf, 0.0])
    gbf = jop.orthogonality_penalty_grad(
        jnp.asarray(ZERO_COL, jnp.bfloat16), normalize=True, subgradient="positive"
    )
    assert np.isfinite(np.asarray(gbf, np.float32)).all()
    for dtype in (jnp.float16, jnp.bfloat16):
        g = jop.orthogonality_penalty_grad(jnp.asarray(ZERO_COL, dtype), normalize=True)
        assert (np.asarray(g[:, 1], np.float32) == 0).all()


# --------------------------------------------------------------------------- deadzone


def test_deadzone_below_float32_resolution_acts_like_zero() -> None:
    """deadzone(1e-30) in float32: X = C - I is either 0 or at least 2^-24 ~ 6e-8 on
    the diagonal (the spacing of floats near 1), so on ordinary data nothing falls in
    the band and the gradient is bitwise the "zero" convention's."""
    rng = np.random.default_rng(2)
    phi = jnp.asarray(rng.normal(size=(6, 16, 4)), jnp.float32)
    ortho = jnp.asarray(np.stack([ref.signed_permutation(6, 4, rng) for _ in range(4)], 1))
    for p in (phi, ortho, ortho * (1 + 2.0**-23)):
        a = jop.orthogonality_penalty_grad(p, subgradient=jop.deadzone(1e-30))
        b = jop.orthogonality_penalty_grad(p, subgradient="zero")
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_deadzone_below_resolution_catches_only_tiny_products() -> None:
    """It differs from "zero" only on an entry that is itself <= 1e-30, which float32
    can represent when it is a product of tiny numbers (here X_01 = 1e-31)."""
    phi = jnp.array([[1.0, 1e-31], [0.0, 1.0]], jnp.float32)
    zero = np.asarray(jop.orthogonality_penalty_grad(phi, subgradient="zero"))
    dead = np.asarray(jop.orthogonality_penalty_grad(phi, subgradient=jop.deadzone(1e-30)))
    np.testing.assert_allclose(zero, [[2e-31, 2.0], [2.0, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(dead, np.zeros((2, 2)))


def test_deadzone_band_in_float32_near_one() -> None:
    """Near 1 float32 steps by 2^-23: a diagonal residual 2^-22 is caught by
    deadzone(1e-6) and not by deadzone(1e-7)."""
    phi = jnp.asarray(np.diag([1.0, 1.0]) * np.sqrt(1 + 2.0**-22), jnp.float32)
    x = float(jop.orthogonality_penalty(phi)) / 2  # = |C_jj - 1| per column
    assert x > 1e-7
    assert (
        float(jnp.abs(jop.orthogonality_penalty_grad(phi, subgradient=jop.deadzone(1e-6))).max())
        == 0
    )
    assert (
        float(jnp.abs(jop.orthogonality_penalty_grad(phi, subgradient=jop.deadzone(1e-7))).max())
        > 0
    )


# --------------------------------------------------------------------------- complex


@pytest.mark.parametrize("dtype", [jnp.complex64, np.complex128])
def test_complex_input_is_unitary_or_a_clear_type_error(dtype: Any) -> None:
    # Complex phi is a unitary group where supported (tests/test_complex.py), and a
    # TypeError naming the option and the dtype where not, under jax.jit too.
    phi = np.ones((3, 2), dtype)
    for f in (jop.orthogonality_penalty, jop.orthogonality_penalty_grad):
        np.testing.assert_allclose(f(phi), f(phi.real), rtol=1e-6)
    np.testing.assert_allclose(jop.orthogonality_error(phi), jop.orthogonality_error(phi.real))
    match = r"norm='max' does not support complex `phi` \(complex64\)"
    with pytest.raises(TypeError, match=match):
        jax.jit(lambda p: jop.orthogonality_penalty(p, norm="max"))(phi)


# --------------------------------------------------------------------------- hygiene


_CONSTANT_CONTAINERS = {"_NAMED_SUBGRADIENTS"}


def _package_modules() -> list[types.ModuleType]:
    import jax_orthopenalty

    names = [
        f"jax_orthopenalty.{m.name}"
        for m in pkgutil.iter_modules(jax_orthopenalty.__path__)
        if m.name != "__main__"
    ]
    return [jax_orthopenalty, *(importlib.import_module(n) for n in names)]


def _mutable_globals() -> dict[str, Any]:
    out = {}
    for mod in _package_modules():
        for name, obj in vars(mod).items():
            if name.startswith("__") or isinstance(obj, types.ModuleType):
                continue
            if isinstance(obj, (dict, list, set, bytearray)):
                out[f"{mod.__name__}.{name}"] = obj
    return out


def test_no_mutable_module_state() -> None:
    """The only module-level containers are constant tables, and calls leave them
    as they were (a cache or a registry here would show up)."""
    found = _mutable_globals()
    assert {k.rsplit(".", 1)[1] for k in found} <= _CONSTANT_CONTAINERS, sorted(found)
    before = {k: repr(v) for k, v in found.items()}
    phi = jnp.ones((3, 2, 2))
    jop.orthogonality_penalty(phi, subgradient=jop.deadzone(0.1), normalize=True)
    jax.grad(jop.orthogonality_penalty)(phi, 1.0, norm=jop.huber(0.2), double_sided=True)
    assert {k: repr(v) for k, v in _mutable_globals().items()} == before


def test_calls_with_different_options_do_not_interfere() -> None:
    """Options in sequence and back again, eager and through one jit cache keyed on
    the static options: every call matches the float64 reference for its own options."""
    rng = np.random.default_rng(3)
    phi = rng.normal(size=(4, 3, 3)).astype(np.float32)
    cases: list[dict[str, Any]] = [
        {},
        {"norm": "squared"},
        {"subgradient": jop.deadzone(0.5)},
        {"norm": jop.huber(0.3), "normalize": True},
        {"off_diagonal": True, "double_sided": True},
        {"norm": jop.huber(0.7), "normalize": True},
        {"subgradient": jop.deadzone(5.0)},
        {},
    ]
    names = ("norm", "subgradient", "off_diagonal", "normalize", "double_sided")
    jitted = jax.jit(jax.value_and_grad(jop.orthogonality_penalty), static_argnames=names)
    for _ in range(2):
        for opts in cases:
            want_v, want_g = ref.penalty_and_grad(phi, 0.5, **opts)
            eager = jax.value_and_grad(jop.orthogonality_penalty)(phi, 0.5, **opts)
            for v, g in (eager, jitted(phi, 0.5, **opts)):
                np.testing.assert_allclose(float(v), want_v, rtol=1e-5)
                np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: "+".join(f) or "plain")
def test_bitwise_deterministic(family: dict[str, bool]) -> None:
    rng = np.random.default_rng(4)
    phi = jnp.asarray(rng.normal(size=(16, 12, 8)), jnp.float32)

    def both(p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        v, g = jax.value_and_grad(lambda q: jop.orthogonality_penalty(q, 0.3, **family))(p)
        return v, g, jop.orthogonality_penalty_grad(p, 0.3, **family)

    jitted = jax.jit(both)
    runs = [both(phi), both(phi), jitted(phi), jitted(phi), jax.jit(both)(phi)]
    for first, second in ((runs[0], runs[1]), (runs[2], runs[3]), (runs[2], runs[4])):
        for a, b in zip(first, second, strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# --------------------------------------------------------------------------- odd arguments (0.2)


@pytest.mark.parametrize(
    ("beta", "error", "match"),
    [
        ("1e-2", TypeError, r"`beta` must be a real scalar"),
        (b"1", TypeError, r"`beta` must be a real scalar"),
        (True, TypeError, r"`beta` must be a real scalar"),
        (np.bool_(False), TypeError, r"`beta` must be a real scalar"),
        (1 + 2j, TypeError, r"`beta` must be a real scalar, got dtype complex"),
        (np.complex64(1), TypeError, r"`beta` must be a real scalar, got dtype complex"),
        (jnp.ones(2), ValueError, r"`beta` must be a scalar, got an array of shape \(2,\)"),
        ([0.5], ValueError, r"`beta` must be a scalar"),
        (object(), TypeError, r"`beta` must be a real scalar"),
        (10**400, ValueError, r"`beta`=1000.* is too large for a float"),
        (10**39, ValueError, r"`beta`=1e\+39 overflows float32"),
        (np.float64(1e39), ValueError, r"`beta`=.*1e\+39\) overflows float32"),
        (1e-40, ValueError, r"`beta`=1e-40 is below the smallest normal float32"),
        (np.float32(1e-40), ValueError, r"`beta`=.* is below the smallest normal float32"),
        (-1.0, ValueError, r"`beta` must be finite and >= 0"),
        (-1, ValueError, r"`beta` must be finite and >= 0"),
        (float("nan"), ValueError, r"`beta` must be finite and >= 0"),
        (np.float32("inf"), ValueError, r"`beta` must be finite and >= 0"),
        (jnp.float32(-0.5), ValueError, r"`beta` must be finite and >= 0"),
    ],
)
def test_bad_beta_raises_naming_beta(beta: Any, error: type, match: str) -> None:
    phi = jnp.eye(3, 2)
    calls = [
        lambda: jop.orthogonality_penalty(phi, beta),
        lambda: jop.orthogonality_penalty_grad(phi, beta),
        lambda: jop.tree_orthogonality_penalty({"w": phi}, beta),
        # No leaf selected: beta is still checked.
        lambda: jop.tree_orthogonality_penalty({"b": jnp.ones(3)}, beta),
        lambda: jop.add_orthogonality_penalty(beta),
    ]
    for call in calls:
        with pytest.raises(error, match=match):
            call()


def test_beta_checked_in_the_dtype_it_is_used_in_under_x64() -> None:
    # A float64 beta that overflows (or is subnormal in) float32 is rejected for
    # float32 and bfloat16 phi (used in float32), and accepted for float64 phi.
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.bfloat16):
            phi = jnp.eye(3, 2, dtype=dtype)
            for beta in (1e39, jnp.float64(1e39)):
                with pytest.raises(ValueError, match=r"overflows float32"):
                    jop.orthogonality_penalty(phi, beta)
            with pytest.raises(ValueError, match=r"below the smallest normal float32"):
                jop.orthogonality_penalty_grad(phi, 1e-40)
        phi = 2 * jnp.eye(3, 2, dtype=jnp.float64)  # value 6 beta
        assert float(jop.orthogonality_penalty(phi, 1e39)) == 6e39
        assert float(jop.orthogonality_penalty(phi, 1e-40)) == pytest.approx(6e-40)


def test_key_leaf_with_orthodims_names_the_leaf_and_default_skips_it() -> None:
    keys = jax.random.split(jax.random.key(0), 6).reshape(2, 3)
    params = {"w": 2 * jnp.eye(3, 2), "k": keys}
    with pytest.raises(TypeError, match=r"params leaf \['k'\]: `phi` .* PRNG key array"):
        jop.tree_orthogonality_penalty(
            params, 1.0, dimension_numbers={"w": jop.OrthoDims(), "k": jop.OrthoDims()}
        )
    want = jop.orthogonality_penalty(params["w"], 1.0)
    assert float(jop.tree_orthogonality_penalty(params, 1.0)) == float(want)
    tx = jop.add_orthogonality_penalty(1.0)
    updates, _ = tx.update(params, tx.init(params), params)
    assert updates["k"] is params["k"]


def test_schedule_beta_is_checked_at_each_update_even_with_no_leaf_selected() -> None:
    tx = jop.add_orthogonality_penalty(lambda count: count.astype(jnp.float32) - 1.0)
    params = {"b": jnp.ones(3)}  # rank 1: nothing selected
    with pytest.raises(ValueError, match=r"`beta` must be finite and >= 0"):
        tx.update(params, tx.init(params), params)


def test_odd_but_valid_betas() -> None:
    phi = 2 * jnp.eye(3, 2)  # X = 3 I: value 6 beta
    for beta, want in [(2**40, 6.0 * 2**40), (0, 0.0), (np.int8(3), 18.0), (jnp.int32(1), 6.0)]:
        assert float(jop.orthogonality_penalty(phi, beta)) == want
    # Traced betas are not checked: NaN propagates, and a negative one is computed.
    assert np.isnan(float(jax.jit(jop.orthogonality_penalty)(phi, jnp.nan)))
    assert float(jax.jit(jop.orthogonality_penalty)(phi, -1.0)) == -6.0


def test_subgradient_callable_checked_at_the_real_residual_shape_and_dtype() -> None:
    phi = jnp.ones((3, 4, 2))  # residual X: (4, 2, 2)

    def only_2d(x: jax.Array) -> jax.Array:  # right on a 2-D probe, wrong on (4, 2, 2)
        return jnp.sign(x) if x.ndim == 2 else jnp.sign(x)[0]

    def fails_3d(x: jax.Array) -> jax.Array:
        if x.ndim != 2:
            raise RuntimeError("only matrices")
        return jnp.sign(x)

    cases = [
        (
            only_2d,
            r"`subgradient` .* must map an array x to an array of x's shape, got "
            r"\(2, 2\) for the residual X of shape \(4, 2, 2\)",
        ),
        (
            lambda x: jnp.sign(x).astype(jnp.complex64),
            r"must return a real floating array, got dtype complex64",
        ),
        (
            lambda x: (x > 0).astype(jnp.int32),
            r"must return a real floating array, got dtype int32",
        ),
        (lambda x: x > 0, r"must return a real floating array, got dtype bool"),
        (
            fails_3d,
            r"`subgradient` .* failed on the residual X of shape \(4, 2, 2\).*only matrices",
        ),
    ]
    for sub, match in cases:
        for f in (jop.orthogonality_penalty, jop.orthogonality_penalty_grad):
            with pytest.raises(TypeError, match=match):
                f(phi, subgradient=sub)
    # The double-sided residual (4, 3, 3) is checked too.
    with pytest.raises(TypeError, match=r"residual X of shape \(4, 3, 3\)"):
        jop.orthogonality_penalty(
            phi, subgradient=lambda x: jnp.sign(x)[..., :2, :2], double_sided=True
        )
    # A float16 result for float32 residuals is a real floating array: used, cast.
    got = jop.orthogonality_penalty_grad(
        phi, subgradient=lambda x: jnp.sign(x).astype(jnp.float16)
    )
    np.testing.assert_array_equal(got, jop.orthogonality_penalty_grad(phi))


def test_ranks_beyond_the_einsum_letters_raise() -> None:
    too_many = jax.ShapeDtypeStruct((1,) * 52, jnp.float32)
    with pytest.raises(ValueError, match=r"`phi` must have rank at most 51 .* got rank 52"):
        jax.eval_shape(jop.orthogonality_penalty, too_many)
    fifty_one = jax.ShapeDtypeStruct((1,) * 49 + (2, 2), jnp.float32)
    jax.eval_shape(jop.orthogonality_penalty, fifty_one)  # fine one-sided
    with pytest.raises(ValueError, match=r"`double_sided=True` supports `phi` of rank at most 50"):
        jax.eval_shape(lambda p: jop.orthogonality_penalty(p, double_sided=True), fifty_one)


def test_mask_of_the_wrong_structure_names_mask() -> None:
    params = {"a": jnp.eye(2), "b": jnp.eye(2)}
    for mask in ({"a": True}, {"a": True, "c": False}, [True, False]):
        with pytest.raises(ValueError, match=r"`mask` does not match the params"):
            jop.tree_orthogonality_penalty(params, 1.0, mask=mask)
        tx = jop.add_orthogonality_penalty(1.0, mask=mask)
        with pytest.raises(ValueError, match=r"`mask` does not match the params"):
            tx.init(params)
    good = jop.add_orthogonality_penalty(1.0, mask={"a": True, "b": False})
    state = good.init(params)
    with pytest.raises(ValueError, match=r"`mask` does not match the params"):
        good.update({"a": jnp.eye(2)}, state, {"a": jnp.eye(2)})


def _jaxpr_shapes(f: Any, *args: Any) -> set[tuple[int, ...]]:
    jaxpr = jax.make_jaxpr(f)(*args)
    shapes: set[tuple[int, ...]] = set()

    def walk(j: Any) -> None:
        for eqn in j.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return shapes


@pytest.mark.parametrize("off_diagonal", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_double_sided_squared_forms_no_l_by_l_matrix(off_diagonal: bool, normalize: bool) -> None:
    """The squared row term comes from the n x n residual; the L1 one needs l x l
    (the control: the walk over the jaxpr would see an l x l array)."""
    l = 24
    phi = jnp.asarray(np.random.default_rng(0).normal(size=(l, 3, 4)), jnp.float32)
    opts = dict(double_sided=True, off_diagonal=off_diagonal, normalize=normalize)

    def has_l_by_l(norm: Any) -> bool:
        f = jax.value_and_grad(lambda p: jop.orthogonality_penalty(p, norm=norm, **opts))
        return any(s[-2:] == (l, l) for s in _jaxpr_shapes(f, phi))

    assert not has_l_by_l("squared")
    assert has_l_by_l("l1")


# --------------------------------------------------------------------------- apply_if_finite


def _overflowing_params() -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Finite params whose penalty gradient is NaN, and finite incoming gradients.

    Group 0 of ``w`` is normal data times 1e20 in float32: its Gram matrix overflows
    (entries ~1e40), so the penalty's gradient there is NaN (see
    test_float32_entries_1e20); the loss gradient knows nothing of it.
    """
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 2, 3))
    w[:, 0] *= 1e20
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    grads = {"w": jnp.full((4, 2, 3), 0.5, jnp.float32), "b": jnp.ones((3,), jnp.float32)}
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, grads)))
    assert bool(jnp.all(jnp.isnan(jop.orthogonality_penalty_grad(params["w"])[:, 0])))
    return params, grads


@pytest.mark.optax_promotion  # optax.sgd: see conftest.py
def test_apply_if_finite_around_the_penalty_misses_its_nan() -> None:
    # apply_if_finite checks the updates it receives: outside the penalty those are
    # the finite loss gradients, so it applies the inner chain, whose output is NaN.
    params, grads = _overflowing_params()
    tx = optax.apply_if_finite(optax.chain(jop.add_orthogonality_penalty(0.1), optax.sgd(0.01)), 3)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert bool(jnp.all(jnp.isnan(updates["w"][:, 0])))  # the overflowed group
    assert bool(jnp.all(jnp.isfinite(updates["w"][:, 1])))  # the other group
    np.testing.assert_array_equal(updates["b"], -0.01 * grads["b"])
    assert int(state.notfinite_count) == 0 and bool(state.last_finite)
    assert int(state.total_notfinite) == 0
    new = optax.apply_updates(params, updates)
    assert bool(jnp.any(jnp.isnan(new["w"])))  # the NaN reaches the parameters


@pytest.mark.optax_promotion  # optax.sgd: see conftest.py
def test_apply_if_finite_after_the_penalty_catches_its_nan() -> None:
    # After the penalty apply_if_finite sees grads + beta * dL/dPhi, NaN included: it
    # returns zero updates (params unchanged) and counts the step. The penalty's own
    # state (its count, for a schedule or every=k) still advances.
    params, grads = _overflowing_params()
    tx = optax.chain(jop.add_orthogonality_penalty(0.1), optax.apply_if_finite(optax.sgd(0.01), 3))
    step = jax.jit(tx.update)
    state = tx.init(params)
    for k in (1, 2):
        updates, state = step(grads, state, params)
        for u in jax.tree.leaves(updates):
            np.testing.assert_array_equal(u, np.zeros_like(u))
        new = optax.apply_updates(params, updates)
        for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(x, y)
        guard = state[1]
        assert int(guard.notfinite_count) == k and not bool(guard.last_finite)
        assert int(guard.total_notfinite) == k
        assert int(state[0].count) == k
    # A finite step (the overflowed group scaled back) is applied and resets the count.
    fine = {**params, "w": params["w"].at[:, 0].multiply(1e-20)}
    updates, state = step(grads, state, fine)
    want = -0.01 * (grads["w"] + jop.orthogonality_penalty_grad(fine["w"], 0.1))
    np.testing.assert_allclose(updates["w"], want, rtol=1e-6)
    assert int(state[1].notfinite_count) == 0 and bool(state[1].last_finite)
    assert int(state[1].total_notfinite) == 2


@pytest.mark.optax_promotion  # optax.sgd: see conftest.py
def test_apply_if_finite_placement_on_the_page_catches_the_nan() -> None:
    # The page's example (docs/failure-modes.md is not among tests/test_docs.py's
    # executed pages): run it, and its `tx` rejects the penalty's NaN.
    page = (Path(__file__).resolve().parents[1] / "docs" / "failure-modes.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.M | re.S)
    assert len(blocks) == 2  # apply_if_finite, and the complex projection's chain
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "docs/failure-modes.md", "exec"), namespace)
    assert isinstance(namespace["unitary_tx"], optax.GradientTransformation)
    tx = namespace["tx"]
    params, grads = _overflowing_params()
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u, np.zeros_like(u))
    assert int(state[1].notfinite_count) == 1
