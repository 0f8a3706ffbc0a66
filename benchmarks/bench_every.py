"""Lazy regularisation (``every=k``): what it does to training, and what it saves.

A 64-64-64-10 tanh MLP on scikit-learn's digits (80% train, 20% test), minibatches of
64, Adam, with orthonormal columns asked of both hidden kernels (the head is not
penalised), trained with the penalty in two placements,

* ``coupled``: ``optax.chain(jop.add_orthogonality_penalty(beta, every=k), optax.adam(lr))``
  (L2-style: Adam normalises the penalty's gradient with the task's);
* ``decoupled``: ``optax.chain(optax.scale_by_adam(),
  jop.add_orthogonality_penalty(beta, every=k), optax.scale_by_learning_rate(lr))``
  (AdamW-style: the pull is applied as it is);

at k = 1, 4 and 16, and ``adam`` alone for reference. For every configuration and
seed it reports the final test loss (cross-entropy) and accuracy, and the
orthogonality error of the two kernels, :math:`\\sum \\|W^\\top W - I\\|_F`
(``jop.orthogonality_error``) at the end; the tables give medians over the seeds.

The cost: the whole training run (all steps, one ``jax.jit`` of a ``lax.scan``)
timed for every configuration, interleaved, medians, as seconds per step and as a
ratio to adam alone.

Run from the repository root::

    .venv/bin/python benchmarks/bench_every.py --markdown --json benchmarks/results/every_cpu.json
    .venv/bin/python benchmarks/bench_every.py --quick    # a smoke run, seconds

``--quick`` (tests/test_bench_train.py runs it): 64 steps, one seed, one timed run,
compiled with XLA's cheapest options (``QUICK_COMPILER_OPTIONS``); its numbers mean nothing.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax_orthopenalty as jop
from benchmarks import _harness

EVERY = (1, 4, 16)
LEARNING_RATE = 1e-3
BETA = {"coupled": 1e-2, "decoupled": 1.0}
BATCH = 64
HIDDEN = 64
CONFIGS = ("adam", *(f"{p} every={k}" for p in ("coupled", "decoupled") for k in EVERY))
# --quick only: the smoke run's time is nearly all XLA:CPU compiles.
QUICK_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
DIMS = {
    "w1": jop.OrthoDims(),
    "w2": jop.OrthoDims(),
    "w3": None,
    "b1": None,
    "b2": None,
    "b3": None,
}


def init(seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    sizes = [(64, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 10)]
    params: dict[str, jax.Array] = {}
    for i, (a, b) in enumerate(sizes, start=1):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
        params[f"b{i}"] = jnp.zeros(b, jnp.float32)
    return params


def forward(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"] + params["b2"])
    return h @ params["w3"] + params["b3"]


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def optimizer(name: str) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(LEARNING_RATE)
    placement, every = name.split(" every=")
    penalty = jop.add_orthogonality_penalty(
        BETA[placement], dimension_numbers=DIMS, every=int(every)
    )
    if placement == "coupled":
        return optax.chain(penalty, optax.adam(LEARNING_RATE))
    return optax.chain(optax.scale_by_adam(), penalty, optax.scale_by_learning_rate(LEARNING_RATE))


def trainer(
    name: str, steps: int, data: tuple[np.ndarray, ...], options: dict[str, Any] | None = None
) -> Any:
    """A jitted ``(params, key) -> (params, losses)``: ``steps`` minibatch steps in one scan.

    ``options``: XLA's compiler options (``--quick``).
    """
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    tx = optimizer(name)

    def run(params: Any, key: jax.Array) -> tuple[Any, jax.Array]:
        def step(carry: Any, k: jax.Array) -> tuple[Any, jax.Array]:
            p, s = carry
            idx = jax.random.randint(k, (BATCH,), 0, x.shape[0])
            value, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), value

        (params, _), losses = jax.lax.scan(
            step, (params, tx.init(params)), jax.random.split(key, steps)
        )
        return params, losses

    return jax.jit(run, compiler_options=options)


def orthogonality(params: dict[str, jax.Array]) -> float:
    return float(sum(jop.orthogonality_error(params[k]) for k in ("w1", "w2")))


def run(steps: int, seeds: int, reps: int, quick: bool = False) -> dict[str, Any]:
    data = _harness.digits()
    xt, yt = jnp.asarray(data[2]), jnp.asarray(data[3])
    options = QUICK_COMPILER_OPTIONS if quick else None
    runs = {name: trainer(name, steps, data, options) for name in CONFIGS}
    per_seed: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for seed in range(seeds):
        start = init(seed)
        for name in CONFIGS:
            params, losses = runs[name](start, jax.random.key(seed))
            logits = forward(params, xt)
            per_seed[name].append(
                {
                    "train_loss_last_100": float(jnp.mean(losses[-100:])),
                    "test_loss": float(
                        optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean()
                    ),
                    "test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == yt)),
                    "orthogonality_error": orthogonality(params),
                }
            )
    # The cost: the same runs (compiled and run above: no warm-up) timed, interleaved.
    start, key = init(0), jax.random.key(0)
    medians = _harness.interleaved_medians(
        {name: lambda name=name: runs[name](start, key) for name in CONFIGS}, reps=reps, warmup=0
    )
    seconds = {name: t / steps for name, t in medians.items()}
    results = {}
    for name in CONFIGS:
        metrics = {
            key: statistics.median(m[key] for m in per_seed[name]) for key in per_seed[name][0]
        }
        results[name] = {
            **metrics,
            "seconds_per_step": seconds[name],
            "cost_over_adam": seconds[name] / seconds["adam"],
            "seeds": per_seed[name],
        }
    return results


def markdown(results: dict[str, Any]) -> str:
    header = [
        "configuration",
        "test loss",
        "test accuracy",
        "orthogonality error",
        "µs / step",
        "step / adam",
        "penalty's overhead / its overhead at every=1",
    ]
    rows = []
    for name in CONFIGS:
        r = results[name]
        extra = ""
        if name != "adam":
            first = results[name.split(" every=")[0] + " every=1"]["cost_over_adam"] - 1
            extra = f"{(r['cost_over_adam'] - 1) / first:.2f}" if first > 0 else ""
        rows.append(
            [
                name,
                f"{r['test_loss']:.4f}",
                f"{r['test_accuracy']:.4f}",
                f"{r['orthogonality_error']:.4f}",
                f"{r['seconds_per_step'] * 1e6:.1f}",
                f"{r['cost_over_adam']:.2f}",
                extra,
            ]
        )
    return _harness.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = _harness.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (3000)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (3)")
    args = parser.parse_args(argv)
    steps = args.steps or (64 if args.quick else 3000)
    seeds = args.seeds or (1 if args.quick else 3)
    reps = args.reps or (1 if args.quick else 5)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load = list(os.getloadavg())
    results = run(steps, seeds, reps, args.quick)
    print(f"{steps} steps, {seeds} seeds, batch {BATCH}, lr {LEARNING_RATE}, beta {BETA}")
    for name in CONFIGS:
        r = results[name]
        print(
            f"{name:<20} test loss {r['test_loss']:.4f}  accuracy {r['test_accuracy']:.4f}  "
            f"orthogonality error {r['orthogonality_error']:.4f}  "
            f"{r['seconds_per_step'] * 1e6:8.1f} us/step  {r['cost_over_adam']:.2f}x adam"
        )
    if args.markdown:
        print(markdown(results))
    report = {
        "machine": {
            "optax": optax.__version__,
            "date_utc": started,
            "loadavg_at_start": load,
        },
        "quick": args.quick,
        "settings": {
            "steps": steps,
            "seeds": seeds,
            "reps": reps,
            "batch": BATCH,
            "hidden": HIDDEN,
            "learning_rate": LEARNING_RATE,
            "beta": BETA,
        },
        "results": results,
    }
    _harness.write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
