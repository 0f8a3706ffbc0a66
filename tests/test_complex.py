"""Complex parameters: unitary groups, X_i = Phi_i^H Phi_i - I.

The value is sum f(|X_jk|) (real); the gradient is jax.grad's: for a real function of
complex Phi, jax.grad returns conj(G) where G is the steepest-ascent direction,
``dL = Re sum(conj(G) dPhi)``. Checked against an independent complex128 NumPy
reference, autodiff of the plain expression, central finite differences on the real
and imaginary parts, exact values at kinks, transformations, optax, and the errors
of every path that stays real-only.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_orthopenalty as jop
from jax_orthopenalty import _contract
from jax_orthopenalty._layout import make_layout
from jax_orthopenalty._rules import complex_sign

import reference as ref

HUBER = jop.huber(0.3)
NORMS = ["l1", "squared", HUBER]
FLAGS = [
    {},
    {"off_diagonal": True},
    {"normalize": True},
    {"double_sided": True},
    {"off_diagonal": True, "normalize": True, "double_sided": True},
]
AT_ZERO = {"zero": 0.0, "positive": 1.0, "negative": -1.0}


def _cnormal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.4) -> np.ndarray:
    return scale * (rng.normal(size=shape) + 1j * rng.normal(size=shape))


# --------------------------------------------------------------------------- reference


def _rule(norm: Any, at_zero: float) -> tuple[Any, Any]:
    """(f, s) on complex x: the value f(|x|) and F with d f = Re(conj(F) dx)."""
    if norm == "squared":
        return lambda x: np.abs(x) ** 2, lambda x: 2 * x
    if isinstance(norm, jop.huber):
        d = norm.delta
        return (
            lambda x: np.where(np.abs(x) <= d, np.abs(x) ** 2 / (2 * d), np.abs(x) - d / 2),
            lambda x: x / np.maximum(np.abs(x), d),
        )
    assert norm == "l1"
    return np.abs, lambda x: np.where(x == 0, at_zero, x / np.where(x == 0, 1, np.abs(x)))


def reference(
    phi: Any,
    beta: float = 1.0,
    *,
    norm: Any = "l1",
    subgradient: str = "zero",
    off_diagonal: bool = False,
    normalize: bool = False,
    double_sided: bool = False,
) -> tuple[float, np.ndarray]:
    """(value, jax.grad) of the penalty for a complex (l, m, n) or (l, n) phi, in complex128.

    One group at a time from the definitions: X = Psi^H Psi - I, G_Psi = Psi (F + F^H)
    (+ (H + H^H) Psi for the rows), the normalisation's Jacobian on each column
    (g - psi Re(psi^H g)) / |phi_j|, and jax.grad = conj(G).
    """
    p = np.asarray(phi, np.complex128)
    two_d = p.ndim == 2
    if two_d:
        p = p[:, None, :]
    l, m, n = p.shape
    f, s = _rule(norm, AT_ZERO[subgradient])
    value, grad = 0.0, np.zeros_like(p)
    for i in range(m):
        a = p[:, i, :]
        nu = np.sqrt(np.sum(np.abs(a) ** 2, axis=0))
        psi = a / nu if normalize else a
        x = psi.conj().T @ psi - np.eye(n)
        keep = 1 - np.eye(n) if off_diagonal else np.ones((n, n))
        if normalize:
            np.fill_diagonal(x, 0)  # a unit column's |psi_j|^2 - 1 is 0 identically
            keep = keep * (1 - np.eye(n))
        value += np.sum(f(x) * keep)
        big_f = s(x) * keep
        g = psi @ (big_f + big_f.conj().T)
        if double_sided:
            y = psi @ psi.conj().T - np.eye(l)
            rows = 1 - np.eye(l) if off_diagonal else np.ones((l, l))
            value += np.sum(f(y) * rows)
            h = s(y) * rows
            g = g + (h + h.conj().T) @ psi
        if normalize:
            g = (g - psi * np.real(np.sum(psi.conj() * g, axis=0))) / nu
        grad[:, i, :] = np.conj(g)
    grad = beta * grad
    return beta * value, grad[:, 0, :] if two_d else grad


def naive(
    phi: jax.Array,
    *,
    norm: Any = "l1",
    off_diagonal: bool = False,
    normalize: bool = False,
    double_sided: bool = False,
) -> jax.Array:
    """The plain expression, for jax.grad: (l, m, n) layout."""
    q = jnp.moveaxis(phi, 1, 0)  # (m, l, n)
    if normalize:
        q = q / jnp.linalg.norm(q, axis=1, keepdims=True).astype(q.dtype)
    n, l = q.shape[-1], q.shape[-2]

    def f(x: jax.Array) -> jax.Array:
        if norm == "squared":
            return jnp.abs(x) ** 2
        if isinstance(norm, jop.huber):
            a, d = jnp.abs(x), norm.delta
            return jnp.where(a <= d, a**2 / (2 * d), a - d / 2)
        return jnp.abs(x)

    def eye(k: int) -> jax.Array:
        return jnp.eye(k, dtype=q.dtype)[None]

    x = jnp.conj(jnp.swapaxes(q, -1, -2)) @ q - eye(n)
    if off_diagonal or normalize:
        x = x * (1 - eye(n))
    total = jnp.sum(f(x))
    if double_sided:
        y = q @ jnp.conj(jnp.swapaxes(q, -1, -2)) - eye(l)
        if off_diagonal:
            y = y * (1 - eye(l))
        total = total + jnp.sum(f(y))
    return total


def _fd_grad(fn: Any, phi: np.ndarray, index: tuple[int, ...], h: float = 1e-6) -> complex:
    """Central differences along Re and Im of one entry, as jax.grad reports them:
    d/dRe - i d/dIm."""
    e = np.zeros_like(phi)
    e[index] = 1.0
    d_re = (fn(phi + h * e) - fn(phi - h * e)) / (2 * h)
    d_im = (fn(phi + 1j * h * e) - fn(phi - 1j * h * e)) / (2 * h)
    return complex(d_re - 1j * d_im)


def _unitary(rng: np.random.Generator, k: int) -> np.ndarray:
    q, r = np.linalg.qr(_cnormal(rng, (k, k), 1.0))
    return q * (np.diag(r) / np.abs(np.diag(r)))


# --------------------------------------------------------------------------- the math


def test_jax_grad_convention() -> None:
    # What "jax.grad's convention" means: conj of the steepest-ascent direction.
    z = 1.0 + 2.0j
    assert complex(jax.grad(lambda z: jnp.abs(z) ** 2)(z)) == pytest.approx(2 * np.conj(z))
    # ... and jax.grad(jnp.abs) at 0j is 0 (at a real 0 it is 1).
    assert complex(jax.grad(jnp.abs)(jnp.complex64(0))) == 0


@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f) or "plain")
def test_value_and_grad_match_reference_and_autodiff(norm: Any, flags: dict[str, bool]) -> None:
    rng = np.random.default_rng(0)
    phi_np = _cnormal(rng, (5, 3, 4))
    want_value, want_grad = reference(phi_np, 0.7, norm=norm, **flags)
    with jax.enable_x64(True):
        phi = jnp.asarray(phi_np)
        value, grad = jax.value_and_grad(jop.orthogonality_penalty)(phi, 0.7, norm=norm, **flags)
        closed = jop.orthogonality_penalty_grad(phi, 0.7, norm=norm, **flags)
        auto = jax.grad(lambda p: 0.7 * naive(p, norm=norm, **flags))(phi)
        assert value.dtype == jnp.float64 and grad.dtype == jnp.complex128
        np.testing.assert_allclose(value, want_value, rtol=1e-12)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-11, atol=1e-13)
        np.testing.assert_array_equal(closed, grad)  # the backward rule is the _grad function
        np.testing.assert_allclose(auto, want_grad, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_complex64_matches_reference(norm: Any) -> None:
    rng = np.random.default_rng(1)
    phi_np = _cnormal(rng, (6, 2, 3)).astype(np.complex64)
    want_value, want_grad = reference(phi_np, norm=norm, double_sided=True)
    value, grad = jax.value_and_grad(jop.orthogonality_penalty)(
        jnp.asarray(phi_np), norm=norm, double_sided=True
    )
    assert value.dtype == jnp.float32 and grad.dtype == jnp.complex64
    np.testing.assert_allclose(value, want_value, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_wide_groups_and_other_layouts() -> None:
    # l < n (double-sided rows smaller than columns), a conv-like layout with two
    # vector axes, and a 2-D phi: all against the reference in the (l, m, n) layout.
    rng = np.random.default_rng(2)
    wide = _cnormal(rng, (2, 3, 4))
    kernel = _cnormal(rng, (2, 3, 5, 4))  # (h, w, groups, out): vectors (0, 1)
    with jax.enable_x64(True):
        for flags in ({"double_sided": True}, {"double_sided": True, "off_diagonal": True}):
            for norm in ("squared", "l1"):
                got = jop.orthogonality_penalty_grad(jnp.asarray(wide), norm=norm, **flags)
                np.testing.assert_allclose(got, reference(wide, norm=norm, **flags)[1], rtol=1e-11)
        opts = {"vector_axis": (0, 1), "column_axis": 3, "normalize": True}
        got = jop.orthogonality_penalty_grad(jnp.asarray(kernel), **opts)
        want = reference(kernel.reshape(6, 5, 4), normalize=True)[1].reshape(kernel.shape)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-14)
        two_d = wide[:, 0, :2]
        np.testing.assert_allclose(
            jop.orthogonality_penalty(jnp.asarray(two_d)), reference(two_d)[0], rtol=1e-13
        )


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_grad_matches_finite_differences(norm: Any) -> None:
    rng = np.random.default_rng(3)
    phi = _cnormal(rng, (4, 2, 3))
    with jax.enable_x64(True):
        opts = {"norm": norm, "normalize": True, "double_sided": True}
        grad = np.asarray(jop.orthogonality_penalty_grad(jnp.asarray(phi), **opts))

        def value(p: np.ndarray) -> float:
            return float(jop.orthogonality_penalty(jnp.asarray(p), **opts))

        for index in [(0, 0, 0), (3, 1, 2), (1, 0, 1), (2, 1, 0)]:
            want = _fd_grad(value, phi, index)
            assert abs(grad[index] - want) < 1e-6 * (1 + abs(want)), index


def test_orthogonality_error() -> None:
    rng = np.random.default_rng(4)
    phi_np = _cnormal(rng, (5, 3, 4))
    q = np.moveaxis(phi_np, 1, 0)
    x = np.conj(np.swapaxes(q, -1, -2)) @ q - np.eye(4)
    with jax.enable_x64(True):
        got = jop.orthogonality_error(jnp.asarray(phi_np))
        off = jop.orthogonality_error(jnp.asarray(phi_np), off_diagonal=True)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, np.abs(x).max(axis=(1, 2)), rtol=1e-13)
        np.testing.assert_allclose(off, np.abs(x * (1 - np.eye(4))).max(axis=(1, 2)), rtol=1e-13)
    assert jop.orthogonality_error(jnp.asarray(phi_np, jnp.complex64)).dtype == jnp.float32


# --------------------------------------------------------------------------- kinks


# Unitary with exact binary arithmetic: |(1 +- i)/2|^2 = 1/2, and phases 1, i, -1, -i.
HADAMARD = np.array([[1 + 1j, 1 - 1j], [1 - 1j, 1 + 1j]]) / 2
PHASED_PERMUTATION = np.array([[0, 1j, 0], [-1, 0, 0], [0, 0, -1j]])


@pytest.mark.parametrize("u", [HADAMARD, PHASED_PERMUTATION], ids=["hadamard", "permutation"])
@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_exact_at_a_unitary_matrix(u: np.ndarray, dtype: Any) -> None:
    with jax.enable_x64(dtype == jnp.complex128):
        phi = jnp.asarray(u, dtype)
        for flags in FLAGS:
            for sub in ("zero", jop.deadzone(1e-3)):
                value, grad = jax.value_and_grad(jop.orthogonality_penalty)(
                    phi, subgradient=sub, **flags
                )
                assert float(value) == 0.0
                np.testing.assert_array_equal(grad, np.zeros(u.shape))
        assert float(jnp.max(jop.orthogonality_error(phi))) == 0.0
        # sign(0) = +1 (or -1) everywhere: F = +-J (all ones), grad = conj(Phi (2 J)) exactly.
        ones = 2 * np.ones((u.shape[1],) * 2)
        for sub, sgn in (("positive", 1), ("negative", -1)):
            grad = jop.orthogonality_penalty_grad(phi, subgradient=sub)
            np.testing.assert_array_equal(grad, sgn * np.conj(u @ ones))
        # Unlike the real case, autodiff of the plain expression is 0 here too:
        # jax.grad(jnp.abs)(0j) == 0.
        auto = jax.grad(lambda p: naive(p[:, None, :]))(phi)
        np.testing.assert_array_equal(auto, np.zeros(u.shape))


def test_a_scaled_unitary_is_a_kink_for_normalize_only() -> None:
    phi = jnp.asarray(2 * HADAMARD, jnp.complex64)  # X = 3 I
    np.testing.assert_array_equal(
        jop.orthogonality_penalty_grad(phi, normalize=True), np.zeros((2, 2))
    )
    np.testing.assert_allclose(
        jop.orthogonality_penalty_grad(phi), 2 * np.conj(2 * HADAMARD), rtol=1e-6
    )


def test_complex_sign() -> None:
    x = jnp.array([3 + 4j, 0, -2j, 3e38 + 3e38j, 1e-30 - 1e-30j, jnp.nan], jnp.complex64)
    s = complex_sign(x)
    r = np.sqrt(0.5)
    want = np.array([0.6 + 0.8j, 0, -1j, r + r * 1j, r - r * 1j, np.nan], np.complex64)
    np.testing.assert_allclose(s[:5], want[:5], rtol=1e-6)  # |x| overflows: still exact
    assert np.isnan(s[5])
    # Differentiable: d(x/|x|) is not 0 for complex x (jnp.sign's derivative is).
    with jax.enable_x64(True):
        z, dz = jnp.complex128(1 + 1j), jnp.complex128(1)
        _, ds = jax.jvp(complex_sign, (z,), (dz,))
        _, want_ds = jax.jvp(lambda z: z / jnp.abs(z).astype(z.dtype), (z,), (dz,))
        np.testing.assert_allclose(ds, want_ds, rtol=1e-14)
        np.testing.assert_array_equal(jax.jvp(complex_sign, (jnp.complex128(0),), (dz,))[1], 0)


def test_nan_and_overflow() -> None:
    phi = np.array(HADAMARD, np.complex64)
    phi[0, 0] = np.nan
    value, grad = jax.value_and_grad(jop.orthogonality_penalty)(jnp.asarray(phi))
    assert np.isnan(value) and np.isnan(grad).all()
    big = jnp.asarray(2.0**70 * HADAMARD, jnp.complex64)  # |phi|^2 overflows float32
    value, grad = jax.value_and_grad(jop.orthogonality_penalty)(big)
    assert not np.isfinite(value) and np.isnan(grad).all()
    # normalize scales the moduli first: exact again.
    np.testing.assert_array_equal(jop.orthogonality_penalty_grad(big, normalize=True), 0)


# --------------------------------------------------------------------------- contractions


@pytest.mark.parametrize(
    ("shape", "which", "how"),
    [
        ((4, 8, 3), "gram", "unrolled"),
        ((4, 8, 3), "apply", "unrolled"),
        ((40, 2, 5), "gram", "batched"),
        ((80, 1, 64), "gram", "batched"),  # the NT product of one wide group
        ((3, 1, 1024), "gram", "halves"),
        ((0, 2, 3), "gram", "einsum"),
    ],
)
def test_every_formulation_conjugates(shape: tuple[int, ...], which: str, how: str) -> None:
    layout = make_layout(3, 0, -1)
    rng = np.random.default_rng(5)
    p, dp = _cnormal(rng, shape), _cnormal(rng, shape)
    m = _cnormal(rng, (shape[1], shape[2], shape[2]))
    with jax.enable_x64(True):
        assert _contract.choose(layout, shape, jnp.complex128, "highest", which) == how
        phi, tangent = jnp.asarray(p), jnp.asarray(dp)
        if which == "gram":

            def fn(x: jax.Array) -> jax.Array:
                return _contract.gram(layout, x, precision="highest", acc=jnp.complex128)

            want = np.einsum("abc,abd->bcd", p.conj(), p)
            want_t = np.einsum("abc,abd->bcd", dp.conj(), p) + np.einsum(
                "abc,abd->bcd", p.conj(), dp
            )
        else:

            def fn(x: jax.Array) -> jax.Array:
                return _contract.apply(layout, x, jnp.asarray(m), precision="highest")

            want = np.einsum("abd,bdc->abc", p, m)
            want_t = np.einsum("abd,bdc->abc", dp, m)
        out, out_t = jax.jvp(fn, (phi,), (tangent,))
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out_t, want_t, rtol=1e-12, atol=1e-12)
        # vmap's rule (the batch as one more group axis) conjugates too.
        batched = jax.vmap(fn)(jnp.stack([phi, 2 * phi]))
        np.testing.assert_allclose(batched[1], (4 if which == "gram" else 2) * want, rtol=1e-12)


def test_complex64_accumulates_in_complex64() -> None:
    phi = jnp.ones((4, 3, 2), jnp.complex64)
    with jax.enable_x64(True):  # complex128 would be possible, and must not appear
        jaxpr = jax.make_jaxpr(jax.grad(jop.orthogonality_penalty))(phi)
    text = str(jaxpr)  # the custom_vjp's forward and backward are nested jaxprs
    assert text.count("dot_general") >= 2
    assert text.count("dot_general") == text.count("preferred_element_type=complex64")
    assert "c128" not in text


# --------------------------------------------------------------------------- transformations


def test_jit_vmap_and_beta() -> None:
    rng = np.random.default_rng(6)
    phis = jnp.asarray(_cnormal(rng, (3, 4, 2, 3)), jnp.complex64)  # a batch of 3
    fn = jax.jit(jax.value_and_grad(jop.orthogonality_penalty, argnums=(0, 1)))
    values, (grads, beta_grads) = jax.vmap(fn, in_axes=(0, None))(phis, jnp.float32(0.5))
    for k in range(3):
        v, (g, b) = fn(phis[k], 0.5)
        np.testing.assert_allclose(values[k], v, rtol=1e-6)
        np.testing.assert_allclose(grads[k], g, rtol=1e-5, atol=1e-6)
        # beta's cotangent is real: the unscaled penalty.
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(b, jop.orthogonality_penalty(phis[k]), rtol=1e-6)
    assert beta_grads.dtype == jnp.float32
    # An int beta is a real strength too.
    np.testing.assert_allclose(
        jop.orthogonality_penalty(phis[0], 2), 2 * jop.orthogonality_penalty(phis[0]), rtol=1e-6
    )


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_second_order_matches_autodiff(norm: Any) -> None:
    # Reverse over reverse through the custom_vjp, and forward over the _grad
    # function, against the same on the plain expression (away from kinks). For l1
    # this checks the derivative of x / |x|, which is not 0 for complex x.
    rng = np.random.default_rng(7)
    phi_np, v_np = _cnormal(rng, (4, 2, 3)), _cnormal(rng, (4, 2, 3))
    with jax.enable_x64(True):
        phi, v = jnp.asarray(phi_np), jnp.asarray(v_np)
        opts = {"norm": norm, "normalize": True}

        def ours(p: jax.Array) -> jax.Array:
            g = jax.grad(lambda q: jop.orthogonality_penalty(q, **opts))(p)
            return jnp.real(jnp.vdot(v, g))

        def plain(p: jax.Array) -> jax.Array:
            return jnp.real(jnp.vdot(v, jax.grad(lambda q: naive(q, **opts))(p)))

        np.testing.assert_allclose(jax.grad(ours)(phi), jax.grad(plain)(phi), rtol=1e-10)
        _, fwd = jax.jvp(lambda p: jop.orthogonality_penalty_grad(p, **opts), (phi,), (v,))
        _, want = jax.jvp(jax.grad(lambda q: naive(q, **opts)), (phi,), (v,))
        np.testing.assert_allclose(fwd, want, rtol=1e-10, atol=1e-12)


def test_transform_and_tree_penalty_on_complex_leaves() -> None:
    rng = np.random.default_rng(8)
    params = {
        "unitary": jnp.asarray(_cnormal(rng, (4, 3)), jnp.complex64),
        "stack": jnp.asarray(_cnormal(rng, (5, 2, 3)), jnp.complex64),
        "bias": jnp.ones(3, jnp.complex64),  # rank 1: skipped
        "real": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
    }
    tx = jop.add_orthogonality_penalty(0.3)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    tree = jax.grad(lambda p: jop.tree_orthogonality_penalty(p, 0.3))(params)
    for key in params:
        assert updates[key].dtype == params[key].dtype
        np.testing.assert_allclose(updates[key], tree[key], rtol=1e-6)
    for key in ("unitary", "stack"):  # selected by default, not skipped
        want = jop.orthogonality_penalty_grad(params[key], 0.3)
        np.testing.assert_allclose(updates[key], want, rtol=1e-6)
        assert float(jnp.max(jnp.abs(want))) > 0
    np.testing.assert_array_equal(updates["bias"], 0)
    total = jop.tree_orthogonality_penalty(params, 0.3)
    assert total.dtype == jnp.float32
    want_total = sum(
        reference(np.asarray(params[k]), 0.3)[0] for k in ("unitary", "stack", "real")
    )
    np.testing.assert_allclose(total, want_total, rtol=1e-5)


def test_optax_sgd_on_complex_params() -> None:
    # optax leaves the conjugation to the user: jax.grad returns conj(G), so the
    # descent step applies conj(updates) (as optax's own complex tests do).
    rng = np.random.default_rng(9)
    params = {"w": jnp.asarray(HADAMARD + _cnormal(rng, (2, 2), 0.1), jnp.complex64)}
    tx = optax.chain(jop.add_orthogonality_penalty(1.0, norm="squared"), optax.sgd(0.05))
    state = tx.init(params)

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        grads = jax.tree.map(jnp.zeros_like, params)  # the penalty alone
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, optax.tree.conj(updates)), state

    first, _ = step(params, state)
    pull = jop.orthogonality_penalty_grad(params["w"], norm="squared")
    want = params["w"] - 0.05 * jnp.conj(pull)
    np.testing.assert_allclose(first["w"], want, rtol=1e-6)
    errors = []
    for _ in range(60):
        params, state = step(params, state)
        errors.append(float(jop.orthogonality_error(params["w"])))
    assert errors[-1] < 1e-4 * errors[0] + 1e-6 and errors[-1] < 1e-5


def test_penalty_is_a_loss_term_for_complex_params() -> None:
    # Gradient descent with conj(jax.grad) lands on the unitary group.
    rng = np.random.default_rng(10)
    w = jnp.asarray(np.eye(3) + _cnormal(rng, (3, 3), 0.15), jnp.complex64)
    loss = jax.jit(jax.grad(lambda w: jop.orthogonality_penalty(w, norm="squared")))
    for _ in range(300):
        w = w - 0.05 * jnp.conj(loss(w))
    np.testing.assert_allclose(jnp.conj(w.T) @ w, np.eye(3), atol=1e-5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "norm", ["spectral", jop.spectral(squared=True), jop.spectral(iterations=2), "max"], ids=str
)
def test_matrix_norms_raise_for_complex(norm: Any) -> None:
    phi = jnp.asarray(HADAMARD, jnp.complex64)
    match = r"norm=.* does not support complex `phi` \(complex64\)"
    for fn in (jop.orthogonality_penalty, jop.orthogonality_penalty_grad):
        with pytest.raises(TypeError, match=match):
            fn(phi, norm=norm)
    tx = jop.add_orthogonality_penalty(1.0, norm=norm)
    params = {"u": phi}
    with pytest.raises(TypeError, match=r"params leaf \['u'\]: norm="):
        tx.update(params, tx.init(params), params)
    with pytest.raises(TypeError, match=r"params leaf \['u'\]: norm="):
        jop.tree_orthogonality_penalty(params, 1.0, norm=norm)


def test_real_valued_callable_subgradient_raises_for_complex() -> None:
    phi = jnp.asarray(HADAMARD, jnp.complex64)
    with pytest.raises(TypeError, match="must return a complex array for the complex residual"):
        jop.orthogonality_penalty(phi, subgradient=lambda x: jnp.sign(jnp.real(x)))
    # A convention written for complex x (x / |x|, 0 in a band) is used as given.
    band = lambda x: jnp.where(jnp.abs(x) < 0.5, 0, x / jnp.abs(x).astype(x.dtype))  # noqa: E731
    rng = np.random.default_rng(11)
    p = jnp.asarray(_cnormal(rng, (4, 3)), jnp.complex64)
    np.testing.assert_allclose(
        jop.orthogonality_penalty_grad(p, subgradient=band),
        jop.orthogonality_penalty_grad(p, subgradient=jop.deadzone(0.5)),
        rtol=1e-6,
    )


# --------------------------------------------------------------------------- manifold


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_landing_field_and_projection_of_complex_leaves(dtype: Any) -> None:
    rng = np.random.default_rng(21)
    rtol = 2e-5 if dtype == jnp.complex64 else 1e-12
    with jax.enable_x64(dtype == jnp.complex128):
        x = _cnormal(rng, (9, 4))
        u = _cnormal(rng, (9, 4), scale=1.0)
        params, updates = {"w": jnp.asarray(x, dtype)}, {"w": jnp.asarray(u, dtype)}
        tx = jop.landing(0.7)
        got = tx.update(updates, tx.init(params), params)[0]["w"]
        assert got.dtype == dtype
        np.testing.assert_allclose(got, ref.landing(x, u, 0.7), rtol=rtol, atol=rtol)
        # The projection lands on the polar factor of X + u: near (the series) and far
        # (eigh / SVD) from unitary columns.
        q = np.linalg.qr(_cnormal(rng, (9, 4)))[0]
        for start, step in ((q, 1e-3), (q, 0.1), (x, 1.0)):
            p = {"w": jnp.asarray(start, dtype)}
            d = {"w": jnp.asarray(step * u, dtype)}
            tp = jop.project_orthonormal()
            new = optax.apply_updates(p, tp.update(d, tp.init(p), p)[0])["w"]
            np.testing.assert_allclose(
                new, ref.polar(start + step * u), rtol=10 * rtol, atol=10 * rtol
            )


def test_derivatives_through_the_complex_projection() -> None:
    from jax_orthopenalty import _polar

    layout = make_layout(2, 0, -1)
    rng = np.random.default_rng(22)
    hi = jax.lax.Precision.HIGHEST
    with jax.enable_x64(True):
        a = jnp.asarray(_cnormal(rng, (8, 3)))
        d = jnp.asarray(_cnormal(rng, (8, 3)))
        loss = lambda y: jnp.real(jnp.sum(a * _polar.polar(layout, y, precision=hi)))  # noqa: E731
        svd_loss = lambda y: jnp.real(jnp.sum(a * jnp.asarray(_svd_polar(y))))  # noqa: E731
        q = jnp.asarray(np.linalg.qr(_cnormal(rng, (8, 3)))[0])
        for y in (q, q + 0.1 * d):  # exactly unitary columns, and off them
            h = 1e-6
            fd = (loss(y + h * d) - loss(y - h * d)) / (2 * h)
            # jax.grad's convention: d loss = Re sum(grad * d).
            np.testing.assert_allclose(
                jnp.real(jnp.sum(jax.grad(loss)(y) * d)), fd, rtol=1e-7, atol=1e-9
            )
            jvp = jax.jvp(lambda z: _polar.polar(layout, z, precision=hi), (y,), (d,))[1]
            fdq = (
                _polar.polar(layout, y + h * d, precision=hi)
                - _polar.polar(layout, y - h * d, precision=hi)
            ) / (2 * h)
            np.testing.assert_allclose(jvp, fdq, rtol=1e-7, atol=1e-8)
        y = q + 0.1 * d  # distinct singular values: autodiff of the SVD is a reference
        np.testing.assert_allclose(jax.grad(loss)(y), jax.grad(svd_loss)(y), atol=1e-12)
        hvp = jax.jvp(jax.grad(loss), (y,), (d,))[1]
        fd2 = (jax.grad(loss)(y + h * d) - jax.grad(loss)(y - h * d)) / (2 * h)
        np.testing.assert_allclose(hvp, fd2, rtol=1e-6, atol=1e-7)


def _svd_polar(y: jax.Array) -> jax.Array:
    u, _, vh = jnp.linalg.svd(y, full_matrices=False)
    return u @ vh


@pytest.mark.optax_promotion  # optax.sgd: see conftest.py
def test_unitary_pca_by_landing_and_by_projection() -> None:
    # The top-3 eigenspace of a Hermitian A: minimise -Re tr(X^H A X) over unitary
    # columns. jax.grad's convention, so the descent step is the conjugate of the
    # updates: at apply for landing (as for the penalty), before the projection.
    rng = np.random.default_rng(23)
    b = _cnormal(rng, (10, 10))
    a = jnp.asarray(b @ b.conj().T / 10, jnp.complex64)
    top = float(np.sort(np.linalg.eigvalsh(np.asarray(a, np.complex128)))[-3:].sum())
    loss = lambda x: -jnp.real(jnp.trace(x.conj().T @ a @ x))  # noqa: E731
    conj = optax.stateless(lambda u, _: optax.tree.conj(u))
    for tx, after in (
        (optax.chain(jop.landing(1.0), optax.sgd(0.02)), optax.tree.conj),
        (optax.chain(optax.sgd(0.05), conj, jop.project_orthonormal()), lambda u: u),
    ):

        def step(carry: Any, _: Any, tx: Any = tx, after: Any = after) -> Any:
            x, state = carry
            u, state = tx.update(jax.grad(loss)(x), state, x)
            return (optax.apply_updates(x, after(u)), state), None

        x0 = jnp.asarray(_cnormal(rng, (10, 3)), jnp.complex64)
        (x, _), _ = jax.lax.scan(step, (x0, tx.init(x0)), None, length=1500)
        assert abs(float(loss(x)) + top) < 1e-4 * top
        np.testing.assert_allclose(x.conj().T @ x, np.eye(3), atol=1e-5)


def test_bad_dtypes_and_betas() -> None:
    with pytest.raises(TypeError, match=r"floating dtype \(.*complex64, complex128\), got int32"):
        jop.orthogonality_penalty(jnp.ones((2, 2), jnp.int32))
    phi = jnp.asarray(HADAMARD, jnp.complex64)
    with pytest.raises(TypeError, match="real scalar"):
        jop.orthogonality_penalty(phi, jnp.complex64(1.0))
    with pytest.raises(ValueError, match=">= 0"):
        jop.orthogonality_penalty(phi, -1.0)


# --------------------------------------------------------------------------- laws


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    norm=st.sampled_from(NORMS),
    off_diagonal=st.booleans(),
    normalize=st.booleans(),
)
def test_unitary_and_phase_invariance(
    seed: int, norm: Any, off_diagonal: bool, normalize: bool
) -> None:
    # Phi_i -> U Phi_i leaves X_i unchanged; Phi_i -> Phi_i D (|D_jj| = 1) turns X_i
    # into D^H X_i D, the same moduli. So the value is invariant and the gradient
    # (jax.grad's conj(G)) transforms as conj(U) grad and grad conj(D).
    rng = np.random.default_rng(seed)
    l, m, n = 4, 2, 3
    phi = _cnormal(rng, (l, m, n))
    u = _unitary(rng, l)
    d = np.exp(1j * rng.uniform(0, 2 * np.pi, size=n))
    opts = {"norm": norm, "off_diagonal": off_diagonal, "normalize": normalize}
    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(jop.orthogonality_penalty)(jnp.asarray(phi), **opts)
        rotated = np.einsum("ab,bin->ain", u, phi)
        v_u, g_u = jax.value_and_grad(jop.orthogonality_penalty)(jnp.asarray(rotated), **opts)
        v_d, g_d = jax.value_and_grad(jop.orthogonality_penalty)(jnp.asarray(phi * d), **opts)
        # double_sided: Phi Phi^H is unchanged by D.
        both = {**opts, "double_sided": True}
        v_ds = jop.orthogonality_penalty(jnp.asarray(phi), **both)
        np.testing.assert_allclose(jop.orthogonality_penalty(jnp.asarray(phi * d), **both), v_ds)
        grad, g_u, g_d = np.asarray(grad), np.asarray(g_u), np.asarray(g_d)
    np.testing.assert_allclose(v_u, value, rtol=1e-10)
    np.testing.assert_allclose(v_d, value, rtol=1e-10)
    np.testing.assert_allclose(g_u, np.einsum("ab,bin->ain", u.conj(), grad), atol=1e-10)
    np.testing.assert_allclose(g_d, grad * d.conj(), atol=1e-10)
