"""Parts 2 and 3: training with the penalty in an optax chain, under each kink convention,
and the gradient each convention gives at an exactly orthonormal point."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_orthopenalty as jop

from .gradient import checked_beta
from .options import SUBGRADIENTS
from .problem import Problem, plain_penalty, task_loss

AUTODIFF = "jax.grad(plain |.|)"  # the label of plain autodiff in the kink column


@dataclass(frozen=True)
class Convention:
    """One way of treating the kink: a label and the penalty's keyword options."""

    label: str
    options: dict[str, Any]
    penalised: bool = True


def conventions(main: str, tol: float, compare: bool) -> list[Convention]:
    """The main run's convention, then (with ``compare``) no penalty and every other one."""

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
    """Trains from ``problem.init``; ``on_step(t, task loss, error, beta * penalty)``."""
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


def kink_gradients(
    shape: tuple[int, int, int], beta: float, runs: list[Convention]
) -> dict[str, float]:
    """|grad| at an exactly orthonormal Phi (identity columns: X is exactly 0), for each
    penalised convention and for autodiff of the plain expression (label ``AUTODIFF``)."""
    beta = checked_beta(beta)
    penalised = tuple(c for c in runs if c.penalised)

    @jax.jit
    def norms() -> dict[str, jax.Array]:
        l, _, n = shape
        phi = jnp.broadcast_to(jnp.eye(l, n)[:, None, :], shape)
        out = {AUTODIFF: jnp.linalg.norm(jax.grad(plain_penalty)(phi, beta))}
        for conv in penalised:
            g = jop.orthogonality_penalty_grad(phi, beta, **conv.options)
            out[conv.label] = jnp.linalg.norm(g)
        return out

    return {k: float(v) for k, v in norms().items()}
