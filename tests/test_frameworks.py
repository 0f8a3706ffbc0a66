"""dimension_numbers_for on real flax linen, flax nnx and equinox models.

Every leaf's update is compared with a float64 NumPy reference written in the layout a
user means (``canonical``: plain reshapes and transposes to (groups, l, n), the Gram
matrix, the sign, 2 beta Phi G), and every other leaf must be skipped.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_orthopenalty as jop
from jax_orthopenalty._frameworks import markdown_table

ROOT = Path(__file__).resolve().parent.parent
BETA = 0.5
KEY = jax.random.key(0)


# --------------------------------------------------------------------------- reference


def canonical(w: Any, kind: str, spatial: int = 0) -> np.ndarray:
    """``w`` as the (groups, l, n) matrices a user means, by NumPy reshapes; leading
    axes beyond the layer's own are layers (groups). Wide (n > l): the rows."""
    w = np.asarray(w, np.float64)
    if kind == "hwoi":  # flax ConvTranspose(transpose_kernel=True): (*spatial, out, in)
        return canonical(np.swapaxes(w, -1, -2), "hwio", spatial)
    if kind == "in_out":  # (..., in, out)
        i, o = w.shape[-2:]
        m = w.reshape(-1, i, o)
        return np.swapaxes(m, 1, 2) if o > i else m
    if kind == "out_in":  # (..., out, in)
        o, i = w.shape[-2:]
        m = w.reshape(-1, o, i)
        return m if o > i else np.swapaxes(m, 1, 2)
    if kind == "hwio":  # (..., *spatial, in, out)
        taps = int(np.prod(w.shape[w.ndim - 2 - spatial : -2]))
        i, o = w.shape[-2:]
        m = w.reshape(-1, taps * i, o)
        return np.swapaxes(m, 1, 2) if o > taps * i else m  # wide: the flattened rows
    if kind == "oihw":  # (..., out, in, *spatial)
        o, i = w.shape[w.ndim - 2 - spatial : w.ndim - spatial]
        taps = int(np.prod(w.shape[w.ndim - spatial :]))
        m = w.reshape(-1, o, i * taps)
        return m if o > taps * i else np.swapaxes(m, 1, 2)  # wide: the flattened rows
    if kind == "qkv":  # (..., d, heads, head_dim): heads are groups
        d, h, k = w.shape[-3:]
        m = np.transpose(w.reshape(-1, d, h, k), (0, 2, 1, 3)).reshape(-1, d, k)
        return np.swapaxes(m, 1, 2) if k > d else m
    if kind == "attn_out":  # (..., heads, head_dim, d)
        h, k, d = w.shape[-3:]
        m = w.reshape(-1, h * k, d)
        return np.swapaxes(m, 1, 2) if d > h * k else m  # wide: the flattened rows
    raise AssertionError(kind)


def penalty_grad(m: np.ndarray, beta: float) -> np.ndarray:
    gram = np.einsum("gla,glb->gab", m, m) - np.eye(m.shape[-1])
    return 2 * beta * m @ np.sign(gram)


def penalty(m: np.ndarray, beta: float) -> float:
    return beta * float(np.abs(np.einsum("gla,glb->gab", m, m) - np.eye(m.shape[-1])).sum())


def _is_dims(x: object) -> bool:
    return x is None or isinstance(x, jop.OrthoDims)


def by_path(tree: Any, is_leaf: Any = None) -> dict[str, Any]:
    return {
        jax.tree_util.keystr(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    }


def assert_orthonormal(w: Any, kind: tuple[Any, ...], atol: float, path: str) -> None:
    q = canonical(w, *kind)
    eye = np.broadcast_to(np.eye(q.shape[2]), (q.shape[0], q.shape[2], q.shape[2]))
    np.testing.assert_allclose(np.einsum("gla,glb->gab", q, q), eye, atol=atol, err_msg=path)


def check(
    params: Any, dims: Any, kinds: dict[str, tuple[Any, ...]], *, project: bool = False
) -> None:
    """Every leaf named in ``kinds`` gets the reference penalty gradient and value and
    landing (and, with ``project``, projection) in that layout; every other leaf is
    skipped."""
    with jax.enable_x64(True):
        # NumPy: an eager cast or zeros_like per leaf would compile one program each.
        p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        zeros = jax.tree.map(np.zeros_like, p64)
        add = jop.add_orthogonality_penalty(BETA, dimension_numbers=dims)
        grads = jax.jit(add.update)(zeros, add.init(p64), p64)[0]
        # Jitted, each: op by op, a model's worth of leaves costs a compile per op.
        value = jax.jit(lambda p: jop.tree_orthogonality_penalty(p, BETA, dimension_numbers=dims))(
            p64
        )
        moved = zeros
        if project:
            proj = jop.project_orthonormal(dimension_numbers=dims)
            moved = jax.jit(proj.update)(zeros, proj.init(p64), p64)[0]
        landing = jop.landing(1.0, dimension_numbers=dims)
        landed = jax.jit(landing.update)(zeros, landing.init(p64), p64)[0]
        leaves, layouts = by_path(p64), by_path(dims, _is_dims)
        grads, moved, landed = by_path(grads), by_path(moved), by_path(landed)
    assert set(kinds) <= set(leaves), set(kinds) - set(leaves)
    total = 0.0
    for path, w in leaves.items():
        if path not in kinds:
            assert layouts[path] is None, (path, layouts[path])
            for out in (grads, moved, landed):
                np.testing.assert_array_equal(out[path], 0.0, err_msg=path)
            continue
        assert isinstance(layouts[path], jop.OrthoDims), path
        m = canonical(w, *kinds[path])
        assert m.shape[1] >= m.shape[2], (path, m.shape)  # never n > l
        np.testing.assert_allclose(
            canonical(grads[path], *kinds[path]), penalty_grad(m, BETA), atol=1e-12, err_msg=path
        )
        total += penalty(m, BETA)
        if project:
            assert_orthonormal(np.asarray(w) + np.asarray(moved[path]), kinds[path], 1e-9, path)
        assert np.all(np.isfinite(np.asarray(landed[path]))), path
    np.testing.assert_allclose(float(value), total, rtol=1e-12)


# --------------------------------------------------------------------------- flax linen


class Wrapper(nn.Module):
    """A custom module type around a Dense: the Dense inside is found."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(3, name="inner")(x)


class Unknown(nn.Module):
    """A module type with its own matrix: not in the table, so skipped."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.param("w", nn.initializers.normal(), (x.shape[-1], 4))


class ScanDense(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return nn.Dense(8)(x), None


class LinenZoo(nn.Module):
    @nn.compact
    def __call__(self, img: jax.Array, tokens: jax.Array) -> jax.Array:
        y = nn.Conv(8, (3, 3), name="conv")(img)  # (3, 3, 3, 8)
        y = nn.Conv(16, (1, 1), name="pointwise")(y)  # (1, 1, 8, 16): wide, rows
        y = nn.Conv(32, (3, 3), name="wide3x3")(img)  # (3, 3, 3, 32): wide, rows of (27, 32)
        y = nn.ConvTranspose(4, (3,), name="up")(img[:, 0])  # (3, 3, 4)
        y = nn.ConvTranspose(4, (2, 2), transpose_kernel=True, name="upt")(img)  # (2, 2, 4, 3)
        y = nn.Conv(6, (3, 3), feature_group_count=3, name="grouped")(img)
        h = nn.Embed(11, 8, name="embed")(tokens)  # (11, 8): skipped
        h = nn.LayerNorm(name="norm")(h)
        h = nn.DenseGeneral((2, 3), name="general")(h)  # (8, 2, 3): 2 groups
        h = nn.Dense(8, name="dense")(h.reshape(*h.shape[:-2], 6))  # (6, 8): wide, rows
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(h)
        h, _ = nn.scan(
            ScanDense, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )(name="stack")(h, None)  # (3, 8, 8): 3 groups
        h = nn.remat(nn.Dense)(5, name="remat")(h)
        h = Wrapper(name="wrapper")(h)
        h = Unknown(name="unknown")(h)
        h = nn.BatchNorm(use_running_average=False, name="bn")(h)
        return h + jnp.sum(y)


LINEN_KINDS = {
    "['conv']['kernel']": ("hwio", 2),
    "['pointwise']['kernel']": ("hwio", 2),
    "['wide3x3']['kernel']": ("hwio", 2),
    "['up']['kernel']": ("hwio", 1),
    "['upt']['kernel']": ("hwoi", 2),
    "['general']['kernel']": ("qkv",),
    "['dense']['kernel']": ("in_out",),
    "['attn']['query']['kernel']": ("qkv",),
    "['attn']['key']['kernel']": ("qkv",),
    "['attn']['value']['kernel']": ("qkv",),
    "['attn']['out']['kernel']": ("attn_out",),
    "['stack']['Dense_0']['kernel']": ("in_out",),
    "['remat']['kernel']": ("in_out",),
    "['wrapper']['inner']['kernel']": ("in_out",),
}


@functools.cache  # immutable: the model, its variables and inputs are shared by the tests
def linen_zoo() -> tuple[nn.Module, Any, tuple[jax.Array, jax.Array]]:
    model = LinenZoo()
    inputs = (jnp.ones((2, 5, 5, 3)), jnp.zeros((2, 4), jnp.int32))
    variables = jax.jit(model.init)(KEY, *inputs)
    return model, variables, inputs


def test_linen_every_leaf() -> None:
    model, variables, inputs = linen_zoo()
    with pytest.warns(
        UserWarning,
        match=r"1 parameter\(s\).*\['unknown'\]\['w'\] \(unknown module type Unknown\)",
    ):
        dims = jop.dimension_numbers_for(model, variables["params"], *inputs)
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(
        jax.tree.map(lambda _: 0, dims, is_leaf=_is_dims)
    )
    check(variables["params"], dims, LINEN_KINDS)


def test_linen_variables_dict_and_shape_inputs() -> None:
    """The whole variables dict works too (other collections: None), and the inputs
    may be shapes."""
    model, variables, inputs = linen_zoo()
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    with pytest.warns(UserWarning, match="unknown module type Unknown"):
        dims = jop.dimension_numbers_for(model, variables, *shapes)
        alone = jop.dimension_numbers_for(model, variables["params"], *inputs)
    assert set(dims) == {"params", "batch_stats"}
    assert all(d is None for d in jax.tree.leaves(dims["batch_stats"], is_leaf=_is_dims))
    assert by_path(dims["params"], _is_dims) == by_path(alone, _is_dims)


# --------------------------------------------------------------------------- flax nnx


class NnxWrapper(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.inner = nnx.Linear(8, 3, rngs=rngs)


class NnxUnknown(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 4)))


class NnxZoo(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.conv1d = nnx.Conv(4, 16, 1, rngs=rngs)  # (1, 4, 16): wide, rows
        self.up = nnx.ConvTranspose(3, 4, (2, 2), rngs=rngs)
        self.linear = nnx.Linear(8, 4, rngs=rngs)
        self.general = nnx.LinearGeneral(8, (2, 3), rngs=rngs)
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 8, 8, decode=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.wrapper = NnxWrapper(rngs)
        self.unknown = NnxUnknown(rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stack(rngs: nnx.Rngs) -> nnx.Linear:
            return nnx.Linear(8, 6, rngs=rngs)

        self.stack = stack(rngs)  # (3, 8, 6): 3 groups

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.bn(self.attn(self.ln(x)[:, None, :])[:, 0])
        return self.linear(h).sum() + self.wrapper.inner(h).sum()


NNX_KINDS = {
    "['conv']['kernel']": ("hwio", 2),
    "['conv1d']['kernel']": ("hwio", 1),
    "['up']['kernel']": ("hwio", 2),
    "['linear']['kernel']": ("in_out",),
    "['general']['kernel']": ("qkv",),
    "['attn']['query']['kernel']": ("qkv",),
    "['attn']['key']['kernel']": ("qkv",),
    "['attn']['value']['kernel']": ("qkv",),
    "['attn']['out']['kernel']": ("attn_out",),
    "['stack']['kernel']": ("in_out",),
    "['wrapper']['inner']['kernel']": ("in_out",),
}


def test_nnx_every_leaf() -> None:
    model = nnx.jit(lambda: NnxZoo(nnx.Rngs(0)))()  # jitted: its initialisers op by op are slow
    with pytest.warns(
        UserWarning, match=r"\['unknown'\]\['w'\] \(unknown module type NnxUnknown\)"
    ):
        dims = jop.dimension_numbers_for(model)
    check(nnx.as_pure(nnx.state(model, nnx.Param)), dims, NNX_KINDS)


@pytest.mark.optax_promotion
def test_nnx_optimizer_end_to_end() -> None:
    """With nnx.Optimizer (init: Variables, update: pure arrays), the penalty, landing
    and projection in one optax chain: a step moves exactly the expected leaves, and
    the projected kernels are orthonormal in the layout meant."""
    model = NnxZoo(nnx.Rngs(1))
    with pytest.warns(UserWarning, match="unknown module type NnxUnknown"):
        dims = jop.dimension_numbers_for(model)
    tx = optax.chain(
        jop.add_orthogonality_penalty(1e-2, dimension_numbers=dims),
        jop.landing(1.0, dimension_numbers=dims),
        optax.adam(1e-3),
        jop.project_orthonormal(dimension_numbers=dims),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((2, 8))

    @nnx.jit
    def step(model: NnxZoo, optimizer: nnx.Optimizer[NnxZoo]) -> None:
        grads = nnx.grad(lambda m: m(x))(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    params = by_path(nnx.as_pure(nnx.state(model, nnx.Param)))
    for path, kind in NNX_KINDS.items():
        assert_orthonormal(params[path], kind, 1e-5, path)


# --------------------------------------------------------------------------- equinox


class EqxWrapper(eqx.Module):
    inner: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        self.inner = eqx.nn.Linear(8, 3, key=key)


class EqxUnknown(eqx.Module):
    w: jax.Array

    def __init__(self, key: jax.Array) -> None:
        self.w = jax.random.normal(key, (4, 4))


class EqxZoo(eqx.Module):
    conv1: eqx.nn.Conv1d
    conv2: eqx.nn.Conv2d
    conv3: eqx.nn.Conv3d
    pointwise: eqx.nn.Conv2d
    up: eqx.nn.ConvTranspose2d
    grouped: eqx.nn.Conv2d
    linear: eqx.nn.Linear
    wide: eqx.nn.Linear
    mlp: eqx.nn.MLP
    embed: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    stack: eqx.nn.Linear
    wrapper: EqxWrapper
    unknown: EqxUnknown

    def __init__(self, key: jax.Array) -> None:
        k = iter(jax.random.split(key, 16))
        self.conv1 = eqx.nn.Conv1d(3, 4, 3, key=next(k))  # (4, 3, 3)
        self.conv2 = eqx.nn.Conv2d(3, 8, 3, key=next(k))  # (8, 3, 3, 3)
        self.conv3 = eqx.nn.Conv3d(2, 5, 2, key=next(k))  # (5, 2, 2, 2, 2)
        self.pointwise = eqx.nn.Conv2d(4, 8, 1, key=next(k))  # (8, 4, 1, 1): wide, rows
        self.up = eqx.nn.ConvTranspose2d(3, 4, 2, key=next(k))  # (4, 3, 2, 2)
        self.grouped = eqx.nn.Conv2d(4, 4, 3, groups=2, key=next(k))
        self.linear = eqx.nn.Linear(8, 4, key=next(k))
        self.wide = eqx.nn.Linear(3, 7, key=next(k))  # (7, 3): wide, rows
        self.mlp = eqx.nn.MLP(6, 2, width_size=5, depth=2, key=next(k))
        self.embed = eqx.nn.Embedding(10, 8, key=next(k))
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=next(k))
        self.norm = eqx.nn.LayerNorm(8)
        self.stack = eqx.filter_vmap(lambda key: eqx.nn.Linear(6, 4, key=key))(
            jax.random.split(next(k), 3)
        )  # (3, 4, 6): 3 groups
        self.wrapper = EqxWrapper(next(k))
        self.unknown = EqxUnknown(next(k))


EQX_KINDS = {
    ".conv1.weight": ("oihw", 1),
    ".conv2.weight": ("oihw", 2),
    ".conv3.weight": ("oihw", 3),
    ".pointwise.weight": ("oihw", 2),
    ".up.weight": ("oihw", 2),
    ".linear.weight": ("out_in",),
    ".wide.weight": ("out_in",),
    ".mlp.layers[0].weight": ("out_in",),
    ".mlp.layers[1].weight": ("out_in",),
    ".mlp.layers[2].weight": ("out_in",),
    ".attn.query_proj.weight": ("out_in",),
    ".attn.key_proj.weight": ("out_in",),
    ".attn.value_proj.weight": ("out_in",),
    ".attn.output_proj.weight": ("out_in",),
    ".stack.weight": ("out_in",),
    ".wrapper.inner.weight": ("out_in",),
}


def test_equinox_every_leaf() -> None:
    model = eqx.filter_jit(EqxZoo)(KEY)  # jitted: its initialisers op by op are slow
    with pytest.warns(UserWarning, match=r"\.unknown\.w \(unknown module type EqxUnknown\)"):
        dims = jop.dimension_numbers_for(model)
    assert isinstance(dims, EqxZoo)
    check(eqx.filter(model, eqx.is_array), dims, EQX_KINDS, project=True)


# --------------------------------------------------------------------------- flax's examples


class BasicBlock(nn.Module):
    """As flax's examples/imagenet ResNet: two 3x3 convs, a 1x1 projection on change."""

    filters: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
        y = nn.relu(norm()(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)))
        y = norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
        if x.shape != y.shape:
            x = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="conv_proj")(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    num_classes: int = 100

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(8, (7, 7), (2, 2), use_bias=False, name="conv_init")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn_init")(x))
        for i, filters in enumerate((8, 16)):
            x = BasicBlock(filters, (2, 2) if i else (1, 1))(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))  # 16 -> 100: wide


class EncoderBlock(nn.Module):
    """As flax's examples/lm1b: pre-LayerNorm attention and MLP."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(nn.LayerNorm()(x))
        x = x + y
        y = nn.Dense(16)(nn.LayerNorm()(x))  # 8 -> 16: wide, rows
        return x + nn.Dense(8)(nn.relu(y))


class Transformer(nn.Module):
    vocab: int = 24
    tied: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(self.vocab, 8)
        x = embed(tokens)
        x = x + self.param("pos_embedding", nn.initializers.normal(), (1, tokens.shape[1], 8))
        for _ in range(2):
            x = EncoderBlock()(x)
        x = nn.LayerNorm()(x)
        return embed.attend(x) if self.tied else nn.Dense(self.vocab, name="logits")(x)


def _kernels_have_layouts(params: Any, dims: Any) -> dict[str, jop.OrthoDims | None]:
    layouts = by_path(dims, _is_dims)
    for path, w in by_path(params).items():
        assert (layouts[path] is not None) == path.endswith("['kernel']"), path
        if layouts[path] is not None:
            d = layouts[path]
            err = jop.orthogonality_error(w, vector_axis=d.vector_axis, column_axis=d.column_axis)
            assert np.all(np.isfinite(np.asarray(err))), path
    return layouts


@pytest.mark.optax_promotion
def test_resnet_like_flax_imagenet() -> None:
    """Every conv and the head get a layout with n <= l (1x1 projections and the
    100-way head: rows), BatchNorm and nothing else is skipped, and the README's
    recipe, landing and projection all take one step."""
    model = ResNet()
    x = jnp.ones((2, 16, 16, 3))
    variables = jax.jit(model.init)(KEY, x)
    params = variables["params"]
    dims = jop.dimension_numbers_for(model, params, x)
    layouts = _kernels_have_layouts(params, dims)
    # (1, 1, 8, 16), wide: the 8 rows of the (8, 16) matrix
    assert layouts["['BasicBlock_1']['conv_proj']['kernel']"] == jop.OrthoDims(3, (0, 1, 2))
    assert layouts["['Dense_0']['kernel']"] == jop.OrthoDims(1, 0)
    assert layouts["['conv_init']['kernel']"] == jop.OrthoDims((0, 1, 2), -1)
    kinds = {p: ("hwio", 2) for p in layouts if p.endswith("['kernel']")}
    kinds["['Dense_0']['kernel']"] = ("in_out",)
    check(params, dims, kinds)

    def loss(p: Any, stats: Any) -> tuple[jax.Array, Any]:
        out, new = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.mean(out**2), new

    # Jitted: op by op, a ResNet's gradient and every leaf's update compile per op.
    grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, variables["batch_stats"])
    for tx in (
        optax.chain(jop.add_orthogonality_penalty(1e-3, dimension_numbers=dims), optax.adam(1e-3)),
        optax.chain(jop.landing(1.0, dimension_numbers=dims), optax.sgd(1e-2)),
        optax.chain(optax.sgd(1e-2), jop.project_orthonormal(dimension_numbers=dims)),
    ):
        new = jax.jit(lambda g, p, tx=tx: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
            grads, params
        )
        assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(new))


@pytest.mark.parametrize("tied", [True, False])
def test_transformer_like_flax_lm1b(tied: bool) -> None:
    model = Transformer(tied=tied)
    tokens = jnp.zeros((2, 5), jnp.int32)
    params = jax.jit(model.init)(KEY, tokens)["params"]
    with pytest.warns(
        UserWarning, match=r"\['pos_embedding'\] \(unknown module type Transformer\)"
    ):
        dims = jop.dimension_numbers_for(model, params, tokens)
    layouts = _kernels_have_layouts(params, dims)
    for path in layouts:
        if path.endswith("['kernel']"):
            assert layouts[path] is not None
    kinds: dict[str, tuple[Any, ...]] = {}
    for path in layouts:
        if re.search(r"\['(query|key|value)'\]\['kernel'\]", path):
            kinds[path] = ("qkv",)
        elif path.endswith("['out']['kernel']"):
            kinds[path] = ("attn_out",)
        elif path.endswith("['kernel']"):
            kinds[path] = ("in_out",)
    assert ("['logits']['kernel']" in kinds) is not tied
    assert layouts["['EncoderBlock_0']['Dense_0']['kernel']"] == jop.OrthoDims(1, 0)  # wide
    check(params, dims, kinds)


# --------------------------------------------------------------------------- errors, docs


def test_bad_models_and_arguments() -> None:
    with pytest.raises(TypeError, match="`model` must be an equinox Module"):
        jop.dimension_numbers_for({"w": jnp.ones((2, 2))})
    model, variables, inputs = linen_zoo()
    with pytest.raises(TypeError, match="needs its params and example inputs"):
        jop.dimension_numbers_for(model)
    wrong = {**variables["params"], "conv": {"kernel": jnp.ones((2, 2, 3, 8))}}
    with pytest.raises(TypeError, match="params do not match the LinenZoo model"):
        jop.dimension_numbers_for(model, wrong, *inputs)
    missing = {k: v for k, v in variables["params"].items() if k != "dense"}
    with pytest.raises(TypeError, match="params do not match"):
        jop.dimension_numbers_for(model, missing, *inputs)
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=KEY)
    with pytest.raises(TypeError, match="without params or inputs"):
        jop.dimension_numbers_for(mlp, eqx.filter(mlp, eqx.is_array))
    with pytest.raises(TypeError, match="without params or inputs"):
        jop.dimension_numbers_for(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.ones(2))
    # A parameter with fewer axes than its module type's own.
    linear = eqx.tree_at(lambda m: m.weight, eqx.nn.Linear(3, 2, key=KEY), jnp.ones(3))
    with pytest.raises(ValueError, match=r"\.weight has shape \(3,\), but a Linear"):
        jop.dimension_numbers_for(linear)


def test_flax_and_equinox_are_not_imported_with_the_package() -> None:
    code = (
        "import sys, jax_orthopenalty; "
        "assert not {'flax', 'equinox'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_docs_table_is_the_code_table() -> None:
    """docs/layouts.md prints the module-type table from jax_orthopenalty._frameworks."""
    page = (ROOT / "docs" / "layouts.md").read_text()
    assert markdown_table() in page, (
        "docs/layouts.md's module table differs from the code's: replace it with the "
        "output of python -c 'from jax_orthopenalty._frameworks import markdown_table; "
        "print(markdown_table())'"
    )
