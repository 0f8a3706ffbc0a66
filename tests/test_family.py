"""The penalty family: each known regulariser, written independently, equals a keyword.

Every row of the table in docs/family.md is a test here. The published formulas are
written out in NumPy (float64) from the papers and libraries, not from this package.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_orthopenalty as jop
from jax_orthopenalty._matrix_norms import power_start

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
    """Keras 2 (tf.keras) OrthogonalRegularizer(factor, mode)(w) for a 2-D kernel.

    It normalises with tf.math.l2_normalize: w * rsqrt(max(sum w^2, 1e-12)).
    """
    axis = 1 if mode == "rows" else 0
    w = w / np.sqrt(np.maximum(np.sum(w * w, axis=axis, keepdims=True), 1e-12))
    product = w @ w.T if mode == "rows" else w.T @ w
    size = product.shape[0]
    off = product * (1.0 - np.eye(size))
    num_pairs = size * (size - 1.0) / 2.0
    return factor * 0.5 * np.sum(np.abs(off)) / num_pairs


@pytest.mark.parametrize("mode", ["columns", "rows"])
def test_keras2_orthogonal_regularizer(mode):
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


def keras3_orthogonal_regularizer(w, factor, mode):
    """Keras 3 OrthogonalRegularizer(factor, mode)(w), as keras/src/regularizers reads.

    keras.ops.normalize with its default epsilon 1e-7 on the norm:
    w * min(rsqrt(sum w^2), 1 / 1e-7), then the same mean over pairs as Keras 2.
    """
    axis = 1 if mode == "rows" else 0
    with np.errstate(divide="ignore"):
        inv = np.minimum(1 / np.sqrt(np.sum(w * w, axis=axis, keepdims=True)), 1e7)
    w = w * inv
    product = w @ w.T if mode == "rows" else w.T @ w
    size = product.shape[0]
    off = product * (1.0 - np.eye(size))
    return factor * 0.5 * np.sum(np.abs(off)) / (size * (size - 1.0) / 2.0)


def _keras_call(w, mode):
    kw = (
        dict(vector_axis=0, column_axis=1)
        if mode == "columns"
        else dict(vector_axis=1, column_axis=0)
    )
    n = w.shape[1] if mode == "columns" else w.shape[0]
    return kw, n


def _tiny_columns(shape):
    w = RNG.normal(size=shape)
    w[:, 1] *= 1e-6 / np.linalg.norm(w[:, 1])  # a column of norm 1e-6
    w[:, 3] *= 1.2e-7 / np.linalg.norm(w[:, 3])  # just above Keras 3's floor of 1e-7
    return w


@pytest.mark.parametrize("mode", ["columns", "rows"])
def test_keras3_formula_with_tiny_columns(mode):
    w = _tiny_columns((7, 5))
    if mode == "rows":
        w = w.T.copy()
    kw, n = _keras_call(w, mode)
    beta = 0.01 / (n * (n - 1))
    opts = dict(off_diagonal=True, normalize=True, normalize_eps=1e-14, **kw)
    with jax.enable_x64(True):
        value = jop.orthogonality_penalty(_x64(w), beta, **opts)
        keras2 = jop.orthogonality_penalty(_x64(w), beta, **(opts | {"normalize_eps": 1e-12}))
    np.testing.assert_allclose(float(value), keras3_orthogonal_regularizer(w, 0.01, mode), 1e-12)
    # the floor matters here: Keras 2's 1e-12 sees different cosines for these columns
    np.testing.assert_allclose(float(keras2), keras_orthogonal_regularizer(w, 0.01, mode), 1e-12)
    assert abs(float(keras2) - float(value)) > 1e-6 * float(value)


_KERAS_SCRIPT = r"""
import json, sys
import numpy as np
import jax, jax.numpy as jnp
import keras
out = {"version": keras.__version__, "backend": keras.backend.backend()}
for name, (w, mode, factor) in json.loads(sys.stdin.read()).items():
    reg = keras.regularizers.OrthogonalRegularizer(factor=factor, mode=mode)
    w = jnp.asarray(w, jnp.float64)
    value, grad = jax.value_and_grad(lambda a: reg(a))(w)
    out[name] = [float(value), np.asarray(grad).tolist()]
print(json.dumps(out))
"""


def _run_keras(cases):
    """Runs keras.regularizers.OrthogonalRegularizer (JAX backend, float64) in a subprocess.

    A subprocess, so KERAS_BACKEND, x64 and Keras' config file stay out of this one.
    """
    # Not imported here (see above); a test dependency (pyproject's `test` extra): its
    # absence is a broken environment, not a reason to skip.
    assert importlib.util.find_spec("keras") is not None, "keras is not installed (test extra)"
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, KERAS_BACKEND="jax", JAX_ENABLE_X64="1", KERAS_HOME=home)
        env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.run(
            [sys.executable, "-c", _KERAS_SCRIPT],
            input=json.dumps(cases),
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "jax" and int(out["version"].split(".")[0]) >= 3
    return {
        k: (v[0], np.asarray(v[1], dtype=float)) for k, v in out.items() if isinstance(v, list)
    }


def test_against_the_real_keras3_orthogonal_regularizer():
    factor = 0.25  # exact in float32, where Keras keeps `factor`
    tiny = _tiny_columns((7, 5))
    orthonormal = ref.signed_permutation(6, 4, np.random.default_rng(5)) * np.array([1, 3, 0.5, 2])
    zero = RNG.normal(size=(5, 3))
    zero[:, 2] = 0.0
    cases = {
        "tiny-columns": (tiny.tolist(), "columns", factor),
        "tiny-rows": (tiny.T.tolist(), "rows", factor),
        "orthonormal": (orthonormal.tolist(), "columns", factor),
        "zero-column": (zero.tolist(), "columns", factor),
    }
    keras = _run_keras(cases)
    with jax.enable_x64(True):
        for name, (w, mode, _) in cases.items():
            w = np.asarray(w)
            kw, n = _keras_call(w, mode)
            opts = dict(off_diagonal=True, normalize=True, normalize_eps=1e-14, **kw)
            # On JAX, Keras differentiates jnp.abs: sign(0) = +1 ("positive").
            sub = "positive" if name == "orthonormal" else "zero"
            beta = factor / (n * (n - 1))
            value = jop.orthogonality_penalty(_x64(w), beta, subgradient=sub, **opts)
            grad = jop.orthogonality_penalty_grad(_x64(w), beta, subgradient=sub, **opts)
            k_value, k_grad = keras[name]
            np.testing.assert_allclose(float(value), k_value, rtol=1e-12, atol=1e-300)
            if name == "zero-column":
                # Keras 3.15 on JAX: the gradient of its rsqrt at 0 is NaN; ours is finite.
                assert np.all(np.isnan(k_grad[:, 2])) and np.all(np.isfinite(np.asarray(grad)))
                np.testing.assert_allclose(np.asarray(grad)[:, :2], k_grad[:, :2], rtol=1e-10)
                continue
            np.testing.assert_allclose(
                np.asarray(grad), k_grad, rtol=1e-9, atol=1e-9 * np.abs(k_grad).max()
            )
            if name == "orthonormal":  # the kink really is exercised: "zero" gives 0
                assert np.abs(k_grad).max() > 0.01
                zero_grad = jop.orthogonality_penalty_grad(_x64(w), beta, **opts)
                np.testing.assert_array_equal(np.asarray(zero_grad), 0)


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


def biggan_default_ortho_grad(w, strength):
    """BigGAN's `default_ortho`: adds strength * 2 (W W^T - I) W, W = param.view(out, -1)."""
    w2 = w.reshape(w.shape[0], -1)
    g = 2 * (w2 @ w2.T - np.eye(w2.shape[0])) @ w2
    return strength * g.reshape(w.shape)


def test_biggan_default_ortho():
    w = RNG.normal(size=(4, 3, 3, 3))  # torch Conv2d weight (out, in, kh, kw)
    with jax.enable_x64(True):
        grad = jop.orthogonality_penalty_grad(
            _x64(w), 1e-4 / 2, vector_axis=(1, 2, 3), column_axis=0, norm="squared"
        )
    np.testing.assert_allclose(np.asarray(grad), biggan_default_ortho_grad(w, 1e-4), rtol=1e-12)


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
    """SO, Bansal et al. 2018, Sec. 3.1: lam * ||W^T W - I||_F^2, W = reshape(S*S*C, M)."""
    w = w.reshape(-1, w.shape[-1])
    return lam * np.sum(np.square(w.T @ w - np.eye(w.shape[1])))


def dso(w, lam):
    """DSO, Bansal et al. 2018, Sec. 3.2: lam * (||W^T W - I||_F^2 + ||W W^T - I||_F^2)."""
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


def srip_exact(w, lam, squared=True):
    """SRIP with the exact spectral norm: lam * sigma(W^T W - I)^2 (sigma^1 if not squared)."""
    w = w.reshape(-1, w.shape[-1])
    sigma = np.abs(np.linalg.eigvalsh(w.T @ w - np.eye(w.shape[1]))).max()
    return lam * sigma ** (2 if squared else 1)


def srip_authors(w, lam, b, squared=True):
    """The SRIP authors' code (Orthogonality-in-CNNs): one power iteration from b.

    v1 = X b, v2 = v1 / |v1|, v3 = X v2; PyTorch (Wide-Resnet/train_n.py) returns
    |v3|^2, Keras (ResNet/resnet_cifar_new.py) |v3|.
    """
    w = w.reshape(-1, w.shape[-1])
    x = w.T @ w - np.eye(w.shape[1])
    v1 = x @ b
    v3 = x @ (v1 / np.linalg.norm(v1))
    return lam * np.linalg.norm(v3) ** (2 if squared else 1)


@pytest.mark.parametrize("squared", [True, False])
def test_bansal_srip_exact(squared):
    w = RNG.normal(size=(2, 2, 3, 5)) * 0.4  # HWIO conv kernel
    norm = jop.spectral(squared=squared)
    with jax.enable_x64(True):
        value = jop.orthogonality_penalty(_x64(w), 0.1, vector_axis=(0, 1, 2), norm=norm)
        grad = jop.orthogonality_penalty_grad(_x64(w), 0.1, vector_axis=(0, 1, 2), norm=norm)
    np.testing.assert_allclose(float(value), srip_exact(w, 0.1, squared), rtol=1e-12)
    fd = _grad(lambda a: srip_exact(a, 0.1, squared), w)
    np.testing.assert_allclose(np.asarray(grad), fd, atol=1e-7)


@pytest.mark.parametrize("squared", [True, False])
def test_bansal_srip_authors_one_power_iteration(squared):
    w = RNG.normal(size=(3, 3, 2, 4)) * 0.4
    b = power_start(4)  # the authors draw b ~ U[0, 1)^n; this is the fixed one here
    norm = jop.spectral(squared=squared, iterations=1)
    with jax.enable_x64(True):
        value = jop.orthogonality_penalty(_x64(w), 0.1, vector_axis=(0, 1, 2), norm=norm)
        grad = jop.orthogonality_penalty_grad(_x64(w), 0.1, vector_axis=(0, 1, 2), norm=norm)
    np.testing.assert_allclose(float(value), srip_authors(w, 0.1, b, squared), rtol=1e-12)
    assert float(value) <= srip_exact(w, 0.1, squared)
    fd = _grad(lambda a: srip_authors(a, 0.1, b, squared), w)
    np.testing.assert_allclose(np.asarray(grad), fd, atol=1e-7)


def mutual_coherence(w, lam):
    """MC, Bansal et al. 2018, Sec. 3.3: lam * max_{j != k} |<w_j, w_k>| / (|w_j| |w_k|)."""
    w = w.reshape(-1, w.shape[-1])
    u = w / np.linalg.norm(w, axis=0)
    return lam * np.max(np.abs(u.T @ u - np.eye(w.shape[1])))


def test_bansal_mutual_coherence():
    w = RNG.normal(size=(2, 2, 3, 5))
    kw = dict(vector_axis=(0, 1, 2), norm="max", off_diagonal=True, normalize=True)
    with jax.enable_x64(True):
        value = jop.orthogonality_penalty(_x64(w), 0.1, **kw)
        grad = jop.orthogonality_penalty_grad(_x64(w), 0.1, **kw)
        err = jop.orthogonality_error(
            _x64(w), vector_axis=(0, 1, 2), off_diagonal=True, normalize=True
        )
    np.testing.assert_allclose(float(value), mutual_coherence(w, 0.1), rtol=1e-12)
    np.testing.assert_allclose(float(value), 0.1 * float(err), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(grad), _grad(lambda a: mutual_coherence(a, 0.1), w), atol=1e-7
    )


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


def brock_lasagne(w, beta):
    """The authors' ortho_res (Neural-Photo-Editor train_IAN.py) for one lasagne conv W.

    W is (O, I, H, W); y = batched_tensordot(W, W.dimshuffle(0, 1, 3, 2), [[1, 3], [1, 2]])
    is, per output channel o, the H x H Gram over (I, W); minus I, summed |.|.
    """
    y = np.einsum("oihw,oigw->ohg", w, w) - np.eye(w.shape[2])[None]
    return beta * np.abs(y).sum()


def test_brock_authors_lasagne_layout():
    w = RNG.normal(size=(3, 4, 3, 3)) * 0.5  # (O, I, H, W)
    kw = dict(vector_axis=(1, 3), column_axis=2)
    with jax.enable_x64(True):
        value = jop.orthogonality_penalty(_x64(w), 0.3, **kw)
        grad = jop.orthogonality_penalty_grad(_x64(w), 0.3, **kw)
    np.testing.assert_allclose(float(value), brock_lasagne(w, 0.3), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(grad), _grad(lambda a: brock_lasagne(a, 0.3), w), atol=1e-7
    )


# ------------------------------------------------------------------ mlpack


def mlpack_orthogonal_regularizer_grad(weight, factor):
    """mlpack's OrthogonalRegularizer::Evaluate: rows of `weight`, arma::sign(0) = 0."""
    grad = np.zeros_like(weight)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[0]):
            if i == j:
                s = np.sign(weight[i] @ weight[i] - 1)
                grad[i] += 2 * s * weight[i]
            else:
                s = np.sign(weight[i] @ weight[j])
                grad[i] += s * weight[j]
                grad[j] += s * weight[i]
    return factor * grad


def test_mlpack_orthogonal_regularizer():
    w = RNG.normal(size=(4, 6))
    kw = dict(vector_axis=1, column_axis=0)  # Phi = W^T: the rows are the vectors
    with jax.enable_x64(True):
        grad = jop.orthogonality_penalty_grad(_x64(w), 0.1, **kw)
    np.testing.assert_allclose(np.asarray(grad), mlpack_orthogonal_regularizer_grad(w, 0.1), 1e-12)
    # orthonormal rows: every sign is sign(0) = 0 in both
    q = ref.signed_permutation(6, 4, np.random.default_rng(2)).T
    grad = jop.orthogonality_penalty_grad(jnp.asarray(q, jnp.float32), 0.1, **kw)
    np.testing.assert_array_equal(np.asarray(grad), mlpack_orthogonal_regularizer_grad(q, 0.1))


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
