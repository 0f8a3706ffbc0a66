"""What does each norm cost? The closed-form gradient per norm, as a ratio to ``"l1"``.

Every norm shares the Gram matrix and the one matmul with Phi; they differ in the small
n x n step: entrywise for ``"l1"``/``"squared"``, a reduction for ``"max"``, an ``eigh``
(O(n^3) per group) for the exact spectral norm, k matrix-vector products for
``spectral(iterations=k)``. For each (l, m, n) it times the jitted
``orthogonality_penalty_grad`` per norm, interleaved (each repetition times every
norm once, in an order that reverses every other repetition), and prints medians.

Run from the repository root::

    .venv/bin/python benchmarks/bench_norms.py           # seconds
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_orthopenalty as jop

NORMS = {
    "l1": "l1",
    "squared": "squared",
    "max": "max",
    "spectral": "spectral",
    "spectral(squared=True)": jop.spectral(squared=True),
    "spectral(iterations=4)": jop.spectral(iterations=4),
}
SHAPES = [(64, 256, 16), (256, 16, 128), (1024, 1, 512)]
REPEATS = 15


def _timed(fn, phi):
    start = time.perf_counter()
    fn(phi).block_until_ready()
    return time.perf_counter() - start


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; median ms (ratio to l1)")
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        phi = jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
        fns = {
            name: jax.jit(lambda p, norm=norm: jop.orthogonality_penalty_grad(p, 1e-3, norm=norm))
            for name, norm in NORMS.items()
        }
        for fn in fns.values():
            fn(phi).block_until_ready()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for rep in range(REPEATS):
            order = list(fns) if rep % 2 == 0 else list(reversed(fns))
            for name in order:
                times[name].append(_timed(fns[name], phi))
        base = statistics.median(times["l1"])
        cells = [
            f"{name} {1e3 * statistics.median(t):.2f} ({statistics.median(t) / base:.1f}x)"
            for name, t in times.items()
        ]
        print(f"(l, m, n) = {shape}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
