"""The target constraint (dual ascent on one multiplier per group) and the metrics.

The update rule is checked against a float64 NumPy loop written from the math in the
docstring; the rest checks what the rule promises per group (orthonormal groups keep
beta = 0, groups under the target do not grow theirs, beta never negative, NaN never
reaches it) and the optax idiom (masks, layouts, every, inject_hyperparams,
MultiSteps, jax.export of the state). The transformation matrix
(tests/test_transformations.py) and the platform lowerings (tests/test_export.py) have
entries of their own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import jax_orthopenalty as jop
from jax_orthopenalty._constraint import (
    AddOrthogonalityConstraintState,
    add_orthogonality_constraint,
    orthogonality_metrics,
)

RNG = np.random.default_rng(0)
PHI = RNG.normal(size=(5, 3, 2)) / 2  # (l, m, n): 3 groups of 5 x 2
TASK = RNG.normal(size=(5, 3, 2)) / 2  # the task: 1/2 |phi - TASK|^2


def _reference(
    phi: np.ndarray, steps: int, *, target: float, rate: float, lr: float, beta0: float
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The rule in NumPy (float64): SGD on the task plus beta_i dL_i/dPhi_i, then
    beta_i <- max(0, beta_i + rate * clip(log(err_i / target), -1, 1))."""
    phi = phi.copy()
    beta = np.full(phi.shape[1], beta0)
    betas, errors = [], []
    for _ in range(steps):
        u = phi - TASK
        err = np.empty(phi.shape[1])
        for i in range(phi.shape[1]):
            p = phi[:, i, :]
            x = p.T @ p - np.eye(p.shape[1])
            g = np.sign(x)  # sign(0) = 0: the "zero" convention
            u[:, i, :] += beta[i] * p @ (g + g.T)
            err[i] = np.abs(x).max()
        beta = np.maximum(0.0, beta + rate * np.clip(np.log(err / target), -1, 1))
        phi = phi - lr * u
        betas.append(beta.copy())
        errors.append(err)
    return phi, betas, errors


def _run(tx: optax.GradientTransformation, params: Any, grad: Any, steps: int) -> tuple[Any, list]:
    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any]:
        u, s = tx.update(grad(p), s, p)
        return optax.apply_updates(p, u), s

    state, states = tx.init(params), []
    for _ in range(steps):
        params, state = step(params, state)
        states.append(state)
    return params, states


def _constraint_states(state: Any) -> AddOrthogonalityConstraintState:
    is_state = lambda x: isinstance(x, AddOrthogonalityConstraintState)  # noqa: E731
    (found,) = [x for x in jax.tree.leaves(state, is_leaf=is_state) if is_state(x)]
    return found


def test_update_rule_matches_a_float64_numpy_reference() -> None:
    kw = {"target": 0.3, "rate": 0.2, "lr": 0.1, "beta0": 0.1}
    want_phi, want_betas, want_errors = _reference(PHI, 8, **kw)
    with jax.enable_x64(True):
        tx = optax.chain(
            add_orthogonality_constraint(0.3, rate=0.2, beta_init=0.1), optax.sgd(0.1)
        )
        phi, states = _run(tx, jnp.asarray(PHI), lambda p: p - jnp.asarray(TASK), 8)
        got = [_constraint_states(s) for s in states]
        assert got[0].beta.dtype == jnp.float64
        np.testing.assert_allclose(phi, want_phi, rtol=1e-12, atol=1e-12)
        for s, b, e in zip(got, want_betas, want_errors, strict=True):
            np.testing.assert_allclose(s.beta, b, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(s.error, e, rtol=1e-12)
    # Some groups were clipped and some were not: the test sees the whole rule.
    ratios = np.abs(np.log(np.asarray(want_errors) / 0.3))
    assert (ratios > 1).any() and (ratios < 1).any()
    assert int(states[-1][0].count) == 8


@pytest.mark.optax_promotion  # the cosine schedule multiplies floats by the count
def test_each_group_has_its_own_multiplier() -> None:
    # Group 0 is orthonormal: its beta stays 0 while the others grow; a group whose
    # error is under the target never raises its beta. The step size decays, as a
    # subgradient method's must for the L1 pull to settle below a small target.
    rng = np.random.default_rng(1)
    phi = np.stack([np.eye(4, 2), 1.5 * np.eye(4, 2), rng.normal(size=(4, 2))], axis=1)
    lr = optax.cosine_decay_schedule(0.05, 150)
    tx = optax.chain(add_orthogonality_constraint(1e-2, rate=0.01), optax.sgd(lr))
    _, states = _run(tx, jnp.asarray(phi, jnp.float32), jnp.zeros_like, 150)
    betas = np.array([s[0].beta for s in states])
    errors = np.array([s[0].error for s in states])
    assert betas.shape == (150, 3)
    np.testing.assert_array_equal(betas[:, 0], 0.0)
    assert (betas[5, 1:] > 0).all()
    assert (errors[-1, 1:] < 1e-2).all()  # the others reached the target
    below = errors[1:] < 1e-2
    assert below.any()
    assert (betas[1:][below] <= betas[:-1][below]).all()
    assert (betas >= 0).all()


def test_beta_never_negative_and_decays_to_zero() -> None:
    tx = add_orthogonality_constraint(1e-3, rate=1.0, beta_init=0.05)
    params = {"w": jnp.eye(3, 2)}
    _, states = _run(tx, params, lambda p: jax.tree.map(jnp.zeros_like, p), 3)
    for s in states:
        np.testing.assert_array_equal(s.beta["w"], 0.0)  # max(0, 0.05 - 1)
        assert s.beta["w"].dtype == jnp.float32


def test_nan_error_keeps_the_multiplier_and_is_flagged() -> None:
    phi = np.stack([2 * np.eye(3, 2), 2 * np.eye(3, 2)], axis=1).astype(np.float32)
    phi[0, 1, 0] = np.nan  # group 1
    tx = add_orthogonality_constraint(1e-3, rate=0.5, beta_init=0.25)
    params = {"w": jnp.asarray(phi)}
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_array_equal(state.beta["w"], [0.75, 0.25])
    assert np.isnan(state.error["w"][1]) and state.error["w"][0] == 3.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": 0.0}, ValueError, r"`target` must be finite and > 0"),
        ({"target": -1e-3}, ValueError, r"`target` must be finite"),
        ({"target": float("nan")}, ValueError, r"`target` must be finite"),
        ({"target": float("inf")}, ValueError, r"`target` must be finite"),
        ({"rate": 0.0}, ValueError, r"`rate` must be finite and > 0"),
        ({"rate": -1.0}, ValueError, r"`rate` must be finite"),
        ({"rate": float("inf")}, ValueError, r"`rate` must be finite"),
        ({"beta_init": -0.5}, ValueError, r"`beta_init` must be finite and >= 0"),
        ({"beta_init": "1"}, TypeError, r"`beta_init` must be a real scalar"),
        ({"every": 0}, ValueError, r"`every` must be >= 1"),
        ({"every": 1.5}, TypeError, r"`every` must be an int"),
        ({"norm": "bogus"}, ValueError, r"norm"),
        ({"subgradient": "bogus"}, ValueError, r"subgradient"),
        ({"mask": True}, ValueError, r"`mask` must be a pytree of bools"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type, match: str) -> None:
    kwargs = {"target": 1e-3, **kwargs}
    target = kwargs.pop("target")
    with pytest.raises(error, match=match):
        add_orthogonality_constraint(target, **kwargs)


def test_update_needs_params_and_a_schedule_is_checked() -> None:
    tx = add_orthogonality_constraint(1e-3)
    params = {"w": jnp.eye(3, 2)}
    with pytest.raises(ValueError, match=r"add_orthogonality_constraint needs the current"):
        tx.update(params, tx.init(params), None)
    bad = add_orthogonality_constraint(lambda count: -1.0)
    with pytest.raises(ValueError, match=r"`target` must be finite and > 0"):
        bad.update(params, bad.init(params), params)


PARAMS = {
    "a": jnp.asarray(RNG.normal(size=(4, 3, 2)), jnp.float32),
    "b": {
        "c": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32),
        "d": jnp.asarray(RNG.normal(size=(3, 3)), jnp.float32),
    },
    "bias": jnp.ones(2),
}


@pytest.mark.parametrize(
    ("mask", "selected"),
    [
        ({"a": True, "b": {"c": False, "d": True}, "bias": False}, {"a", "d"}),
        ({"a": False, "b": True, "bias": False}, {"c", "d"}),  # a prefix
        (lambda p: jax.tree.map(lambda x: x.shape[-1] == 2, p), {"a", "c"}),
    ],
    ids=["tree", "prefix", "callable"],
)
def test_masks(mask: Any, selected: set[str]) -> None:
    tx = add_orthogonality_constraint(1e-3, beta_init=0.5, mask=mask)
    plain = add_orthogonality_constraint(1e-3, beta_init=0.5)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    got, state = jax.jit(tx.update)(zeros, tx.init(PARAMS), PARAMS)
    want, _ = plain.update(zeros, plain.init(PARAMS), PARAMS)
    leaves = {"a": ("a",), "c": ("b", "c"), "d": ("b", "d")}
    for name, path in leaves.items():
        g, w = got, want
        for k in path:
            g, w = g[k], w[k]
        if name in selected:
            np.testing.assert_allclose(g, w, rtol=1e-6)
            assert float(jnp.abs(g).max()) > 0
        else:
            np.testing.assert_array_equal(g, 0.0)
    metrics = orthogonality_metrics(PARAMS, mask=mask, state=state)
    names = {"['a']": "a", "['b']['c']": "c", "['b']['d']": "d"}
    assert {names[k] for k in metrics} == selected
    assert all("beta" in m for m in metrics.values())


def test_dimension_numbers_and_tuple_column_axis() -> None:
    w = jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)  # equinox (out, in): rows
    k = jnp.asarray(RNG.normal(size=(7, 2, 3)), jnp.float32)  # one group of 6 columns
    params = {"w": w, "k": k}
    dims = {"w": jop.OrthoDims(vector_axis=1, column_axis=0), "k": jop.OrthoDims(0, (1, 2))}
    tx = add_orthogonality_constraint(1e-3, beta_init=0.5, dimension_numbers=dims)
    zeros = jax.tree.map(jnp.zeros_like, params)
    got, state = tx.update(zeros, tx.init(params), params)
    assert state.beta["w"].shape == () and state.beta["k"].shape == ()
    np.testing.assert_allclose(
        got["w"], jop.orthogonality_penalty_grad(w, 0.5, vector_axis=1, column_axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        got["k"], jop.orthogonality_penalty_grad(k, 0.5, column_axis=(1, 2)), rtol=1e-6
    )
    np.testing.assert_allclose(
        state.error["k"], jop.orthogonality_error(k, column_axis=(1, 2)), rtol=1e-6
    )


def test_every_two() -> None:
    params = {"w": jnp.asarray(PHI, jnp.float32)}
    tx = add_orthogonality_constraint(1e-3, rate=0.1, beta_init=0.5, every=2)
    zeros = jax.tree.map(jnp.zeros_like, params)
    s0 = tx.init(params)
    u1, s1 = jax.jit(tx.update)(zeros, s0, params)
    u2, s2 = jax.jit(tx.update)(zeros, s1, params)
    np.testing.assert_allclose(
        u1["w"], jop.orthogonality_penalty_grad(params["w"], 1.0), rtol=1e-6
    )
    np.testing.assert_allclose(s1.beta["w"], 0.6)  # errors far above the target: + rate
    np.testing.assert_array_equal(u2["w"], 0.0)  # no Gram, no dual step
    np.testing.assert_array_equal(s2.beta["w"], s1.beta["w"])
    np.testing.assert_array_equal(s2.error["w"], s1.error["w"])
    assert int(s2.count) == 2


@pytest.mark.optax_promotion  # linear_schedule multiplies floats by the count
def test_inject_hyperparams_and_multisteps() -> None:
    params = {"w": jnp.asarray(PHI, jnp.float32)}
    grad = lambda p: jax.tree.map(lambda x, t: x - t, p, {"w": jnp.asarray(TASK, jnp.float32)})  # noqa: E731
    make = optax.inject_hyperparams(add_orthogonality_constraint)
    injected = optax.chain(make(target=0.3, rate=0.2, beta_init=0.1), optax.sgd(0.1))
    plain = optax.chain(add_orthogonality_constraint(0.3, rate=0.2, beta_init=0.1), optax.sgd(0.1))
    p1, s1 = _run(injected, params, grad, 4)
    p2, s2 = _run(plain, params, grad, 4)
    np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6)
    np.testing.assert_allclose(
        _constraint_states(s1[-1]).beta["w"], _constraint_states(s2[-1]).beta["w"], rtol=1e-6
    )
    # A scheduled target, and a callable mask kept static.
    tx = optax.inject_hyperparams(add_orthogonality_constraint, static_args=("mask",))(
        target=optax.linear_schedule(1.0, 1e-3, 4), mask=lambda p: {"w": True}
    )
    _run(tx, params, grad, 2)
    # MultiSteps: the inner transform (and its multipliers) moves every second step.
    multi = optax.MultiSteps(plain, every_k_schedule=2)
    _, states = _run(multi, params, grad, 4)
    betas = [np.asarray(_constraint_states(s).beta["w"]) for s in states]
    np.testing.assert_array_equal(betas[0], np.float32(0.1))
    assert not np.array_equal(betas[1], betas[0])
    np.testing.assert_array_equal(betas[2], betas[1])


def test_init_on_abstract_params_and_export_of_the_state() -> None:
    tx = add_orthogonality_constraint(1e-2, beta_init=0.5)
    params = {"w": jnp.asarray(PHI, jnp.float32), "b": jnp.ones(2)}
    abstract = jax.eval_shape(tx.init, params)
    assert abstract.beta["w"].shape == (3,) and abstract.beta["b"] is None
    # The state crosses a serialized jax.export, with the group axis symbolic.
    (m,) = export.symbolic_shape("m")
    poly = {"w": jax.ShapeDtypeStruct((5, m, 2), jnp.float32), "b": params["b"]}
    state_poly = jax.eval_shape(tx.init, poly)
    exported = export.export(jax.jit(tx.update))(poly, state_poly, poly)
    restored = export.deserialize(exported.serialize())
    zeros = jax.tree.map(jnp.zeros_like, params)
    got = restored.call(zeros, tx.init(params), params)
    want = tx.update(zeros, tx.init(params), params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_metrics_match_a_float64_reference_under_jit() -> None:
    phi = RNG.normal(size=(6, 4, 3))
    wide = RNG.normal(size=(2, 5))  # n > l: sigma_min 0
    params = {"w": jnp.asarray(phi, jnp.float32), "v": jnp.asarray(wide, jnp.float32)}
    got = jax.jit(orthogonality_metrics)(params)
    for i in range(4):
        p = phi[:, i, :]
        s = np.linalg.svd(p, compute_uv=False)
        np.testing.assert_allclose(got["['w']"]["sigma_max"][i], s.max(), rtol=1e-5)
        np.testing.assert_allclose(got["['w']"]["sigma_min"][i], s.min(), rtol=1e-4)
        np.testing.assert_allclose(
            got["['w']"]["error"][i], np.abs(p.T @ p - np.eye(3)).max(), rtol=1e-5
        )
    np.testing.assert_allclose(got["['v']"]["sigma_min"], 0.0, atol=1e-3)
    np.testing.assert_allclose(
        got["['v']"]["sigma_max"], np.linalg.svd(wide, compute_uv=False).max(), rtol=1e-5
    )
    assert set(got["['w']"]) == {"error", "sigma_min", "sigma_max"}


def test_metrics_beta_from_a_nested_state_and_errors() -> None:
    params = {"w": jnp.asarray(PHI, jnp.float32)}
    tx = optax.chain(add_orthogonality_constraint(1e-3, beta_init=0.5), optax.sgd(0.1))
    state = tx.init(params)
    got = jax.jit(lambda p, s: orthogonality_metrics(p, state=s))(params, state)
    np.testing.assert_array_equal(got["['w']"]["beta"], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"exactly one AddOrthogonalityConstraintState"):
        orthogonality_metrics(params, state=optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match=r"found 2"):
        orthogonality_metrics(params, state=(state, state))


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jax_orthopenalty._constraint import add_orthogonality_constraint, orthogonality_metrics
mesh = jax.make_mesh((2,), ("g",), axis_types=(AxisType.Explicit,))
with jax.set_mesh(mesh):
    phi = np.random.default_rng(0).normal(size=(8, 4, 3)).astype(np.float32)
    params = {"w": jax.device_put(phi, NamedSharding(mesh, P(None, "g", None)))}
    tx = optax.chain(add_orthogonality_constraint(1e-2, beta_init=0.1), optax.sgd(0.1))
    state = tx.init(params)
    assert str(jax.typeof(state[0].beta["w"])) == "float32[4@g]"

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.zeros_like, p), s, p)
        return optax.apply_updates(p, u), s, orthogonality_metrics(p, state=s)

    p, s, m = step(params, state)
    for x in (s[0].beta["w"], s[0].error["w"], m["['w']"]["sigma_min"], m["['w']"]["beta"]):
        assert str(jax.typeof(x)) == "float32[4@g]", jax.typeof(x)
    text = step.lower(params, state).compile().as_text()
    assert "all-gather" not in text and "all-reduce" not in text
    (p, s), _ = jax.lax.scan(lambda c, _: (step(*c)[:2], None), (params, state), None, length=3)
print("ok")
"""


def test_explicit_mesh_multipliers_sharded_like_the_groups() -> None:
    # Two host devices, in a subprocess (the device count is fixed at jax's start):
    # the multipliers, errors and metrics carry the groups' sharding, a scan carries
    # the state unchanged in type, and nothing is gathered.
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --------------------------------------------------------------------------- real models


def test_constraint_and_metrics_on_real_flax_and_equinox_models() -> None:
    """The constraint and the metrics with the layouts dimension_numbers_for gives: an
    equinox MLP, an nnx stack of layers (one multiplier per layer) with a conv as its
    operator, boxed linen params, and an abstract init."""
    import equinox as eqx
    import flax.linen as nn
    from flax import nnx

    key = jax.random.key(0)
    mlp = eqx.nn.MLP(8, 4, 16, 2, key=key)
    eqx_params = eqx.filter(mlp, eqx.is_array)
    eqx_dims = jop.dimension_numbers_for(mlp)

    @nnx.vmap(in_axes=0, out_axes=0)
    def stack(k: jax.Array) -> nnx.Linear:
        return nnx.Linear(6, 4, rngs=nnx.Rngs(k))

    class Net(nnx.Module):
        def __init__(self) -> None:
            self.conv = nnx.Conv(3, 6, (3, 3), strides=(2, 2), rngs=nnx.Rngs(1))
            self.layers = stack(jax.random.split(key, 3))

    net = Net()
    nnx_params = nnx.as_pure(nnx.state(net, nnx.Param))
    nnx_dims = jop.dimension_numbers_for(net, conv="operator")

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(4, kernel_init=init)(x)

    boxed = Boxed().init(key, jnp.ones((1, 8)))["params"]
    boxed_dims = jop.dimension_numbers_for(Boxed(), boxed, jnp.ones((1, 8)))

    for params, dims, groups in (
        (eqx_params, eqx_dims, {"layers[0].weight": (), "layers[2].weight": ()}),
        (nnx_params, nnx_dims, {"['conv']['kernel']": (), "['layers']['kernel']": (3,)}),
        (boxed, boxed_dims, {"['Dense_0']['kernel'].value": ()}),  # the box's value
    ):
        tx = optax.chain(
            jop.add_orthogonality_constraint(1e-2, rate=1e-2, dimension_numbers=dims),
            optax.sgd(1e-2),
        )
        state = tx.init(params)
        assert jax.eval_shape(tx.init, params) is not None  # abstract init too
        grads = jax.tree.map(jnp.zeros_like, params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
        metrics = jax.jit(
            lambda p, s, d=dims: jop.orthogonality_metrics(p, dimension_numbers=d, state=s)
        )(params, state)
        for name, shape in groups.items():
            key_ = next(k for k in metrics if k.endswith(name))
            leaf = metrics[key_]
            assert leaf["error"].shape == shape and leaf["beta"].shape == shape, (key_, leaf)
            # One step from beta_init = 0: every group far from orthonormal raised its beta.
            assert bool(jnp.all(leaf["beta"] > 0)) and bool(jnp.all(jnp.isfinite(leaf["error"])))
            if "conv" not in name:
                assert leaf["sigma_max"].shape == shape
