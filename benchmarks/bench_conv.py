"""How fast is the conv operator penalty's gradient? Ratios measured in one run.

Two measurements, both on HWIO float32 kernels, under ``jax.jit``:

* ``grad``: on ResNet-like kernels, ``jax.grad`` of
  :func:`jax_orthopenalty._conv.conv_orthogonality_penalty` (the closed-form
  ``custom_vjp``: the autocorrelation forward, one conv backward) against ``jax.grad``
  of the plain expression, autodiff of ``|Conv(K, K, S, P) - I_r0|`` summed (OCNN's;
  for a kernel with more outputs than inputs times S^d, the same expression on the
  kernel with its two channel axes swapped, the columns penalty this library computes).
* ``step``: one training step of a small CNN (three 3x3 convs and a dense head on
  16 x 16 x 3 inputs, batch 64, ``optax.adam``) with no penalty, with the kernel
  penalty (``jop.add_orthogonality_penalty`` on the flattened kernels,
  ``OrthoDims(vector_axis=(0, 1, 2), column_axis=3)``) and with the operator penalty
  (``conv_pull`` added to the gradient inside the step), on the second and third conv
  (OCNN leaves the first, wide on RGB input, alone).

The sides of each comparison are timed with ``_harness.interleaved_medians`` (each
repetition times each once, in an order that reverses every other repetition); the
table reports medians and their ratios, and the geometric mean of the grad ratios.
``--reps`` is an upper bound: a comparison whose one round takes long (autodiff of
the 256-channel kernel takes seconds a call on CPU) gets fewer, at least 5, so that
it stays within about a minute.

Run from the repository root::

    .venv/bin/python benchmarks/bench_conv.py               # the table
    .venv/bin/python benchmarks/bench_conv.py --quick       # a smoke run, seconds
    .venv/bin/python benchmarks/bench_conv.py --markdown --json conv.json
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from functools import partial
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
from jax_orthopenalty._conv import conv_orthogonality_penalty, conv_pull
from jax_orthopenalty._conv_layout import make_conv_layout
from jax_orthopenalty._rules import make_rule

HIGHEST = jax.lax.Precision.HIGHEST
SHAPES = [  # name, HWIO shape, stride
    ("3x3x64x64 s1", (3, 3, 64, 64), 1),
    ("3x3x64x128 s2", (3, 3, 64, 128), 2),
    ("3x3x256x256 s1", (3, 3, 256, 256), 1),
    ("1x1x64x256 s1", (1, 1, 64, 256), 1),
    ("1x1x256x64 s1", (1, 1, 256, 64), 1),
]
QUICK_SHAPES = [("3x3x16x16 s1", (3, 3, 16, 16), 1), ("3x3x16x32 s2", (3, 3, 16, 32), 2)]
BETA = 1e-3


def plain_penalty(kernel: jax.Array, stride: int) -> jax.Array:
    """|Conv(K, K, S, floor((k-1)/S) S) - I_r0| summed, written out (OCNN)."""
    h, w, c, m = kernel.shape
    k = jnp.transpose(kernel, (3, 2, 0, 1))  # OIHW
    if m > c * stride * stride:  # columns: the same on the channel-swapped kernel
        assert stride == 1, "the plain columns expression is written for stride 1"
        k, m = jnp.swapaxes(k, 0, 1), c
    pads = [((n - 1) // stride * stride,) * 2 for n in (h, w)]
    out = jax.lax.conv_general_dilated(k, k, (stride, stride), pads, precision=HIGHEST)
    eye = jnp.zeros_like(out).at[:, :, out.shape[2] // 2, out.shape[3] // 2].set(jnp.eye(m))
    return jnp.sum(jnp.abs(out - eye))


def interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, budget_s: float = 60.0
) -> dict[str, Any]:
    """Median seconds per call of each thunk (``_harness.interleaved_medians``) and the
    number of repetitions: at most ``reps``, fewer (but at least 5) where one round
    of all the thunks, timed once after a warm-up call, would take the ``budget_s``
    seconds past."""
    first = _harness.interleaved_samples(fns, reps=1, warmup=1)  # compiles, then one round
    round_s = sum(s[0] for s in first.values())
    reps = max(5, min(reps, int(budget_s / max(round_s, 1e-9))))
    return {**_harness.interleaved_medians(fns, reps=reps, warmup=0), "reps": reps}


def bench_grad(shapes: list[tuple[str, tuple[int, ...], int]], reps: int) -> list[dict[str, Any]]:
    rows = []
    for name, shape, stride in shapes:
        kernel = jax.random.normal(jax.random.key(0), shape) / math.sqrt(math.prod(shape[:3]))
        closed = jax.jit(jax.grad(lambda k, s=stride: conv_orthogonality_penalty(k, stride=s)))
        autodiff = jax.jit(jax.grad(lambda k, s=stride: plain_penalty(k, s)))
        np.testing.assert_allclose(closed(kernel), autodiff(kernel), rtol=1e-3, atol=1e-3)
        t = interleaved(
            {"closed": partial(closed, kernel), "autodiff": partial(autodiff, kernel)}, reps
        )
        rows.append(
            {"shape": name, "closed_ms": 1e3 * t["closed"], "autodiff_ms": 1e3 * t["autodiff"],
             "ratio": t["autodiff"] / t["closed"], "reps": t["reps"]}
        )  # fmt: skip
    return rows


# --------------------------------------------------------------------------- training step

CONVS = {"conv1": ((3, 3, 3, 32), 1), "conv2": ((3, 3, 32, 64), 2), "conv3": ((3, 3, 64, 64), 1)}
PENALISED = ("conv2", "conv3")


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    keys = jax.random.split(key, len(CONVS) + 1)
    params = {
        name: jax.random.normal(k, shape) / math.sqrt(math.prod(shape[:3]))
        for k, (name, (shape, _)) in zip(keys, CONVS.items(), strict=False)
    }
    params["dense"] = jax.random.normal(keys[-1], (8 * 8 * 64, 10)) / math.sqrt(8 * 8 * 64)
    return params


def loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    for name, (_, stride) in CONVS.items():
        x = jax.lax.conv_general_dilated(
            x, params[name], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x)
    logits = x.reshape(x.shape[0], -1) @ params["dense"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps() -> dict[str, Callable[..., Any]]:
    adam = optax.adam(1e-3)
    dims = {name: None for name in (*CONVS, "dense")}
    dims.update({name: jop.OrthoDims(vector_axis=(0, 1, 2), column_axis=3) for name in PENALISED})
    kernel_tx = optax.chain(jop.add_orthogonality_penalty(BETA, dimension_numbers=dims), adam)
    rule = make_rule("l1", "zero")

    def plain(tx: optax.GradientTransformation, operator: bool) -> Callable[..., Any]:
        @jax.jit
        def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> Any:
            grads = jax.grad(loss)(params, x, y)
            if operator:
                for name in PENALISED:
                    layout = make_conv_layout(4, "HWIO", CONVS[name][1], 1, 1)
                    pull, _ = conv_pull(params[name], BETA, layout, rule, HIGHEST)
                    grads[name] = grads[name] + pull
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step

    return {
        "none": (plain(adam, False), adam),
        "kernel": (plain(kernel_tx, False), kernel_tx),
        "operator": (plain(adam, True), adam),
    }


def bench_step(reps: int) -> dict[str, float]:
    params = init_params(jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (64, 16, 16, 3))
    y = jax.random.randint(jax.random.key(3), (64,), 0, 10)
    fns = {}
    for name, (step, tx) in make_steps().items():
        state = tx.init(params)
        fns[name] = lambda step=step, state=state: step(params, state, x, y)
    times = interleaved(fns, reps)
    return {name: 1e3 * times[name] for name in fns}


# --------------------------------------------------------------------------- report


def table(grad_rows: list[dict[str, Any]], step: dict[str, float]) -> str:
    geo = _harness.geometric_mean(r["ratio"] for r in grad_rows)
    grad = _harness.markdown_table(
        ["kernel (HWIO), stride", "closed form (ms)", "autodiff (ms)", "autodiff / closed"],
        [
            *(
                [
                    r["shape"],
                    f"{r['closed_ms']:.3f}",
                    f"{r['autodiff_ms']:.3f}",
                    f"{r['ratio']:.2f}x",
                ]
                for r in grad_rows
            ),
            ["geometric mean", None, None, f"{geo:.2f}x"],
        ],
    )
    steps = _harness.markdown_table(
        ["training step", "ms", "/ no penalty"],
        [[k, f"{v:.2f}", f"{v / step['none']:.2f}x"] for k, v in step.items()],
    )
    return f"{grad}\n\n{steps}"


def main(argv: list[str] | None = None) -> int:
    args = _harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    reps = args.reps or (5 if args.quick else 50)
    load_start = list(os.getloadavg())
    grad_rows = bench_grad(QUICK_SHAPES if args.quick else SHAPES, reps)
    step = bench_step(max(3, reps // 5) if args.quick else reps)
    if not args.markdown:
        machine = _harness.machine()
        print(f"machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}, "
              f"backend {machine['backend']}, reps {reps}, load {os.getloadavg()}")  # fmt: skip
    print(table(grad_rows, step))
    results = {
        "machine": {"loadavg_at_start": load_start},
        "quick": args.quick,
        "reps": reps,
        "grad": grad_rows,
        "step_ms": step,
    }
    _harness.write_report(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
