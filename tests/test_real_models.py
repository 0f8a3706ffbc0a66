"""dimension_numbers_for on toy-size models built like flax's and equinox's examples.

Each model mirrors the structure of a real one (flax imagenet ResNet with a
data-parallel BatchNorm, ResNet18Local's ConvLocal, lm1b's boxed params, sst2's
OptimizedLSTMCell, Gemma's Einsum attention, vision_transformer's zero head, DCGAN's
grey stem; equinox RNN cells, attention, spectral norm, abstract models). Every
leaf's layout is asserted, every skip's reason or warning, and the README's recipe
takes one jitted step on each model: exactly the leaves with a layout move.
"""

from __future__ import annotations

import re
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
from jax_orthopenalty._frameworks import skip_reasons

# The README's recipe runs optax.adam (its step count under standard promotion).
pytestmark = pytest.mark.optax_promotion
KEY = jax.random.key(0)
D = jop.OrthoDims


def _is_dims(x: object) -> bool:
    return x is None or isinstance(x, (jop.OrthoDims, getattr(jop, "ConvDims", jop.OrthoDims)))


def layouts(dims: Any) -> dict[str, jop.OrthoDims | None]:
    return {
        jax.tree_util.keystr(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(dims, is_leaf=_is_dims)[0]
    }


def recipe_step(params: Any, dims: Any) -> None:
    """The README's recipe, one jitted step from zero gradients: the leaves with a
    layout move (none is orthonormal at init; a zero leaf is a stationary point of the
    penalty), every other leaf stays exactly."""
    tx = optax.chain(jop.add_orthogonality_penalty(1e-3, dimension_numbers=dims), optax.adam(1e-3))

    @jax.jit
    def step(p: Any) -> Any:
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
        return optax.apply_updates(p, updates)

    new = layouts(step(params))
    old = layouts(params)
    for path, d in layouts(dims).items():
        moved = not np.array_equal(np.asarray(new[path]), np.asarray(old[path]))
        assert moved == (d is not None and bool(np.any(np.asarray(old[path])))), (path, d)


# --------------------------------------------------------------------------- linen


class Block(nn.Module):
    """As flax's imagenet ResNet block, its BatchNorm data-parallel (axis_name)."""

    filters: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = nn.BatchNorm(use_running_average=not train, axis_name="batch")
        y = norm(nn.Conv(self.filters, (3, 3), use_bias=False)(x))
        return nn.relu(x + y)


class GreyResNet(nn.Module):
    """imagenet ResNet's shape on grey images, with ResNet18Local's ConvLocal."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(16, (3, 3), use_bias=False, name="stem")(x)  # (3, 3, 1, 16): wide
        x = nn.BatchNorm(use_running_average=not train, axis_name="batch", name="bn")(x)
        x = Block(16)(x, train)  # (3, 3, 16, 16)
        x = nn.ConvLocal(4, (3, 3), name="local")(x)  # (6, 6, 144, 4): 36 positions
        x = jax.lax.pmean(x, "batch")  # a collective of the model's own
        return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))  # (4, 10): wide


def test_resnet_with_data_parallel_batchnorm_and_conv_local() -> None:
    model, x = GreyResNet(), jnp.ones((2, 8, 8, 1))
    variables = jax.jit(
        lambda x: jax.vmap(lambda x: model.init(KEY, x[None]), axis_name="batch")(x)
    )(x)
    variables = jax.tree.map(lambda v: v[0], variables)  # one replica's
    dims = jop.dimension_numbers_for(model, variables["params"], x)
    assert layouts(dims) == {
        "['Block_0']['BatchNorm_0']['bias']": None,
        "['Block_0']['BatchNorm_0']['scale']": None,
        "['Block_0']['Conv_0']['kernel']": D((0, 1, 2), -1),
        "['bn']['bias']": None,
        "['bn']['scale']": None,
        "['head']['bias']": None,
        "['head']['kernel']": D(1, 0),
        "['local']['bias']": None,
        "['local']['kernel']": D(2, -1),
        "['stem']['kernel']": D(3, (0, 1, 2)),
    }
    recipe_step(variables["params"], dims)


def boxed(names: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class Lm1bBlock(nn.Module):
    """As flax's lm1b / T5X / MaxText: every kernel boxed with logical axis names."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(32, 8, embedding_init=boxed(("vocab", "embed")))
        x = embed(tokens)
        x = nn.MultiHeadDotProductAttention(
            num_heads=2,
            kernel_init=boxed(("embed", "heads", "kv")),
            out_kernel_init=boxed(("heads", "kv", "embed")),
        )(x)
        x = nn.Dense(16, kernel_init=boxed(("embed", "mlp")), name="wi")(x)  # wide
        x = nn.Dense(8, kernel_init=boxed(("mlp", "embed")), name="wo")(nn.relu(x))
        return embed.attend(x)


def test_lm1b_boxed_params_keep_their_boxes() -> None:
    model, tokens = Lm1bBlock(), jnp.zeros((2, 5), jnp.int32)
    params = jax.jit(model.init)(KEY, tokens)["params"]
    dims = jop.dimension_numbers_for(model, params, tokens)
    assert jax.tree.structure(jax.tree.map(lambda _: 0, dims, is_leaf=_is_dims)) == (
        jax.tree.structure(params)
    )
    kernel = dims["wi"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned) and kernel.names == ("embed", "mlp")
    expected = {
        "['Embed_0']['embedding']": None,
        "['MultiHeadDotProductAttention_0']['key']['bias']": None,
        "['MultiHeadDotProductAttention_0']['key']['kernel']": D(0, -1),
        "['MultiHeadDotProductAttention_0']['out']['bias']": None,
        "['MultiHeadDotProductAttention_0']['out']['kernel']": D((0, 1), -1),
        "['MultiHeadDotProductAttention_0']['query']['bias']": None,
        "['MultiHeadDotProductAttention_0']['query']['kernel']": D(0, -1),
        "['MultiHeadDotProductAttention_0']['value']['bias']": None,
        "['MultiHeadDotProductAttention_0']['value']['kernel']": D(0, -1),
        "['wi']['bias']": None,
        "['wi']['kernel']": D(1, 0),
        "['wo']['bias']": None,
        "['wo']['kernel']": D(0, -1),
    }
    # Boxed: the layout sits in the box's value slot, at the leaf's own path.
    assert layouts(dims) == {
        p + (".value" if "kernel" in p or "embedding" in p else ""): d for p, d in expected.items()
    }
    plain = jop.dimension_numbers_for(model, nn.meta.unbox(params), tokens)
    assert layouts(plain) == expected
    recipe_step(params, dims)
    recipe_step(nn.meta.unbox(params), plain)


class Sst2(nn.Module):
    """As flax's sst2: an embedding, an OptimizedLSTMCell scanned by nn.RNN, a head;
    the carry's initial noise draws from an "lstm" stream."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(20, 6)(tokens)
        cell = nn.OptimizedLSTMCell(4)
        carry = cell.initialize_carry(self.make_rng("lstm"), x[:, 0].shape)
        x = nn.RNN(cell)(x, initial_carry=carry)
        return nn.Dense(2)(x[:, -1])


def test_sst2_optimized_lstm_cell() -> None:
    """The "lstm" stream needs no rngs=: the trace gives a "params" stream, from which
    flax draws any stream it is not given (the values do not matter to shapes)."""
    model, tokens = Sst2(), jnp.zeros((2, 3), jnp.int32)
    params = jax.jit(lambda: model.init({"params": KEY, "lstm": KEY}, tokens))()["params"]
    dims = jop.dimension_numbers_for(model, params, tokens)
    same = jop.dimension_numbers_for(model, params, tokens, rngs={"lstm": KEY})
    assert layouts(same) == layouts(dims)
    cell = "['OptimizedLSTMCell_0']"  # made by the model, run inside nn.RNN's scan
    expected: dict[str, Any] = {"['Dense_0']['bias']": None, "['Dense_0']['kernel']": D(0, -1)}
    expected["['Embed_0']['embedding']"] = None
    for gate in "ifgo":
        expected[f"{cell}['i{gate}']['kernel']"] = D(0, -1)  # (6, 4)
        expected[f"{cell}['h{gate}']['kernel']"] = D(0, -1)  # (4, 4)
        expected[f"{cell}['h{gate}']['bias']"] = None
    assert layouts(dims) == expected
    recipe_step(params, dims)


class GemmaAttention(nn.Module):
    """As Gemma: q, k, v and the output projection are Einsums; the output's equation
    is given at call time."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q = nn.Einsum((2, 8, 4), "BTD,NDH->BTNH", use_bias=False, name="q")(x)
        kv = nn.Einsum((2, 2, 8, 4), "BSD,CKDH->CBSKH", use_bias=False, name="kv")(x)
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, kv[0])
        enc = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits), kv[1])
        return nn.Einsum((2, 4, 8), use_bias=False, name="out")(enc, "BTNH,NHD->BTD")


def test_gemma_like_einsum_attention() -> None:
    model, x = GemmaAttention(), jnp.ones((2, 3, 8))
    params = jax.jit(model.init)(KEY, x)["params"]
    dims = jop.dimension_numbers_for(model, params, x)
    assert layouts(dims) == {
        "['kv']['kernel']": D(2, -1),  # (2, 2, 8, 4): C and K groups, D vectors, H columns
        "['out']['kernel']": D((0, 1), -1),  # (2, 4, 8): N, H vectors, D columns
        "['q']['kernel']": D(1, -1),  # (2, 8, 4): N groups (heads)
    }
    recipe_step(params, dims)


class VisionTransformer(nn.Module):
    """As flax's vision_transformer: patches by a strided conv, a class token and
    position embeddings by raw self.param, a zero-initialised head, train keyword-only."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Conv(8, (4, 4), strides=(4, 4), name="embedding")(x)  # (4, 4, 3, 8)
        x = x.reshape(x.shape[0], -1, 8)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, 8))
        x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, 5, 8))
        x = nn.Dropout(0.1)(x, deterministic=not train)
        x = nn.Dense(8, name="pre_logits")(x[:, 0])
        return nn.Dense(3, kernel_init=nn.initializers.zeros, name="head")(x)


def test_vit_zero_head_and_what_apply_needs() -> None:
    model, x = VisionTransformer(), jnp.ones((2, 8, 8, 3))
    params = jax.jit(lambda x: model.init(KEY, x, train=False))(x)["params"]
    with pytest.raises(
        TypeError, match=r"keyword-only argument: 'train'.*__call__\(x, \*, train\)"
    ):
        jop.dimension_numbers_for(model, params, x)
    with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'x'") as info:
        jop.dimension_numbers_for(model, params, train=False)
    assert "the example inputs" in str(info.value) and isinstance(info.value.__cause__, TypeError)
    with pytest.warns(UserWarning, match=r"\['cls'\] \(unknown module type VisionTransformer\)"):
        dims = jop.dimension_numbers_for(model, params, x, train=False)
    assert layouts(dims) == {
        "['cls']": None,
        "['embedding']['bias']": None,
        "['embedding']['kernel']": D((0, 1, 2), -1),
        "['head']['bias']": None,
        "['head']['kernel']": D(0, -1),  # zeros: a stationary point of the penalty
        "['pos_embedding']": None,
        "['pre_logits']['bias']": None,
        "['pre_logits']['kernel']": D(0, -1),
    }
    grad = jop.tree_orthogonality_penalty  # the zero head is where the gradient vanishes
    g = jax.grad(lambda h: grad({"h": h}, 1.0, dimension_numbers={"h": D(0, -1)}))(
        params["head"]["kernel"]
    )
    np.testing.assert_array_equal(g, 0.0)
    recipe_step(params, dims)


class DcganStem(nn.Module):
    """DCGAN's discriminator on grey images: a 4x4x1 -> 64 stem, wider than its taps."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(64, (4, 4), (2, 2), name="stem")(x)


def test_dcgan_wide_stems_are_the_flattened_rows() -> None:
    """flax HWIO and equinox OIHW: the 16 rows (taps * in) of the (16, 64) matrix, one
    group, not 16 groups of one tap each; the penalty is that matrix's."""
    x = jnp.ones((1, 8, 8, 1))
    params = jax.jit(DcganStem().init)(KEY, x)["params"]
    flax_dims = jop.dimension_numbers_for(DcganStem(), params, x)
    assert layouts(flax_dims) == {"['stem']['bias']": None, "['stem']['kernel']": D(3, (0, 1, 2))}
    conv = eqx.nn.Conv2d(1, 64, 4, key=KEY)
    eqx_dims = jop.dimension_numbers_for(conv)
    assert layouts(eqx_dims) == {".weight": D(0, (1, 2, 3)), ".bias": None}
    for w, d in (
        (params["stem"]["kernel"], flax_dims["stem"]["kernel"]),
        (conv.weight, eqx_dims.weight),
    ):
        rows = (
            np.asarray(w, np.float64).reshape(-1, 64)
            if d.vector_axis == 3
            else (np.asarray(w, np.float64).reshape(64, -1).T)
        )
        assert rows.shape == (16, 64)
        expected = np.abs(rows @ rows.T - np.eye(16)).sum()
        got = jop.tree_orthogonality_penalty({"w": w}, 1.0, dimension_numbers={"w": d})
        np.testing.assert_allclose(float(got), expected, rtol=1e-4)
    recipe_step(params, flax_dims)
    recipe_step(eqx.filter(conv, eqx.is_array), eqx_dims)


class SnDiscriminator(nn.Module):
    """An SN-GAN discriminator head: a spectrally normalised conv and Dense."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.SpectralNorm(nn.Conv(8, (3, 3), name="conv"))(x, update_stats=train)
        return nn.SpectralNorm(nn.Dense(1, name="logit"))(x.mean((1, 2)), update_stats=train)


def test_linen_spectral_norm_penalises_the_raw_weight() -> None:
    """The power iteration's u and sigma (batch_stats, drawn from "params" when
    missing) need no rngs from the user; the raw kernels get their layouts."""
    model, x = SnDiscriminator(), jnp.ones((1, 6, 6, 2))
    variables = jax.jit(model.init)(KEY, x)
    dims = jop.dimension_numbers_for(model, variables["params"], x)
    assert layouts(dims) == {
        "['conv']['bias']": None,
        "['conv']['kernel']": D((0, 1, 2), -1),
        "['logit']['bias']": None,
        "['logit']['kernel']": D(0, -1),
    }
    recipe_step(variables["params"], dims)


# --------------------------------------------------------------------------- ensembles


class LinenEnsemble(nn.Module):
    """nn.vmap with the params' member axis at 1: (in, members, out) kernels."""

    features: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = nn.vmap(
            nn.Dense,
            variable_axes={"params": 1},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=5,
        )
        return dense(self.features, name="members")(x)


def test_stacked_axis_anywhere_is_a_group() -> None:
    x = jnp.ones((2, 8))
    params = jax.jit(LinenEnsemble().init)(KEY, x)["params"]
    assert params["members"]["kernel"].shape == (8, 5, 3)
    dims = jop.dimension_numbers_for(LinenEnsemble(), params, x)
    assert layouts(dims) == {"['members']['bias']": None, "['members']['kernel']": D(0, -1)}
    err = jop.orthogonality_error(params["members"]["kernel"], vector_axis=0, column_axis=-1)
    assert err.shape == (5,)  # one Gram per member
    recipe_step(params, dims)

    # Square members as many as their size: the member axis could be any axis. The
    # leading one is taken (where nn.scan, nnx.scan and eqx.filter_vmap stack), with a
    # warning naming the leaf: here, stacked on axis 1, it must be given by hand.
    square = LinenEnsemble(features=5)
    x5 = jnp.ones((2, 5))
    params5 = jax.jit(square.init)(KEY, x5)["params"]
    with pytest.warns(
        UserWarning,
        match=r"\['members'\]\['kernel'\] has shape \(5, 5, 5\).*taking the leading ones",
    ):
        dims5 = jop.dimension_numbers_for(square, params5, x5)
    assert dims5["members"]["kernel"] == D(1, -1)

    class NnxEnsemble(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            axes = nnx.StateAxes({nnx.Param: 1, ...: 0})

            @nnx.split_rngs(splits=5)
            @nnx.vmap(in_axes=(axes,), out_axes=axes)
            def make(rngs: nnx.Rngs) -> nnx.Linear:
                return nnx.Linear(8, 3, rngs=rngs)

            self.members = make(rngs)

    model = nnx.jit(lambda: NnxEnsemble(nnx.Rngs(0)))()
    dims = jop.dimension_numbers_for(model)
    assert layouts(dims) == {"['members']['bias']": None, "['members']['kernel']": D(0, -1)}


# --------------------------------------------------------------------------- equinox


class EqxRnnAttention(eqx.Module):
    gru: eqx.nn.GRUCell
    lstm: eqx.nn.LSTMCell
    attn: eqx.nn.MultiheadAttention
    sn: eqx.nn.SpectralNorm[eqx.nn.Linear]

    def __init__(self, key: jax.Array) -> None:
        k = jax.random.split(key, 5)
        self.gru = eqx.nn.GRUCell(4, 6, key=k[0])  # (18, 4), (18, 6)
        self.lstm = eqx.nn.LSTMCell(6, 3, key=k[1])  # (12, 6), (12, 3)
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[2])  # (8, 8) each
        self.sn = eqx.nn.SpectralNorm(eqx.nn.Linear(5, 3, key=k[3]), "weight", key=k[4])


EQX_EXPECTED = {
    ".gru.weight_ih": D(0, 1),  # wide: the 4 columns of the (18, 4) gates matrix
    ".gru.weight_hh": D(0, 1),
    ".gru.bias": None,
    ".gru.bias_n": None,
    ".lstm.weight_ih": D(0, 1),
    ".lstm.weight_hh": D(0, 1),
    ".lstm.bias": None,
    ".attn.query_proj.weight": D(1, 0),  # one group of heads * head_dim columns
    ".attn.key_proj.weight": D(1, 0),
    ".attn.value_proj.weight": D(1, 0),
    ".attn.output_proj.weight": D(1, 0),
    ".sn.layer.weight": D(1, 0),  # the raw weight
    ".sn.layer.bias": None,
    ".sn.uv_index.init[0]": None,
    ".sn.uv_index.init[1]": None,
    # Not arrays (no bias, dropout's options, flags): None places in eqx.filter's tree.
    **dict.fromkeys((".attn.query_proj.bias", ".attn.key_proj.bias", ".attn.value_proj.bias")),
    **dict.fromkeys((".attn.output_proj.bias", ".attn.dropout.p", ".attn.dropout.inference")),
    ".sn.inference": None,
}


def test_equinox_rnn_cells_attention_spectral_norm() -> None:
    model = eqx.filter_jit(EqxRnnAttention)(KEY)
    dims = jop.dimension_numbers_for(model)
    assert layouts(dims) == EQX_EXPECTED
    reasons = layouts(skip_reasons(model))
    assert reasons[".sn.uv_index.init[0]"] == (
        "StateIndex parameter: layer state (eqx.nn.State), not a parameter"
    )
    assert reasons[".gru.bias_n"] == "GRUCell bias_n: not a weight matrix of its type"
    recipe_step(eqx.filter(model, eqx.is_array), dims)


def test_equinox_abstract_model() -> None:
    """From eqx.filter_eval_shape: ShapeDtypeStruct leaves get the same layouts."""
    abstract = eqx.filter_eval_shape(EqxRnnAttention, KEY)
    dims = jop.dimension_numbers_for(abstract)
    assert layouts(dims) == EQX_EXPECTED


# --------------------------------------------------------------------------- warnings


class Heads(nn.Module):
    """A head used only with train=True, an encoder reached only by method=, a raw
    self.param."""

    def setup(self) -> None:
        self.body = nn.Dense(4)
        self.aux = nn.Dense(2)
        self.encoder = nn.Dense(3)
        self.w = self.param("w", nn.initializers.normal(), (4, 4))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = self.body(x) @ self.w
        return self.aux(h) if train else h

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)


def test_unowned_params_warn_and_say_why() -> None:
    model, x = Heads(), jnp.ones((1, 8))
    variables = jax.jit(
        lambda x: {
            "params": {
                **model.init(KEY, x, train=True)["params"],
                **model.init(KEY, x, method=Heads.encode)["params"],
            }
        }
    )(x)
    params = variables["params"]
    unreached = r"no module owning it ran in the traced call"
    with pytest.warns(UserWarning, match=r"5 parameter\(s\) of the Heads model") as record:
        dims = jop.dimension_numbers_for(model, params, x)
    message = str(record[0].message)
    for path in ("['aux']['kernel']", "['encoder']['kernel']", "['encoder']['bias']"):
        assert re.search(re.escape(path) + r" \(" + unreached, message), path
    assert "['w'] (unknown module type Heads)" in message
    assert layouts(dims) == {
        "['aux']['bias']": None,
        "['aux']['kernel']": None,
        "['body']['bias']": None,
        "['body']['kernel']": D(0, -1),
        "['encoder']['bias']": None,
        "['encoder']['kernel']": None,
        "['w']": None,
    }
    reasons = layouts(skip_reasons(model, params, x))
    assert reasons["['body']['kernel']"] is None
    assert reasons["['body']['bias']"] == "Dense bias: not a weight matrix of its type"
    assert reasons["['w']"] == "unknown module type Heads"
    # What reaches them gives them layouts.
    with pytest.warns(UserWarning, match=r"\['encoder'\]\['kernel'\]"):
        train = jop.dimension_numbers_for(model, params, x, train=True)
    assert train["aux"]["kernel"] == D(0, -1)
    with pytest.warns(UserWarning, match=r"\['aux'\]\['kernel'\]"):
        encode = jop.dimension_numbers_for(model, params, x, method=Heads.encode)
    assert encode["encoder"]["kernel"] == D(0, -1)


def test_a_model_that_selects_nothing_warns() -> None:
    class Tokens(nn.Module):
        @nn.compact
        def __call__(self, t: jax.Array) -> jax.Array:
            return nn.LayerNorm()(nn.Embed(10, 4)(t))

    t = jnp.zeros((1, 3), jnp.int32)
    params = jax.jit(Tokens().init)(KEY, t)["params"]
    with pytest.warns(UserWarning, match="no parameter of the Tokens model gets a layout"):
        dims = jop.dimension_numbers_for(Tokens(), params, t)
    assert all(d is None for d in layouts(dims).values())
    assert layouts(skip_reasons(Tokens(), params, t))["['Embed_0']['embedding']"] == (
        "Embed embedding: an embedding table: its rows are tokens, not weight vectors"
    )


def test_missing_deterministic_says_what_to_pass() -> None:
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
            return nn.Dropout(0.5)(nn.Dense(3)(x), deterministic=deterministic)

    x = jnp.ones((1, 4))
    params = jax.jit(lambda x: Drop().init(KEY, x, deterministic=True))(x)["params"]
    with pytest.raises(TypeError, match=r"\"deterministic\".*deterministic=True") as info:
        jop.dimension_numbers_for(Drop(), params, x)
    assert isinstance(info.value.__cause__, ValueError)
    dims = jop.dimension_numbers_for(Drop(), params, x, deterministic=True)
    assert layouts(dims) == {"['Dense_0']['bias']": None, "['Dense_0']['kernel']": D(0, -1)}


# --------------------------------------------------------------------------- conv="operator"


@pytest.mark.skipif(not hasattr(jop, "ConvDims"), reason="jop.ConvDims (0.4) not in this tree yet")
def test_conv_operator_layouts() -> None:
    """conv="operator": every Conv kernel gets a ConvDims with the module's own stride,
    dilation and groups; a ConvTranspose keeps its kernel layout, with a warning."""
    conv_dims = jop.ConvDims  # type: ignore[attr-defined,unused-ignore]

    class Convs(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            y = nn.Conv(4, (3, 3), strides=2, kernel_dilation=(1, 2), name="c")(x)
            y = nn.Conv(4, (3,), feature_group_count=2, name="g")(y[:, 0])
            return nn.ConvTranspose(2, (2, 2), name="t")(x) + y.sum()

    x = jnp.ones((1, 8, 8, 2))
    params = jax.jit(Convs().init)(KEY, x)["params"]
    with pytest.warns(
        UserWarning,
        match=r"keep their kernel layout: \['t'\]\['kernel'\] \(ConvTranspose: operator",
    ):
        dims = jop.dimension_numbers_for(Convs(), params, x, conv="operator")
    assert layouts(dims) == {
        "['c']['bias']": None,
        "['c']['kernel']": conv_dims(kernel_layout="HWIO", stride=2, dilation=(1, 2)),
        "['g']['bias']": None,
        "['g']['kernel']": conv_dims(
            kernel_layout="WIO", stride=1, dilation=1, feature_group_count=2
        ),
        "['t']['bias']": None,
        "['t']['kernel']": D((0, 1, 2), -1),
    }
    recipe_step(params, dims)  # the operator penalty on c and g, the kernel one on t

    class Nnx(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.c = nnx.Conv(2, 4, (3, 3), strides=(2, 1), rngs=rngs)

    nnx_dims = jop.dimension_numbers_for(Nnx(nnx.Rngs(0)), conv="operator")
    assert nnx_dims["c"]["kernel"] == conv_dims(kernel_layout="HWIO", stride=(2, 1), dilation=1)
    eqx_conv = eqx.nn.Conv3d(4, 6, 2, stride=2, dilation=1, groups=2, key=KEY)
    eqx_dims = jop.dimension_numbers_for(eqx_conv, conv="operator")
    assert eqx_dims.weight == conv_dims(
        kernel_layout="OIDHW", stride=(2, 2, 2), dilation=(1, 1, 1), feature_group_count=2
    )
    with pytest.warns(UserWarning, match="no parameter of the Conv3d model gets a layout"):
        assert jop.dimension_numbers_for(eqx_conv).weight is None  # grouped: no kernel layout
    # Stacked by eqx.filter_vmap (a leading axis): stacked operators.
    stack = eqx.filter_vmap(lambda k: eqx.nn.Conv1d(2, 3, 3, key=k))(jax.random.split(KEY, 4))
    stacked = jop.dimension_numbers_for(stack, conv="operator")
    assert stacked.weight == conv_dims(kernel_layout="OIW", stride=(1,), dilation=(1,))
    with pytest.raises(ValueError, match=r"`conv` must be \"kernel\" or \"operator\", got 'op'"):
        jop.dimension_numbers_for(eqx_conv, conv="op")  # type: ignore[arg-type]
