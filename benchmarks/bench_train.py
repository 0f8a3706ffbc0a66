"""What the transforms cost in real training steps: ratios measured in one run.

Three flax nnx models on synthetic data, each trained by jitted steps (the whole step:
forward, backward, optimizer update and apply, parameters and optimizer state donated),

* ``mlp``: an MLP 784-512-512-10 (ReLU), batch 256;
* ``cnn``: three 3x3 convolutions (16, 32, 64 channels, each followed by ReLU and 2x2
  average pooling) and a dense head 1024-128-10, on 32x32x3 images, batch 64;
* ``transformer``: an embedding (vocabulary 512, d_model 128), 4 pre-norm transformer
  blocks (4 heads, MLP 512) stacked with ``nnx.vmap`` and run under ``nnx.scan`` with
  ``nnx.remat``, and a logits head, on sequences of 64 tokens, batch 16, causal,
  next-token cross-entropy;

with seven optimizers,

* ``adam``: ``optax.adam(1e-3)``, the base of the penalty rows;
* ``penalty every=k``, k = 1, 4, 16:
  ``optax.chain(jop.add_orthogonality_penalty(1e-3, dimension_numbers=dims, every=k),
  optax.adam(1e-3))``;
* ``sgd``: ``optax.sgd(1e-3)``, the base of the two rows below;
* ``landing``: ``optax.chain(jop.landing(1.0, dimension_numbers=dims), optax.sgd(1e-3))``;
* ``projection``: ``optax.chain(optax.sgd(1e-3),
  jop.project_orthonormal(dimension_numbers=dims))``;

where ``dims`` is the layout of every parameter (``jop.dimension_numbers_for``: conv
kernels per output channel, stacked layers as groups, attention heads as groups, wide
kernels by their rows, embeddings, biases and norms skipped).

Timing: every configuration keeps its own parameters and optimizer state; one sample
is a block of 16 consecutive steps (so that ``every=16`` pays its one penalty step in
every block, and ``every=4`` four), timed to ``block_until_ready``, divided by 16. The
configurations are interleaved (``_harness.interleaved_samples``): every repetition
times one block of each, in an order that reverses on every other repetition, and the
tables report medians.

Also measured, per model:

* the flop floor of the penalty's overhead: the flops of the penalty's update alone
  (``add_orthogonality_penalty(every=1).update`` jitted by itself) over the flops of
  the base (adam) training step, both from XLA's ``compiled.cost_analysis()``. XLA
  counts a while loop's body once, so the transformer's step is counted on the same
  model with the scan unrolled (``unroll=True``); its timed step keeps the scan;
* compile time: ``jax.jit(step).lower(...)`` (trace and lower) and ``.compile()``,
  each configuration compiled afresh (a new step function) ``--compile-reps`` times,
  interleaved, medians;
* memory: XLA's compiled ``memory_analysis()`` of each step: the arguments (parameters,
  optimizer state, batch) and the temporaries. These are the executable's own buffers,
  not a measured peak of the process.

Run from the repository root::

    .venv/bin/python benchmarks/bench_train.py --markdown --json benchmarks/results/train_cpu.json
    .venv/bin/python benchmarks/bench_train.py --quick     # tiny sizes, seconds

``--quick`` is a smoke run (tests/test_bench_train.py runs it): tiny models whose
parameters are drawn with NumPy on an abstract model (``nnx.eval_shape``; the
initialisers' eager ops would compile once per shape, which costs more than the run),
2 repetitions, 1 compile each, XLA's cheapest compiles (``QUICK_COMPILER_OPTIONS``).
Its numbers mean nothing.

``--only mlp,cnn`` picks models, ``--reps`` sets the repetitions.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# Benchmark the checkout this script lives in, not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

import jax_orthopenalty as jop
from benchmarks import _harness

BETA = 1e-3
LEARNING_RATE = 1e-3
LAM = 1.0
EVERY = (1, 4, 16)
BLOCK = 16  # steps per timed sample: a whole cycle of every=16
CONFIGS = (
    "adam",
    *(f"penalty every={k}" for k in EVERY),
    "sgd",
    "landing",
    "projection",
)
# --quick only: the smoke run's time is nearly all XLA:CPU compiles.
QUICK_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,  # a third of the compile time of the transformer
}
BASE = {
    name: "adam" if name == "adam" or name.startswith("penalty") else "sgd" for name in CONFIGS
}


# --------------------------------------------------------------------------- models


class MLP(nnx.Module):
    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


class CNN(nnx.Module):
    def __init__(
        self, channels: tuple[int, ...], hidden: int, image: int, *, rngs: nnx.Rngs
    ) -> None:
        sizes = (3, *channels)
        self.convs = nnx.List(
            [nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )
        side = image // 2 ** len(channels)
        self.hidden = nnx.Linear(channels[-1] * side * side, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = nnx.avg_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.head(nnx.relu(self.hidden(x)))


class Block(nnx.Module):
    """A pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs) -> None:
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=d, decode=False, keep_rngs=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        x = x + self.attention(self.norm1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
    def __init__(
        self, vocab: int, d: int, heads: int, layers: int, *, unroll: bool, rngs: nnx.Rngs
    ) -> None:
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stack(rngs: nnx.Rngs) -> Block:
            return Block(d, heads, rngs=rngs)

        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = stack(rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)
        self.unroll = unroll

    def __call__(self, tokens: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.unroll)
        @nnx.remat
        def run(x: jax.Array, block: Block) -> jax.Array:
            return block(x)

        return self.head(self.norm(run(self.embed(tokens), self.blocks)))


class Problem(NamedTuple):
    """A model, its batch and its loss; ``flops_model`` is the same model for counting."""

    description: str
    model: nnx.Module
    flops_model: nnx.Module
    batch: tuple[jax.Array, jax.Array]
    loss: Callable[[Any, tuple[jax.Array, jax.Array]], jax.Array]


def _classification(model: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _next_token(model: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    tokens, targets = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), targets).mean()


def _numpy_model(make: Callable[[], nnx.Module]) -> nnx.Module:
    """``make()`` with its parameters drawn by NumPy: kernels and embeddings N(0, 0.1^2),
    norm scales 1, biases 0 (``--quick``: no initialiser compiles)."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model has state other than parameters")
    rng = np.random.default_rng(0)

    def draw(path: tuple[Any, ...], x: jax.ShapeDtypeStruct) -> jax.Array:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = keys[-2] if keys[-1] == "value" else keys[-1]
        if name in ("kernel", "embedding"):
            return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
        return jnp.asarray(np.ones(x.shape) if name == "scale" else np.zeros(x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, params), rest)


def problem(name: str, quick: bool) -> Problem:
    """The model ``name`` with its synthetic batch; tiny sizes under ``quick``."""
    rng = np.random.default_rng(0)

    def build(make: Callable[[], nnx.Module]) -> Any:
        return _numpy_model(make) if quick else make()

    if name == "mlp":
        sizes, batch = ((64, 32, 32, 10), 64) if quick else ((784, 512, 512, 10), 256)
        model = build(lambda: MLP(sizes, rngs=nnx.Rngs(0)))
        x = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
        y = rng.integers(0, 10, batch, dtype=np.int32)
        desc = f"MLP {'-'.join(map(str, sizes))}, batch {batch}"
        return Problem(desc, model, model, (jnp.asarray(x), jnp.asarray(y)), _classification)
    if name == "cnn":
        channels, hidden, image, batch = (
            ((4, 8, 8), 16, 8, 4) if quick else ((16, 32, 64), 128, 32, 64)
        )
        model = build(lambda: CNN(channels, hidden, image, rngs=nnx.Rngs(0)))
        x = rng.standard_normal((batch, image, image, 3), dtype=np.float32)
        y = rng.integers(0, 10, batch, dtype=np.int32)
        desc = (
            f"CNN conv 3x3 {'-'.join(map(str, channels))} + dense "
            f"{channels[-1] * (image // 8) ** 2}-{hidden}-10, {image}x{image}x3, batch {batch}"
        )
        return Problem(desc, model, model, (jnp.asarray(x), jnp.asarray(y)), _classification)
    if name == "transformer":
        vocab, d, heads, layers, seq, batch = (
            (64, 32, 2, 2, 16, 2) if quick else (512, 128, 4, 4, 64, 16)
        )

        def transformer(unroll: bool) -> Any:
            return build(
                lambda: Transformer(vocab, d, heads, layers, unroll=unroll, rngs=nnx.Rngs(0))
            )

        tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
        desc = (
            f"transformer: {layers} blocks under nnx.scan + nnx.remat, d_model {d}, "
            f"{heads} heads, vocabulary {vocab}, sequence {seq}, batch {batch}"
        )
        data = (jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]))
        return Problem(desc, transformer(False), transformer(True), data, _next_token)
    raise ValueError(f"unknown model {name!r}")


MODELS = ("mlp", "cnn", "transformer")


# --------------------------------------------------------------------------- layouts


def _describe_layouts(params: Any, dims: Any) -> dict[str, str]:
    """Every parameter's shape and layout, for the JSON."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    layouts = jax.tree.leaves(dims, is_leaf=lambda x: x is None or isinstance(x, jop.OrthoDims))
    return {
        jax.tree_util.keystr(path): f"{tuple(x.shape)}: {d}"
        for (path, x), d in zip(leaves, layouts, strict=True)
    }


# --------------------------------------------------------------------------- optimizers


def optimizer(name: str, dims: Any) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(LEARNING_RATE)
    if name.startswith("penalty every="):
        every = int(name.split("=")[1])
        return optax.chain(
            jop.add_orthogonality_penalty(BETA, dimension_numbers=dims, every=every),
            optax.adam(LEARNING_RATE),
        )
    if name == "sgd":
        return optax.sgd(LEARNING_RATE)
    if name == "landing":
        return optax.chain(jop.landing(LAM, dimension_numbers=dims), optax.sgd(LEARNING_RATE))
    if name == "projection":
        return optax.chain(
            optax.sgd(LEARNING_RATE), jop.project_orthonormal(dimension_numbers=dims)
        )
    raise ValueError(f"unknown configuration {name!r}")


def make_step(model: nnx.Module, prob: Problem, tx: optax.GradientTransformation) -> Any:
    """A fresh training step ``(params, opt_state, batch) -> (params, opt_state, loss)``."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
        def loss(p: Any) -> jax.Array:
            return prob.loss(nnx.merge(graphdef, p, rest), batch)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def _flops(program: Any) -> float:
    """The flops of a lowered or compiled program, from XLA's cost analysis."""
    analysis = program.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }


# --------------------------------------------------------------------------- timing


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def compile_all(
    prob: Problem, dims: Any, params: Any, reps: int, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Compiles every configuration ``reps`` times, interleaved; the last executables.

    ``options`` are XLA's compiler options (``--quick`` lowers the backend's
    optimisation level: the smoke run checks the script, and compiles dominate it).
    """
    states = {name: optimizer(name, dims).init(params) for name in CONFIGS}
    samples: dict[str, dict[str, list[float]]] = {
        name: {"lower_s": [], "compile_s": []} for name in CONFIGS
    }
    executables: dict[str, Any] = {}
    if reps > 1:
        # One throwaway compile first: the first compile of a model pays for set-up
        # (nnx's graph caches, jax's caches of the small jitted helpers).
        warm = jax.jit(make_step(prob.model, prob, optax.sgd(LEARNING_RATE)))
        warm.lower(params, states["sgd"], prob.batch).compile(compiler_options=options)
    # Not _harness.interleaved_samples: one sample is two phases of a fresh compile
    # (lower, then compile), each timed, in the same alternating order.
    for r in range(reps):
        for name in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
            step = make_step(prob.model, prob, optimizer(name, dims))
            start = time.perf_counter()
            lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, states[name], prob.batch)
            lowered_at = time.perf_counter()
            executables[name] = lowered.compile(compiler_options=options)
            done = time.perf_counter()
            samples[name]["lower_s"].append(lowered_at - start)
            samples[name]["compile_s"].append(done - lowered_at)
    report = {}
    for name, s in samples.items():
        total = [a + b for a, b in zip(s["lower_s"], s["compile_s"], strict=True)]
        report[name] = {
            "lower_s": statistics.median(s["lower_s"]),
            "compile_s": statistics.median(s["compile_s"]),
            "total_s": statistics.median(total),
            "reps": reps,
            "memory": _memory(executables[name]),
            "flops": _flops(executables[name]),
        }
    return executables, report


def time_steps(
    executables: dict[str, Any], prob: Problem, dims: Any, params: Any, reps: int
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Median seconds per step of every configuration, in interleaved blocks of 16 steps
    (one untimed block each first)."""
    carry = {name: (_copy(params), optimizer(name, dims).init(params)) for name in executables}
    losses: dict[str, jax.Array] = {}

    def block(name: str) -> Any:
        run = executables[name]
        p, s = carry[name]
        for _ in range(BLOCK):
            p, s, loss = run(p, s, prob.batch)
        carry[name], losses[name] = (p, s), loss
        return p, s, loss

    samples = _harness.interleaved_samples(
        {name: lambda name=name: block(name) for name in executables}, reps=reps, warmup=1
    )
    times = {
        name: {
            "median_s": statistics.median(s) / BLOCK,
            "min_s": min(s) / BLOCK,
            "max_s": max(s) / BLOCK,
            "reps": len(s),
            "steps_per_sample": BLOCK,
        }
        for name, s in samples.items()
    }
    return times, {name: float(loss) for name, loss in losses.items()}


def flop_floor(prob: Problem, dims: Any, params: Any) -> dict[str, float]:
    """The flops of the penalty's (and landing's) update alone and of the base steps.

    From XLA's cost analysis of the lowered programs (before optimisation: no compile
    needed; within 2% of the compiled programs' counts on these models, which the JSON
    records for the models without a scan).
    """
    zeros = jax.tree.map(jnp.zeros_like, params)
    out: dict[str, float] = {}
    for name, tx in (
        ("penalty", jop.add_orthogonality_penalty(BETA, dimension_numbers=dims)),
        ("landing", jop.landing(LAM, dimension_numbers=dims)),
    ):
        update = jax.jit(lambda u, s, p, tx=tx: tx.update(u, s, p)[0])
        out[f"{name}_update_flops"] = _flops(update.lower(zeros, tx.init(params), params))
    flops_params = nnx.state(prob.flops_model, nnx.Param)
    for name in ("adam", "sgd"):
        tx = optimizer(name, dims)
        step = jax.jit(make_step(prob.flops_model, prob, tx))
        out[f"{name}_step_flops"] = _flops(
            step.lower(flops_params, tx.init(flops_params), prob.batch)
        )
    out["penalty_floor"] = out["penalty_update_flops"] / out["adam_step_flops"]
    out["landing_floor"] = out["landing_update_flops"] / out["sgd_step_flops"]
    return out


def run_model(name: str, quick: bool, reps: int, compile_reps: int) -> dict[str, Any]:
    prob = problem(name, quick)
    params = nnx.state(prob.model, nnx.Param)
    dims = jop.dimension_numbers_for(prob.model)
    options = QUICK_COMPILER_OPTIONS if quick else {}
    executables, compiled = compile_all(prob, dims, params, compile_reps, options)
    times, last_loss = time_steps(executables, prob, dims, params, reps)
    flops = flop_floor(prob, dims, params)

    t = {k: v["median_s"] for k, v in times.items()}
    ratios = {f"{k}/{BASE[k]}": t[k] / t[BASE[k]] for k in CONFIGS if k not in ("adam", "sgd")}
    overhead = {k: (t[f"penalty every={k}"] - t["adam"]) / t["adam"] for k in EVERY}
    compile_ratios = {
        f"{k}/{BASE[k]}": compiled[k]["total_s"] / compiled[BASE[k]]["total_s"]
        for k in CONFIGS
        if k not in ("adam", "sgd")
    }
    floor = flops["penalty_floor"]
    targets = {
        "overhead every=1 / flop floor": {
            "value": overhead[1] / floor,
            "bound": 1.3,
            "met": overhead[1] <= 1.3 * floor,
        },
        **{
            f"overhead every={k}": {
                "value": overhead[k],
                "bound": overhead[1] / k + 0.05,
                "met": overhead[k] <= overhead[1] / k + 0.05,
            }
            for k in EVERY[1:]
        },
        **{
            f"compile penalty every={k} / adam": {
                "value": compile_ratios[f"penalty every={k}/adam"],
                "bound": 2.0,
                "met": compile_ratios[f"penalty every={k}/adam"] <= 2.0,
            }
            for k in EVERY
        },
    }
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    return {
        "model": name,
        "description": prob.description,
        "parameters": n_params,
        "parameter_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(params)),
        "layouts": _describe_layouts(params, dims),
        "times": times,
        "ratios": ratios,
        "penalty_overhead": {f"every={k}": v for k, v in overhead.items()},
        "flops": flops,
        "compile": compiled,
        "compile_ratios": compile_ratios,
        "targets": targets,
        "final_loss": last_loss,
    }


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    import flax

    return {**_harness.machine(), "flax": flax.__version__, "optax": optax.__version__}


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """The plain-text summary printed on every run."""
    lines = []
    for r in results:
        t, q = r["times"], r["ratios"]
        lines.append(f"{r['model']}: {r['description']} ({r['parameters']:,} parameters)")
        for name in CONFIGS:
            base = BASE[name]
            ratio = "" if name == base else f"  {q[f'{name}/{base}']:.2f}x {base}"
            comp = r["compile"][name]
            lines.append(
                f"  {name:<18} {_ms(t[name]['median_s']):>9} ms/step{ratio:<16} "
                f"compile {comp['total_s']:6.2f} s  temp {_mib(comp['memory']['temp_bytes'])} MiB"
            )
        f = r["flops"]
        lines.append(
            f"  flop floor of the penalty's overhead {f['penalty_floor']:.3f} "
            f"(penalty {f['penalty_update_flops'] / 1e6:.1f} MFLOP, "
            f"step {f['adam_step_flops'] / 1e6:.1f} MFLOP); measured overhead "
            + ", ".join(f"{k} {v:.3f}" for k, v in r["penalty_overhead"].items())
        )
        for target, v in r["targets"].items():
            verdict = "met" if v["met"] else "NOT met"
            lines.append(f"  target {target}: {v['value']:.3f} (bound {v['bound']:.3f}) {verdict}")
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]]) -> str:
    """The tables of docs/performance.md's "Training steps" section."""
    steps, flops, compiles, memory, targets = [], [], [], [], []
    for r in results:
        t, q, f, o, c = r["times"], r["ratios"], r["flops"], r["penalty_overhead"], r["compile"]
        steps.append(
            [
                r["model"],
                _ms(t["adam"]["median_s"]),
                *(f"{q[f'penalty every={k}/adam']:.2f}" for k in EVERY),
                _ms(t["sgd"]["median_s"]),
                f"{q['landing/sgd']:.2f}",
                f"{q['projection/sgd']:.2f}",
            ]
        )
        flops.append(
            [
                r["model"],
                f"{f['penalty_update_flops'] / 1e6:.1f}",
                f"{f['adam_step_flops'] / 1e6:.1f}",
                f"{f['penalty_floor']:.3f}",
                f"{o['every=1']:.3f}",
                f"{o['every=1'] / f['penalty_floor']:.2f}",
                *(f"{o[f'every={k}']:.3f} ({o['every=1'] / k + 0.05:.3f})" for k in EVERY[1:]),
                f"{f['landing_floor']:.3f}",
            ]
        )
        cq = r["compile_ratios"]
        compiles.append(
            [
                r["model"],
                f"{c['adam']['total_s']:.2f}",
                *(f"{cq[f'penalty every={k}/adam']:.2f}" for k in EVERY),
                f"{c['sgd']['total_s']:.2f}",
                f"{cq['landing/sgd']:.2f}",
                f"{cq['projection/sgd']:.2f}",
            ]
        )
        memory.append(
            [
                r["model"],
                _mib(r["parameter_bytes"]),
                *(_mib(c[name]["memory"]["temp_bytes"]) for name in CONFIGS),
                _mib(c["adam"]["memory"]["argument_bytes"]),
                _mib(c["sgd"]["memory"]["argument_bytes"]),
            ]
        )
        for target, v in r["targets"].items():
            targets.append(
                [
                    r["model"],
                    target,
                    f"{v['value']:.3f}",
                    f"{v['bound']:.3f}",
                    "yes" if v["met"] else "no",
                ]
            )
    per_every = [f"every={k} / adam" for k in EVERY[1:]]
    tables = [
        (
            [
                "model",
                "adam ms",
                "penalty every=1 / adam",
                *per_every,
                "sgd ms",
                "landing / sgd",
                "projection / sgd",
            ],
            steps,
        ),
        (
            [
                "model",
                "penalty MFLOP",
                "step MFLOP",
                "flop floor",
                "overhead every=1",
                "overhead / floor",
                *(f"every={k} (bound)" for k in EVERY[1:]),
                "landing flop floor",
            ],
            flops,
        ),
        (
            [
                "model",
                "adam compile s",
                "penalty every=1 / adam",
                *per_every,
                "sgd compile s",
                "landing / sgd",
                "projection / sgd",
            ],
            compiles,
        ),
        (
            [
                "model",
                "parameters MiB",
                *(f"{name} temp" for name in CONFIGS),
                "adam arguments",
                "sgd arguments",
            ],
            memory,
        ),
        (["model", "target", "value", "bound", "met"], targets),
    ]
    return "\n\n".join(_harness.markdown_table(h, rows) for h, rows in tables)


def main(argv: list[str] | None = None) -> int:
    parser = _harness.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--compile-reps", type=int, default=None, help="compiles per config")
    parser.add_argument("--only", default="", help="comma-separated models, e.g. mlp,cnn")
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (2 if args.quick else 9)
    compile_reps = args.compile_reps if args.compile_reps is not None else (1 if args.quick else 3)
    models = args.only.split(",") if args.only else list(MODELS)

    info = machine()
    info["date_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    info["loadavg_at_start"] = list(os.getloadavg())
    print(
        f"{info['cpu']}, {info['cores']} cores; jax {info['jax']} ({info['backend']}), "
        f"flax {info['flax']}, optax {info['optax']}; "
        f"load average {info['loadavg_at_start'][0]:.1f}"
    )
    results = []
    for name in models:
        results.append(run_model(name, args.quick, reps, compile_reps))
        print(f"done {name}", file=sys.stderr, flush=True)
    info["loadavg_at_end"] = list(os.getloadavg())
    print(table(results))
    if args.markdown:
        print(markdown(results))
    print(f"load average at the end: {info['loadavg_at_end'][0]:.1f}")
    report = {
        "machine": info,
        "quick": args.quick,
        "settings": {
            "beta": BETA,
            "learning_rate": LEARNING_RATE,
            "lam": LAM,
            "steps_per_sample": BLOCK,
            "reps": reps,
            "compile_reps": compile_reps,
        },
        "results": results,
    }
    _harness.write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
