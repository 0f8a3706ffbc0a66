"""The conv operator penalty against a dense float64 operator, OCNN's expression and the
matrix penalty; its kink, its spectrum, its errors and its transformations."""

from __future__ import annotations

import inspect
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import conv_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jax_orthopenalty as jop
from jax_orthopenalty._conv import conv_error, conv_pull
from jax_orthopenalty._conv_layout import make_conv_layout
from jax_orthopenalty._rules import make_rule

HIGHEST = jax.lax.Precision.HIGHEST
STATIC = (
    "input_shape",
    "kernel_layout",
    "stride",
    "dilation",
    "feature_group_count",
    "norm",
    "subgradient",
    "precision",
)


def _jitted(fn: Any) -> Any:
    """``fn`` jitted with its options static: one compile per shape (the suite's time)."""
    return jax.jit(
        fn, static_argnames=[n for n in STATIC if n in inspect.signature(fn).parameters]
    )


# Jitted for speed everywhere except where the eager path itself is tested (bad input,
# concrete beta checks: `jop.` names).
conv_orthogonality_penalty = _jitted(jop.conv_orthogonality_penalty)
conv_orthogonality_penalty_grad = _jitted(jop.conv_orthogonality_penalty_grad)
conv_orthogonality_error = _jitted(jop.conv_orthogonality_error)
conv_singular_values = _jitted(jop.conv_singular_values)


def to_layout(canonical: np.ndarray, layout: str) -> np.ndarray:
    """A kernel ``(M, C, *k)`` transposed to ``layout`` (its spatial letters in order)."""
    canon = "OI" + "".join(c for c in layout if c not in "OI")
    return np.transpose(canonical, [canon.index(c) for c in layout])


def circular_size(k: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]):
    """An input size divisible by the stride with N / S >= 2 k' + 1 (no aliasing)."""
    kp = [-(-(d * (w - 1) + 1) // s) for w, s, d in zip(k, stride, dilation, strict=True)]
    return tuple(s * (2 * w + 1) for s, w in zip(stride, kp, strict=True))


# (layout, M, C / G, k, stride, dilation, groups): rows and columns, strides 1 and 2,
# 1-D, 2-D and 3-D, HWIO and OIHW, a grouped and a dilated conv.
CASES = [
    ("WIO", 2, 3, (3,), (1,), (1,), 1),  # rows
    ("WIO", 3, 2, (3,), (1,), (1,), 1),  # columns
    ("WIO", 3, 2, (3,), (2,), (1,), 1),  # rows only thanks to the stride: C S = 4
    ("WIO", 5, 2, (3,), (2,), (1,), 1),  # columns, stride 2
    ("HWIO", 3, 2, (3, 3), (2, 2), (1, 1), 1),
    ("OIHW", 4, 3, (3, 2), (1, 1), (1, 1), 1),  # columns
    ("OIHW", 2, 3, (2, 3), (1, 2), (1, 1), 1),
    ("DHWIO", 2, 2, (2, 2, 2), (1, 1, 1), (1, 1, 1), 1),
    ("HWIO", 4, 2, (3, 3), (1, 1), (1, 1), 2),  # grouped, columns per group
    ("WIO", 2, 3, (2,), (1,), (2,), 1),  # dilated
    ("HWIO", 6, 2, (2, 2), (1, 2), (2, 1), 2),  # grouped, dilated and strided
]
NORMS: list[tuple[str, Any]] = [("l1", "l1"), ("squared", "squared"), ("huber", jop.huber(0.3))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-M{c[1]}-C{c[2]}-S{c[4]}")
def test_value_and_gradient_against_the_dense_operator(case: Any) -> None:
    layout, m, c, k, stride, dilation, groups = case
    canonical = np.random.default_rng(len(k) + m + c).normal(size=(m, c, *k)) * 0.5
    size = circular_size(k, stride, dilation)
    kw = dict(kernel_layout=layout, stride=stride, dilation=dilation, feature_group_count=groups)
    with jax.enable_x64(True):
        kernel = jnp.asarray(to_layout(canonical, layout))
        for name, norm in NORMS:
            want, want_grad = ref.penalty_and_grad(
                canonical, stride=stride, dilation=dilation, size=size, groups=groups,
                norm=name, delta=0.3,
            )  # fmt: skip
            value, grad = jax.value_and_grad(
                lambda x, norm=norm: conv_orthogonality_penalty(x, 0.5, norm=norm, **kw)
            )(kernel)
            np.testing.assert_allclose(value, 0.5 * want, rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(grad, 0.5 * to_layout(want_grad, layout), atol=1e-12)
            if name == "l1":  # the closed form is the backward pass: once per case
                closed = conv_orthogonality_penalty_grad(kernel, 0.5, norm=norm, **kw)
                np.testing.assert_allclose(closed, grad, atol=1e-13)


def test_stacked_kernel_is_independent_operators() -> None:
    rng = np.random.default_rng(1)
    kernels = rng.normal(size=(2, 3, 3, 3, 2, 3)).astype(np.float32)  # (stack..., H, W, I, O)
    stacked = conv_orthogonality_penalty(kernels)
    each = sum(conv_orthogonality_penalty(kernels[i, j]) for i in range(2) for j in range(3))
    np.testing.assert_allclose(stacked, each, rtol=1e-5)
    grad = jax.grad(conv_orthogonality_penalty)(jnp.asarray(kernels))
    np.testing.assert_allclose(
        grad[1, 2], jax.grad(conv_orthogonality_penalty)(kernels[1, 2]), rtol=1e-5, atol=1e-6
    )
    errors = conv_orthogonality_error(kernels)
    assert errors.shape == (2, 3)
    np.testing.assert_allclose(errors[1, 2], conv_orthogonality_error(kernels[1, 2]))


def test_check_grads_float64() -> None:
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        cases = [("HWIO", (3, 3, 2, 3), 2), ("OIW", (4, 2, 3), 1), ("OIW", (2, 3, 3), 2)]
        for (layout, shape, stride), (_, norm) in zip(cases, NORMS, strict=True):
            kernel = jnp.asarray(rng.normal(size=shape))

            def f(x: jax.Array, norm: Any = norm, layout: str = layout, s: int = stride):
                return conv_orthogonality_penalty(x, kernel_layout=layout, stride=s, norm=norm)

            check_grads(f, (kernel,), order=1, modes=["rev"])


def test_forward_mode_through_the_grad_function_and_not_the_custom_vjp() -> None:
    kernel = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 2, 2)), jnp.float32)
    v = jnp.ones_like(kernel)
    out, tangent = jax.jvp(
        lambda k: conv_orthogonality_penalty_grad(k, norm="squared"), (kernel,), (v,)
    )
    eps = 1e-3
    diff = (
        conv_orthogonality_penalty_grad(kernel + eps * v, norm="squared")
        - conv_orthogonality_penalty_grad(kernel - eps * v, norm="squared")
    ) / (2 * eps)
    np.testing.assert_allclose(tangent, diff, rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(conv_orthogonality_penalty, (kernel,), (v,))
    # Forward over reverse works through the closed-form backward pass.
    hvp = jax.jvp(
        jax.grad(lambda k: conv_orthogonality_penalty(k, norm="squared")), (kernel,), (v,)
    )
    np.testing.assert_allclose(hvp[1], tangent, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out, hvp[0], rtol=1e-6)


# --------------------------------------------------------------------------- the kink


def _signed_permutation_conv() -> np.ndarray:
    """HWIO, 3 x 3, C = 4 in, M = 3 out: a signed partial permutation at one tap."""
    k = np.zeros((3, 3, 4, 3), np.float32)
    k[2, 0, [1, 3, 0], [0, 1, 2]] = [1.0, -1.0, -1.0]
    return k


def _stride_two_signed_permutation() -> np.ndarray:
    """WIO, k = 2, S = 2, C = 2, M = 4: K' (4, 4, 1) is a signed permutation."""
    k = np.zeros((2, 2, 4), np.float32)
    for m, (c, r, s) in enumerate([(1, 0, 1.0), (0, 1, -1.0), (0, 0, 1.0), (1, 1, -1.0)]):
        k[r, c, m] = s
    return k


def _columns_isometry() -> np.ndarray:
    """HWIO 1 x 1, C = 2 in, M = 3 out: orthonormal columns (K^T K = I), M > C."""
    k = np.zeros((1, 1, 2, 3), np.float32)
    k[0, 0, 0, 2], k[0, 0, 1, 0] = -1.0, 1.0
    return k


@pytest.mark.parametrize(
    ("kernel", "layout", "stride"),
    [
        (_signed_permutation_conv(), "HWIO", 1),
        (_stride_two_signed_permutation(), "WIO", 2),
        (_columns_isometry(), "HWIO", 1),
    ],
    ids=["one-tap", "stride-2-polyphase", "columns"],
)
def test_exact_zero_gradient_at_an_orthogonal_conv(kernel: np.ndarray, layout: str, stride: int):
    kw = dict(kernel_layout=layout, stride=stride)
    assert conv_orthogonality_penalty(kernel, **kw) == 0
    assert conv_orthogonality_error(kernel, **kw) == 0
    grad = jax.grad(lambda k: conv_orthogonality_penalty(k, **kw))(kernel)
    assert np.all(np.asarray(grad) == 0)  # sign(0) = 0, exactly
    positive = jax.grad(lambda k: conv_orthogonality_penalty(k, subgradient="positive", **kw))
    assert np.any(np.asarray(positive(kernel)) != 0)
    # The operator is orthogonal: every singular value on a circular input is 1.
    size = (8,) * (kernel.ndim - 2)
    np.testing.assert_allclose(conv_singular_values(kernel, size, **kw), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------- OCNN


def ocnn_penalty(kernel_oihw: jax.Array, stride: int) -> jax.Array:
    """OCNN's expression: |Conv(K, K, stride S, padding floor((k-1)/S) S) - I_r0| summed."""
    m, _, kh, kw = kernel_oihw.shape
    pads = [((w - 1) // stride * stride,) * 2 for w in (kh, kw)]
    out = jax.lax.conv_general_dilated(
        kernel_oihw, kernel_oihw, (stride, stride), pads, precision=HIGHEST
    )
    target = jnp.zeros_like(out).at[:, :, out.shape[2] // 2, out.shape[3] // 2].set(jnp.eye(m))
    return jnp.sum(jnp.abs(out - target))


@pytest.mark.parametrize(
    ("shape", "stride"), [((3, 5, 3, 3), 1), ((4, 2, 3, 3), 2), ((2, 3, 5, 4), 2)]
)
def test_equals_ocnn_expression(shape: tuple[int, ...], stride: int) -> None:
    values = np.random.default_rng(4).normal(size=shape)
    with jax.enable_x64(True):
        kernel = jnp.asarray(values)
        ours = jax.jit(
            jax.value_and_grad(
                lambda k: conv_orthogonality_penalty(k, kernel_layout="OIHW", stride=stride)
            )
        )(kernel)
        theirs = jax.jit(jax.value_and_grad(lambda k: ocnn_penalty(k, stride)))(kernel)
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-12)
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("c", "m"), [(5, 3), (3, 5)], ids=["rows", "columns"])
def test_one_by_one_equals_the_matrix_penalty(c: int, m: int) -> None:
    w = jnp.asarray(np.random.default_rng(5).normal(size=(c, m)), jnp.float32)
    kernel = w[None, None]  # HWIO
    axes = {} if m <= c else {"vector_axis": 1, "column_axis": 0}
    for _, norm in NORMS:
        np.testing.assert_allclose(
            conv_orthogonality_penalty(kernel, 0.7, norm=norm),
            jop.orthogonality_penalty(w, 0.7, norm=norm, **axes),
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            jax.grad(conv_orthogonality_penalty)(kernel)[0, 0],
            jax.grad(lambda x: jop.orthogonality_penalty(x, **axes))(w),
            rtol=1e-5,
        )


# --------------------------------------------------------------------------- spectrum


@pytest.mark.parametrize(
    ("layout", "shape", "stride", "size", "groups"),
    [
        ("WIO", (3, 2, 3), 1, (6,), 1),
        ("WIO", (3, 2, 5), 2, (6,), 1),
        ("HWIO", (3, 3, 2, 3), 1, (4, 5), 1),
        ("OIHW", (2, 3, 3, 2), 2, (6, 4), 1),
        ("HWIO", (2, 2, 2, 4), (1, 2), (4, 4), 2),
    ],
)
def test_singular_values_against_the_dense_operator(layout, shape, stride, size, groups) -> None:
    kernel = np.random.default_rng(6).normal(size=shape).astype(np.float32)
    s = conv_singular_values(
        kernel, size, kernel_layout=layout, stride=stride, feature_group_count=groups
    )
    canonical = np.transpose(kernel, [layout.index("O"), layout.index("I")] + [
        i for i, ch in enumerate(layout) if ch not in "OI"
    ]).astype(np.float64)  # fmt: skip
    strides = (stride,) * len(size) if isinstance(stride, int) else stride
    dense = ref.singular_values(
        canonical, stride=strides, dilation=(1,) * len(size), size=size, groups=groups
    )
    n = math.prod(w // st for w, st in zip(size, strides, strict=True))
    m, cp = shape[layout.index("O")] // groups, shape[layout.index("I")] * math.prod(strides)
    assert s.shape == ((groups,) if groups > 1 else ()) + (n, min(m, cp))
    per_group = np.asarray(s).reshape(groups, -1)
    for g in range(groups):
        want = dense[g][: per_group.shape[1]]  # the rest of the dense values are 0
        np.testing.assert_allclose(np.sort(per_group[g])[::-1], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dense[g][per_group.shape[1] :], 0, atol=1e-10)


# --------------------------------------------------------------------------- bad input

K4 = np.ones((3, 3, 2, 2), np.float32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernel_layout": 4}, TypeError, "`kernel_layout` must be a string"),
        ({"kernel_layout": "HWO"}, ValueError, "`kernel_layout` must have one 'O'"),
        ({"kernel_layout": "HHIO"}, ValueError, "`kernel_layout` must have"),
        ({"kernel_layout": "OI"}, ValueError, "`kernel_layout` must have"),
        ({"kernel_layout": "H1IO"}, ValueError, "`kernel_layout` must have"),
        ({"kernel_layout": "DHWIO"}, ValueError, "`kernel` must have rank >= 5"),
        ({"stride": 0}, ValueError, "`stride` must be a positive int or a tuple of 2"),
        ({"stride": (1, 2, 1)}, ValueError, "`stride` must be"),
        ({"stride": 1.5}, TypeError, "`stride` must be"),
        ({"stride": True}, TypeError, "`stride` must be"),
        ({"dilation": -1}, ValueError, "`dilation` must be"),
        ({"dilation": (1, 0)}, ValueError, "`dilation` must be"),
        ({"feature_group_count": 0}, ValueError, "`feature_group_count` must be >= 1"),
        ({"feature_group_count": 2.0}, TypeError, "`feature_group_count` must be a positive"),
        ({"feature_group_count": 3}, ValueError, "`feature_group_count`=3 must divide"),
        ({"norm": "spectral"}, ValueError, "`norm`='spectral' is a per-group matrix norm"),
        ({"norm": "max"}, ValueError, "`norm`='max' is a per-group"),
        ({"norm": "l2"}, ValueError, "`norm` must be"),
        ({"subgradient": "up"}, ValueError, "`subgradient` must be"),
        ({"subgradient": lambda x: x.sum()}, TypeError, "`subgradient` .* must map an array"),
        ({"beta": -1.0}, ValueError, "`beta` must be finite and >= 0"),
        ({"beta": jnp.ones(2)}, ValueError, "`beta` must be a scalar"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = dict(kwargs)
    layout_only = not {"norm", "subgradient", "beta"} & set(kwargs)
    beta = kwargs.pop("beta", 1.0)
    with pytest.raises(error, match=match):
        jop.conv_orthogonality_penalty(K4, beta, **kwargs)
    if layout_only:
        with pytest.raises(error, match=match):
            jop.conv_orthogonality_error(K4, **kwargs)
        with pytest.raises(error, match=match):
            jop.conv_singular_values(K4, (6, 6), **kwargs)


@pytest.mark.parametrize(
    ("kernel", "error", "match"),
    [
        (K4.astype(np.complex64), TypeError, "not supported for the conv operator"),
        (K4.astype(np.int32), TypeError, "`kernel` must have a real floating dtype"),
        (np.ones((3, 2, 2), np.float32), ValueError, "`kernel` must have rank >= 4"),
        (np.ones((3, 0, 2, 2), np.float32), ValueError, "`kernel` of shape .* has an empty"),
    ],
)
def test_bad_kernels(kernel: np.ndarray, error: type[Exception], match: str) -> None:
    for fn in (
        jop.conv_orthogonality_penalty,
        jop.conv_orthogonality_penalty_grad,
        jop.conv_orthogonality_error,
    ):
        with pytest.raises(error, match=match):
            fn(kernel)


@pytest.mark.parametrize(
    ("size", "kwargs", "match"),
    [
        ((6,), {}, "`input_shape` must be a tuple of 2 ints"),
        ([6, 6, 6], {}, "`input_shape` must be a tuple of 2"),
        ((6.0, 6), {}, "`input_shape` must hold Python ints"),
        ((6, 5), {"stride": 2}, r"`input_shape`=\(6, 5\) must be divisible by the stride"),
        ((2, 6), {}, r"must be at least the \(dilated\) kernel size \(3, 3\)"),
        ((4, 6), {"dilation": 2}, r"at least the \(dilated\) kernel size \(5, 5\)"),
    ],
)
def test_bad_input_shape(size: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        jop.conv_singular_values(K4, size, **kwargs)


def test_conv_pull_rejects_a_scale_of_the_wrong_shape_and_a_matrix_rule() -> None:
    layout = make_conv_layout(5, "HWIO", 1, 1, 1)
    kernel = jnp.ones((2, 3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"`scale` must be a scalar or have the operator shape"):
        conv_pull(kernel, jnp.ones(3), layout, make_rule("l1", "zero"), HIGHEST)
    with pytest.raises(ValueError, match="`rule` must be entrywise"):
        conv_pull(kernel, 1.0, layout, make_rule("max", "zero"), HIGHEST)


# --------------------------------------------------------------------------- NaN, beta


def test_nan_in_nan_out_per_operator() -> None:
    kernel = np.random.default_rng(7).normal(size=(3, 3, 3, 2, 4)).astype(np.float32)  # stack 3
    kernel[1, 0, 0, 0, 0] = np.nan
    assert np.isnan(conv_orthogonality_penalty(kernel))
    grad = np.asarray(jax.grad(conv_orthogonality_penalty)(kernel))
    assert np.all(np.isnan(grad[1])) and np.all(np.isfinite(grad[[0, 2]]))
    error = np.asarray(conv_orthogonality_error(kernel))
    assert np.isnan(error[1]) and np.all(np.isfinite(error[[0, 2]]))
    # Overflow: X is infinite, the operator's gradient NaN (never finite and wrong).
    big = np.full((1, 1, 2, 2), 1e30, np.float32)
    assert np.isinf(conv_orthogonality_penalty(big))
    assert np.all(np.isnan(jax.grad(conv_orthogonality_penalty)(big)))


@pytest.mark.parametrize(
    "beta",
    [2.0, 2, np.float32(2.0), jnp.asarray(2.0), jnp.float32(2.0), "traced"],
    ids=["float", "int", "np.float32", "jnp-weak", "jnp-strong", "traced"],
)
def test_beta_kinds(beta: Any) -> None:
    kernel = jnp.asarray(np.random.default_rng(8).normal(size=(3, 3, 2, 3)), jnp.float32)
    base = conv_orthogonality_penalty(kernel)
    if isinstance(beta, str):  # traced: an argument of the jitted function
        beta = jnp.float32(2.0)
        value_and_grads = jax.jit(jax.value_and_grad(jop.conv_orthogonality_penalty, (0, 1)))
        value, (grad, db) = value_and_grads(kernel, beta)
    else:  # concrete: closed over, so the eager checks of `beta` see its value
        value, grad = jax.jit(
            jax.value_and_grad(lambda k: jop.conv_orthogonality_penalty(k, beta))
        )(kernel)
        db = jax.jit(jax.grad(jop.conv_orthogonality_penalty, 1))(kernel, jnp.float32(beta))
    np.testing.assert_allclose(value, 2 * base, rtol=1e-6)
    np.testing.assert_allclose(db, base, rtol=1e-6)
    np.testing.assert_allclose(grad, 2 * conv_orthogonality_penalty_grad(kernel), rtol=1e-6)


def test_bfloat16_kernel() -> None:
    kernel = jnp.asarray(np.random.default_rng(9).normal(size=(3, 3, 4, 4)) * 0.3, jnp.bfloat16)
    value, grad = jax.value_and_grad(conv_orthogonality_penalty)(kernel)
    assert value.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
    want = conv_orthogonality_penalty(kernel.astype(jnp.float32))
    np.testing.assert_allclose(float(value), float(want), rtol=1e-2)
    want_grad = jax.grad(conv_orthogonality_penalty)(kernel.astype(jnp.float32))
    np.testing.assert_allclose(grad.astype(jnp.float32), want_grad, rtol=2e-2, atol=2e-2)
    assert conv_orthogonality_error(kernel).dtype == jnp.float32
    assert conv_singular_values(kernel, (6, 6)).dtype == jnp.float32


# --------------------------------------------------------------------------- internal API


def test_conv_pull_per_operator_scale_and_error() -> None:
    rng = np.random.default_rng(10)
    kernel = jnp.asarray(rng.normal(size=(2, 4, 3, 3)), jnp.float32)  # stack 2, OIW, G = 2
    layout = make_conv_layout(4, "OIW", 1, 1, 2)
    assert layout.operator_shape(kernel.shape) == (2, 2)
    assert layout.rows(kernel.shape)  # per group: M / G = 2 <= C / G = 3
    scale = jnp.asarray([[1.0, 2.0], [0.0, 0.5]])
    pull = jax.jit(conv_pull, static_argnums=(2, 3, 4))
    grad, error = pull(kernel, scale, layout, make_rule("l1", "zero"), HIGHEST)
    assert grad.shape == kernel.shape and grad.dtype == kernel.dtype
    assert error.shape == (2, 2)
    for i in range(2):
        for g in range(2):
            block = kernel[i, 2 * g : 2 * g + 2]
            np.testing.assert_allclose(
                grad[i, 2 * g : 2 * g + 2],
                scale[i, g] * conv_orthogonality_penalty_grad(block, kernel_layout="OIW"),
                rtol=1e-5,
                atol=1e-6,
            )
            np.testing.assert_allclose(
                error[i, g], conv_orthogonality_error(block, kernel_layout="OIW"), rtol=1e-6
            )
    np.testing.assert_allclose(conv_error(kernel, layout, HIGHEST), error)
    np.testing.assert_allclose(
        conv_orthogonality_error(kernel, kernel_layout="OIW", feature_group_count=2), error
    )


# --------------------------------------------------------------------------- transformations

KERNEL = np.random.default_rng(11).normal(size=(3, 3, 2, 3)).astype(np.float32) * 0.5
OPTIONS = {"stride": 2, "norm": "squared"}


def _loss(k: jax.Array, beta: Any = 1.5) -> jax.Array:
    return conv_orthogonality_penalty(k, beta, **OPTIONS)


def _grad_twice(k: jax.Array) -> jax.Array:
    g = jax.grad(_loss)
    return jax.grad(lambda x: jnp.vdot(g(x), jnp.ones_like(x)))(k)


TRANSFORMS = {
    "jit": lambda k: jax.jit(jax.grad(_loss))(k),
    "vmap": lambda k: jax.vmap(jax.grad(_loss))(jnp.stack([k, k]))[1],
    "checkpoint": lambda k: jax.grad(jax.checkpoint(_loss))(k),
    "scan": lambda k: jax.lax.scan(lambda c, x: (c, jax.grad(_loss)(x)), 0.0, k[None])[1][0],
    "cond": lambda k: jax.grad(lambda x: jax.lax.cond(True, _loss, lambda y: 0.0 * _loss(y), x))(
        k
    ),
    "traced-beta-checkpoint": lambda k: jax.jit(
        jax.grad(jax.checkpoint(lambda x, b: _loss(x, b)))
    )(k, jnp.float32(1.5)),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transformations(name: str) -> None:
    want = conv_orthogonality_penalty_grad(KERNEL, 1.5, **OPTIONS)
    np.testing.assert_allclose(TRANSFORMS[name](jnp.asarray(KERNEL)), want, rtol=1e-5, atol=1e-6)


def test_grad_of_grad_matches_the_grad_function() -> None:
    want = jax.grad(
        lambda x: jnp.vdot(conv_orthogonality_penalty_grad(x, 1.5, **OPTIONS), jnp.ones_like(x))
    )(jnp.asarray(KERNEL))
    np.testing.assert_allclose(jax.jit(_grad_twice)(KERNEL), want, rtol=1e-4, atol=1e-5)


def test_internal_api_under_jit_vmap_scan() -> None:
    layout = make_conv_layout(4, "HWIO", 2, 1, 1)
    rule = make_rule("l1", "zero")

    def pull(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return conv_pull(k, jnp.float32(2.0), layout, rule, HIGHEST)

    want = conv_orthogonality_penalty_grad(KERNEL, 2.0, stride=2)
    stacked = jnp.stack([jnp.asarray(KERNEL)] * 2)
    np.testing.assert_allclose(jax.vmap(pull)(stacked)[0][1], want, rtol=1e-6)
    np.testing.assert_allclose(
        jax.lax.map(pull, stacked)[1][0], conv_error(KERNEL, layout, HIGHEST)
    )


def test_shard_map_with_a_replicated_kernel() -> None:
    mesh = jax.make_mesh((1,), ("x",))

    @jax.jit
    def step(k: jax.Array, beta: jax.Array) -> jax.Array:
        fn = jax.shard_map(
            lambda k, b: jax.grad(_loss)(k, b), mesh=mesh, in_specs=(P(), P()), out_specs=P()
        )
        return fn(k, beta)

    want = conv_orthogonality_penalty_grad(KERNEL, 1.5, **OPTIONS)
    np.testing.assert_allclose(step(KERNEL, jnp.float32(1.5)), want, rtol=1e-5, atol=1e-6)


def test_export_with_a_symbolic_stack_axis() -> None:
    layout = make_conv_layout(5, "HWIO", 2, 1, 1)
    rule = make_rule("l1", "zero")

    def f(k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        grad, error = conv_pull(k, 1.0, layout, rule, HIGHEST)
        return jax.grad(lambda x: conv_orthogonality_penalty(x, stride=2))(k), grad, error

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 3, 3, 2, 3"), jnp.float32)
    exported = jax.export.export(jax.jit(f))(spec)
    stacked = np.stack([KERNEL, 2 * KERNEL, -KERNEL])
    grad, pulled, error = exported.call(stacked)
    want = conv_orthogonality_penalty_grad(stacked, stride=2)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pulled, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(error, conv_orthogonality_error(stacked, stride=2), rtol=1e-6)


# --------------------------------------------------------------------------- docs


def test_docs_page_code_runs() -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "convolutions.md"
    fence = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.M | re.S)
    blocks = [textwrap.dedent(m.group(2)) for m in fence.finditer(page.read_text())]
    assert blocks
    for i, block in enumerate(blocks):
        namespace: dict[str, object] = {"__name__": f"docs_convolutions_{i}"}
        with jax.numpy_rank_promotion("allow"):
            exec(compile(block, f"docs/convolutions.md[block {i}]", "exec"), namespace)
