r"""The soft penalty as an optax transform, and the same penalty summed over a pytree.

:func:`add_orthogonality_penalty` is to the orthogonality penalty what
``optax.add_decayed_weights`` is to weight decay: a factory whose ``update`` adds one
per-leaf kernel, the closed-form gradient (:func:`._pull.pull`), to the updates of every
leaf the shared selection (:mod:`._select`) picks. :func:`tree_orthogonality_penalty`
is the matching scalar, :math:`\sum_\Phi L_\beta(\Phi)`, for adding to a loss.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from ._layout import DEFAULT_PRECISION, NORMALIZE_EPS, check_beta
from ._options import Options, make_options
from ._pull import AnyLayout, check_every, lazily, pull, times, value
from ._rules import Norm, Subgradient
from ._select import (
    DimensionNumbers,
    MaskOrFn,
    check_mask,
    map_params,
    map_selected,
    masked_view,
    no_params,
    transformation,
)

__all__ = [
    "AddOrthogonalityPenaltyState",
    "add_orthogonality_penalty",
    "tree_orthogonality_penalty",
]


class AddOrthogonalityPenaltyState(NamedTuple):
    """The state of :func:`add_orthogonality_penalty`: the step count for ``beta``.

    ``count`` is the number of updates so far (int32, saturating like optax's
    counts); a schedule ``beta`` is evaluated at it.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import jax_orthopenalty as jop
      >>> tx = jop.add_orthogonality_penalty(optax.linear_schedule(0.0, 1.0, 10))
      >>> params = {"w": 2 * jnp.eye(2)}
      >>> state = tx.init(params)
      >>> state
      AddOrthogonalityPenaltyState(count=Array(0, dtype=int32))
      >>> _, state = tx.update(params, state, params)
      >>> int(state.count)
      1
    """

    # shape (), int32. The name shadows tuple.count, as in optax's states.
    count: jax.Array  # type: ignore[assignment]


# So that a jax.export of a step with this state in its inputs or outputs serializes.
jax.export.register_namedtuple_serialization(
    AddOrthogonalityPenaltyState, serialized_name="jax_orthopenalty.AddOrthogonalityPenaltyState"
)


def _add_pull(
    scale: jax.Array, options: Options, phi: jax.Array, u: jax.Array, layout: AnyLayout
) -> jax.Array:
    """The kernel: ``u + scale * dL/dphi`` for one leaf."""
    return u + pull(phi, scale, layout, options)[0].astype(u.dtype)


def add_orthogonality_penalty(
    beta: optax.ScalarOrSchedule,
    *,
    mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbers = None,
    norm: Norm = "l1",
    subgradient: Subgradient = "zero",
    precision: Any = DEFAULT_PRECISION,
    off_diagonal: bool = False,
    normalize: bool = False,
    double_sided: bool = False,
    normalize_eps: float | None = None,
    every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the gradient of the orthogonality penalty to the updates.

    For every selected leaf :math:`\Phi` of the params, with groups :math:`\Phi_i`
    (see :class:`OrthoDims`) and :math:`\beta_t` = ``beta(count)`` for a schedule,

    .. math::

        u_\Phi \leftarrow u_\Phi + \frac{\partial L_{\beta_t}}{\partial \Phi},
        \qquad
        \frac{\partial L_\beta}{\partial \Phi_i} = \beta\, \Phi_i \bigl(F_i + F_i^\top\bigr),
        \quad F_i = f'\bigl(\Phi_i^\top \Phi_i - I\bigr),

    in closed form (:func:`orthogonality_penalty_grad`: one Gram matrix and one matmul
    per group). Leaves that are not selected pass through. Modelled on
    ``optax.add_decayed_weights``. Before ``scale_by_adam`` the penalty is coupled
    (L2-style: the same as adding :func:`tree_orthogonality_penalty` to the loss), after
    it decoupled (AdamW-style); ``every=k`` adds :math:`k` times the pull every
    :math:`k`-th step and forms no Gram matrix on the others. The recipes, how
    :math:`\beta` scales in each placement, ``optax.inject_hyperparams`` (callable
    ``mask``/``dimension_numbers`` go in ``static_args``) and ``optax.MultiSteps`` (where
    ``every`` counts outer steps) are in the docs' *Optax recipes* page.

    Args:
      beta: :math:`\beta`: a float, a scalar array, or an optax schedule of the count.
      mask: which leaves to penalise, as ``optax.masked`` takes it (a pytree of bools,
        a prefix of one, or a callable; a pytree whose leaves are all bools is a tree
        even if callable, like an ``equinox.Module``).
      dimension_numbers: each leaf's layout. ``None``: every floating leaf of rank
        >= 2 in the default layout ``OrthoDims()``. Otherwise a pytree (or prefix) of
        :class:`OrthoDims` or ``None`` (skip), or a callable from the params to one,
        like ``muon_weight_dimension_numbers``; :func:`dimension_numbers_for` gives it
        for flax and equinox models, and :func:`summary` shows it.
      norm: the norm :math:`f` (see :data:`Norm`).
      subgradient: the kink convention (see :data:`Subgradient`); static.
      precision: the matmul precision, ``HIGHEST`` by default.
      off_diagonal: leave the diagonal of :math:`\Phi_i^\top\Phi_i - I` out.
      normalize: penalise the cosines of unit-norm columns.
      double_sided: add the :math:`\Phi_i\Phi_i^\top - I` term (entrywise norms).
      normalize_eps: the floor on the squared column norm under ``normalize``, a
        static float; ``None`` is ``1e-12`` (a float default would be traced by
        ``inject_hyperparams``).
      every: apply the penalty on every ``every``-th update only, scaled by
        ``every``: an int from 1 to 2**31 - 1.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (wrapped in ``optax.masked`` with a
      mask) with state :class:`AddOrthogonalityPenaltyState`. ``update`` needs
      ``params``; updates keep their dtypes, and ``None`` updates stay ``None``.

    Raises:
      ValueError, TypeError: at construction, for a bad ``norm``, ``subgradient``,
        option, ``beta``, ``every`` or single-value ``mask``; at ``update``, for
        ``params=None``, a ``dimension_numbers`` that does not match the params, or a
        layout that does not fit its leaf (the error names the leaf).

    Examples:
      Coupled: the same updates as Adam on the loss plus the penalty.

      >>> import jax, jax.numpy as jnp, optax
      >>> import jax_orthopenalty as jop
      >>> params = {"w": jnp.array([[1.0, 0.5], [0.0, 1.0]]), "b": jnp.ones(2)}
      >>> task = lambda p: jnp.sum(p["w"]) + jnp.sum(p["b"] ** 2)
      >>> coupled = optax.chain(jop.add_orthogonality_penalty(0.1), optax.adam(1e-2))
      >>> u, _ = coupled.update(jax.grad(task)(params), coupled.init(params), params)
      >>> total = lambda p: task(p) + jop.tree_orthogonality_penalty(p, 0.1)
      >>> adam = optax.adam(1e-2)
      >>> v, _ = adam.update(jax.grad(total)(params), adam.init(params), params)
      >>> jax.tree.all(jax.tree.map(jnp.allclose, u, v))
      True

      A layout and a mask: equinox-style ``(out, in)`` weights, one left out.

      >>> params = {"enc": jnp.eye(3, 2).T, "dec": 2 * jnp.eye(2)}
      >>> tx = jop.add_orthogonality_penalty(
      ...     1.0,
      ...     dimension_numbers=jop.OrthoDims(vector_axis=1, column_axis=0),
      ...     mask={"enc": True, "dec": False},
      ... )
      >>> zeros = jax.tree.map(jnp.zeros_like, params)
      >>> u, _ = tx.update(zeros, tx.init(params), params)
      >>> float(jnp.abs(u["enc"]).max()), float(jnp.abs(u["dec"]).max())  # rows: no pull
      (0.0, 0.0)
    """
    options = make_options(
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
        normalize_eps=NORMALIZE_EPS if normalize_eps is None else normalize_eps,
    )
    check_every(every)
    if not callable(beta):
        check_beta(beta, jnp.dtype(jnp.float32))

    def init_fn(params: Any) -> AddOrthogonalityPenaltyState:
        del params
        return AddOrthogonalityPenaltyState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AddOrthogonalityPenaltyState]:
        if params is None:
            raise ValueError(no_params("add_orthogonality_penalty"))
        count = cast(AddOrthogonalityPenaltyState, state).count
        new_state = AddOrthogonalityPenaltyState(count=jnp.asarray(optax.safe_increment(count)))
        if updates is None or (isinstance(beta, (int, float)) and beta == 0):
            return updates, new_state
        strength = check_beta(beta(count) if callable(beta) else beta, jnp.dtype(jnp.float32))
        period = check_every(every)  # traced under optax.inject_hyperparams
        kernel = functools.partial(_add_pull, times(period, strength), options)

        def add(u: optax.Updates) -> optax.Updates:
            return cast(optax.Updates, map_selected(kernel, u, params, dimension_numbers))

        return lazily(count, period, add, updates), new_state

    return transformation(init_fn, update_fn, mask)


def tree_orthogonality_penalty(
    params: Any,
    beta: ArrayLike,
    *,
    mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbers = None,
    norm: Norm = "l1",
    subgradient: Subgradient = "zero",
    precision: Any = DEFAULT_PRECISION,
    off_diagonal: bool = False,
    normalize: bool = False,
    double_sided: bool = False,
    normalize_eps: float = NORMALIZE_EPS,
) -> jax.Array:
    r"""The orthogonality penalty summed over the selected leaves of a pytree.

    .. math::

        \sum_{\Phi \text{ selected}} \beta \sum_i \sum_{jk}
        f\bigl(\Phi_i^\top\Phi_i - I\bigr)_{jk}

    For adding to a loss. The leaves and layouts are chosen exactly as
    :func:`add_orthogonality_penalty` chooses them (the same ``mask`` and
    ``dimension_numbers``, the same code), and each term is
    :func:`orthogonality_penalty`, so ``jax.grad`` of it uses the closed-form backward
    pass and equals what the transform adds to the updates (a callable ``mask`` is
    called on the params here and on the updates there: one that depends only on
    structure and shapes selects the same).

    Args:
      params: a pytree of parameters.
      beta: the strength, a float or a scalar array (may be traced; its gradient is
        the unscaled sum).
      mask: as in :func:`add_orthogonality_penalty`.
      dimension_numbers: as in :func:`add_orthogonality_penalty`.
      norm: the norm (see :data:`Norm`).
      subgradient: the kink convention (see :data:`Subgradient`).
      precision: the matmul precision, ``HIGHEST`` by default.
      off_diagonal: leave the diagonal out.
      normalize: penalise the cosines of unit-norm columns.
      double_sided: add the :math:`\Phi_i\Phi_i^\top - I` term (entrywise norms).
      normalize_eps: the floor on the squared column norm under ``normalize``.

    Returns:
      A scalar: the sum of the leaves' penalties, in their promoted dtype; a float32
      zero when no leaf is selected.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> params = {"w": 2 * jnp.eye(2), "b": jnp.ones(2), "k": jnp.eye(2)}
      >>> jop.tree_orthogonality_penalty(params, 0.5)    # w: 0.5 * 2 * |4 - 1|; b skipped
      Array(3., dtype=float32)
      >>> jop.tree_orthogonality_penalty(params, 0.5, mask={"w": False, "b": True, "k": True})
      Array(0., dtype=float32)
    """
    check_mask(mask)
    check_beta(beta, jnp.dtype(jnp.float32))  # also when no leaf is selected
    options = make_options(
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
        normalize_eps=normalize_eps,
    )
    terms = [
        term
        for _, term in map_params(
            lambda phi, layout: value(phi, beta, layout, options),
            masked_view(params, mask),
            dimension_numbers,
        )
    ]
    if not terms:
        return jnp.zeros((), jnp.float32)
    # Leaves of several dtypes (bfloat16 and float32) add up in their promoted dtype,
    # cast explicitly, so that strict dtype promotion holds too.
    with jax.numpy_dtype_promotion("standard"):
        dtype = functools.reduce(jnp.promote_types, (t.dtype for t in terms))
    total: jax.Array = functools.reduce(jnp.add, (t.astype(dtype) for t in terms))
    return total
