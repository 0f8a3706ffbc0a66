"""ConvDims in the transforms: a conv kernel leaf taken as its operator.

The per-leaf math is tests/test_conv.py's (against a float64 dense operator); here the
same leaf goes through the selection: ``add_orthogonality_penalty`` (every, masks,
schedules), ``tree_orthogonality_penalty``, ``summary``, and the errors of the paths
that do not take it, on the kernels of real equinox, flax nnx and flax linen convs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_orthopenalty as jop

RNG = np.random.default_rng(0)
HWIO = jnp.asarray(RNG.normal(size=(3, 3, 4, 6)) / 6, jnp.float32)


def _zeros(params: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, params)


def test_transform_and_tree_penalty_are_the_conv_operator_penalty() -> None:
    dims = {"conv": jop.ConvDims("HWIO", stride=2), "dense": jop.OrthoDims()}
    params = {"conv": HWIO, "dense": jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)}
    tx = jop.add_orthogonality_penalty(0.3, dimension_numbers=dims)
    u, _ = jax.jit(tx.update)(_zeros(params), tx.init(params), params)
    want = jop.conv_orthogonality_penalty_grad(HWIO, 0.3, kernel_layout="HWIO", stride=2)
    np.testing.assert_allclose(u["conv"], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(u["dense"], jop.orthogonality_penalty_grad(params["dense"], 0.3))
    total = jop.tree_orthogonality_penalty(params, 0.3, dimension_numbers=dims)
    conv = jop.conv_orthogonality_penalty(HWIO, 0.3, kernel_layout="HWIO", stride=2)
    np.testing.assert_allclose(
        total, conv + jop.orthogonality_penalty(params["dense"], 0.3), rtol=1e-6
    )
    grad = jax.grad(lambda p: jop.tree_orthogonality_penalty(p, 0.3, dimension_numbers=dims))(
        params
    )
    np.testing.assert_allclose(grad["conv"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.optax_promotion  # an optax schedule
def test_every_mask_and_schedule_with_conv_dims() -> None:
    params = {"a": HWIO, "b": HWIO}
    dims = jop.ConvDims()  # a prefix: every leaf is an HWIO kernel
    schedule = optax.linear_schedule(1.0, 0.0, 4)
    tx = jop.add_orthogonality_penalty(
        schedule, dimension_numbers=dims, mask={"a": True, "b": False}, every=2
    )
    state = tx.init(params)
    one = jop.conv_orthogonality_penalty_grad(HWIO, 1.0)
    got = []
    for _ in range(3):
        u, state = tx.update(_zeros(params), state, params)
        got.append(u)
        np.testing.assert_array_equal(u["b"], 0.0)  # masked out
    np.testing.assert_allclose(got[0]["a"], 2 * 1.0 * one, rtol=1e-6)  # count 0: 2 beta(0)
    np.testing.assert_array_equal(got[1]["a"], 0.0)  # count 1: not due
    np.testing.assert_allclose(got[2]["a"], 2 * 0.5 * one, rtol=1e-6)  # count 2: beta = 0.5


def test_summary_prints_the_operator_view() -> None:
    params = {"rows": HWIO, "cols": jnp.ones((3, 3, 2, 32))}
    dims = {"rows": jop.ConvDims(stride=2), "cols": jop.ConvDims()}
    lines = {
        line.split()[0]: line for line in jop.summary(params, dimension_numbers=dims).splitlines()
    }
    assert "operator rows: M/G = 6 <= C S^d = 16; 9 shifts, stride 2x2" in lines["['rows']"]
    assert "operator columns: M/G = 32 > C S^d = 2; 25 shifts, stride 1x1" in lines["['cols']"]
    bad = jop.summary({"k": HWIO}, dimension_numbers={"k": jop.ConvDims("HWI")})
    assert "error" in bad and "kernel_layout" in bad


def test_paths_that_do_not_take_a_conv_leaf_raise_naming_it() -> None:
    params = {"k": HWIO}
    dims = {"k": jop.ConvDims()}
    for tx in (
        jop.landing(dimension_numbers=dims),
        jop.project_orthonormal(dimension_numbers=dims),
    ):
        with pytest.raises(
            TypeError, match=r"params leaf \['k'\]: a ConvDims leaf is a convolution operator"
        ):
            tx.update(params, tx.init(params), params)
    for options, match in (
        (
            {"normalize": True},
            r"params leaf \['k'\]: `normalize=True`: an option of the matrix penalty",
        ),
        ({"norm": "spectral"}, r"params leaf \['k'\]: norm='spectral' is a per-group matrix norm"),
    ):
        tx = jop.add_orthogonality_penalty(1.0, dimension_numbers=dims, **options)
        with pytest.raises(ValueError, match=match):
            tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match=r"params leaf \['k'\]: .*`kernel_layout`"):
        jop.tree_orthogonality_penalty(params, 1.0, dimension_numbers={"k": jop.ConvDims("HWOX")})
    with pytest.raises(TypeError, match=r"must give an OrthoDims, a ConvDims or None"):
        jop.tree_orthogonality_penalty(params, 1.0, dimension_numbers={"k": "HWIO"})


def _real_kernels() -> list[tuple[str, jax.Array, jop.ConvDims]]:
    """The kernels of real strided convs: equinox (OIHW), nnx and linen (HWIO)."""
    import equinox as eqx
    import flax.linen as nn
    from flax import nnx

    eqx_conv = eqx.nn.Conv2d(4, 6, 3, stride=2, key=jax.random.key(0))
    nnx_conv = nnx.Conv(4, 6, (3, 3), strides=(2, 2), rngs=nnx.Rngs(1))
    linen_params = nn.Conv(6, (3, 3), strides=(2, 2)).init(
        jax.random.key(2), jnp.ones((1, 8, 8, 4))
    )
    return [
        ("equinox", eqx_conv.weight, jop.ConvDims("OIHW", stride=2)),
        ("nnx", nnx_conv.kernel[...], jop.ConvDims("HWIO", stride=(2, 2))),
        ("linen", linen_params["params"]["kernel"], jop.ConvDims("HWIO", stride=2)),
    ]


@pytest.mark.optax_promotion  # optax.adam
def test_real_strided_convs_train_with_the_operator_penalty() -> None:
    """Each framework's kernel, in a jitted chain step: the pull is the closed form, and a
    few hundred steps of the penalty alone bring the operator to orthogonality."""
    for name, kernel, dims in _real_kernels():
        params = {"k": kernel}
        layout = {"kernel_layout": dims.kernel_layout, "stride": dims.stride}
        tx = optax.chain(
            jop.add_orthogonality_penalty(1.0, dimension_numbers={"k": dims}), optax.adam(1e-2)
        )

        @jax.jit
        def steps(p: Any, state: Any, tx: Any = tx) -> Any:
            def body(carry: Any, _: None) -> Any:
                p, state = carry
                u, state = tx.update(_zeros(p), state, p)
                return (optax.apply_updates(p, u), state), None

            return jax.lax.scan(body, (p, state), None, length=400)[0]

        before = float(jop.conv_orthogonality_error(kernel, **layout))
        trained, _ = steps(params, tx.init(params))
        after = float(jop.conv_orthogonality_error(trained["k"], **layout))
        assert after < 0.1 * before, (name, before, after)
        sigma = jop.conv_singular_values(trained["k"], (8, 8), **layout)
        assert float(jnp.abs(sigma - 1).max()) < 0.2, (name, sigma.min(), sigma.max())
