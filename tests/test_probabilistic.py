"""The penalty as a group prior in numpyro: NUTS samples it, and it orthogonalises.

``numpyro.factor("ortho", -orthogonality_penalty(W, beta))`` multiplies a model's
density by exp(-beta * L(W)). On a probabilistic PCA whose loadings are W_i diag(s_i),
the likelihood only sees the products, so without the prior the columns of W_i are
not orthonormal; with it they are, and NUTS still samples without divergences
(notebooks/04_probabilistic_priors.ipynb is the long version).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro  # a test dependency (pyproject's `test` extra): no skip without it
import numpyro.distributions as dist
import numpyro.infer as infer

import jax_orthopenalty as jop

D, M, K, N = 6, 2, 2, 80


def _data() -> jax.Array:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((M, D, K)))[0]  # (m, d, k), orthonormal columns
    scales = np.array([[2.0, 1.0], [1.5, 0.8]])
    z = rng.standard_normal((N, M, K))
    x = np.einsum("mdk,mk,nmk->nmd", basis, scales, z) + 0.3 * rng.standard_normal((N, M, D))
    return jnp.asarray(x, jnp.float32)


def _model(x: jax.Array, beta: jax.Array) -> None:
    w = numpyro.sample("W", dist.Normal(0.0, 1.0).expand([D, M, K]).to_event(3))
    s = numpyro.sample("s", dist.HalfNormal(3.0).expand([M, K]).to_event(2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.factor("ortho", -jop.orthogonality_penalty(w, beta))  # prior ∝ exp(-beta L(W))
    loadings = jnp.einsum("dmk,mk->mdk", w, s)
    # x ~ N(0, L L^T + sigma^2 I) per group, with L = W_i diag(s_i): z integrated out.
    noise = jnp.full((M, D), sigma**2)
    numpyro.sample("x", dist.LowRankMultivariateNormal(jnp.zeros(D), loadings, noise), obs=x)


def _nuts(x: jax.Array, betas: tuple[float, ...]) -> list[tuple[np.ndarray, int]]:
    """Per beta: the median posterior orthogonality error per group, and the number of
    divergences. One sampler for all betas: with ``jit_model_args`` beta is an argument
    of the compiled sampler, so it compiles once."""
    mcmc = infer.MCMC(
        infer.NUTS(_model, max_tree_depth=6),
        num_warmup=150,
        num_samples=150,
        num_chains=1,
        progress_bar=False,
        jit_model_args=True,
    )
    out = []
    for beta in betas:
        mcmc.run(jax.random.key(1), x, jnp.float32(beta), extra_fields=("diverging",))
        errors = jax.vmap(jop.orthogonality_error)(mcmc.get_samples()["W"])  # (samples, m)
        divergences = int(mcmc.get_extra_fields()["diverging"].sum())
        out.append((np.median(np.asarray(errors), axis=0), divergences))
    return out


def test_nuts_with_the_penalty_as_a_prior_is_orthogonal_and_has_no_divergences():
    x = _data()
    # numpyro broadcasts by rank and mixes int32 with float32 internally: its users run
    # under jax's default promotion rules, not the suite's strict ones.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        # beta = 0: no prior.
        (free, free_divergences), (prior, prior_divergences) = _nuts(x, (0.0, 50.0))
    # Per group, the median posterior orthogonality error falls by far more than 3x
    # (measured: about 6 without the prior, 0.03 with it).
    assert np.all(prior * 3 < free), (prior, free)
    assert np.all(prior < 0.1), prior
    assert prior_divergences <= 2, prior_divergences
    assert free_divergences <= 10, free_divergences
