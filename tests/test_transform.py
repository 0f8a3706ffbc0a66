"""The optax transform and the pytree penalty, against the float64 reference.

The checklist is optax's ``contrib/_common_test.py``: inside ``optax.chain`` under
``jax.jit``, no retrace on a second step, dtypes kept, ``optax.MultiSteps``,
``optax.inject_hyperparams``, and every mask form exercised by its own test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_orthopenalty as jop
from jax_orthopenalty import OrthoDims

import reference as ref

# Options of the family, with the reference's spelling (it has no `precision`).
OPTIONS = [
    {},
    {"norm": "squared"},
    {"norm": jop.huber(0.3)},
    {"subgradient": "positive"},
    {"subgradient": jop.deadzone(0.05)},
    {"off_diagonal": True},
    {"normalize": True},
    {"double_sided": True},
    {"norm": "squared", "normalize": True, "double_sided": True, "off_diagonal": True},
]


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape) / np.sqrt(shape[0] if shape else 1)


DEFAULT = OrthoDims()


def _ref(phi: Any, beta: float, dims: OrthoDims, **options: Any) -> tuple[float, np.ndarray]:
    return ref.penalty_and_grad(
        np.asarray(phi, np.float64),
        beta,
        vector_axis=dims.vector_axis,
        column_axis=dims.column_axis,
        **options,
    )


def _ref_grad(phi: Any, beta: float, dims: OrthoDims = DEFAULT, **options: Any) -> np.ndarray:
    return _ref(phi, beta, dims, **options)[1]


def _ref_value(phi: Any, beta: float, dims: OrthoDims = DEFAULT, **options: Any) -> float:
    return _ref(phi, beta, dims, **options)[0]


def _same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _update(tx: Any, updates: Any, params: Any) -> Any:
    return tx.update(updates, tx.init(params), params)[0]


def _tree(rng: np.random.Generator, shapes: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _tree(rng, v) if isinstance(v, dict) else jnp.asarray(_rand(rng, *v))
        for k, v in shapes.items()
    }


# --------------------------------------------------------------------------- the update


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_update_is_incoming_plus_reference_gradient(options: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        params = _tree(rng, {"lmn": (5, 3, 4), "kernel": (6, 4), "bias": (4,), "scale": ()})
        updates = _tree(rng, {"lmn": (5, 3, 4), "kernel": (6, 4), "bias": (4,), "scale": ()})
        new = _update(jop.add_orthogonality_penalty(0.3, **options), updates, params)
        for k in ("lmn", "kernel"):
            assert new[k].dtype == jnp.float64
            expected = np.asarray(updates[k]) + _ref_grad(params[k], 0.3, **options)
            np.testing.assert_allclose(new[k], expected, rtol=1e-10, atol=1e-12)
        # rank < 2 under the default dimension_numbers: untouched, bit for bit.
        assert _same_bits(new["bias"], updates["bias"])
        assert _same_bits(new["scale"], updates["scale"])


LAYOUTS = {
    # name: (shape, dims)
    "lmn": ((5, 3, 4), OrthoDims()),
    "flax_dense_in_out": ((6, 4), OrthoDims()),
    "conv_hwio": ((3, 3, 2, 5), OrthoDims(vector_axis=(0, 1, 2), column_axis=3)),
    "equinox_linear_out_in": ((4, 7), OrthoDims(vector_axis=1, column_axis=0)),
    "scan_stacked_layers_in_out": ((3, 6, 4), OrthoDims(vector_axis=1, column_axis=2)),
    "scan_stacked_negative_axes": ((3, 6, 4), OrthoDims(vector_axis=-2, column_axis=-1)),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_real_layouts_match_reference(name: str) -> None:
    shape, dims = LAYOUTS[name]
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(_rand(rng, *shape)), "b": jnp.asarray(_rand(rng, 4))}
        updates = jax.tree.map(jnp.zeros_like, params)
        tx = jop.add_orthogonality_penalty(0.7, dimension_numbers={"w": dims, "b": None})
        new = _update(tx, updates, params)
        expected = _ref_grad(params["w"], 0.7, dims)
        np.testing.assert_allclose(new["w"], expected, rtol=1e-10, atol=1e-12)
        assert _same_bits(new["b"], updates["b"])
        if dims != OrthoDims():
            # The layout matters: the default one gives something else.
            default = _ref_grad(params["w"], 0.7)
            assert not np.allclose(default, expected, atol=1e-3)


def test_scan_stacked_layers_are_independent_groups() -> None:
    # The leading layer axis is a group axis: each layer's gradient is its own.
    rng = np.random.default_rng(2)
    stacked = jnp.asarray(_rand(rng, 3, 6, 4), jnp.float32)
    tx = jop.add_orthogonality_penalty(0.5, dimension_numbers=OrthoDims(1, 2))
    new = _update(tx, jnp.zeros_like(stacked), stacked)
    for layer in range(3):
        alone = _update(jop.add_orthogonality_penalty(0.5), jnp.zeros((6, 4)), stacked[layer])
        np.testing.assert_allclose(new[layer], alone, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dimension_numbers


def _enc_dec(rng: np.random.Generator) -> dict[str, Any]:
    return _tree(rng, {"enc": {"w1": (4, 6), "w2": (3, 5)}, "dec": {"w": (5, 5), "b": (5,)}})


def test_dimension_numbers_none_entry_skips_a_matrix() -> None:
    rng = np.random.default_rng(3)
    params, updates = _enc_dec(rng), _enc_dec(rng)
    dims = {"enc": {"w1": OrthoDims(1, 0), "w2": None}, "dec": {"w": OrthoDims(), "b": None}}
    new = _update(jop.add_orthogonality_penalty(0.5, dimension_numbers=dims), updates, params)
    assert _same_bits(new["enc"]["w2"], updates["enc"]["w2"])  # a matrix, skipped by None
    assert _same_bits(new["dec"]["b"], updates["dec"]["b"])
    for path, d in ((("enc", "w1"), OrthoDims(1, 0)), (("dec", "w"), OrthoDims())):
        p, u, n = (t[path[0]][path[1]] for t in (params, updates, new))
        np.testing.assert_allclose(n, u + _ref_grad(p, 0.5, d), rtol=1e-5, atol=1e-6)


def test_dimension_numbers_prefix_applies_to_the_subtree() -> None:
    rng = np.random.default_rng(4)
    params, updates = _enc_dec(rng), _enc_dec(rng)
    dims = {"enc": OrthoDims(vector_axis=1, column_axis=0), "dec": None}
    new = _update(jop.add_orthogonality_penalty(0.5, dimension_numbers=dims), updates, params)
    for k in ("w1", "w2"):
        expected = updates["enc"][k] + _ref_grad(params["enc"][k], 0.5, OrthoDims(1, 0))
        np.testing.assert_allclose(new["enc"][k], expected, rtol=1e-5, atol=1e-6)
    assert _same_bits(new["dec"]["w"], updates["dec"]["w"])
    assert _same_bits(new["dec"]["b"], updates["dec"]["b"])


def test_dimension_numbers_single_orthodims_applies_to_every_leaf() -> None:
    rng = np.random.default_rng(5)
    params = _tree(rng, {"a": (4, 6), "b": (3, 5)})
    tx = jop.add_orthogonality_penalty(1.0, dimension_numbers=OrthoDims(1, 0))
    new = _update(tx, jax.tree.map(jnp.zeros_like, params), params)
    for k in params:
        expected = _ref_grad(params[k], 1.0, OrthoDims(1, 0))
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-6)


def test_dimension_numbers_callable_receives_params() -> None:
    rng = np.random.default_rng(6)
    params, updates = _enc_dec(rng), _enc_dec(rng)
    seen: list[Any] = []

    def equinox_style(p: Any) -> Any:
        seen.append(jax.tree.structure(p))
        return jax.tree.map(lambda x: OrthoDims(1, 0) if x.ndim == 2 else None, p)

    tx = jop.add_orthogonality_penalty(0.5, dimension_numbers=equinox_style)
    new = _update(tx, updates, params)
    assert seen == [jax.tree.structure(params)]
    for k in ("w1", "w2"):
        expected = updates["enc"][k] + _ref_grad(params["enc"][k], 0.5, OrthoDims(1, 0))
        np.testing.assert_allclose(new["enc"][k], expected, rtol=1e-5, atol=1e-6)
    expected = updates["dec"]["w"] + _ref_grad(params["dec"]["w"], 0.5, OrthoDims(1, 0))
    np.testing.assert_allclose(new["dec"]["w"], expected, rtol=1e-5, atol=1e-6)
    assert _same_bits(new["dec"]["b"], updates["dec"]["b"])


@pytest.mark.parametrize(
    "dims",
    [
        {"enc": OrthoDims(), "dek": None},  # a misspelt key
        {"enc": {"w1": OrthoDims()}, "dec": None},  # a leaf missing
        {"enc": OrthoDims(), "dec": {"w": None, "b": None, "extra": None}},  # a leaf too many
        {"enc": OrthoDims(), "dec": {"w": {"deeper": OrthoDims()}, "b": None}},  # too deep
    ],
)
def test_dimension_numbers_that_do_not_match_raise(dims: Any) -> None:
    params = _enc_dec(np.random.default_rng(7))
    tx = jop.add_orthogonality_penalty(0.5, dimension_numbers=dims)
    with pytest.raises(ValueError, match="`dimension_numbers` does not match"):
        _update(tx, params, params)
    with pytest.raises(ValueError, match="`dimension_numbers` does not match"):
        jop.tree_orthogonality_penalty(params, 0.5, dimension_numbers=dims)


@pytest.mark.parametrize("bad", [(1, 0), 1, "rows"])
def test_dimension_numbers_with_a_bad_entry_raise(bad: Any) -> None:
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    tx = jop.add_orthogonality_penalty(0.5, dimension_numbers={"w": bad, "b": None})
    with pytest.raises(
        TypeError, match="`dimension_numbers` must give an OrthoDims, a ConvDims or None"
    ):
        _update(tx, params, params)


def test_explicit_layout_that_does_not_fit_raises_the_core_error() -> None:
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    rank = jop.add_orthogonality_penalty(0.5, dimension_numbers={"w": None, "b": OrthoDims()})
    # The core's message, prefixed with the leaf's path so it can be found in a big model.
    with pytest.raises(ValueError, match=r"params leaf \['b'\]: `phi` must have rank >= 2"):
        jax.jit(rank.update)(params, rank.init(params), params)
    with pytest.raises(ValueError, match=r"params leaf \['b'\]: `phi` must have rank >= 2"):
        jop.tree_orthogonality_penalty(
            params, 0.5, dimension_numbers={"w": None, "b": OrthoDims()}
        )
    axis = jop.add_orthogonality_penalty(0.5, dimension_numbers=OrthoDims(0, 2))
    with pytest.raises(ValueError, match=r"params leaf \['w'\]: `column_axis`=2 is out of range"):
        _update(axis, {"w": params["w"]}, {"w": params["w"]})


# --------------------------------------------------------------------------- masks


def test_mask_pytree() -> None:
    rng = np.random.default_rng(8)
    params = _tree(rng, {"a": (4, 3), "b": (5, 2), "c": (3, 3)})
    updates = _tree(rng, {"a": (4, 3), "b": (5, 2), "c": (3, 3)})
    tx = jop.add_orthogonality_penalty(0.5, mask={"a": True, "b": False, "c": True})
    new = _update(tx, updates, params)
    assert _same_bits(new["b"], updates["b"])  # a matrix the default would penalise
    for k in ("a", "c"):
        expected = updates[k] + _ref_grad(params[k], 0.5)
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-6)


def test_mask_prefix() -> None:
    rng = np.random.default_rng(9)
    params, updates = _enc_dec(rng), _enc_dec(rng)
    tx = jop.add_orthogonality_penalty(0.5, mask={"enc": False, "dec": True})
    new = _update(tx, updates, params)
    assert _same_bits(new["enc"]["w1"], updates["enc"]["w1"])
    assert _same_bits(new["enc"]["w2"], updates["enc"]["w2"])
    assert _same_bits(new["dec"]["b"], updates["dec"]["b"])  # rank 1
    expected = updates["dec"]["w"] + _ref_grad(params["dec"]["w"], 0.5)
    np.testing.assert_allclose(new["dec"]["w"], expected, rtol=1e-5, atol=1e-6)


def test_mask_callable() -> None:
    rng = np.random.default_rng(10)
    params = _tree(rng, {"a": (4, 3), "b": (5, 2), "c": (3, 3)})
    updates = _tree(rng, {"a": (4, 3), "b": (5, 2), "c": (3, 3)})
    calls: list[Any] = []

    def not_b(tree: Any) -> Any:
        calls.append(jax.tree.structure(tree))
        return {k: k != "b" for k in tree}

    tx = jop.add_orthogonality_penalty(0.5, mask=not_b)
    new = _update(tx, updates, params)
    assert calls and all(c == jax.tree.structure(params) for c in calls)
    assert _same_bits(new["b"], updates["b"])
    for k in ("a", "c"):
        expected = updates[k] + _ref_grad(params[k], 0.5)
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-6)


def test_mask_prefix_with_detailed_dimension_numbers() -> None:
    # The mask removes a subtree that dimension_numbers describes leaf by leaf.
    rng = np.random.default_rng(11)
    params, updates = _enc_dec(rng), _enc_dec(rng)
    dims = {
        "enc": {"w1": OrthoDims(), "w2": OrthoDims()},
        "dec": {"w": OrthoDims(1, 0), "b": None},
    }
    tx = jop.add_orthogonality_penalty(
        0.5, mask={"enc": False, "dec": True}, dimension_numbers=dims
    )
    new = _update(tx, updates, params)
    assert _same_bits(new["enc"]["w1"], updates["enc"]["w1"])
    assert _same_bits(new["enc"]["w2"], updates["enc"]["w2"])
    expected = updates["dec"]["w"] + _ref_grad(params["dec"]["w"], 0.5, OrthoDims(1, 0))
    np.testing.assert_allclose(new["dec"]["w"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [False, True, jnp.array(True)])
def test_mask_that_is_a_single_value_raises(mask: Any) -> None:
    with pytest.raises(ValueError, match="static_args"):
        jop.add_orthogonality_penalty(0.5, mask=mask)
    with pytest.raises(ValueError, match="static_args"):
        jop.tree_orthogonality_penalty({"w": jnp.eye(2)}, 0.5, mask=mask)


# --------------------------------------------------------------------------- beta


def test_schedule_follows_the_step_count() -> None:
    rng = np.random.default_rng(12)
    params = _tree(rng, {"w": (5, 3), "b": (3,)})
    zeros = jax.tree.map(jnp.zeros_like, params)
    schedule = optax.linear_schedule(init_value=0.1, end_value=0.4, transition_steps=3)
    for tx in (
        jop.add_orthogonality_penalty(schedule),
        jop.add_orthogonality_penalty(schedule, mask={"w": True, "b": False}),
    ):
        state = tx.init(params)
        step = jax.jit(tx.update)
        unit = _ref_grad(params["w"], 1.0)
        for t in range(5):
            assert int(optax.tree.get(state, "count")) == t
            new, state = step(zeros, state, params)
            np.testing.assert_allclose(new["w"], float(schedule(t)) * unit, rtol=1e-5, atol=1e-6)
        assert int(optax.tree.get(state, "count")) == 5


def test_constant_beta_keeps_a_count_and_zero_is_the_identity() -> None:
    params = {"w": 2 * jnp.eye(3)}
    updates = {"w": jnp.arange(9.0).reshape(3, 3)}
    tx = jop.add_orthogonality_penalty(0.0)
    state = tx.init(params)
    assert state == jop.AddOrthogonalityPenaltyState(count=jnp.zeros([], jnp.int32))
    new, state = tx.update(updates, state, params)
    assert _same_bits(new["w"], updates["w"])
    assert int(state.count) == 1 and state.count.dtype == jnp.int32


def test_array_beta() -> None:
    params = {"w": 2 * jnp.eye(3)}
    new = _update(jop.add_orthogonality_penalty(jnp.array(0.5)), {"w": jnp.zeros((3, 3))}, params)
    np.testing.assert_allclose(new["w"], _ref_grad(params["w"], 0.5), rtol=1e-6)


# --------------------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_matches_and_changing_beta_changes_the_update() -> None:
    rng = np.random.default_rng(13)
    params = _tree(rng, {"w": (5, 3), "b": (3,)})
    updates = _tree(rng, {"w": (5, 3), "b": (3,)})
    tx = optax.inject_hyperparams(jop.add_orthogonality_penalty)(beta=0.2)
    state = jax.jit(tx.init)(params)
    step = jax.jit(tx.update)
    new, state = step(updates, state, params)
    plain = _update(jop.add_orthogonality_penalty(0.2), updates, params)
    np.testing.assert_allclose(new["w"], plain["w"], rtol=1e-6)
    assert _same_bits(new["b"], updates["b"])

    state.hyperparams["beta"] = jnp.array(0.9, jnp.float32)
    changed, _ = step(updates, state, params)
    expected = updates["w"] + _ref_grad(params["w"], 0.9)
    np.testing.assert_allclose(changed["w"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed["w"], new["w"])


def test_inject_hyperparams_with_a_schedule() -> None:
    params = {"w": jnp.asarray(_rand(np.random.default_rng(14), 4, 3), jnp.float32)}
    zeros = {"w": jnp.zeros((4, 3))}
    tx = optax.inject_hyperparams(jop.add_orthogonality_penalty)(
        beta=lambda c: 0.5 * (c + 1).astype(jnp.float32)
    )
    state = tx.init(params)
    unit = _ref_grad(params["w"], 1.0)
    for t in range(3):
        new, state = tx.update(zeros, state, params)
        np.testing.assert_allclose(new["w"], 0.5 * (t + 1) * unit, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_recipe_with_callable_mask_and_dimension_numbers() -> None:
    rng = np.random.default_rng(15)
    params, updates = _enc_dec(rng), _enc_dec(rng)

    def mask(p: Any) -> Any:
        return {"enc": {"w1": True, "w2": False}, "dec": True}

    def dims(p: Any) -> Any:
        return jax.tree.map(lambda x: OrthoDims(1, 0) if x.ndim == 2 else None, p)

    tx = optax.inject_hyperparams(
        jop.add_orthogonality_penalty, static_args=("mask", "dimension_numbers")
    )(beta=0.5, mask=mask, dimension_numbers=dims)
    new, _ = jax.jit(tx.update)(updates, jax.jit(tx.init)(params), params)
    assert _same_bits(new["enc"]["w2"], updates["enc"]["w2"])  # masked out
    assert _same_bits(new["dec"]["b"], updates["dec"]["b"])  # rank 1
    for p, u, n in (
        (params["enc"]["w1"], updates["enc"]["w1"], new["enc"]["w1"]),
        (params["dec"]["w"], updates["dec"]["w"], new["dec"]["w"]),
    ):
        np.testing.assert_allclose(n, u + _ref_grad(p, 0.5, OrthoDims(1, 0)), rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_without_static_args_raises_for_a_callable_mask() -> None:
    # optax would call the mask with the step count, get one bool, and mask out
    # everything: a silent no-op. It raises instead.
    params = {"w": jnp.eye(3)}
    tx = optax.inject_hyperparams(jop.add_orthogonality_penalty)(
        beta=0.5, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
    )
    with pytest.raises(ValueError, match="static_args"):
        tx.init(params)


def test_inject_hyperparams_with_a_callable_subgradient_needs_static_args() -> None:
    params = {"w": jnp.array([[1.02, 0.0], [0.0, 2.0]])}  # X = diag(0.0404, 3)
    zeros = {"w": jnp.zeros((2, 2))}
    dz = jop.deadzone(0.05)
    tx = optax.inject_hyperparams(jop.add_orthogonality_penalty, static_args="subgradient")(
        beta=0.5, subgradient=dz
    )
    new, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(new["w"], _ref_grad(params["w"], 0.5, subgradient=dz), rtol=1e-6)
    assert new["w"][0, 0] == 0  # inside the dead zone
    wrong = optax.inject_hyperparams(jop.add_orthogonality_penalty)(beta=0.5, subgradient=dz)
    with pytest.raises(TypeError, match="`subgradient` must be static"):
        wrong.init(params)


# --------------------------------------------------------------------------- optax protocol


def test_params_none_raises() -> None:
    params = {"w": jnp.eye(3)}
    for tx in (
        jop.add_orthogonality_penalty(0.5),
        jop.add_orthogonality_penalty(0.5, mask={"w": True}),
    ):
        with pytest.raises(ValueError, match="params"):
            tx.update(params, tx.init(params))


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
@pytest.mark.parametrize(
    "make",
    [
        lambda: jop.add_orthogonality_penalty(0.1),
        lambda: jop.add_orthogonality_penalty(optax.cosine_decay_schedule(0.1, 10)),
        lambda: jop.add_orthogonality_penalty(0.1, mask=lambda p: {"w": True, "b": False}),
        lambda: optax.inject_hyperparams(jop.add_orthogonality_penalty)(beta=0.1),
    ],
    ids=["constant", "schedule", "callable-mask", "inject"],
)
def test_no_retrace_on_the_second_step(make: Callable[[], Any]) -> None:
    opt = optax.chain(make(), optax.adam(1e-2))
    traces = []

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        traces.append(None)  # a Python side effect: runs once per trace
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.eye(4, 3) + 0.1, "b": jnp.zeros(3)}
    state = opt.init(params)
    first = params
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1
    assert not np.allclose(params["w"], first["w"])


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
    "make",
    [
        lambda: jop.add_orthogonality_penalty(0.5),
        lambda: optax.chain(jop.add_orthogonality_penalty(0.5), optax.adam(1e-2)),
        lambda: optax.chain(optax.scale_by_adam(), jop.add_orthogonality_penalty(0.5)),
        lambda: optax.inject_hyperparams(jop.add_orthogonality_penalty)(beta=0.5),
        lambda: jop.add_orthogonality_penalty(optax.linear_schedule(0.1, 0.5, 4)),
    ],
    ids=["alone", "coupled-adam", "decoupled", "inject", "schedule"],
)
def test_updates_keep_the_params_dtype(make: Callable[[], Any], dtype: Any) -> None:
    rng = np.random.default_rng(16)
    params = {
        "w": jnp.asarray(_rand(rng, 5, 3), dtype),
        "k": jnp.asarray(_rand(rng, 2, 3, 3), dtype),
        "b": jnp.ones(3, dtype),
    }
    grads = jax.tree.map(jnp.ones_like, params)
    opt = make()
    updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    assert jax.tree.map(lambda u: u.dtype, updates) == {"w": dtype, "k": dtype, "b": dtype}


def test_bfloat16_update_is_close_to_the_reference() -> None:
    rng = np.random.default_rng(17)
    phi = jnp.asarray(_rand(rng, 6, 4), jnp.bfloat16)
    new = _update(jop.add_orthogonality_penalty(0.5), {"w": jnp.zeros_like(phi)}, {"w": phi})
    expected = _ref_grad(np.asarray(phi, np.float64), 0.5)  # the same rounded input
    np.testing.assert_allclose(np.asarray(new["w"], np.float64), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_multisteps_accumulates_then_adds_the_penalty_once(dtype: Any) -> None:
    rng = np.random.default_rng(18)
    params = {"w": jnp.asarray(_rand(rng, 5, 3), dtype), "b": jnp.ones(3, dtype)}
    g1, g2 = (
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), params) for _ in "12"
    )
    lr, beta = 0.1, 0.5
    opt = optax.MultiSteps(
        optax.chain(jop.add_orthogonality_penalty(beta), optax.sgd(lr)), every_k_schedule=2
    )
    state = jax.jit(opt.init)(params)
    step = jax.jit(opt.update)
    first, state = step(g1, state, params)
    assert jax.tree.all(jax.tree.map(lambda u: u.dtype == dtype and not u.any(), first))
    second, state = step(g2, state, params)
    assert jax.tree.all(jax.tree.map(lambda u: u.dtype == dtype, second))
    mean = jax.tree.map(
        lambda a, b: (np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2, g1, g2
    )
    expected_w = -lr * (mean["w"] + _ref_grad(np.asarray(params["w"], np.float64), beta))
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(second["w"], np.float64), expected_w, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        np.asarray(second["b"], np.float64), -lr * mean["b"], rtol=tol, atol=tol
    )


# --------------------------------------------------------------------------- chains


def _task(params: Any) -> jax.Array:
    target = jnp.arange(15.0).reshape(5, 3) / 15
    return jnp.sum((params["w"] - target) ** 2) + jnp.sum(params["b"] ** 2)


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
@pytest.mark.parametrize(
    "opt",
    [
        optax.sgd(0.05),
        optax.sgd(0.05, momentum=0.9),
        optax.adam(0.05),
        optax.adamw(0.05, weight_decay=0.1),
    ],
    ids=["sgd", "momentum", "adam", "adamw"],
)
def test_coupled_chain_is_the_optimizer_on_loss_plus_tree_penalty(opt: Any) -> None:
    # Before the optimizer, the transform is the same as adding the penalty to the loss.
    beta = 0.3
    chained = optax.chain(jop.add_orthogonality_penalty(beta), opt)
    total = jax.value_and_grad(lambda p: _task(p) + jop.tree_orthogonality_penalty(p, beta))
    rng = np.random.default_rng(19)
    params = {"w": jnp.asarray(_rand(rng, 5, 3), jnp.float32), "b": jnp.ones(3)}
    p1, s1 = params, chained.init(params)
    p2, s2 = params, opt.init(params)
    for _ in range(5):
        u1, s1 = chained.update(jax.grad(_task)(p1), s1, p1)
        p1 = optax.apply_updates(p1, u1)
        u2, s2 = opt.update(total(p2)[1], s2, p2)
        p2 = optax.apply_updates(p2, u2)
    for k in params:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(p1["w"], params["w"])


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
def test_decoupled_chain_adds_the_penalty_after_adam() -> None:
    beta, lr = 0.3, 0.05
    decoupled = optax.chain(
        optax.scale_by_adam(),
        jop.add_orthogonality_penalty(beta),
        optax.scale_by_learning_rate(lr),
    )
    adam = optax.scale_by_adam()
    rng = np.random.default_rng(20)
    params = {"w": jnp.asarray(_rand(rng, 5, 3), jnp.float32), "b": jnp.ones(3)}
    s1, s2 = decoupled.init(params), adam.init(params)
    for _ in range(3):
        g = jax.grad(_task)(params)
        u, s1 = decoupled.update(g, s1, params)
        d, s2 = adam.update(g, s2, params)
        np.testing.assert_allclose(
            u["w"], -lr * (d["w"] + _ref_grad(params["w"], beta)), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(u["b"], -lr * d["b"], rtol=1e-6)
        params = optax.apply_updates(params, u)
    # Not the coupled update: Adam's scaling of the penalty's gradient differs.
    coupled = optax.chain(jop.add_orthogonality_penalty(beta), optax.adam(lr))
    c, _ = coupled.update(g, coupled.init(params), params)
    u, _ = decoupled.update(g, decoupled.init(params), params)
    assert not np.allclose(c["w"], u["w"], atol=1e-4)


# --------------------------------------------------------------------------- the pytree penalty


SELECTIONS = {
    "default": {},
    "mask-pytree": {"mask": {"enc": {"w1": True, "w2": False}, "dec": True}},
    "mask-prefix": {"mask": {"enc": False, "dec": True}},
    "mask-callable": {"mask": lambda p: {"enc": True, "dec": {"w": False, "b": True}}},
    "dims-prefix": {"dimension_numbers": {"enc": OrthoDims(1, 0), "dec": None}},
    "dims-callable": {
        "dimension_numbers": lambda p: jax.tree.map(
            lambda x: OrthoDims(1, 0) if x.ndim > 1 else None, p
        )
    },
    "both": {"mask": {"enc": True, "dec": False}, "dimension_numbers": OrthoDims(1, 0)},
}
# Which leaves each selection penalises, with which layout.
EXPECTED = {
    "default": {("enc", "w1"): OrthoDims(), ("enc", "w2"): OrthoDims(), ("dec", "w"): OrthoDims()},
    "mask-pytree": {("enc", "w1"): OrthoDims(), ("dec", "w"): OrthoDims()},
    "mask-prefix": {("dec", "w"): OrthoDims()},
    "mask-callable": {("enc", "w1"): OrthoDims(), ("enc", "w2"): OrthoDims()},
    "dims-prefix": {("enc", "w1"): OrthoDims(1, 0), ("enc", "w2"): OrthoDims(1, 0)},
    "dims-callable": {
        ("enc", "w1"): OrthoDims(1, 0),
        ("enc", "w2"): OrthoDims(1, 0),
        ("dec", "w"): OrthoDims(1, 0),
    },
    "both": {("enc", "w1"): OrthoDims(1, 0), ("enc", "w2"): OrthoDims(1, 0)},
}


@pytest.mark.parametrize("name", SELECTIONS)
def test_tree_penalty_matches_reference_and_the_transform(name: str) -> None:
    selection = SELECTIONS[name]
    rng = np.random.default_rng(21)
    with jax.enable_x64(True):
        params = _enc_dec(rng)
        value = jop.tree_orthogonality_penalty(params, 0.4, norm="squared", **selection)
        expected = sum(
            _ref_value(params[a][b], 0.4, d, norm="squared")
            for (a, b), d in EXPECTED[name].items()
        )
        np.testing.assert_allclose(value, expected, rtol=1e-10)

        # Same leaves, same layouts: the transform adds exactly jax.grad of the sum.
        grad = jax.grad(jop.tree_orthogonality_penalty)(params, 0.4, norm="squared", **selection)
        zeros = jax.tree.map(jnp.zeros_like, params)
        tx = jop.add_orthogonality_penalty(0.4, norm="squared", **selection)
        added = _update(tx, zeros, params)
        for a, b in (("enc", "w1"), ("enc", "w2"), ("dec", "w"), ("dec", "b")):
            np.testing.assert_allclose(added[a][b], grad[a][b], rtol=1e-12, atol=1e-14)
            if (a, b) in EXPECTED[name]:
                ref_grad = _ref_grad(params[a][b], 0.4, EXPECTED[name][(a, b)], norm="squared")
                np.testing.assert_allclose(added[a][b], ref_grad, rtol=1e-10, atol=1e-12)
            else:
                assert not np.asarray(added[a][b]).any()


def test_tree_penalty_gradient_in_beta_and_empty_selection() -> None:
    params = {"w": 2 * jnp.eye(3), "b": jnp.ones(3)}
    assert float(jax.grad(jop.tree_orthogonality_penalty, argnums=1)(params, 0.5)) == 9.0
    empty = jop.tree_orthogonality_penalty(params, 0.5, mask={"w": False, "b": True})
    assert empty.shape == () and float(empty) == 0.0
    assert float(jax.jit(jop.tree_orthogonality_penalty)(params, 0.5)) == 4.5


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"norm": "l2"}, ValueError, "`norm` must be"),
        ({"subgradient": "sign"}, ValueError, "`subgradient` must be"),
        ({"off_diagonal": "yes"}, TypeError, "`off_diagonal` must be a Python bool"),
        ({"normalize": 1}, TypeError, "`normalize` must be a Python bool"),
        ({"beta": jnp.ones(2)}, ValueError, "`beta` must be a scalar"),
        ({"beta": True}, TypeError, "`beta` must be a real scalar"),
    ],
)
def test_bad_options_raise_at_construction(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    kwargs = {"beta": 0.5, **kwargs}
    beta = kwargs.pop("beta")
    with pytest.raises(error, match=match):
        jop.add_orthogonality_penalty(beta, **kwargs)


def test_nan_in_params_reaches_the_update() -> None:
    params = {"w": jnp.eye(3).at[0, 1].set(jnp.nan)}
    new = _update(jop.add_orthogonality_penalty(0.5), {"w": jnp.zeros((3, 3))}, params)
    assert np.isnan(new["w"]).any()


def test_none_leaves_are_skipped() -> None:
    # equinox filters non-arrays to None in both params and updates.
    params = {"w": jnp.eye(3) * 2, "act": None}
    new = _update(
        jop.add_orthogonality_penalty(0.5), {"w": jnp.zeros((3, 3)), "act": None}, params
    )
    assert new["act"] is None
    np.testing.assert_allclose(new["w"], _ref_grad(params["w"], 0.5), rtol=1e-6)


def test_default_selection_skips_integer_and_boolean_matrices() -> None:
    # Counters or masks of rank 2 that sit in a params tree are not weights.
    params = {"w": jnp.eye(3) * 2, "idx": jnp.ones((3, 3), jnp.int32), "m": jnp.ones((2, 2), bool)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    new = _update(jop.add_orthogonality_penalty(0.5), zeros, params)
    np.testing.assert_allclose(new["w"], _ref_grad(params["w"], 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new["idx"], zeros["idx"])
    np.testing.assert_array_equal(new["m"], zeros["m"])
    assert float(jop.tree_orthogonality_penalty(params, 0.5)) == 0.5 * 3 * 3


# --------------------------------------------------------------------------- lazy: every=k


@pytest.mark.parametrize("every", [1, 4, 16])
def test_every_adds_k_times_the_pull_on_multiples_of_k_and_nothing_else(every: int) -> None:
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(_rand(rng, 6, 3), jnp.float32), "b": jnp.ones(3)}
    g = {"w": jnp.asarray(_rand(rng, 6, 3), jnp.float32), "b": jnp.full(3, 0.5)}
    tx = jop.add_orthogonality_penalty(0.3, every=every)
    state, step = tx.init(params), jax.jit(tx.update)
    pull = _ref_grad(params["w"], 0.3)
    for count in range(2 * every + 1):
        u, state = step(g, state, params)
        expected = np.asarray(g["w"]) + (every * pull if count % every == 0 else 0)
        np.testing.assert_allclose(u["w"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(u["b"], g["b"])  # rank 1: never touched
    assert int(state.count) == 2 * every + 1


def test_every_with_a_schedule_uses_beta_at_the_applying_step() -> None:
    params = {"w": 2 * jnp.eye(2)}
    zeros = {"w": jnp.zeros((2, 2))}
    tx = jop.add_orthogonality_penalty(optax.linear_schedule(0.0, 1.0, 8), every=4)
    state = tx.init(params)
    seen = []
    for _ in range(9):
        u, state = tx.update(zeros, state, params)
        seen.append(float(u["w"][0, 0]))
    # beta(c) = c / 8 at c = 0, 4, 8; the pull of 2I at beta is 2 beta * 2 * 1 = 4 beta.
    assert seen == [0.0, 0, 0, 0, 4 * 4 * 0.5, 0, 0, 0, 4 * 4 * 1.0]


def test_every_off_steps_form_no_gram_matrix() -> None:
    # The cond's skipping branch has no dot_general: the cost really falls by ~k.
    params = {"w": jnp.ones((64, 32))}
    tx = jop.add_orthogonality_penalty(1.0, every=4)
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
    (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    # The printed jaxpr of a branch includes the jaxprs nested in it (pjit, custom rules).
    skip, apply = (str(branch).count("dot_general") for branch in cond.params["branches"])
    assert skip == 0
    assert apply >= 2  # the Gram matrix and the product
    # every=1 has no cond at all.
    tx1 = jop.add_orthogonality_penalty(1.0)
    jaxpr1 = jax.make_jaxpr(tx1.update)(params, tx1.init(params), params)
    assert not any(e.primitive.name == "cond" for e in jaxpr1.eqns)


def test_every_with_a_mask_and_a_callable_dimension_numbers() -> None:
    rng = np.random.default_rng(5)
    params = {"a": jnp.asarray(_rand(rng, 5, 2), jnp.float32), "c": jnp.eye(3)}
    g = jax.tree.map(jnp.zeros_like, params)
    tx = jop.add_orthogonality_penalty(
        0.5,
        every=2,
        mask={"a": True, "c": False},
        dimension_numbers=lambda p: jax.tree.map(lambda _: OrthoDims(), p),
    )
    state = tx.init(params)
    u0, state = tx.update(g, state, params)
    u1, state = tx.update(g, state, params)
    np.testing.assert_allclose(u0["a"], 2 * _ref_grad(params["a"], 0.5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(u1["a"], 0)
    np.testing.assert_array_equal(u0["c"], 0)


@pytest.mark.parametrize("static", [True, False], ids=["static", "traced"])
def test_every_under_inject_hyperparams(static: bool) -> None:
    # Without static_args, inject_hyperparams traces every (an int hyperparameter):
    # the period is then read at run time, with the same updates.
    params = {"w": 2 * jnp.eye(2)}
    zeros = {"w": jnp.zeros((2, 2))}
    args = ("every",) if static else ()
    tx = optax.inject_hyperparams(jop.add_orthogonality_penalty, static_args=args)(
        beta=1.0, every=3
    )
    state, step = tx.init(params), jax.jit(tx.update)
    seen = []
    for _ in range(4):
        u, state = step(zeros, state, params)
        seen.append(float(u["w"][0, 0]))
    assert seen == [12.0, 0.0, 0.0, 12.0]
    if not static:
        state.hyperparams["every"] = jnp.asarray(0)  # a period below 1: NaN, not silence
        u, _ = step(zeros, state, params)
        assert bool(jnp.all(jnp.isnan(u["w"])))


@pytest.mark.parametrize(
    ("every", "error"),
    [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("4", TypeError)],
)
def test_bad_every_raises_at_construction(every: Any, error: type) -> None:
    with pytest.raises(error, match="`every`"):
        jop.add_orthogonality_penalty(1.0, every=every)


def test_every_accepts_numpy_and_concrete_jax_ints() -> None:
    params = {"w": 2 * jnp.eye(2)}
    zeros = {"w": jnp.zeros((2, 2))}
    for every in (np.int64(2), jnp.asarray(2)):
        tx = jop.add_orthogonality_penalty(1.0, every=every)
        u, _ = tx.update(zeros, tx.init(params), params)
        assert float(u["w"][0, 0]) == 8.0


# --------------------------------------------------------------------------- optax's own checks


def test_none_updates_pass_through_as_none() -> None:
    # optax's _adding_test: update(None, state, params) returns None, masked or not;
    # a None leaf or subtree of the updates stays None.
    params = {"w": 2 * jnp.eye(2), "sub": {"v": jnp.eye(3, 2)}}
    for tx in (
        jop.add_orthogonality_penalty(1.0),
        jop.add_orthogonality_penalty(1.0, every=2),
        jop.add_orthogonality_penalty(1.0, mask={"w": True, "sub": False}),
    ):
        state = tx.init(params)
        u, new_state = tx.update(None, state, params)
        assert u is None
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
    tx = jop.add_orthogonality_penalty(1.0)
    u, _ = tx.update({"w": jnp.zeros((2, 2)), "sub": None}, tx.init(params), params)
    assert u["sub"] is None
    np.testing.assert_array_equal(u["w"], 8 * jnp.eye(2) / 2)


def test_masked_transform_keeps_the_extra_args_interface() -> None:
    params = {"w": 2 * jnp.eye(2), "b": jnp.ones(2)}
    tx = jop.add_orthogonality_penalty(1.0, mask={"w": True, "b": False})
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params, loss=jnp.float32(1.0))
    np.testing.assert_array_equal(u["w"], 4 * jnp.eye(2))
    # Inside a chain with a transform that takes extra args (as optax's tests do).
    chain = optax.chain(tx, optax.scale_by_learning_rate(0.1))
    u, _ = chain.update(zeros, chain.init(params), params, value=jnp.float32(1.0))
    np.testing.assert_allclose(u["w"], -0.4 * jnp.eye(2))


@pytest.mark.parametrize("empty", [{}, [], ()], ids=["dict", "list", "tuple"])
def test_empty_mask_on_empty_params(empty: Any) -> None:
    # optax.masked takes an empty container (a tree of no leaves).
    tx = jop.add_orthogonality_penalty(1.0, mask=empty)
    state = tx.init(empty)
    u, _ = tx.update(empty, state, empty)
    assert u == empty
    assert jop.tree_orthogonality_penalty(empty, 1.0, mask=empty) == 0
    with pytest.raises(ValueError, match="`mask` does not match"):
        tx.init({"w": jnp.eye(2)})
