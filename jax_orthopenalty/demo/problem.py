"""The learning problem: data near ``m`` random subspaces, and the autoencoders' loss."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


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


def plain_penalty(phi: jax.Array, beta: float) -> jax.Array:
    """beta * sum_i sum_jk |Phi_i^T Phi_i - I|, written the obvious way, for autodiff."""
    phi_i = jnp.moveaxis(phi, 1, 0)  # (m, l, n)
    gram = jnp.einsum("mlj,mlk->mjk", phi_i, phi_i, precision="highest")
    return beta * jnp.sum(jnp.abs(gram - jnp.eye(phi.shape[-1], dtype=phi.dtype)[None]))
