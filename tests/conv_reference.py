"""A plain float64 NumPy reference for the conv operator penalty: the dense operator.

Written from the definition y[m, p] = sum_{c, u} K[m, c, u] x[c, (S p + D u) mod N] on a
circular input, with no code shared with the library: the operator is materialised
as a matrix, and the penalty, its gradient and its singular values are computed on
that matrix.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

Fn = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def norm_fns(name: str, delta: float = 1.0) -> Fn:
    """f and f' of the entrywise norms, in NumPy (f'(0) = 0 for "l1")."""
    if name == "l1":
        return np.abs, np.sign
    if name == "squared":
        return (lambda x: x * x), (lambda x: 2 * x)
    if name == "huber":
        return (
            lambda x: np.where(np.abs(x) <= delta, 0.5 * x * x / delta, np.abs(x) - 0.5 * delta),
            lambda x: np.clip(x / delta, -1.0, 1.0),
        )
    raise ValueError(name)


def _taps(
    kernel: np.ndarray, stride: Sequence[int], dilation: Sequence[int], size: Sequence[int]
) -> list[tuple[int, tuple[int, ...], int, tuple[int, ...], tuple[int, ...]]]:
    """(m, p, c, q, u) for every entry of the operator matrix that K[m, c, u] feeds."""
    m_count, c_count, *k = kernel.shape
    out = [n // s for n, s in zip(size, stride, strict=True)]
    taps = []
    for m, c in itertools.product(range(m_count), range(c_count)):
        for p in np.ndindex(*out):
            for u in np.ndindex(*k):
                q = tuple(
                    (s * pi + d * ui) % n
                    for s, pi, d, ui, n in zip(stride, p, dilation, u, size, strict=True)
                )
                taps.append((m, p, c, q, u))
    return taps


def dense_operator(
    kernel: np.ndarray, stride: Sequence[int], dilation: Sequence[int], size: Sequence[int]
) -> np.ndarray:
    """The matrix of the circular conv: kernel ``(M, C, *k)``, rows ``(m, p)``, columns
    ``(c, q)``, both row-major."""
    m_count, c_count = kernel.shape[:2]
    out = [n // s for n, s in zip(size, stride, strict=True)]
    a = np.zeros((m_count, *out, c_count, *size))
    for m, p, c, q, u in _taps(kernel, stride, dilation, size):
        a[(m, *p, c, *q)] += kernel[(m, c, *u)]
    return a.reshape(m_count * math.prod(out), c_count * math.prod(size))


def _group_blocks(kernel: np.ndarray, groups: int) -> list[np.ndarray]:
    m = kernel.shape[0] // groups
    return [kernel[g * m : (g + 1) * m] for g in range(groups)]


def penalty_and_grad(
    kernel: np.ndarray,
    *,
    stride: Sequence[int],
    dilation: Sequence[int],
    size: Sequence[int],
    groups: int = 1,
    norm: str = "l1",
    delta: float = 1.0,
) -> tuple[float, np.ndarray]:
    """sum f(A A^T - I) (rows, M/G <= C S^d) or sum f(A^T A - I) (columns) over the dense
    operator A of each group, divided by the output positions prod(N / S); and its
    gradient with respect to the kernel ``(M, C/G, *k)``."""
    f, df = norm_fns(norm, delta)
    out = math.prod(n // s for n, s in zip(size, stride, strict=True))
    total, grads = 0.0, []
    for block in _group_blocks(kernel, groups):
        a = dense_operator(block, stride, dilation, size)
        rows = block.shape[0] <= block.shape[1] * math.prod(stride)
        x = a @ a.T if rows else a.T @ a
        x = x - np.eye(x.shape[0])
        total += float(np.sum(f(x))) / out
        w = df(x)
        da = ((w + w.T) @ a if rows else a @ (w + w.T)) / out
        da = da.reshape(block.shape[0], -1, block.shape[1], *size)
        g = np.zeros_like(block)
        for m, p, c, q, u in _taps(block, stride, dilation, size):
            g[(m, c, *u)] += da[(m, _flat(p, size, stride), c, *q)]
        grads.append(g)
    return total, np.concatenate(grads, axis=0)


def _flat(p: tuple[int, ...], size: Sequence[int], stride: Sequence[int]) -> int:
    out = [n // s for n, s in zip(size, stride, strict=True)]
    return int(np.ravel_multi_index(p, out)) if out else 0


def singular_values(
    kernel: np.ndarray,
    *,
    stride: Sequence[int],
    dilation: Sequence[int],
    size: Sequence[int],
    groups: int = 1,
) -> list[np.ndarray]:
    """The dense operator's singular values per group, descending."""
    return [
        np.linalg.svd(dense_operator(b, stride, dilation, size), compute_uv=False)
        for b in _group_blocks(kernel, groups)
    ]
