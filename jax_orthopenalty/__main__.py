r"""The demo: ``python -m jax_orthopenalty``.

It answers the library's question on a real problem, in under a minute on a laptop CPU:

1. **The gradient.** On a random ``(l, m, n)`` tensor it prints the penalty
   :math:`L = \beta \sum_i \sum_{jk} |\Phi_i^\top\Phi_i - I|_{jk}`, the norm of its
   closed-form gradient :math:`2\beta\,\Phi_i G_i`, the derivative with respect to one
   :math:`l`-vector ``Phi[:, a, b]``, and their agreement with ``jax.grad`` of the plain
   expression and with float64 central finite differences.
2. **Training.** Group-wise subspace learning: each of ``m`` groups of synthetic data
   lies near its own ``n``-dimensional subspace of :math:`\mathbb{R}^l`. A linear
   autoencoder per group (decoder ``Phi[:, i, :]``, encoder ``enc[i]``) is trained on
   the reconstruction error with ``optax.chain(add_orthogonality_penalty(beta), adam)``.
   Reconstruction alone finds the subspace but not an orthonormal basis of it (any
   invertible change of basis between encoder and decoder fits equally well); the
   penalty picks the orthonormal one.
3. **Conventions.** The same training with each subgradient convention, and the
   gradient each one gives at an exactly orthonormal point (the kink).
4. **A plot** of the task loss and the orthogonality error over the steps, written to a
   PNG (matplotlib is optional: without it the plot is skipped with a note).

Run ``python -m jax_orthopenalty --help`` for the options.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_orthopenalty as jop

__all__ = ["main"]

DEFAULT_OUTPUT = "orthopenalty_demo.png"
SUBGRADIENTS = ("zero", "positive", "negative", "deadzone")


# --------------------------------------------------------------------------- options


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
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
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


# --------------------------------------------------------------------------- printing


def _say(text: str = "") -> None:
    print(text, flush=True)


def _heading(text: str) -> None:
    _say()
    _say(text)
    _say("-" * max(len(line) for line in text.splitlines()))


def _fmt_vec(v: np.ndarray, limit: int = 6) -> str:
    shown = ", ".join(f"{x:+.4f}" for x in v[:limit])
    return f"[{shown}{', ...' if v.size > limit else ''}]"


# --------------------------------------------------------------------------- 1. gradient


def _plain_penalty(phi: jax.Array, beta: float) -> jax.Array:
    """beta * sum_i sum_jk |Phi_i^T Phi_i - I|, written the obvious way, for autodiff."""
    phi_i = jnp.moveaxis(phi, 1, 0)  # (m, l, n)
    gram = jnp.einsum("mlj,mlk->mjk", phi_i, phi_i, precision="highest")
    return beta * jnp.sum(jnp.abs(gram - jnp.eye(phi.shape[-1], dtype=phi.dtype)[None]))


@functools.partial(jax.jit, static_argnums=(1,))
def _float32_checks(phi: jax.Array, beta: float) -> dict[str, Any]:
    """One compiled function, so the demo does not pay for many small compilations."""
    value, grad = jax.value_and_grad(jop.orthogonality_penalty)(phi, beta)
    closed = jop.orthogonality_penalty_grad(phi, beta)
    auto = jax.grad(_plain_penalty)(phi, beta)
    gram = jnp.einsum("lmj,lmk->mjk", phi, phi, precision="highest")
    scale = jnp.max(jnp.abs(grad))
    return {
        "value": value,
        "grad_norm": jnp.linalg.norm(grad),
        "kink_distance": jnp.min(jnp.abs(gram - jnp.eye(phi.shape[-1])[None])),
        "rel_auto": jnp.max(jnp.abs(grad - auto)) / scale,
        "rel_closed": jnp.max(jnp.abs(grad - closed)) / scale,
    }


@functools.partial(jax.jit, static_argnums=(1,))
def _float64_checks(phi: jax.Array, beta: float, directions: jax.Array) -> dict[str, jax.Array]:
    """Central finite differences along the l unit vectors of Phi[:, 0, 0] and 8 random
    directions, against the closed-form gradient; call it under ``jax.enable_x64``."""
    l = phi.shape[0]
    eps = 1e-6
    grad = jop.orthogonality_penalty_grad(phi, beta)
    basis = jnp.zeros((l, *phi.shape), phi.dtype)
    basis = basis.at[jnp.arange(l), jnp.arange(l), 0, 0].set(1)
    directions = jnp.concatenate([basis, directions])

    def central(v: jax.Array) -> jax.Array:
        up = jop.orthogonality_penalty(phi + eps * v, beta)
        down = jop.orthogonality_penalty(phi - eps * v, beta)
        return (up - down) / (2 * eps)

    fd = jax.vmap(central)(directions)
    exact = jnp.einsum("dlmn,lmn->d", directions, grad)
    return {
        "rel_fd": jnp.max(jnp.abs(fd - exact)) / jnp.max(jnp.abs(exact)),
        "vector": grad[:, 0, 0],
        "vector_fd": fd[:l],
    }


def check_gradient(shape: tuple[int, int, int], beta: float, seed: int) -> dict[str, float]:
    """Section 1: the closed-form gradient against autodiff and finite differences."""
    beta_shown = beta if beta > 0 else 1.0  # a zero gradient would check nothing
    rng = np.random.default_rng(seed)
    phi = (rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32)
    directions = rng.standard_normal((8, *shape))
    _heading(f"1. The gradient on a random (l, m, n) = {shape} tensor, beta = {beta_shown:g}")
    r = {k: float(v) for k, v in _float32_checks(jnp.asarray(phi), beta_shown).items()}
    with jax.enable_x64(True):
        phi64 = jnp.asarray(phi, dtype=jnp.float64)
        r64 = jax.device_get(_float64_checks(phi64, beta_shown, jnp.asarray(directions)))
    rel_fd = float(r64["rel_fd"])

    def row(label: str, value: str) -> None:
        _say(f"  {label:<62} {value}")

    row("penalty L = beta * sum_i sum_jk |Phi_i^T Phi_i - I|_jk", f"{r['value']:.6f}")
    row("|dL/dPhi|, Frobenius norm of dL/dPhi_i = 2 beta Phi_i G_i", f"{r['grad_norm']:.6f}")
    _say("  dL/dPhi[:, 0, 0], the l-vector (column 0 of 2 beta Phi_0 G_0):")
    _say(f"    closed form          {_fmt_vec(np.asarray(r64['vector']))}")
    _say(f"    finite differences   {_fmt_vec(np.asarray(r64['vector_fd']))}")
    _say(
        f"  min_ijk |X_i,jk| = {r['kink_distance']:.2e}: away from the kink, "
        "so every method below agrees"
    )
    row("max |custom_vjp - jax.grad(plain |.| expression)| / max|grad|", f"{r['rel_auto']:.1e}")
    row("max |custom_vjp - orthogonality_penalty_grad| / max|grad|", f"{r['rel_closed']:.1e}")
    row("max |<grad, v> - finite difference| / max|<grad, v>| (float64)", f"{rel_fd:.1e}")
    return {"rel_autodiff": r["rel_auto"], "rel_fd": rel_fd, "value": r["value"]}


# --------------------------------------------------------------------------- 2. training


@dataclass(frozen=True)
class Convention:
    """One way of treating the kink: a label and the penalty's keyword options."""

    label: str
    options: dict[str, Any]
    penalised: bool = True


def conventions(main: str, tol: float, compare: bool) -> list[Convention]:
    def named(name: str) -> Convention:
        if name == "deadzone":
            return Convention(f"deadzone({tol:g})", {"subgradient": jop.deadzone(tol)})
        return Convention(f'"{name}"', {"subgradient": name})

    runs = [named(main)]
    if compare:
        runs = [Convention("no penalty", {}, penalised=False), *runs]
        runs += [named(s) for s in SUBGRADIENTS if s != main]
        runs += [
            Convention(f"huber({tol:g})", {"norm": jop.huber(tol)}),
            Convention('"squared"', {"norm": "squared"}),
        ]
    return runs


@dataclass(frozen=True)
class Problem:
    data: jax.Array  # (m, samples, l)
    bases: jax.Array  # (m, l, n), the true orthonormal bases
    init: dict[str, jax.Array]


def make_problem(shape: tuple[int, int, int], samples: int, seed: int) -> Problem:
    """Synthetic data near m random n-dimensional subspaces, and a random init.

    Generated with NumPy: a handful of small arrays are not worth a compilation.
    """
    l, m, n = shape
    rng = np.random.default_rng(seed)
    bases = np.linalg.qr(rng.standard_normal((m, l, n)))[0]
    spread = np.linspace(2.0, 1.0, n)  # distinct variances along the basis directions
    codes = rng.standard_normal((m, samples, n)) * spread
    data = np.einsum("mln,msn->msl", bases, codes) + 0.05 * rng.standard_normal((m, samples, l))
    init = {
        "phi": 0.5 * rng.standard_normal((l, m, n)),
        "enc": 0.5 * rng.standard_normal((m, n, l)),
    }
    as32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return Problem(as32(data), as32(bases), {k: as32(v) for k, v in init.items()})


def task_loss(params: dict[str, jax.Array], data: jax.Array) -> jax.Array:
    """Mean squared reconstruction error of the per-group autoencoders."""
    codes = jnp.einsum("mnl,msl->msn", params["enc"], data)
    recon = jnp.einsum("lmn,msn->msl", params["phi"], codes)
    return jnp.mean(jnp.sum((data - recon) ** 2, axis=-1))


def make_optimizer(
    conv: Convention, beta: float, lr: float, steps: int
) -> optax.GradientTransformation:
    adam = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    if not conv.penalised:
        return adam
    # Coupled: the penalty's gradient is added before Adam rescales the updates, as
    # optax.add_decayed_weights before scale_by_adam is L2 regularisation. The mask
    # keeps the encoder out: only the decoder bases Phi should be orthonormal.
    penalty = jop.add_orthogonality_penalty(beta, mask={"phi": True, "enc": False}, **conv.options)
    return optax.chain(penalty, adam)


@dataclass
class History:
    label: str
    task: np.ndarray
    error: np.ndarray
    penalty: np.ndarray
    seconds: float


def train(
    conv: Convention,
    problem: Problem,
    *,
    beta: float,
    lr: float,
    steps: int,
    on_step: Callable[[int, float, float, float], None] | None = None,
) -> History:
    tx = make_optimizer(conv, beta, lr, steps)
    pen_options = conv.options if conv.penalised else {}
    pen_beta = beta if conv.penalised else 0.0

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any, jax.Array, jax.Array, jax.Array]:
        loss, grads = jax.value_and_grad(task_loss)(params, problem.data)
        updates, state = tx.update(grads, state, params)
        error = jnp.max(jop.orthogonality_error(params["phi"]))
        pen = jop.orthogonality_penalty(params["phi"], pen_beta, **pen_options)
        return optax.apply_updates(params, updates), state, loss, error, pen

    params, state = problem.init, tx.init(problem.init)
    rows = np.zeros((steps, 3))
    start = time.perf_counter()
    for t in range(steps):
        params, state, loss, error, pen = step(params, state)
        rows[t] = float(loss), float(error), float(pen)
        if on_step is not None:
            on_step(t, *rows[t])
    seconds = time.perf_counter() - start
    return History(conv.label, rows[:, 0], rows[:, 1], rows[:, 2], seconds)


def _table_printer(steps: int) -> Callable[[int, float, float, float], None]:
    every = max(1, steps // 10)
    _say(f"  {'step':>6}  {'task loss':>11}  {'beta*penalty':>12}  {'orth. error':>11}")

    def on_step(t: int, loss: float, error: float, pen: float) -> None:
        if t % every == 0 or t == steps - 1:
            _say(f"  {t:>6}  {loss:>11.5f}  {pen:>12.5f}  {error:>11.2e}")

    return on_step


# --------------------------------------------------------------------------- 3. the kink


def kink_gradients(
    shape: tuple[int, int, int], beta: float, runs: list[Convention]
) -> dict[str, float]:
    """|grad| at an exactly orthonormal Phi (identity columns: X is exactly 0)."""
    beta = beta if beta > 0 else 1.0
    penalised = tuple(c for c in runs if c.penalised)

    @jax.jit
    def norms() -> dict[str, jax.Array]:
        l, _, n = shape
        phi = jnp.broadcast_to(jnp.eye(l, n)[:, None, :], shape)
        out = {"jax.grad(plain |.|)": jnp.linalg.norm(jax.grad(_plain_penalty)(phi, beta))}
        for conv in penalised:
            g = jop.orthogonality_penalty_grad(phi, beta, **conv.options)
            out[conv.label] = jnp.linalg.norm(g)
        return out

    return {k: float(v) for k, v in norms().items()}


# --------------------------------------------------------------------------- 4. plot


_STYLES: dict[str, dict[str, Any]] = {
    "no penalty": {"color": "0.5", "linestyle": "--"},
    '"positive"': {"linestyle": (0, (5, 2))},
    '"negative"': {"linestyle": ":"},
}


def write_plot(path: str, histories: list[History], title: str) -> bool:
    """Writes the two-panel PNG; returns False (with a note) if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        _say(
            "  note: matplotlib is not installed, so no plot was written "
            "(pip install matplotlib, or jax_orthopenalty[notebooks])."
        )
        return False
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend: no display, no global pyplot state
    ax_task, ax_err = fig.subplots(1, 2)
    for h in histories:
        style = _STYLES.get(h.label, {})
        steps = np.arange(1, h.task.size + 1)
        ax_task.plot(steps, h.task, label=h.label, linewidth=1.4, **style)
        ax_err.plot(steps, h.error, label=h.label, linewidth=1.4, **style)
    ax_task.set(
        yscale="log", xlabel="step", ylabel="reconstruction loss (task)", title="Task loss"
    )
    ax_err.set(
        yscale="log",
        xlabel="step",
        ylabel=r"$\max_i\,\max_{jk} |\Phi_i^\top\Phi_i - I|$",
        title="Orthogonality error",
    )
    for ax in (ax_task, ax_err):
        ax.grid(True, which="major", alpha=0.3)
    ax_err.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; ``argv`` defaults to ``sys.argv[1:]``. Returns the exit status."""
    args = parse_args(argv)
    shape = tuple(args.shape)
    l, m, n = shape
    start = time.perf_counter()
    _say(
        f"jax_orthopenalty {jop.__version__} demo on {jax.devices()[0].platform.upper()} "
        f"(jax {jax.__version__}, optax {optax.__version__})"
    )

    check_gradient(shape, args.beta, args.seed)

    runs = conventions(args.subgradient, args.tol, compare=not args.no_compare)
    main_run = next(c for c in runs if c.penalised)
    problem = make_problem(shape, args.samples, args.seed)

    _heading(
        f"2. Learning orthonormal bases of {m} subspaces of dimension {n} in R^{l}\n"
        f"   optax.chain(add_orthogonality_penalty({args.beta:g}, "
        f"subgradient={main_run.label}), adam)"
    )
    histories = {
        main_run.label: train(
            main_run,
            problem,
            beta=args.beta,
            lr=args.lr,
            steps=args.steps,
            on_step=_table_printer(args.steps),
        )
    }
    first = histories[main_run.label]
    _say(
        f"  task loss {first.task[0]:.4g} -> {first.task[-1]:.4g}, "
        f"orthogonality error {first.error[0]:.2e} -> {first.error[-1]:.2e} "
        f"({args.steps} steps in {first.seconds:.1f} s)"
    )

    if len(runs) > 1:
        _heading("3. Subgradient conventions: the same training, and the gradient at the kink")
        kinks = kink_gradients(shape, args.beta, runs)
        for conv in runs:
            if conv.label not in histories:
                histories[conv.label] = train(
                    conv, problem, beta=args.beta, lr=args.lr, steps=args.steps
                )
        tail = max(1, args.steps // 10)
        _say(
            f"  {'convention':<16} {'final task':>10} {'final error':>11} "
            f"{'max error, last 10%':>19} {'|grad| at Phi^T Phi = I':>23}"
        )
        for conv in runs:
            h = histories[conv.label]
            kink = f"{kinks[conv.label]:.3g}" if conv.label in kinks else "-"
            _say(
                f"  {conv.label:<16} {h.task[-1]:>10.5f} {h.error[-1]:>11.2e} "
                f"{h.error[-tail:].max():>19.2e} {kink:>23}"
            )
        _say(
            f"  {'jax.grad(plain |.|)':<16} {'':>10} {'':>11} {'':>19} "
            f"{kinks['jax.grad(plain |.|)']:>23.3g}"
        )
        _say(
            '  At an exactly orthonormal Phi the L1 penalty is at its minimum. "zero", '
            "deadzone and the smooth norms"
        )
        _say(
            '  give a zero gradient there; "positive" (what plain autodiff does) and '
            '"negative" push Phi off it.'
        )
        _say(
            "  Away from the kink the L1 conventions coincide; near it the sign chatters, "
            "which deadzone and huber damp."
        )

    ordered = [histories[c.label] for c in runs]
    if not args.no_plot:
        _heading("4. Plot")
        title = (
            f"jax_orthopenalty demo: (l, m, n) = {shape}, beta = {args.beta:g}, "
            f"Adam lr {args.lr:g}, seed {args.seed}"
        )
        if write_plot(args.output, ordered, title):
            _say(f"  wrote {os.path.abspath(args.output)}")
    _say()
    _say(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
