"""The contraction formulations of ``_contract`` against the einsum and the reference.

Every formulation is checked on every layout class (one or several vector axes, group
axes first, middle, last or absent, axes of size 0 and 1) in two ways: directly,
against the einsum it replaces, and end to end, with the formulation forced, against
the float64 NumPy reference. Data is random, away from the kinks of |x| (DESIGN.md).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_orthopenalty as jop
from jax_orthopenalty import _contract
from jax_orthopenalty._layout import make_layout

from reference import penalty_and_grad

HIGHEST = jax.lax.Precision.HIGHEST
FORMULATIONS = ("einsum", "batched", "halves", "unrolled")

# (shape, vector_axis, column_axis): small enough for the unrolled forms everywhere.
LAYOUTS = [
    pytest.param((6, 5, 3), 0, -1, id="seed-l-m-n"),
    pytest.param((5, 6, 3), 1, 2, id="groups-first"),
    pytest.param((3, 6, 5), 1, 0, id="groups-last"),
    pytest.param((4, 3, 2, 5), (0, 2), 3, id="tuple-vectors"),
    pytest.param((2, 4, 3, 3, 2), (1, 3), 2, id="tuple-vectors-3-group-axes"),
    pytest.param((7, 4), 0, 1, id="2d-no-group"),
    pytest.param((4, 7), 1, 0, id="2d-transposed"),
    pytest.param((6, 1, 3), 0, -1, id="size-1-group"),
    pytest.param((1, 4, 3), 0, -1, id="size-1-vector"),
    pytest.param((6, 4, 1), 0, -1, id="size-1-column"),
    pytest.param((5, 3, 7), 0, -1, id="odd-sizes"),
]

EMPTY = [
    pytest.param((0, 3, 4), 0, -1, id="empty-vector"),
    pytest.param((4, 0, 3), 0, -1, id="empty-group"),
    pytest.param((4, 3, 0), 0, -1, id="empty-column"),
]


def _phi(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _forced(how: str) -> Any:
    def choose(*_: Any, **__: Any) -> str:
        return how

    return choose


# --------------------------------------------------------------------------- direct


@pytest.mark.parametrize("how", FORMULATIONS)
@pytest.mark.parametrize(("shape", "vector_axis", "column_axis"), LAYOUTS + EMPTY)
def test_gram_and_apply_equal_the_einsum(
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    shape: tuple[int, ...],
    vector_axis: Any,
    column_axis: int,
) -> None:
    monkeypatch.setattr(_contract, "choose", _forced(how))
    layout = make_layout(len(shape), vector_axis, column_axis)
    phi = jnp.asarray(_phi(shape), jnp.float32)
    gram = jax.jit(lambda p: _contract.gram(layout, p, precision=HIGHEST, acc=jnp.float32))(phi)
    want = jnp.einsum(layout.gram_subscripts, phi, phi, precision=HIGHEST)
    assert gram.shape == want.shape and gram.dtype == jnp.float32
    np.testing.assert_allclose(gram, want, rtol=1e-5, atol=1e-5)

    m = jnp.asarray(_phi(want.shape, seed=1), jnp.float32)
    out = jax.jit(lambda p, w: _contract.apply(layout, p, w, precision=HIGHEST))(phi, m)
    want = jnp.einsum(layout.apply_subscripts, phi, m, precision=HIGHEST)
    assert out.shape == phi.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", FORMULATIONS)
@pytest.mark.parametrize(
    ("shape", "vector_axis", "column_axis"),
    [
        pytest.param((6, 5, 3), 0, -1, id="seed-l-m-n"),
        pytest.param((4, 3, 2, 5), (0, 2), 3, id="tuple-vectors"),
    ],
)
def test_derivatives_and_vmap_of_the_contractions(
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    shape: tuple[int, ...],
    vector_axis: Any,
    column_axis: int,
) -> None:
    # The custom_jvp tangents (two-operand forms of every formulation), their
    # transposes (vjp), and the custom_vmap rule (batch folded into the groups), each
    # against the plain einsum.
    monkeypatch.setattr(_contract, "choose", _forced(how))
    layout = make_layout(len(shape), vector_axis, column_axis)

    def gram(p: jax.Array) -> jax.Array:
        return _contract.gram(layout, p, precision=HIGHEST, acc=p.dtype)

    def gram_ref(p: jax.Array) -> jax.Array:
        return jnp.einsum(layout.gram_subscripts, p, p, precision=HIGHEST)

    def apply(p: jax.Array, w: jax.Array) -> jax.Array:
        return _contract.apply(layout, p, w, precision=HIGHEST)

    def apply_ref(p: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.einsum(layout.apply_subscripts, p, w, precision=HIGHEST)

    with jax.enable_x64(True):
        phi, dphi = jnp.asarray(_phi(shape, 1)), jnp.asarray(_phi(shape, 2))
        c = gram_ref(phi)
        m, dm = jnp.asarray(_phi(c.shape, 3)), jnp.asarray(_phi(c.shape, 4))
        pairs = [
            (jax.jvp(gram, (phi,), (dphi,)), jax.jvp(gram_ref, (phi,), (dphi,))),
            (jax.jvp(apply, (phi, m), (dphi, dm)), jax.jvp(apply_ref, (phi, m), (dphi, dm))),
            (jax.vjp(gram, phi)[1](m), jax.vjp(gram_ref, phi)[1](m)),
            (jax.vjp(apply, phi, m)[1](dphi), jax.vjp(apply_ref, phi, m)[1](dphi)),
        ]
        # vmap over a new leading axis, with either operand of the product unbatched.
        batch, mbatch = jnp.stack([phi, dphi]), jnp.stack([m, dm])
        pairs += [
            (jax.vmap(gram)(batch), jax.vmap(gram_ref)(batch)),
            (jax.vmap(apply)(batch, mbatch), jax.vmap(apply_ref)(batch, mbatch)),
            (jax.vmap(apply, (0, None))(batch, m), jax.vmap(apply_ref, (0, None))(batch, m)),
            (jax.vmap(apply, (None, 0))(phi, mbatch), jax.vmap(apply_ref, (None, 0))(phi, mbatch)),
        ]
        for got, want in pairs:
            jax.tree.map(
                lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12), got, want
            )


@pytest.mark.parametrize(
    ("shape", "vector_axis", "column_axis"),
    [
        pytest.param((80, 64), 0, 1, id="2d"),
        pytest.param((64, 80), 1, 0, id="2d-transposed"),
        pytest.param((4, 1, 20, 64), (0, 2), 3, id="tuple-vectors-size-1-group"),
    ],
)
def test_one_wide_group_takes_the_nt_dot(
    shape: tuple[int, ...], vector_axis: Any, column_axis: int
) -> None:
    # m = 1, n >= 64: the Gram contracts the minor axes of (n, l) ("NT").
    layout = make_layout(len(shape), vector_axis, column_axis)
    assert _contract._use_nt(layout, shape)
    phi = jnp.asarray(_phi(shape), jnp.float32)
    gram = jax.jit(lambda p: _contract.gram(layout, p, precision=HIGHEST, acc=jnp.float32))(phi)
    want = jnp.einsum(layout.gram_subscripts, phi, phi, precision=HIGHEST)
    np.testing.assert_allclose(gram, want, rtol=1e-5, atol=1e-4)
    _, want_grad = penalty_and_grad(_phi(shape), vector_axis=vector_axis, column_axis=column_axis)
    with jax.enable_x64(True):
        grad = jax.jit(
            jax.grad(
                lambda p: jop.orthogonality_penalty(
                    p, vector_axis=vector_axis, column_axis=column_axis
                )
            )
        )(jnp.asarray(_phi(shape), jnp.float64))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", FORMULATIONS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_accumulates_in_float32(
    monkeypatch: pytest.MonkeyPatch, how: str, dtype: Any
) -> None:
    monkeypatch.setattr(_contract, "choose", _forced(how))
    layout = make_layout(3, 0, -1)
    # 64 rows of values that are exact in both half types: the float32 sums are
    # exact, so every formulation must agree bit for bit with a float64 Gram.
    phi64 = np.round(_phi((64, 3, 4)) * 8) / 8
    phi = jnp.asarray(phi64, dtype)
    gram = _contract.gram(layout, phi, precision=HIGHEST, acc=jnp.float32)
    assert gram.dtype == jnp.float32
    np.testing.assert_array_equal(gram, np.einsum("abc,abd->bcd", phi64, phi64))
    m = jnp.asarray(np.round(_phi((3, 4, 4), 1) * 4) / 4, jnp.float32)
    out = _contract.apply(layout, phi, m, precision=HIGHEST)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, np.einsum("abd,bdc->abc", phi64, np.asarray(m)))


def test_float64_stays_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = make_layout(3, 0, -1)
    for how in FORMULATIONS:
        monkeypatch.setattr(_contract, "choose", _forced(how))
        with jax.enable_x64(True):
            phi = jnp.asarray(_phi((5, 3, 4)), jnp.float64)
            gram = _contract.gram(layout, phi, precision=HIGHEST, acc=jnp.float64)
            out = _contract.apply(layout, phi, gram, precision=HIGHEST)
            assert gram.dtype == out.dtype == jnp.float64
            p = np.asarray(phi)
            np.testing.assert_allclose(gram, np.einsum("abc,abd->bcd", p, p), rtol=1e-13)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("how", ["batched", "halves", "unrolled"])  # einsum: the old path
@pytest.mark.parametrize(("shape", "vector_axis", "column_axis"), LAYOUTS)
def test_penalty_and_grad_match_the_reference(
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    shape: tuple[int, ...],
    vector_axis: Any,
    column_axis: int,
) -> None:
    monkeypatch.setattr(_contract, "choose", _forced(how))
    phi = _phi(shape, seed=2)
    kw = {"vector_axis": vector_axis, "column_axis": column_axis}
    want_value, want_grad = penalty_and_grad(phi, 0.7, **kw)

    @jax.jit
    def both(q: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        value, grad = jax.value_and_grad(lambda r: jop.orthogonality_penalty(r, 0.7, **kw))(q)
        return value, grad, jop.orthogonality_penalty_grad(q, 0.7, **kw)

    with jax.enable_x64(True):  # float64: equal to the reference up to rounding
        value, grad, closed = both(jnp.asarray(phi, jnp.float64))
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(closed, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((16, 300, 4), id="tiny-n4"),
        pytest.param((32, 200, 8), id="tiny-n8"),
        pytest.param((128, 20, 8), id="tiny-n8-long"),
        pytest.param((24, 30, 16), id="small-n16"),
        pytest.param((40, 6, 32), id="medium-n32"),
    ],
)
def test_default_choice_matches_the_reference(shape: tuple[int, int, int]) -> None:
    # No forcing: whatever `choose` picks for the shape classes of the benchmark.
    phi = _phi(shape, seed=3) / np.sqrt(shape[0])
    want_value, want_grad = penalty_and_grad(phi, 0.5)
    value, grad = jax.jit(jax.value_and_grad(lambda q: jop.orthogonality_penalty(q, 0.5)))(
        jnp.asarray(phi, jnp.float32)
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_exact_at_the_kink() -> None:
    # Signed permutation columns: C = I exactly in every formulation, gradient 0.
    from reference import signed_permutation

    rng = np.random.default_rng(4)
    phi = np.stack([signed_permutation(16, 4, rng) for _ in range(50)], axis=1)
    grad = jax.grad(jop.orthogonality_penalty)(jnp.asarray(phi, jnp.float32))
    np.testing.assert_array_equal(grad, np.zeros_like(phi))


# --------------------------------------------------------------------------- choice


def test_choice_is_static_and_by_shape() -> None:
    layout = make_layout(3, 0, -1)

    def pick(shape: tuple[int, ...], which: str, dtype: Any = jnp.float32) -> str:
        return _contract.choose(layout, shape, dtype, HIGHEST, which)  # type: ignore[arg-type]

    assert pick((16, 100000, 4), "gram") == pick((16, 100000, 4), "apply") == "unrolled"
    assert pick((32, 4096, 8), "gram") == pick((32, 4096, 8), "apply") == "unrolled"
    assert pick((512, 64, 8), "gram") == "batched"  # too many rows to unroll
    assert pick((512, 64, 8), "apply") == "unrolled"
    assert pick((256, 64, 128), "gram") == pick((256, 64, 128), "apply") == "batched"
    assert pick((4096, 1, 4096), "gram") == "halves"
    assert pick((4096, 1, 4096), "apply") == "batched"
    assert pick((16, 4, 4), "gram") == pick((16, 4, 4), "apply") == "batched"  # few groups
    assert pick((4, 0, 4), "gram") == "einsum"


def test_several_devices_keep_the_dot_for_the_gram(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows of a sharded vector axis would each be a collective in the unrolled Gram.
    layout = make_layout(3, 0, -1)
    monkeypatch.setattr(jax, "device_count", lambda *_: 8)
    assert _contract.choose(layout, (16, 32, 8), jnp.float32, HIGHEST, "gram") == "batched"
    assert _contract.choose(layout, (16, 32, 8), jnp.float32, HIGHEST, "apply") == "unrolled"


def test_lower_precision_keeps_the_dot() -> None:
    # The unrolled forms are full precision; a lower precision request for half
    # types keeps the dot (the hardware's fast mode) instead.
    layout = make_layout(3, 0, -1)
    shape = (16, 10, 4)
    default = jax.lax.Precision.DEFAULT
    assert _contract.choose(layout, shape, jnp.bfloat16, default, "gram") == "batched"
    assert _contract.choose(layout, shape, jnp.bfloat16, HIGHEST, "gram") == "unrolled"
    assert _contract.choose(layout, shape, jnp.bfloat16, "highest", "apply") == "unrolled"
    assert _contract.choose(layout, shape, jnp.bfloat16, (HIGHEST, HIGHEST), "apply") == (
        "unrolled"
    )


@pytest.mark.parametrize("shape", [(5, 3, 3), (1, 4, 4), (1, 1, 1), (7,), (0, 2), (2, 1, 3)])
def test_materialize_is_an_exact_copy(shape: tuple[int, ...]) -> None:
    x = jnp.asarray(_phi(shape), jnp.float32)
    out = jax.jit(_contract._materialize)(x)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, x)


def test_transforms_compose(monkeypatch: pytest.MonkeyPatch) -> None:
    # vmap, and jvp of the closed-form gradient, go through the copy loops.
    phi = jnp.asarray(_phi((16, 5, 4), seed=5), jnp.float32)
    v = jnp.ones_like(phi)
    per_group = jax.vmap(jop.orthogonality_penalty_grad, in_axes=1, out_axes=1)
    batched = per_group(phi)
    _, tangent = jax.jvp(jop.orthogonality_penalty_grad, (phi,), (v,))
    monkeypatch.setattr(_contract, "choose", _forced("einsum"))
    np.testing.assert_allclose(batched, jop.orthogonality_penalty_grad(phi), atol=1e-5)
    _, want = jax.jvp(jop.orthogonality_penalty_grad, (phi,), (v,))
    np.testing.assert_allclose(tangent, want, atol=1e-5)


# --------------------------------------------------------------------------- benchmark


def test_benchmark_quick_runs(tmp_path: Path) -> None:
    path = Path(__file__).parent.parent / "benchmarks" / "bench_grad.py"
    spec = importlib.util.spec_from_file_location("bench_grad", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "quick.json"
    assert bench.main(["--quick", "--only", "3,5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] and len(report["results"]) == 2
    assert report["matmul_reference"]["gflops"]["jnp.matmul"] > 0
    for result in report["results"]:
        assert result["max_relative_difference"] < 1e-4
        assert result["vmap_max_relative_difference"] < 1e-4
        assert result["ratios"]["autodiff/grad"] > 0
        for key in ("vmap/grad", "groups_first_vmap/groups_first", "groups_first/memory_floor"):
            assert result["ratios"][key] > 0
        double = result["memory"]["double_sided_temp_over_phi"]
        assert set(double) == {"l1", "squared"}
