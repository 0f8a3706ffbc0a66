"""What does each norm cost? The closed-form gradient per norm, as a ratio to ``"l1"``.

Every norm shares the Gram matrix and the one matmul with Phi; they differ in the small
n x n step: entrywise for ``"l1"``/``"squared"``, a reduction for ``"max"``, an ``eigh``
(O(n^3) per group) for the exact spectral norm, k matrix-vector products for
``spectral(iterations=k)``. For each (l, m, n) it times the jitted
``orthogonality_penalty_grad`` per norm, interleaved (``_harness.interleaved_medians``:
each repetition times every norm once, in an order that reverses every other
repetition), and prints medians.

Run from the repository root::

    .venv/bin/python benchmarks/bench_norms.py           # seconds
    .venv/bin/python benchmarks/bench_norms.py --quick   # a smoke run: small shapes, 2 reps
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Benchmark the checkout this script lives in, not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax_orthopenalty as jop
from benchmarks import _harness

NORMS = {
    "l1": "l1",
    "squared": "squared",
    "max": "max",
    "spectral": "spectral",
    "spectral(squared=True)": jop.spectral(squared=True),
    "spectral(iterations=4)": jop.spectral(iterations=4),
}
SHAPES = [(64, 256, 16), (256, 16, 128), (1024, 1, 512)]
QUICK_SHAPES = [(16, 8, 4), (32, 2, 16)]
REPEATS = 15


def run(shape: tuple[int, int, int], reps: int) -> dict[str, float]:
    """Median seconds of the jitted gradient per norm on one (l, m, n)."""
    rng = np.random.default_rng(0)
    phi = jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
    fns = {
        name: jax.jit(lambda p, norm=norm: jop.orthogonality_penalty_grad(p, 1e-3, norm=norm))
        for name, norm in NORMS.items()
    }
    return _harness.interleaved_medians(
        {name: lambda fn=fn: fn(phi) for name, fn in fns.items()}, reps=reps
    )


def main(argv: list[str] | None = None) -> int:
    args = _harness.parser(__doc__.split("\n\n")[0]).parse_args(argv)
    reps = args.reps or (2 if args.quick else REPEATS)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; median ms (ratio to l1)")
    results: list[dict[str, Any]] = []
    for shape in shapes:
        seconds = run(shape, reps)
        base = seconds["l1"]
        cells = [f"{name} {1e3 * t:.2f} ({t / base:.1f}x)" for name, t in seconds.items()]
        print(f"(l, m, n) = {shape}: " + " | ".join(cells))
        results.append({"shape": list(shape), "seconds": seconds})
    if args.markdown:
        others = [name for name in NORMS if name != "l1"]
        header = ["(l, m, n)", "l1 ms", *(f"{name} / l1" for name in others)]
        rows = [
            [
                str(tuple(r["shape"])),
                f"{1e3 * r['seconds']['l1']:.3f}",
                *(f"{r['seconds'][name] / r['seconds']['l1']:.2f}" for name in others),
            ]
            for r in results
        ]
        print(_harness.markdown_table(header, rows))
    _harness.write_report(args.json, {"quick": args.quick, "reps": reps, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
