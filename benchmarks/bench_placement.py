"""Where the penalty goes in an Adam chain, and how large β must be there.

A 64-64-64-10 tanh MLP on scikit-learn's bundled digits (80% train, 20% test, no
download), and an ensemble of 8 such MLPs (stacked parameters, ``jax.vmap`` over the
members, the loss the mean of the members' losses), trained with Adam for 300 steps
of minibatches of 64 at a learning rate of 1e-3, every kernel penalised (the head
included; biases are rank 1 and skipped):

* ``adam``: no penalty;
* ``coupled β``: ``optax.chain(jop.add_orthogonality_penalty(β), optax.adam(lr))``
  (the README's first chain: the same as adding the penalty to the loss);
* ``decoupled β``: ``optax.chain(optax.scale_by_adam(), jop.add_orthogonality_penalty(β),
  optax.scale_by_learning_rate(lr))`` (AdamW-style);
* ``norm="squared"`` in both placements;
* for the explanation: coupled with the penalty on the head only or on the hidden
  kernels only, coupled with ``subgradient=jop.deadzone``, a grid of β against the
  learning rate in both placements, the scale of each layer's task gradient against
  the penalty's (:func:`gradient_scales`), and the penalty alone on one kernel, with
  no task (:func:`penalty_alone`).

Reported: the test loss (cross-entropy) and accuracy at the end, and the
orthogonality error (``jop.orthogonality_error``, the largest entry of
:math:`|W^\\top W - I|`) of the head and of the hidden kernels (the larger of the two),
medians over the seeds (the ensemble: the mean over its members, one seed); the
errors along the way (steps 0, 30, 100, 300), and the head's RMS column norm.

All configurations with the same structure (placement, norm, subgradient, mask) and
model are trained in one ``jax.jit`` of a ``jax.vmap`` over (β, lr, seed), with β and
the learning rate traced: one compile per structure. The numbers are deterministic.

Run from the repository root::

    .venv/bin/python benchmarks/bench_placement.py --markdown \
        --json benchmarks/results/placement_cpu.json
    .venv/bin/python benchmarks/bench_placement.py --quick    # a smoke run: 30 steps, one seed
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax_orthopenalty as jop
from benchmarks import _harness, _machine
from benchmarks.bench_every import BATCH, HIDDEN, LEARNING_RATE, forward, init  # the same MLP

MEMBERS = 8
CHECKPOINTS = (0, 30, 100, 300)
KERNELS = ("w1", "w2", "w3")
DEADZONE = 0.05


class Config(NamedTuple):
    """One training run's optimizer: the structure (compiled once) and β, lr (traced)."""

    name: str
    placement: str  # "adam", "coupled" or "decoupled"
    beta: float = 0.0
    lr: float = LEARNING_RATE
    norm: str = "l1"
    deadzone: float = 0.0
    only: str = "all"  # "all", "head" or "hidden": which kernels are penalised

    @property
    def structure(self) -> tuple[str, str, float, str]:
        placement = "coupled" if self.placement == "adam" else self.placement
        return placement, self.norm, self.deadzone, self.only


MAIN = (
    Config("adam", "adam"),
    Config("coupled 1e-4", "coupled", 1e-4),
    Config("coupled 1e-3", "coupled", 1e-3),
    Config("coupled 1e-2", "coupled", 1e-2),
    Config("decoupled 1e-3", "decoupled", 1e-3),
    Config("decoupled 1e-1", "decoupled", 1e-1),
    Config("decoupled 1", "decoupled", 1.0),
)
WHY = (
    Config("coupled 1e-3, head only", "coupled", 1e-3, only="head"),
    Config("coupled 1e-3, hidden only", "coupled", 1e-3, only="hidden"),
    Config("coupled 1e-2, head only", "coupled", 1e-2, only="head"),
    Config(f"coupled 1e-3, deadzone({DEADZONE})", "coupled", 1e-3, deadzone=DEADZONE),
    Config(f"coupled 1e-2, deadzone({DEADZONE})", "coupled", 1e-2, deadzone=DEADZONE),
)
# Both models: the squared norm in both placements.
SQUARED = (
    Config("coupled 1e-3, squared", "coupled", 1e-3, norm="squared"),
    Config("coupled 1e-2, squared", "coupled", 1e-2, norm="squared"),
    Config("decoupled 1e-1, squared", "decoupled", 1e-1, norm="squared"),
    Config("decoupled 1, squared", "decoupled", 1.0, norm="squared"),
)
GRID_LR = (3e-4, 1e-3, 3e-3)
GRID = tuple(
    Config(f"{placement} {beta:g} lr {lr:g}", placement, beta, lr)
    for lr in GRID_LR
    for placement, betas in (
        ("adam", (0.0,)),
        ("coupled", (1e-3, 1e-2, 1e-1)),
        ("decoupled", (0.1, 1.0)),
    )
    for beta in betas
)


class Model(NamedTuple):
    """The single MLP or the ensemble: its initial parameters, forward and layouts."""

    name: str
    init: Any  # seed -> params
    logits: Any  # (params, x) -> logits, members first for the ensemble
    axes: tuple[int, int]  # (vector_axis, column_axis) of a kernel


MLP = Model("mlp", lambda s: init(s), forward, (0, 1))
ENSEMBLE = Model(
    "ensemble",
    lambda s: {k: np.stack([init(s * MEMBERS + m)[k] for m in range(MEMBERS)]) for k in init(0)},
    jax.vmap(forward, in_axes=(0, None)),
    (1, 2),
)


def task_loss(model: Model, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model.logits(params, x)  # the ensemble: the mean over its members
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(y, logits.shape[:-1])
    ).mean()


def errors(model: Model, params: Any) -> tuple[jax.Array, jax.Array]:
    """The head's and the hidden kernels' orthogonality error (ensemble: member mean)."""
    v, c = model.axes
    e = {k: jop.orthogonality_error(params[k], vector_axis=v, column_axis=c) for k in KERNELS}
    return jnp.mean(e["w3"]), jnp.mean(jnp.maximum(e["w1"], e["w2"]))


def optimizer(
    model: Model, structure: tuple, beta: jax.Array, lr: jax.Array
) -> optax.GradientTransformation:
    placement, norm, deadzone, only = structure
    v, c = model.axes
    chosen = {"all": KERNELS, "head": ("w3",), "hidden": ("w1", "w2")}[only]
    dims = {k: (jop.OrthoDims(v, c) if k in chosen else None) for k in init(0)}
    penalty = jop.add_orthogonality_penalty(
        beta,
        dimension_numbers=dims,
        norm=norm,
        subgradient=jop.deadzone(deadzone) if deadzone else "zero",
    )
    if placement == "coupled":
        return optax.chain(penalty, optax.adam(lr))
    return optax.chain(optax.scale_by_adam(), penalty, optax.scale_by_learning_rate(lr))


def trainer(model: Model, structure: tuple, steps: int, data: tuple[np.ndarray, ...]) -> Any:
    """A jitted ``(params, beta, lr, seed) -> metrics``, vmapped over all four."""
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    xt, yt = jnp.asarray(data[2]), jnp.asarray(data[3])
    marks = jnp.asarray([c - 1 for c in CHECKPOINTS if 0 < c <= steps], jnp.int32)

    def one(params: Any, beta: jax.Array, lr: jax.Array, seed: jax.Array) -> dict[str, jax.Array]:
        tx = optimizer(model, structure, beta, lr)

        def step(carry: Any, k: jax.Array) -> tuple[Any, Any]:
            p, s = carry
            idx = jax.random.randint(k, (BATCH,), 0, x.shape[0])
            grads = jax.grad(lambda q: task_loss(model, q, x[idx], y[idx]))(p)
            updates, s = tx.update(grads, s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), errors(model, p)

        (params_end, _), (head, hidden) = jax.lax.scan(
            step, (params, tx.init(params)), jax.random.split(jax.random.key(seed), steps)
        )
        logits = model.logits(params_end, xt)
        head0, hidden0 = errors(model, params)
        return {
            "test_loss": task_loss(model, params_end, xt, yt),
            "test_accuracy": jnp.mean(jnp.argmax(logits, -1) == yt),
            "head_error": head[-1],
            "hidden_error": hidden[-1],
            # The head's RMS column norm: how much the task scales the head up.
            "head_norm": jnp.sqrt(jnp.mean(jnp.sum(jnp.square(params_end["w3"]), axis=-2))),
            "head_error_trace": jnp.concatenate([head0[None], head[marks]]),
            "hidden_error_trace": jnp.concatenate([hidden0[None], hidden[marks]]),
            # The chatter: the largest step-to-step change of the hidden error, last 50 steps.
            "hidden_error_jitter": jnp.max(jnp.abs(jnp.diff(hidden[-50:]))),
        }

    return jax.jit(jax.vmap(one))


def train(model: Model, configs: tuple[Config, ...], steps: int, seeds: int) -> dict[str, Any]:
    """Every config's median metrics over the seeds, one compile per structure."""
    data = _harness.digits()
    starts = [model.init(s) for s in range(seeds)]
    out: dict[str, Any] = {}
    structures = dict.fromkeys(c.structure for c in configs)
    for structure in structures:
        group = [c for c in configs if c.structure == structure]
        runs = [(c, s) for c in group for s in range(seeds)]
        params = {k: jnp.asarray(np.stack([starts[s][k] for _, s in runs])) for k in starts[0]}
        beta = jnp.asarray([c.beta for c, _ in runs], jnp.float32)
        lr = jnp.asarray([c.lr for c, _ in runs], jnp.float32)
        seed = jnp.asarray([s for _, s in runs], jnp.int32)
        metrics = jax.device_get(trainer(model, structure, steps, data)(params, beta, lr, seed))
        for i, c in enumerate(group):
            rows = slice(i * seeds, (i + 1) * seeds)
            out[c.name] = {
                key: (
                    np.median(value[rows], axis=0).tolist()
                    if value.ndim > 1
                    else float(np.median(value[rows]))
                )
                for key, value in metrics.items()
            } | {"per_seed_test_loss": metrics["test_loss"][rows].tolist(), "config": c._asdict()}
    return out


def rms(a: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(a)))


def gradient_scales(steps: int, seeds: int) -> dict[str, Any]:
    """Why coupled β acts per layer: each kernel's task-gradient scale against the penalty's.

    Along plain Adam training of the MLP, for each kernel: the root mean square over
    its entries of the minibatch task gradient (what Adam's second moment tracks), and
    of the L1 penalty's gradient at β = 1. Their ratio is the coupled β at which the
    penalty's gradient is as large as the task's in that kernel: above it, Adam's
    per-coordinate normalisation makes the step of that kernel the penalty's (entries
    of about lr whatever β), below it the task's. Medians over the seeds, at the start
    and averaged over the run.
    """
    data = _harness.digits()
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    tx = optax.adam(LEARNING_RATE)

    def one(params: Any, seed: jax.Array) -> Any:
        def step(carry: Any, k: jax.Array) -> tuple[Any, Any]:
            p, s = carry
            idx = jax.random.randint(k, (BATCH,), 0, x.shape[0])
            grads = jax.grad(lambda q: task_loss(MLP, q, x[idx], y[idx]))(p)
            scales = {
                k: (rms(grads[k]), rms(jax.grad(jop.orthogonality_penalty)(p[k]))) for k in KERNELS
            }
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), scales

        _, scales = jax.lax.scan(
            step, (params, tx.init(params)), jax.random.split(jax.random.key(seed), steps)
        )
        return scales

    starts = [MLP.init(s) for s in range(seeds)]
    params = {k: jnp.asarray(np.stack([p[k] for p in starts])) for k in starts[0]}
    scales = jax.device_get(jax.jit(jax.vmap(one))(params, jnp.arange(seeds)))
    out = {}
    for k in KERNELS:
        task, pen = np.asarray(scales[k][0]), np.asarray(scales[k][1])  # (seeds, steps)
        out[k] = {
            "task_rms_start": float(np.median(task[:, 0])),
            "task_rms_mean": float(np.median(task.mean(1))),
            "penalty_rms_beta1_start": float(np.median(pen[:, 0])),
            "penalty_rms_beta1_mean": float(np.median(pen.mean(1))),
            "balanced_beta_start": float(np.median(task[:, 0] / pen[:, 0])),
            "balanced_beta_mean": float(np.median(task.mean(1) / pen.mean(1))),
        }
    return out


ALONE_STEPS = (0, 30, 100, 300, 1000, 3000)
ALONE = (("adam", "l1"), ("adam", "squared"), ("adam", "deadzone"), ("sgd", "l1"))


def penalty_alone(steps: int) -> dict[str, Any]:
    """The penalty with no task: a random 64x64 kernel (the hidden kernels' shape and
    scale) trained on the penalty alone, by Adam (as the coupled placement does where
    the penalty's gradient dominates) or plain SGD, at the three learning rates of the
    grid, L1, squared or L1 with ``deadzone``. Reported along the way: the largest and
    the mean entry of :math:`|W^\top W - I|`, and the mean size of an update entry over
    the last 100 steps divided by the learning rate (how much it still moves: the
    chatter at the minimum).
    """
    w0 = jnp.asarray(np.random.default_rng(0).normal(size=(HIDDEN, HIDDEN)) / 8, jnp.float32)
    marks = [m for m in ALONE_STEPS if m <= steps]
    out: dict[str, Any] = {}
    for opt, norm in ALONE:

        def one(lr: jax.Array, opt: str = opt, norm: str = norm) -> Any:
            tx = optax.adam(lr) if opt == "adam" else optax.sgd(lr)
            kind = "l1" if norm == "deadzone" else norm
            sub = jop.deadzone(DEADZONE) if norm == "deadzone" else "zero"

            def step(carry: Any, _: None) -> tuple[Any, Any]:
                w, s = carry
                g = jax.grad(lambda w: jop.orthogonality_penalty(w, norm=kind, subgradient=sub))(w)
                u, s = tx.update(g, s, w)
                e = jnp.abs(w.T @ w - jnp.eye(HIDDEN))
                return (w + u, s), (jnp.max(e), jnp.mean(e), jnp.mean(jnp.abs(u)) / lr)

            _, trace = jax.lax.scan(step, (w0, tx.init(w0)), None, length=steps + 1)
            return trace

        largest, mean, moved = jax.device_get(jax.jit(jax.vmap(one))(jnp.asarray(GRID_LR)))
        for i, lr in enumerate(GRID_LR):
            out[f"{opt} {norm} lr {lr:g}"] = {
                "steps": marks,
                "largest": [float(largest[i, m]) for m in marks],
                "mean": [float(mean[i, m]) for m in marks],
                "update_over_lr_last_100": float(np.mean(moved[i, -100:])),
            }
    return out


def alone_table(alone: dict[str, Any]) -> str:
    marks = next(iter(alone.values()))["steps"]
    rows = [
        "| optimizer, norm, lr | largest entry at steps "
        + ", ".join(map(str, marks))
        + " | mean entry at the same | mean update / lr, last 100 steps |",
        "|---|---|---|--:|",
    ]
    for name, r in alone.items():
        rows.append(
            f"| {name} | "
            + ", ".join(f"{e:.3f}" for e in r["largest"])
            + " | "
            + ", ".join(f"{e:.4f}" for e in r["mean"])
            + f" | {r['update_over_lr_last_100']:.2g} |"
        )
    return "\n".join(rows)


def table(results: dict[str, Any], names: list[str], trace: bool = True) -> str:
    marks = [c for c in CHECKPOINTS if c <= max(CHECKPOINTS)]
    head = (
        "| configuration | test loss | test accuracy | head error | hidden error "
        "| head column norm |"
    )
    rule = "|---|--:|--:|--:|--:|--:|"
    if trace:
        head += (
            " head error at steps " + ", ".join(map(str, marks)) + " | hidden error at the same |"
        )
        rule += "---|---|"
    rows = [head, rule]
    for name in names:
        r = results[name]
        row = (
            f"| {name} | {r['test_loss']:.3f} | {r['test_accuracy']:.3f} "
            f"| {r['head_error']:.2f} | {r['hidden_error']:.2f} | {r['head_norm']:.2f} |"
        )
        if trace:
            row += " " + ", ".join(f"{e:.2f}" for e in r["head_error_trace"]) + " |"
            row += " " + ", ".join(f"{e:.2f}" for e in r["hidden_error_trace"]) + " |"
        rows.append(row)
    return "\n".join(rows)


def grid_table(results: dict[str, Any]) -> str:
    rows = [
        "| configuration | " + " | ".join(f"lr {lr:g}" for lr in GRID_LR) + " |",
        "|---|" + "--:|" * len(GRID_LR),
    ]
    labels = dict.fromkeys(c.name.rsplit(" lr ", 1)[0] for c in GRID)
    for label in labels:
        cells = []
        for lr in GRID_LR:
            r = results[f"{label} lr {lr:g}"]
            cells.append(f"{r['test_loss']:.2f} / {r['head_error']:.2f} / {r['hidden_error']:.2f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def scales_table(scales: dict[str, Any]) -> str:
    rows = [
        "| kernel | task gradient RMS (start / mean over the run) | penalty gradient RMS at β = 1 "
        "(start / mean) | balanced coupled β (start / mean) |",
        "|---|--:|--:|--:|",
    ]
    for k, s in scales.items():
        rows.append(
            f"| {k} | {s['task_rms_start']:.2g} / {s['task_rms_mean']:.2g} "
            f"| {s['penalty_rms_beta1_start']:.2g} / {s['penalty_rms_beta1_mean']:.2g} "
            f"| {s['balanced_beta_start']:.2g} / {s['balanced_beta_mean']:.2g} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 steps, one seed, no grid")
    parser.add_argument("--steps", type=int, default=None, help="training steps (300)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the single MLP (3)")
    parser.add_argument("--markdown", action="store_true", help="also print the Markdown tables")
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.quick else 300)
    seeds = args.seeds or (1 if args.quick else 3)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load, begin = list(os.getloadavg()), time.perf_counter()
    mlp = train(MLP, MAIN + SQUARED + WHY + (() if args.quick else GRID), steps, seeds)
    ensemble = train(ENSEMBLE, MAIN + SQUARED, steps, 1)
    scales = gradient_scales(steps, seeds)
    alone = penalty_alone(300 if args.quick else 3000)
    seconds = time.perf_counter() - begin
    print(
        f"{steps} steps, batch {BATCH}, lr {LEARNING_RATE}; "
        f"mlp {seeds} seeds, ensemble of {MEMBERS}"
    )
    for label, results in (("mlp", mlp), ("ensemble", ensemble)):
        for name, r in results.items():
            print(
                f"{label:<8} {name:<34} test loss {r['test_loss']:.3f}  "
                f"accuracy {r['test_accuracy']:.3f}"
                f"  head error {r['head_error']:.2f}  hidden error {r['hidden_error']:.2f}"
            )
    if args.markdown:
        main_names = [c.name for c in MAIN + SQUARED]
        print("\nMLP\n\n" + table(mlp, main_names))
        print("\nEnsemble of 8\n\n" + table(ensemble, main_names))
        print("\nMLP, why\n\n" + table(mlp, [c.name for c in WHY]))
        if not args.quick:
            print("\nMLP, test loss / head error / hidden error\n\n" + grid_table(mlp))
        print("\nGradient scales\n\n" + scales_table(scales))
        print("\nThe penalty alone, a 64x64 kernel\n\n" + alone_table(alone))
    print(f"took {seconds:.0f} s")
    report = {
        "machine": {
            **_machine.machine(),
            "optax": optax.__version__,
            "date_utc": started,
            "loadavg_at_start": load,
            "loadavg_at_end": list(os.getloadavg()),
            "seconds": seconds,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "settings": {
            "steps": steps,
            "seeds": seeds,
            "members": MEMBERS,
            "batch": BATCH,
            "hidden": HIDDEN,
            "learning_rate": LEARNING_RATE,
            "checkpoints": CHECKPOINTS,
        },
        "mlp": mlp,
        "ensemble": ensemble,
        "gradient_scales": scales,
        "penalty_alone": alone,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
