"""An independent float64 NumPy reference for the penalty, its gradient and error,
the landing field and the polar factor.

Written from the definitions, one group at a time, with no code shared with the
library: the layout is handled by moving axes, the Gram matrices by plain ``@``,
the chain rule through the normalisation by its Jacobian (I - psi psi^T)/|phi|, and
the polar factor by ``np.linalg.svd``. Complex inputs stay complex (complex128).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

EPS = 1e-12  # the normalisation's floor on |phi_j|^2, as tf.math.l2_normalize


def _canonical(phi: np.ndarray, vector_axis: Any, column_axis: Any) -> tuple[np.ndarray, Any]:
    """Returns phi as (m, l, n) float64 (complex128 if phi is complex), and a function
    mapping (m, l, n) back."""
    ndim = phi.ndim
    vec = tuple(
        a % ndim for a in (vector_axis if isinstance(vector_axis, tuple) else (vector_axis,))
    )
    cols = tuple(
        a % ndim for a in (column_axis if isinstance(column_axis, tuple) else (column_axis,))
    )
    groups = [a for a in range(ndim) if a not in vec and a not in cols]
    perm = [*groups, *vec, *cols]
    a = np.asarray(phi)
    moved = np.transpose(a.astype(np.complex128 if np.iscomplexobj(a) else np.float64), perm)
    gshape = moved.shape[: len(groups)]
    vshape = moved.shape[len(groups) : len(groups) + len(vec)]
    n = int(np.prod(moved.shape[len(groups) + len(vec) :], dtype=int))  # columns, flattened
    m, l = int(np.prod(gshape, dtype=int)), int(np.prod(vshape, dtype=int))
    flat = moved.reshape(m, l, n)

    def back(a: np.ndarray) -> np.ndarray:
        return np.transpose(a.reshape(moved.shape), np.argsort(perm))

    return flat, back


def sign_with(at_zero: float) -> Callable[[np.ndarray], np.ndarray]:
    def s(x: np.ndarray) -> np.ndarray:
        return np.where(x == 0, at_zero, np.sign(x))

    return s


def entrywise(norm: Any, subgradient: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(f, f') for the options, written from their definitions."""
    if norm == "squared":
        return np.square, lambda x: 2 * x
    if hasattr(norm, "delta"):
        d = norm.delta
        return (
            lambda x: np.where(np.abs(x) <= d, x * x / (2 * d), np.abs(x) - d / 2),
            lambda x: np.clip(x / d, -1, 1),
        )
    assert norm == "l1"
    if hasattr(subgradient, "tol"):
        t = subgradient.tol
        return np.abs, lambda x: np.where(np.abs(x) > t, np.sign(x), 0.0)
    if callable(subgradient):
        return np.abs, lambda x: np.asarray(subgradient(x), np.float64)
    return np.abs, sign_with({"zero": 0.0, "positive": 1.0, "negative": -1.0}[subgradient])


def matrix_norm(norm: Any, at_zero: float = 0.0) -> Callable[[np.ndarray], tuple[float, Any]]:
    """(f(X), dF/dX) for the matrix norms, away from ties, from their definitions.

    spectral: ||X||_2 = max |eigenvalue| via eigvalsh/eigh, derivative s v v^T for the
    top eigenpair (v v^T times 2 lambda when squared); max: max |X_jk|, derivative
    sign(X_e) at the arg-max entry e. At X = 0 the derivative is ``at_zero`` times the
    average over the tied set (every eigenvector / every entry).
    """
    squared = getattr(norm, "squared", False)
    kind = "max" if norm == "max" else "spectral"

    def fn(x: np.ndarray) -> tuple[float, Any]:
        n = x.shape[0]
        if kind == "max":
            a = np.abs(x)
            top = a.max()
            if top == 0:
                return 0.0, np.full_like(x, at_zero / x.size)
            e = np.unravel_index(np.argmax(a), x.shape)
            d = np.zeros_like(x)
            d[e] = np.sign(x[e])
            return float(top), d
        lam, v = np.linalg.eigh(x)
        j = int(np.argmax(np.abs(lam)))
        top = abs(lam[j])
        if top == 0:
            return 0.0, np.eye(n) * (0.0 if squared else at_zero / n)
        u = v[:, j]
        if squared:
            return float(top**2), 2 * lam[j] * np.outer(u, u)
        return float(top), np.sign(lam[j]) * np.outer(u, u)

    return fn


def _is_matrix_norm(norm: Any) -> bool:
    return norm in ("spectral", "max") or hasattr(norm, "iterations")


def penalty_and_grad(
    phi: Any,
    beta: float = 1.0,
    *,
    vector_axis: Any = 0,
    column_axis: int = -1,
    norm: Any = "l1",
    subgradient: Any = "zero",
    off_diagonal: bool = False,
    normalize: bool = False,
    double_sided: bool = False,
    normalize_eps: float = EPS,
) -> tuple[float, np.ndarray]:
    """The value and the gradient (shaped like phi), in float64."""
    if _is_matrix_norm(norm):
        assert not double_sided
        at_zero = {"zero": 0.0, "positive": 1.0, "negative": -1.0}[subgradient]
        mat = matrix_norm(norm, at_zero)
        f = df = None
    else:
        f, df = entrywise(norm, subgradient)
    flat, back = _canonical(np.asarray(phi), vector_axis, column_axis)
    value = 0.0
    grad = np.zeros_like(flat)
    for i, a in enumerate(flat):
        l, n = a.shape
        if normalize:
            norms = np.sqrt(np.maximum((a * a).sum(axis=0), normalize_eps))
            psi = a / norms
        else:
            psi = a
        terms = [(psi.T @ psi - np.eye(n), "cols")]
        if double_sided:
            terms.append((psi @ psi.T - np.eye(l), "rows"))
        g_psi = np.zeros_like(a)
        for x, kind in terms:
            keep = 1 - np.eye(x.shape[0]) if off_diagonal else np.ones_like(x)
            if f is None:
                fx, s = mat(x * keep)
                value += fx
                s = s * keep
            else:
                value += float((f(x) * keep).sum())
                s = df(x) * keep
            # d sum f(P^T P - I) / dP = P (S + S^T);  d sum f(P P^T - I) / dP = (S + S^T) P
            g_psi += psi @ (s + s.T) if kind == "cols" else (s + s.T) @ psi
        if normalize:
            live = (a * a).sum(axis=0) > normalize_eps
            for j in range(n):
                u = psi[:, j]
                jac = np.eye(l) / norms[j]
                if live[j]:
                    jac = (np.eye(l) - np.outer(u, u)) / norms[j]
                grad[i, :, j] = jac @ g_psi[:, j]
        else:
            grad[i] = g_psi
    return beta * value, beta * back(grad)


def error(phi: Any, *, vector_axis: Any = 0, column_axis: Any = -1) -> np.ndarray:
    """max |Phi_i^T Phi_i - I| per group, shaped like the group axes."""
    ndim = np.ndim(phi)

    def axes(a: Any) -> tuple[int, ...]:
        return tuple(x % ndim for x in (a if isinstance(a, tuple) else (a,)))

    used = {*axes(vector_axis), *axes(column_axis)}
    gshape = tuple(np.shape(phi)[a] for a in range(ndim) if a not in used)
    flat, _ = _canonical(np.asarray(phi), vector_axis, column_axis)
    out = [np.abs(a.T @ a - np.eye(a.shape[1])).max(initial=0.0) for a in flat]
    return np.asarray(out, np.float64).reshape(gshape)


def signed_permutation(l: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """An l x n matrix of distinct signed unit columns: Phi^T Phi = I exactly."""
    rows = rng.permutation(l)[:n]
    out = np.zeros((l, n))
    out[rows, np.arange(n)] = rng.choice([-1.0, 1.0], size=n)
    return out


def polar(y: Any, *, vector_axis: Any = 0, column_axis: int = -1) -> np.ndarray:
    """The polar factor U V^H of the thin SVD Y = U S V^H, per group, shaped like y:
    the nearest matrix with orthonormal (unitary) columns, in float64 (complex128)."""
    ys, back = _canonical(y, vector_axis, column_axis)
    out = np.zeros_like(ys)
    for i, yi in enumerate(ys):
        u, _, vh = np.linalg.svd(yi, full_matrices=False)
        out[i] = u @ vh
    return back(out)


def landing(
    phi: Any,
    updates: Any,
    lam: float,
    *,
    vector_axis: Any = 0,
    column_axis: int = -1,
    safe_step: float | None = None,
    learning_rate: float | None = None,
) -> np.ndarray:
    """The landing field per group, shaped like phi, in float64 (complex128):

    Lambda = 1/2 (G X^H X - X G^H X) + lam X (X^H X - I),  G = conj(updates),

    returned as conj(Lambda) (jax.grad's convention for complex leaves: the update of
    a real-valued loss is the conjugate of its Wirtinger gradient; for real leaves
    conj is the identity). With ``safe_step``, the field is scaled by
    min(1, eta / learning_rate), eta the step that keeps ||X^H X - I||_F below
    ``safe_step`` (only while the distance is below it), as in the paper's code.
    """
    xs, back = _canonical(phi, vector_axis, column_axis)
    gs, _ = _canonical(updates, vector_axis, column_axis)
    out = np.zeros(xs.shape, np.result_type(xs, gs))
    for i, (x, u) in enumerate(zip(xs, gs, strict=True)):
        n = x.shape[1]
        g = np.conj(u)
        c = x.conj().T @ x
        rel = 0.5 * (g @ c - x @ (g.conj().T @ x))
        field = rel + lam * x @ (c - np.eye(n))
        if safe_step is not None:
            assert learning_rate is not None
            d = np.linalg.norm(c - np.eye(n))
            a = np.linalg.norm(rel)
            alpha = 2 * (lam * d - a * d - 2 * lam * d)  # as written in the paper's code
            beta = a**2 + lam**2 * d**3 + 2 * lam * a * d**2 + a**2 * d
            if d < safe_step:
                eta = (alpha + np.sqrt(alpha**2 + 4 * beta * (safe_step - d))) / 2 / beta
                field = field * min(1.0, eta / learning_rate)
        out[i] = np.conj(field)
    return back(out)
