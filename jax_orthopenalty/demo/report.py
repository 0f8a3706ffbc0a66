"""What the demo prints: a heading and a table or two per part."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import optax

import jax_orthopenalty as jop

from .gradient import GradientCheck
from .training import AUTODIFF, Convention, History


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(text)
    say("-" * max(len(line) for line in text.splitlines()))


def _fmt_vec(v: np.ndarray, limit: int = 6) -> str:
    shown = ", ".join(f"{x:+.4f}" for x in v[:limit])
    return f"[{shown}{', ...' if v.size > limit else ''}]"


def banner() -> None:
    say(
        f"jax_orthopenalty {jop.__version__} demo on {jax.devices()[0].platform.upper()} "
        f"(jax {jax.__version__}, optax {optax.__version__})"
    )


# --------------------------------------------------------------------------- 1. gradient


def gradient_heading(shape: tuple[int, int, int], beta: float) -> None:
    heading(f"1. The gradient on a random (l, m, n) = {shape} tensor, beta = {beta:g}")


def gradient(r: GradientCheck) -> None:
    def row(label: str, value: str) -> None:
        say(f"  {label:<62} {value}")

    row("penalty L = beta * sum_i sum_jk |Phi_i^T Phi_i - I|_jk", f"{r.value:.6f}")
    row("|dL/dPhi|, Frobenius norm of dL/dPhi_i = 2 beta Phi_i G_i", f"{r.grad_norm:.6f}")
    say("  dL/dPhi[:, 0, 0], the l-vector (column 0 of 2 beta Phi_0 G_0):")
    say(f"    closed form          {_fmt_vec(r.vector)}")
    say(f"    finite differences   {_fmt_vec(r.vector_fd)}")
    say(
        f"  min_ijk |X_i,jk| = {r.kink_distance:.2e}: away from the kink, "
        "so every method below agrees"
    )
    row("max |custom_vjp - jax.grad(plain |.| expression)| / max|grad|", f"{r.rel_autodiff:.1e}")
    row("max |custom_vjp - orthogonality_penalty_grad| / max|grad|", f"{r.rel_closed:.1e}")
    row("max |<grad, v> - finite difference| / max|<grad, v>| (float64)", f"{r.rel_fd:.1e}")


# --------------------------------------------------------------------------- 2. training


def training_heading(shape: tuple[int, int, int], beta: float, main_run: Convention) -> None:
    l, m, n = shape
    heading(
        f"2. Learning orthonormal bases of {m} subspaces of dimension {n} in R^{l}\n"
        f"   optax.chain(add_orthogonality_penalty({beta:g}, "
        f"subgradient={main_run.label}), adam)"
    )


def step_table(steps: int) -> Callable[[int, float, float, float], None]:
    """Prints the table's header; the returned ``on_step`` prints every tenth step and
    the last."""
    every = max(1, steps // 10)
    say(f"  {'step':>6}  {'task loss':>11}  {'beta*penalty':>12}  {'orth. error':>11}")

    def on_step(t: int, loss: float, error: float, pen: float) -> None:
        if t % every == 0 or t == steps - 1:
            say(f"  {t:>6}  {loss:>11.5f}  {pen:>12.5f}  {error:>11.2e}")

    return on_step


def training_summary(h: History) -> None:
    say(
        f"  task loss {h.task[0]:.4g} -> {h.task[-1]:.4g}, "
        f"orthogonality error {h.error[0]:.2e} -> {h.error[-1]:.2e} "
        f"({h.task.size} steps in {h.seconds:.1f} s)"
    )


# --------------------------------------------------------------------------- 3. conventions


def conventions_heading() -> None:
    heading("3. Subgradient conventions: the same training, and the gradient at the kink")


def conventions(histories: list[History], kinks: dict[str, float]) -> None:
    tail = max(1, histories[0].task.size // 10)
    say(
        f"  {'convention':<16} {'final task':>10} {'final error':>11} "
        f"{'max error, last 10%':>19} {'|grad| at Phi^T Phi = I':>23}"
    )
    for h in histories:
        kink = f"{kinks[h.label]:.3g}" if h.label in kinks else "-"
        say(
            f"  {h.label:<16} {h.task[-1]:>10.5f} {h.error[-1]:>11.2e} "
            f"{h.error[-tail:].max():>19.2e} {kink:>23}"
        )
    say(f"  {AUTODIFF:<16} {'':>10} {'':>11} {'':>19} {kinks[AUTODIFF]:>23.3g}")
    say(
        '  At an exactly orthonormal Phi the L1 penalty is at its minimum. "zero", '
        "deadzone and the smooth norms"
    )
    say(
        '  give a zero gradient there; "positive" (what plain autodiff does) and '
        '"negative" push Phi off it.'
    )
    say(
        "  Away from the kink the L1 conventions coincide; near it the sign chatters, "
        "which deadzone and huber damp."
    )
