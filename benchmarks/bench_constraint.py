"""Choosing beta, or not: the target constraint against fixed beta, measured in one run.

``add_orthogonality_constraint(eps)`` keeps one multiplier per group and moves it by
dual ascent until the group's error is at the target ``eps``. Three measurements:

* ``pca``: the top 5 eigenvectors of a 24 x 24 covariance, as in
  ``bench_manifold.py`` (plain SGD from a random, non-orthonormal start, 3000 steps,
  the step size on a cosine decay from 0.05 to 0: a subgradient method's L1 pull
  settles only as the steps shrink). The constraint at eps = 1e-3 and 1e-5 against
  fixed beta (a sweep), landing and the projection: the final error, the objective's
  gap to the optimum, the first step from which the error stays under eps with the
  objective within 1% of the optimum, and the multiplier found. One row at a
  constant step size shows the floor it leaves.
* ``digits`` and ``cnn``: a 64-32-32-10 tanh network and a small CNN (conv 3x3 8,
  conv 3x3 16, dense) on scikit-learn's bundled digits (no download), full batch,
  SGD with momentum 0.9 and a cosine decay from 0.1, 400 steps; the hidden kernels
  (columns = outputs; the CNN trains on 512 of the images) constrained at eps in
  {1e-1, 1e-2, 1e-3} against fixed beta:
  test accuracy, each kernel's final error and its largest over the last 50 steps,
  and each kernel's multiplier.
* ``cost``: one jitted step (update and apply) of the constraint against
  ``add_orthogonality_penalty`` on MLP-sized leaves {(784, 512), (512, 512)}, at
  ``every`` 1 and 4, interleaved (the order alternates), medians of ``--reps``.

    python benchmarks/bench_constraint.py [--quick] [--reps 15] [--markdown]
        [--json benchmarks/results/constraint_cpu.json] [--figure docs/img/choosing-beta.png]

The small timing helpers (interleaved medians, the markdown table) are written here:
the shared ``benchmarks/_harness.py`` was not on main when this was written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_orthopenalty as jop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine
from bench_manifold import (
    DIGITS_DIMS,
    digits_forward,
    digits_init,
    pca_problem,
)

from benchmarks._harness import digits as digits_data  # bench_manifold put the root on the path

RATE = 1e-3  # the default rate


# --------------------------------------------------------------------------- helpers


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, reps: int) -> dict[str, float]:
    """Seconds per call of each function: warmed, interleaved (the order alternates),
    the median of ``reps``."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) for name, v in times.items()}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _scan(step: Callable[[Any, Any], Any], carry: Any, steps: int) -> tuple[Any, Any]:
    return jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(carry)


def _loop(step: Callable[[Any, Any], Any], carry: Any, steps: int) -> tuple[Any, Any]:
    """:func:`_scan` as a Python loop of jitted steps: XLA:CPU runs a convolution about
    ten times slower inside a while loop (jax 0.10.2, measured: 220 against 24 ms)."""
    one = jax.jit(lambda c: step(c, None))
    outs = []
    for _ in range(steps):
        carry, out = one(carry)
        outs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _constraint_state(state: Any) -> Any:
    is_state = lambda x: isinstance(x, jop.AddOrthogonalityConstraintState)  # noqa: E731
    found = [x for x in jax.tree.leaves(state, is_leaf=is_state) if is_state(x)]
    return found[0] if found else None


def _held_from(errors: np.ndarray, ok: np.ndarray) -> int | None:
    """The first step (1-based) from which ``ok`` holds to the end, or None."""
    if not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return int(bad[-1]) + 2 if bad.size else 1


# --------------------------------------------------------------------------- PCA


def pca_methods(steps: int) -> dict[str, tuple[optax.GradientTransformation, float | None]]:
    lr = optax.cosine_decay_schedule(0.05, steps)
    sgd = optax.sgd(lr)
    out: dict[str, tuple[optax.GradientTransformation, float | None]] = {}
    for eps in (1e-3, 1e-5):
        out[f"constraint eps={eps:g}"] = (
            optax.chain(jop.add_orthogonality_constraint(eps), sgd),
            eps,
        )
    out["constraint eps=1e-3, constant lr"] = (
        optax.chain(jop.add_orthogonality_constraint(1e-3), optax.sgd(0.05)),
        1e-3,
    )
    for beta in (0.3, 1.0, 3.0):
        out[f"fixed beta={beta:g}"] = (
            optax.chain(jop.add_orthogonality_penalty(beta), sgd),
            None,
        )
    out["landing"] = (optax.chain(jop.landing(1.0), sgd), None)
    out["project"] = (optax.chain(sgd, jop.project_orthonormal()), None)
    return out


def run_pca(steps: int = 3000) -> dict[str, Any]:
    prob = pca_problem()
    a = jnp.asarray(prob["a"], jnp.float32)
    x0 = jnp.asarray(prob["x0"], jnp.float32)
    optimum = prob["optimum"]

    def loss(x: jax.Array) -> jax.Array:
        return -0.5 * jnp.trace(x.T @ a @ x)

    rows: dict[str, Any] = {}
    for name, (tx, eps) in pca_methods(steps).items():

        def step(carry: Any, _: Any, tx: Any = tx) -> tuple[Any, Any]:
            x, s = carry
            u, s = tx.update(jax.grad(loss)(x), s, x)
            x = optax.apply_updates(x, u)
            dual = _constraint_state(s)
            beta = jnp.zeros(()) if dual is None else dual.beta
            return (x, s), (jop.orthogonality_error(x), loss(x), beta)

        _, (errors, losses, betas) = _scan(step, (x0, tx.init(x0)), steps)
        errors, betas = np.asarray(errors, np.float64), np.asarray(betas, np.float64)
        gaps = (np.asarray(losses, np.float64) - optimum) / abs(optimum)
        ok = (errors < (eps or 1e-5)) & (np.abs(gaps) < 0.01)
        rows[name] = {
            "eps": eps,
            "final_error": float(errors[-1]),
            "final_gap": float(gaps[-1]),
            "held_from": _held_from(errors, ok),
            "beta": float(betas[-1]) if eps is not None else None,
            "error": errors.tolist(),
            "betas": betas.tolist(),
        }
    return {"steps": steps, "rows": rows}


# --------------------------------------------------------------------------- digits, CNN

CNN_DIMS = {
    "c1": jop.OrthoDims(vector_axis=(0, 1, 2)),  # HWIO: one column per output channel
    "c2": jop.OrthoDims(vector_axis=(0, 1, 2)),
    "d": None,
    "b": None,
}


def cnn_init(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    shapes = {"c1": (3, 3, 1, 8), "c2": (3, 3, 8, 16), "d": (4 * 4 * 16, 10)}
    params = {
        k: jnp.asarray(rng.normal(size=s) / np.sqrt(np.prod(s[:-1])), jnp.float32)
        for k, s in shapes.items()
    }
    params["b"] = jnp.zeros(10, jnp.float32)
    return params


def cnn_forward(params: Any, x: jax.Array) -> jax.Array:
    h = x.reshape(-1, 8, 8, 1)
    for k in ("c1", "c2"):
        h = jax.lax.conv_general_dilated(
            h, params[k], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h)
    h = h.reshape(-1, 4, 2, 4, 2, 16).mean(axis=(2, 4)).reshape(h.shape[0], -1)
    return h @ params["d"] + params["b"]


MODELS = {
    "digits": (digits_init, digits_forward, DIGITS_DIMS, ("w1", "w2")),
    "cnn": (cnn_init, cnn_forward, CNN_DIMS, ("c1", "c2")),
}


def net_methods(dims: Any, steps: int, rates: Sequence[float]) -> dict[str, tuple[Any, Any]]:
    lr = optax.cosine_decay_schedule(0.1, steps)
    out: dict[str, tuple[Any, float | None]] = {"no penalty": (optax.identity(), None)}
    for eps in (1e-1, 1e-2, 1e-3):
        for rate in rates:
            c = jop.add_orthogonality_constraint(eps, rate=rate, dimension_numbers=dims)
            out[f"constraint eps={eps:g} rate={rate:g}"] = (c, eps)
    for beta in (1e-3, 1e-2, 1e-1):
        out[f"fixed beta={beta:g}"] = (
            jop.add_orthogonality_penalty(beta, dimension_numbers=dims),
            None,
        )
    return {k: (optax.chain(v, optax.sgd(lr, momentum=0.9)), e) for k, (v, e) in out.items()}


def run_net(model: str, steps: int = 400) -> dict[str, Any]:
    init, forward, dims, kernels = MODELS[model]
    xtr, ytr, xte, yte = (jnp.asarray(v) for v in digits_data(0))
    if model == "cnn":  # 512 training images: the convolutions' full batch is the cost
        xtr, ytr = xtr[:512], ytr[:512]

    def loss(p: Any) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, xtr), ytr).mean()

    rows: dict[str, Any] = {}
    for name, (tx, eps) in net_methods(dims, steps, (RATE, RATE / 10)).items():

        def step(carry: Any, _: Any, tx: Any = tx) -> tuple[Any, Any]:
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, u)
            dual = _constraint_state(s)
            betas = [jnp.zeros(()) if dual is None else dual.beta[k] for k in kernels]
            errors = [
                jop.orthogonality_error(p[k], vector_axis=dims[k].vector_axis) for k in kernels
            ]
            return (p, s), (jnp.stack(errors), jnp.stack(betas))

        p0 = init(0)
        run = _loop if model == "cnn" else _scan
        (p, _), (errors, betas) = run(step, (p0, tx.init(p0)), steps)
        errors, betas = np.asarray(errors, np.float64), np.asarray(betas, np.float64)
        rows[name] = {
            "eps": eps,
            "accuracy": float(jnp.mean(jnp.argmax(forward(p, xte), -1) == yte)),
            "final_error": errors[-1].tolist(),
            "last50_max": errors[-50:].max(axis=0).tolist(),
            "beta": betas[-1].tolist() if eps is not None else None,
            "error": errors.max(axis=1).tolist(),
            "betas": betas.tolist(),
        }
    return {"steps": steps, "kernels": list(kernels), "rows": rows}


# --------------------------------------------------------------------------- cost


def run_cost(reps: int, leaves: Sequence[tuple[int, int]] = ((784, 512), (512, 512))) -> Any:
    rng = np.random.default_rng(0)
    params = {
        f"w{i}": jnp.asarray(np.linalg.qr(rng.normal(size=s))[0], jnp.float32)
        for i, s in enumerate(leaves)
    }
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    rows = []
    for every in (1, 4):
        txs = {
            "penalty": jop.add_orthogonality_penalty(1e-3, every=every),
            "constraint": jop.add_orthogonality_constraint(1e-3, every=every),
        }
        fns = {}
        for name, tx in txs.items():
            tx = optax.chain(tx, optax.sgd(1e-3))

            @jax.jit
            def steps(p: Any, s: Any, tx: Any = tx, every: int = every) -> Any:
                def one(c: Any, _: Any) -> Any:  # `every` steps: the cycle of lazy steps
                    p, s = c
                    u, s = tx.update(grads, s, p)
                    return (optax.apply_updates(p, u), s), None

                return jax.lax.scan(one, (p, s), None, length=every)[0]

            state = tx.init(params)
            fns[name] = lambda steps=steps, state=state: steps(params, state)
        med = interleaved_medians(fns, reps=reps)
        rows.append(
            {
                "every": every,
                "penalty_ms": 1e3 * med["penalty"] / every,
                "constraint_ms": 1e3 * med["constraint"] / every,
                "ratio": med["constraint"] / med["penalty"],
            }
        )
    return {"leaves": [list(s) for s in leaves], "reps": reps, "rows": rows}


# --------------------------------------------------------------------------- report


def _e(v: Any) -> str:
    return "-" if v is None else f"{v:.1e}"


def tables(results: dict[str, Any]) -> str:
    pca = results["pca"]
    out = [f"PCA, SGD with a cosine decay from 0.05, {pca['steps']} steps"]
    out.append(
        markdown_table(
            ["method", "final error", "objective gap", "held from step", "beta found"],
            [
                [
                    name,
                    _e(r["final_error"]),
                    _e(r["final_gap"]),
                    r["held_from"] or "never",
                    "-" if r["beta"] is None else f"{r['beta']:.2f}",
                ]
                for name, r in pca["rows"].items()
            ],
        )
    )
    for model in ("digits", "cnn"):
        net = results[model]
        k1, k2 = net["kernels"]
        out.append(f"\n{model}, SGD+momentum 0.9, cosine from 0.1, {net['steps']} steps")
        out.append(
            markdown_table(
                ["method", "test acc", f"error {k1} / {k2}", "max last 50", f"beta {k1} / {k2}"],
                [
                    [
                        name,
                        f"{r['accuracy']:.3f}",
                        " / ".join(_e(v) for v in r["final_error"]),
                        " / ".join(_e(v) for v in r["last50_max"]),
                        "-" if r["beta"] is None else " / ".join(f"{b:.3g}" for b in r["beta"]),
                    ]
                    for name, r in net["rows"].items()
                ],
            )
        )
    cost = results["cost"]
    out.append(f"\nms per step on leaves {cost['leaves']}, medians of {cost['reps']} interleaved")
    out.append(
        markdown_table(
            ["every", "penalty ms", "constraint ms", "constraint / penalty"],
            [
                [
                    r["every"],
                    f"{r['penalty_ms']:.2f}",
                    f"{r['constraint_ms']:.2f}",
                    f"{r['ratio']:.2f}",
                ]
                for r in cost["rows"]
            ],
        )
    )
    return "\n".join(out)


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    pca = results["pca"]["rows"]
    for name in (
        "constraint eps=0.001",
        "constraint eps=1e-05",
        "fixed beta=0.3",
        "fixed beta=1",
        "fixed beta=3",
        "constraint eps=1e-3, constant lr",
    ):
        axes[0].semilogy(pca[name]["error"], label=name, lw=1)
    axes[0].set(title="PCA: orthogonality error", xlabel="step", ylim=(1e-8, 1e2))
    axes[0].legend(fontsize=7)
    for name in (
        "constraint eps=0.001",
        "constraint eps=1e-05",
        "constraint eps=1e-3, constant lr",
    ):
        axes[1].plot(pca[name]["betas"], label=name)
    axes[1].set(title="PCA: the multiplier found", xlabel="step", ylabel="beta")
    axes[1].legend(fontsize=7)
    net = results["digits"]["rows"]
    for name, r in net.items():
        if name.startswith("fixed") or name.endswith(f"rate={RATE / 10:g}"):
            axes[2].semilogy(r["error"], label=name, lw=1)
    axes[2].set(title="digits MLP: max error over the kernels", xlabel="step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke test")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--markdown", action="store_true", help="print the tables only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args(argv)
    pca_steps, net_steps, reps = (60, 60, 3) if args.quick else (3000, 400, args.reps)
    results: dict[str, Any] = {"machine": machine()}
    m = results["machine"]
    if not args.markdown:
        print(f"{m['cpu']}, {m['cores']} cores, jax {m['jax']}, {m['backend']}", flush=True)
    parts: dict[str, Callable[[], Any]] = {
        "pca": lambda: run_pca(pca_steps),
        "digits": lambda: run_net("digits", net_steps),
        "cnn": lambda: run_net("cnn", net_steps),
        "cost": lambda: run_cost(reps),
    }
    for name, run in parts.items():
        t = time.perf_counter()
        results[name] = run()
        if not args.markdown:
            print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    print(tables(results))
    if args.figure is not None:
        figure(results, args.figure)
    if args.json is not None:  # without the trajectories (the figure has them)
        for part in ("pca", "digits", "cnn"):
            for row in results[part]["rows"].values():
                row.pop("error"), row.pop("betas")
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
