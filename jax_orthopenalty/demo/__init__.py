r"""The demo, ``python -m jax_orthopenalty``: one module per part.

It answers the library's question on a real problem, in seconds on a laptop CPU:

1. **The gradient** (:mod:`.gradient`). On a random ``(l, m, n)`` tensor: the penalty
   :math:`L = \beta \sum_i \sum_{jk} |\Phi_i^\top\Phi_i - I|_{jk}`, the norm of its
   closed-form gradient :math:`2\beta\,\Phi_i G_i`, the derivative with respect to one
   :math:`l`-vector ``Phi[:, a, b]``, and their agreement with ``jax.grad`` of the plain
   expression and with float64 central finite differences.
2. **Training** (:mod:`.problem`, :mod:`.training`). Group-wise subspace learning: each
   of ``m`` groups of synthetic data lies near its own ``n``-dimensional subspace of
   :math:`\mathbb{R}^l`. A linear autoencoder per group (decoder ``Phi[:, i, :]``,
   encoder ``enc[i]``) is trained on the reconstruction error with
   ``optax.chain(add_orthogonality_penalty(beta), adam)``. Reconstruction alone finds the
   subspace but not an orthonormal basis of it (any invertible change of basis between
   encoder and decoder fits equally well); the penalty picks the orthonormal one.
3. **Conventions** (:mod:`.training`). The same training with each subgradient
   convention, and the gradient each one gives at an exactly orthonormal point (the kink).
4. **A plot** (:mod:`.plot`) of the task loss and the orthogonality error over the steps,
   written to a PNG whose path is printed. It needs matplotlib, which the ``demo`` extra
   brings (``pip install "jax_orthopenalty[demo]"``); without it the plot is skipped
   with a note.

What is printed is in :mod:`.report`, the command line in :mod:`.options`, and
:mod:`.cli` runs the parts in order. ``python -m jax_orthopenalty --help`` lists the
options.
"""

from .cli import main as main

__all__ = ["main"]
