"""``main``: the demo's parts in order, as ``python -m jax_orthopenalty`` runs them."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from . import report
from .gradient import check_gradient, checked_beta
from .options import parse_args
from .plot import MISSING_MATPLOTLIB, write_plot
from .problem import make_problem
from .training import conventions, kink_gradients, train


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; ``argv`` defaults to ``sys.argv[1:]``. Returns the exit status."""
    args = parse_args(argv)
    shape = tuple(args.shape)
    start = time.perf_counter()
    report.banner()

    # 1. The gradient, checked against autodiff and finite differences.
    report.gradient_heading(shape, checked_beta(args.beta))
    report.gradient(check_gradient(shape, args.beta, args.seed))

    # 2. Training with the main run's convention, its progress printed as it goes.
    runs = conventions(args.subgradient, args.tol, compare=not args.no_compare)
    main_run = next(c for c in runs if c.penalised)
    problem = make_problem(shape, args.samples, args.seed)
    report.training_heading(shape, args.beta, main_run)
    on_step = report.step_table(args.steps)
    first = train(main_run, problem, beta=args.beta, lr=args.lr, steps=args.steps, on_step=on_step)
    report.training_summary(first)
    histories = {main_run.label: first}

    # 3. Every other convention, and the gradient each gives at the kink.
    if len(runs) > 1:
        report.conventions_heading()
        kinks = kink_gradients(shape, args.beta, runs)
        for conv in runs:
            if conv.label not in histories:
                histories[conv.label] = train(
                    conv, problem, beta=args.beta, lr=args.lr, steps=args.steps
                )
        report.conventions([histories[c.label] for c in runs], kinks)

    # 4. The plot.
    if not args.no_plot:
        report.heading("4. Plot")
        title = (
            f"jax_orthopenalty demo: (l, m, n) = {shape}, beta = {args.beta:g}, "
            f"Adam lr {args.lr:g}, seed {args.seed}"
        )
        if write_plot(args.output, [histories[c.label] for c in runs], title):
            report.say(f"  wrote the plot to {os.path.abspath(args.output)}")
        else:
            report.say(f"  note: {MISSING_MATPLOTLIB}")
    report.say()
    report.say(f"done in {time.perf_counter() - start:.1f} s")
    return 0
