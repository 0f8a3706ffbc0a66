"""optax's own test suites, adapted to the three transforms.

The checks of ``optax/contrib/_common_test.py`` (extra args, no recompilation, tree
map of the state, inject_hyperparams, dtypes, MultiSteps, dtype-stable state under
``lax.cond``), ``optax/transforms/_masking_test.py`` (prefix, nested and callable
masks, empty containers, mismatches, the masked state's structure),
``optax/transforms/_adding_test.py`` (``update(None, ...)``) and
``optax/_src/update_test.py`` (``apply_updates`` with ``None``), run on
``add_orthogonality_penalty`` (every step and lazy), ``landing`` and
``project_orthonormal``. Each transform is checked against what it must compute
where optax checks a value.
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

Factory = Callable[..., optax.GradientTransformation]

TRANSFORMS: dict[str, Factory] = {
    "penalty": lambda **kw: jop.add_orthogonality_penalty(0.1, **kw),
    "lazy": lambda **kw: jop.add_orthogonality_penalty(0.1, every=2, **kw),
    "landing": lambda **kw: jop.landing(1.0, **kw),
    "project": lambda **kw: jop.project_orthonormal(**kw),
}
# The factories and the numeric hyperparameters that inject_hyperparams takes.
INJECTABLE: dict[str, tuple[Callable[..., Any], dict[str, Any], tuple[str, ...]]] = {
    "penalty": (jop.add_orthogonality_penalty, {"beta": 0.1}, ()),
    "lazy": (jop.add_orthogonality_penalty, {"beta": 0.1, "every": 2}, ("every",)),
    "landing": (jop.landing, {"lam": 1.0}, ()),
}


def _params(dtype: Any = jnp.float32) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    w = np.linalg.qr(rng.normal(size=(5, 3)))[0] + 0.05 * rng.normal(size=(5, 3))
    return {"w": jnp.asarray(w, dtype), "b": jnp.ones(3, dtype)}


def _objective(p: dict[str, Any]) -> jax.Array:
    a = jnp.arange(15, dtype=p["w"].dtype).reshape(5, 3) / 15
    return jnp.sum((p["w"] - a) ** 2) + jnp.sum(p["b"] ** 2)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_accepts_extra_args_and_does_not_recompile(name: str, masked: bool) -> None:
    mask = {"w": True, "b": False} if masked else None
    tx = TRANSFORMS[name](mask=mask)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)

    @jax.jit
    def step(params: Any, state: Any) -> Any:
        grads = jax.grad(_objective)(params)
        # Called directly, not through optax.chain: the transform itself takes them.
        updates, state = tx.update(grads, state, params, unexpected_extra_arg=1)
        return optax.apply_updates(params, optax.scale(-0.01).update(updates, None)[0]), state

    params, state = _params(), tx.init(_params())
    params, state = step(params, state)
    with jax.log_compiles():
        before = step._cache_size()  # type: ignore[attr-defined]
        params, state = step(params, state)
        assert step._cache_size() == before  # type: ignore[attr-defined]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_tree_map_params_keeps_the_state(name: str, masked: bool) -> None:
    tx = TRANSFORMS[name](mask={"w": True, "b": False} if masked else None)
    state = tx.init(_params())
    mapped = optax.tree.map_params(tx, lambda v: v, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, mapped, state)


@pytest.mark.optax_promotion
@pytest.mark.parametrize("name", INJECTABLE)
def test_inject_hyperparams_gives_the_same_updates_and_state(name: str) -> None:
    factory, hparams, static = INJECTABLE[name]
    tx = factory(**hparams)
    injected = optax.inject_hyperparams(factory, static_args=static)(**hparams)
    params = _params()
    grads = jax.grad(_objective)(params)
    state, istate = jax.jit(tx.init)(params), jax.jit(injected.init)(params)
    for _ in range(3):  # the lazy one applies at counts 0 and 2, not 1
        u, state = jax.jit(tx.update)(grads, state, params)
        v, istate = jax.jit(injected.update)(grads, istate, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u, v)
        jax.tree.map(np.testing.assert_array_equal, istate.inner_state, state)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_updates_keep_the_params_dtype(name: str, dtype: Any) -> None:
    tx = TRANSFORMS[name]()
    params = _params(dtype)
    grads = jax.grad(_objective)(params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}


@pytest.mark.optax_promotion  # MultiSteps's own arithmetic
@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_multisteps_accumulates_first(name: str, dtype: Any) -> None:
    opt = optax.MultiSteps(TRANSFORMS[name](), every_k_schedule=4)
    params = _params(dtype)
    grads = jax.grad(_objective)(params)
    updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, jnp.zeros_like(u)), updates)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize(
    "dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64], ids=lambda d: d.__name__
)
def test_state_is_dtype_stable_under_cond(name: str, dtype: Any) -> None:
    with jax.enable_x64(dtype == jnp.float64):
        tx = TRANSFORMS[name]()
        params = _params(dtype)

        @jax.jit
        def step(params: Any, state: Any) -> Any:
            grads = jax.grad(_objective)(params)
            # The compiler cannot see through the predicate: both branches are traced.
            pick = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                pick, lambda: tx.update(grads, state, params), lambda: (params, state)
            )
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        for _ in range(2):
            params, new_state = step(params, state)
            assert jax.tree.leaves(params)[0].dtype == dtype
            assert jax.tree.structure(new_state) == jax.tree.structure(state)
            for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
                assert (a.shape, a.dtype) == (b.shape, b.dtype)
            state = new_state


# --------------------------------------------------------------------------- masking


def _expected(name: str, params: Any, updates: Any, selected: set[str]) -> dict[str, Any]:
    """The transform's update of each selected leaf, from the unmasked transform."""
    tx = TRANSFORMS[name]()
    out = {}
    for key, u in updates.items():
        if key in selected:
            one, _ = tx.update({key: u}, tx.init({key: params[key]}), {key: params[key]})
            out[key] = one[key]
        else:
            out[key] = u
    return out


def _leaves_params() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {k: jnp.asarray(rng.normal(size=(4, 2)), jnp.float32) for k in "acde"}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("use_fn", [False, True], ids=["tree", "callable"])
def test_masked_transforms_exactly_the_masked_in_leaves(name: str, use_fn: bool) -> None:
    mask = {"a": True, "c": False, "d": True, "e": False}
    params = _leaves_params()
    updates = jax.tree.map(lambda x: x / 10, params)
    tx = TRANSFORMS[name](mask=(lambda _: mask) if use_fn else mask)
    got, _ = jax.jit(tx.update)(updates, jax.jit(tx.init)(params), params)
    want = _expected(name, params, updates, {"a", "d"})
    for key in params:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    for key in "ce":  # untouched, bit for bit
        np.testing.assert_array_equal(got[key], updates[key])


@pytest.mark.parametrize("name", TRANSFORMS)
def test_prefix_and_nested_masks(name: str) -> None:
    params = {"x": _leaves_params(), "y": _leaves_params()["a"]}
    updates = jax.tree.map(lambda v: v / 10, params)
    tx = TRANSFORMS[name](mask={"x": False, "y": True})
    got, _ = tx.update(updates, tx.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, got["x"], updates["x"])
    want = _expected(name, {"y": params["y"]}, {"y": updates["y"]}, {"y"})["y"]
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-6)
    # optax.masked around a masked transform (optax issue 271): only a, in both.
    inner = TRANSFORMS[name](mask={"a": True, "c": True, "d": False, "e": False})
    outer = optax.masked(inner, {"a": True, "c": False, "d": True, "e": False})
    leaves = _leaves_params()
    small = jax.tree.map(lambda v: v / 10, leaves)
    got, _ = jax.jit(outer.update)(small, outer.init(leaves), leaves)
    want = _expected(name, leaves, small, {"a"})
    for key in leaves:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("container", [dict, list, tuple])
def test_empty_containers(name: str, container: type) -> None:
    tx = TRANSFORMS[name](mask=container())
    updates, _ = tx.update(container(), tx.init(container()), container())
    assert updates == container()


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("extra_key_in_mask", [False, True])
def test_tree_mismatch_fails(name: str, extra_key_in_mask: bool) -> None:
    mask = {"a": True, "c": False}
    params = {"a": jnp.eye(3, 2), "c": jnp.eye(3, 2)}
    if extra_key_in_mask:
        mask["extra"] = True
    else:
        params["extra"] = jnp.eye(3, 2)
    with pytest.raises(ValueError, match="`mask`"):
        TRANSFORMS[name](mask=mask).init(params)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_callable_pytree_mask_is_a_tree(name: str) -> None:
    # optax issue 913: a callable pytree (an equinox-style module) of bools is a mask.
    class Module:
        def __init__(self, w: Any) -> None:
            self.w = w

        def __call__(self, x: Any) -> Any:
            return self.w @ x

    jax.tree_util.register_pytree_node(Module, lambda m: ((m.w,), None), lambda _, c: Module(*c))
    module = Module(jnp.eye(3, 2) * 2)
    tx = TRANSFORMS[name](mask=Module(False))
    updates, _ = tx.update(module, tx.init(module), module)
    np.testing.assert_array_equal(updates.w, module.w)


def test_masked_state_structure() -> None:
    params = {"a": [jnp.eye(3, 2), (jnp.eye(3, 2), jnp.eye(3, 2))], "b": {"c": jnp.eye(2)}}
    mask = {"a": [True, (True, False)], "b": False}
    state = jax.jit(TRANSFORMS["penalty"](mask=mask).init)(params)
    assert isinstance(state, optax.MaskedState)
    assert isinstance(state.inner_state, jop.AddOrthogonalityPenaltyState)


# --------------------------------------------------------------------------- None


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_update_of_none_is_none(name: str, masked: bool) -> None:
    # optax's _adding_test.test_none_argument, and a None leaf kept as None.
    params = _params()
    tx = TRANSFORMS[name](mask={"w": True, "b": False} if masked else None)
    state = tx.init(params)
    updates, new_state = tx.update(None, state, params)
    assert updates is None
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    updates, _ = tx.update({"w": None, "b": jnp.ones(3)}, state, params)
    assert updates["w"] is None
    np.testing.assert_array_equal(updates["b"], jnp.ones(3))
    # update_test.test_none_argument: apply_updates takes a None param through.
    new = optax.apply_updates({"w": None, "b": params["b"]}, updates)
    assert new["w"] is None


@pytest.mark.parametrize("name", TRANSFORMS)
def test_update_requires_params(name: str) -> None:
    tx = TRANSFORMS[name]()
    with pytest.raises(ValueError, match="params"):
        tx.update(_params(), tx.init(_params()))
