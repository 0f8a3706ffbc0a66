"""The edges that used to hang, crash or mislead (issue "Real models, round 2").

Each test names the item it covers: a zero-initialised head that landing never moves,
a group with Inf that sent the projection's SVD into an endless loop, a symbolic size
under jax.export, leaves summary could not list, an ``every`` too large for the step
count, an update without params, and wide conv kernels taken as the rows of their
flattened matrix.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import jax_orthopenalty as jop

from reference import penalty_and_grad

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- zeros


def _vit_head_params() -> Any:
    """A flax linen model with ViT's zero-initialised classifier head."""
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.Dense(8)(x)
            return nn.Dense(4, kernel_init=nn.initializers.zeros, name="head")(x)

    return Tiny().init(jax.random.key(0), jnp.ones((1, 16)))["params"]


@pytest.mark.parametrize(
    "make", [jop.landing, jop.project_orthonormal], ids=["landing", "project"]
)
def test_zero_initialised_head_is_named_at_init(make: Any) -> None:
    """Item 11: a zero head is a fixed point of landing, and the projection would make it
    an arbitrary orthonormal matrix; init says so, naming the leaf."""
    params = _vit_head_params()
    name = "landing" if make is jop.landing else "project_orthonormal"
    with pytest.warns(
        UserWarning, match=rf"{name}: params leaf \['head'\]\['kernel'\] has 1 all-zero group"
    ):
        make().init(params)
    # The landing field really is 0 there, whatever the task's gradient.
    if make is jop.landing:
        tx = make()
        grads = jax.tree.map(jnp.ones_like, params)
        with pytest.warns(UserWarning, match="all-zero group"):
            state = tx.init(params)
        field, _ = tx.update(grads, state, params)
        np.testing.assert_array_equal(field["head"]["kernel"], 0.0)
        assert float(jnp.abs(field["Dense_0"]["kernel"]).max()) > 0


def test_a_single_zero_column_is_a_fixed_point_of_landing_and_is_named() -> None:
    """Item 11: one zero column (a dead unit) is never moved by landing either."""
    x = jnp.asarray(np.linalg.qr(np.random.default_rng(0).normal(size=(6, 3)))[0], jnp.float32)
    params = {"w": x.at[:, 1].set(0.0)}
    with pytest.warns(UserWarning, match=r"landing: params leaf \['w'\] has 1 zero column"):
        state = jop.landing().init(params)
    field, _ = jop.landing().update({"w": jnp.ones((6, 3))}, state, params)
    np.testing.assert_array_equal(field["w"][:, 1], 0.0)
    assert "1 zero column: landing can't move" in jop.summary(params)


def test_orthonormal_params_give_no_warning() -> None:
    import warnings

    params = {"w": jnp.eye(4, 3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jop.landing().init(params)
        jop.project_orthonormal().init(params)


# --------------------------------------------------------------------------- hangs


def test_projection_of_a_group_with_inf_returns_nan_not_a_hang() -> None:
    """Item 1: LAPACK's SVD iterates for ever on Inf. Run in a child process with a
    timeout, so that a regression fails here instead of hanging the suite."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        import jax_orthopenalty as jop
        params = {"w": jnp.ones((4, 2, 3)) * jnp.eye(4, 3)[:, None, :]}
        bad = jnp.zeros((4, 2, 3)).at[0, 0, 0].set(jnp.inf)
        tx = jop.project_orthonormal()
        u, _ = jax.jit(tx.update)({"w": bad}, tx.init(params), params)
        u = np.asarray(u["w"])
        assert np.isnan(u[:, 0, :]).all(), u      # the group with Inf: NaN
        assert np.isfinite(u[:, 1, :]).all(), u   # the other group: exact
        assert np.abs(u[:, 1, :]).max() < 1e-6
        print("ok")
        """
    )
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "make", [jop.landing, jop.project_orthonormal], ids=["landing", "project"]
)
def test_export_with_symbolic_vector_and_column_sizes(make: Any) -> None:
    """Item 13: n <= l cannot be decided for symbolic sizes; the transforms export anyway
    and give the same updates as the direct call."""
    tx = make()
    l, n = export.symbolic_shape("l, n")
    spec = jax.ShapeDtypeStruct((l, n), jnp.float32)

    def step(w: jax.Array, g: jax.Array) -> jax.Array:
        out, _ = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
        return out["w"]

    exported = export.export(jax.jit(step))(spec, spec)
    restored = export.deserialize(exported.serialize())
    w = jnp.asarray(np.linalg.qr(np.random.default_rng(1).normal(size=(7, 3)))[0], jnp.float32)
    g = jnp.asarray(np.random.default_rng(2).normal(size=(7, 3)) * 1e-2, jnp.float32)
    np.testing.assert_allclose(restored.call(w, g), step(w, g), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- summary


def test_summary_lists_every_kind_of_leaf_of_an_unfiltered_equinox_model() -> None:
    """Items 14 and 21: functions and strings are named as not arrays, equinox's None
    fields are not counted, and an OrthoDims on an integer or key leaf is listed as
    the error the transforms raise."""
    import equinox as eqx

    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))  # relu: a custom_jvp leaf
    table = jop.summary(model)
    assert "no: not an array (custom_jvp)" in table
    arrays = [x for x in jax.tree.leaves(model) if eqx.is_array(x)]
    others = [x for x in jax.tree.leaves(model) if not eqx.is_array(x)]
    assert f"of {len(arrays) + len(others)} leaves" in table.splitlines()[-1]
    params = {"name": "layer0", "steps": jnp.zeros((3, 3), jnp.int32), "key": jax.random.key(0)}
    rows = jop.summary(params, dimension_numbers=jax.tree.map(lambda _: jop.OrthoDims(), params))
    assert "no: not an array (str)" in rows
    assert "error" in rows.splitlines()[3] and "dtype int32 is not floating" in rows
    assert "selected: 0 of 3 leaves" in rows


# --------------------------------------------------------------------------- every


def test_every_beyond_the_int32_count_is_rejected_at_construction() -> None:
    """Item 16: the count is an int32, so a longer period never comes round."""
    with pytest.raises(ValueError, match=r"`every` must be at most 2147483647"):
        jop.add_orthogonality_penalty(1.0, every=2**31)
    tx = jop.add_orthogonality_penalty(1.0, every=2**31 - 1)  # the longest period
    params = {"w": 2 * jnp.eye(2)}
    u, _ = jax.jit(tx.update)(params, tx.init(params), params)  # count 0: applied
    want = 2.0 * np.eye(2) + float(2**31 - 1) * 4.0 * np.eye(2)  # 2 beta phi sign(3 I)
    np.testing.assert_allclose(u["w"], want.astype(np.float32), rtol=1e-6)


# --------------------------------------------------------------------------- params


@pytest.mark.optax_promotion  # optax.adam
def test_update_without_params_names_the_fix_as_in_equinox_examples() -> None:
    """Item 18: equinox's examples call optim.update(grads, opt_state) without params;
    with the penalty in the chain the error says what to pass."""
    import equinox as eqx

    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    dims = jop.dimension_numbers_for(model)
    for tx in (
        optax.chain(jop.add_orthogonality_penalty(1e-3, dimension_numbers=dims), optax.adam(1e-3)),
        optax.chain(optax.adam(1e-3), jop.landing(1.0, dimension_numbers=dims)),
        optax.chain(optax.sgd(1e-3), jop.project_orthonormal(dimension_numbers=dims)),
    ):
        state = tx.init(params)
        with pytest.raises(
            ValueError,
            match=r"needs the current parameters: call `update\(updates, state, params\)`",
        ):
            tx.update(params, state)


# --------------------------------------------------------------------------- wide convs


def test_tuple_column_axis_is_the_rows_of_the_flattened_kernel() -> None:
    """Item 7: a wide conv kernel (4x4x1 -> 64, DCGAN's stem) as the rows of its
    (kh*kw*in, out) matrix: vectors over the output channels, columns over (h, w, in)."""
    kernel = np.random.default_rng(3).normal(size=(4, 4, 1, 64)).astype(np.float32)
    dims = jop.OrthoDims(vector_axis=3, column_axis=(0, 1, 2))
    flat = kernel.reshape(16, 64)  # rows: the 16 taps x in
    with jax.enable_x64(True):
        want_value, want_grad = penalty_and_grad(
            flat.astype(np.float64), 0.5, vector_axis=1, column_axis=0
        )
    got = jop.orthogonality_penalty(kernel, 0.5, vector_axis=3, column_axis=(0, 1, 2))
    grad = jax.grad(jop.orthogonality_penalty)(kernel, 0.5, vector_axis=3, column_axis=(0, 1, 2))
    np.testing.assert_allclose(got, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad.reshape(kernel.shape), rtol=1e-4, atol=1e-4)
    closed = jop.orthogonality_penalty_grad(kernel, 0.5, vector_axis=3, column_axis=(0, 1, 2))
    np.testing.assert_allclose(closed, grad, rtol=1e-6, atol=1e-6)
    assert jop.orthogonality_error(kernel, vector_axis=3, column_axis=(0, 1, 2)).shape == ()
    # In the transforms, the same layout; summary shows l = 64 and n = 16.
    tx = jop.add_orthogonality_penalty(0.5, dimension_numbers={"k": dims})
    params = {"k": jnp.asarray(kernel)}
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(u["k"], grad, rtol=1e-5, atol=1e-5)
    row = next(
        r for r in jop.summary(params, dimension_numbers={"k": dims}).splitlines() if "['k']" in r
    )
    assert row.split()[6:14] == ["yes", "3", "(0,", "1,", "2)", "1", "64", "16"]
    with pytest.raises(ValueError, match=r"`column_axis`=\(0, 0\) names an axis twice"):
        jop.orthogonality_penalty(kernel, vector_axis=3, column_axis=(0, 0))
    with pytest.raises(ValueError, match=r"`column_axis`=\(2, 3\) overlaps `vector_axis`=3"):
        jop.orthogonality_penalty(kernel, vector_axis=3, column_axis=(2, 3))


def test_projection_of_large_parameters_is_named_at_init() -> None:
    """Item 12: the first projected step of parameters at scale 1e5 is orthonormal only to
    about 2e-2 in float32 (the update is added in their dtype); init says so."""
    w = jnp.asarray(np.random.default_rng(4).normal(size=(256, 64)) * 1e5, jnp.float32)
    tx = jop.project_orthonormal()
    with pytest.warns(
        UserWarning, match=r"project_orthonormal: params leaf \['w'\] has entries up to"
    ):
        state = tx.init({"w": w})
    u, _ = tx.update({"w": jnp.zeros_like(w)}, state, {"w": w})
    first = float(jop.orthogonality_error(optax.apply_updates(w, u["w"])))
    assert 1e-3 < first < 0.1  # the documented figure: 2.1e-2
    q = optax.apply_updates(w, u["w"])
    u2, _ = tx.update({"w": jnp.zeros_like(q)}, state, {"w": q})  # at unit scale: exact
    assert float(jop.orthogonality_error(optax.apply_updates(q, u2["w"]))) < 1e-5
