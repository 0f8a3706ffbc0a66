r"""Exact orthogonality in the optax idiom: the landing field and the projection.

The soft penalty (:func:`add_orthogonality_penalty`) pulls the groups towards
orthonormal columns and trades that pull against the task. The two transforms here
reach orthonormality itself:

* :func:`landing` turns the incoming updates :math:`G` of every group :math:`X`
  (:math:`l \times n`, :math:`n \le l`) into the landing field of Ablin & Peyré
  (2022) and Vary, Ablin, Gao & Absil (2024),

  .. math::

      \Lambda(X) = \underbrace{\tfrac12\bigl(G X^\top X - X G^\top X\bigr)}_{\psi(X) X}
      + \lambda\, X\bigl(X^\top X - I\bigr),

  whose first term moves along the manifold (it is :math:`\psi(X)X` for the
  skew-symmetric :math:`\psi(X) = \tfrac12(G X^\top - X G^\top)`) and whose second
  term is the gradient of :math:`\tfrac{\lambda}{4}\|X^\top X - I\|_F^2`, pulling
  towards it. The two are orthogonal, and gradient steps on :math:`\Lambda` land on
  the Stiefel manifold with no retraction.
* :func:`project_orthonormal`, last in a chain, replaces :math:`X + u` by its polar
  factor, the nearest matrix with orthonormal columns.

Both are per-leaf kernels under the shared selection (:mod:`._select`: ``mask``
through ``optax.masked``, then ``dimension_numbers``), and compute with
:math:`n \times n` matrices: only Gram matrices :math:`X^\top X`, cross Gram matrices
:math:`G^\top X` and products :math:`X_i M_i`, never an :math:`l \times l` one.
"""

from __future__ import annotations

import functools
import warnings
from types import MappingProxyType
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _contract
from ._layout import (
    DEFAULT_PRECISION,
    Layout,
    accumulation_dtype,
    check_beta,
    real_dtype,
    zero_parts,
)
from ._matrix import abs2, eye_like
from ._polar import NEAR_ORTHONORMAL as NEAR_ORTHONORMAL
from ._polar import polar
from ._select import (
    DimensionNumbers,
    MaskOrFn,
    map_params,
    map_selected,
    no_params,
    transformation,
    where,
)

__all__ = ["LandingState", "landing", "project_orthonormal"]


class LandingState(NamedTuple):
    """The state of :func:`landing`: the step count for ``lam`` and ``learning_rate``.

    ``count`` is the number of updates so far (int32, saturating like optax's
    counts); a schedule ``lam`` (or ``learning_rate``) is evaluated at it.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import jax_orthopenalty as jop
      >>> tx = jop.landing(optax.linear_schedule(0.0, 1.0, 10))
      >>> params = {"w": jnp.eye(3, 2)}
      >>> state = tx.init(params)
      >>> state
      LandingState(count=Array(0, dtype=int32))
      >>> _, state = tx.update(params, state, params)
      >>> int(state.count)
      1
    """

    # shape (), int32. The name shadows tuple.count, as in optax's states.
    count: jax.Array  # type: ignore[assignment]


# So that a jax.export of a step with this state in its inputs or outputs serializes.
jax.export.register_namedtuple_serialization(
    LandingState, serialized_name="jax_orthopenalty.LandingState"
)


# --------------------------------------------------------------------------- per leaf


def _check_group(phi: jax.Array, updates: jax.Array, layout: Any) -> None:
    """A leaf whose groups can have orthonormal columns (n <= l), and its updates."""
    if not isinstance(layout, Layout):
        raise TypeError(
            "a ConvDims leaf is a convolution operator: landing and project_orthonormal "
            "keep each group's matrix orthonormal, not an operator. Give the leaf an "
            "OrthoDims (its flattened kernel) or None, or constrain the operator with "
            "add_orthogonality_penalty(..., dimension_numbers=...ConvDims...)."
        )
    _, l, n = layout.sizes(phi.shape)
    # With symbolic sizes (jax.export) n <= l cannot be decided at trace time: the
    # comparison would be inconclusive. The math runs either way; only a concrete
    # n > l is an error.
    if isinstance(n, int) and isinstance(l, int) and n > l:
        raise ValueError(
            f"a group of {n} columns of length {l} cannot have orthonormal columns "
            f"(n > l; phi has shape {phi.shape}, vector axes {layout.vector_axes}, "
            f"column axis {layout.column_axis}). Give the leaf an OrthoDims with the "
            "longer side on the vector axis (rows of a wide matrix), or skip it with None."
        )
    if not jnp.issubdtype(updates.dtype, jnp.inexact):
        raise TypeError(f"`updates` must have a floating dtype, got {updates.dtype}.")
    if jnp.issubdtype(updates.dtype, jnp.complexfloating) and not jnp.issubdtype(
        phi.dtype, jnp.complexfloating
    ):
        raise TypeError(
            f"`updates` is complex ({updates.dtype}) but the params leaf is {phi.dtype}."
        )


def _acc_dtype(phi: jax.Array, updates: jax.Array) -> Any:
    """float32 or wider: the wider of the two accumulation dtypes (never a half type)."""
    return jnp.promote_types(accumulation_dtype(phi.dtype), accumulation_dtype(updates.dtype))


def _landing_kernel(
    lam: Any,
    safe_step: Any,
    learning_rate: Any,
    precision: Any,
    phi: jax.Array,
    updates: jax.Array,
    layout: Layout,
) -> jax.Array:
    r"""The landing field of one leaf, in the updates' dtype.

    With :math:`C = X^\top X` and :math:`S = G^\top X` per group (both :math:`n \times n`),
    :math:`\Lambda = G (\tfrac12 C) + X (\lambda (C - I) - \tfrac12 S)`: two Gram-sized
    contractions and two products.
    """
    _check_group(phi, updates, layout)
    acc = _acc_dtype(phi, updates)
    x, g = phi.astype(acc), updates.astype(acc)
    complex_ = jnp.issubdtype(acc, jnp.complexfloating)
    if complex_:  # jax.grad's convention in and out: the updates are conj(G)
        g = jnp.conj(g)
    lam = check_beta(lam, real_dtype(acc), name="lam").astype(real_dtype(acc))
    c = _contract.gram(layout, x, precision=precision, acc=acc)
    # The cross Gram G_i^H X_i: the Gram's einsum with two operands.
    s = jnp.einsum(
        layout.gram_subscripts,
        jnp.conj(g),
        x,
        precision=precision,
        preferred_element_type=acc,
        out_sharding=_contract.group_out_sharding(layout, x, 2),
    )
    residual = c - eye_like(c)
    # lam X (C - I) is orthogonality_penalty_grad(x, lam / 4, norm="squared") (a test
    # checks it), formed here from the C already at hand: a Gram and a product fewer.
    along = _contract.apply(layout, g, 0.5 * c, precision=precision)
    if safe_step is None:
        field = along + _contract.apply(
            layout, x, lam.astype(acc) * residual - 0.5 * s, precision=precision
        )
    else:
        # The safe step needs the norm of the tangent part psi(X) X on its own.
        tangent = along - _contract.apply(layout, x, 0.5 * s, precision=precision)
        field = tangent + _contract.apply(
            layout, x, lam.astype(acc) * residual, precision=precision
        )
        scale = _safe_scale(layout, tangent, residual, lam, safe_step, learning_rate)
        field = field * scale.astype(field.dtype)
    return (jnp.conj(field) if complex_ else field).astype(updates.dtype)


def _safe_scale(
    layout: Layout,
    tangent: jax.Array,
    residual: jax.Array,
    lam: jax.Array,
    eps: Any,
    learning_rate: Any,
) -> jax.Array:
    r"""Per group, :math:`\min(1, \eta^*/\eta)`: the step :math:`\eta` clipped to the safe one.

    Ablin & Peyré (2022), with :math:`d = \|X^\top X - I\|_F` and
    :math:`a = \|\psi(X) X\|_F`: for :math:`d < \varepsilon` a step of size
    :math:`\eta \le \eta^*` stays in :math:`\{d \le \varepsilon\}`, where
    :math:`\eta^*` is the positive root of
    :math:`\beta\eta^2 - \alpha\eta + d - \varepsilon`,
    :math:`\alpha = -2d(\lambda + a)`,
    :math:`\beta = a^2 + \lambda^2 d^3 + 2\lambda a d^2 + a^2 d`, written as
    :math:`2(\varepsilon - d) / (\sqrt{\alpha^2 + 4\beta(\varepsilon - d)} - \alpha)`
    (the same root, with no cancellation and no division by :math:`\beta = 0`).
    """
    acc = real_dtype(tangent.dtype)
    eps = jnp.asarray(eps).astype(acc)
    lr = jnp.asarray(learning_rate).astype(acc)
    d = layout.on_groups(jnp.sqrt(jnp.sum(abs2(residual), axis=(-2, -1))))
    a = jnp.sqrt(
        jnp.sum(abs2(tangent), axis=(*layout.vector_axes, layout.column_axis), keepdims=True)
    )
    alpha = -2 * d * (lam + a)
    beta = a * a + lam * lam * d**3 + 2 * lam * a * d * d + a * a * d
    room = eps - d
    root = jnp.sqrt(jnp.maximum(alpha * alpha + 4 * beta * room, 0))
    eta = 2 * room / (root - alpha)
    # Outside the band (d >= eps) no step is certified: the step is left at lr there
    # (documented). NaN anywhere gives False here, so NaN in the field stays NaN.
    clip = (room > 0) & (eta < lr)
    return jnp.where(clip, eta / jnp.where(clip, lr, 1), 1)


def _project_kernel(
    precision: Any, phi: jax.Array, updates: jax.Array, layout: Layout
) -> jax.Array:
    """``polar(phi + updates) - phi`` for one leaf, in the updates' dtype."""
    _check_group(phi, updates, layout)
    if phi.size == 0:
        return jnp.zeros(updates.shape, updates.dtype)
    acc = _acc_dtype(phi, updates)
    x = phi.astype(acc)
    moved: jax.Array = polar(layout, x + updates.astype(acc), precision=precision) - x
    return moved.astype(updates.dtype)


_ZERO_CONSEQUENCE = MappingProxyType(
    {
        "landing": "the landing field vanishes on a zero group and on a zero column (both terms "
        "are products with X), so landing never moves them, whatever the task's gradient",
        "project_orthonormal": "the nearest orthonormal matrix to a zero group (or to a group "
        "with a zero column) is not unique: the first step turns it into an arbitrary one",
    }
)


def _warn_zeros(name: str, params: Any, dimension_numbers: DimensionNumbers) -> None:
    """Warns, naming the leaf, where a selected leaf of concrete params has an all-zero
    group or a zero column (a zero-initialised head or residual branch).

    Traced params (init under jit) and arrays spread over several processes are not
    checked.
    """

    def count(phi: jax.Array, layout: Any) -> tuple[int, int]:
        if not isinstance(layout, Layout):  # a ConvDims leaf: update raises, naming it
            return 0, 0
        return zero_parts(phi, layout.vector_axes, (layout.column_axis,))

    counted = map_params(count, params, dimension_numbers)
    for path, (groups, columns) in counted:
        if groups or columns:
            what = ", ".join(
                f"{k} {noun}{'s' * (k > 1)}"
                for k, noun in ((groups, "all-zero group"), (columns, "zero column"))
                if k
            )
            warnings.warn(
                f"{name}: params leaf {where(path)} has {what}: {_ZERO_CONSEQUENCE[name]}. "
                "Initialise it (orthogonal init, e.g. jax.nn.initializers.orthogonal()), "
                "or skip the leaf with None in dimension_numbers (a zero-initialised "
                "classifier head is usually not meant to be orthonormal).",
                UserWarning,
                stacklevel=3,
            )


LARGE = 2.0**10
"""Entries beyond this make ``project_orthonormal``'s first step lose precision: the
update is added in the parameters' dtype, so the result carries their rounding,
about eps * max|X| (2.6e-4 in float32 at a scale of 1e3)."""


def _warn_scale(params: Any, dimension_numbers: DimensionNumbers) -> None:
    """Warns, naming the leaf, where a selected leaf of concrete params has entries
    beyond :data:`LARGE` (traced or multi-process arrays are not checked)."""

    def largest(phi: jax.Array, layout: Any) -> float:
        # NumPy on the host copy: a jnp op would be staged into an enclosing jit trace.
        if not isinstance(layout, Layout) or isinstance(phi, jax.core.Tracer):
            return 0.0
        if not phi.is_fully_addressable or phi.size == 0:
            return 0.0
        return float(np.max(np.abs(np.asarray(phi))))

    for path, top in map_params(largest, params, dimension_numbers):
        if top > LARGE:
            warnings.warn(
                f"project_orthonormal: params leaf {where(path)} has entries up to {top:.3g}. "
                "The projection is an update added in the parameters' dtype, so its first "
                "step is orthonormal only to about eps * max|X| (2.6e-4 in float32 at 1e3; "
                "later steps are exact). Start from an orthogonal initialiser, or project "
                "the parameters themselves once before training.",
                UserWarning,
                stacklevel=3,
            )


# --------------------------------------------------------------------------- public


def landing(
    lam: optax.ScalarOrSchedule = 1.0,
    *,
    mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbers = None,
    safe_step: float | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    precision: Any = DEFAULT_PRECISION,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the updates by the landing field: steps that land on orthonormal columns.

    For every selected leaf and every group :math:`X` (:math:`l \times n`,
    :math:`n \le l`, in the leaf's :class:`OrthoDims` layout) with incoming updates
    :math:`G`,

    .. math::

        G \leftarrow \Lambda(X) = \tfrac12\bigl(G\, X^\top X - X\, G^\top X\bigr)
        + \lambda_t\, X \bigl(X^\top X - I\bigr),

    the landing field of Ablin & Peyré (2022), for the Stiefel manifold as in Vary et
    al. (2024). The first term is :math:`\psi(X) X` with the skew-symmetric
    :math:`\psi(X) = \tfrac12 (G X^\top - X G^\top)`: it moves along the manifold. The
    second is the gradient of :math:`\tfrac{\lambda}{4}\|X^\top X - I\|_F^2`: it pulls
    towards it. The two are orthogonal, so plain steps :math:`X \leftarrow X - \eta
    \Lambda(X)` converge to the task's critical points on the manifold with no
    retraction: two :math:`n \times n` Gram matrices and two products per group (a
    third with ``safe_step``). ``safe_step=eps`` with ``learning_rate=lr`` scales a
    group's field by :math:`\min(1, \eta^*/\mathrm{lr})`, :math:`\eta^*` the safe step
    that keeps :math:`\|X^\top X - I\|_F \le \varepsilon` (a guarantee when the chain
    then multiplies by exactly ``-lr``).

    Place it before the step size: ``optax.chain(jop.landing(1.0), optax.sgd(lr))``;
    with momentum, ``optax.trace`` first and ``safe_step``; with Adam, ``landing(0.0)``
    before ``scale_by_adam`` and ``landing(lam)`` after it. The recipes, the safe step's
    formula and measurements are in the docs' *Soft or exact* page. Complex leaves (the
    complex Stiefel manifold) take and return the field in ``jax.grad``'s conjugate
    convention (docs' *Failure modes*).

    Args:
      lam: :math:`\lambda \ge 0`, the pull towards the manifold: a float, a scalar
        array, or an optax schedule of the count. 1.0 by default, as in the papers.
      mask: which leaves to transform, as ``optax.masked`` takes it (see
        :func:`add_orthogonality_penalty`); the others pass through.
      dimension_numbers: each leaf's layout, as in :func:`add_orthogonality_penalty`.
        A group needs :math:`n \le l`: a wide leaf raises, naming it; lay it out on
        its rows, or skip it.
      safe_step: ``None`` (default), or :math:`\varepsilon > 0`: clip each group's step
        to the safe one. Needs ``learning_rate``.
      learning_rate: the step size that follows in the chain (a float or a schedule),
        for ``safe_step`` only.
      precision: the matmul precision, ``HIGHEST`` by default.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (in ``optax.masked`` with a mask),
      with state :class:`LandingState`. ``update`` needs ``params``; updates keep their
      dtypes; NaN in a group's params or updates gives NaN in its field. ``init``
      warns, naming the leaf, for an all-zero group (the field is 0 at :math:`X = 0`).

    Raises:
      ValueError, TypeError: at construction, for a non-scalar or negative ``lam``,
        ``safe_step`` without ``learning_rate`` (or the reverse), or a single-value
        mask; at ``update``, for ``params=None``, a layout that does not fit its leaf,
        or a group with more columns than rows.

    Examples:
      Off the manifold, with zero updates, the pull :math:`\lambda X (X^\top X - I)`:

      >>> import jax, jax.numpy as jnp, optax
      >>> import jax_orthopenalty as jop
      >>> tx = jop.landing(1.0)
      >>> params = {"x": 2 * jnp.eye(2)}
      >>> field, _ = tx.update({"x": jnp.zeros((2, 2))}, tx.init(params), params)
      >>> field["x"]                            # 2 I (4 I - I)
      Array([[6., 0.],
             [0., 6.]], dtype=float32)

      On it, the field of a task gradient is tangent (:math:`X^\top\Lambda` skew):

      >>> a = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> params = {"x": jnp.array([[0.6, 0.0], [0.8, 0.0], [0.0, 1.0]])}
      >>> grads = jax.grad(lambda p: -jnp.trace(p["x"].T @ a @ p["x"]))(params)
      >>> field, _ = tx.update(grads, tx.init(params), params)
      >>> m = params["x"].T @ field["x"]
      >>> bool(jnp.allclose(m, -m.T, atol=1e-6))
      True

    References:
      Ablin and Peyré, *Fast and accurate optimization on the orthogonal manifold
      without retraction*, AISTATS 2022. Vary, Ablin, Gao and Absil, *Optimization
      without retraction on the random generalized Stiefel manifold*, ICML 2024.
    """
    if not callable(lam):
        check_beta(lam, jnp.dtype(jnp.float32), name="lam")
    if (safe_step is None) != (learning_rate is None):
        raise ValueError(
            "`safe_step` and `learning_rate` go together: the safe step clips the step "
            "size `learning_rate` that follows landing in the chain; got "
            f"safe_step={safe_step!r}, learning_rate={learning_rate!r}."
        )
    if safe_step is not None:
        eps = check_beta(safe_step, jnp.dtype(jnp.float32), name="safe_step")
        if not isinstance(eps, jax.core.Tracer) and not bool(eps > 0):
            raise ValueError(f"`safe_step` must be > 0 (the band's radius), got {safe_step!r}.")

    def init_fn(params: Any) -> LandingState:
        _warn_zeros("landing", params, dimension_numbers)
        return LandingState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, LandingState]:
        if params is None:
            raise ValueError(no_params("landing"))
        count = cast(LandingState, state).count
        new_state = LandingState(count=jnp.asarray(optax.safe_increment(count)))
        if updates is None:
            return None, new_state
        strength = lam(count) if callable(lam) else lam
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        kernel = functools.partial(_landing_kernel, strength, safe_step, lr, precision)
        return map_selected(kernel, updates, params, dimension_numbers), new_state

    return transformation(init_fn, update_fn, mask)


def project_orthonormal(
    *,
    mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbers = None,
    precision: Any = DEFAULT_PRECISION,
) -> optax.GradientTransformationExtraArgs:
    r"""Last in a chain: the updated parameters become their nearest orthonormal matrix.

    For every selected leaf and every group :math:`X` (:math:`l \times n`,
    :math:`n \le l`) with final updates :math:`u`,

    .. math::

        u \leftarrow \operatorname{polar}(X + u) - X, \qquad
        \operatorname{polar}(Y) = U V^\top \text{ for } Y = U \Sigma V^\top,

    so that ``optax.apply_updates`` lands on :math:`\operatorname{polar}(X + u)`, the
    matrix with orthonormal columns nearest to :math:`X + u` (in Frobenius and every
    unitarily invariant norm): projected gradient descent on the Stiefel manifold.
    Place it after the step size, ``optax.chain(optax.sgd(lr),
    jop.project_orthonormal())``; anything after it moves the parameters off again.

    Near the manifold, as after a step from orthonormal parameters, the polar factor is
    a truncated series :math:`Y(I + E)^{-1/2}`, :math:`E = Y^\top Y - I`, in matmuls
    only, its degree (1 to 8) chosen from a bound on :math:`\|E\|_2` so that the result
    is exact to the dtype's precision; degree 1 costs one penalty gradient. Further out
    it takes an ``eigh`` of the Gram matrix, else the thin SVD of every group (routes,
    bounds and costs: :mod:`jax_orthopenalty._polar` and the docs' *Performance* page;
    sharding: *Scale*). Derivatives through it (``jax.grad``, ``jax.jvp``, any order)
    are exact for full-rank groups, also at orthonormal points and repeated singular
    values (a Lyapunov solve, no eigenvalue gaps).

    A rank-deficient group gets one of its (then many) nearest orthonormal matrices; a
    group with NaN or Inf in its params or updates gives NaN in that group. The update
    is added in the parameters' dtype, so the result is orthonormal to that dtype's
    precision relative to :math:`|X|` (docs' *Failure modes*: large or bfloat16
    parameters). Complex leaves get the nearest matrix with :math:`Q^H Q = I`.

    Args:
      mask: which leaves to project, as ``optax.masked`` takes it (see
        :func:`add_orthogonality_penalty`); the others pass through untouched.
      dimension_numbers: each leaf's layout, as in :func:`add_orthogonality_penalty`;
        a group with more columns than rows raises, naming the leaf.
      precision: the matmul precision, ``HIGHEST`` by default.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state ``optax.EmptyState``
      (inside ``optax.MaskedState`` with a mask). ``update`` needs ``params``.

    Raises:
      ValueError, TypeError: at construction for a single-value mask; at ``update``,
        for ``params=None``, a layout that does not fit its leaf, or a group with more
        columns than rows.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jax_orthopenalty as jop
      >>> params = {"w": jnp.array([[2.0, 0.0], [0.0, 0.5], [0.0, 0.0]]), "b": jnp.ones(2)}
      >>> opt = optax.chain(optax.sgd(0.1), jop.project_orthonormal())
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> u, _ = opt.update(grads, opt.init(params), params)
      >>> new = optax.apply_updates(params, u)
      >>> new["w"]                          # polar factor of diag(2, 0.5)
      Array([[1., 0.],
             [0., 1.],
             [0., 0.]], dtype=float32)
      >>> new["b"]                          # rank 1: untouched
      Array([1., 1.], dtype=float32)
    """

    def init_fn(params: Any) -> optax.EmptyState:
        _warn_zeros("project_orthonormal", params, dimension_numbers)
        _warn_scale(params, dimension_numbers)
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        if params is None:
            raise ValueError(no_params("project_orthonormal"))
        if updates is None:
            return None, state
        kernel = functools.partial(_project_kernel, precision)
        return map_selected(kernel, updates, params, dimension_numbers), state

    return transformation(init_fn, update_fn, mask)
