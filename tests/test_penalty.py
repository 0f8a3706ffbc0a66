"""The penalty, its closed-form gradient and the error, against a float64 reference."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jax_orthopenalty as jop

import reference as ref

RNG = np.random.default_rng(0)


def _x64(a):
    return jnp.asarray(a, jnp.float64)


# (shape, vector_axis, column_axis): the layouts users meet.
LAYOUTS = {
    "lmn": ((6, 3, 4), 0, -1),
    "matrix": ((7, 3), 0, 1),
    "groups_first": ((3, 6, 4), 1, 2),
    "groups_last": ((6, 4, 3), 0, 1),
    "conv_hwio": ((3, 3, 2, 5), (0, 1, 2), 3),
    "equinox_out_in": ((4, 9), 1, 0),
    "scan_stacked": ((2, 6, 3, 4), 1, -1),
    "group_middle_tuple": ((2, 3, 5, 4), (0, 3), 2),
}

RULES = {
    "l1-zero": ("l1", "zero"),
    "l1-positive": ("l1", "positive"),
    "l1-negative": ("l1", "negative"),
    "l1-deadzone": ("l1", jop.deadzone(0.05)),
    "l1-callable": ("l1", lambda x: jnp.tanh(x / 0.1)),
    "squared": ("squared", "zero"),
    "huber": (jop.huber(0.3), "zero"),
}


def _opts(layout, rule):
    shape, vector_axis, column_axis = LAYOUTS[layout]
    norm, subgradient = RULES[rule]
    return shape, dict(
        vector_axis=vector_axis, column_axis=column_axis, norm=norm, subgradient=subgradient
    )


def _ref_opts(opts):
    # The reference evaluates the callable convention with NumPy.
    out = dict(opts)
    if callable(out["subgradient"]) and not isinstance(out["subgradient"], jop.deadzone):
        out["subgradient"] = lambda x: np.tanh(x / 0.1)
    return out


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_value_and_gradient_match_reference(layout, rule):
    shape, opts = _opts(layout, rule)
    phi = RNG.normal(size=shape) * 0.6
    value, grad = ref.penalty_and_grad(phi, 0.7, **_ref_opts(opts))
    with jax.enable_x64(True):
        p = _x64(phi)
        np.testing.assert_allclose(float(jop.orthogonality_penalty(p, 0.7, **opts)), value, 1e-12)
        np.testing.assert_allclose(
            np.asarray(jax.grad(jop.orthogonality_penalty)(p, 0.7, **opts)), grad, atol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(jop.orthogonality_penalty_grad(p, 0.7, **opts)), grad, atol=1e-12
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_matches_reference(layout):
    shape, opts = _opts(layout, "squared")
    phi = (RNG.normal(size=shape) * 0.5).astype(np.float32)
    value, grad = ref.penalty_and_grad(phi, 1.3, **opts)
    np.testing.assert_allclose(float(jop.orthogonality_penalty(phi, 1.3, **opts)), value, 1e-5)
    np.testing.assert_allclose(
        np.asarray(jax.grad(jop.orthogonality_penalty)(jnp.asarray(phi), 1.3, **opts)),
        grad,
        rtol=1e-5,
        atol=1e-5,
    )


# ---------------------------------------------------------------- the exact minimum


def _orthonormal_groups(l, m, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([ref.signed_permutation(l, n, rng) for _ in range(m)], axis=1)


def test_exact_minimum_zero_convention_gives_exact_zero():
    phi = jnp.asarray(_orthonormal_groups(5, 3, 4), jnp.float32)
    assert float(jop.orthogonality_penalty(phi, 2.0)) == 0.0
    np.testing.assert_array_equal(np.asarray(jax.grad(jop.orthogonality_penalty)(phi, 2.0)), 0.0)
    np.testing.assert_array_equal(np.asarray(jop.orthogonality_penalty_grad(phi, 2.0)), 0.0)
    np.testing.assert_array_equal(np.asarray(jop.orthogonality_error(phi)), 0.0)


@pytest.mark.parametrize(("subgradient", "sign"), [("positive", 1.0), ("negative", -1.0)])
def test_exact_minimum_positive_negative_give_all_ones(subgradient, sign):
    # At X = 0 every entry of G is the convention's sign(0) = +-1, so the gradient is
    # beta * Phi_i (G + G^T) = 2 beta sign Phi_i 1 1^T, entry by entry.
    l, m, n, beta = 5, 3, 4, 0.5
    phi = _orthonormal_groups(l, m, n)
    expected = np.einsum("lmj,jk->lmk", phi, 2 * beta * sign * np.ones((n, n)))
    p = jnp.asarray(phi, jnp.float32)
    got = jax.grad(jop.orthogonality_penalty)(p, beta, subgradient=subgradient)
    np.testing.assert_array_equal(np.asarray(got), expected)
    got = jop.orthogonality_penalty_grad(p, beta, subgradient=subgradient)
    np.testing.assert_array_equal(np.asarray(got), expected)


def _naive(phi, beta=1.0):
    gram = jnp.einsum("lmj,lmk->mjk", phi, phi, precision="highest")
    return beta * jnp.abs(gram - jnp.eye(phi.shape[-1])[None]).sum()


def test_autodiff_of_the_naive_expression_is_not_zero_at_the_minimum():
    # The pitfall this library fixes: jax.grad(jnp.abs)(0.0) == 1.
    phi = jnp.asarray(_orthonormal_groups(5, 3, 4), jnp.float32)
    naive = jax.grad(_naive)(phi)
    assert float(jnp.abs(naive).max()) > 0.5
    # It is exactly the "positive" convention, which is what autodiff chose.
    np.testing.assert_array_equal(
        np.asarray(naive),
        np.asarray(jax.grad(jop.orthogonality_penalty)(phi, subgradient="positive")),
    )


def test_agrees_with_autodiff_away_from_kinks():
    phi = jnp.asarray(RNG.normal(size=(6, 3, 4)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(jax.grad(jop.orthogonality_penalty)(phi)),
        np.asarray(jax.grad(_naive)(phi)),
        rtol=1e-6,
        atol=1e-5,
    )


# ---------------------------------------------------------------- transformations


@pytest.mark.parametrize("norm", ["l1", "squared", jop.huber(0.4)])
def test_check_grads_reverse_away_from_kinks(norm):
    phi = RNG.normal(size=(5, 2, 3))
    with jax.enable_x64(True):
        check_grads(
            lambda p: jop.orthogonality_penalty(p, 0.8, norm=norm),
            (_x64(phi),),
            order=1,
            modes=["rev"],
            eps=1e-6,
        )
        # The gradient function is plain JAX: both modes, its own derivative.
        check_grads(
            lambda p: jop.orthogonality_penalty_grad(p, 0.8, norm=norm),
            (_x64(phi),),
            order=1,
            modes=["fwd", "rev"],
            eps=1e-6,
        )


def test_check_grads_second_order_reverse_for_smooth_norm():
    phi = RNG.normal(size=(5, 2, 3))
    with jax.enable_x64(True):
        check_grads(
            lambda p: jop.orthogonality_penalty(p, 0.8, norm="squared"),
            (_x64(phi),),
            order=2,
            modes=["rev"],
            eps=1e-5,
        )


def test_jit_equals_eager():
    phi = jnp.asarray(RNG.normal(size=(6, 3, 4)), jnp.float32)
    f = jax.jit(jax.value_and_grad(jop.orthogonality_penalty))
    v, g = f(phi, 0.3)
    np.testing.assert_allclose(float(v), float(jop.orthogonality_penalty(phi, 0.3)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(g), np.asarray(jop.orthogonality_penalty_grad(phi, 0.3)), rtol=1e-6
    )


def test_vmap_over_a_stack_equals_a_loop():
    stack = jnp.asarray(RNG.normal(size=(4, 6, 3, 5)), jnp.float32)
    values = jax.vmap(jop.orthogonality_penalty)(stack)
    grads = jax.vmap(jax.grad(jop.orthogonality_penalty))(stack)
    grads_fn = jax.vmap(jop.orthogonality_penalty_grad)(stack)
    for k in range(stack.shape[0]):
        np.testing.assert_allclose(
            float(values[k]), float(jop.orthogonality_penalty(stack[k])), rtol=1e-6
        )
        loop = np.asarray(jax.grad(jop.orthogonality_penalty)(stack[k]))
        np.testing.assert_allclose(np.asarray(grads[k]), loop, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grads_fn[k]), loop, rtol=1e-6, atol=1e-6)


def test_vmap_over_beta():
    phi = jnp.asarray(RNG.normal(size=(6, 3, 4)), jnp.float32)
    betas = jnp.array([0.0, 0.5, 2.0])
    values = jax.vmap(jop.orthogonality_penalty, in_axes=(None, 0))(phi, betas)
    np.testing.assert_allclose(
        np.asarray(values), np.asarray(betas) * float(jop.orthogonality_penalty(phi)), rtol=1e-6
    )


def test_hessian_vector_products_are_beta_v_g_plus_gt():
    # For L1, G = sign(X) is piecewise constant, so d(grad)[V] = beta V_i (G_i + G_i^T).
    beta = 0.7
    phi = RNG.normal(size=(5, 2, 3))
    v = RNG.normal(size=phi.shape)
    x = np.einsum("lmj,lmk->mjk", phi, phi) - np.eye(3)
    g = np.sign(x)
    expected = beta * np.einsum("lmj,mjk->lmk", v, g + np.swapaxes(g, 1, 2))
    with jax.enable_x64(True):
        p, t = _x64(phi), _x64(v)
        rev_rev = jax.grad(lambda q: jnp.vdot(jax.grad(jop.orthogonality_penalty)(q, beta), t))(p)
        fwd = jax.jvp(lambda q: jop.orthogonality_penalty_grad(q, beta), (p,), (t,))[1]
    np.testing.assert_allclose(np.asarray(rev_rev), expected, atol=1e-12)
    np.testing.assert_allclose(np.asarray(fwd), expected, atol=1e-12)


def test_forward_mode_on_the_custom_vjp_raises_and_the_grad_function_works():
    phi = jnp.asarray(RNG.normal(size=(4, 2, 3)), jnp.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(jop.orthogonality_penalty, (phi,), (phi,))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jacfwd(jop.orthogonality_penalty)(phi)
    jac = jax.jacfwd(jop.orthogonality_penalty_grad)(phi)
    assert jac.shape == phi.shape * 2
    # Forward over reverse differentiates the (plain-JAX) backward pass, so
    # jax.hessian works and agrees with the gradient function's Jacobian.
    hess = jax.hessian(jop.orthogonality_penalty)(phi)
    np.testing.assert_allclose(np.asarray(hess), np.asarray(jac), atol=1e-6)


# ---------------------------------------------------------------- beta


def test_beta_gradient_is_the_unscaled_penalty():
    phi = jnp.asarray(RNG.normal(size=(6, 3, 4)), jnp.float32)
    dbeta = jax.grad(jop.orthogonality_penalty, argnums=1)(phi, jnp.float32(0.3))
    np.testing.assert_allclose(float(dbeta), float(jop.orthogonality_penalty(phi, 1.0)), 1e-6)
    # and through the plain-JAX gradient function, forward mode in beta
    tangent = jax.jvp(lambda b: jop.orthogonality_penalty_grad(phi, b), (0.3,), (1.0,))[1]
    np.testing.assert_allclose(
        np.asarray(tangent), np.asarray(jop.orthogonality_penalty_grad(phi, 1.0)), rtol=1e-6
    )


def test_beta_traced_under_jit_and_python_float_agree():
    phi = jnp.asarray(RNG.normal(size=(6, 3, 4)), jnp.float32)
    f = jax.jit(jax.grad(jop.orthogonality_penalty))
    np.testing.assert_array_equal(
        np.asarray(f(phi, jnp.float32(0.25))),
        np.asarray(jax.grad(jop.orthogonality_penalty)(phi, 0.25)),
    )


def test_beta_integer_is_accepted_and_beta_zero_gives_zero():
    phi = jnp.asarray(RNG.normal(size=(4, 2, 3)), jnp.float32)
    assert float(jop.orthogonality_penalty(phi, 2)) == pytest.approx(
        2 * float(jop.orthogonality_penalty(phi)), rel=1e-6
    )
    assert float(jop.orthogonality_penalty(phi, 0.0)) == 0.0
    np.testing.assert_array_equal(np.asarray(jop.orthogonality_penalty_grad(phi, 0.0)), 0.0)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_in_half_precision_out(dtype):
    phi = jnp.asarray(RNG.normal(size=(16, 4, 8)) * 0.3, dtype)
    value = jop.orthogonality_penalty(phi, 0.5, norm="squared")
    grad = jax.grad(jop.orthogonality_penalty)(phi, 0.5, norm="squared")
    grad_fn = jop.orthogonality_penalty_grad(phi, 0.5, norm="squared")
    assert value.dtype == dtype and grad.dtype == dtype and grad_fn.dtype == dtype
    # Accurate to the output dtype: the reference sees the same rounded input.
    ref_value, ref_grad = ref.penalty_and_grad(np.asarray(phi, np.float64), 0.5, norm="squared")
    resolution = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(float(value), ref_value, rtol=resolution)
    scale = np.abs(ref_grad).max()
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, atol=resolution * scale)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_fn))


def test_half_precision_gram_accumulates_in_float32():
    # |phi|^2 - 1 = 2^-18 exactly, from two exact bfloat16 entries; in bfloat16
    # (8 significant bits) 1 + 2^-18 rounds to 1 and the residual would vanish.
    phi = jnp.asarray([[1.0], [2.0**-9]], jnp.bfloat16)  # one group, one column
    assert jop.orthogonality_error(phi).dtype == jnp.float32
    assert float(jop.orthogonality_error(phi)) == 2.0**-18
    assert float(jop.orthogonality_penalty(phi, norm="squared")) == pytest.approx(
        2.0**-36, rel=1e-2
    )


# ---------------------------------------------------------------- orthogonality_error


@pytest.mark.parametrize("layout", LAYOUTS)
def test_error_matches_reference(layout):
    shape, vector_axis, column_axis = LAYOUTS[layout]
    phi = RNG.normal(size=shape).astype(np.float32)
    got = jop.orthogonality_error(phi, vector_axis=vector_axis, column_axis=column_axis)
    expected = ref.error(phi, vector_axis=vector_axis, column_axis=column_axis)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


# ---------------------------------------------------------------- empty and non-finite


def test_empty_group_axis_gives_zero():
    phi = jnp.zeros((5, 0, 3))
    assert float(jop.orthogonality_penalty(phi)) == 0.0
    assert jax.grad(jop.orthogonality_penalty)(phi).shape == (5, 0, 3)
    assert jop.orthogonality_error(phi).shape == (0,)


def test_empty_column_axis_gives_zero():
    phi = jnp.zeros((5, 2, 0))
    assert float(jop.orthogonality_penalty(phi)) == 0.0
    np.testing.assert_array_equal(np.asarray(jop.orthogonality_error(phi)), [0.0, 0.0])


def test_empty_vector_axis_penalises_every_column():
    # l = 0: every column has norm 0, X = -I, L = beta * n per group.
    phi = jnp.zeros((0, 2, 3))
    assert float(jop.orthogonality_penalty(phi, 0.5)) == 0.5 * 2 * 3


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("norm", ["l1", "squared", jop.huber(0.5)])
def test_non_finite_input_propagates(bad, norm):
    phi = np.asarray(RNG.normal(size=(4, 2, 3)), np.float32)
    phi[1, 0, 2] = bad
    value = jop.orthogonality_penalty(phi, norm=norm)
    grad = jax.grad(jop.orthogonality_penalty)(jnp.asarray(phi), norm=norm)
    assert not math.isfinite(float(value))
    assert not bool(jnp.all(jnp.isfinite(grad[:, 0, :])))  # the poisoned group
    np.testing.assert_array_equal(  # the clean group is untouched
        np.asarray(grad[:, 1, :]),
        np.asarray(jax.grad(jop.orthogonality_penalty)(jnp.asarray(phi[:, 1:, :]), norm=norm))[
            :, 0, :
        ],
    )
    assert not math.isfinite(float(jop.orthogonality_error(phi)[0]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("phi", "kwargs", "error", "match"),
    [
        (np.ones(3), {}, ValueError, "`phi` must have rank >= 2"),
        (np.ones(()), {}, ValueError, "`phi` must have rank >= 2"),
        (np.ones((3, 2)), {"vector_axis": 2}, ValueError, "`vector_axis`=2 is out of range"),
        (np.ones((3, 2)), {"column_axis": -3}, ValueError, "`column_axis`=-3 is out of range"),
        (np.ones((3, 2, 2)), {"column_axis": 0}, ValueError, "overlaps `vector_axis`"),
        (np.ones((3, 2, 2)), {"vector_axis": (0, 2)}, ValueError, "overlaps `vector_axis`"),
        (np.ones((3, 2, 2)), {"vector_axis": (0, -3)}, ValueError, "names an axis twice"),
        (np.ones((3, 2, 2)), {"vector_axis": ()}, ValueError, "non-empty tuple"),
        (np.ones((3, 2)), {"vector_axis": 0.0}, TypeError, "`vector_axis` must be an int"),
        (np.ones((3, 2)), {"column_axis": None}, TypeError, "`column_axis` must be an int"),
        (np.ones((3, 2), np.int32), {}, TypeError, "`phi` must have a floating dtype"),
        (np.ones((3, 2), bool), {}, TypeError, "`phi` must have a floating dtype"),
        (
            np.ones((3, 2), np.complex64),
            {"norm": "spectral"},
            TypeError,
            "norm='spectral' does not support complex `phi` (complex64)",
        ),
        (np.ones((3, 2)), {"norm": "frobenius"}, ValueError, "`norm` must be 'l1'"),
        (np.ones((3, 2)), {"subgradient": "sign"}, ValueError, "`subgradient` must be"),
        (np.ones((3, 2)), {"beta": np.ones(2)}, ValueError, "`beta` must be a scalar"),
        (np.ones((3, 2)), {"beta": 1j}, TypeError, "`beta` must be a real scalar"),
        (np.ones((3, 2)), {"beta": True}, TypeError, "`beta` must be a real scalar"),
        (np.ones((3, 2)), {"off_diagonal": 1}, TypeError, "`off_diagonal` must be a Python bool"),
        (np.ones((3, 2)), {"normalize": "yes"}, TypeError, "`normalize` must be a Python bool"),
        (np.ones((3, 2)), {"double_sided": None}, TypeError, "`double_sided` must be"),
        (
            np.ones((3, 2)),
            {"subgradient": lambda x: jnp.sum(x)},
            TypeError,
            "must map an array x to an array of x's shape",
        ),
    ],
)
def test_bad_input_raises_at_trace_time(phi, kwargs, error, match):
    kwargs = dict(kwargs)
    beta = kwargs.pop("beta", 1.0)
    spec = jax.ShapeDtypeStruct(phi.shape, phi.dtype)
    for fn in (jop.orthogonality_penalty, jop.orthogonality_penalty_grad):
        with pytest.raises(error, match=re.escape(match)):
            jax.eval_shape(lambda p, f=fn: f(p, beta, **kwargs), spec)  # trace only
        with pytest.raises(error, match=re.escape(match)):
            fn(phi, beta, **kwargs)


def test_bad_layout_raises_in_orthogonality_error():
    with pytest.raises(ValueError, match="out of range"):
        jop.orthogonality_error(np.ones((3, 2)), vector_axis=5)
    with pytest.raises(TypeError, match="floating dtype"):
        jop.orthogonality_error(np.ones((3, 2), np.int8))


def test_numpy_integer_axes_are_accepted():
    phi = RNG.normal(size=(3, 4, 2)).astype(np.float32)
    expected = float(jop.orthogonality_penalty(phi, vector_axis=(0, 1), column_axis=2))
    got = jop.orthogonality_penalty(
        phi, vector_axis=(np.int64(0), np.int32(1)), column_axis=np.int8(-1)
    )
    assert float(got) == expected
    with pytest.raises(TypeError, match="`vector_axis` must be an int"):
        jop.orthogonality_penalty(phi, vector_axis=np.bool_(False))


def test_python_lists_are_accepted():
    assert float(jop.orthogonality_penalty([[1.0, 0.0], [0.0, 1.0]])) == 0.0


# ---------------------------------------------------------------- precision


def test_precision_is_honoured():
    phi = jnp.asarray(RNG.normal(size=(6, 3, 4)), jnp.float32)
    expected = float(jop.orthogonality_penalty(phi))
    for precision in (None, "default", jax.lax.Precision.HIGH, jax.lax.Precision.HIGHEST):
        assert float(jop.orthogonality_penalty(phi, precision=precision)) == pytest.approx(
            expected, rel=1e-5
        )
    # The default is HIGHEST: it reaches the compiled dot.
    hlo = jax.jit(jop.orthogonality_penalty).lower(phi).as_text()
    assert "HIGHEST" in hlo.upper()


# ---------------------------------------------------------------- laws (hypothesis)


def _random_orthogonal(rng, l):
    q, r = np.linalg.qr(rng.normal(size=(l, l)))
    return q * np.sign(np.diag(r))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), l=st.integers(2, 6), m=st.integers(1, 4))
def test_invariant_under_orthogonal_q_on_each_group(seed, l, m):
    # (Q Phi_i)^T (Q Phi_i) = Phi_i^T Phi_i, so the penalty is unchanged, and the
    # gradient rotates with Phi: grad(Q Phi_i) = Q grad(Phi_i).
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, l + 1))
    phi = rng.normal(size=(l, m, n))
    q = np.stack([_random_orthogonal(rng, l) for _ in range(m)])
    rotated = np.einsum("ikl,lij->kij", q, phi)
    with jax.enable_x64(True):
        a = jop.orthogonality_penalty(_x64(phi), norm="squared")
        b = jop.orthogonality_penalty(_x64(rotated), norm="squared")
        ga = jop.orthogonality_penalty_grad(_x64(phi), norm="squared")
        gb = jop.orthogonality_penalty_grad(_x64(rotated), norm="squared")
    np.testing.assert_allclose(float(a), float(b), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        np.einsum("ikl,lij->kij", q, np.asarray(ga)), np.asarray(gb), atol=1e-9
    )


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 6))
def test_permuting_groups_permutes_the_gradient(seed, m):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(5, m, 3)).astype(np.float32)
    perm = rng.permutation(m)
    value = jop.orthogonality_penalty(phi)
    grad = jop.orthogonality_penalty_grad(phi)
    np.testing.assert_allclose(
        float(jop.orthogonality_penalty(phi[:, perm])), float(value), rtol=1e-6
    )
    np.testing.assert_array_equal(
        np.asarray(jop.orthogonality_penalty_grad(phi[:, perm])), np.asarray(grad)[:, perm]
    )


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    a=st.floats(-4, 4, allow_nan=False),
    b=st.floats(-4, 4, allow_nan=False),
)
def test_linear_in_beta(seed, a, b):
    # Traced betas (under jit) of either sign: a concrete negative beta raises.
    phi = np.random.default_rng(seed).normal(size=(4, 2, 3))
    with jax.enable_x64(True):
        p = _x64(phi)
        for fn in (jop.orthogonality_penalty, jop.orthogonality_penalty_grad):
            f = jax.jit(fn)
            lhs = np.asarray(f(p, a + b))
            rhs = np.asarray(f(p, a)) + np.asarray(f(p, b))
            np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@st.composite
def layouts(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = draw(st.permutations(range(ndim)))
    column = axes[0]
    k = draw(st.integers(1, ndim - 1))
    vector = tuple(axes[1 : 1 + k])
    neg = draw(st.booleans())
    vector_axis = vector[0] - ndim if (len(vector) == 1 and neg) else vector
    if len(vector) == 1 and not neg and draw(st.booleans()):
        vector_axis = vector[0]
    return shape, vector_axis, column


@settings(max_examples=30, deadline=None)
@given(
    layout=layouts(),
    seed=st.integers(0, 2**31 - 1),
    rule=st.sampled_from(["squared", "huber", "l1-zero", "l1-deadzone"]),
)
def test_random_layouts_match_reference(layout, seed, rule):
    shape, vector_axis, column_axis = layout
    norm, subgradient = RULES[rule]
    opts = dict(
        vector_axis=vector_axis, column_axis=column_axis, norm=norm, subgradient=subgradient
    )
    phi = np.random.default_rng(seed).normal(size=shape)
    value, grad = ref.penalty_and_grad(phi, 0.9, **opts)
    with jax.enable_x64(True):
        p = _x64(phi)
        np.testing.assert_allclose(
            float(jop.orthogonality_penalty(p, 0.9, **opts)), value, rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(jax.grad(jop.orthogonality_penalty)(p, 0.9, **opts)), grad, atol=1e-11
        )
