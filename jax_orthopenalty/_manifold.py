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

Both choose their leaves with the soft penalty's selection (``mask`` through
``optax.masked``, then ``dimension_numbers``; ``_select`` and ``_on_leaf`` of
:mod:`._transform`), and compute with :math:`n \times n` matrices: only Gram
matrices :math:`X^\top X`, cross Gram matrices :math:`G^\top X` and products
:math:`X_i M_i`, never an :math:`l \times l` one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from . import _contract
from ._layout import (
    DEFAULT_PRECISION,
    Layout,
    accumulation_dtype,
    check_beta,
    check_phi,
    make_layout,
    real_dtype,
    zero_groups,
)
from ._polar import NEAR_ORTHONORMAL as NEAR_ORTHONORMAL
from ._polar import _abs2, _eye_like, polar
from ._transform import (
    DimensionNumbers,
    MaskOrFn,
    _check_mask,
    _map_selected,
    _no_params,
    _on_leaf,
    _select,
    _transformation,
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


def _check_group(phi: jax.Array, updates: Any, vector_axis: Any, column_axis: int) -> Layout:
    """The layout of a leaf whose groups can have orthonormal columns (n <= l)."""
    layout = make_layout(phi.ndim, vector_axis, column_axis)
    l = math.prod(phi.shape[a] for a in layout.vector_axes)
    n = phi.shape[layout.column_axis]
    if n > l:
        raise ValueError(
            f"a group of {n} columns of length {l} cannot have orthonormal columns "
            f"(n > l; phi has shape {phi.shape}, vector_axis={vector_axis}, "
            f"column_axis={column_axis}). Give the leaf an OrthoDims with the longer "
            "side on the vector axis (rows of a wide matrix), or skip it with None."
        )
    u_shape = getattr(updates, "shape", None)
    if u_shape != phi.shape:
        raise ValueError(f"`updates` has shape {u_shape}, the params leaf {phi.shape}.")
    if not jnp.issubdtype(updates.dtype, jnp.inexact):
        raise TypeError(f"`updates` must have a floating dtype, got {updates.dtype}.")
    if jnp.issubdtype(updates.dtype, jnp.complexfloating) and not jnp.issubdtype(
        phi.dtype, jnp.complexfloating
    ):
        raise TypeError(
            f"`updates` is complex ({updates.dtype}) but the params leaf is {phi.dtype}."
        )
    return layout


def _acc_dtype(phi: jax.Array, updates: jax.Array) -> Any:
    """float32 or wider: the wider of the two accumulation dtypes (never a half type)."""
    return jnp.promote_types(accumulation_dtype(phi.dtype), accumulation_dtype(updates.dtype))


def _per_group(layout: Layout, x: jax.Array) -> jax.Array:
    """A ``(groups...)`` array, broadcastable against ``phi`` (size 1 on the rest)."""
    return jnp.expand_dims(x, (*layout.vector_axes, layout.column_axis))


def _landing_leaf(
    phi: Any,
    lam: Any,
    *,
    vector_axis: Any,
    column_axis: int,
    updates: Any,
    precision: Any,
    safe_step: Any,
    learning_rate: Any,
) -> jax.Array:
    r"""The landing field of one leaf, in the updates' dtype.

    With :math:`C = X^\top X` and :math:`S = G^\top X` per group (both :math:`n \times n`),
    :math:`\Lambda = G (\tfrac12 C) + X (\lambda (C - I) - \tfrac12 S)`: two Gram-sized
    contractions and two products.
    """
    phi = check_phi(phi)
    layout = _check_group(phi, updates, vector_axis, column_axis)
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
    residual = c - _eye_like(c)
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
    d = _per_group(layout, jnp.sqrt(jnp.sum(_abs2(residual), axis=(-2, -1))))
    a = jnp.sqrt(
        jnp.sum(_abs2(tangent), axis=(*layout.vector_axes, layout.column_axis), keepdims=True)
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


def _project_leaf(
    phi: Any,
    _: Any,
    *,
    vector_axis: Any,
    column_axis: int,
    updates: Any,
    precision: Any,
) -> jax.Array:
    """``polar(phi + updates) - phi`` for one leaf, in the updates' dtype."""
    phi = check_phi(phi)
    layout = _check_group(phi, updates, vector_axis, column_axis)
    acc = _acc_dtype(phi, updates)
    x, u = phi.astype(acc), jnp.asarray(updates)
    if phi.size == 0:
        return jnp.zeros(u.shape, u.dtype)
    moved: jax.Array = polar(layout, x + u.astype(acc), precision=precision) - x
    return moved.astype(u.dtype)


def _map_leaves(
    name: str,
    fn: Any,
    updates: Any,
    params: Any,
    dimension_numbers: DimensionNumbers,
    strength: Any,
    options: dict[str, Any],
) -> Any:
    if params is None:
        raise ValueError(_no_params(name))
    if updates is None:
        return None

    def one(leaf: Any, u: Any) -> Any:
        return _on_leaf(fn, leaf, strength, {**options, "updates": u})

    return _map_selected(one, updates, params, dimension_numbers)


def _warn_zero_groups(params: Any, dimension_numbers: DimensionNumbers) -> None:
    """Warns, naming the leaf, where a selected group of concrete params is all zero.

    The landing field is exactly 0 at :math:`X = 0` (both terms are products with
    :math:`X`), so landing never moves a zero-initialised group. Traced params (init
    under jit) are not checked.
    """
    _, leaves = _select(params, dimension_numbers)
    for leaf in leaves:
        if leaf.dims is None or not hasattr(leaf.phi, "ndim"):
            continue
        try:
            layout = make_layout(leaf.phi.ndim, leaf.dims.vector_axis, leaf.dims.column_axis)
        except (ValueError, TypeError):
            continue  # update raises, naming the leaf
        if zero_groups(leaf.phi, layout):
            where = jax.tree_util.keystr(leaf.path) or "the root"
            warnings.warn(
                f"landing: params leaf {where} has a group that is all zero. The landing "
                "field is exactly 0 at X = 0, so landing never moves it: initialise it "
                "(orthogonal init, e.g. jax.nn.initializers.orthogonal()), or skip the "
                "leaf with None in dimension_numbers.",
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

    the landing field of Ablin & Peyré (2022), for the Stiefel manifold as in Vary
    et al. (2024). The first term is :math:`\psi(X) X` with the skew-symmetric
    "relative gradient" :math:`\psi(X) = \tfrac12 (G X^\top - X G^\top)`: it moves
    along the manifold. The second is the gradient of
    :math:`\tfrac{\lambda}{4}\|X^\top X - I\|_F^2` (the ``norm="squared"`` penalty
    of :func:`orthogonality_penalty_grad` with :math:`\beta = \lambda/4`): it pulls
    towards it. The two are orthogonal, so :math:`\Lambda = 0` exactly at the
    critical points of the task on the manifold, and plain steps
    :math:`X \leftarrow X - \eta \Lambda(X)` converge there with no retraction
    (no SVD, no matrix inverse): per group it costs two :math:`n \times n` Gram
    matrices (:math:`X^\top X`, :math:`G^\top X`) and two products with
    :math:`n \times n` matrices: 1.1 to 2 times the soft penalty's gradient
    (measured on one CPU core from 24 x 5 to 1024 x 256 float32 groups; a third
    product with ``safe_step``). Unselected leaves pass through untouched.

    **Where it goes in a chain.** Landing acts on a *direction*: place it where
    the chain holds the direction you want to follow, before the step size.

    * Plain SGD: ``optax.chain(jop.landing(1.0), optax.sgd(lr))``.
    * Adam: ``optax.chain(jop.landing(0.0), optax.scale_by_adam(),
      jop.landing(1.0), optax.scale_by_learning_rate(lr))``. After Adam's
      scaling, landing makes Adam's direction tangent and adds the pull, which
      Adam does not rescale. The first ``landing(0.0)`` hands Adam the tangent
      part :math:`\psi(X)X` of the gradient, which vanishes at the constrained
      optimum. Without it, Adam's per-entry scaling of the full Euclidean
      gradient (whose normal part does not vanish there) moves the fixed
      points: on the PCA problem of the tests, ``chain(scale_by_adam(),
      landing(1.0), scale_by_learning_rate(lr))`` stops 8% above the optimal
      objective, the chain above reaches it to 1e-6. (Landing *before*
      ``optax.adam`` lets Adam's scaling bend the field off the tangent space:
      don't.) Adam's steps do not shrink at the optimum, so the distance to
      the manifold stays of the order of the step size: decay the learning rate.
    * Momentum, Nesterov or not: ``optax.chain(optax.trace(decay=0.9,
      nesterov=True), jop.landing(1.0, safe_step=0.5, learning_rate=lr),
      optax.scale_by_learning_rate(lr))`` keeps the momentum of the task
      gradient, every step is a landing field at the current point, and the
      safe step certifies it (below): the recipe, from orthonormal parameters.
      ``optax.chain(jop.landing(1.0), optax.sgd(lr, momentum=0.9))`` is not
      safe: momentum sums past fields, each taken at an older :math:`X`, and
      multiplies the step by up to :math:`1/(1 - 0.9) = 10`, so no step is
      certified; with large gradients a step leaves the band and the cubic pull
      diverges (it went to NaN on a ResNet at lr 0.1, Nesterov 0.9).

    **Step size.** With :math:`d = \|X^\top X - I\|_F`, the iterates stay near the
    manifold (:math:`d \le \varepsilon`) as long as every step
    :math:`\eta` is at most the safe step :math:`\eta^*(a, d, \lambda,
    \varepsilon)` of Ablin & Peyré (2022), where :math:`a =
    \|\psi(X)X\|_F`: the positive root of :math:`\beta\eta^2 - \alpha\eta + d -
    \varepsilon = 0`, :math:`\alpha = -2d(\lambda + a)`, :math:`\beta = a^2 +
    \lambda^2 d^3 + 2\lambda a d^2 + a^2 d`. It is the bound that the authors'
    implementations use (on the orthogonal group, and on the Stiefel manifold
    with :math:`a = \|\psi(X) X\|_F`); Vary et al. (2024) prove bounds of the
    same kind for the Stiefel manifold. Large gradients, or a large
    :math:`\lambda\eta` (keep :math:`\lambda\eta < 1`), are what push an iterate
    out.

    ``safe_step=eps`` with ``learning_rate=lr`` applies it: where a group is in the
    band (:math:`d < \varepsilon`) and :math:`\eta^* <` ``lr``, its field is scaled
    by :math:`\eta^*/\mathrm{lr}`, so that the step ``-lr * field`` is the safe
    one. This is a guarantee only when what follows in the chain multiplies by
    exactly ``-lr`` (``optax.sgd(lr)`` without momentum, or
    ``optax.scale_by_learning_rate(lr)``); pass the same ``lr`` (or schedule)
    to both. Outside the band (:math:`d \ge \varepsilon`, for example at a random
    start) no step is certified, and the field is left as it is: the
    :math:`\lambda` term then pulls the group in at a rate of about
    :math:`2\lambda\eta d` per step.

    **Complex leaves** (the complex Stiefel manifold, :math:`X^H X = I`): the
    updates are read in ``jax.grad``'s convention, :math:`\overline{G}`, and the
    field is returned in it, :math:`\overline{\Lambda}` with the conjugate
    transposes in place of the transposes: descend along the conjugate at apply
    (``optax.apply_updates(params, optax.tree.conj(updates))``), as with
    :func:`add_orthogonality_penalty`.

    **With optax.inject_hyperparams.** ``lam``, ``safe_step`` and
    ``learning_rate`` can be injected; a callable ``mask`` or
    ``dimension_numbers`` must be named in ``static_args``, as for
    :func:`add_orthogonality_penalty`.

    Args:
      lam: :math:`\lambda \ge 0`, the strength of the pull towards the manifold: a
        float, a scalar array, or an optax schedule (of the step count, kept in
        the state). 1.0 by default, as in the papers.
      mask: which leaves to transform, as ``optax.masked`` takes it (see
        :func:`add_orthogonality_penalty`); the others pass through.
      dimension_numbers: the layout of each leaf, as in
        :func:`add_orthogonality_penalty` (``None``: every floating leaf of rank
        >= 2 in the default layout ``OrthoDims()``). A group must have
        :math:`n \le l` (no more columns than the vector length): a wide leaf
        raises ``ValueError`` naming the leaf; lay it out on its rows, or skip it.
      safe_step: ``None`` (default), or :math:`\varepsilon > 0`: clip each group's
        step to the safe step that keeps :math:`\|X^\top X - I\|_F \le
        \varepsilon`. Needs ``learning_rate``.
      learning_rate: the step size that follows landing in the chain (a float or
        a schedule), used only for ``safe_step``.
      precision: the matmul precision, ``HIGHEST`` by default.

    Returns:
      An ``optax.GradientTransformationExtraArgs``, wrapped in ``optax.masked`` when
      ``mask`` is given, with state :class:`LandingState`. ``update`` needs
      ``params``; updates keep their dtypes (bfloat16 stays bfloat16, computed in
      float32). NaN in a group's params or updates gives NaN in that group's field.

    Raises:
      ValueError, TypeError: at construction, for a non-scalar or negative
        ``lam``, ``safe_step`` without ``learning_rate`` (or the reverse), or a
        mask that is a single value; at ``update``, for ``params=None``, a layout
        that does not fit its leaf or a group with more columns than rows.

    Examples:
      A step of SGD on :math:`-\mathrm{tr}(X^\top A X)`: the field is tangent
      (:math:`X^\top \Lambda` is skew-symmetric) at an orthonormal :math:`X`.

      >>> import jax, jax.numpy as jnp, optax
      >>> import jax_orthopenalty as jop
      >>> a = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> params = {"x": jnp.array([[0.6, 0.0], [0.8, 0.0], [0.0, 1.0]])}
      >>> grads = jax.grad(lambda p: -jnp.trace(p["x"].T @ a @ p["x"]))(params)
      >>> tx = jop.landing(1.0)
      >>> field, _ = tx.update(grads, tx.init(params), params)
      >>> m = params["x"].T @ field["x"]
      >>> bool(jnp.allclose(m, -m.T, atol=1e-6))
      True

      Off the manifold, the :math:`\lambda` term pulls back:
      :math:`\lambda X (X^\top X - I)` with zero updates.

      >>> params = {"x": 2 * jnp.eye(2)}
      >>> field, _ = tx.update({"x": jnp.zeros((2, 2))}, tx.init(params), params)
      >>> field["x"]                            # 2 I (4 I - I)
      Array([[6., 0.],
             [0., 6.]], dtype=float32)

      In a chain, after Adam's scaling, with the safe step:

      >>> opt = optax.chain(
      ...     jop.landing(0.0),
      ...     optax.scale_by_adam(),
      ...     jop.landing(1.0, safe_step=0.5, learning_rate=0.1),
      ...     optax.scale_by_learning_rate(0.1),
      ... )
      >>> params = {"x": jnp.eye(3, 2)}
      >>> state = opt.init(params)
      >>> for _ in range(50):
      ...     g = jax.grad(lambda p: -jnp.trace(p["x"].T @ a @ p["x"]))(params)
      ...     u, state = opt.update(g, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> float(jop.orthogonality_error(params["x"])) < 0.5
      True

    References:
      Ablin and Peyré, *Fast and accurate optimization on the orthogonal manifold
      without retraction*, AISTATS 2022. Vary, Ablin, Gao and Absil, *Optimization
      without retraction on the random generalized Stiefel manifold*, ICML 2024.
    """
    _check_mask(mask)
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
        _warn_zero_groups(params, dimension_numbers)
        return LandingState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, LandingState]:
        count = cast(LandingState, state).count
        strength = lam(count) if callable(lam) else lam
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        options = {"precision": precision, "safe_step": safe_step, "learning_rate": lr}
        out = _map_leaves(
            "landing", _landing_leaf, updates, params, dimension_numbers, strength, options
        )
        return out, LandingState(count=jnp.asarray(optax.safe_increment(count)))

    return _transformation(init_fn, update_fn, mask)


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

    so that ``optax.apply_updates`` lands on :math:`\operatorname{polar}(X + u)`,
    the matrix with orthonormal columns nearest to :math:`X + u` in Frobenius norm
    (and in every unitarily invariant norm). It is a retraction: projected
    gradient descent on the Stiefel manifold. Place it after the step size
    (``optax.chain(optax.sgd(lr), jop.project_orthonormal())``), so that it sees
    the step that is applied; anything after it would move the parameters off
    the manifold again.

    **Cost.** Near the manifold, as after a step from orthonormal parameters, the
    polar factor is a truncated series, :math:`Y (I + E)^{-1/2} \approx Y\,p(E)` with
    :math:`E = Y^\top Y - I`, in matmuls only: one Gram matrix, one product with
    :math:`Y` and at most four :math:`n \times n` products. The degree (1, 2, 4, 6 or
    8) comes from a bound on :math:`\|E\|_2` over all groups, so that the series'
    tail stays below :math:`\sqrt{l}\,u` (:math:`u` the unit roundoff, :math:`l` the
    vectors' length), the rounding error the Gram matrix itself carries: the result
    is the polar factor to the dtype's precision. Degree 1 (no extra product, the
    cost of one penalty gradient) holds for :math:`\|E\|_F \le 2.1 \cdot 10^{-3}`
    in float32 at :math:`l = 784` (``sgd(1e-3)`` steps on the MLP of
    docs/performance.md give about :math:`10^{-3}`). Why a series and not
    Newton-Schulz, and the bounds: ``jax_orthopenalty._polar``. Beyond degree 8's
    radius (0.27 in float32 at :math:`l = 784`) it takes :math:`Y C^{-1/2}` from an
    ``eigh`` of the Gram matrix where every :math:`\|E_i\|_F \le 1/2`, else the thin
    SVD :math:`U V^\top` of every group (a first step from a random start, a
    rank-deficient group, NaN). The route is a ``lax.cond`` and a ``lax.switch`` on
    scalars: under ``jax.jit`` only the chosen one runs (under ``jax.vmap`` all of
    them do: stack leaves as group axes instead). Measured against a penalty step:
    docs/performance.md. With the vectors sharded (FSDP) the series needs only the
    all-reduce of the :math:`n \times n` Gram matrices; the SVD fallback gathers each
    group explicitly, inside its own branch (docs/scale.md).

    **Derivatives.** ``jax.grad``, ``jax.jvp`` and higher orders through the
    projection are exact everywhere for full-rank groups, at exactly orthonormal
    points and repeated singular values included: the polar factor is a
    ``custom_jvp`` whose tangent solves the Lyapunov equation
    :math:`H\Omega + \Omega H = Q^\top dY - dY^\top Q` (:math:`H = Q^\top Y`), with
    no eigenvalue gaps to divide by (meta-learning, a warm-up from ``lr = 0``,
    differentiating a training run).

    **Rank-deficient groups.** Where :math:`X + u` has rank :math:`r < n`, the
    nearest orthonormal matrix is not unique: any :math:`Q` with
    :math:`Q V_r = U_r` is nearest. The result is one of them (LAPACK's choice
    of the singular vectors for the zero singular values), always with
    orthonormal columns; a zero group becomes some orthonormal matrix, and the
    derivative there is not defined. NaN in a group's params or updates gives NaN
    in that whole group; Inf is NaN here. The updates are in their own dtype; for
    bfloat16 parameters ``apply_updates`` rounds :math:`X + u` to bfloat16, so the
    result is orthonormal to bfloat16 precision (about 1e-2).

    **Complex leaves**: the result is the nearest matrix with orthonormal columns
    (:math:`Q^H Q = I`) to :math:`X + u`, by the same routes, with exact
    derivatives. :math:`u` is the step as ``optax.apply_updates`` applies it: with
    ``jax.grad``'s convention, conjugate before the projection,
    ``optax.chain(optax.sgd(lr), optax.stateless(lambda u, _: optax.tree.conj(u)),
    jop.project_orthonormal())``.

    **With optax.inject_hyperparams.** There is nothing numeric to inject; a
    callable ``mask`` or ``dimension_numbers`` must be in ``static_args``.

    Args:
      mask: which leaves to project, as ``optax.masked`` takes it (see
        :func:`add_orthogonality_penalty`); the others pass through untouched.
      dimension_numbers: the layout of each leaf, as in
        :func:`add_orthogonality_penalty`. An equinox ``(out, in)`` weight with
        ``OrthoDims(vector_axis=1, column_axis=0)`` is projected on its rows. A
        group with more columns than rows raises ``ValueError`` naming the leaf.
      precision: the matmul precision of :math:`U V^\top`, ``HIGHEST`` by
        default.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state ``optax.EmptyState``
      (inside ``optax.MaskedState`` with a mask). ``update`` needs ``params``.

    Raises:
      ValueError, TypeError: at construction for a mask that is a single value;
        at ``update``, for ``params=None``, a layout that does not fit its leaf,
        or a group with more columns than rows.

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
    _check_mask(mask)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        options = {"precision": precision}
        out = _map_leaves(
            "project_orthonormal", _project_leaf, updates, params, dimension_numbers, None, options
        )
        return out, state

    return _transformation(init_fn, update_fn, mask)
