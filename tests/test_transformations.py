"""Every entry point under every transformation a training step wraps around a loss.

The matrix is entry point x transformation x kind of beta. The entry points are the
penalty (with the entrywise and the per-group matrix norms, and the family options),
its closed-form gradient, the tree penalty, and the optax updates of
add_orthogonality_penalty, landing and project_orthonormal (beta as landing's lam).
Each entry point is turned into a scalar loss of one layer's ``phi`` (the value, or the
output dotted with a fixed direction); each transformation computes the sum of that
loss over a stack of layers in its own way (a Python loop under ``jax.jit``,
``jax.vmap``, ``lax.scan``, ...); and each case is compared with the plain,
untransformed loss and its gradient: with respect to the layers, and with respect to
beta where beta is traced.

jax's own tests of custom rules take the same shape: a backward rule gets its
residuals after remat, scan or shard_map have rewritten them (a Python float may come
back as a typed constant, a shard's value carries varying-axes types), so each rule is
run under each of them, crossed with weak and strong scalars.

``shard_map`` and ``pmap`` run on this process's devices (one CPU device in the test
process): the manual-axes types are the same on one device as on eight. So does
``set_mesh``, an Explicit mesh entered with ``jax.set_mesh`` (sharding in types: every
intermediate must carry a sharding that fits its operands'). Partitioning across
several devices and processes is tested in ``test_sharding.py``, ``test_set_mesh.py``
and ``test_multiprocess.py``.

``export`` exports the loss with ``jax.export`` at a symbolic group count ``m``,
serializes it (with its VJP), deserializes it and calls it at the real shape, as a
training step exported for several batch or model sizes is. It runs two kinds of beta
(a constant baked into the export, and a traced argument of it), and ``set_mesh``
three: each export is a compile of its own, and the other kinds take no other path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export, lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_orthopenalty as jop
from jax_orthopenalty._constraint import add_orthogonality_constraint, orthogonality_metrics

Loss = Callable[[jax.Array, Any], jax.Array]  # (one layer's phi, beta) -> scalar

LAYERS, SHAPE = 2, (4, 3, 2)  # a stack of 2 layers of (l, m, n) = (4, 3, 2)
_rng = np.random.default_rng(0)
PHI = jnp.asarray(_rng.normal(size=(LAYERS, *SHAPE)), jnp.float32)
V = jnp.asarray(_rng.normal(size=(LAYERS, *SHAPE)), jnp.float32)  # a fixed direction
BETA = 0.5


# --------------------------------------------------------------------------- entry points


def _penalty(phi: jax.Array, beta: Any) -> jax.Array:
    return jop.orthogonality_penalty(phi, beta)


def _penalty_family(phi: jax.Array, beta: Any) -> jax.Array:
    # The options with their own backward code: normalisation, the row term, huber.
    return jop.orthogonality_penalty(
        phi, beta, norm=jop.huber(0.5), normalize=True, double_sided=True, off_diagonal=True
    )


def _penalty_grad(phi: jax.Array, beta: Any) -> jax.Array:
    return _dot(jop.orthogonality_penalty_grad(phi, beta), _direction(phi))


def _tree(phi: jax.Array, beta: Any) -> jax.Array:
    params = {"w": phi, "bias": jnp.sum(phi, axis=0)}  # the rank-2 bias is a target too
    return jop.tree_orthogonality_penalty(params, beta, mask={"w": True, "bias": False})


def _update(phi: jax.Array, beta: Any) -> jax.Array:
    tx = jop.add_orthogonality_penalty(beta)
    params = {"w": phi, "b": phi[0, 0]}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return _dot(updates["w"], _direction(phi)) + jnp.sum(updates["b"])


def _lazy_update(phi: jax.Array, beta: Any) -> jax.Array:
    # every=2: the first update (count 0) adds 2 beta dL/dPhi, the second adds nothing;
    # both go through the lax.cond.
    tx = jop.add_orthogonality_penalty(beta, every=2)
    params = {"w": phi}
    zeros = jax.tree.map(jnp.zeros_like, params)
    first, state = tx.update(zeros, tx.init(params), params)
    second, _ = tx.update(zeros, state, params)
    return _dot(first["w"], _direction(phi)) + _dot(second["w"], _direction(phi))


def _matrix_norms(phi: jax.Array, beta: Any) -> jax.Array:
    # The per-group norms: exact spectral (eigh), its power-iteration estimate
    # (SRIP's squared form), and the max (mutual coherence with these options).
    return (
        jop.orthogonality_penalty(phi, beta, norm="spectral")
        + jop.orthogonality_penalty(phi, beta, norm=jop.spectral(squared=True, iterations=3))
        + jop.orthogonality_penalty(phi, beta, norm="max", off_diagonal=True, normalize=True)
    )


def _manifold(phi: jax.Array, beta: Any) -> jax.Array:
    # landing with lam = beta, and project_orthonormal, on the same incoming updates.
    params = {"w": phi}
    incoming = {"w": _direction(phi)}
    total = jnp.zeros((), phi.dtype)
    for tx in (jop.landing(beta), jop.project_orthonormal()):
        updates, _ = tx.update(incoming, tx.init(params), params)
        total = total + _dot(updates["w"], _direction(phi))
    return total


def _as_kernels(phi: jax.Array) -> jax.Array:
    # A layer's (l, m, n) = (4, 3, 2) as m stacked 1-D conv kernels "WIO" of 4 taps, 1 in
    # and 2 out channels: the group axis (symbolic under export, sharded under set_mesh)
    # is the kernels' stack axis, as for layers stacked by nn.scan.
    return jnp.moveaxis(phi, 1, 0)[..., None, :]


def _conv(phi: jax.Array, beta: Any) -> jax.Array:
    # The conv operator's penalty (columns at stride 1: 2 out > 1 in) and its
    # closed-form gradient at stride 2 (rows: 2 <= 1 * 2, the strided correlation).
    kernels = _as_kernels(phi)
    grad = jop.conv_orthogonality_penalty_grad(kernels, beta, kernel_layout="WIO", stride=2)
    value = jop.conv_orthogonality_penalty(kernels, beta, kernel_layout="WIO")
    return value + _dot(grad, _direction(kernels))


def _conv_update(phi: jax.Array, beta: Any) -> jax.Array:
    # ConvDims through the transform, and the tree penalty of the same leaf.
    dims = {"k": jop.ConvDims("WIO", stride=(2,))}
    tx = jop.add_orthogonality_penalty(beta, dimension_numbers=dims)
    params = {"k": _as_kernels(phi)}
    updates, _ = tx.update({"k": jnp.zeros_like(params["k"])}, tx.init(params), params)
    tree = jop.tree_orthogonality_penalty(params, beta, dimension_numbers=dims)
    return tree + _dot(updates["k"], _direction(params["k"]))


def _constraint(phi: jax.Array, beta: Any) -> jax.Array:
    # beta as the multipliers' start: two updates (the second pulls with the
    # multipliers of the first dual step), and the state's beta and error.
    tx = add_orthogonality_constraint(1.0, rate=0.25, beta_init=beta)
    params = {"w": phi, "b": phi[0, 0]}  # the rank-1 b is not selected
    zeros = jax.tree.map(jnp.zeros_like, params)
    first, state = tx.update(zeros, tx.init(params), params)
    second, state = tx.update(zeros, state, params)
    pulls = _dot(first["w"] + second["w"], _direction(phi))
    return pulls + jnp.sum(state.beta["w"] * state.error["w"]) + jnp.sum(second["b"])


def _metrics(phi: jax.Array, beta: Any) -> jax.Array:
    # error, and the extreme singular values from eigvalsh of the Gram matrices.
    m = orthogonality_metrics({"w": phi, "b": phi[0, 0]})["['w']"]
    return beta * jnp.sum(m["error"] + m["sigma_min"] + 2 * m["sigma_max"])


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    # Not jnp.vdot: it flattens, which a sharded axis (under set_mesh) does not allow.
    return jnp.sum(a * b)


def _direction(phi: jax.Array) -> jax.Array:
    # A direction that depends on phi's shape only, so every layer gets the same one.
    return jnp.cos(jnp.arange(phi.size, dtype=phi.dtype)).reshape(phi.shape)


ENTRY_POINTS: dict[str, Loss] = {
    "penalty": _penalty,
    "penalty_family": _penalty_family,
    "penalty_grad": _penalty_grad,
    "tree": _tree,
    "update": _update,
    "lazy_update": _lazy_update,
    "matrix_norms": _matrix_norms,
    "landing_project": _manifold,
    "conv": _conv,
    "conv_update": _conv_update,
    "constraint": _constraint,
    "metrics": _metrics,
}


# --------------------------------------------------------------------------- beta kinds
# Each kind is (a constant closed over, or None for a traced argument).

BETAS: dict[str, Any] = {
    "python_float": BETA,
    "python_int": 2,
    "numpy_scalar": np.float32(BETA),
    "jax_weak": jnp.asarray(BETA),
    "jax_strong": jnp.float32(BETA),
    "traced": None,
}


# --------------------------------------------------------------------------- transformations
# Each maps a loss of one layer to a function of (stack of layers, beta) -> scalar sum.


def _loop(loss: Loss) -> Callable[[jax.Array, Any], jax.Array]:
    def total(stack: jax.Array, beta: Any) -> jax.Array:
        return sum((loss(stack[k], beta) for k in range(stack.shape[0])), jnp.float32(0))

    return total


def _jit(loss: Loss) -> Any:
    return jax.jit(_loop(loss))


def _vmap(loss: Loss) -> Any:
    return lambda stack, beta: jnp.sum(jax.vmap(loss, in_axes=(0, None))(stack, beta))


def _grad_of_grad(loss: Loss) -> Any:
    # Reverse over reverse: the directional derivative of the gradient along V, summed
    # with V's layer. Compared with forward over reverse of the plain loss, below.
    def total(stack: jax.Array, beta: Any) -> jax.Array:
        g = jax.grad(_loop(loss))(stack, beta)
        return jnp.vdot(g, V)

    return total


def _checkpoint(policy: Any) -> Callable[[Loss], Any]:
    def wrap(loss: Loss) -> Any:
        return _loop(jax.checkpoint(loss, policy=policy))

    return wrap


def _scan(remat: bool) -> Callable[[Loss], Any]:
    def wrap(loss: Loss) -> Any:
        def total(stack: jax.Array, beta: Any) -> jax.Array:
            def body(carry: jax.Array, phi: jax.Array) -> tuple[jax.Array, None]:
                return carry + loss(phi, beta), None

            step = jax.checkpoint(body) if remat else body
            return lax.scan(step, jnp.float32(0), stack)[0]

        return total

    return wrap


def _cond(loss: Loss) -> Any:
    def total(stack: jax.Array, beta: Any) -> jax.Array:
        # A predicate the compiler cannot see through: both branches are traced.
        def one(phi: jax.Array) -> jax.Array:
            return lax.cond(
                jnp.sum(phi) < jnp.inf,
                lambda p: loss(p, beta),
                lambda p: jnp.zeros((), jnp.float32),
                phi,
            )

        return sum((one(stack[k]) for k in range(stack.shape[0])), jnp.float32(0))

    return total


def _map(loss: Loss) -> Any:
    return lambda stack, beta: jnp.sum(lax.map(lambda phi: loss(phi, beta), stack))


def _fori(loss: Loss) -> Any:
    def total(stack: jax.Array, beta: Any) -> jax.Array:
        body = lambda k, acc: acc + loss(stack[k], beta)  # noqa: E731
        return lax.fori_loop(0, stack.shape[0], body, jnp.float32(0))

    return total


def _shard_map(axis_type: AxisType) -> Callable[[Loss], Any]:
    # Each phi's group axis is split over the mesh; the loss of a shard is the penalty
    # of its groups (a per-shard value), and the psum adds the shards.
    def wrap(loss: Loss) -> Any:
        mesh = jax.make_mesh((len(jax.devices()),), ("g",), axis_types=(axis_type,))
        spec = P(None, None, "g", None)

        def total(stack: jax.Array, beta: Any) -> jax.Array:
            if axis_type == AxisType.Explicit:
                stack = jax.sharding.reshard(stack, NamedSharding(mesh, spec))

            def local(s: jax.Array, b: Any) -> jax.Array:
                return lax.psum(_loop(loss)(s, b), "g")

            if beta is None or not isinstance(beta, jax.Array):
                return jax.shard_map(
                    lambda s: local(s, beta), mesh=mesh, in_specs=spec, out_specs=P()
                )(stack)
            return jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=P())(
                stack, beta
            )

        return total

    return wrap


MESH = jax.make_mesh((len(jax.devices()),), ("g",), axis_types=(AxisType.Explicit,))


def _set_mesh(loss: Loss) -> Any:
    # Called (and traced) inside `with jax.set_mesh(MESH)`: see test_matrix. The group
    # axis of every layer is sharded, as part of the type.
    def total(stack: jax.Array, beta: Any) -> jax.Array:
        return _loop(loss)(jax.sharding.reshard(stack, P(None, None, "g", None)), beta)

    return total


def register_optax_states() -> None:
    """optax's states, for serializing: optax does not register its own (once)."""
    for cls in (optax.EmptyState, optax.MaskedState):
        with contextlib.suppress(ValueError):  # registered already (another module)
            export.register_namedtuple_serialization(cls, serialized_name=cls.__qualname__)


def _export(loss: Loss) -> Any:
    # The stack's layers (l, m, n) exported with m symbolic, serialized with the VJP,
    # called back at the real m; beta either baked in (a constant) or an argument.
    register_optax_states()

    def total(stack: jax.Array, beta: Any) -> jax.Array:
        (m,) = export.symbolic_shape("m")
        layers, l, _, n = stack.shape
        poly = jax.ShapeDtypeStruct((layers, l, m, n), stack.dtype)  # type: ignore[no-untyped-call]
        if isinstance(beta, jax.core.Tracer):
            scalar = jax.ShapeDtypeStruct((), jnp.float32)  # type: ignore[no-untyped-call]
            exported = export.export(jax.jit(_loop(loss)))(poly, scalar)
            args: tuple[Any, ...] = (stack, beta)
        else:
            exported = export.export(jax.jit(lambda s: _loop(loss)(s, beta)))(poly)
            args = (stack,)
        restored = export.deserialize(exported.serialize(vjp_order=1))
        return restored.call(*args)

    return total


def _pmap(loss: Loss) -> Any:
    def total(stack: jax.Array, beta: Any) -> jax.Array:
        n = len(jax.devices())
        split = stack.reshape(n, -1, *stack.shape[1:])
        per_device = jax.pmap(_loop(loss), in_axes=(0, None))(split, beta)
        return jnp.sum(per_device)

    return total


TRANSFORMATIONS: dict[str, Callable[[Loss], Any]] = {
    "jit": _jit,
    "vmap": _vmap,
    "grad_of_grad": _grad_of_grad,
    "checkpoint": _checkpoint(None),
    "checkpoint_nothing_saveable": _checkpoint(jax.checkpoint_policies.nothing_saveable),
    "checkpoint_dots_saveable": _checkpoint(jax.checkpoint_policies.dots_saveable),
    "scan": _scan(remat=False),
    "scan_remat": _scan(remat=True),
    "cond": _cond,
    "map": _map,
    "fori_loop": _fori,
    "shard_map_auto": _shard_map(AxisType.Auto),
    "shard_map_explicit": _shard_map(AxisType.Explicit),
    "pmap": _pmap,
    "set_mesh": _set_mesh,
    "export": _export,
}

# The beta kinds of each transformation: all of them, but for the two slowest columns.
KINDS: dict[str, tuple[str, ...]] = {
    "export": ("python_float", "traced"),
    "set_mesh": ("python_float", "jax_strong", "traced"),
}
# And of each entry: beta reaches every entry point through the same check_beta, which
# the cheap entries (penalty, penalty_grad, update, tree) run with every kind; the
# slowest entries take a constant and a traced beta, to keep the suite short.
ENTRY_KINDS: dict[str, tuple[str, ...]] = {
    entry: ("python_float", "traced")
    for entry in (
        "lazy_update",
        "matrix_norms",
        "penalty_family",
        "landing_project",
        "conv",
        "conv_update",
        "constraint",
        "metrics",
    )
}


# --------------------------------------------------------------------------- the matrix


def _plain_beta(beta_kind: str) -> float:
    return 2.0 if beta_kind == "python_int" else BETA


@functools.cache
def _reference(entry: str, transform: str, beta_kind: str) -> tuple[jax.Array, Any]:
    """The plain loss's value and gradient; the same for every transformation except
    grad_of_grad, whose case is a first derivative (cached: one compile per row)."""
    plain = _loop(ENTRY_POINTS[entry])
    beta = jnp.float32(_plain_beta(beta_kind))
    traced = beta_kind == "traced"
    if transform == "grad_of_grad":
        # The case is <grad, V>; its gradient is the Hessian times V (the Hessian is
        # symmetric), here by forward over reverse of the plain loss: the same second
        # derivative by another route (for the custom_vjp penalty, through its
        # backward pass); d/dbeta by forward mode too.
        def first(s: jax.Array, b: jax.Array) -> jax.Array:
            return jnp.vdot(jax.grad(plain)(s, b), V)

        value = first(PHI, beta)
        hv = jax.jvp(lambda s: jax.grad(plain)(s, beta), (PHI,), (V,))[1]
        if not traced:
            return value, hv
        return value, (hv, jax.jvp(lambda b: first(PHI, b), (beta,), (jnp.ones_like(beta),))[1])
    return jax.value_and_grad(plain, argnums=(0, 1) if traced else 0)(PHI, beta)


@pytest.mark.parametrize(
    ("entry", "transform", "beta_kind"),
    [
        (entry, transform, beta_kind)
        for entry in ENTRY_POINTS
        for transform in TRANSFORMATIONS
        for beta_kind in KINDS.get(transform, tuple(BETAS))
        if beta_kind in ENTRY_KINDS.get(entry, tuple(BETAS))
    ],
)
def test_matrix(entry: str, transform: str, beta_kind: str) -> None:
    case = TRANSFORMATIONS[transform](ENTRY_POINTS[entry])
    want_value, want_grad = _reference(
        entry, "grad_of_grad" if transform == "grad_of_grad" else "", beta_kind
    )
    # jax.set_mesh cannot be entered under jax.jit: it wraps the traced call.
    mesh = jax.set_mesh(MESH) if transform == "set_mesh" else contextlib.nullcontext()
    with mesh:
        if beta_kind == "traced":
            args: tuple[Any, ...] = (PHI, jnp.float32(BETA))
            got_value, got_grad = jax.jit(jax.value_and_grad(case, argnums=(0, 1)))(*args)
        else:
            const = BETAS[beta_kind]
            f = jax.value_and_grad(lambda stack: case(stack, const))
            got_value, got_grad = jax.jit(f)(PHI)

    np.testing.assert_allclose(got_value, want_value, rtol=2e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    assert np.all(np.isfinite(jax.tree.leaves(got_grad)[0]))


def test_matrix_exercises_the_backward_rule() -> None:
    # The matrix's gradients of the custom_vjp entry points are not all zero (a loss
    # that ignored phi would pass every comparison above).
    g = jax.grad(_loop(_penalty))(PHI, BETA)
    assert float(jnp.abs(g).min()) > 0


def test_scan_remat_grad_python_float_beta_at_the_default() -> None:
    # The report that opened the issue, verbatim: a Python-float beta under remat.
    phi = jnp.eye(3, 2) * 2.0
    got = jax.grad(jax.checkpoint(lambda p: jop.orthogonality_penalty(p, 0.5)))(phi)
    np.testing.assert_array_equal(got, jax.grad(jop.orthogonality_penalty)(phi, 0.5))
    got = jax.grad(jax.checkpoint(jop.orthogonality_penalty))(phi)  # beta=1.0
    np.testing.assert_array_equal(got, 2 * phi)  # 2 beta phi sign(diag(3, 3)), beta = 1


# --------------------------------------------------------------------------- framework wrappers
# What users write: the penalty inside flax's and equinox's own remat and scan.


def _reference_stack_grad(kernels: jax.Array, beta: float) -> jax.Array:
    """The plain gradient of the penalty summed over a (layers, in, out) stack."""
    dims = jop.OrthoDims(vector_axis=1, column_axis=2)
    return jax.grad(
        lambda k: jop.orthogonality_penalty(
            k, beta, vector_axis=dims.vector_axis, column_axis=dims.column_axis
        )
    )(kernels)


def test_flax_linen_scan_with_remat() -> None:
    import flax.linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
            kernel = self.param("kernel", nn.initializers.normal(1.0), (4, 4))
            # The penalty of this layer's kernel, computed inside the scanned body.
            return jnp.tanh(x @ kernel), jop.orthogonality_penalty(kernel, 0.5)

    Stack = nn.scan(
        nn.remat(Layer),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=3,
    )

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            y, penalties = Stack(name="stack")(x, None)
            return y, jnp.sum(penalties)

    model = Model()
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    kernels = variables["params"]["stack"]["kernel"]  # (layers, in, out)
    assert kernels.shape == (3, 4, 4)
    grads = jax.jit(jax.grad(lambda v: model.apply(v, x)[1]))(variables)
    got = grads["params"]["stack"]["kernel"]
    np.testing.assert_allclose(got, _reference_stack_grad(kernels, 0.5), rtol=1e-5, atol=1e-6)


def test_flax_nnx_remat_and_scan() -> None:
    from flax import nnx

    layers = 3
    keys = jax.random.split(jax.random.key(0), layers)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key: jax.Array) -> nnx.Linear:
        return nnx.Linear(4, 4, rngs=nnx.Rngs(key))

    stack = make(keys)
    kernels = stack.kernel[...]

    def loss(model: nnx.Linear) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(total: jax.Array, layer: nnx.Linear) -> jax.Array:
            return total + jop.orthogonality_penalty(layer.kernel[...], 0.5)

        return body(jnp.zeros((), jnp.float32), model)

    grads = nnx.grad(loss)(stack)
    np.testing.assert_allclose(
        grads.kernel[...], _reference_stack_grad(kernels, 0.5), rtol=1e-5, atol=1e-6
    )


def test_equinox_filter_checkpoint_and_tree_penalty() -> None:
    import equinox as eqx

    model = eqx.nn.MLP(4, 3, 6, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    # An equinox Module of OrthoDims / None (callable, yet a tree) as dimension_numbers.
    dims = jax.tree.map(
        lambda x: jop.OrthoDims(vector_axis=1, column_axis=0) if x.ndim == 2 else None, params
    )
    assert callable(dims)

    @eqx.filter_checkpoint
    def penalty(p: Any) -> jax.Array:
        return jop.tree_orthogonality_penalty(p, 0.5, dimension_numbers=dims)

    got = eqx.filter_jit(eqx.filter_grad(penalty))(params)
    for layer_got, layer in zip(got.layers, params.layers, strict=True):
        want = jax.grad(jop.orthogonality_penalty)(layer.weight, 0.5, vector_axis=1, column_axis=0)
        np.testing.assert_allclose(layer_got.weight, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(layer_got.bias, jnp.zeros_like(layer.bias))
    del static


def test_equinox_module_of_bools_is_a_mask_tree() -> None:
    import equinox as eqx

    model = eqx.nn.MLP(4, 3, 6, 1, key=jax.random.key(1))
    params = eqx.filter(model, eqx.is_array)
    mask = jax.tree.map(lambda _: False, params)
    mask = eqx.tree_at(lambda m: m.layers[0].weight, mask, True)  # only the first weight
    assert callable(mask)
    dims = jop.OrthoDims(vector_axis=1, column_axis=0)
    want = jop.orthogonality_penalty(params.layers[0].weight, 1.0, vector_axis=1, column_axis=0)
    got = jop.tree_orthogonality_penalty(
        params,
        1.0,
        mask=mask,
        dimension_numbers=lambda p: jax.tree.map(lambda x: dims if x.ndim == 2 else None, p),
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    tx = jop.add_orthogonality_penalty(
        1.0,
        mask=mask,
        dimension_numbers=jax.tree.map(lambda x: dims if x.ndim == 2 else None, params),
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(
        updates.layers[0].weight,
        jop.orthogonality_penalty_grad(params.layers[0].weight, vector_axis=1, column_axis=0),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(updates.layers[1].weight, zeros.layers[1].weight)


def test_flax_nnx_module_of_orthodims_and_of_bools_are_trees() -> None:
    """An nnx Module is a callable pytree: built with jax.tree.map over the model, a
    module of OrthoDims/None is dimension_numbers and a module of bools is a mask."""
    from flax import nnx

    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))  # kernel (in, out): the default layout
    dims = jax.tree.map(lambda x: jop.OrthoDims() if x.ndim == 2 else None, model)
    mask = jax.tree.map(lambda x: x.ndim == 2, model)
    assert callable(dims) and callable(mask)
    want = jop.orthogonality_penalty(model.kernel[...], 0.5)
    got = jop.tree_orthogonality_penalty(model, 0.5, dimension_numbers=dims, mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    tx = jop.add_orthogonality_penalty(0.5, dimension_numbers=dims, mask=mask)
    zeros = jax.tree.map(jnp.zeros_like, model)
    updates, _ = tx.update(zeros, tx.init(model), model)
    np.testing.assert_allclose(
        updates.kernel[...], jop.orthogonality_penalty_grad(model.kernel[...], 0.5), rtol=1e-6
    )
    np.testing.assert_array_equal(updates.bias[...], jnp.zeros(3))


@pytest.mark.parametrize(
    "make", [jop.landing, jop.project_orthonormal], ids=["landing", "project"]
)
def test_manifold_transforms_share_the_mask_rules(make: Any) -> None:
    """landing and project_orthonormal mask through the same code as the penalty
    transform: a callable module of bools is a tree (not called), and a mask of the
    wrong structure is named."""
    from flax import nnx

    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    mask = jax.tree.map(lambda x: x.ndim == 2, model)  # callable: an nnx Module
    incoming = jax.tree.map(jnp.ones_like, model)
    tx = make(mask=mask)
    updates, _ = tx.update(incoming, tx.init(model), model)
    np.testing.assert_array_equal(updates.bias[...], incoming.bias[...])  # masked out
    unmasked = make()
    want, _ = unmasked.update(
        {"k": incoming.kernel[...]}, unmasked.init({"k": 0}), {"k": model.kernel[...]}
    )
    np.testing.assert_allclose(updates.kernel[...], want["k"], rtol=1e-6)
    params = {"a": jnp.eye(3, 2), "b": jnp.eye(3, 2)}
    with pytest.raises(ValueError, match=r"`mask` does not match the params"):
        make(mask={"a": True}).init(params)
