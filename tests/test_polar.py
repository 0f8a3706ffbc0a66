"""The polar factor of project_orthonormal: the series route, its fallbacks, its derivatives.

References, in float64 NumPy: the polar factor ``U V^T`` of ``np.linalg.svd``
(``reference.polar``), and its derivative written from the SVD,
``dQ = U (sym-free part) V^T + (I - QQ^T) dY V S^-1 V^T`` with the Sylvester solve in
the right singular basis, itself checked against central differences.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import test_util as jtu

import jax_orthopenalty as jop
from jax_orthopenalty import OrthoDims, _polar
from jax_orthopenalty._layout import make_layout

import reference as ref

HIGHEST = jax.lax.Precision.HIGHEST


def polar_jvp_ref(y: Any, dy: Any) -> np.ndarray:
    """The derivative of the polar factor of one (l, n) full-rank matrix, from its SVD."""
    y, dy = np.asarray(y, np.float64), np.asarray(dy, np.float64)
    u, s, vt = np.linalg.svd(y, full_matrices=False)
    v, q = vt.T, u @ vt
    k = q.T @ dy - dy.T @ q  # H Omega + Omega H = K, H = V S V^T
    omega = v @ ((v.T @ k @ v) / (s[:, None] + s[None, :])) @ v.T
    return q @ omega + (dy - q @ (q.T @ dy)) @ v @ np.diag(1 / s) @ v.T


def _project(y: jax.Array, dims: OrthoDims | None = None) -> jax.Array:
    dims = OrthoDims() if dims is None else dims
    layout = make_layout(y.ndim, dims.vector_axis, dims.column_axis)
    return _polar.polar(layout, y, precision=HIGHEST)


def _orthonormal(rng: np.random.Generator, l: int, n: int) -> np.ndarray:
    return np.linalg.qr(rng.normal(size=(l, n)))[0]


def _branch(y: np.ndarray, dtype: Any) -> int:
    """Which route the bound picks for one group: 0 ... 4 the degrees, 5 an exact route."""
    e = y.T @ y - np.eye(y.shape[1])
    bounds = _polar.radii(jnp.dtype(dtype), y.shape[0])
    if np.linalg.norm(e) <= bounds[0]:
        return 0
    rho = math.sqrt(np.linalg.norm(e @ e))
    return 1 + int(np.sum(~(rho <= np.asarray(bounds[1:]))))


# --------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("length", [1, 64, 784])
def test_radii_put_the_series_tail_at_the_grams_rounding_error(dtype: Any, length: int) -> None:
    # The tail's target: sqrt(l) u, u = eps / 2 the unit roundoff.
    target = float(np.finfo(dtype).eps) / 2 * math.sqrt(length)
    bounds = _polar.radii(jnp.dtype(dtype), length)
    assert list(bounds) == sorted(bounds) and bounds[-1] < 1
    for d, r in zip(_polar.DEGREES, bounds, strict=True):
        # The exact tail sum_{k > d} |c_k| r^k, summed far out: below the target.
        c = [abs(x) for x in _polar._coefficients(d + 400)]
        tail = sum(c[k] * r**k for k in range(d + 1, d + 400))
        assert tail <= target
        assert tail > target / 2  # and not far below: the radius is not timid
    # Longer vectors carry more rounding: never a smaller radius.
    assert all(a <= b for a, b in zip(_polar.radii(jnp.dtype(dtype), 1), bounds, strict=True))
    # The coefficients are binom(-1/2, k).
    np.testing.assert_allclose(
        _polar._coefficients(4), [1, -1 / 2, 3 / 8, -5 / 16, 35 / 128], rtol=1e-15
    )


# --------------------------------------------------------------------------- primal

# Distances from the manifold that land in every route (checked in the test).
NEAR = {
    jnp.float32: [0.0, 1e-5, 5e-4, 6e-3, 2.5e-2, 0.035, 0.05, 0.3],
    jnp.float64: [0.0, 1e-9, 1e-7, 3e-5, 1e-3, 7e-3, 0.1],
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_every_route_is_the_float64_polar_factor(dtype: Any) -> None:
    tol = {jnp.float32: 2e-5, jnp.float64: 1e-12}[dtype]
    rng = np.random.default_rng(0)
    seen = set()
    with jax.enable_x64(dtype == jnp.float64):
        for l, n in ((64, 16), (24, 24)):
            q = _orthonormal(rng, l, n)
            for s in NEAR[dtype]:
                y = q + s * rng.normal(size=q.shape) / math.sqrt(l)
                seen.add(_branch(y, dtype))
                got = jax.jit(_project)(jnp.asarray(y, dtype))
                assert got.dtype == dtype
                np.testing.assert_allclose(got, ref.polar(y), rtol=0, atol=tol)
            # Far: a Gaussian start (eigh of the Gram for the tall one, SVD for the square).
            y = rng.normal(size=(l, n))
            seen.add(_branch(y, dtype))
            np.testing.assert_allclose(_project(jnp.asarray(y, dtype)), ref.polar(y), atol=tol)
    assert seen == set(range(6)), seen


def test_groups_of_a_conv_kernel_and_the_default_layout() -> None:
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        for shape, dims in (((3, 3, 4, 5, 16), OrthoDims((0, 1, 2), 3)), ((9, 6, 4), OrthoDims())):
            y = rng.normal(size=shape)
            ys, back = ref._canonical(y, dims.vector_axis, dims.column_axis)
            qs = np.stack([ref.polar(g) for g in ys])
            # Near: one step from those polar factors.
            step = back(qs) + 1e-3 * rng.normal(size=shape)
            want = back(
                np.stack(
                    [
                        ref.polar(g)
                        for g in ref._canonical(step, dims.vector_axis, dims.column_axis)[0]
                    ]
                )
            )
            np.testing.assert_allclose(_project(jnp.asarray(step), dims), want, atol=1e-13)
            np.testing.assert_allclose(_project(jnp.asarray(y), dims), back(qs), atol=1e-12)


def test_nan_and_inf_stay_in_their_group() -> None:
    x = np.stack([np.eye(4, 2), np.eye(4, 2)], axis=1)  # (4, 2, 2), exactly orthonormal
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[0, 1, 1] = bad
        got = np.asarray(_project(jnp.asarray(y, jnp.float32)))
        assert np.isnan(got[:, 1]).all()
        np.testing.assert_allclose(got[:, 0], np.eye(4, 2), atol=1e-7)


# --------------------------------------------------------------------------- derivatives


def _points(rng: np.random.Generator) -> dict[str, np.ndarray]:
    q = _orthonormal(rng, 7, 4)
    return {
        "identity": np.eye(7, 4),  # exactly orthonormal, C = I exactly
        "orthonormal": q,
        "near": q + 1e-3 * rng.normal(size=q.shape),
        "series-edge": q + 0.05 * rng.normal(size=q.shape),
        "repeated": 2.0 * q,  # every singular value 2: far, repeated
        "square-repeated": np.diag([3.0, 3.0, 1.0, 1.0]),
        "random": rng.normal(size=(7, 4)),
    }


@pytest.mark.parametrize("name", list(_points(np.random.default_rng(2))))
def test_jvp_and_grad_are_the_derivative_of_the_polar_factor(name: str) -> None:
    rng = np.random.default_rng(2)
    y = _points(rng)[name]
    dy = rng.normal(size=y.shape)
    a = rng.normal(size=y.shape)
    want = polar_jvp_ref(y, dy)
    # The reference against central differences of the float64 SVD polar factor.
    h = 1e-6
    fd = (ref.polar(y + h * dy) - ref.polar(y - h * dy)) / (2 * h)
    np.testing.assert_allclose(want, fd, atol=1e-7)
    with jax.enable_x64(True):
        yj, dyj = jnp.asarray(y), jnp.asarray(dy)
        _, got = jax.jvp(_project, (yj,), (dyj,))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        g = jax.grad(lambda z: jnp.sum(jnp.asarray(a) * _project(z)))(yj)
        np.testing.assert_allclose(jnp.vdot(g, dyj), np.sum(a * want), rtol=1e-11)
    # float32: the same derivative to float32 precision, never NaN.
    _, got32 = jax.jvp(_project, (jnp.asarray(y, jnp.float32),), (jnp.asarray(dy, jnp.float32),))
    assert bool(jnp.isfinite(got32).all())
    np.testing.assert_allclose(got32, want, rtol=0, atol=5e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", ["identity", "near", "repeated", "square-repeated"])
def test_second_order_is_exact_at_repeated_singular_values(name: str) -> None:
    rng = np.random.default_rng(3)
    y = _points(rng)[name]
    dy, a = rng.normal(size=y.shape), rng.normal(size=y.shape)
    with jax.enable_x64(True):
        yj, dyj, aj = jnp.asarray(y), jnp.asarray(dy), jnp.asarray(a)
        project = jax.jit(_project)  # one compile per derivative, not one per op

        @jax.jit
        def grad(z: jax.Array) -> jax.Array:
            return jax.grad(lambda w: jnp.sum(aj * jnp.sin(project(w))))(z)

        _, hvp = jax.jvp(grad, (yj,), (dyj,))  # forward over reverse
        h = 1e-5
        fd = (grad(yj + h * dyj) - grad(yj - h * dyj)) / (2 * h)
        assert bool(jnp.isfinite(hvp).all())
        np.testing.assert_allclose(hvp, fd, atol=1e-7)
        # Reverse over forward, and the second directional derivative by jvp of jvp.
        # Reverse over forward equals forward over reverse (for a linear loss).
        jac_vec = jax.grad(lambda w: jnp.vdot(aj, jax.jvp(project, (w,), (dyj,))[1]))(yj)
        linear = jax.grad(lambda w: jnp.vdot(aj, project(w)))
        np.testing.assert_allclose(jac_vec, jax.jvp(linear, (yj,), (dyj,))[1], atol=1e-10)
        d2 = jax.jvp(lambda w: jax.jvp(project, (w,), (dyj,))[1], (yj,), (dyj,))[1]
        fd2 = (ref.polar(y + h * dy) - 2 * ref.polar(y) + ref.polar(y - h * dy)) / h**2
        np.testing.assert_allclose(d2, fd2, atol=2e-4)
        jtu.check_grads(project, (yj,), order=2, modes=["fwd", "rev"], atol=1e-6)


def test_grad_through_a_projected_step_at_an_orthonormal_point() -> None:
    # The failure of 0.2.0: at exactly orthonormal params and a zero step, jax.grad
    # through project_orthonormal was NaN at the identity and wrong (-0.18 for
    # -0.91) at a random orthonormal matrix: autodiff of eigh divides by the
    # eigenvalue gaps of C = I.
    rng = np.random.default_rng(0)
    tx = jop.project_orthonormal()
    with jax.enable_x64(True):
        for w in (jnp.eye(6, 4), jnp.asarray(_orthonormal(rng, 6, 4))):
            a, d = (jnp.asarray(rng.normal(size=(6, 4))) for _ in range(2))

            def loss(u: jax.Array, w: jax.Array, a: jax.Array = a) -> jax.Array:
                return jnp.sum(a * jnp.sin(w + tx.update(u, tx.init(w), w)[0]))

            u = jnp.zeros((6, 4))
            h = 1e-6
            fd = (loss(u + h * d, w) - loss(u - h * d, w)) / (2 * h)
            np.testing.assert_allclose(jnp.vdot(jax.grad(loss)(u, w), d), fd, rtol=1e-8)
            # and through the params too (meta-learning differentiates both)
            gw = jax.grad(loss, argnums=1)(u, w)
            fdw = (loss(u, w + h * d) - loss(u, w - h * d)) / (2 * h)
            np.testing.assert_allclose(jnp.vdot(gw, d), fdw, rtol=1e-8)


def test_derivatives_under_jit_vmap_and_a_training_loop() -> None:
    # Differentiating a short projected training run with respect to the learning rate.
    rng = np.random.default_rng(4)
    x0 = jnp.asarray(_orthonormal(rng, 8, 3), jnp.float32)
    target = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)

    def run(lr: jax.Array) -> jax.Array:
        tx = optax.chain(optax.sgd(lr), jop.project_orthonormal())

        def step(carry: Any, _: Any) -> tuple[Any, None]:
            x, s = carry
            u, s = tx.update(jax.grad(lambda x: jnp.sum((x - target) ** 2))(x), s, x)
            return (optax.apply_updates(x, u), s), None

        (x, _), _ = jax.lax.scan(step, (x0, tx.init(x0)), None, length=5)
        return jnp.sum((x - target) ** 2)

    g = jax.jit(jax.grad(run))(jnp.float32(0.01))
    h = 1e-3
    fd = (run(jnp.float32(0.01 + h)) - run(jnp.float32(0.01 - h))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=2e-2)
    # vmap over stacked groups: the same as the groups of one call.
    ys = jnp.asarray(
        np.stack([_orthonormal(rng, 8, 3) + 1e-3 * rng.normal(size=(8, 3)) for _ in range(4)])
    )
    dys = jnp.asarray(rng.normal(size=ys.shape), jnp.float32)
    batched = jax.vmap(lambda y, d: jax.jvp(_project, (y,), (d,)))(ys, dys)
    for i in range(4):
        np.testing.assert_allclose(batched[0][i], ref.polar(ys[i]), atol=2e-6)
        np.testing.assert_allclose(batched[1][i], polar_jvp_ref(ys[i], dys[i]), atol=5e-5)
