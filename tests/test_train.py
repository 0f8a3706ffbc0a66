"""End to end: ``chain(add_orthogonality_penalty, adam)`` trains flax and equinox models.

The task is a two-layer tanh network whose teacher has orthonormal weights, fed
inputs that span only 5 of their 8 dimensions. The task alone leaves the first
layer free in the other 3 directions, so plain Adam fits it with weights that are
not orthonormal (the control below); with the penalty the fit is as good and the
weights are orthonormal to float32 precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import jax_orthopenalty as jop

STEPS = 4000
LEARNING_RATE = 3e-2
BETA = 1e-2


def _data() -> tuple[jax.Array, jax.Array]:
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    q1 = jnp.linalg.qr(jax.random.normal(k1, (8, 8)))[0]  # orthogonal
    q2 = jnp.linalg.qr(jax.random.normal(k2, (8, 4)))[0]  # orthonormal columns
    x = jax.random.normal(k3, (256, 5)) @ jax.random.normal(k4, (5, 8)) / jnp.sqrt(5.0)
    return x, jnp.tanh(x @ q1) @ q2


def _fit(loss: Callable[[Any], jax.Array], params: Any, tx: Any) -> tuple[Any, jax.Array]:
    """Full-batch training, all steps in one jitted scan; returns params and losses."""

    @jax.jit
    def train(params: Any) -> tuple[Any, jax.Array]:
        def step(carry: Any, _: None) -> tuple[Any, jax.Array]:
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), value

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), length=STEPS)
        return params, losses

    return train(params)


def _optimizer(beta: float, **kwargs: Any) -> Any:
    schedule = optax.cosine_decay_schedule(LEARNING_RATE, STEPS)
    if beta == 0:
        return optax.adam(schedule)
    return optax.chain(jop.add_orthogonality_penalty(beta, **kwargs), optax.adam(schedule))


class _FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(4)(jnp.tanh(nn.Dense(8)(x)))


def _train_flax(beta: float) -> tuple[float, float, list[float]]:
    x, y = _data()
    model = _FlaxMLP()
    params = model.init(jax.random.key(1), x)["params"]

    def loss(p: Any) -> jax.Array:
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    # Default dimension_numbers: the kernels (in, out) in the default layout; the
    # biases (rank 1) are skipped.
    params, losses = _fit(loss, params, _optimizer(beta))
    errors = [float(jop.orthogonality_error(params[k]["kernel"])) for k in ("Dense_0", "Dense_1")]
    return float(losses[0]), float(loss(params)), errors


class _EquinoxMLP(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(8, 8, key=k1)
        self.out = eqx.nn.Linear(8, 4, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


EQX_WEIGHT = jop.OrthoDims(vector_axis=1, column_axis=0)  # eqx.nn.Linear: (out, in)


def _equinox_dims(params: Any) -> Any:
    return jax.tree.map(lambda a: EQX_WEIGHT if a.ndim == 2 else None, params)


def _train_equinox(beta: float) -> tuple[float, float, list[float]]:
    x, y = _data()
    params, static = eqx.partition(_EquinoxMLP(jax.random.key(3)), eqx.is_inexact_array)

    def loss(p: Any) -> jax.Array:
        return jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

    params, losses = _fit(loss, params, _optimizer(beta, dimension_numbers=_equinox_dims))
    errors = [
        float(jop.orthogonality_error(layer.weight, vector_axis=1, column_axis=0))
        for layer in (params.hidden, params.out)
    ]
    return float(losses[0]), float(loss(params)), errors


@pytest.mark.optax_promotion  # optax.adam / schedules: see conftest.py
@pytest.mark.parametrize("train", [_train_flax, _train_equinox], ids=["flax", "equinox"])
def test_training_reaches_low_task_loss_and_orthonormal_weights(
    train: Callable[[float], tuple[float, float, list[float]]],
) -> None:
    initial, final, errors = train(BETA)
    assert initial > 0.1
    assert final < 5e-3, final
    assert max(errors) < 1e-3, errors

    # The control: the same training without the penalty fits the task but leaves
    # the weights far from orthonormal, so the penalty is what made them so.
    _, final_plain, errors_plain = train(0.0)
    assert final_plain < 5e-3, final_plain
    assert max(errors_plain) > 0.1, errors_plain
