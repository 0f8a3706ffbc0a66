"""How fast is the gradient of the orthogonality penalty? Ratios measured in one run.

For every regime (l, m, n), on the seed's (l, m, n) layout, it times the gradient in
two forms,

* ``grad``: ``jax.grad`` of :func:`jax_orthopenalty.orthogonality_penalty` (the
  closed-form ``custom_vjp`` backward pass);
* ``transform``: ``jop.add_orthogonality_penalty(beta).update(zeros, state, params)``,
  jitted;

in the other layouts and under ``jax.vmap``,

* ``vmap``: ``jax.vmap`` over the group axis m (``in_axes=1``) of the gradient of one
  ``(l, n)`` group, and likewise ``vmap_value`` (the penalty) and ``vmap_closed``
  (:func:`jax_orthopenalty.orthogonality_penalty_grad`) against their direct calls
  ``value`` and ``closed``;
* ``groups_first``: the gradient of the same tensor stored groups-first, ``(m, l, n)``
  with ``vector_axis=1, column_axis=2``, and ``groups_first_vmap``, ``jax.vmap`` over
  its leading axis;

against four references,

* ``autodiff``: ``jax.grad`` of the plain ``beta * abs(einsum(...) - eye).sum()``;
* ``matmul floor``: the Gram einsum plus one product einsum, each jitted on its own
  (the sum of their medians);
* ``memory floor``: one jitted elementwise pass over phi (``phi * 2``);
* ``torch``: where PyTorch is installed, the gradient PyTorch users write by hand
  (BigGAN style, ``2 * beta * W @ sign(W^T W - I)``, ``torch.bmm`` over the groups of
  the same (l, m, n) tensor, the result made contiguous in that layout), under
  ``torch.no_grad`` on the same CPU, with ``OMP_WAIT_POLICY=PASSIVE`` (see below).

The columns are interleaved (``_harness.interleaved_samples``): every repetition times
each of them once, in an order that reverses on every other repetition, and the table
reports medians. It also
reports what XLA's compiled executable allocates beyond its arguments and outputs
(``memory_analysis().temp_size_in_bytes``), in units of phi's size, for the gradient
single- and double-sided (``double_sided=True``) with ``norm="l1"`` and ``"squared"``;
the GFLOP/s of the gradient and of PyTorch's (4 l m n^2 flops: the Gram and one
product), and those of one large ``jnp.matmul`` (and ``torch.matmul``) on the same
machine, for scale.

Run from the repository root::

    .venv/bin/python benchmarks/bench_grad.py            # the table, a few minutes
    .venv/bin/python benchmarks/bench_grad.py --quick    # a smoke run, seconds

It prints the table and writes JSON (``--json`` or ``--out``, default
``benchmarks/results/grad_<platform>.json``; ``--out ''`` writes none).
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Benchmark the checkout this script lives in, not whichever copy is installed (a
# script's own folder, not the working directory, heads sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax_orthopenalty as jop
from benchmarks import _harness
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
MATMUL_SIZE = 2048  # the reference matmul: (2048, 2048) @ (2048, 2048), float32

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


def measure(
    columns: dict[str, Callable[[], Any]], reps: int, target_s: float
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each column, the columns interleaved.

    Every column is warmed up and timed once on its own, then called ``inner`` times
    per sample so that a sample lasts about ``target_s``; the samples are
    :func:`_harness.interleaved_samples`'s (repetition ``r`` visits the columns in
    order, reversed when ``r`` is odd, so that drift in the machine's load hits every
    column alike).
    """
    inner = {}
    for name, fn in columns.items():
        once = _harness.interleaved_medians({name: fn}, reps=1, warmup=1)[name]
        inner[name] = max(1, min(50, math.ceil(target_s / max(once, 1e-7))))

    def repeated(fn: Callable[[], Any], k: int) -> Callable[[], Any]:
        def call() -> Any:
            out = None
            for _ in range(k):
                out = fn()
            return out  # the calls run in order: the last one done, all are

        return call

    samples = _harness.interleaved_samples(
        {name: repeated(fn, inner[name]) for name, fn in columns.items()}, reps=reps, warmup=0
    )
    return {
        name: {
            "median_s": statistics.median(s) / inner[name],
            "min_s": min(s) / inner[name],
            "max_s": max(s) / inner[name],
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


def _double_sided_temp(phi: jax.Array) -> dict[str, dict[str, float | None]]:
    """Compiled temporary memory of the gradient, single- and double-sided, over phi."""
    out: dict[str, dict[str, float | None]] = {}
    for norm in ("l1", "squared"):
        out[norm] = {}
        for name, double in (("single", False), ("double", True)):
            fn = jax.jit(
                jax.grad(
                    lambda p, norm=norm, double=double: jop.orthogonality_penalty(
                        p, BETA, norm=norm, double_sided=double
                    )
                )
            )
            temp = _temp_bytes(fn, phi)
            out[norm][name] = None if temp is None else temp / phi.nbytes
    return out


def matmul_reference(reps: int, target_s: float, size: int = MATMUL_SIZE) -> dict[str, Any]:
    """GFLOP/s of one large float32 matmul: ``jnp.matmul`` (and ``torch.matmul``)."""
    rng = np.random.default_rng(1)
    a_np = rng.standard_normal((size, size)).astype(np.float32)
    b_np = rng.standard_normal((size, size)).astype(np.float32)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=HIGHEST))
    columns: dict[str, Callable[[], Any]] = {"jnp.matmul": lambda: mm(a, b)}
    if torch is not None:
        ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
        columns["torch.matmul"] = lambda: torch.matmul(ta, tb)
    times = measure(columns, reps, target_s)
    flops = 2 * size**3
    return {
        "shape": [size, size, size],
        "times": times,
        "gflops": {k: flops / v["median_s"] / 1e9 for k, v in times.items()},
    }


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

    # vmap over the groups, and the groups-first layout (m, l, n).
    value = jax.jit(lambda p: jop.orthogonality_penalty(p, BETA))
    closed = jax.jit(lambda p: jop.orthogonality_penalty_grad(p, BETA))
    one_grad = jax.grad(lambda p: jop.orthogonality_penalty(p, BETA))
    vmap_grad = jax.jit(jax.vmap(one_grad, in_axes=1, out_axes=1))
    vmap_value = jax.jit(jax.vmap(lambda p: jop.orthogonality_penalty(p, BETA), in_axes=1))
    vmap_closed = jax.jit(
        jax.vmap(lambda p: jop.orthogonality_penalty_grad(p, BETA), in_axes=1, out_axes=1)
    )
    first_np = np.ascontiguousarray(np.transpose(phi_np, (1, 0, 2)))
    first = jnp.asarray(first_np)
    first_grad = jax.jit(
        jax.grad(lambda p: jop.orthogonality_penalty(p, BETA, vector_axis=1, column_axis=2))
    )
    first_vmap = jax.jit(jax.vmap(one_grad))

    columns: dict[str, Callable[[], Any]] = {
        "grad": lambda: grad(phi),
        "autodiff": lambda: autodiff(phi),
        "gram": lambda: gram(phi),
        "product": lambda: product(phi, w),
        "memory": lambda: memory(phi),
        "vmap": lambda: vmap_grad(phi),
        "value": lambda: value(phi),
        "vmap_value": lambda: vmap_value(phi),
        "closed": lambda: closed(phi),
        "vmap_closed": lambda: vmap_closed(phi),
        "groups_first": lambda: first_grad(first),
        "groups_first_vmap": lambda: first_vmap(first),
    }
    notes: dict[str, str] = {}
    tx = jop.add_orthogonality_penalty(BETA)
    params = {"phi": phi}
    state = tx.init(params)
    zeros = {"phi": jnp.zeros_like(phi)}
    transform = jax.jit(tx.update)
    columns["transform"] = lambda: transform(zeros, state, params)[0]
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
    # vmap and the groups-first layout: the same gradient up to the order of summation.
    vmap_mismatch = (
        max(
            float(np.abs(np.asarray(vmap_grad(phi)) - g_ours).max()),
            float(np.abs(np.asarray(vmap_closed(phi)) - g_ours).max()),
            float(np.abs(np.transpose(np.asarray(first_grad(first)), (1, 0, 2)) - g_ours).max()),
            float(np.abs(np.transpose(np.asarray(first_vmap(first)), (1, 0, 2)) - g_ours).max()),
        )
        / scale
    )

    times = measure(columns, reps, target_s)
    t = {name: v["median_s"] for name, v in times.items()}
    t["matmul_floor"] = t["gram"] + t["product"]
    ratios = {
        "autodiff/grad": t["autodiff"] / t["grad"],
        "grad/matmul_floor": t["grad"] / t["matmul_floor"],
        "grad/memory_floor": t["grad"] / t["memory"],
    }
    ratios["autodiff/transform"] = t["autodiff"] / t["transform"]
    ratios["transform/grad"] = t["transform"] / t["grad"]
    if "torch" in t:
        ratios["torch/grad"] = t["torch"] / t["grad"]
    ratios["vmap/grad"] = t["vmap"] / t["grad"]
    ratios["vmap_value/value"] = t["vmap_value"] / t["value"]
    ratios["vmap_closed/closed"] = t["vmap_closed"] / t["closed"]
    ratios["groups_first_vmap/groups_first"] = t["groups_first_vmap"] / t["groups_first"]
    ratios["groups_first/grad"] = t["groups_first"] / t["grad"]
    ratios["vmap/memory_floor"] = t["vmap"] / t["memory"]
    ratios["groups_first/memory_floor"] = t["groups_first"] / t["memory"]
    ratios["groups_first_vmap/memory_floor"] = t["groups_first_vmap"] / t["memory"]
    flops = 4 * l * m * n * n  # the Gram (2 l m n^2) and one product (2 l m n^2)
    gflops = {"grad": flops / t["grad"] / 1e9}
    if "torch" in t:
        gflops["torch"] = flops / t["torch"] / 1e9

    layout = jop._layout.make_layout(3, 0, -1)
    phi_bytes = phi.nbytes
    gram_bytes = m * n * n * 4
    memory_report: dict[str, Any] = {
        "phi_bytes": phi_bytes,
        "gram_bytes": gram_bytes,
        "grad_temp_bytes": _temp_bytes(grad, phi),
        "autodiff_temp_bytes": _temp_bytes(autodiff, phi),
        "transform_temp_bytes": _temp_bytes(transform, zeros, state, params),
    }
    for key in ("grad", "autodiff", "transform"):
        temp = memory_report.get(f"{key}_temp_bytes")
        if temp is not None:
            memory_report[f"{key}_temp_over_phi"] = temp / phi_bytes
            # The budget: one phi-sized buffer beyond the output, plus the Gram.
            memory_report[f"{key}_within_budget"] = temp <= phi_bytes + gram_bytes
    memory_report["double_sided_temp_over_phi"] = _double_sided_temp(phi)
    return {
        "shape": list(shape),
        "formulation": {
            which: _contract.choose(layout, shape, jnp.float32, HIGHEST, which)
            for which in ("gram", "apply")
        },
        "max_relative_difference": mismatch,
        "vmap_max_relative_difference": vmap_mismatch,
        "gflops": gflops,
        "times": times,
        "matmul_floor_s": t["matmul_floor"],
        "ratios": ratios,
        "memory": memory_report,
        "notes": notes,
    }


# --------------------------------------------------------------------------- report


def torch_record() -> dict[str, Any]:
    """PyTorch's version and threads for the machine record, where it is installed."""
    if torch is None:
        return {}
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'(l, m, n)':>18} {'gram/apply':>18} {'grad ms':>9} {'auto/grad':>9} "
        f"{'grad/mm':>8} {'grad/mem':>8} {'torch/grad':>10} {'tx/grad':>8} {'temp/phi':>8} "
        f"{'vmap/grad':>9} {'gf/mem':>7} {'gfvmap/gf':>9}"
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
            f"{nan if temp is None else temp:8.2f} {q['vmap/grad']:9.2f} "
            f"{q['groups_first/memory_floor']:7.1f} {q['groups_first_vmap/groups_first']:9.2f}"
        )
    speedups = [r["ratios"]["autodiff/grad"] for r in results]
    lines.append("-" * len(head))
    lines.append(
        f"autodiff/grad: geometric mean {_harness.geometric_mean(speedups):.2f}x, "
        f"min {min(speedups):.2f}x"
    )
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None or math.isnan(x) else format(x, spec)


def markdown(results: list[dict[str, Any]], reference: dict[str, Any] | None = None) -> str:
    """The tables of docs/performance.md: ratios, milliseconds and memory, vmap and
    layouts, GFLOP/s, double-sided memory."""
    nan = float("nan")

    def ms(r: dict[str, Any], key: str) -> str:
        t = r["times"].get(key)
        return "" if t is None else f"{t['median_s'] * 1e3:.3f}"

    def shape(r: dict[str, Any]) -> str:
        return str(tuple(r["shape"]))

    parts = []
    ratios_rows = []
    for r in results:
        q = r["ratios"]
        ratios_rows.append(
            [
                shape(r),
                f"{r['formulation']['gram']} / {r['formulation']['apply']}",
                f"{q['autodiff/grad']:.2f}",
                f"{q['grad/matmul_floor']:.2f}",
                f"{q['grad/memory_floor']:.1f}",
                f"{q.get('torch/grad', nan):.2f}",
                f"{q.get('transform/grad', nan):.2f}",
            ]
        )
    parts.append(
        _harness.markdown_table(
            [
                "(l, m, n)",
                "Gram / product",
                "autodiff / grad",
                "grad / matmul floor",
                "grad / memory floor",
                "torch / grad",
                "transform / grad",
            ],
            ratios_rows,
        )
    )
    speedups = [r["ratios"]["autodiff/grad"] for r in results]
    parts.append(
        f"Geometric mean of autodiff / grad: **{_harness.geometric_mean(speedups):.2f}x** "
        f"(min {min(speedups):.2f}x)."
    )
    time_rows = []
    for r in results:
        mem = r["memory"]
        budget = (mem["phi_bytes"] + mem["gram_bytes"]) / mem["phi_bytes"]
        time_rows.append(
            [
                shape(r),
                ms(r, "grad"),
                ms(r, "transform"),
                ms(r, "autodiff"),
                f"{r['matmul_floor_s'] * 1e3:.3f}",
                ms(r, "memory"),
                ms(r, "torch"),
                f"{mem.get('grad_temp_over_phi', nan):.2f}",
                f"{mem.get('autodiff_temp_over_phi', nan):.2f}",
                f"{budget:.2f}",
            ]
        )
    parts.append(
        _harness.markdown_table(
            [
                "(l, m, n)",
                "grad",
                "transform",
                "autodiff",
                "Gram + product",
                "memory pass",
                "torch",
                "grad temp / phi",
                "autodiff temp / phi",
                "budget (phi + Gram) / phi",
            ],
            time_rows,
        )
    )
    vmap_rows = []
    for r in results:
        q = r["ratios"]
        vmap_rows.append(
            [
                shape(r),
                ms(r, "grad"),
                f"{q['vmap/grad']:.2f}",
                f"{q['vmap_value/value']:.2f}",
                f"{q['vmap_closed/closed']:.2f}",
                ms(r, "groups_first"),
                f"{q['groups_first_vmap/groups_first']:.2f}",
                f"{q['grad/memory_floor']:.1f}",
                f"{q['vmap/memory_floor']:.1f}",
                f"{q['groups_first/memory_floor']:.1f}",
            ]
        )
    parts.append(
        _harness.markdown_table(
            [
                "(l, m, n)",
                "grad ms",
                "vmap / grad",
                "vmap / direct: value",
                "vmap / direct: closed form",
                "groups-first ms",
                "groups-first vmap / direct",
                "grad / memory floor",
                "vmap / memory floor",
                "groups-first / memory floor",
            ],
            vmap_rows,
        )
    )
    parts.append(
        _harness.markdown_table(
            ["(l, m, n)", "grad GFLOP/s", "torch GFLOP/s"],
            [
                [
                    shape(r),
                    _fmt(r.get("gflops", {}).get("grad"), ".0f"),
                    _fmt(r.get("gflops", {}).get("torch"), ".0f"),
                ]
                for r in results
            ],
        )
    )
    if reference is not None:
        size = reference["shape"][0]
        parts.append(
            f"One ({size}, {size}) @ ({size}, {size}) float32 matmul on the same machine: "
            + ", ".join(f"`{k}` {v:.0f} GFLOP/s" for k, v in reference["gflops"].items())
            + "."
        )
    double_rows = []
    for r in results:
        ds = r["memory"].get("double_sided_temp_over_phi", {})
        double_rows.append(
            [
                shape(r),
                *(
                    _fmt(ds.get(norm, {}).get(side), ".2f")
                    for norm in ("l1", "squared")
                    for side in ("single", "double")
                ),
            ]
        )
    parts.append(
        _harness.markdown_table(
            ["(l, m, n)", "l1", "l1 double-sided", "squared", "squared double-sided"],
            double_rows,
        )
    )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = _harness.parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default="", help="comma-separated indices into the regime list, e.g. 0,3"
    )
    parser.add_argument("--out", default=None, help="JSON path ('' for none); as --json")
    args = parser.parse_args(argv)
    reps_arg = args.reps or 15

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
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
        reps = 1 if args.quick else (max(3, reps_arg // 4) if heavy else reps_arg)
        target = 0.0 if args.quick else (0.0 if heavy else 0.02)
        results.append(run_regime(shape, reps, target))
        print(f"done {shape}", file=sys.stderr, flush=True)

    reference = matmul_reference(1 if args.quick else 7, 0.0 if args.quick else 0.05)
    print(table(results))
    print(
        "one large matmul, GFLOP/s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in reference["gflops"].items())
    )
    if args.markdown:
        print(markdown(results, reference))
    for r in results:
        for note in r["notes"].values():
            print(f"{tuple(r['shape'])}: {note}")
    out = args.json if args.json is not None else args.out
    if out is None:
        suffix = "_quick" if args.quick else ""
        out = str(Path(__file__).parent / "results" / f"grad_{jax.default_backend()}{suffix}.json")
    report = {
        "machine": {**torch_record(), "date_utc": started, "loadavg_at_start": load_at_start},
        "quick": args.quick,
        "beta": BETA,
        "matmul_reference": reference,
        "results": results,
    }
    _harness.write_report(out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
