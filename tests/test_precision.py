"""Why precision=HIGHEST: near orthonormality a TF32 Gram matrix gets the signs wrong.

Near an orthonormal Phi the residual X = Phi^T Phi - I is a small difference, here
about 1e-4, and the L1 gradient depends only on its signs. TF32 (the default matmul
precision of float32 on recent NVIDIA GPUs) rounds the inputs of a product to 10
mantissa bits, a relative error of ~5e-4, larger than X itself. On CPU the rounding
is emulated with ``lax.reduce_precision``; on a GPU the real default precision is
compared too. The reference is float64 NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_orthopenalty as jop


def _nearly_orthonormal(l=64, m=8, n=32, noise=1e-4, seed=0):
    rng = np.random.default_rng(seed)
    q = np.stack([np.linalg.qr(rng.normal(size=(l, n)))[0] for _ in range(m)], axis=1)
    return (q + noise * rng.normal(size=q.shape)).astype(np.float32)


def _reference_signs(phi):
    p = phi.astype(np.float64)
    x = np.einsum("lmj,lmk->mjk", p, p) - np.eye(p.shape[-1])
    return np.sign(x), np.abs(x)


def _gram_signs(phi, precision):
    p = jnp.asarray(phi)
    x = jnp.einsum("lmj,lmk->mjk", p, p, precision=precision) - jnp.eye(p.shape[-1])[None]
    return np.sign(np.asarray(x))


def _decided(abs_x):
    # Entries whose sign float32 with a float32 accumulation can decide: well above
    # l * eps_f32 (a few 1e-6 here); the rest are the kink's rounding band.
    return abs_x > 1e-5


def _signs_used_by(grad, phi, beta):
    """The sign matrix G behind grad = 2 beta Phi_i G_i: Phi_i^T Phi_i = I to 1e-4, so
    Phi_i^T grad / (2 beta) is G to well within 0.5 and rounds back to it exactly."""
    g = np.einsum("lmj,lmk->mjk", phi.astype(np.float64), np.asarray(grad, np.float64))
    return np.rint(g / (2 * beta))


def test_library_default_gets_every_decided_sign_right():
    phi = _nearly_orthonormal()
    want, abs_x = _reference_signs(phi)
    ok = _decided(abs_x)
    assert ok.mean() > 0.9  # the test is about real signs, not the rounding band
    used = _signs_used_by(jop.orthogonality_penalty_grad(phi, 0.5), phi, 0.5)
    np.testing.assert_array_equal(used[ok], want[ok])
    used = _signs_used_by(jax.grad(jop.orthogonality_penalty)(jnp.asarray(phi), 0.5), phi, 0.5)
    np.testing.assert_array_equal(used[ok], want[ok])


def test_tf32_style_rounding_flips_signs_that_highest_keeps():
    phi = _nearly_orthonormal()
    want, abs_x = _reference_signs(phi)
    ok = _decided(abs_x)
    tf32 = jax.lax.reduce_precision(jnp.asarray(phi), exponent_bits=8, mantissa_bits=10)
    flips_tf32 = ((_gram_signs(np.asarray(tf32), "highest") != want) & ok).sum()
    flips_highest = ((_gram_signs(phi, "highest") != want) & ok).sum()
    assert flips_highest == 0
    assert flips_tf32 > 0.05 * ok.sum()  # a large share of the decided signs


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a GPU: only its default-precision matmuls round to TF32 (the CPU's are "
    "exact float32; the test above emulates TF32 with lax.reduce_precision)",
)
def test_on_gpu_default_precision_flips_signs_and_the_library_does_not():
    phi = _nearly_orthonormal()
    want, abs_x = _reference_signs(phi)
    ok = _decided(abs_x)
    assert ((_gram_signs(phi, "highest") != want) & ok).sum() == 0
    assert ((_gram_signs(phi, "default") != want) & ok).sum() > 0
    used = _signs_used_by(jop.orthogonality_penalty_grad(phi, 0.5), phi, 0.5)
    np.testing.assert_array_equal(used[ok], want[ok])
