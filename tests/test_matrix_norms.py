"""The matrix norms (spectral, max) and normalize_eps: values, gradients, kinks, ties, errors.

References are written out in NumPy float64 (tests/reference.py and below); the
conventions at ties and at X = 0 are checked exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads
from test_transformations import TRANSFORMATIONS

import jax_orthopenalty as jop
from jax_orthopenalty._matrix_norms import power_start
from jax_orthopenalty._rules import make_rule

import reference as ref

RNG = np.random.default_rng(11)
SPECTRAL = jop.spectral()
SRIP = jop.spectral(squared=True)
NORMS = [SPECTRAL, SRIP, "max", jop.spectral(iterations=3), jop.spectral(True, 1)]
EXACT = [SPECTRAL, SRIP, "max"]


def _x64(a):
    return jnp.asarray(a, jnp.float64)


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize(("off_diagonal", "normalize"), [(0, 0), (1, 1)])
@pytest.mark.parametrize("norm", EXACT)
def test_exact_norms_match_the_float64_reference(norm, off_diagonal, normalize):
    phi = RNG.normal(size=(5, 2, 3, 4))
    opts = dict(
        vector_axis=(0, 2), norm=norm, off_diagonal=bool(off_diagonal), normalize=bool(normalize)
    )
    value, grad = ref.penalty_and_grad(phi, 0.6, **opts)
    with jax.enable_x64(True):
        p = _x64(phi)
        got = jop.orthogonality_penalty(p, 0.6, **opts)
        g_vjp = jax.grad(jop.orthogonality_penalty)(p, 0.6, **opts)
        g_closed = jop.orthogonality_penalty_grad(p, 0.6, **opts)
    np.testing.assert_allclose(float(got), value, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g_vjp), grad, rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(np.asarray(g_vjp), np.asarray(g_closed))


@pytest.mark.parametrize(
    ("norm", "kw"),
    [
        (jop.spectral(iterations=3), {"off_diagonal": True}),
        (jop.spectral(True, 1), {"normalize": True}),
    ],
)
def test_finite_differences_away_from_ties(norm, kw):
    phi = RNG.normal(size=(4, 2, 3)) * 0.6
    with jax.enable_x64(True):
        p, b = _x64(phi), _x64(0.7)
        fn = jax.jit(lambda p, b: jop.orthogonality_penalty(p, b, norm=norm, **kw))
        check_grads(fn, (p, b), order=1, modes=["rev"])
        grad = jop.orthogonality_penalty_grad(p, b, norm=norm, **kw)
        np.testing.assert_allclose(np.asarray(jax.grad(fn)(p, b)), np.asarray(grad), rtol=1e-13)


def test_spectral_factor_two_against_autodiff_of_eigvalsh():
    # d||Phi^T Phi - I||_2 / dPhi = 2 s Phi v v^T: autodiff of an eigvalsh formula.
    phi = RNG.normal(size=(6, 4))

    def by_eigvalsh(p):
        return jnp.max(jnp.abs(jnp.linalg.eigvalsh(p.T @ p - jnp.eye(4, dtype=p.dtype))))

    with jax.enable_x64(True):
        expected = jax.grad(by_eigvalsh)(_x64(phi))
        got = jax.grad(jop.orthogonality_penalty)(_x64(phi), norm="spectral")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-10)


def test_second_order_and_hessian_are_finite_and_correct():
    phi = RNG.normal(size=(4, 3)) * 0.7
    with jax.enable_x64(True):
        p, b = _x64(phi), _x64(1.0)
        fn = jax.jit(lambda p, b: jop.orthogonality_penalty(p, b, norm=SRIP))
        check_grads(fn, (p, b), order=2, modes=["rev"])
        gn = jax.jit(jax.jacfwd(lambda p: jop.orthogonality_penalty_grad(p, b, norm=SRIP)))
        hess = jax.jit(jax.hessian(lambda p: jop.orthogonality_penalty(p, b, norm=SRIP)))
        np.testing.assert_allclose(np.asarray(gn(p)), np.asarray(hess(p)), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ kinks and ties


@pytest.mark.parametrize("normalize", [False, True])
def test_exactly_zero_at_signed_permutations(normalize):
    scale = np.array([2.0, 1.0, 3.0]) if normalize else 1.0
    q = ref.signed_permutation(5, 3, np.random.default_rng(1)) * scale
    phi = jnp.asarray(q, jnp.float32)
    for norm in NORMS:
        kw = dict(norm=norm, normalize=normalize)
        assert float(jop.orthogonality_penalty(phi, **kw)) == 0.0
        grad = jax.grad(jop.orthogonality_penalty)(phi, **kw)
        np.testing.assert_array_equal(np.asarray(grad), 0)
    # grad of grad and the Hessian stay finite at the kink (eigenvalue 0, n times)
    for norm in ("spectral", "max") if normalize else ():
        fn = jax.hessian(lambda p, b, norm=norm: jop.orthogonality_penalty(p, b, norm=norm))
        h = jax.jit(fn)(phi, phi[0, 0])
        assert bool(jnp.all(jnp.isfinite(h)))


def test_conventions_at_x_zero():
    # X = 0: every eigenvalue (every entry) ties with modulus 0; F = sign(0) * (the
    # average over the tied set): I / n for the spectral norm, 1 1^T / n^2 for max.
    phi = jnp.eye(3)
    for sub, s in (("zero", 0.0), ("positive", 1.0), ("negative", -1.0)):
        g = jop.orthogonality_penalty_grad(phi, 0.5, norm="spectral", subgradient=sub)
        np.testing.assert_allclose(np.asarray(g), 0.5 * 2 * s * np.eye(3) / 3, rtol=1e-7)
        g = jop.orthogonality_penalty_grad(phi, 0.5, norm="max", subgradient=sub)
        np.testing.assert_allclose(np.asarray(g), np.full((3, 3), 0.5 * 2 * s / 9), rtol=1e-7)
    # squared is differentiable at 0: the convention does not apply
    g = jop.orthogonality_penalty_grad(phi, norm=SRIP, subgradient="positive")
    np.testing.assert_array_equal(np.asarray(g), 0)
    # deadzone: flat wherever the norm is within tol
    near = jnp.diag(jnp.array([1.001, 1.0, 0.9995]))
    for norm in ("spectral", "max"):
        g = jop.orthogonality_penalty_grad(near, norm=norm, subgradient=jop.deadzone(0.01))
        np.testing.assert_array_equal(np.asarray(g), 0)
        assert float(jnp.abs(jop.orthogonality_penalty_grad(near, norm=norm)).max()) > 1


def test_spectral_tie_is_the_minimum_norm_subgradient():
    # X = Q diag(3, 3, 0, -0.75) Q^T: a repeated top eigenvalue. F = V V^T / 2 over the
    # top eigenspace V, so Phi (F + F^T) = Phi V V^T, whatever basis eigh returns.
    q, _ = np.linalg.qr(RNG.normal(size=(4, 4)))
    d = np.diag([2.0, 2.0, 1.0, 0.5])
    with jax.enable_x64(True):
        phi = _x64(q @ d @ q.T)  # Phi^T Phi = Q d^2 Q^T
        g = np.asarray(jop.orthogonality_penalty_grad(phi, norm="spectral"))
        g2 = np.asarray(jop.orthogonality_penalty_grad(phi, norm=SRIP))
        jac = jax.jacfwd(lambda p: jop.orthogonality_penalty_grad(p, norm=SRIP))(phi)
    assert bool(jnp.all(jnp.isfinite(jac)))  # grad of grad at the tie: finite
    top = q[:, :2]
    np.testing.assert_allclose(g, np.asarray(phi) @ top @ top.T, atol=1e-12)
    np.testing.assert_allclose(g2, 2 * 3 * np.asarray(phi) @ top @ top.T, atol=1e-11)
    # +a and -a tie: F = (v+ v+^T - v- v-^T) / 2
    phi = jnp.diag(jnp.array([np.sqrt(1.5), np.sqrt(0.5), 1.0]))  # X = diag(.5, -.5, 0)
    g = jop.orthogonality_penalty_grad(phi, norm="spectral")
    np.testing.assert_allclose(np.asarray(g), np.diag([np.sqrt(1.5), -np.sqrt(0.5), 0]), 1e-6)


def test_max_ties_split_evenly():
    # One symmetric pair ties at 0.5: F = 1/2 on each entry, so W = F + F^T = 1 there
    # (and also if the computed Gram were not bit-symmetric: F = 1 on one entry).
    phi = jnp.array([[1.0, 0.5, 0.0], [0.0, np.sqrt(0.75), 0.0], [0.0, 0.0, 1.0]])
    g = np.asarray(jop.orthogonality_penalty_grad(phi, norm="max", off_diagonal=True))
    w = np.zeros((3, 3))
    w[0, 1] = w[1, 0] = 1.0
    np.testing.assert_allclose(g, np.asarray(phi) @ w, rtol=1e-6)
    # A diagonal entry ties with an off-diagonal pair, all exactly 3 (dyadic data):
    # three entries, F = 1/3 each, W = F + F^T = 2/3 on (0, 0), (0, 1), (1, 0).
    phi = jnp.array([[2.0, 1.5], [0.0, 0.0]])
    g = np.asarray(jop.orthogonality_penalty_grad(phi, 0.75, norm="max"))
    np.testing.assert_allclose(g, 0.75 * np.asarray(phi) @ np.array([[2, 2], [2, 0]]) / 3, 1e-6)
    assert float(jop.orthogonality_penalty(phi, 0.75, norm="max")) == 0.75 * 3


def test_power_estimate_is_below_exact_deterministic_and_converges():
    phi = RNG.normal(size=(8, 3, 6)) * 0.5
    ks = (1, 2, 5, 400)

    @jax.jit
    def estimates(p):
        exact = jop.orthogonality_penalty(p, norm=SPECTRAL)
        return exact, [jop.orthogonality_penalty(p, norm=jop.spectral(iterations=k)) for k in ks]

    with jax.enable_x64(True):
        exact, est = estimates(_x64(phi))
        _, again = estimates(_x64(phi))
    assert all(float(e) <= float(exact) * (1 + 1e-12) for e in est)
    assert [float(e) for e in est] == [float(e) for e in again]  # no hidden randomness
    np.testing.assert_allclose(float(est[-1]), float(exact), rtol=1e-7)
    b = power_start(5)
    assert len(set(b)) == 5 and np.all((b > 0) & (b < 1))


# ------------------------------------------------------------------ NaN, transforms, dtypes


@pytest.mark.parametrize("norm", [SPECTRAL, "max", jop.spectral(True, 2)])
def test_nan_and_inf_propagate(norm):
    for bad in (np.nan, np.inf):
        phi = np.eye(3, dtype=np.float32)
        phi[1, 2] = bad
        value = jop.orthogonality_penalty(phi, norm=norm)
        grad = jop.orthogonality_penalty_grad(phi, norm=norm)
        assert not np.isfinite(float(value))
        assert not np.all(np.isfinite(np.asarray(grad)))


def test_nan_beside_an_infinity_reads_nan_not_inf():
    # XLA:CPU's vectorised max reduction can drop NaN next to infinities (returning
    # inf, or its initial value -inf); every max over a group checks for NaN itself.
    phi = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    phi[0, 0], phi[1, 1] = np.nan, -np.inf
    assert np.isnan(float(jop.orthogonality_error(phi)[()]))
    for norm in ("max", SPECTRAL):
        assert np.isnan(float(jop.orthogonality_penalty(phi, norm=norm)))
    assert np.isnan(float(jax.jit(jop.orthogonality_error)(phi)[()]))


def test_overflowed_gram_is_never_a_finite_wrong_value():
    # docs/failure-modes.md: float32 data times 1e20, Gram entries ~1e40.
    phi = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 3)) * 1e20, jnp.float32)
    for norm, kw, grad_finite in [
        ("spectral", {}, False),
        (SRIP, {"off_diagonal": True}, False),
        ("max", {}, False),
        ("max", {"off_diagonal": True}, False),
    ]:
        assert np.isnan(float(jop.orthogonality_penalty(phi, norm=norm, **kw)))
        grad = jop.orthogonality_penalty_grad(phi, norm=norm, **kw)
        assert bool(jnp.all(jnp.isfinite(grad))) is grad_finite
    for norm in ("spectral", "max"):  # normalize: cosines, exact at any scale
        a = jop.orthogonality_penalty(phi, norm=norm, normalize=True)
        b = jop.orthogonality_penalty(phi * 1e-20, norm=norm, normalize=True)
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_strict_promotion_jit_vmap_traced_beta(dtype):
    phi = jnp.asarray(RNG.normal(size=(3, 4, 5, 3)), dtype)
    with jax.numpy_dtype_promotion("strict"):

        @jax.jit
        def step(p, beta):
            out = []
            for norm in NORMS:
                fn = lambda p, b, norm=norm: jop.orthogonality_penalty(p, b, norm=norm)  # noqa: E731
                value, (grad, db) = jax.value_and_grad(fn, argnums=(0, 1))(p, beta)
                per_group = jax.vmap(fn, (1, None))(p, beta)
                out.append((value, grad, db, jnp.sum(per_group.astype(jnp.float32))))
            return out

        for value, grad, db, summed in step(phi, jnp.asarray(0.5, jnp.float32)):
            assert value.dtype == dtype and grad.dtype == dtype
            assert bool(jnp.all(jnp.isfinite(grad)))
            rtol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
            np.testing.assert_allclose(float(summed), float(value.astype(jnp.float32)), rtol)
            np.testing.assert_allclose(float(db), 2 * float(value.astype(jnp.float32)), rtol)


@pytest.mark.parametrize("norm", ["spectral"])
def test_transform_and_tree_penalty(norm):
    params = {"w": jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32), "b": jnp.ones(4)}
    opts = dict(norm=norm, off_diagonal=True, normalize=True, normalize_eps=1e-14)
    tx = optax.chain(jop.add_orthogonality_penalty(0.3, **opts), optax.sgd(1.0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    grads = jax.grad(jop.tree_orthogonality_penalty)(params, 0.3, **opts)
    np.testing.assert_allclose(np.asarray(updates["w"]), -np.asarray(grads["w"]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["b"]), 0)
    direct = jop.orthogonality_penalty_grad(params["w"], 0.3, **opts)
    np.testing.assert_allclose(np.asarray(grads["w"]), np.asarray(direct), atol=1e-6)


def _matrix_norms_loss(phi, beta):
    return (
        jop.orthogonality_penalty(phi, beta, norm="spectral")
        + jop.orthogonality_penalty(phi, beta, norm="max", off_diagonal=True, normalize=True)
        + jop.orthogonality_penalty(phi, beta, norm=jop.spectral(True, 2))
    )


@pytest.mark.parametrize("transform", ["scan_remat", "shard_map_explicit"])
def test_under_transformations_with_traced_beta(transform):
    # The transformations of tests/test_transformations.py, on a stack of layers.
    stack = jnp.asarray(RNG.normal(size=(3, 4, 2, 3)), jnp.float32)
    beta = jnp.float32(0.5)
    total = TRANSFORMATIONS[transform](_matrix_norms_loss)
    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(stack, beta)

    def plain(s, b):
        return sum(_matrix_norms_loss(s[k], b) for k in range(s.shape[0]))

    expected, (g_phi, g_beta) = jax.value_and_grad(plain, argnums=(0, 1))(stack, beta)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(g_phi), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(grads[1]), float(g_beta), rtol=1e-5)


# ------------------------------------------------------------------ normalize_eps


def test_normalize_eps_is_the_floor_on_the_squared_norm():
    # Column norms 1e-6 and 1e-8: above and below 1e-14's floor of 1e-7 on the norm.
    phi = np.array([[1.0, 1e-6, 0.0], [0.0, 1e-6, 1e-8], [0.0, 0.0, 1e-8]])
    for eps in (1e-12, 1e-14, 1e-20):
        opts = dict(normalize=True, off_diagonal=True, normalize_eps=eps)
        nu = np.sqrt(np.maximum((phi * phi).sum(0), eps))
        psi = phi / nu
        cos = np.abs(psi.T @ psi) * (1 - np.eye(3))
        value, grad = ref.penalty_and_grad(phi, **opts)
        with jax.enable_x64(True):
            got = jop.orthogonality_penalty(_x64(phi), **opts)
            g = jop.orthogonality_penalty_grad(_x64(phi), **opts)
            err = jop.orthogonality_error(_x64(phi), **opts)
        np.testing.assert_allclose(float(got), cos.sum(), rtol=1e-12)
        np.testing.assert_allclose(float(got), value, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g), grad, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(float(err), cos.max(), rtol=1e-12)


@pytest.mark.parametrize(
    ("eps", "error"),
    [
        (0.0, ValueError),
        (-1e-12, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("1e-12", TypeError),
        (True, TypeError),
        (jnp.asarray(1e-12), TypeError),
        (None, TypeError),
    ],
)
def test_normalize_eps_is_validated_on_every_entry_point(eps, error):
    phi = jnp.eye(3)
    calls = [
        lambda: jop.orthogonality_penalty(phi, normalize=True, normalize_eps=eps),
        lambda: jop.orthogonality_penalty_grad(phi, normalize=True, normalize_eps=eps),
        lambda: jop.orthogonality_error(phi, normalize=True, normalize_eps=eps),
        lambda: jop.tree_orthogonality_penalty({"w": phi}, 1.0, normalize_eps=eps),
    ]
    if eps is not None:  # None is the transform's default (1e-12)
        calls.append(lambda: jop.add_orthogonality_penalty(1.0, normalize_eps=eps))
    for call in calls:
        with pytest.raises(error, match="normalize_eps"):
            call()


def test_normalize_eps_under_inject_hyperparams():
    # The transform's default is None, so inject_hyperparams leaves it static; a float
    # passed through it must be named in static_args (else it arrives as an array).
    params = {"w": jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    expected = jop.orthogonality_penalty_grad(
        params["w"], 0.5, normalize=True, normalize_eps=1e-14
    )
    inject = optax.inject_hyperparams(jop.add_orthogonality_penalty, static_args="normalize_eps")
    tx = inject(beta=0.5, normalize=True, normalize_eps=1e-14)
    u, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(expected), rtol=1e-5, atol=1e-6)
    tx = optax.inject_hyperparams(jop.add_orthogonality_penalty)(beta=0.5, normalize=True)
    u, _ = tx.update(zeros, tx.init(params), params)
    expected = jop.orthogonality_penalty_grad(params["w"], 0.5, normalize=True)
    np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(expected), rtol=1e-5, atol=1e-6)
    tx = optax.inject_hyperparams(jop.add_orthogonality_penalty)(beta=0.5, normalize_eps=1e-14)
    with pytest.raises(TypeError, match="static_args"):
        tx.init(params)


# ------------------------------------------------------------------ validation


def test_spectral_is_a_validated_hashable_value():
    assert jop.spectral() == jop.spectral(False, None)
    assert hash(jop.spectral(True, 2)) == hash(jop.spectral(True, 2))
    # ... and so is the rule built from it: equal options give equal static specs
    for norm in ("spectral", "max", jop.spectral(True, 2)):
        assert make_rule(norm, "zero") == make_rule(norm, "zero")
        assert hash(make_rule(norm, "zero")) == hash(make_rule(norm, "zero"))
    assert make_rule("max", "zero") != make_rule("max", "positive")
    with pytest.raises(ValueError, match="iterations"):
        jop.spectral(iterations=0)
    with pytest.raises(TypeError, match="iterations"):
        jop.spectral(iterations=2.0)
    with pytest.raises(TypeError, match="iterations"):
        jop.spectral(iterations=True)
    with pytest.raises(TypeError, match="squared"):
        jop.spectral(squared=1)


@pytest.mark.parametrize("norm", ["spectral", "max", SRIP])
def test_double_sided_with_a_matrix_norm_raises(norm):
    with pytest.raises(ValueError, match="double_sided"):
        jop.orthogonality_penalty(jnp.eye(3), norm=norm, double_sided=True)
    with pytest.raises(ValueError, match="double_sided"):
        jop.add_orthogonality_penalty(1.0, norm=norm, double_sided=True)


def test_unknown_norm_names_the_new_ones():
    with pytest.raises(ValueError, match="'spectral', 'max'"):
        jop.orthogonality_penalty(jnp.eye(3), norm="nuclear")
    with pytest.raises(TypeError, match="must map an array"):
        jop.orthogonality_penalty(jnp.eye(3), norm="max", subgradient=lambda x: jnp.sum(x))


def test_finite_entries_whose_sum_overflows_keep_an_exact_max_norm() -> None:
    """Every entry of X is finite (3e38 - 1 rounds to 3e38 in float32) but their sum
    is not: the group is not flagged as non-finite, and the max norm is exact."""
    x = jnp.sqrt(jnp.float32(3e38))
    phi = jnp.array([[x, 0.0], [0.0, x]], jnp.float32)  # X = diag(3e38, 3e38) in float32
    value = jop.orthogonality_penalty(phi, norm="max")
    c = np.float32(x) * np.float32(x)
    with np.errstate(over="ignore"):  # the overflow is the point
        assert np.isfinite(c) and np.isinf(np.float32(c) + np.float32(c))
    assert float(value) == float(np.float32(c) - np.float32(1))
    assert np.isfinite(np.asarray(jax.grad(jop.orthogonality_penalty)(phi, norm="max"))).all()
