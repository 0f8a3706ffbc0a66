"""How fast is the gradient of the orthogonality penalty? Ratios measured in one run.

For every regime (l, m, n), on the seed's (l, m, n) layout, it times the gradient in
two forms,

* ``grad``: ``jax.grad`` of :func:`jax_orthopenalty.orthogonality_penalty` (the
  closed-form ``custom_vjp`` backward pass);
* ``transform``: ``jop.add_orthogonality_penalty(beta).update(zeros, state, params)``,
  jitted (when the package has the transform);

against four references,

* ``autodiff``: ``jax.grad`` of the plain ``beta * abs(einsum(...) - eye).sum()``;
* ``matmul floor``: the Gram einsum plus one product einsum, each jitted on its own
  (the sum of their medians);
* ``memory floor``: one jitted elementwise pass over phi (``phi * 2``);
* ``torch``: where PyTorch is installed, the gradient PyTorch users write by hand
  (BigGAN style, ``2 * beta * W @ sign(W^T W - I)``, ``torch.bmm`` over the groups of
  the same (l, m, n) tensor, the result made contiguous in that layout), under
  ``torch.no_grad`` on the same CPU, with ``OMP_WAIT_POLICY=PASSIVE`` (see below).

The columns are interleaved: every repetition times each of them once, in an order
that reverses on every other repetition, and the table reports medians. It also
reports what XLA's compiled executable allocates beyond its arguments and outputs
(``memory_analysis().temp_size_in_bytes``), in units of phi's size.

Run from the repository root::

    .venv/bin/python benchmarks/bench_grad.py            # the table, a few minutes
    .venv/bin/python benchmarks/bench_grad.py --quick    # a smoke run, seconds

It prints the table and writes JSON (``--out``, default
``benchmarks/results/grad_<platform>.json``; ``--out ''`` writes none).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_orthopenalty as jop
from jax_orthopenalty import _contract

REGIMES: list[tuple[int, int, int]] = [
    (256, 64, 128),
    (768, 12, 64),
    (64, 512, 32),
    (16, 100000, 4),
    (32, 4096, 8),
    (1152, 1, 256),
    (4096, 1, 4096),
]
BETA = 0.5
HIGHEST = jax.lax.Precision.HIGHEST

# PyTorch's OpenMP threads spin-wait between ops by default, and XLA's thread pool
# does too: in one process the two fight over the cores, and PyTorch's calls take
# 10-20x longer than on their own. Passive waiting gives PyTorch its best time here
# (set before torch is imported; an explicit setting by the caller wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # optional: the hand-written PyTorch gradient
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None


# --------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], Any], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        out = fn()
    _block(out)
    return (time.perf_counter() - start) / inner


def _block(out: Any) -> None:
    if torch is not None and isinstance(out, torch.Tensor):
        return  # CPU tensors are ready when the call returns
    jax.block_until_ready(out)


def measure(
    columns: dict[str, Callable[[], Any]], reps: int, target_s: float
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each column, the columns interleaved.

    Every column is warmed up twice, then called ``inner`` times per sample so that a
    sample lasts about ``target_s``; repetition ``r`` visits the columns in order,
    reversed when ``r`` is odd, so that drift in the machine's load hits every column
    alike.
    """
    inner = {}
    for name, fn in columns.items():
        _block(fn())
        once = _timed(fn, 1)
        inner[name] = max(1, min(50, math.ceil(target_s / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in columns}
    order = list(columns)
    gc.disable()
    try:
        for r in range(reps):
            for name in order if r % 2 == 0 else order[::-1]:
                samples[name].append(_timed(columns[name], inner[name]))
    finally:
        gc.enable()
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "max_s": max(s),
            "reps": len(s),
            "inner": inner[name],
        }
        for name, s in samples.items()
    }


# --------------------------------------------------------------------------- columns


def _autodiff_loss(p: jax.Array) -> jax.Array:
    n = p.shape[-1]
    gram = jnp.einsum("abc,abd->bcd", p, p, precision=HIGHEST)
    return BETA * jnp.abs(gram - jnp.eye(n, dtype=p.dtype)[None]).sum()


def _temp_bytes(fn: Any, *args: Any) -> int | None:
    try:
        analysis = fn.lower(*args).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes)
    except Exception:
        return None


def _torch_grad(phi_np: np.ndarray) -> Callable[[], Any] | None:
    if torch is None:
        return None
    phi = torch.from_numpy(phi_np)  # (l, m, n), the same layout as the JAX side
    n = phi_np.shape[-1]
    eye = torch.eye(n, dtype=phi.dtype)

    def grad() -> Any:
        with torch.no_grad():
            w = phi.permute(1, 0, 2)  # (m, l, n): groups as the batch
            g = 2 * BETA * torch.bmm(w, torch.sign(torch.bmm(w.transpose(1, 2), w) - eye))
            return g.permute(1, 0, 2).contiguous()  # back to phi's (l, m, n)

    return grad


def run_regime(
    shape: tuple[int, int, int], reps: int, target_s: float, seed: int = 0
) -> dict[str, Any]:
    l, m, n = shape
    rng = np.random.default_rng(seed)
    # Columns of norm about 1 with inner products about 1/sqrt(l): away from the
    # kinks, so every form computes the same signs.
    phi_np = (rng.standard_normal(shape) / np.sqrt(l)).astype(np.float32)
    phi = jnp.asarray(phi_np)

    grad = jax.jit(jax.grad(lambda p: jop.orthogonality_penalty(p, BETA)))
    autodiff = jax.jit(jax.grad(_autodiff_loss))
    gram = jax.jit(lambda p: jnp.einsum("abc,abd->bcd", p, p, precision=HIGHEST))
    product = jax.jit(lambda p, w: jnp.einsum("abd,bdc->abc", p, w, precision=HIGHEST))
    memory = jax.jit(lambda p: p * 2)
    w = jnp.sign(gram(phi) - jnp.eye(n, dtype=phi.dtype)[None])

    columns: dict[str, Callable[[], Any]] = {
        "grad": lambda: grad(phi),
        "autodiff": lambda: autodiff(phi),
        "gram": lambda: gram(phi),
        "product": lambda: product(phi, w),
        "memory": lambda: memory(phi),
    }
    notes: dict[str, str] = {}
    transform = None
    if hasattr(jop, "add_orthogonality_penalty"):
        try:
            tx = jop.add_orthogonality_penalty(BETA)
            params = {"phi": phi}
            state = tx.init(params)
            zeros = {"phi": jnp.zeros_like(phi)}
            transform = jax.jit(tx.update)
            jax.block_until_ready(transform(zeros, state, params))
            columns["transform"] = lambda: transform(zeros, state, params)[0]
        except Exception as e:
            notes["transform"] = f"skipped: {type(e).__name__}: {e}"
    else:
        notes["transform"] = "skipped: jax_orthopenalty has no add_orthogonality_penalty"
    torch_grad = _torch_grad(phi_np)
    if torch_grad is not None:
        columns["torch"] = torch_grad
    else:
        notes["torch"] = "skipped: PyTorch is not installed"

    # Same answer (away from kinks) before timing anything.
    g_ours, g_auto = np.asarray(grad(phi)), np.asarray(autodiff(phi))
    scale = max(float(np.abs(g_auto).max()), 1e-30)
    mismatch = float(np.abs(g_ours - g_auto).max()) / scale
    if torch_grad is not None:
        g_torch = torch_grad().numpy()
        mismatch = max(mismatch, float(np.abs(g_torch - g_auto).max()) / scale)

    times = measure(columns, reps, target_s)
    t = {name: v["median_s"] for name, v in times.items()}
    t["matmul_floor"] = t["gram"] + t["product"]
    ratios = {
        "autodiff/grad": t["autodiff"] / t["grad"],
        "grad/matmul_floor": t["grad"] / t["matmul_floor"],
        "grad/memory_floor": t["grad"] / t["memory"],
    }
    if "transform" in t:
        ratios["autodiff/transform"] = t["autodiff"] / t["transform"]
        ratios["transform/grad"] = t["transform"] / t["grad"]
    if "torch" in t:
        ratios["torch/grad"] = t["torch"] / t["grad"]

    layout = jop._layout.make_layout(3, 0, -1)
    phi_bytes = phi.nbytes
    gram_bytes = m * n * n * 4
    memory_report: dict[str, Any] = {
        "phi_bytes": phi_bytes,
        "gram_bytes": gram_bytes,
        "grad_temp_bytes": _temp_bytes(grad, phi),
        "autodiff_temp_bytes": _temp_bytes(autodiff, phi),
    }
    if transform is not None:
        memory_report["transform_temp_bytes"] = _temp_bytes(transform, zeros, state, params)
    for key in ("grad", "autodiff", "transform"):
        temp = memory_report.get(f"{key}_temp_bytes")
        if temp is not None:
            memory_report[f"{key}_temp_over_phi"] = temp / phi_bytes
            # The budget: one phi-sized buffer beyond the output, plus the Gram.
            memory_report[f"{key}_within_budget"] = temp <= phi_bytes + gram_bytes
    return {
        "shape": list(shape),
        "formulation": {
            which: _contract.choose(layout, shape, jnp.float32, HIGHEST, which)
            for which in ("gram", "apply")
        },
        "max_relative_difference": mismatch,
        "times": times,
        "matmul_floor_s": t["matmul_floor"],
        "ratios": ratios,
        "memory": memory_report,
        "notes": notes,
    }


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'(l, m, n)':>18} {'gram/apply':>18} {'grad ms':>9} {'auto/grad':>9} "
        f"{'grad/mm':>8} {'grad/mem':>8} {'torch/grad':>10} {'tx/grad':>8} {'temp/phi':>8}"
    )
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in results:
        q = r["ratios"]
        form = f"{r['formulation']['gram']}/{r['formulation']['apply']}"
        temp = r["memory"].get("grad_temp_over_phi")
        lines.append(
            f"{tuple(r['shape'])!s:>18} {form:>18} "
            f"{r['times']['grad']['median_s'] * 1e3:9.3f} {q['autodiff/grad']:9.2f} "
            f"{q['grad/matmul_floor']:8.2f} {q['grad/memory_floor']:8.1f} "
            f"{q.get('torch/grad', nan):10.2f} {q.get('transform/grad', nan):8.2f} "
            f"{nan if temp is None else temp:8.2f}"
        )
    speedups = [r["ratios"]["autodiff/grad"] for r in results]
    lines.append("-" * len(head))
    lines.append(
        f"autodiff/grad: geometric mean {statistics.geometric_mean(speedups):.2f}x, "
        f"min {min(speedups):.2f}x"
    )
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]]) -> str:
    """The tables of docs/performance.md: ratios, then milliseconds and memory."""
    nan = float("nan")
    rows = [
        "| (l, m, n) | Gram / product | autodiff / grad | grad / matmul floor "
        "| grad / memory floor | torch / grad | transform / grad |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        q = r["ratios"]
        rows.append(
            f"| {tuple(r['shape'])} | {r['formulation']['gram']} / {r['formulation']['apply']} "
            f"| {q['autodiff/grad']:.2f} | {q['grad/matmul_floor']:.2f} "
            f"| {q['grad/memory_floor']:.1f} | {q.get('torch/grad', nan):.2f} "
            f"| {q.get('transform/grad', nan):.2f} |"
        )
    speedups = [r["ratios"]["autodiff/grad"] for r in results]
    rows.append(
        f"\nGeometric mean of autodiff / grad: **{statistics.geometric_mean(speedups):.2f}x** "
        f"(min {min(speedups):.2f}x).\n"
    )
    rows += [
        "| (l, m, n) | grad | transform | autodiff | Gram + product | memory pass | torch "
        "| grad temp / phi | autodiff temp / phi | budget (phi + Gram) / phi |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def ms(r: dict[str, Any], key: str) -> str:
        t = r["times"].get(key)
        return "" if t is None else f"{t['median_s'] * 1e3:.3f}"

    for r in results:
        mem = r["memory"]
        budget = (mem["phi_bytes"] + mem["gram_bytes"]) / mem["phi_bytes"]
        rows.append(
            f"| {tuple(r['shape'])} | {ms(r, 'grad')} | {ms(r, 'transform')} "
            f"| {ms(r, 'autodiff')} | {r['matmul_floor_s'] * 1e3:.3f} | {ms(r, 'memory')} "
            f"| {ms(r, 'torch')} | {mem.get('grad_temp_over_phi', nan):.2f} "
            f"| {mem.get('autodiff_temp_over_phi', nan):.2f} | {budget:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small shapes, 1 rep")
    parser.add_argument("--reps", type=int, default=15, help="repetitions (default 15)")
    parser.add_argument(
        "--only", default="", help="comma-separated indices into the regime list, e.g. 0,3"
    )
    parser.add_argument("--out", default=None, help="JSON path ('' for none)")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    args = parser.parse_args(argv)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    regimes = REGIMES
    if args.only:
        regimes = [REGIMES[int(i)] for i in args.only.split(",")]
    if args.quick:
        # The same n, with l and m cut down so that every regime runs in well under
        # a second: it checks the script, not the machine.
        regimes = [(min(l, 64), max(1, min(m, 4096 // max(l, 1))), n) for l, m, n in regimes]
        regimes = [(l, m, min(n, 64)) for l, m, n in regimes]

    results = []
    for shape in regimes:
        heavy = math.prod(shape) * shape[-1] > 2**32  # (4096, 1, 4096): seconds a call
        reps = 1 if args.quick else (max(3, args.reps // 4) if heavy else args.reps)
        target = 0.0 if args.quick else (0.0 if heavy else 0.02)
        results.append(run_regime(shape, reps, target))
        print(f"done {shape}", file=sys.stderr, flush=True)

    print(table(results))
    if args.markdown:
        print(markdown(results))
    for r in results:
        for note in r["notes"].values():
            print(f"{tuple(r['shape'])}: {note}")
    report = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "beta": BETA,
        "results": results,
    }
    report["machine"]["date_utc"] = started
    report["machine"]["loadavg_at_start"] = load_at_start
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out = args.out
    if out is None:
        suffix = "_quick" if args.quick else ""
        out = str(Path(__file__).parent / "results" / f"grad_{jax.default_backend()}{suffix}.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
