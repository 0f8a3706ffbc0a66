"""Property fuzzing with hypothesis against the float64 reference (tests/reference.py).

Layouts (group axes first, last or in the middle; int or tuple vector axes; positive
or negative indices; size-0 and size-1 axes), dtypes (float16, bfloat16, float32,
float64), every norm and convention and the family flags. Valid calls match the
reference; invalid ones raise ValueError or TypeError and nothing else; finite input
never gives NaN.

Kinks: the reference sees phi exactly (the cast data, in float64); the library
computes X = Phi^T Phi - I in float32 (float64 for float64 input), so an entry of X
within a few ulps of a kink of the L1 derivative (0, or +-tol for deadzone) may get
the other side's derivative. Such entries are rare on random data; where one occurs
its group's gradient is compared with a bound widened by exactly what that entry's
derivative can change (see ``_flip_bound``), and every other group tightly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_orthopenalty as jop

import reference as ref

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# Relative accuracy of the result (the output cast) and of the accumulation.
OUT_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
ACC_EPS = {"float16": 2.0**-24, "bfloat16": 2.0**-24, "float32": 2.0**-24, "float64": 2.0**-53}
# The value of a valid call in test_invalid_calls_raise_value_or_type_error, relative
# to 1 + |value|: about 10x the largest error over 300 random valid calls of that test's
# kind (5.6e-16 float64, 3.1e-7 float32 and complex64, 4.8e-4 float16: the output cast),
# except bfloat16 (3.2e-3 measured; the output cast alone is up to 2**-9), kept at 1e-2.
VALUE_TOL = {
    "float64": 6e-15,
    "float32": 3e-6,
    "complex64": 3e-6,
    "float16": 5e-3,
    "bfloat16": 1e-2,
}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def _x64_stays_off() -> Iterator[None]:
    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64


# --------------------------------------------------------------------------- strategies


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], Any, int]:
    """(shape, vector_axis, column_axis): 0-2 group axes, 1-2 vector axes, anywhere."""
    n_groups = draw(st.integers(0, 2))
    n_vec = draw(st.integers(1, 2))
    roles = draw(st.permutations(["g"] * n_groups + ["v"] * n_vec + ["c"]))
    ndim = len(roles)
    # Size 0 and 1 axes are drawn often enough to be seen, rarely enough that most
    # examples still have entries to compare.
    sizes = {
        "g": st.sampled_from([0, 1, 1, 2, 2, 3, 3, 3, 2, 2]),
        "v": st.sampled_from([0, 1, 2, 3, 3, 4, 5, 5, 2, 3]),
        "c": st.sampled_from([0, 1, 2, 2, 3, 3, 4, 4, 3, 2]),
    }
    shape = tuple(draw(sizes[r]) for r in roles)
    vec = [i for i, r in enumerate(roles) if r == "v"]
    vec = draw(st.permutations(vec))  # the tuple's order is the user's
    vec = [a - ndim if draw(st.booleans()) else a for a in vec]
    vector_axis: Any = tuple(vec) if len(vec) > 1 or draw(st.booleans()) else vec[0]
    col = roles.index("c")
    column_axis = col - ndim if draw(st.booleans()) else col
    return shape, vector_axis, column_axis


@st.composite
def options(
    draw: st.DrawFn, norms: tuple[str, ...] = ("l1", "squared", "huber")
) -> dict[str, Any]:
    norm = draw(st.sampled_from(norms))
    opts: dict[str, Any] = {
        "off_diagonal": draw(st.booleans()),
        "normalize": draw(st.booleans()),
        "double_sided": draw(st.booleans()),
    }
    if norm == "huber":
        opts["norm"] = jop.huber(draw(st.sampled_from([0.05, 0.5, 2.0])))
    else:
        opts["norm"] = norm
    if norm == "l1":
        opts["subgradient"] = draw(st.sampled_from(["zero", "positive", "negative", "deadzone"]))
        if opts["subgradient"] == "deadzone":
            opts["subgradient"] = jop.deadzone(draw(st.sampled_from([0.0, 1e-3, 0.3])))
    return opts


def _data(
    seed: int,
    shape: tuple[int, ...],
    dtype: str,
    scale: float,
    zero_col: bool,
    column_axis: int,
) -> np.ndarray:
    """Normal data in ``dtype``, returned as the exact float64 values the library sees."""
    rng = np.random.default_rng(seed)
    x = scale * rng.normal(size=shape)
    if zero_col and shape[column_axis] > 0:
        x = np.moveaxis(x, column_axis, 0)
        x[rng.integers(x.shape[0])] = 0.0
        x = np.moveaxis(x, 0, column_axis)
    if dtype == "float64":
        return x
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


# --------------------------------------------------------------------------- kinks


def _residuals(flat_group: np.ndarray, opts: dict[str, Any]) -> list[tuple[np.ndarray, str]]:
    """The reference's X (and Y for double_sided) of one (l, n) group, in float64,
    with the entries the library treats as exact (normalised diagonal) removed."""
    a = flat_group
    l, n = a.shape
    sq = (a * a).sum(axis=0)
    psi = a / np.sqrt(np.maximum(sq, ref.EPS)) if opts["normalize"] else a
    x = psi.T @ psi - np.eye(n)
    if opts["normalize"]:
        # The library sets X_jj = 0 exactly for a live column (|psi_j| = 1).
        x[np.diag_indices(n)] = np.where(sq > ref.EPS, np.nan, x[np.diag_indices(n)])
    out = [(x, "cols")]
    if opts["double_sided"]:
        out.append((psi @ psi.T - np.eye(l), "rows"))
    return out


def _kinks(opts: dict[str, Any]) -> list[float]:
    if opts["norm"] != "l1":
        return []  # huber and squared have continuous derivatives
    sub = opts["subgradient"]
    return [0.0, sub.tol] if isinstance(sub, jop.deadzone) else [0.0]


def _near_kink_groups(
    phi: np.ndarray, opts: dict[str, Any], layout: tuple[Any, int], dtype: str
) -> np.ndarray:
    """Which groups have an entry of X within the rounding band of a kink: 64 ulps
    of the accumulation dtype times the entry's scale. Structural zeros (an entry
    with a zero column or row, or l = 0) are exact in any arithmetic, so they stay
    compared exactly: that is where the conventions differ."""
    kinks = _kinks(opts)
    flat, _ = ref._canonical(phi, *layout)
    near = np.zeros(flat.shape[0], bool)
    if not kinks:
        return near
    eps = 64 * ACC_EPS[dtype]
    for i, a in enumerate(flat):
        cols = np.sqrt((a * a).sum(axis=0))
        rows = np.sqrt((a * a).sum(axis=1))
        for x, kind in _residuals(a, opts):
            v = cols if kind == "cols" else rows
            structural = (v[:, None] == 0) | (v[None, :] == 0) | (a.shape[0] == 0)
            if opts["normalize"]:
                scale = 1.0 + (1.0 if kind == "cols" else float(a.shape[1]))
            else:
                scale = 1.0 + np.outer(v, v)
            band = eps * scale
            for k in kinks:
                d = np.abs(np.abs(x) - k)
                hit = (d <= band) & ~(structural & (x == 0)) & ~np.isnan(x)
                near[i] |= bool(hit.any())
    return near


# --------------------------------------------------------------------------- properties


def _run(
    phi: np.ndarray, dtype: str, beta: float, layout: dict[str, Any], opts: dict[str, Any]
) -> tuple[float, np.ndarray, np.ndarray]:
    """Value, autodiff gradient and closed-form gradient, under one jit, as float64."""

    def both(p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        def f(q: jax.Array) -> jax.Array:
            return jop.orthogonality_penalty(q, beta, **layout, **opts)

        v, g = jax.value_and_grad(f)(p)
        return v, g, jop.orthogonality_penalty_grad(p, beta, **layout, **opts)

    p = jnp.asarray(phi, dtype)
    v, g, c = jax.jit(both)(p)
    assert v.dtype == p.dtype and g.dtype == p.dtype and c.dtype == p.dtype
    assert v.shape == () and g.shape == p.shape == c.shape
    wide = jnp.float64 if dtype == "float64" else jnp.float32
    return (
        float(v.astype(wide)),
        np.asarray(g.astype(wide), np.float64),
        np.asarray(c.astype(wide), np.float64),
    )


@FUZZ
@given(
    layout=layouts(),
    opts=options(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.3, 0.7, 1.0, 1.5]),
    beta=st.sampled_from([0.5, 1.0, 2.0]),
    zero_col=st.booleans(),
)
def test_matches_reference(
    layout: tuple[tuple[int, ...], Any, int],
    opts: dict[str, Any],
    dtype: str,
    seed: int,
    scale: float,
    beta: float,
    zero_col: bool,
) -> None:
    shape, vector_axis, column_axis = layout
    lay = {"vector_axis": vector_axis, "column_axis": column_axis}
    phi = _data(seed, shape, dtype, scale, zero_col, column_axis)
    want_v, want_g = ref.penalty_and_grad(phi, beta, **lay, **opts)
    if dtype == "float64":
        with jax.enable_x64(True):
            v, g, c = _run(phi, dtype, beta, lay, opts)
    else:
        v, g, c = _run(phi, dtype, beta, lay, opts)

    # Nothing else happens: finite input gives finite output wherever the true
    # result fits the dtype (float16 tops out at 65504: docs/failure-modes.md).
    top = 0.5 * float(jnp.finfo(dtype).max)
    assert math.isfinite(v) or abs(want_v) > top
    for got in (g, c):
        assert np.isfinite(got[np.abs(want_g) < top]).all()
    if abs(want_v) > top or np.abs(want_g).max(initial=0) > top:
        return

    flat, _ = ref._canonical(phi, vector_axis, column_axis)
    m, l, n = flat.shape
    # |C_jk| <= |phi_j| |phi_k|; cosines are <= 1.
    c_max = 1.0 if opts["normalize"] else 1.0 + float((flat * flat).sum(axis=1).max(initial=0))
    if opts["double_sided"] and not opts["normalize"]:
        c_max = max(c_max, 1.0 + float((flat * flat).sum(axis=2).max(initial=0)))
    entries = m * (n * n + (l * l if opts["double_sided"] else 0))

    # Value: a sum of non-negative terms, each with its rounding of X (absolute
    # ~ eps * (l + n) * c_max; squared doubles and scales it by |X| <= c_max).
    acc = ACC_EPS[dtype] * (l + n + 2)
    v_tol = 4 * OUT_EPS[dtype] * abs(want_v) + 8 * beta * entries * acc * c_max * (1 + c_max)
    assert abs(v - want_v) <= v_tol, (v, want_v, v_tol)

    # Gradients: tight in groups away from kinks, relative to the largest entry.
    g_scale = float(np.max(np.abs(want_g), initial=0.0)) + beta * c_max
    if opts["normalize"]:
        # Through the normalisation the gradient is a difference of terms of size
        # ~ beta |f'| n / |phi_j| (the projection (I - psi psi^T) / |phi_j|), whose
        # rounding does not cancel: a short column amplifies it.
        norms = np.sqrt((flat * flat).sum(axis=1))
        live = norms[norms > 1e-6]
        inv = float(1 / live.min()) if live.size else 1.0
        g_scale = max(g_scale, beta * 4 * (n + (l if opts["double_sided"] else 0)) * inv)
    g_tol = (4 * OUT_EPS[dtype] + 16 * acc * c_max) * g_scale
    near = _near_kink_groups(phi, opts, (vector_axis, column_axis), dtype)
    flip = _flip_bound(phi, beta, opts, (vector_axis, column_axis))
    flat_want, _ = ref._canonical(want_g, vector_axis, column_axis)
    for got in (g, c):
        flat_got, _ = ref._canonical(got, vector_axis, column_axis)
        err = np.abs(flat_got - flat_want).reshape(m, l * n).max(axis=1, initial=0.0)
        assert (err[~near] <= g_tol).all(), (err, g_tol, near)
        # Near a kink the derivative of the entries in the band may flip.
        assert (err[near] <= g_tol + flip[near]).all(), (err, flip, near)
    # Autodiff of the custom_vjp and the closed form are one computation.
    np.testing.assert_allclose(g, c, rtol=0, atol=g_tol)


def _flip_bound(
    phi: np.ndarray, beta: float, opts: dict[str, Any], layout: tuple[Any, int]
) -> np.ndarray:
    """Per group: the largest change in one gradient entry from flipping the sign
    of every entry of X (and Y), i.e. 2 beta sum_k (|F_jk| + |F_kj|) |phi|, bounded by
    4 beta n max|psi| (times 1/nu through the normalisation), plus the row term."""
    flat, _ = ref._canonical(phi, *layout)
    out = np.zeros(flat.shape[0])
    for i, a in enumerate(flat):
        l, n = a.shape
        if a.size == 0:
            continue
        nu = np.sqrt(np.maximum((a * a).sum(axis=0), ref.EPS))
        inv = 1 / nu.min() if opts["normalize"] else 1.0
        amax = 1.0 if opts["normalize"] else float(np.abs(a).max())
        bound = 8 * beta * n * amax * inv
        if opts["double_sided"]:
            bound += 8 * beta * l * amax * inv
        out[i] = bound
    return out


@settings(max_examples=25, deadline=None)
@given(
    layout=layouts(),
    opts=options(norms=("l1",)),  # the smooth norms have no kink
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_kinks_match_reference(
    layout: tuple[tuple[int, ...], Any, int], opts: dict[str, Any], dtype: str, seed: int
) -> None:
    """Exact kinks, where the conventions differ: every group is a signed partial
    permutation (disjoint unit columns, so X_jk = 0 exactly off the diagonal) with
    some columns scaled by 2 or 0. Every product and sum is exact in every dtype,
    so the library and the reference agree to rounding of the output only."""
    shape, vector_axis, column_axis = layout
    rng = np.random.default_rng(seed)
    flat, back = ref._canonical(np.zeros(shape), vector_axis, column_axis)
    m, l, n = flat.shape
    for i in range(m):
        k = min(l, n)
        rows = rng.permutation(l)[:k]
        flat[i, rows, np.arange(k)] = rng.choice([-1.0, 1.0], size=k) * rng.choice(
            [0.0, 1.0, 1.0, 2.0], size=k
        )
    phi = back(flat)
    lay = {"vector_axis": vector_axis, "column_axis": column_axis}
    want_v, want_g = ref.penalty_and_grad(phi, 1.0, **lay, **opts)
    if dtype == "float64":
        with jax.enable_x64(True):
            v, g, c = _run(phi, dtype, 1.0, lay, opts)
    else:
        v, g, c = _run(phi, dtype, 1.0, lay, opts)
    tol = 4 * OUT_EPS[dtype]
    np.testing.assert_allclose(v, want_v, rtol=tol, atol=tol)
    # A zero column under normalize with sign(0) = +-1 gets ~2e6: beyond float16,
    # it overflows to a signed inf (docs/failure-modes.md). Everything else matches.
    over = np.abs(want_g) > float(jnp.finfo(dtype).max)
    fits = np.where(over, 0.0, want_g)
    scale = 1.0 + float(np.max(np.abs(fits), initial=0.0))
    for got in (g, c):
        np.testing.assert_array_equal(got[over], np.sign(want_g[over]) * np.inf)
        np.testing.assert_allclose(np.where(over, 0.0, got), fits, rtol=0, atol=tol * scale)


@settings(max_examples=25, deadline=None)
@given(layout=layouts(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_error_matches_reference(
    layout: tuple[tuple[int, ...], Any, int], dtype: str, seed: int
) -> None:
    """orthogonality_error: max |X| per group, shaped like the group axes in order."""
    shape, vector_axis, column_axis = layout
    lay = {"vector_axis": vector_axis, "column_axis": column_axis}
    phi = _data(seed, shape, dtype, 1.0, False, column_axis)
    want = ref.error(phi, **lay)
    if dtype == "float64":
        with jax.enable_x64(True):
            got = jop.orthogonality_error(jnp.asarray(phi, dtype), **lay)
    else:
        got = jop.orthogonality_error(jnp.asarray(phi, dtype), **lay)
    assert got.shape == want.shape
    assert got.dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
    l = math.prod(shape) // max(1, math.prod(want.shape) * shape[column_axis])
    tol = 4 * ACC_EPS[dtype] * (l + 2) * (1 + float(np.max(want, initial=0.0)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol)


# --------------------------------------------------------------------------- invalid


def _valid_axis(a: Any, ndim: int) -> bool:
    return type(a) is int and -ndim <= a < ndim


@st.composite
def raw_calls(draw: st.DrawFn) -> dict[str, Any]:
    """A call whose every argument may be wrong, with its expected validity."""
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dtype = draw(
        st.sampled_from(
            ["float32", "float64", "float16", "bfloat16", "int32", "bool", "complex64", "uint8"]
        )
    )
    axis = st.one_of(st.integers(-6, 6), st.sampled_from([True, 1.0, "0", None]))
    vector_axis = draw(
        st.one_of(axis, st.lists(st.integers(-5, 5), min_size=0, max_size=3).map(tuple))
    )
    column_axis = draw(axis)
    norm = draw(st.sampled_from(["l1", "squared", "huber", "L1", "l2", 1, None]))
    subgradient = draw(
        st.sampled_from(["zero", "positive", "negative", "dz", "sign", "one", 0, None])
    )
    flags = {
        k: draw(st.sampled_from([False, True, 0, 1, None, np.bool_(True)]))
        for k in ("off_diagonal", "normalize", "double_sided")
    }
    beta = draw(st.sampled_from([1.0, 2, -0.5, "a", True, (1.0,), 1j]))
    return {
        "shape": shape,
        "dtype": dtype,
        "vector_axis": vector_axis,
        "column_axis": column_axis,
        "norm": norm,
        "subgradient": subgradient,
        "flags": flags,
        "beta": beta,
    }


def _expect_valid(call: dict[str, Any]) -> bool:
    """The documented contract, written independently of the library."""
    ndim = len(call["shape"])
    if call["dtype"] not in VALUE_TOL or ndim < 2:
        return False
    va = call["vector_axis"]
    if isinstance(va, tuple):
        if not va or not all(_valid_axis(a, ndim) for a in va):
            return False
        vec = [a % ndim for a in va]
        if len(set(vec)) != len(vec):
            return False
    elif _valid_axis(va, ndim):
        vec = [va % ndim]
    else:
        return False
    ca = call["column_axis"]
    if not _valid_axis(ca, ndim) or ca % ndim in vec:
        return False
    if call["norm"] not in ("l1", "squared", "huber"):
        return False
    if call["subgradient"] not in ("zero", "positive", "negative"):
        return False
    if not all(type(v) is bool for v in call["flags"].values()):
        return False
    beta = call["beta"]
    return type(beta) in (int, float) and beta >= 0  # finite: the sampled ones are


@settings(max_examples=100, deadline=None)
@given(call=raw_calls())
def test_invalid_calls_raise_value_or_type_error(call: dict[str, Any]) -> None:
    """Every call either works (and then matches the reference) or raises ValueError
    or TypeError; which one happens is predicted from the documented contract."""
    norm = jop.huber(0.5) if call["norm"] == "huber" else call["norm"]
    kwargs = {
        "vector_axis": call["vector_axis"],
        "column_axis": call["column_axis"],
        "norm": norm,
        "subgradient": call["subgradient"],
        **call["flags"],
    }
    phi = (
        np.ones(call["shape"], np.float32)
        + np.arange(math.prod(call["shape"])).reshape(call["shape"]) % 3 * 0.25
    )
    expect = _expect_valid(call)
    with jax.enable_x64(call["dtype"] == "float64"):
        arr = jnp.asarray(phi).astype(call["dtype"])
        for f in (jop.orthogonality_penalty, jop.orthogonality_penalty_grad):
            try:
                out = f(arr, call["beta"], **kwargs)
            except (ValueError, TypeError):
                assert not expect, f"raised for a valid call {call}"
                continue
            assert expect, f"no error for an invalid call {call}"
            if f is jop.orthogonality_penalty:
                ref_kwargs = {**kwargs, "subgradient": call["subgradient"]}
                # The data are multiples of 1/4 up to 1.5: exact in every dtype.
                want, _ = ref.penalty_and_grad(
                    np.real(np.asarray(arr)).astype(np.float64), call["beta"], **ref_kwargs
                )
                tol = VALUE_TOL[call["dtype"]]
                np.testing.assert_allclose(float(out), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", list(VALUE_TOL))
@pytest.mark.parametrize(
    "call",
    [
        {"shape": (3, 2, 3), "vector_axis": 0, "column_axis": -1, "norm": "l1"},
        {
            "shape": (3, 2, 3, 2),
            "vector_axis": (2, 0),
            "column_axis": 3,
            "norm": "squared",
            "off_diagonal": True,
            "double_sided": True,
        },
        {"shape": (2, 3, 3), "vector_axis": 1, "column_axis": 0, "norm": "huber"}
        | {"normalize": True},
    ],
    ids=["l1", "squared-double-off-diagonal", "huber-normalize"],
)
def test_valid_calls_meet_their_dtype_tolerance(dtype: str, call: dict[str, Any]) -> None:
    """The valid calls of the test above are rare among its draws: a few fixed ones, in
    every dtype, against VALUE_TOL."""
    opts = {k: v for k, v in call.items() if k != "shape"}
    if opts["norm"] == "huber":
        opts["norm"] = jop.huber(0.5)
    shape = call["shape"]
    phi = np.ones(shape, np.float32) + np.arange(math.prod(shape)).reshape(shape) % 3 * 0.25
    with jax.enable_x64(dtype == "float64"):
        got = float(jop.orthogonality_penalty(jnp.asarray(phi).astype(dtype), 2.0, **opts))
    want, _ = ref.penalty_and_grad(np.asarray(phi, np.float64), 2.0, **opts)
    tol = VALUE_TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
