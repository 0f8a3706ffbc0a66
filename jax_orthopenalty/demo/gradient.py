"""Part 1: the closed-form gradient against autodiff and finite differences."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_orthopenalty as jop

from .problem import plain_penalty


@dataclass(frozen=True)
class GradientCheck:
    beta: float  # checked_beta(the option)
    value: float
    grad_norm: float
    kink_distance: float  # min_ijk |X_i,jk|: how far from the kink the random tensor is
    rel_autodiff: float  # against jax.grad of the plain expression, float32
    rel_closed: float  # against orthogonality_penalty_grad, float32
    rel_fd: float  # against central finite differences, float64
    vector: np.ndarray  # dL/dPhi[:, 0, 0], closed form
    vector_fd: np.ndarray  # the same, by finite differences


@functools.partial(jax.jit, static_argnums=(1,))
def _float32_checks(phi: jax.Array, beta: float) -> dict[str, Any]:
    """One compiled function, so the demo does not pay for many small compilations."""
    value, grad = jax.value_and_grad(jop.orthogonality_penalty)(phi, beta)
    closed = jop.orthogonality_penalty_grad(phi, beta)
    auto = jax.grad(plain_penalty)(phi, beta)
    gram = jnp.einsum("lmj,lmk->mjk", phi, phi, precision="highest")
    scale = jnp.max(jnp.abs(grad))
    return {
        "value": value,
        "grad_norm": jnp.linalg.norm(grad),
        "kink_distance": jnp.min(jnp.abs(gram - jnp.eye(phi.shape[-1])[None])),
        "rel_autodiff": jnp.max(jnp.abs(grad - auto)) / scale,
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


def checked_beta(beta: float) -> float:
    """The beta the checks use: the option, or 1 where it is 0 (a zero gradient checks
    nothing)."""
    return beta if beta > 0 else 1.0


def check_gradient(shape: tuple[int, int, int], beta: float, seed: int) -> GradientCheck:
    """The penalty and its gradient on a random tensor, checked three ways."""
    beta = checked_beta(beta)
    rng = np.random.default_rng(seed)
    phi = (rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32)
    directions = rng.standard_normal((8, *shape))
    r = {k: float(v) for k, v in _float32_checks(jnp.asarray(phi), beta).items()}
    with jax.enable_x64(True):
        phi64 = jnp.asarray(phi, dtype=jnp.float64)
        r64 = jax.device_get(_float64_checks(phi64, beta, jnp.asarray(directions)))
    return GradientCheck(
        beta=beta,
        **r,
        rel_fd=float(r64["rel_fd"]),
        vector=np.asarray(r64["vector"]),
        vector_fd=np.asarray(r64["vector_fd"]),
    )
