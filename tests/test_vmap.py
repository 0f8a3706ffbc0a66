"""``jax.vmap`` over the penalty equals the direct call with the batch as group axes.

The contractions fold vmap's axis into their group axes (``_contract``), so a vmapped
call runs the direct call's formulation. These tests pin what users see: the vmapped
value, gradient and closed-form gradient equal the direct call's, for every norm,
option and kink convention, with ``beta`` batched or not, for leading, middle and
nested batch axes, and under the transformations training code wraps them in. Values
are compared in float64 (equal up to the order of summation); at exact kinks (signed
permutation columns, where X is exactly 0) they are compared bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jax_orthopenalty as jop

from host_devices import print_records, run_as_script
from reference import signed_permutation

OPTIONS = {
    "l1": {},
    "squared": {"norm": "squared"},
    "huber": {"norm": jop.huber(0.1)},
    "positive": {"subgradient": "positive"},
    "negative": {"subgradient": "negative"},
    "deadzone": {"subgradient": jop.deadzone(0.05)},
    "off-diagonal": {"off_diagonal": True},
    "normalize": {"normalize": True},
    "double-sided": {"double_sided": True},
    "double-sided-squared": {"double_sided": True, "norm": "squared"},
    "everything": {"off_diagonal": True, "normalize": True, "double_sided": True},
}

# (l, n) of one group: tiny groups take the unrolled forms in the folded call, the
# others the dot (see _contract.choose).
SHAPES = {"tiny": (5, 3), "dot": (40, 10)}
BATCH = 9  # >= 8 groups: the folded call may unroll, the per-group trace never does


def _phi(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)


def _tol(a: Any, b: Any) -> None:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-12)


def _three(phi: jax.Array, beta: Any, **kw: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(value, grad, closed-form grad) of one call."""
    value, grad = jax.value_and_grad(lambda p: jop.orthogonality_penalty(p, beta, **kw))(phi)
    return value, grad, jop.orthogonality_penalty_grad(phi, beta, **kw)


# --------------------------------------------------------------------------- layouts

# How the batch axes sit in phi, and the direct call with them as group axes:
# (name, full shape from (l, n), how to vmap a per-group function, direct keywords).


def _leading(f: Callable[..., Any]) -> Callable[..., Any]:
    return jax.vmap(f)


def _middle(f: Callable[..., Any]) -> Callable[..., Any]:
    # f returns (value, grad, closed): a scalar and two arrays like phi.
    return jax.vmap(f, in_axes=1, out_axes=(0, 1, 1))


def _nested(f: Callable[..., Any]) -> Callable[..., Any]:
    return jax.vmap(jax.vmap(f))


def _nested_mixed(f: Callable[..., Any]) -> Callable[..., Any]:
    # (B1, l, B2, n): vmap over axis 0 of a function vmapped over its axis 1.
    return jax.vmap(_middle(f))


LAYOUTS: dict[str, tuple[Callable[[int, int], tuple[int, ...]], Any, dict[str, Any]]] = {
    "leading": (lambda l, n: (BATCH, l, n), _leading, {"vector_axis": 1, "column_axis": 2}),
    "middle": (lambda l, n: (l, BATCH, n), _middle, {"vector_axis": 0, "column_axis": 2}),
    "nested": (lambda l, n: (3, 4, l, n), _nested, {"vector_axis": 2, "column_axis": 3}),
    "nested-mixed": (
        lambda l, n: (3, l, 4, n),
        _nested_mixed,
        {"vector_axis": 1, "column_axis": 3},
    ),
}


def _check_layout(layout: str, shape_name: str, opts: dict[str, Any], beta: float) -> None:
    make_shape, vmapped, direct_kw = LAYOUTS[layout]
    l, n = SHAPES[shape_name]
    with jax.enable_x64(True):
        phi = jnp.asarray(_phi(make_shape(l, n), seed=1))
        value, grad, closed = jax.jit(vmapped(lambda p: _three(p, beta, **opts)))(phi)
        want_value, want_grad, want_closed = jax.jit(
            lambda p: _three(p, beta, **opts, **direct_kw)
        )(phi)
        # The penalty is a sum over the groups: the vmapped values add up to it.
        _tol(jnp.sum(value), want_value)
        _tol(grad, want_grad)
        _tol(closed, want_closed)
        _tol(closed, grad)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("layout", ["leading", "middle"])
def test_every_option_equals_the_direct_call(option: str, layout: str) -> None:
    _check_layout(layout, "tiny", OPTIONS[option], 0.7)


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_equals_the_direct_call(layout: str, shape_name: str) -> None:
    _check_layout(layout, shape_name, {}, 0.7)
    if shape_name == "tiny":  # every option at once; the options test covers the rest
        _check_layout(layout, shape_name, OPTIONS["everything"], 0.7)


# --------------------------------------------------------------------------- beta


@pytest.mark.parametrize("option", ["l1", "normalize", "double-sided"])
def test_batched_beta(option: str) -> None:
    # The penalty and its gradients are linear in beta: per-element betas scale the
    # per-element results of beta = 1; beta's cotangent is the unscaled penalty.
    opts = OPTIONS[option]
    l, n = SHAPES["tiny"]
    with jax.enable_x64(True):
        phi = jnp.asarray(_phi((BATCH, l, n), seed=2))
        betas = jnp.linspace(0.1, 0.9, BATCH)

        def one(p: jax.Array, b: jax.Array) -> tuple[jax.Array, ...]:
            value, (g_phi, g_beta) = jax.value_and_grad(
                lambda q, c: jop.orthogonality_penalty(q, c, **opts), argnums=(0, 1)
            )(p, b)
            return value, g_phi, g_beta, jop.orthogonality_penalty_grad(p, b, **opts)

        value, g_phi, g_beta, closed = jax.jit(jax.vmap(one))(phi, betas)
        unit_value, unit_grad, _ = jax.vmap(lambda p: _three(p, 1.0, **opts))(phi)
        _tol(value, betas * unit_value)
        _tol(g_phi, betas[:, None, None] * unit_grad)
        _tol(closed, betas[:, None, None] * unit_grad)
        _tol(g_beta, unit_value)

        # Only beta batched: phi is shared by every element.
        per_beta = jax.jit(jax.vmap(lambda b: one(phi[0], b)))(betas)
        _tol(per_beta[1], betas[:, None, None] * unit_grad[0][None])
        _tol(per_beta[3], betas[:, None, None] * unit_grad[0][None])


def test_beta_a_python_float_and_a_traced_scalar_agree() -> None:
    with jax.enable_x64(True):
        phi = jnp.asarray(_phi((BATCH, 5, 3), seed=3))
        grad = jax.grad(lambda p, b: jop.orthogonality_penalty(p, b))
        floats = jax.vmap(lambda p: grad(p, 0.5))(phi)
        traced = jax.jit(jax.vmap(grad, in_axes=(0, None)))(phi, jnp.float64(0.5))
        _tol(floats, traced)


# --------------------------------------------------------------------------- kinks


@pytest.mark.parametrize(
    ("subgradient", "factor"), [("zero", 0.0), ("positive", 1.0), ("negative", -1.0)]
)
def test_kink_conventions_are_exact(subgradient: str, factor: float) -> None:
    # Signed permutation columns: X = 0 exactly, so F = sign(0) by the convention and
    # the gradient is exactly 2 beta factor Phi_i 1 1^T... for "zero" exactly 0. The
    # vmapped and direct calls must agree bit for bit.
    rng = np.random.default_rng(4)
    phi = jnp.asarray(np.stack([signed_permutation(6, 3, rng) for _ in range(BATCH)]), jnp.float32)

    def grad(p: jax.Array, **kw: Any) -> jax.Array:
        return jax.grad(
            lambda q: jop.orthogonality_penalty(q, 0.5, subgradient=subgradient, **kw)
        )(p)

    vmapped = jax.jit(jax.vmap(grad))(phi)
    closed = jax.jit(
        jax.vmap(lambda p: jop.orthogonality_penalty_grad(p, 0.5, subgradient=subgradient))
    )(phi)
    direct = jax.jit(lambda p: grad(p, vector_axis=1, column_axis=2))(phi)
    np.testing.assert_array_equal(vmapped, direct)
    np.testing.assert_array_equal(closed, direct)
    ones = np.ones((3, 3), np.float32)
    want = 0.5 * factor * 2 * np.einsum("bld,dc->blc", np.asarray(phi), ones)
    np.testing.assert_array_equal(vmapped, want)


# --------------------------------------------------------------------------- transforms


def _phi_batch() -> jax.Array:
    return jnp.asarray(_phi((BATCH, 5, 3), seed=5))


def _penalty_sum(p: jax.Array, beta: Any = 0.5) -> jax.Array:
    return jnp.sum(jax.vmap(lambda q: jop.orthogonality_penalty(q, beta))(p))


def _direct(p: jax.Array, beta: Any = 0.5) -> jax.Array:
    return jop.orthogonality_penalty(p, beta, vector_axis=1, column_axis=2)


def _closed_vmapped(p: jax.Array) -> jax.Array:
    return jax.vmap(lambda q: jop.orthogonality_penalty_grad(q, 0.5))(p)


def _closed_direct(p: jax.Array) -> jax.Array:
    return jop.orthogonality_penalty_grad(p, 0.5, vector_axis=1, column_axis=2)


def _v() -> jax.Array:
    return jnp.asarray(_phi((BATCH, 5, 3), seed=6))


_DOTS = jax.checkpoint_policies.dots_saveable


def _traced_half(p: jax.Array) -> jax.Array:
    return jnp.sum(p[:0]) + 0.5  # 0.5, traced with p


def _scan(f: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    def run(p: jax.Array) -> jax.Array:
        def body(carry: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return carry, f(x)

        return jax.lax.scan(body, 0.0, jnp.stack([p, 2 * p]))[1]

    return run


def _shard_map(f: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,))
    return jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x"))


# name -> (vmapped form, direct form): each a function of the batched phi.
TRANSFORMS: dict[str, tuple[Callable[[jax.Array], Any], Callable[[jax.Array], Any]]] = {
    "grad-of-vmap": (jax.grad(_penalty_sum), jax.grad(_direct)),
    "vmap-of-grad": (
        jax.vmap(jax.grad(lambda q: jop.orthogonality_penalty(q, 0.5))),
        jax.grad(_direct),
    ),
    "jvp-of-closed": (
        lambda p: jax.jvp(_closed_vmapped, (p,), (_v(),)),
        lambda p: jax.jvp(_closed_direct, (p,), (_v(),)),
    ),
    "linearize-of-closed": (
        lambda p: jax.linearize(_closed_vmapped, p)[1](_v()),
        lambda p: jax.linearize(_closed_direct, p)[1](_v()),
    ),
    "vjp-of-closed": (
        lambda p: jax.vjp(_closed_vmapped, p)[1](_v()),
        lambda p: jax.vjp(_closed_direct, p)[1](_v()),
    ),
    "jacfwd-of-closed": (
        lambda p: jax.jacfwd(_closed_vmapped)(p[:2]),
        lambda p: jax.jacfwd(_closed_direct)(p[:2]),
    ),
    "grad-of-grad": (
        jax.grad(lambda p: jnp.vdot(jax.grad(_penalty_sum)(p), _v())),
        jax.grad(lambda p: jnp.vdot(jax.grad(_direct)(p), _v())),
    ),
    "vmap-of-grad-of-grad": (
        jax.vmap(
            jax.grad(
                lambda q, v: jnp.vdot(jax.grad(lambda r: jop.orthogonality_penalty(r, 0.5))(q), v)
            ),
            in_axes=(0, 0),
        ),
        jax.grad(lambda p, v: jnp.vdot(jax.grad(_direct)(p), v)),
    ),
    "hessian": (
        lambda p: jax.hessian(_penalty_sum)(p[:2]),
        lambda p: jax.hessian(_direct)(p[:2]),
    ),
    "beta-grad": (
        lambda p: jax.grad(_penalty_sum, argnums=1)(p, 0.5),
        lambda p: jax.grad(_direct, argnums=1)(p, 0.5),
    ),
    # beta traced here (a Python float under checkpoint is the backward rule's business).
    "checkpoint": (
        lambda p: jax.grad(jax.checkpoint(_penalty_sum))(p, _traced_half(p)),
        lambda p: jax.grad(jax.checkpoint(_direct))(p, _traced_half(p)),
    ),
    "checkpoint-dots": (
        lambda p: jax.grad(jax.checkpoint(_penalty_sum, policy=_DOTS))(p, _traced_half(p)),
        lambda p: jax.grad(jax.checkpoint(_direct, policy=_DOTS))(p, _traced_half(p)),
    ),
    "scan": (_scan(jax.grad(_penalty_sum)), _scan(jax.grad(_direct))),
    "vmap-in-scan-of-closed": (_scan(_closed_vmapped), _scan(_closed_direct)),
    "shard-map": (_shard_map(jax.grad(_penalty_sum)), _shard_map(jax.grad(_direct))),
    "vmap-of-jit": (
        jax.vmap(jax.jit(jax.grad(lambda q: jop.orthogonality_penalty(q, 0.5)))),
        jax.grad(_direct),
    ),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_under_transformations(name: str) -> None:
    vmapped, direct = TRANSFORMS[name]
    with jax.enable_x64(True):
        phi = _phi_batch()
        if name == "vmap-of-grad-of-grad":
            got, want = jax.jit(vmapped)(phi, _v()), jax.jit(direct)(phi, _v())
        else:
            got, want = jax.jit(vmapped)(phi), jax.jit(direct)(phi)
        jax.tree.map(_tol, got, want)


def test_forward_mode_on_the_penalty_still_raises() -> None:
    # vmap does not change the custom_vjp contract: jvp of the penalty raises.
    with pytest.raises(
        TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp"
    ):
        jax.jvp(_penalty_sum, (_phi_batch(),), (_v(),))


def test_the_vmapped_call_folds_the_batch() -> None:
    # Tiny groups: the direct call unrolls the contractions (no dot); so must the
    # vmapped one, where each trace sees a single (l, n) group.
    phi = jnp.ones((100, 16, 4), jnp.float32)
    grad = jax.vmap(jax.grad(lambda p: jop.orthogonality_penalty(p, 0.5)))
    assert "dot_general" not in str(jax.make_jaxpr(grad)(phi))
    assert "dot_general" not in str(jax.make_jaxpr(jax.vmap(jop.orthogonality_penalty_grad))(phi))


# --------------------------------------------------------------------------- devices


def _child() -> None:  # pragma: no cover - runs in the subprocess
    # vmap inside shard_map on 8 devices: each device folds its local batch.
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    phi = jnp.asarray(_phi((32, 6, 4), seed=7), jnp.float32)
    per = jax.grad(lambda q: jop.orthogonality_penalty(q, 0.5))
    sharded = jax.jit(jax.shard_map(jax.vmap(per), mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    closed = jax.jit(
        jax.shard_map(
            jax.vmap(lambda q: jop.orthogonality_penalty_grad(q, 0.5)),
            mesh=mesh,
            in_specs=P("x"),
            out_specs=P("x"),
        )
    )
    want = jax.jit(jax.grad(lambda p: _direct(p)))(phi)
    err = max(
        float(jnp.max(jnp.abs(sharded(phi) - want))), float(jnp.max(jnp.abs(closed(phi) - want)))
    )
    print_records({"devices": len(jax.devices()), "err": err})


def test_vmap_inside_shard_map_on_eight_devices() -> None:
    result = run_as_script(__file__, timeout=120)
    assert result["devices"] == 8
    assert result["err"] <= 1e-5, result


if __name__ == "__main__":  # pragma: no cover
    _child()
