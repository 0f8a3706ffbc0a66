"""What every benchmark shares: the interleaved timer, the command line, the report.

* :func:`interleaved_medians` (and :func:`interleaved_samples`, its raw samples): every
  function is called once per round, in an order that reverses every other round, so
  that drift in the machine's load hits every column alike; each call is blocked on
  (``jax.block_until_ready``) and timed with ``time.perf_counter``.
* :func:`parser`: the common flags ``--quick``, ``--reps``, ``--markdown``, ``--json``.
* :func:`markdown_table`, :func:`geometric_mean`: the tables of docs/performance.md.
* :func:`write_report`: the JSON, with the machine record (:func:`machine`) under
  ``"machine"``.

A benchmark imports it as ``from benchmarks import _harness`` after putting the
repository root first on ``sys.path`` (so that it also benchmarks this checkout's
package, not whichever copy is installed).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from benchmarks._machine import machine

__all__ = [
    "geometric_mean",
    "interleaved_medians",
    "interleaved_samples",
    "machine",
    "markdown_table",
    "parser",
    "write_report",
]


def interleaved_samples(
    fns: Mapping[str, Callable[[], Any]], *, reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of every call of every function: ``warmup`` untimed calls each, then
    ``reps`` rounds, each calling every function once (in ``fns``' order on even
    rounds, reversed on odd ones), blocking on its result; the garbage collector is
    off while the rounds run."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            for name in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                jax.block_until_ready(fns[name]())
                samples[name].append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return samples


def interleaved_medians(
    fns: Mapping[str, Callable[[], Any]], *, reps: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of every function, timed as :func:`interleaved_samples`."""
    samples = interleaved_samples(fns, reps=reps, warmup=warmup)
    return {name: statistics.median(s) for name, s in samples.items()}


def digits(seed: int = 0) -> tuple[Any, ...]:
    """scikit-learn's bundled 8x8 digits (no download), scaled to [-0.5, 0.5], shuffled
    by ``seed`` and split 80/20: ``(x_train, y_train, x_test, y_test)``, int32 labels."""
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 - 0.5).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order].astype(np.int32)
    n = int(0.8 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes; add your own to it."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smoke run: its numbers mean nothing")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions")
    p.add_argument("--markdown", action="store_true", help="also print the Markdown tables")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    return p


def _cell(x: Any) -> str:
    return "" if x is None else str(x)


def _numeric(cell: str) -> bool:
    """A number, or a number followed by a note ("0.12 (0.30)")."""
    try:
        float(cell.split()[0])
    except (ValueError, IndexError):
        return False
    return True


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table of ``str(cell)`` (None: empty); a column whose cells all start
    with a number (or are empty) is right-aligned."""
    cells = [[_cell(x) for x in row] for row in rows]
    if any(len(row) != len(header) for row in cells):
        raise ValueError(f"every row needs {len(header)} cells: {cells}")
    align = [
        "--:" if cells and all(_numeric(row[j]) or not row[j] for row in cells) else "---"
        for j in range(len(header))
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def geometric_mean(values: Iterable[float]) -> float:
    """The geometric mean of positive numbers (of ratios: the mean speed-up)."""
    vals = [float(v) for v in values]
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise ValueError(f"need finite positive values, got {vals}")
    return statistics.geometric_mean(vals)


def write_report(path: str | None, results: Mapping[str, Any]) -> None:
    """Writes ``results`` as JSON to ``path`` (nothing when it is None or empty), with
    the machine record under ``"machine"`` (:func:`machine`, the date and the load
    average, updated by whatever ``results["machine"]`` already holds) and the command
    line under ``"command"`` unless given; creates the parent folders; prints
    ``wrote PATH``."""
    if not path:
        return
    info = {
        **machine(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **results.get("machine", {}),
    }
    report = {
        "machine": info,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **{k: v for k, v in results.items() if k != "machine"},
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
