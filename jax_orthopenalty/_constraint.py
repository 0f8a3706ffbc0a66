r"""Orthogonality to a target: one multiplier per group found by dual ascent, and metrics.

:func:`add_orthogonality_constraint` is :func:`add_orthogonality_penalty` with a
:math:`\beta_i` per group that the transform finds itself: each step pulls every group
with its own :math:`\beta_i` (:func:`._pull.pull`, which returns the group's error from
the same Gram matrix) and then moves :math:`\beta_i` up while the group's error is above
the target and down while it is below. The L1 penalty is exact: a finite
:math:`\beta_i` holds the constraint, and dual ascent tracks the smallest one.
:func:`orthogonality_metrics` is what to log while it runs: per group, the error, the
extreme singular values and (given the state) the multiplier.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _contract, _pull
from ._family import group_error
from ._layout import (
    DEFAULT_PRECISION,
    NORMALIZE_EPS,
    Layout,
    accumulation_dtype,
    check_beta,
    real_dtype,
)
from ._matrix import eye_like
from ._options import Options, make_options
from ._pull import check_every, lazily, pull, times
from ._rules import Norm, Subgradient
from ._select import (
    DimensionNumbers,
    MaskOrFn,
    check_mask,
    map_params,
    map_selected_with,
    masked_view,
    no_params,
    selected_tree,
    transformation,
)

__all__ = [
    "AddOrthogonalityConstraintState",
    "add_orthogonality_constraint",
    "orthogonality_metrics",
]


class AddOrthogonalityConstraintState(NamedTuple):
    """The state of :func:`add_orthogonality_constraint`.

    ``count`` is the number of updates so far (int32, saturating like optax's). ``beta``
    and ``error`` are trees of the params' structure: at every selected leaf an array of
    the leaf's group shape (one entry per group, a stack of layers one per layer), in
    the leaf's real accumulation dtype; ``None`` elsewhere. ``beta`` holds the
    multipliers :math:`\\beta_i \\ge 0`, ``error`` each group's
    :math:`\\max_{jk}|X_i|_{jk}` at the last step that measured it (``inf`` before the
    first, ``NaN`` where the group was not finite).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> tx = jop.add_orthogonality_constraint(1e-3)
      >>> state = tx.init({"w": jnp.ones((4, 3, 2)), "b": jnp.ones(2)})
      >>> state.beta["w"].shape, state.beta["b"]
      ((3,), None)
    """

    # shape (), int32. The name shadows tuple.count, as in optax's states.
    count: jax.Array  # type: ignore[assignment]
    beta: Any
    error: Any


# So that a jax.export of a step with this state in its inputs or outputs serializes.
jax.export.register_namedtuple_serialization(
    AddOrthogonalityConstraintState,
    serialized_name="jax_orthopenalty.AddOrthogonalityConstraintState",
)


class _Dual:
    """One leaf's ``(beta, error)``: a pytree leaf, so the per-leaf state is one tree."""

    def __init__(self, beta: jax.Array, error: jax.Array) -> None:
        self.beta, self.error = beta, error


def _is_slot(x: object) -> bool:
    return x is None or isinstance(x, _Dual)


def _zip(beta: Any, error: Any) -> Any:
    return jax.tree.map(
        lambda b, e: None if b is None else _Dual(b, e), beta, error, is_leaf=lambda x: x is None
    )


def _unzip(duals: Any) -> tuple[Any, Any]:
    beta = jax.tree.map(lambda d: None if d is None else d.beta, duals, is_leaf=_is_slot)
    error = jax.tree.map(lambda d: None if d is None else d.error, duals, is_leaf=_is_slot)
    return beta, error


def _check_positive(name: str, value: Any) -> jax.Array:
    """A finite strength that must be > 0 where it is concrete (``target``, ``rate``)."""
    if not isinstance(value, (jax.core.Tracer, bool, str, bytes)) and np.ndim(value) == 0:
        try:
            exact = float(np.asarray(value, np.float64))
        except (TypeError, ValueError):  # not a number: check_beta names it
            exact = 1.0
        if not (np.isfinite(exact) and exact > 0):
            raise ValueError(f"`{name}` must be finite and > 0, got {value!r}.")
    return check_beta(value, jnp.dtype(jnp.float32), name)


def _scalar(value: optax.ScalarOrSchedule, name: str, count: jax.Array) -> jax.Array:
    return _check_positive(name, value(count) if callable(value) else value)


def dual_step(beta: jax.Array, error: jax.Array, target: jax.Array, rate: jax.Array) -> jax.Array:
    r"""``max(0, beta + rate * clip(log(error / target), -1, 1))``; NaN errors keep beta."""
    t, r = target.astype(error.dtype), rate.astype(error.dtype)
    # log(0) = -inf clips to -1: an exactly orthonormal group decays its multiplier.
    g = jnp.clip(jnp.log(error / t), -1, 1)
    return jnp.where(jnp.isnan(error), beta, jnp.maximum(beta + r * g, 0))


def _kernel(
    period: int | jax.Array,
    target: jax.Array,
    rate: jax.Array,
    options: Options,
    phi: jax.Array,
    u: jax.Array,
    layout: Layout,
    dual: _Dual,
) -> tuple[jax.Array, _Dual]:
    """One leaf: ``u + period * beta_i dL_i/dphi``, then the dual step from the same Gram."""
    grad, error = pull(phi, times(period, dual.beta), layout, options)
    beta = dual_step(dual.beta, error.astype(dual.beta.dtype), target, rate)
    return u + grad.astype(u.dtype), _Dual(beta, error.astype(dual.error.dtype))


def _group_full(phi: jax.Array, layout: Layout, value: Any) -> jax.Array:
    """``value`` in every group of ``phi``, sharded like its group axes on an Explicit mesh."""
    if isinstance(layout, Layout):
        shape, sharding = (
            layout.group_shape(phi.shape),
            _contract.group_out_sharding(layout, phi, 0),
        )
    else:  # a ConvDims leaf: one multiplier per operator
        shape, sharding = tuple(layout.operator_shape(phi.shape)), None
    dtype = real_dtype(accumulation_dtype(phi.dtype))
    return jnp.full(shape, jnp.asarray(value).astype(dtype), dtype, out_sharding=sharding)


def add_orthogonality_constraint(
    target: optax.ScalarOrSchedule,
    *,
    rate: optax.ScalarOrSchedule = 1e-3,
    beta_init: float = 0.0,
    mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbers = None,
    norm: Norm = "l1",
    subgradient: Subgradient = "zero",
    precision: Any = DEFAULT_PRECISION,
    off_diagonal: bool = False,
    normalize: bool = False,
    normalize_eps: float | None = None,
    every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the orthogonality pull with one multiplier per group, found by dual ascent.

    For every group :math:`\Phi_i` of a selected leaf, with :math:`e_i = \max_{jk}
    |X_i|_{jk}` its error (:func:`orthogonality_error`, with ``off_diagonal`` /
    ``normalize``) and :math:`\varepsilon_t` the target at the step,

    .. math::

        u_{\Phi_i} \leftarrow u_{\Phi_i} + \beta_i \frac{\partial L_i}{\partial \Phi_i},
        \qquad
        \beta_i \leftarrow \max\Bigl(0,\ \beta_i + \eta\,
            \operatorname{clip}\bigl(\log(e_i / \varepsilon_t), -1, 1\bigr)\Bigr),

    the pull with the multiplier *before* the step, and :math:`e_i` from the same Gram
    matrix (no second pass). The log ratio makes one :math:`\eta` (``rate``) work for
    any target from 1e-1 to 1e-5; the clip bounds each move to :math:`\eta`. A group
    above the target raises its :math:`\beta_i`; one below it lowers it, towards the
    smallest :math:`\beta_i` that holds it (for the exact L1 penalty, a finite one).
    A NaN error leaves that group's :math:`\beta_i` unchanged (never NaN, never
    negative) and shows as NaN in ``state.error``. ``every=k`` pulls with
    :math:`k\beta_i` and takes one dual step on the steps with count 0, k, 2k, ...;
    the others form no Gram matrix. Placement in a chain is as for
    :func:`add_orthogonality_penalty`; choosing the target and the rate, logging with
    :func:`orthogonality_metrics` and measurements are in the docs' *Choosing β* page.

    Args:
      target: :math:`\varepsilon > 0`, a float or an optax schedule of the count.
      rate: :math:`\eta > 0`, the most a multiplier moves per dual step (a float, or
        a schedule).
      beta_init: the multipliers' start, a float :math:`\ge 0`.
      mask: as in :func:`add_orthogonality_penalty`.
      dimension_numbers: as in :func:`add_orthogonality_penalty`.
      norm: the norm (see :data:`Norm`); ``"l1"`` is exact.
      subgradient: the kink convention (see :data:`Subgradient`); static.
      precision: the matmul precision, ``HIGHEST`` by default.
      off_diagonal: leave the diagonal out (of the pull and of the error).
      normalize: penalise (and measure) the cosines of unit-norm columns.
      normalize_eps: as in :func:`add_orthogonality_penalty`.
      every: dual steps on every ``every``-th update only: an int from 1 to 2**31 - 1
        (traced under ``optax.inject_hyperparams``, as for the penalty).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`AddOrthogonalityConstraintState` (inside ``optax.MaskedState`` with a
      mask). ``update`` needs ``params``.

    Raises:
      ValueError, TypeError: at construction, for a ``target`` or ``rate`` that is not
        finite and > 0, a negative ``beta_init``, a bad ``every``, ``norm``,
        ``subgradient`` or single-value ``mask``; at ``update``, for ``params=None``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import jax_orthopenalty as jop
      >>> tx = jop.add_orthogonality_constraint(1e-3, rate=0.5)
      >>> params = {"w": jnp.stack([jnp.eye(3, 2), 2 * jnp.eye(3, 2)], axis=1)}  # 2 groups
      >>> state = tx.init(params)
      >>> _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
      >>> state.beta["w"], state.error["w"]      # the orthonormal group keeps beta = 0
      (Array([0. , 0.5], dtype=float32), Array([0., 3.], dtype=float32))

    References:
      S. Boyd and L. Vandenberghe, *Convex Optimization*, 2004, §5.5 and §11.6
      (exact penalties); J. Platt and A. Barr, *Constrained differential
      optimization*, NeurIPS 1987 (gradient ascent on the multipliers).
    """
    options = make_options(
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        normalize_eps=NORMALIZE_EPS if normalize_eps is None else normalize_eps,
    )
    check_every(every)
    for name, value in (("target", target), ("rate", rate)):
        if not callable(value):
            _check_positive(name, value)
    check_beta(beta_init, jnp.dtype(jnp.float32), "beta_init")

    def init_fn(params: Any) -> AddOrthogonalityConstraintState:
        beta = selected_tree(
            lambda p, lay: _group_full(p, lay, beta_init), params, dimension_numbers
        )
        error = selected_tree(
            lambda p, lay: _group_full(p, lay, jnp.inf), params, dimension_numbers
        )
        return AddOrthogonalityConstraintState(jnp.zeros([], jnp.int32), beta, error)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AddOrthogonalityConstraintState]:
        if params is None:
            raise ValueError(no_params("add_orthogonality_constraint"))
        count, beta, error = cast(AddOrthogonalityConstraintState, state)
        count_next = jnp.asarray(optax.safe_increment(count))
        if updates is None:
            return updates, AddOrthogonalityConstraintState(count_next, beta, error)
        period = check_every(every)
        kernel = functools.partial(
            _kernel,
            period,
            _scalar(target, "target", count),
            _scalar(rate, "rate", count),
            options,
        )

        def add(carry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
            u, duals = map_selected_with(
                kernel, carry[0], params, dimension_numbers, _zip(*carry[1:])
            )
            return (u, *_unzip(duals))

        updates, beta, error = lazily(count, period, add, (updates, beta, error))
        return updates, AddOrthogonalityConstraintState(count_next, beta, error)

    return transformation(init_fn, update_fn, mask)


def _constraint_state(state: Any) -> AddOrthogonalityConstraintState:
    """The one :class:`AddOrthogonalityConstraintState` inside an optimizer's state."""

    def is_state(x: object) -> bool:
        return isinstance(x, AddOrthogonalityConstraintState)

    found = [x for x in jax.tree.leaves(state, is_leaf=is_state) if is_state(x)]
    if len(found) != 1:
        raise ValueError(
            "`state` must hold exactly one AddOrthogonalityConstraintState (the state of "
            "add_orthogonality_constraint, alone or inside a chain, optax.masked, "
            f"MultiSteps or inject_hyperparams); found {len(found)}."
        )
    return cast(AddOrthogonalityConstraintState, found[0])


def _leaf_metrics(phi: jax.Array, layout: Any) -> dict[str, jax.Array]:
    if not isinstance(layout, Layout):  # a ConvDims leaf: the operator's error only
        return {"error": _pull.error(phi, layout, make_options())}
    acc = accumulation_dtype(phi.dtype)
    gram = _contract.gram(layout, phi, precision=DEFAULT_PRECISION, acc=acc)
    # The eigenvalues of the n x n Gram are the squared singular values of the group.
    ev = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram), 0))
    if ev.shape[-1] == 0:
        ev = jnp.zeros((*ev.shape[:-1], 1), ev.dtype)
    return {
        "error": group_error(gram - eye_like(gram)),
        "sigma_min": ev[..., 0],
        "sigma_max": ev[..., -1],
    }


def orthogonality_metrics(
    params: Any,
    *,
    mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbers = None,
    state: Any = None,
) -> dict[str, dict[str, jax.Array]]:
    r"""How far each selected group is from orthonormal columns: a dict to log.

    For every selected leaf (chosen as :func:`add_orthogonality_penalty` chooses them),
    keyed by ``jax.tree_util.keystr`` of its path, a dict of arrays of its group shape:

    * ``"error"``: :math:`\max_{jk} |\Phi_i^\top\Phi_i - I|_{jk}`;
    * ``"sigma_min"``, ``"sigma_max"``: the extreme singular values of :math:`\Phi_i`,
      as :math:`\sqrt{\lambda(\Phi_i^\top\Phi_i)}` from ``eigvalsh`` of the
      :math:`n \times n` Gram matrix (no SVD of the :math:`l \times n` group, no host
      transfer; absolute accuracy about :math:`\sqrt{\epsilon}\,\sigma_{\max}` for the
      smallest, ample near orthonormal, where all are near 1);
    * ``"beta"``: the group's multiplier, where ``state`` is given and holds one for
      the leaf.

    A :class:`ConvDims` leaf gives ``"error"`` per operator (the conv operator's
    :math:`\max |X|`) and ``"beta"``, but no singular values: the operator's depend on
    the input size (:func:`conv_singular_values` gives them for one).

    Jittable (the keys are static). The logging recipe is in the docs' *Choosing β*
    page.

    Args:
      params: a pytree of parameters.
      mask: as in :func:`add_orthogonality_penalty`.
      dimension_numbers: as in :func:`add_orthogonality_penalty`.
      state: an optimizer state holding exactly one
        :class:`AddOrthogonalityConstraintState`, alone or nested (a chain,
        ``optax.masked``, ``MultiSteps``, ``inject_hyperparams``); ``None``: no beta.

    Returns:
      ``{keystr(path): {"error", "sigma_min", "sigma_max"[, "beta"]}}``.

    Raises:
      ValueError: a ``state`` with no, or several, constraint states.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> m = jop.orthogonality_metrics({"w": 2 * jnp.eye(3, 2), "b": jnp.ones(2)})
      >>> {name: float(v) for name, v in m["['w']"].items()}
      {'error': 3.0, 'sigma_min': 2.0, 'sigma_max': 2.0}
    """
    check_mask(mask)
    betas: dict[str, jax.Array] = {}
    if state is not None:
        flat = jax.tree_util.tree_flatten_with_path(
            _constraint_state(state).beta, is_leaf=lambda x: x is None
        )[0]
        betas = {jax.tree_util.keystr(p): b for p, b in flat if b is not None}
    out = {}
    for path, metrics in map_params(_leaf_metrics, masked_view(params, mask), dimension_numbers):
        key = jax.tree_util.keystr(path)
        if key in betas:
            metrics["beta"] = betas[key]
        out[key] = metrics
    return out
