"""The penalty family: each known regulariser, written independently, equals a keyword.

Every row of the table in docs/family.md is a test here. The published formulas are
written out in NumPy (float64) from the papers and libraries, not from this package.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_orthopenalty as jop

import reference as ref

RNG = np.random.default_rng(7)


def _x64(a):
    return jnp.asarray(a, jnp.float64)


def _grad(fn, w, eps=1e-6):
    """Central finite differences of a NumPy function, entry by entry."""
    g = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        d = np.zeros_like(w)
        d[idx] = eps
        g[idx] = (fn(w + d) - fn(w - d)) / (2 * eps)
    return g


# ------------------------------------------------------------------ Keras


def keras_orthogonal_regularizer(w, factor, mode):
    """keras.regularizers.OrthogonalRegularizer(factor, mode)(w) for a 2-D kernel."""
    axis = 1 if mode == "rows" else 0
    w = w / np.sqrt(np.maximum(np.sum(w * w, axis=axis, keepdims=True), 1e-12))
    product = w @ w.T if mode == "rows" else w.T @ w
    size = product.shape[0]
    off = product * (1.0 - np.eye(size))
    num_pairs = size * (size - 1.0) / 2.0
    return factor * 0.5 * np.sum(np.abs(off)) / num_pairs


@pytest.mark.parametrize("mode", ["columns", "rows"])
def test_keras_orthogonal_regularizer(mode):
    w = RNG.normal(size=(7, 5))  # a Dense kernel (input_dim, units)
    factor = 0.01
    if mode == "columns":
        n = w.shape[1]
        kw = dict(vector_axis=0, column_axis=1)
    else:
        n = w.shape[0]
        kw = dict(vector_axis=1, column_axis=0)
    beta = factor / (n * (n - 1))
    expected = keras_orthogonal_regularizer(w, factor, mode)
    with jax.enable_x64(True):
        p = _x64(w)
        value = jop.orthogonality_penalty(p, beta, off_diagonal=True, normalize=True, **kw)
        grad = jax.grad(jop.orthogonality_penalty)(
            p, beta, off_diagonal=True, normalize=True, **kw
        )
    np.testing.assert_allclose(float(value), expected, rtol=1e-12)
    fd = _grad(lambda a: keras_orthogonal_regularizer(a, factor, mode), w)
    np.testing.assert_allclose(np.asarray(grad), fd, atol=1e-8)


def test_keras_rows_mode_is_columns_mode_on_the_transpose():
    w = RNG.normal(size=(6, 4))
    kw = dict(off_diagonal=True, normalize=True)
    a = jop.orthogonality_penalty(w, 0.1, vector_axis=1, column_axis=0, **kw)
    b = jop.orthogonality_penalty(w.T, 0.1, **kw)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


# ------------------------------------------------------------------ BigGAN


def biggan_ortho_grad(w, strength):
    """The gradient BigGAN's `ortho` adds: strength * 2 ((W W^T) * (1 - I)) W, W rows."""
    w2 = w.reshape(w.shape[0], -1)
    g = 2 * ((w2 @ w2.T) * (1.0 - np.eye(w2.shape[0]))) @ w2
    return strength * g.reshape(w.shape)


def test_biggan_ortho_dense():
    w = RNG.normal(size=(5, 8))  # torch Linear weight (out, in): rows are the filters
    strength = 1e-4
    with jax.enable_x64(True):
        grad = jax.grad(jop.orthogonality_penalty)(
            _x64(w.T), strength / 2, norm="squared", off_diagonal=True
        )
    np.testing.assert_allclose(np.asarray(grad).T, biggan_ortho_grad(w, strength), rtol=1e-12)


def test_biggan_ortho_conv_without_transposing():
    w = RNG.normal(size=(4, 3, 3, 3))  # torch Conv2d weight (out, in, kh, kw)
    with jax.enable_x64(True):
        grad = jop.orthogonality_penalty_grad(
            _x64(w), 0.5, vector_axis=(1, 2, 3), column_axis=0, norm="squared", off_diagonal=True
        )
    np.testing.assert_allclose(np.asarray(grad), biggan_ortho_grad(w, 1.0), rtol=1e-12)


# ------------------------------------------------------------------ Sonnet


def sonnet_off_diagonal_orthogonal(tensors, scale):
    """snt.regularizers.OffDiagonalOrthogonal(scale)(tensors)."""
    total = 0.0
    for t in tensors:
        w = t.reshape(-1, t.shape[-1])
        w2 = np.square(w.T @ w)
        total += w2.sum() - np.trace(w2)
    return scale * total


@pytest.mark.parametrize("shape", [(6, 4), (3, 3, 2, 5)])
def test_sonnet_off_diagonal_orthogonal(shape):
    t = RNG.normal(size=shape)
    vector_axis = tuple(range(t.ndim - 1))
    with jax.enable_x64(True):
        value = jop.orthogonality_penalty(
            _x64(t), 0.01, vector_axis=vector_axis, norm="squared", off_diagonal=True
        )
    np.testing.assert_allclose(float(value), sonnet_off_diagonal_orthogonal([t], 0.01), 1e-12)


# ------------------------------------------------------------------ Bansal et al. 2018


def so(w, lam):
    """Soft orthogonality: lam * ||W^T W - I||_F^2, W = reshape(S*S*C, M)."""
    w = w.reshape(-1, w.shape[-1])
    return lam * np.sum(np.square(w.T @ w - np.eye(w.shape[1])))


def dso(w, lam):
    """Double soft orthogonality: lam * (||W^T W - I||_F^2 + ||W W^T - I||_F^2)."""
    w = w.reshape(-1, w.shape[-1])
    return lam * (
        np.sum(np.square(w.T @ w - np.eye(w.shape[1])))
        + np.sum(np.square(w @ w.T - np.eye(w.shape[0])))
    )


@pytest.mark.parametrize("double_sided", [False, True])
def test_bansal_so_and_dso(double_sided):
    w = RNG.normal(size=(2, 2, 3, 5)) * 0.4  # HWIO conv kernel
    fn = dso if double_sided else so
    kw = dict(vector_axis=(0, 1, 2), norm="squared", double_sided=double_sided)
    with jax.enable_x64(True):
        value = jop.orthogonality_penalty(_x64(w), 0.1, **kw)
        grad = jax.grad(jop.orthogonality_penalty)(_x64(w), 0.1, **kw)
    np.testing.assert_allclose(float(value), fn(w, 0.1), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), _grad(lambda a: fn(a, 0.1), w), atol=1e-7)


def test_dso_is_zero_exactly_at_a_square_orthogonal_matrix():
    q = ref.signed_permutation(4, 4, np.random.default_rng(3))
    p = jnp.asarray(q, jnp.float32)
    assert float(jop.orthogonality_penalty(p, double_sided=True)) == 0.0
    np.testing.assert_array_equal(
        np.asarray(jop.orthogonality_penalty_grad(p, double_sided=True)), 0
    )


# ------------------------------------------------------------------ Brock et al. 2017


def brock(phi, beta):
    """beta * sum_i sum |Phi_i^T Phi_i - I|, groups Phi[:, i, :]."""
    return beta * sum(
        np.abs(phi[:, i, :].T @ phi[:, i, :] - np.eye(phi.shape[2])).sum()
        for i in range(phi.shape[1])
    )


def test_brock_grouped_l1():
    phi = RNG.normal(size=(6, 3, 4))
    with jax.enable_x64(True):
        value = jop.orthogonality_penalty(_x64(phi), 0.3)
        grad = jax.grad(jop.orthogonality_penalty)(_x64(phi), 0.3)
    np.testing.assert_allclose(float(value), brock(phi, 0.3), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), _grad(lambda a: brock(a, 0.3), phi), atol=1e-7)


# ------------------------------------------------------------------ every combination

RULES = [
    ("l1", "zero"),
    ("l1", "positive"),
    ("l1", "negative"),
    ("l1", jop.deadzone(0.05)),
    ("squared", "zero"),
    (jop.huber(0.3), "zero"),
]
FLAGS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize(("off_diagonal", "normalize", "double_sided"), FLAGS)
@pytest.mark.parametrize(("norm", "subgradient"), RULES)
def test_every_flag_combines_with_every_norm_and_convention(
    off_diagonal, normalize, double_sided, norm, subgradient
):
    phi = RNG.normal(size=(5, 2, 3, 4))
    opts = dict(
        vector_axis=(0, 2),
        column_axis=-1,
        norm=norm,
        subgradient=subgradient,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
    )
    value, grad = ref.penalty_and_grad(phi, 0.6, **opts)
    with jax.enable_x64(True):
        p = _x64(phi)
        np.testing.assert_allclose(float(jop.orthogonality_penalty(p, 0.6, **opts)), value, 1e-12)
        np.testing.assert_allclose(
            np.asarray(jax.grad(jop.orthogonality_penalty)(p, 0.6, **opts)), grad, atol=1e-11
        )
        np.testing.assert_allclose(
            np.asarray(jop.orthogonality_penalty_grad(p, 0.6, **opts)), grad, atol=1e-11
        )


# ------------------------------------------------------------------ exact kinks


def test_off_diagonal_ignores_the_norms_exactly():
    # Orthogonal, not normalised: the off-diagonal penalty is 0 with gradient exactly 0.
    phi = jnp.asarray(np.diag([2.0, 3.0, 0.5])[:, None, :], jnp.float32)
    assert float(jop.orthogonality_penalty(phi, off_diagonal=True)) == 0.0
    np.testing.assert_array_equal(
        np.asarray(jax.grad(jop.orthogonality_penalty)(phi, off_diagonal=True)), 0.0
    )
    assert float(jop.orthogonality_penalty(phi)) > 0  # the full penalty sees the norms


def test_normalize_is_exact_at_scaled_orthogonal_columns():
    # Unit columns after normalisation: X = 0 exactly, diagonal included, so "zero"
    # gives exactly 0 and "positive" gives its +1 on the off-diagonal only.
    phi = jnp.asarray(np.diag([2.0, 3.0, 0.5]), jnp.float32)
    assert float(jop.orthogonality_penalty(phi, normalize=True)) == 0.0
    np.testing.assert_array_equal(
        np.asarray(jax.grad(jop.orthogonality_penalty)(phi, normalize=True)), 0.0
    )
    # "positive": W = 2 (1 1^T - I) off the diagonal; through the normalisation
    # column j of the gradient is (I - psi_j psi_j^T) / nu_j (Psi W)_j.
    got = np.asarray(jop.orthogonality_penalty_grad(phi, normalize=True, subgradient="positive"))
    nu = np.array([2.0, 3.0, 0.5])
    psi = np.eye(3)
    w = 2 * (np.ones((3, 3)) - np.eye(3))
    g_psi = psi @ w
    expected = np.stack(
        [(np.eye(3) - np.outer(psi[:, j], psi[:, j])) @ g_psi[:, j] / nu[j] for j in range(3)], 1
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_normalize_scale_invariance():
    phi = RNG.normal(size=(6, 2, 3))
    scales = np.array([0.1, 3.0, 7.0])
    a = jop.orthogonality_penalty(phi, normalize=True, norm="squared")
    b = jop.orthogonality_penalty(phi * scales, normalize=True, norm="squared")
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_normalize_zero_column_is_finite_and_documented():
    # A zero column: nu = sqrt(1e-12), psi_j = 0, X_jj = -1 and X_jk = 0.
    phi = np.array([[1.0, 0.0], [0.0, 0.0]])
    value = jop.orthogonality_penalty(phi, normalize=True)
    grad = jop.orthogonality_penalty_grad(phi, normalize=True)
    assert float(value) == 1.0  # |X_jj| = |0 - 1| for the zero column
    assert bool(jnp.all(jnp.isfinite(grad)))
    # the same value with off_diagonal: cosines with a zero column are 0
    assert float(jop.orthogonality_penalty(phi, normalize=True, off_diagonal=True)) == 0.0


def test_double_sided_for_wide_and_tall_groups_is_documented_minimum():
    # For l != n, ||Phi^T Phi - I||^2 + ||Phi Phi^T - I||^2 >= |l - n| (squared norm):
    # at orthonormal columns (l > n) the second term is exactly l - n.
    q = ref.signed_permutation(5, 3, np.random.default_rng(0))
    value = jop.orthogonality_penalty(
        jnp.asarray(q, jnp.float32), norm="squared", double_sided=True
    )
    assert float(value) == 2.0


@pytest.mark.parametrize(
    ("off_diagonal", "normalize"), list(itertools.product([False, True], repeat=2))
)
def test_orthogonality_error_with_the_family_options(off_diagonal, normalize):
    phi = RNG.normal(size=(5, 3, 4))
    expected = []
    for i in range(phi.shape[1]):
        a = phi[:, i, :]
        if normalize:
            a = a / np.linalg.norm(a, axis=0)
        x = np.abs(a.T @ a - np.eye(4))
        if off_diagonal:
            x = x * (1 - np.eye(4))
        expected.append(x.max())
    got = jop.orthogonality_error(phi, off_diagonal=off_diagonal, normalize=normalize)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_orthogonality_error_is_exactly_zero_where_the_family_penalty_is():
    phi = jnp.asarray(np.diag([2.0, 3.0, 0.5]), jnp.float32)  # orthogonal, not normalised
    assert float(jop.orthogonality_error(phi)) > 0
    assert float(jop.orthogonality_error(phi, off_diagonal=True)) == 0.0
    assert float(jop.orthogonality_error(phi, normalize=True)) == 0.0
