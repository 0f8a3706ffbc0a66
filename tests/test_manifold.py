"""landing and project_orthonormal, against the float64 NumPy reference.

``reference.py`` takes each group to an (l, n) matrix by moving axes and writes the
landing field, the safe step and the polar factor from their definitions with plain
``@`` and ``np.linalg.svd`` (``ref.landing``, ``ref.polar``). The file is also a
script: the sharding test runs it in a subprocess with 8 host devices, as
``test_sharding.py`` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_orthopenalty as jop
from jax_orthopenalty import OrthoDims

import reference as ref
from host_devices import print_records, run_as_script

# --------------------------------------------------------------------------- helpers


def _axes(dims: OrthoDims) -> dict[str, Any]:
    """A layout as the reference's keyword arguments."""
    return {"vector_axis": dims.vector_axis, "column_axis": dims.column_axis}


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape) / np.sqrt(shape[0])


def _same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _update(tx: Any, updates: Any, params: Any) -> Any:
    return tx.update(updates, tx.init(params), params)[0]


def _zeros(tree: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, tree)


LAYOUTS = {
    "lmn": ((7, 3, 4), OrthoDims()),
    "flax_dense_in_out": ((6, 4), OrthoDims()),
    "conv_hwio": ((3, 3, 2, 5), OrthoDims(vector_axis=(0, 1, 2), column_axis=3)),
    "equinox_linear_out_in": ((4, 7), OrthoDims(vector_axis=1, column_axis=0)),
    "scan_stacked_layers_in_out": ((3, 6, 4), OrthoDims(vector_axis=1, column_axis=2)),
}


# --------------------------------------------------------------------------- landing


@pytest.mark.parametrize("name", LAYOUTS)
def test_landing_is_the_formula_on_random_groups(name: str) -> None:
    shape, dims = LAYOUTS[name]
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(_rand(rng, *shape)), "b": jnp.asarray(rng.normal(size=4))}
        grads = {"w": jnp.asarray(rng.normal(size=shape)), "b": jnp.asarray(rng.normal(size=4))}
        tx = jop.landing(0.7, dimension_numbers={"w": dims, "b": None})
        new = _update(tx, grads, params)
        assert new["w"].dtype == jnp.float64
        expected = ref.landing(params["w"], grads["w"], 0.7, **_axes(dims))
        np.testing.assert_allclose(new["w"], expected, rtol=1e-10, atol=1e-12)
        assert _same_bits(new["b"], grads["b"])


def test_normal_term_is_the_squared_penalty_gradient_and_tangent_term_is_tangent() -> None:
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(_rand(rng, 9, 4, 3))
        normal = _update(jop.landing(0.6), jnp.zeros_like(x), x)
        pen = jop.orthogonality_penalty_grad(x, 0.6 / 4, norm="squared")
        np.testing.assert_allclose(normal, pen, rtol=1e-12, atol=1e-14)
        # At orthonormal groups only the tangent term is left: X_i^T Lambda_i is skew.
        q = jnp.asarray(np.linalg.qr(rng.normal(size=(4, 9, 3)))[0].transpose(1, 0, 2))
        field = _update(jop.landing(0.6), jnp.asarray(rng.normal(size=q.shape)), q)
        m = jnp.einsum("lia,lib->iab", q, field)
        np.testing.assert_allclose(m, -jnp.swapaxes(m, 1, 2), atol=1e-12)


def _pca(seed: int = 0) -> tuple[np.ndarray, float, np.ndarray]:
    """A 24 x 24 covariance with eigenvalues 1 ... 0.1, the optimum of
    -1/2 tr(X^T A X) over 24 x 5 orthonormal X, and a non-orthonormal start."""
    rng = np.random.default_rng(seed)
    d, k = 24, 5
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    evals = np.linspace(1.0, 0.1, d)
    a = (q * evals) @ q.T
    x0 = 1.3 * rng.normal(size=(d, k)) / np.sqrt(d)
    return a, -0.5 * float(evals[:k].sum()), x0


def _run(tx: Any, a: np.ndarray, x0: np.ndarray, steps: int) -> tuple[jax.Array, jax.Array]:
    aj = jnp.asarray(a, jnp.float32)

    def loss(x: jax.Array) -> jax.Array:
        return -0.5 * jnp.trace(x.T @ aj @ x)

    @jax.jit
    def run(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        def step(carry: Any, _: Any) -> tuple[Any, jax.Array]:
            x, s = carry
            u, s = tx.update(jax.grad(loss)(x), s, x)
            x = optax.apply_updates(x, u)
            return (x, s), jop.orthogonality_error(x)

        (x, _), errors = jax.lax.scan(step, (x, tx.init(x)), None, length=steps)
        return loss(x), errors

    return run(jnp.asarray(x0, jnp.float32))


def test_acceptance_landing_sgd_solves_pca() -> None:
    a, optimum, x0 = _pca()
    assert float(jop.orthogonality_error(jnp.asarray(x0))) > 0.3  # a real start off it
    value, errors = _run(optax.chain(jop.landing(lam=1.0), optax.sgd(0.05)), a, x0, 3000)
    assert float(errors[-1]) < 1e-4
    assert abs(float(value) - optimum) <= 1e-3 * abs(optimum)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.chain(
            optax.trace(0.9), jop.landing(1.0), optax.scale_by_learning_rate(0.01)
        ),
        lambda: optax.chain(jop.landing(1.0), optax.sgd(0.01, momentum=0.9)),
        lambda: optax.chain(jop.landing(1.0, safe_step=0.5, learning_rate=0.05), optax.sgd(0.05)),
    ],
    ids=["momentum-before", "momentum-after", "safe-step"],
)
def test_documented_chains_solve_pca(make: Callable[[], Any]) -> None:
    a, optimum, x0 = _pca(1)
    value, errors = _run(make(), a, x0, 2000)
    assert float(errors[-1]) < 1e-4
    assert abs(float(value) - optimum) <= 1e-3 * abs(optimum)


def _resnet_landing_run(make: Callable[[Any, float], Any], steps: int) -> tuple[Any, Any]:
    """A small flax linen ResNet (conv stem, a strided block with a 1x1 projection,
    BatchNorm, a dense head) trained by ``make(dims, lr)`` at flax imagenet's
    lr = 0.1 with Nesterov momentum 0.9, from orthonormal kernels (per output
    channel, by ``dimension_numbers_for``). Large early gradients: the loss is
    scaled by 30. Returns the losses and, per step, the largest
    ``||X^T X - I||_F`` over the groups."""
    import flax.linen as nn  # a test dependency (pyproject's `test` extra)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            y = nn.Conv(16, (3, 3), (2, 2), use_bias=False)(x)
            y = nn.relu(nn.BatchNorm(use_running_average=False)(y))
            y = nn.BatchNorm(use_running_average=False)(nn.Conv(16, (3, 3), use_bias=False)(y))
            r = nn.BatchNorm(use_running_average=False)(nn.Conv(16, (1, 1), (2, 2))(x))
            return nn.relu(y + r)

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Conv(8, (3, 3), use_bias=False)(x)
            x = Block()(nn.relu(nn.BatchNorm(use_running_average=False)(x)))
            return nn.Dense(10)(x.mean((1, 2)))

    model, rng = ResNet(), np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 12, 12, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=16))
    variables = jax.jit(model.init)(jax.random.key(0), x)  # jitted: op by op is slow
    dims = jop.dimension_numbers_for(model, variables["params"], x)
    start = jop.project_orthonormal(dimension_numbers=dims)
    params = jax.jit(lambda p: optax.apply_updates(p, _update(start, _zeros(p), p)))(
        variables["params"]
    )
    tx = make(dims, 0.1)

    def loss(p: Any, stats: Any) -> Any:
        out, new = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return 30 * ce, new["batch_stats"]

    def step(carry: Any, _: Any) -> Any:
        p, stats, state = carry
        (value, stats), g = jax.value_and_grad(loss, has_aux=True)(p, stats)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        return (p, stats, state), (value / 30, p)

    carry = (params, variables["batch_stats"], tx.init(params))
    _, (losses, path) = jax.jit(lambda c: jax.lax.scan(step, c, length=steps))(carry)
    # ||X^T X - I||_F of every group after every step, in float64 NumPy.
    flat = jax.tree.leaves(dims, is_leaf=lambda z: z is None or isinstance(z, OrthoDims))
    distances = np.zeros(steps)
    for leaf, d in zip(jax.tree.leaves(path), flat, strict=True):
        if d is None:
            continue
        for t in range(steps):
            g, _ = ref._canonical(np.asarray(leaf[t]), d.vector_axis, d.column_axis)
            c = np.swapaxes(g, -1, -2) @ g - np.eye(g.shape[-1])
            distances[t] = max(distances[t], np.sqrt(np.sum(c * c, axis=(-2, -1))).max())
    return np.asarray(losses), distances


def test_landing_with_nesterov_momentum_holds_on_a_resnet() -> None:
    # docs: momentum first, then landing with the safe step, then the step size: every
    # step is a landing field at the current point, certified to stay in the band.
    recipe = lambda dims, lr: optax.chain(  # noqa: E731
        optax.trace(0.9, nesterov=True),
        jop.landing(1.0, dimension_numbers=dims, safe_step=0.5, learning_rate=lr),
        optax.scale_by_learning_rate(lr),
    )
    losses, distances = _resnet_landing_run(recipe, 12)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
    assert np.all(distances <= 0.5), distances
    # flax imagenet's optimizer after landing: momentum sums old fields and multiplies
    # the step by up to 1 / (1 - 0.9); no step is certified, and it leaves the band.
    naive = lambda dims, lr: optax.chain(  # noqa: E731
        jop.landing(1.0, dimension_numbers=dims), optax.sgd(lr, momentum=0.9, nesterov=True)
    )
    _, distances = _resnet_landing_run(naive, 12)
    assert not np.all(distances <= 0.5), distances


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
def test_adam_chain_reaches_the_optimum_with_the_tangent_gradient_first() -> None:
    # Adam's steps do not shrink at the optimum: the distance to the manifold is of
    # the order of the step size, so it lands as the learning rate decays. Adam on
    # the full Euclidean gradient moves the fixed point; on the tangent part it does not.
    a, optimum, x0 = _pca(2)
    lr = optax.cosine_decay_schedule(1e-2, 2000)
    tail = (optax.scale_by_adam(), jop.landing(1.0), optax.scale_by_learning_rate(lr))
    value, errors = _run(optax.chain(jop.landing(0.0), *tail), a, x0, 2000)
    assert float(errors[-1]) < 1e-4
    assert abs(float(value) - optimum) <= 1e-4 * abs(optimum)
    biased, _ = _run(optax.chain(*tail), a, x0, 2000)
    assert float(biased) - optimum > 1e-2 * abs(optimum)


# --------------------------------------------------------------------------- safe step


def test_safe_step_scales_by_the_papers_bound() -> None:
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        q = np.linalg.qr(rng.normal(size=(4, 10, 3)))[0].transpose(1, 0, 2)
        x = jnp.asarray(q + 0.03 * rng.normal(size=q.shape))  # d ~ 0.1 per group
        g = jnp.asarray(rng.normal(size=q.shape) * np.array([0.1, 1.0, 10.0, 100.0])[:, None])
        tx = jop.landing(0.8, safe_step=0.5, learning_rate=0.2)
        got = _update(tx, g, x)
        expected = ref.landing(x, g, 0.8, safe_step=0.5, learning_rate=0.2)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
        plain = ref.landing(x, g, 0.8)
        # The small-gradient group keeps its step; the large ones are clipped.
        np.testing.assert_allclose(got[:, 0], plain[:, 0], rtol=1e-12)
        assert np.linalg.norm(got[:, 3]) < 0.1 * np.linalg.norm(plain[:, 3])


def test_safe_step_keeps_the_iterates_in_the_band() -> None:
    eps, lr = 0.3, 0.5
    rng = np.random.default_rng(4)
    x = jnp.asarray(np.linalg.qr(rng.normal(size=(12, 4)))[0], jnp.float32)
    grads = jnp.asarray(5 * rng.normal(size=(200, 12, 4)), jnp.float32)

    def distances(tx: Any) -> np.ndarray:
        def step(carry: Any, g: jax.Array) -> tuple[Any, jax.Array]:
            x, s = carry
            u, s = tx.update(g, s, x)
            x = optax.apply_updates(x, u)
            return (x, s), jnp.linalg.norm(x.T @ x - jnp.eye(4))

        return np.asarray(jax.lax.scan(step, (x, tx.init(x)), grads)[1])

    safe = distances(optax.chain(jop.landing(1.0, safe_step=eps, learning_rate=lr), optax.sgd(lr)))
    plain = distances(optax.chain(jop.landing(1.0), optax.sgd(lr)))
    assert safe.max() <= eps
    assert not np.all(plain <= eps)  # without it the same gradients leave the band


def test_safe_step_leaves_groups_outside_the_band_unclipped() -> None:
    x = {"w": 2 * jnp.eye(3, 2)}  # d = 3 * sqrt(2) > eps
    g = {"w": jnp.ones((3, 2))}
    clipped = _update(jop.landing(1.0, safe_step=0.1, learning_rate=10.0), g, x)
    np.testing.assert_allclose(clipped["w"], _update(jop.landing(1.0), g, x)["w"], rtol=1e-6)


# --------------------------------------------------------------------------- projection


@pytest.mark.parametrize("name", LAYOUTS)
def test_acceptance_sgd_then_project_lands_on_the_polar_factor(name: str) -> None:
    shape, dims = LAYOUTS[name]
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(_rand(rng, *shape)), "b": jnp.asarray(rng.normal(size=3))}
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
        opt = optax.chain(
            optax.sgd(0.1), jop.project_orthonormal(dimension_numbers={"w": dims, "b": None})
        )
        new = optax.apply_updates(params, _update(opt, grads, params))
        target = ref.polar(np.asarray(params["w"]) - 0.1 * np.asarray(grads["w"]), **_axes(dims))
        np.testing.assert_allclose(new["w"], target, rtol=0, atol=1e-12)
        err = jop.orthogonality_error(
            new["w"], vector_axis=dims.vector_axis, column_axis=dims.column_axis
        )
        assert float(np.max(err)) < 1e-13
        np.testing.assert_allclose(new["b"], params["b"] - 0.1 * grads["b"], rtol=1e-15)
    # float32: orthonormal to float32 rounding.
    p32 = {"w": jnp.asarray(_rand(rng, *shape), jnp.float32), "b": jnp.ones(3)}
    new32 = optax.apply_updates(p32, _update(opt, jax.tree.map(jnp.cos, p32), p32))
    err = jop.orthogonality_error(
        new32["w"], vector_axis=dims.vector_axis, column_axis=dims.column_axis
    )
    assert float(np.max(err)) < 2e-6


@pytest.mark.parametrize("far", [False, True], ids=["all-near:gram", "one-far:svd"])
def test_projection_near_the_manifold_takes_the_gram_route_exactly(far: bool) -> None:
    # After a small step from orthonormal groups, every ||C_i - I||_F <= 1/2: the polar
    # factor comes from eigh of the Gram matrix. One group far off sends all to the SVD.
    from jax_orthopenalty import _manifold

    rng = np.random.default_rng(10)
    with jax.enable_x64(True):
        q = np.linalg.qr(rng.normal(size=(5, 9, 4)))[0].transpose(1, 0, 2)  # (9, 5, 4)
        step = 0.01 * rng.normal(size=q.shape)
        if far:
            step[:, 2] *= 100
        x, u = jnp.asarray(q), jnp.asarray(step)
        c = np.einsum("lia,lib->iab", q + step, q + step)
        near = np.linalg.norm(c - np.eye(4), axis=(1, 2)) <= _manifold.NEAR_ORTHONORMAL
        assert near.all() != far
        new = x + _update(jop.project_orthonormal(), u, x)
        np.testing.assert_allclose(new, ref.polar(q + step), rtol=0, atol=1e-13)


def test_acceptance_rows_of_out_in_leaves_and_skipped_leaves() -> None:
    # equinox (out, in) weights with OrthoDims(vector_axis=1, column_axis=0): the rows
    # become orthonormal; a masked-out leaf and a None-dims leaf are untouched.
    rng = np.random.default_rng(6)
    params = {
        "enc": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32),
        "dec": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
        "act": None,
    }
    grads = jax.tree.map(jnp.zeros_like, params)
    rows = OrthoDims(vector_axis=1, column_axis=0)
    for tx in (
        jop.project_orthonormal(
            mask={"enc": True, "dec": False, "head": True, "act": True},
            dimension_numbers={"enc": rows, "dec": rows, "head": None, "act": None},
        ),
        jop.landing(
            1.0,
            mask={"enc": True, "dec": False, "head": False, "act": False},
            dimension_numbers=rows,
        ),
    ):
        u = _update(tx, grads, params)
        assert u["act"] is None
        assert _same_bits(u["dec"], grads["dec"])
        assert _same_bits(u["head"], grads["head"])
    u = _update(
        jop.project_orthonormal(
            dimension_numbers={"enc": rows, "dec": None, "head": None, "act": None}
        ),
        grads,
        params,
    )
    enc = np.asarray(params["enc"] + u["enc"], np.float64)
    np.testing.assert_allclose(enc @ enc.T, np.eye(3), atol=2e-6)
    np.testing.assert_allclose(enc, ref.polar(params["enc"], **_axes(rows)), atol=2e-6)


def test_rank_deficient_groups_become_a_nearest_orthonormal_matrix() -> None:
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        y = np.stack([rng.normal(size=(6, 1)) @ rng.normal(size=(1, 3)), np.zeros((6, 3))], 1)
        params = jnp.asarray(y)
        # The zero group has no unique nearest orthonormal matrix: the transform says so.
        with pytest.warns(UserWarning, match=r"has 1 all-zero group: the nearest orthonormal"):
            u = _update(jop.project_orthonormal(), jnp.zeros_like(params), params)
        q = np.asarray(params + u)
        for i in range(2):
            qi, yi = q[:, i], y[:, i]
            np.testing.assert_allclose(qi.T @ qi, np.eye(3), atol=1e-12)
            # Nearest: |Y - Q|^2 = |Y|^2 + n - 2 sum(sigma), the minimum over all Q.
            best = (yi**2).sum() + 3 - 2 * np.linalg.svd(yi, compute_uv=False).sum()
            np.testing.assert_allclose(((yi - qi) ** 2).sum(), best, rtol=1e-10, atol=1e-12)


def test_nan_propagates() -> None:
    x = jnp.stack([jnp.eye(4, 2), jnp.eye(4, 2).at[0, 1].set(jnp.nan)], axis=1)  # (4, 2, 2)
    for tx in (
        jop.landing(1.0),
        jop.landing(1.0, safe_step=0.5, learning_rate=0.1),
        jop.project_orthonormal(),
    ):
        u = _update(tx, jnp.ones_like(x), x)
        assert np.isnan(u[:, 1]).all()  # the whole NaN group
        assert np.isfinite(u[:, 0]).all()  # and only it
    u = _update(jop.landing(1.0), jnp.ones_like(x).at[0, 0, 0].set(jnp.nan), jnp.ones_like(x))
    assert np.isnan(u[:, 0]).any()


# --------------------------------------------------------------------------- errors


TRANSFORMS: dict[str, Callable[..., Any]] = {
    "landing": lambda **kw: jop.landing(1.0, **kw),
    "project": lambda **kw: jop.project_orthonormal(**kw),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_wide_groups_raise_naming_the_leaf(name: str) -> None:
    params = {"net": {"wide": jnp.ones((3, 5))}}
    tx = TRANSFORMS[name]()
    with pytest.raises(ValueError, match=r"params leaf \['net'\]\['wide'\]: .*n > l"):
        _update(tx, params, params)
    # Laid out on its rows, the same leaf is fine.
    tx = TRANSFORMS[name](dimension_numbers=OrthoDims(vector_axis=1, column_axis=0))
    assert _update(tx, params, params)["net"]["wide"].shape == (3, 5)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_params_none_raises(name: str) -> None:
    params = {"w": jnp.eye(3)}
    for tx in (TRANSFORMS[name](), TRANSFORMS[name](mask={"w": True})):
        with pytest.raises(ValueError, match="params"):
            tx.update(params, tx.init(params))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_bad_leaves_raise_naming_the_leaf(name: str) -> None:
    params = {"w": jnp.eye(3)}
    with pytest.raises(ValueError, match=r"params leaf \['w'\]: `updates` has shape"):
        _update(TRANSFORMS[name](), {"w": jnp.ones((3, 2))}, params)
    with pytest.raises(ValueError, match=r"params leaf \['w'\]: `vector_axis`=5"):
        _update(TRANSFORMS[name](dimension_numbers=OrthoDims(5, 0)), params, params)
    with pytest.raises(ValueError, match="`mask` must be"):
        TRANSFORMS[name](mask=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lam": -1.0}, ValueError, "`lam` must be finite and >= 0"),
        ({"lam": jnp.ones(2)}, ValueError, "must be a scalar"),
        ({"safe_step": 0.5}, ValueError, "`safe_step` and `learning_rate` go together"),
        ({"learning_rate": 0.1}, ValueError, "`safe_step` and `learning_rate` go together"),
        ({"safe_step": 0.0, "learning_rate": 0.1}, ValueError, "`safe_step` must be > 0"),
    ],
)
def test_bad_landing_options_raise_at_construction(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        jop.landing(**kwargs)


# --------------------------------------------------------------------------- optax protocol


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
def test_schedule_lam_follows_the_step_count() -> None:
    x = {"w": 2 * jnp.eye(2)}
    zeros = {"w": jnp.zeros((2, 2))}
    tx = jop.landing(optax.piecewise_constant_schedule(1.0, {1: 3.0}))
    state = tx.init(x)
    first, state = tx.update(zeros, state, x)
    second, state = tx.update(zeros, state, x)
    np.testing.assert_allclose(first["w"], 6 * np.eye(2))  # lam X (X^T X - I), lam = 1
    np.testing.assert_allclose(second["w"], 18 * np.eye(2))  # lam = 3
    assert int(state.count) == 2


def test_inject_hyperparams() -> None:
    x = {"w": 2 * jnp.eye(2), "b": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, x)
    tx = optax.inject_hyperparams(jop.landing)(lam=1.0)
    state = tx.init(x)
    state.hyperparams["lam"] = jnp.array(0.5)
    u, _ = jax.jit(tx.update)(zeros, state, x)
    np.testing.assert_allclose(u["w"], 3 * np.eye(2))
    fn = lambda p: {"w": True, "b": False}  # noqa: E731
    for factory, kwargs in (
        (jop.landing, {"lam": 1.0, "safe_step": 0.5, "learning_rate": 0.1}),
        (jop.project_orthonormal, {}),
    ):
        tx = optax.inject_hyperparams(factory, static_args=("mask", "dimension_numbers"))(
            mask=fn, **kwargs
        )
        u, _ = jax.jit(tx.update)(zeros, tx.init(x), x)
        assert _same_bits(u["b"], zeros["b"]) and np.abs(np.asarray(u["w"])).max() > 0


MATRIX: dict[str, Callable[[], Any]] = {
    "landing": lambda: optax.chain(jop.landing(1.0), optax.sgd(0.05)),
    "landing-safe-schedule": lambda: optax.chain(
        jop.landing(
            optax.linear_schedule(0.5, 1.0, 5),
            safe_step=0.5,
            learning_rate=optax.cosine_decay_schedule(0.05, 10),
        ),
        optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.05, 10)),
    ),
    "inject": lambda: optax.chain(optax.inject_hyperparams(jop.landing)(lam=1.0), optax.sgd(0.05)),
    "project": lambda: optax.chain(optax.sgd(0.05), jop.project_orthonormal()),
    "project-masked": lambda: optax.chain(
        optax.adam(0.05), jop.project_orthonormal(mask={"w": True, "k": True, "b": False})
    ),
}


def _params(dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    rng = np.random.default_rng(8)
    return {
        "w": jnp.asarray(_rand(rng, 6, 3), dtype),
        "k": jnp.asarray(_rand(rng, 5, 2, 3), dtype),
        "b": jnp.ones(3, dtype),
    }


def _loss(p: Any) -> jax.Array:
    return jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["k"] ** 2) + jnp.sum(p["b"] ** 2)


def _step(opt: Any, wrap: Callable[[Any], Any] = lambda f: f) -> Callable[..., Any]:
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        updates, state = wrap(opt.update)(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize(
    "name",
    [
        # optax's schedules and adam are not strict-clean: see conftest.py.
        pytest.param(n, marks=pytest.mark.optax_promotion)
        if n in ("landing-safe-schedule", "project-masked")
        else n
        for n in MATRIX
    ],
)
def test_jit_without_retrace_and_scan_of_checkpoint_agree(name: str) -> None:
    opt = MATRIX[name]()
    params = _params()
    traces = []
    plain = _step(opt)

    @jax.jit
    def jitted(p: Any, s: Any) -> Any:
        traces.append(None)
        return plain(p, s)

    p1, s1 = params, opt.init(params)
    for _ in range(4):
        p1, s1 = jitted(p1, s1)
    assert len(traces) == 1
    # The same four steps as a lax.scan over a jax.checkpoint-ed update.
    remat = _step(opt, jax.checkpoint)
    scanned = jax.jit(
        lambda p, s: jax.lax.scan(lambda c, _: (remat(*c), None), (p, s), None, length=4)[0]
    )
    p2, _ = scanned(params, opt.init(params))
    for k in params:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(p1["w"], params["w"])


# optax's schedules and Adam mix float and int32 counts, which strict promotion
# rejects: these chains use neither.
STRICT: dict[str, Callable[[], Any]] = {
    "landing": MATRIX["landing"],
    "landing-safe": lambda: optax.chain(
        jop.landing(0.5, safe_step=0.5, learning_rate=0.05), optax.sgd(0.05)
    ),
    "inject": MATRIX["inject"],
    "project-masked": lambda: optax.chain(
        optax.sgd(0.05), jop.project_orthonormal(mask={"w": True, "k": True, "b": False})
    ),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", STRICT)
def test_dtypes_kept_under_strict_promotion(name: str, dtype: Any) -> None:
    with jax.numpy_dtype_promotion("strict"):
        opt = STRICT[name]()
        params = _params(dtype)
        new, _ = jax.jit(_step(opt))(params, jax.jit(opt.init)(params))
        assert jax.tree.map(lambda u: u.dtype, new) == {"w": dtype, "k": dtype, "b": dtype}
        assert all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(new))
        # Mixed: float32 updates on bfloat16 params computes in float32.
        x = jnp.eye(4, 2, dtype=jnp.bfloat16)
        u = _update(jop.landing(1.0), jnp.ones((4, 2), jnp.float32), x)
        assert u.dtype == jnp.float32


def test_bfloat16_landing_is_close_to_the_reference() -> None:
    rng = np.random.default_rng(9)
    x = jnp.asarray(_rand(rng, 8, 3), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(8, 3)), jnp.bfloat16)
    got = np.asarray(_update(jop.landing(0.5), g, x), np.float64)
    expected = ref.landing(np.asarray(x, np.float64), np.asarray(g, np.float64), 0.5)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- sharding


_GATHER = re.compile(r"(all-gather|all-to-all|collective-permute)(?:-start)?\(")


def _moves_outside_svd(hlo: str) -> list[str]:
    """The collectives that move a parameter (gather, all-to-all, permute) in any
    computation of the compiled HLO other than those of the SVD fallback's branch
    (the ones holding the LAPACK SVD call, or named by its scope)."""
    out = []
    for comp in re.split(r"\n(?=\S)", hlo):
        if "gesdd" in comp or "gesvd" in comp:
            continue
        for line in comp.splitlines():
            if _GATHER.search(line) and "polar_svd_fallback" not in line:
                out.append(line.strip()[:160])
    return out


def _orthonormal(rng: np.random.Generator, shape: tuple[int, ...], dims: OrthoDims) -> Any:
    return ref.polar(rng.normal(size=shape), **_axes(dims))


def _child() -> None:  # pragma: no cover - runs in the subprocess
    import contextlib

    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_orthopenalty._polar import polar

    assert len(jax.devices()) == 8
    pattern = r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
    records: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    # (shape, layout, spec): groups, vectors (FSDP) and a conv kernel's vector axis.
    leaves = {
        "groups": ((16, 32, 8), OrthoDims(), P(None, "x", None)),
        "conv_groups": ((3, 3, 4, 8, 16), OrthoDims((0, 1, 2), 3), P(None, None, None, None, "x")),
        "fsdp": ((64, 16), OrthoDims(), P("x", None)),
        "conv_fsdp": ((3, 3, 8, 16), OrthoDims((0, 1, 2), 3), P(None, None, "x", None)),
    }
    dims = {k: v[1] for k, v in leaves.items()} | {"b": None}
    near = {
        k: jnp.asarray(_orthonormal(rng, s, d), jnp.float32) for k, (s, d, _) in leaves.items()
    }
    far = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, (s, _, _) in leaves.items()}
    near["b"] = far["b"] = jnp.ones(8)
    transforms = {
        "project-near": (
            optax.chain(optax.sgd(1e-3), jop.project_orthonormal(dimension_numbers=dims)),
            near,
        ),
        "project-far": (
            optax.chain(optax.sgd(0.1), jop.project_orthonormal(dimension_numbers=dims)),
            far,
        ),
        "landing": (
            optax.chain(
                jop.landing(1.0, dimension_numbers=dims, safe_step=0.5, learning_rate=0.1),
                optax.sgd(0.1),
            ),
            near,
        ),
    }
    steps, wants = {}, {}
    for name, (tx, params) in transforms.items():

        def step(g: Any, p: Any, tx: Any = tx) -> Any:
            return optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])

        steps[name] = step
        wants[name] = jax.jit(step)(jax.tree.map(jnp.cos, params), params)  # one device
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
        shardings = {k: NamedSharding(mesh, v[2]) for k, v in leaves.items()}
        shardings["b"] = NamedSharding(mesh, P())
        for set_mesh in (False, True):
            for name, (_, params) in transforms.items():
                step, want = steps[name], wants[name]
                grads = jax.tree.map(jnp.cos, params)
                ctx = jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext()
                with ctx:
                    sharded = [jax.device_put(t, shardings) for t in (grads, params)]
                    compiled = jax.jit(step).lower(*sharded).compile()  # compiled once
                    hlo = compiled.as_text()
                    got = compiled(*sharded)
                records[f"{axis_type.name}-{'set_mesh-' * set_mesh}{name}"] = {
                    "err": max(float(jnp.max(jnp.abs(got[k] - want[k]))) for k in want),
                    "collectives": sorted(set(re.findall(pattern, hlo))),
                    "moves_outside_svd": _moves_outside_svd(hlo),
                    "kept": all(
                        got[k].sharding.is_equivalent_to(shardings[k], got[k].ndim) for k in leaves
                    ),
                }
    # Derivatives through the projection of a vector-sharded leaf: gather-free too.
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    layout = jop._layout.make_layout(2, 0, -1)
    x = near["fsdp"]
    a = jnp.cos(x)
    loss = lambda y: jnp.sum(a * polar(layout, y, precision=jax.lax.Precision.HIGHEST))  # noqa: E731
    want = jax.grad(loss)(x)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("x", None)))
        compiled = jax.jit(jax.grad(loss)).lower(xs).compile()
        hlo = compiled.as_text()
        got = compiled(xs)
    records["Explicit-grad"] = {
        "err": float(jnp.max(jnp.abs(got - want))),
        "moves_outside_svd": _moves_outside_svd(hlo),
        "kept": got.sharding.is_equivalent_to(xs.sharding, 2),
    }
    # Columns sharded: the Gram pairs columns of every shard, so XLA moves the
    # parameter (docs/scale.md); the result is still right.
    cols = NamedSharding(mesh, P(None, "x"))
    tx = transforms["project-near"][0]
    p = {"fsdp": x}
    tx = optax.chain(optax.sgd(1e-3), jop.project_orthonormal())
    want = optax.apply_updates(p, tx.update(jax.tree.map(jnp.cos, p), tx.init(p), p)[0])
    with jax.set_mesh(mesh):
        ps = jax.device_put(p, cols)
        got = jax.jit(
            lambda q: optax.apply_updates(q, tx.update(jax.tree.map(jnp.cos, q), tx.init(q), q)[0])
        )(ps)
    records["Explicit-columns"] = {"err": float(jnp.max(jnp.abs(got["fsdp"] - want["fsdp"])))}
    # A sharding type error names the leaf: updates sharded unlike their params.
    try:
        with jax.set_mesh(mesh):
            pw = {"net": {"w": jax.device_put(x, NamedSharding(mesh, P("x", None)))}}
            uw = {"net": {"w": jax.device_put(x, NamedSharding(mesh, P(None, "x")))}}
            tl = jop.landing(1.0)
            jax.jit(lambda u, q: tl.update(u, tl.init(q), q))(uw, pw)
        records["mismatch"] = {"error": None}
    except Exception as e:
        records["mismatch"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    try:  # the penalty's own add of the pull to the updates, too
        with jax.set_mesh(mesh):
            tp = jop.add_orthogonality_penalty(1e-3)
            jax.jit(lambda u, q: tp.update(u, tp.init(q), q))(uw, pw)
        records["mismatch-penalty"] = {"error": None}
    except Exception as e:
        records["mismatch-penalty"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    print_records(records)


def test_sharded_leaves_project_and_land_without_gathers() -> None:
    # Auto and Explicit meshes, with and without jax.set_mesh; groups-, vector- (FSDP)
    # and conv-kernel-sharded leaves; near the manifold (the series), far from it (the
    # SVD, which gathers each group explicitly, inside its branch only), and landing.
    records = run_as_script(__file__)
    assert len(records) == 2 * 2 * 3 + 4, sorted(records)  # + grad, columns, 2 mismatches
    for name, rec in records.items():
        if name.startswith("mismatch"):
            continue
        assert rec["err"] < 2e-5, (name, rec)
        if name == "Explicit-columns":
            continue
        assert rec["moves_outside_svd"] == [], (name, rec)
        assert rec["kept"], (name, rec)
        if name.endswith("landing"):
            assert "all-gather" not in rec["collectives"], (name, rec)
    for name in ("mismatch", "mismatch-penalty"):
        error = records[name]["error"]
        assert error is not None, name
        assert error.startswith("ShardingTypeError: params leaf ['net']['w']"), (name, error)


def test_collective_filter_sees_gathers_outside_the_svd() -> None:
    hlo = (
        "%region_1 (p: f32[8]) -> f32[64,16] {\n"
        "  %all-gather = f32[64,16]{1,0} all-gather(f32[8,16]{1,0} %p), dimensions={0}\n"
        "}\n"
        "%region_2 (p: f32[8]) -> f32[64,16] {\n"
        "  %all-gather.1 = f32[64,16]{1,0} all-gather(f32[8,16]{1,0} %p), dimensions={0}\n"
        '  %svd = custom-call(%all-gather.1), custom_call_target="lapack_sgesdd_ffi"\n'
        "}\n"
    )
    assert len(_moves_outside_svd(hlo)) == 1


# --------------------------------------------------------------------------- docs


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
def test_soft_or_exact_page_code_runs() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "soft-or-exact.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.M | re.S)
    assert len(blocks) == 3
    namespace: dict[str, Any] = {}
    with jax.numpy_rank_promotion("allow"):  # user code, as the docs show it
        for block in blocks:
            exec(compile(block, "docs/soft-or-exact.md", "exec"), namespace)


if __name__ == "__main__":
    _child()
