"""Soft or exact: three ways to orthonormal columns, measured in one run.

Two tasks, each trained with the same optimizer and step size by

* ``soft-l1`` / ``soft-squared``: ``add_orthogonality_penalty`` (the soft penalty),
* ``landing``: ``jop.landing`` (the landing field, no retraction),
* ``project``: ``jop.project_orthonormal`` after every step (projected gradient),

reporting the orthogonality error over the steps, the task loss, the wall time per
step (the whole training loop under one ``jax.jit`` of a ``lax.scan``, compiled
first) and the time to reach an error of 1e-5. The tasks:

* PCA: the top 5 eigenvectors of a 24 x 24 covariance (eigenvalues 1 ... 0.1),
  minimising -1/2 tr(X^T A X) from a random, non-orthonormal start; plain SGD.
* digits: a 64-32-32-10 tanh network on scikit-learn's digits, full batch, SGD
  with momentum 0.9, with orthonormal columns in both hidden kernels.

And the cost of one step, apart from training: on MLP-sized leaves {(784, 512),
(512, 512)}, one projected step (``chain(sgd, project_orthonormal())``, update and
apply, jitted) against one penalty step (``chain(add_orthogonality_penalty, sgd)``:
one Gram matrix and one product per leaf) from orthonormal leaves, at step sizes that
put :math:`\\|E\\|_F = \\|Y^\top Y - I\\|_F` in each of the series' degrees and beyond,
interleaved (the order alternates), medians of ``--reps`` pairs. ``--step-cost``
runs only this part.

If geotorch is installed (the ``bench`` extra), the PCA problem is also solved with
its orthogonal parametrisation (``geotorch.orthogonal``) and torch's SGD, as an
anchor: per-step time ratio and final errors side by side.

    python benchmarks/bench_manifold.py [--json benchmarks/results/manifold_cpu.json]
    python benchmarks/bench_manifold.py --quick    # a smoke run: few steps, tiny leaves

``--markdown`` also prints the tables as Markdown. Times are medians of
``_harness.interleaved_medians`` (the training loops: ``repeats`` runs each; the step
cost: ``--reps`` interleaved pairs).

The notebook ``notebooks/05_soft_or_exact.ipynb`` imports this module and plots it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Benchmark the checkout this script lives in, not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax_orthopenalty as jop
from benchmarks import _harness

TARGET = 1e-5
METHODS = ("soft-l1", "soft-squared", "landing", "project")


# --------------------------------------------------------------------------- PCA


def pca_problem(d: int = 24, k: int = 5, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    evals = np.linspace(1.0, 0.1, d)
    return {
        "a": (q * evals) @ q.T,
        "optimum": -0.5 * float(evals[:k].sum()),
        "x0": 1.3 * rng.normal(size=(d, k)) / np.sqrt(d),
    }


def pca_optimizer(method: str, lr: float, beta: float = 1.0) -> optax.GradientTransformation:
    if method == "soft-l1":
        return optax.chain(jop.add_orthogonality_penalty(beta), optax.sgd(lr))
    if method == "soft-squared":
        return optax.chain(jop.add_orthogonality_penalty(beta, norm="squared"), optax.sgd(lr))
    if method == "landing":
        return optax.chain(jop.landing(1.0), optax.sgd(lr))
    if method == "project":
        return optax.chain(optax.sgd(lr), jop.project_orthonormal())
    raise ValueError(method)


def _timed_scan(
    step: Callable[[Any, Any], tuple[Any, Any]], carry: Any, steps: int, repeats: int = 3
) -> tuple[Any, Any, float]:
    """Runs ``steps`` steps in one jitted scan; returns the result and seconds per step
    (the median of ``repeats`` runs, after the first, which compiles)."""
    run = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))
    out = jax.block_until_ready(run(carry))  # compile, and the result
    seconds = _harness.interleaved_medians({"run": lambda: run(carry)}, reps=repeats, warmup=0)
    return out[0], out[1], seconds["run"] / steps


def _first_below(errors: np.ndarray, target: float = TARGET) -> int | None:
    hits = np.flatnonzero(errors < target)
    return int(hits[0]) + 1 if hits.size else None


def run_pca(
    steps: int = 3000, lr: float = 0.05, seed: int = 0, repeats: int = 3
) -> dict[str, Any]:
    prob = pca_problem(seed=seed)
    a = jnp.asarray(prob["a"], jnp.float32)

    def loss(x: jax.Array) -> jax.Array:
        return -0.5 * jnp.trace(x.T @ a @ x)

    out: dict[str, Any] = {"optimum": prob["optimum"], "steps": steps, "lr": lr}
    for method in METHODS:
        tx = pca_optimizer(method, lr)

        def step(carry: Any, _: Any, tx: Any = tx) -> tuple[Any, Any]:
            x, s = carry
            u, s = tx.update(jax.grad(loss)(x), s, x)
            x = optax.apply_updates(x, u)
            return (x, s), (jop.orthogonality_error(x), loss(x))

        x0 = jnp.asarray(prob["x0"], jnp.float32)
        _, (errors, losses), per_step = _timed_scan(step, (x0, tx.init(x0)), steps, repeats)
        errors, losses = np.asarray(errors, np.float64), np.asarray(losses, np.float64)
        hit = _first_below(errors)
        out[method] = {
            "error": errors.tolist(),
            "loss": losses.tolist(),
            "final_error": float(errors[-1]),
            "final_gap": float((losses[-1] - prob["optimum"]) / abs(prob["optimum"])),
            "us_per_step": per_step * 1e6,
            "steps_to_target": hit,
            "ms_to_target": None if hit is None else hit * per_step * 1e3,
        }
    return out


# --------------------------------------------------------------------------- digits


DIGITS_DIMS = {
    "w1": jop.OrthoDims(),
    "b1": None,
    "w2": jop.OrthoDims(),
    "b2": None,
    "w3": None,
    "b3": None,
}


def digits_init(seed: int = 0, hidden: int = 32) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    sizes = [(64, hidden), (hidden, hidden), (hidden, 10)]
    params: dict[str, jax.Array] = {}
    for i, (m, n) in enumerate(sizes, start=1):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), jnp.float32)
        params[f"b{i}"] = jnp.zeros(n, jnp.float32)
    return params


def digits_forward(params: Any, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"] + params["b2"])
    return h @ params["w3"] + params["b3"]


def digits_optimizer(method: str, lr: float, beta: float = 1e-2) -> optax.GradientTransformation:
    dims = DIGITS_DIMS
    if method == "soft-l1":
        pen = jop.add_orthogonality_penalty(beta, dimension_numbers=dims)
        return optax.chain(pen, optax.sgd(lr, momentum=0.9))
    if method == "soft-squared":
        pen = jop.add_orthogonality_penalty(beta, norm="squared", dimension_numbers=dims)
        return optax.chain(pen, optax.sgd(lr, momentum=0.9))
    if method == "landing":
        return optax.chain(
            optax.trace(decay=0.9),
            jop.landing(1.0, dimension_numbers=dims),
            optax.scale_by_learning_rate(lr),
        )
    if method == "project":
        return optax.chain(
            optax.sgd(lr, momentum=0.9), jop.project_orthonormal(dimension_numbers=dims)
        )
    raise ValueError(method)


def run_digits(
    steps: int = 400, lr: float = 0.1, seed: int = 0, repeats: int = 3
) -> dict[str, Any]:
    xtr, ytr, xte, yte = (jnp.asarray(v) for v in _harness.digits(seed))

    def loss(params: Any) -> jax.Array:
        logits = digits_forward(params, xtr)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ytr).mean()

    def error(params: Any) -> jax.Array:
        return jnp.maximum(
            jop.orthogonality_error(params["w1"]), jop.orthogonality_error(params["w2"])
        )

    out: dict[str, Any] = {"steps": steps, "lr": lr}
    for method in METHODS:
        tx = digits_optimizer(method, lr)

        def step(carry: Any, _: Any, tx: Any = tx) -> tuple[Any, Any]:
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            u, s = tx.update(grads, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), (error(p), value)

        p0 = digits_init(seed)
        (p, _), (errors, losses), per_step = _timed_scan(step, (p0, tx.init(p0)), steps, repeats)
        errors, losses = np.asarray(errors, np.float64), np.asarray(losses, np.float64)
        accuracy = float(jnp.mean(jnp.argmax(digits_forward(p, xte), -1) == yte))
        hit = _first_below(errors)
        out[method] = {
            "error": errors.tolist(),
            "loss": losses.tolist(),
            "final_error": float(errors[-1]),
            "final_loss": float(loss(p)),
            "test_accuracy": accuracy,
            "us_per_step": per_step * 1e6,
            "steps_to_target": hit,
            "ms_to_target": None if hit is None else hit * per_step * 1e3,
        }
    return out


# --------------------------------------------------------------------------- geotorch


def run_geotorch(steps: int = 3000, lr: float = 0.05, seed: int = 0) -> dict[str, Any] | None:
    """The PCA problem with geotorch.orthogonal and torch SGD, or None without geotorch."""
    try:
        import geotorch
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    prob = pca_problem(seed=seed)
    a = torch.tensor(prob["a"], dtype=torch.float32)
    layer = torch.nn.Linear(5, 24, bias=False)  # weight (24, 5): columns orthonormal
    geotorch.orthogonal(layer, "weight")
    # geotorch starts on the manifold: from the projection of the same start.
    u, _, vt = np.linalg.svd(prob["x0"], full_matrices=False)
    layer.weight = torch.tensor(u @ vt, dtype=torch.float32)
    opt = torch.optim.SGD(layer.parameters(), lr=lr)

    def one() -> float:
        opt.zero_grad()
        x = layer.weight
        value = -0.5 * torch.trace(x.T @ a @ x)
        value.backward()
        opt.step()
        return value.item()

    # Training as it times: 10 steps of warm-up, then the median of the other steps.
    per_step = _harness.interleaved_medians({"step": one}, reps=steps - 10, warmup=10)["step"]
    with torch.no_grad():
        x = layer.weight.double().numpy()
    final = -0.5 * float(np.trace(x.T @ prob["a"] @ x))
    return {
        "us_per_step": per_step * 1e6,
        "final_error": float(np.abs(x.T @ x - np.eye(5)).max()),
        "final_gap": (final - prob["optimum"]) / abs(prob["optimum"]),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------- report


STEP_LEAVES = ((784, 512), (512, 512))
"""The MLP 784-512-512-10's two square-ish kernels: the leaves of the step-cost rows."""

STEP_DISTANCES = (1e-4, 1e-3, 1.5e-2, 8e-2, 0.17, 0.25, 0.4)
"""Targets for the largest ``||Y^T Y - I||_F`` after the step: degree 1 of the series
twice (1e-3: the MLP's ``sgd(1e-3)`` steps), degrees 2, 4, 6, 8 by the Frobenius bound,
and the ``eigh`` route beyond."""


def run_step_cost(
    reps: int = 31,
    seed: int = 0,
    leaves: tuple[tuple[int, int], ...] = STEP_LEAVES,
    distances: tuple[float, ...] = STEP_DISTANCES,
) -> dict[str, Any]:
    """One projected step against one penalty step on the same leaves, in one run."""

    rng = np.random.default_rng(seed)
    params = {
        f"w{i}": jnp.asarray(np.linalg.qr(rng.normal(size=s))[0], jnp.float32)
        for i, s in enumerate(leaves)
    }
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}

    def distance(lr: float) -> float:
        """The largest ||Y^T Y - I||_F after a step of size lr, in float64."""
        out = 0.0
        for k, x in params.items():
            y = np.asarray(x, np.float64) - lr * np.asarray(grads[k], np.float64)
            out = max(out, float(np.linalg.norm(y.T @ y - np.eye(y.shape[1]))))
        return out

    def lr_for(target: float) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):  # the distance grows with lr: bisect
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if distance(mid) < target else (lo, mid)
        return lo

    rows = []
    for target in distances:
        lr = lr_for(target)
        txs = {
            "penalty": optax.chain(jop.add_orthogonality_penalty(1e-3), optax.sgd(lr)),
            "project": optax.chain(optax.sgd(lr), jop.project_orthonormal()),
        }
        steps = {}
        for name, tx in txs.items():
            state = tx.init(params)

            def step(p: Any, g: Any, tx: Any = tx, state: Any = state) -> Any:
                return optax.apply_updates(p, tx.update(g, state, p)[0])

            steps[name] = jax.jit(step).lower(params, grads).compile()
        med = _harness.interleaved_medians(
            {name: lambda fn=fn: fn(params, grads) for name, fn in steps.items()}, reps=reps
        )
        leaf_distances = [
            (
                y.shape[0],
                float(np.linalg.norm(np.asarray(y).T @ np.asarray(y) - np.eye(y.shape[1]))),
            )
            for y in (params[k] - lr * grads[k] for k in params)
        ]
        rows.append(
            {
                "target": target,
                "distance": distance(lr),
                "route": _route(leaf_distances),
                "penalty_ms": 1e3 * med["penalty"],
                "project_ms": 1e3 * med["project"],
                "ratio": med["project"] / med["penalty"],
            }
        )
    return {"leaves": [list(s) for s in leaves], "reps": reps, "rows": rows}


def _route(leaf_distances: list[tuple[int, float]]) -> str:
    """Which route ``polar`` takes for float32 leaves at these ``(l, ||E||_F)``: the
    highest over the leaves (the degree from the Frobenius bound: the tighter ||E^2||
    bound may pick a lower one)."""
    from jax_orthopenalty import _polar

    def index(length: int, frobenius: float) -> int:
        radii = _polar.radii(np.float32, length)
        degrees = [i for i, r in enumerate(radii) if frobenius <= r]
        if degrees:
            return degrees[0]
        return len(radii) + (frobenius > _polar.NEAR_ORTHONORMAL)

    names = [f"series, degree <= {d}" for d in _polar.DEGREES] + ["eigh", "svd"]
    return names[max(index(*ld) for ld in leaf_distances)]


def report_step_cost(cost: dict[str, Any]) -> str:
    lines = [
        f"one step on leaves {cost['leaves']}, medians of {cost['reps']} interleaved pairs",
        f"{'||E||_F':>9}  {'route':24}{'penalty ms':>11}{'project ms':>11}{'ratio':>7}",
    ]
    for r in cost["rows"]:
        lines.append(
            f"{r['distance']:>9.1e}  {r['route']:24}{r['penalty_ms']:>11.2f}"
            f"{r['project_ms']:>11.2f}{r['ratio']:>7.2f}"
        )
    return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(pca: dict[str, Any], digits: dict[str, Any], geo: dict[str, Any] | None) -> str:
    lines = [f"PCA d=24 k=5, SGD lr={pca['lr']}, {pca['steps']} steps"]
    lines.append(
        f"{'method':14}{'final err':>11}{'obj gap':>11}{'us/step':>9}"
        f"{'steps<1e-5':>12}{'ms<1e-5':>9}"
    )
    for m in METHODS:
        r = pca[m]
        lines.append(
            f"{m:14}{r['final_error']:>11.1e}{r['final_gap']:>11.1e}{r['us_per_step']:>9.1f}"
            f"{_fmt(r['steps_to_target'], 'd'):>12}{_fmt(r['ms_to_target'], '.1f'):>9}"
        )
    if geo is None:
        lines.append("geotorch: not run (not installed: pip install 'jax_orthopenalty[bench]')")
    else:
        lines.append(
            f"{'geotorch':14}{geo['final_error']:>11.1e}{geo['final_gap']:>11.1e}"
            f"{geo['us_per_step']:>9.1f}   (torch {geo['torch']}, eager, 1 thread)"
        )
        for m in ("landing", "project"):
            lines.append(
                f"  {m} / geotorch per-step time: {pca[m]['us_per_step'] / geo['us_per_step']:.3f}"
            )
    lines.append("")
    lines.append(
        f"digits 64-32-32-10, SGD+momentum lr={digits['lr']}, {digits['steps']} full-batch steps"
    )
    lines.append(
        f"{'method':14}{'final err':>11}{'loss':>8}{'test acc':>10}{'us/step':>9}"
        f"{'steps<1e-5':>12}{'ms<1e-5':>9}"
    )
    for m in METHODS:
        r = digits[m]
        lines.append(
            f"{m:14}{r['final_error']:>11.1e}{r['final_loss']:>8.3f}{r['test_accuracy']:>10.3f}"
            f"{r['us_per_step']:>9.1f}{_fmt(r['steps_to_target'], 'd'):>12}"
            f"{_fmt(r['ms_to_target'], '.1f'):>9}"
        )
    return "\n".join(lines)


def markdown(
    cost: dict[str, Any], pca: dict[str, Any] | None = None, digits: dict[str, Any] | None = None
) -> str:
    """The step-cost table of docs/performance.md, and the training tables."""
    tables = [
        _harness.markdown_table(
            [
                "largest ‖E‖_F after the step",
                "route (Frobenius bound)",
                "penalty step ms",
                "projected step ms",
                "projected / penalty",
            ],
            [
                [
                    f"{r['target']:g}",
                    r["route"],
                    f"{r['penalty_ms']:.2f}",
                    f"{r['project_ms']:.2f}",
                    f"{r['ratio']:.2f}",
                ]
                for r in cost["rows"]
            ],
        )
    ]
    for title, res in (("PCA", pca), ("digits", digits)):
        if res is None:
            continue
        tables.append(
            _harness.markdown_table(
                [f"{title} ({res['steps']} steps)", "final error", "µs/step", "steps to 1e-5"],
                [
                    [
                        m,
                        f"{res[m]['final_error']:.1e}",
                        f"{res[m]['us_per_step']:.1f}",
                        res[m]["steps_to_target"],
                    ]
                    for m in METHODS
                ],
            )
        )
    return "\n\n".join(tables)


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    """A training result without its per-step curves."""
    return {k: v for k, v in result.items() if not isinstance(v, dict)} | {
        m: {k: v for k, v in result[m].items() if k not in ("error", "loss")} for m in METHODS
    }


def main(argv: list[str] | None = None) -> int:
    parser = _harness.parser(__doc__.splitlines()[0])
    parser.add_argument("--no-geotorch", action="store_true")
    parser.add_argument("--step-cost", action="store_true", help="only the step-cost rows")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 31)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    if args.quick:
        cost = run_step_cost(reps, leaves=((12, 4), (8, 8)), distances=(1e-4, 3e-2, 0.4))
    else:
        cost = run_step_cost(reps)
    print(report_step_cost(cost))
    if args.step_cost:
        if args.markdown:
            print(markdown(cost))
        _harness.write_report(args.json, {"quick": args.quick, "step_cost": cost})
        return 0
    if args.quick:
        pca, digits = run_pca(steps=100, repeats=1), run_digits(steps=20, repeats=1)
        geo = None if args.no_geotorch else run_geotorch(steps=30)
    else:
        pca, digits = run_pca(), run_digits()
        geo = None if args.no_geotorch else run_geotorch()
    print(report(pca, digits, geo))
    if args.markdown:
        print(markdown(cost, pca, digits))
    results = {
        "quick": args.quick,
        "pca": _slim(pca),
        "digits": _slim(digits),
        "geotorch": geo,
        "step_cost": cost,
    }
    _harness.write_report(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
