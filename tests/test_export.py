"""Every public entry point and transform lowers for CPU, CUDA, ROCm and TPU.

``jax.export.export(jax.jit(f), platforms=[p])`` runs the lowering rules of platform
``p`` without its hardware or plugin: JAX's own rules for the CUDA and ROCm linear
algebra (the SVD and ``eigh`` of the projection and the spectral norm) only name
their cuSOLVER/hipSOLVER custom calls, and TPU's are ``Eigh``/``Qr`` custom calls, so
a jaxlib for CPU alone lowers for all four (no GPU plugin is installed for this test).
That keeps the CPU/GPU/TPU promise checked without the hardware: an op with no
lowering for some platform, or one that ``jax.export`` refuses (a host callback, a
custom call outside its stable list), fails this file.

The entries are the public functions that take arrays: the penalty (every norm, the
family options, a conv layout, complex phi), its ``jax.grad`` (the custom VJP's
backward pass) and ``orthogonality_penalty_grad``, ``orthogonality_error``, the tree
penalty and its gradient, and the update of every transform (``every=4``, a schedule
and a mask, ``landing`` with ``safe_step``, ``project_orthonormal`` far from and near
the manifold, a chain with an optax optimizer). ``summary`` (a string) and
``dimension_numbers_for`` (a model) are not array functions.

For every entry: the export succeeds for each platform, ``platforms`` is the one asked
for, the linear algebra is the platform's own, the serialized bytes deserialize to the
same signature, and on CPU the deserialized function gives the numbers of the direct
call. One export with all four platforms at once (a single trace, the module choosing
its branch by platform at run time) is called back on CPU too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import jax_orthopenalty as jop
from jax_orthopenalty._constraint import add_orthogonality_constraint, orthogonality_metrics

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

# The solver library each platform's linalg lowering names (TPU's are XLA's own).
SOLVER = {"cpu": "lapack_", "cuda": "cusolver_", "rocm": "hipsolver_", "tpu": None}
OTHER_SOLVERS = re.compile(r"custom_call @(lapack_|cusolver_|hipsolver_)")

RNG = np.random.default_rng(0)
PHI = jnp.asarray(RNG.normal(size=(5, 2, 3)), jnp.float32)  # (l, m, n): 2 groups of 5 x 3
CPHI = jnp.asarray(RNG.normal(size=(5, 2, 3)) + 1j * RNG.normal(size=(5, 2, 3)), jnp.complex64)
CONV = jnp.asarray(RNG.normal(size=(2, 2, 3, 4)), jnp.float32)  # HWIO: 4 columns of 12
UPD = jnp.asarray(0.1 * RNG.normal(size=(5, 2, 3)), jnp.float32)
PARAMS = {"w": PHI, "conv": CONV, "b": jnp.ones((3,), jnp.float32)}
# Orthonormal groups: the projection's series route.
NEAR = jnp.asarray(np.linalg.qr(RNG.normal(size=(2, 5, 3)))[0].transpose(1, 0, 2), jnp.float32)
UPDATES = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), PARAMS)
# The conv kernel's columns are its 4 output channels, of 2 * 2 * 3 = 12 entries.
DIMS = {"w": jop.OrthoDims(0, -1), "conv": jop.OrthoDims((0, 1, 2), -1), "b": None}


def register_optax_states() -> None:
    """optax's states, for serializing: optax does not register its own (once)."""
    for cls in (optax.EmptyState, optax.MaskedState, optax.TraceState):
        with contextlib.suppress(ValueError):  # registered already (another module)
            export.register_namedtuple_serialization(cls, serialized_name=cls.__qualname__)


@dataclasses.dataclass(frozen=True)
class Entry:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    solver: bool = False  # lowers an SVD or eigh: the platform's solver shows in the module
    more: tuple[tuple[Any, ...], ...] = ()  # other arguments of the same shapes, for CPU


def _penalty(**options: Any) -> Entry:
    return Entry(lambda p, b: jop.orthogonality_penalty(p, b, **options), (PHI, jnp.float32(0.5)))


def _grad(phi: jax.Array, **options: Any) -> Entry:
    return Entry(jax.grad(lambda p: jop.orthogonality_penalty(p, 0.5, **options)), (phi,))


def _step(tx: optax.GradientTransformation, params: Any, updates: Any, steps: int = 1) -> Entry:
    """``steps`` updates of ``tx`` from its init (every=4 needs more than one)."""

    def run(u: Any, p: Any) -> Any:
        state = tx.init(p)
        for _ in range(steps):
            out, state = tx.update(u, state, p)
        return out, state

    return Entry(run, (updates, params))


def _state_step(tx: optax.GradientTransformation) -> Entry:
    # The state as an argument and a result: its pytree (the library's state types)
    # crosses the serialization.
    return Entry(lambda u, s, p: tx.update(u, s, p), (UPDATES, tx.init(PARAMS), PARAMS))


ENTRIES: dict[str, Callable[[], Entry]] = {
    "penalty_l1": lambda: _penalty(),
    "penalty_squared": lambda: _penalty(norm="squared"),
    "penalty_huber": lambda: _penalty(norm=jop.huber(0.5)),
    "penalty_spectral": lambda: dataclasses.replace(_penalty(norm="spectral"), solver=True),
    "penalty_spectral_squared": lambda: dataclasses.replace(
        _penalty(norm=jop.spectral(squared=True)), solver=True
    ),
    "penalty_spectral_iterations": lambda: _penalty(norm=jop.spectral(iterations=3)),
    "penalty_max": lambda: _penalty(norm="max"),
    "penalty_family": lambda: _penalty(off_diagonal=True, normalize=True, double_sided=True),
    "penalty_conv_layout": lambda: Entry(
        lambda p: jop.orthogonality_penalty(p, vector_axis=(0, 1, 2), norm="squared"), (CONV,)
    ),
    "penalty_complex": lambda: Entry(
        lambda p: jop.orthogonality_penalty(p, norm=jop.huber(0.5), normalize=True), (CPHI,)
    ),
    "grad_l1_deadzone": lambda: _grad(PHI, subgradient=jop.deadzone(0.1)),
    "grad_squared_double_sided": lambda: _grad(PHI, norm="squared", double_sided=True),
    "grad_spectral": lambda: dataclasses.replace(_grad(PHI, norm="spectral"), solver=True),
    "grad_max": lambda: _grad(PHI, norm="max", off_diagonal=True),
    "grad_complex": lambda: _grad(CPHI, off_diagonal=True),
    "penalty_grad": lambda: Entry(
        lambda p: jop.orthogonality_penalty_grad(p, 0.5, normalize=True, subgradient="positive"),
        (PHI,),
    ),
    "penalty_grad_complex": lambda: Entry(
        lambda p: jop.orthogonality_penalty_grad(p, norm="squared"), (CPHI,)
    ),
    "error": lambda: Entry(jop.orthogonality_error, (PHI,)),
    "error_normalize_complex": lambda: Entry(
        lambda p: jop.orthogonality_error(p, normalize=True, off_diagonal=True), (CPHI,)
    ),
    "tree_penalty": lambda: Entry(
        lambda ps: jop.tree_orthogonality_penalty(ps, 0.5, norm="squared"), (PARAMS,)
    ),
    "grad_tree_penalty": lambda: Entry(
        jax.grad(lambda ps: jop.tree_orthogonality_penalty(ps, 0.5)), ({"w": PHI, "u": CPHI},)
    ),
    "add_penalty": lambda: _state_step(jop.add_orthogonality_penalty(0.5)),
    "add_penalty_every_4": lambda: _step(
        jop.add_orthogonality_penalty(0.5, every=4), PARAMS, UPDATES, steps=5
    ),
    "add_penalty_schedule_mask_complex": lambda: _step(
        jop.add_orthogonality_penalty(
            optax.linear_schedule(0.0, 1.0, 4), mask={"w": True, "u": True, "conv": False}
        ),
        {"w": PHI, "u": CPHI, "conv": CONV},
        {"w": UPD, "u": 0.1 * CPHI, "conv": CONV},
        steps=2,
    ),
    "landing": lambda: _state_step(jop.landing(1.0, dimension_numbers=DIMS)),
    "landing_safe_step": lambda: _step(
        jop.landing(1.0, safe_step=0.5, learning_rate=0.1), {"w": PHI}, {"w": UPD}
    ),
    # Called on CPU far from the manifold (the SVD route) and near it (the series).
    "project_orthonormal": lambda: Entry(
        jop.project_orthonormal().update,
        ({"w": UPD}, optax.EmptyState(), {"w": PHI}),
        solver=True,
        more=(({"w": 1e-3 * UPD}, optax.EmptyState(), {"w": NEAR}),),
    ),
    "add_constraint": lambda: _state_step(
        add_orthogonality_constraint(1e-2, beta_init=0.5, dimension_numbers=DIMS)
    ),
    "add_constraint_every_2_mask": lambda: _step(
        add_orthogonality_constraint(
            1e-2, rate=0.1, beta_init=0.5, every=2, mask={"w": True, "conv": False, "b": False}
        ),
        PARAMS,
        UPDATES,
        steps=3,
    ),
    # eigvalsh of the Gram matrices: the platform's solver.
    "metrics": lambda: Entry(
        lambda ps: orthogonality_metrics(ps, dimension_numbers=DIMS), (PARAMS,), solver=True
    ),
    "chain_sgd_step": lambda: _step(
        optax.chain(
            jop.add_orthogonality_penalty(0.5, dimension_numbers=DIMS),
            optax.sgd(0.1, momentum=0.9),
        ),
        PARAMS,
        UPDATES,
        steps=2,
    ),
}


def _same(a: Any, b: Any) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        # The same module compiled twice: equal to float32 rounding of a refusion.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-6)


@pytest.mark.optax_promotion  # linear_schedule and sgd multiply floats by the count
@pytest.mark.parametrize("name", list(ENTRIES))
def test_lowers_for_every_platform(name: str) -> None:
    register_optax_states()
    entry = ENTRIES[name]()
    direct = [jax.jit(entry.fn)(*args) for args in (entry.args, *entry.more)]
    for out in direct:
        leaves = jax.tree.leaves(out)
        assert leaves and all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
        assert any(bool(jnp.any(x != 0)) for x in leaves)  # a comparison that can fail

    for platform in PLATFORMS:
        exported = export.export(jax.jit(entry.fn), platforms=[platform])(*entry.args)
        assert exported.platforms == (platform,)
        module = exported.mlir_module()
        if entry.solver:
            solver = SOLVER[platform]
            others = {m.group(1) for m in OTHER_SOLVERS.finditer(module)}
            assert others == ({solver} if solver else set()), (platform, others)
            if solver is None:
                assert re.search(r"custom_call @(Eigh|Qr)", module), "TPU's own linalg"
        blob = exported.serialize()
        restored = export.deserialize(blob)
        assert restored.platforms == (platform,)
        assert restored.in_avals == exported.in_avals
        assert restored.out_avals == exported.out_avals
        assert restored.in_tree == exported.in_tree
        assert restored.out_tree == exported.out_tree
        assert restored.mlir_module_serialized == exported.mlir_module_serialized
        if platform == "cpu":
            for args, want in zip((entry.args, *entry.more), direct, strict=True):
                _same(restored.call(*args), want)


@pytest.mark.optax_promotion
@pytest.mark.parametrize("name", ["penalty_complex", "add_penalty"])
def test_one_export_for_all_platforms(name: str) -> None:
    # One trace, lowered for the four platforms at once: the module takes the platform
    # index and the CPU call picks the CPU branch.
    register_optax_states()
    entry = ENTRIES[name]()
    exported = export.export(jax.jit(entry.fn), platforms=PLATFORMS)(*entry.args)
    assert exported.platforms == PLATFORMS
    restored = export.deserialize(exported.serialize())
    assert restored.platforms == PLATFORMS
    _same(restored.call(*entry.args), jax.jit(entry.fn)(*entry.args))


def test_exported_penalty_carries_its_backward_pass() -> None:
    # Serialized with vjp_order=1 the exported penalty keeps its custom_vjp's backward
    # pass: jax.grad of the deserialized function is the library's gradient, for a real
    # and a complex phi. (The grad_* entries above lower the backward pass everywhere.)
    def f(p: jax.Array, c: jax.Array) -> jax.Array:
        real = jop.orthogonality_penalty(p, 0.5, norm=jop.huber(0.5))
        return real + jop.orthogonality_penalty(c, 0.25, off_diagonal=True)

    want = jax.grad(f, argnums=(0, 1))(PHI, CPHI)
    assert all(bool(jnp.all(g != 0)) for g in want)
    exported = export.export(jax.jit(f), platforms=["cpu"])(PHI, CPHI)
    restored = export.deserialize(exported.serialize(vjp_order=1))
    _same(jax.grad(restored.call, argnums=(0, 1))(PHI, CPHI), want)
