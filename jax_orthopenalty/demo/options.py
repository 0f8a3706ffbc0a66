"""The demo's command line: the options, their checks and their defaults."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

DEFAULT_OUTPUT = "orthopenalty_demo.png"
SUBGRADIENTS = ("zero", "positive", "negative", "deadzone")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jax_orthopenalty",
        description=(
            "The gradient of beta * sum_i |Phi_i^T Phi_i - I| with respect to Phi, checked "
            "against autodiff and finite differences, then used to learn orthonormal bases "
            "of m subspaces with optax.chain(add_orthogonality_penalty(beta), adam)."
        ),
        epilog="Example: python -m jax_orthopenalty --shape 32 8 4 --steps 1000 --beta 0.05",
    )
    parser.add_argument(
        "--shape",
        nargs=3,
        type=_positive_int,
        default=(16, 8, 4),
        metavar=("L", "M", "N"),
        help="Phi's shape (l, m, n): m groups of n vectors in R^l, n <= l (default: 16 8 4)",
    )
    parser.add_argument(
        "--beta",
        type=_nonnegative_float,
        default=0.1,
        help="the penalty strength beta (default: 0.1)",
    )
    _add_training_arguments(parser)
    _add_output_arguments(parser)
    return parser


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the training runs."""
    parser.add_argument(
        "--steps", type=_positive_int, default=600, help="training steps (default: 600)"
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=3e-2,
        help="Adam's peak learning rate, cosine-decayed to 1%% (default: 0.03)",
    )
    parser.add_argument(
        "--subgradient",
        choices=SUBGRADIENTS,
        default="zero",
        help="the kink convention of the main run: sign(0) = 0 (zero), +1 (positive, what "
        "jax.grad(abs) does), -1 (negative), or a band |x| <= --tol treated as the kink "
        "(deadzone) (default: zero)",
    )
    parser.add_argument(
        "--tol",
        type=_positive_float,
        default=1e-3,
        help="the deadzone's half-width (default: 0.001)",
    )
    parser.add_argument(
        "--samples",
        type=_positive_int,
        default=256,
        help="data points per group (default: 256)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the random seed (default: 0)")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the plot goes, and what is compared."""
    parser.add_argument(
        "--output",
        "-o",
        default=DEFAULT_OUTPUT,
        help=f"where to write the PNG plot (default: ./{DEFAULT_OUTPUT})",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="train only with --subgradient, not with every convention",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed options; exits with status 2 and a usage message on bad ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    l, _, n = args.shape
    if n > l:
        parser.error(
            f"--shape {' '.join(map(str, args.shape))}: n = {n} orthonormal vectors do not fit "
            f"in R^l with l = {l}; use n <= l"
        )
    if not args.no_plot:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            parser.error(f"--output {args.output}: the directory {parent} does not exist")
    return args
