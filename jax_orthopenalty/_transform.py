r"""The optax transform, and the same penalty summed over a pytree for a loss.

:func:`add_orthogonality_penalty` is to the orthogonality penalty what
``optax.add_decayed_weights`` is to weight decay: a ``GradientTransformation`` that
adds :math:`\partial L / \partial \Phi` to the incoming updates, for every selected
leaf :math:`\Phi` of the parameters,

.. math::

    u_\Phi \leftarrow u_\Phi + \beta_t\, \Phi_i \bigl(F_i + F_i^\top\bigr)
    \quad\text{for every group } i, \qquad
    F_i = f'\bigl(\Phi_i^\top \Phi_i - I\bigr),

with the closed-form gradient of :func:`orthogonality_penalty_grad` (no autodiff of
the penalty). :func:`tree_orthogonality_penalty` is the matching scalar,
:math:`\sum_\Phi L_\beta(\Phi)`, for adding to a loss instead. Both choose their
leaves in one place (``_select``): ``mask`` first, through ``optax.masked``, then
``dimension_numbers``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from ._layout import DEFAULT_PRECISION, NORMALIZE_EPS, check_beta
from ._penalty import orthogonality_penalty, orthogonality_penalty_grad
from ._rules import Norm, Subgradient

__all__ = [
    "AddOrthogonalityPenaltyState",
    "DimensionNumbers",
    "OrthoDims",
    "add_orthogonality_penalty",
    "tree_orthogonality_penalty",
]


class OrthoDims(NamedTuple):
    r"""The layout of one parameter leaf: which axes are vectors and which columns.

    The fields are the ``vector_axis`` and ``column_axis`` of
    :func:`orthogonality_penalty`: the vectors (one axis, or several flattened
    together) are contracted in the Gram matrix, the column axis indexes the
    :math:`n` vectors that should be orthonormal, and every other axis is a group
    axis. Give one per leaf in ``dimension_numbers``, or ``None`` to skip a leaf,
    as ``optax.contrib.muon`` takes ``MuonDimensionNumbers``.

    Common layouts (the columns are the output units, so the output size must not
    exceed the vector size for the penalty to reach 0):

    * ``(l, m, n)``, m groups of ``l x n``: ``OrthoDims()``, the default.
    * flax ``Dense`` kernel ``(in, out)``: ``OrthoDims()``.
    * conv kernel HWIO ``(h, w, in, out)``:
      ``OrthoDims(vector_axis=(0, 1, 2), column_axis=3)``.
    * equinox ``Linear`` weight ``(out, in)``: ``OrthoDims(vector_axis=1, column_axis=0)``.
    * kernels stacked by ``nn.scan``/``jax.lax.scan``, ``(layers, in, out)``:
      ``OrthoDims(vector_axis=1, column_axis=2)``; the layer axis is a group axis.
      (The default layout would take the layer axis for the vectors.)
    * a wide matrix (more outputs than inputs, ``n > l``): its rows,
      ``OrthoDims(vector_axis=1, column_axis=0)`` for ``(in, out)``.

    For a flax (linen, nnx) or equinox model, :func:`dimension_numbers_for` gives
    every leaf's layout from its module type, and :func:`summary` prints what a
    transform selects and how.

    Attributes:
      vector_axis: the axis of the vectors, or a tuple of axes flattened together
        (contracted in the Gram matrix). Default 0.
      column_axis: the axis that indexes the vectors of a group. Default -1.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> kernels = jnp.stack([jnp.eye(3, 2), 2 * jnp.eye(3, 2)])   # (layers, in, out)
      >>> dims = jop.OrthoDims(vector_axis=1, column_axis=2)
      >>> jop.orthogonality_error(kernels, vector_axis=dims.vector_axis,
      ...                         column_axis=dims.column_axis)      # one per layer
      Array([0., 3.], dtype=float32)
    """

    vector_axis: int | tuple[int, ...] = 0
    column_axis: int = -1


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


DimensionNumbers: TypeAlias = Any
"""``None``, a pytree of :class:`OrthoDims` or ``None`` (the structure of the params
or a prefix of it), or a callable from the params to such a pytree."""

MaskOrFn: TypeAlias = Any
"""``None``, a pytree of bools (the structure of the params or a prefix of it), or a
callable from the params to such a pytree: as ``optax.masked``."""


def _no_params(name: str) -> str:
    """The error for ``update(..., params=None)``, as optax raises it, naming ``name``."""
    return (
        f"{name} needs the current parameters: call `update(updates, state, params)` "
        "with `params`, not `params=None`."
    )


# --------------------------------------------------------------------------- selection


def _is_hole(x: object) -> bool:
    """A place in the params with nothing to penalise: a masked-out or None leaf."""
    return x is None or isinstance(x, optax.MaskedNode)


def _is_dims_leaf(x: object) -> bool:
    return x is None or isinstance(x, OrthoDims)


def _is_mask_leaf(x: object) -> bool:
    return isinstance(x, (bool, np.bool_)) or (
        getattr(x, "shape", None) == () and getattr(x, "dtype", None) == np.bool_
    )


def _is_function(x: object, is_entry: Callable[[Any], bool]) -> bool:
    """Whether ``x`` is to be called on the params, rather than read as a pytree.

    A pytree whose leaves are all entries (``OrthoDims``/``None`` for
    ``dimension_numbers``, bools for ``mask``) is a tree even if it is callable: an
    ``equinox.Module`` of them is callable (its ``__call__`` is the model's). Any other
    callable, a plain function or a module holding arrays, is a function.
    """
    if not callable(x):
        return False
    leaves, treedef = jax.tree_util.tree_flatten(x, is_leaf=is_entry)
    if jax.tree_util.treedef_is_leaf(treedef) and not is_entry(x):
        return True
    return not all(is_entry(leaf) for leaf in leaves)


def _mask_for_optax(mask: MaskOrFn) -> MaskOrFn:
    """``mask`` as ``optax.masked`` takes it: a callable tree of bools is a tree."""
    if callable(mask) and not _is_function(mask, _is_mask_leaf):
        return lambda _: mask
    return mask


def _default_skip(x: Any) -> str | None:
    """Why ``dimension_numbers=None`` skips the array ``x``, or None if it selects it.

    The default selection: every real or complex floating array of rank >= 2. Complex
    leaves are selected too (unitary groups): a path that cannot take them raises,
    naming the leaf, rather than skipping them silently.
    """
    ndim = jnp.ndim(x)
    if ndim < 2:
        return f"rank {ndim} < 2"
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return f"dtype {dtype} is not floating"
    return None


def _is_default_target(x: Any) -> bool:
    """Penalised by ``dimension_numbers=None`` (see ``_default_skip``)."""
    return not _is_hole(x) and _default_skip(x) is None


def _is_prefix(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return b[: len(a)] == a


def _unreachable_update(*_: Any, **__: Any) -> Any:
    raise AssertionError("only the init of optax.masked is used to build the masked view")


def _masked_view(params: Any, mask: MaskOrFn) -> Any:
    """``params`` with every leaf that ``mask`` leaves out replaced by ``optax.MaskedNode``.

    ``optax.masked`` hands its inner ``init`` exactly this view, so it is taken from
    there: :func:`tree_orthogonality_penalty` masks as ``optax.masked`` does inside
    :func:`add_orthogonality_penalty`, with no second copy of the rules (prefix
    masks, callable masks).
    """
    if mask is None:
        return params
    capture = optax.GradientTransformation(lambda view: view, _unreachable_update)
    try:
        masked = optax.masked(capture, _mask_for_optax(mask)).init(params)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "`mask` does not match the params: it must be a pytree of bools with the "
            "structure of the params (or a prefix of it), or a callable returning one. "
            f"{type(e).__name__}: {e}"
        ) from e
    return cast(optax.MaskedState, masked).inner_state


def _masked(
    tx: optax.GradientTransformation, mask: MaskOrFn
) -> optax.GradientTransformationExtraArgs:
    """``optax.masked(tx, mask)``, with a mismatched ``mask`` named in the error.

    Like ``optax.masked`` it is a ``GradientTransformationExtraArgs`` (extra keyword
    arguments of ``update`` reach ``tx``), and like ``tx`` itself it maps
    ``updates=None`` to ``None`` (``optax.masked`` would fail on it).
    """
    inner = optax.masked(tx, _mask_for_optax(mask))

    def init_fn(params: optax.Params) -> optax.OptState:
        _masked_view(params, mask)
        return inner.init(params)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        if updates is None:
            view = None if params is None else _masked_view(params, mask)
            inner_state = cast(optax.MaskedState, state).inner_state
            _, inner_state = tx.update(None, inner_state, view)
            return None, optax.MaskedState(inner_state=inner_state)
        _masked_view(updates, mask)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _transformation(
    init_fn: Callable[..., Any], update_fn: Callable[..., Any], mask: MaskOrFn
) -> optax.GradientTransformationExtraArgs:
    """The transform of ``init_fn``/``update_fn``, masked by ``mask`` unless it is None.

    Always a ``GradientTransformationExtraArgs`` (extra keyword arguments of
    ``update``, such as ``value=``, are accepted and ignored), as optax's
    optimizers and ``optax.masked`` are, so it can be called where they can.
    """

    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
        del extra_args  # none is used
        return update_fn(updates, state, params)

    tx = optax.GradientTransformationExtraArgs(init_fn, update)
    return tx if mask is None else _masked(tx, mask)


def _check_mask(mask: MaskOrFn) -> None:
    if mask is None or _is_function(mask, _is_mask_leaf):
        return
    leaves = jax.tree.leaves(mask)
    # An empty container ({}, [], ()) is a tree of no leaves (optax takes it), not a value.
    if len(leaves) == 1 and leaves[0] is mask:
        raise ValueError(
            "`mask` must be a pytree of bools with the structure of the params (or a "
            "prefix of it), or a callable returning one; got the single value "
            f"{mask!r}. This is what optax.inject_hyperparams passes when it takes a "
            "callable mask for a schedule: list it in static_args, "
            "optax.inject_hyperparams(jop.add_orthogonality_penalty, "
            'static_args=("mask", "dimension_numbers"))(beta=..., mask=fn).'
        )


def _check_every(every: object) -> int | jax.Array:
    """``every``: an int >= 1, the period of lazy regularisation.

    A Python (or NumPy, or concrete JAX) integer is static. A traced integer scalar,
    which is what ``optax.inject_hyperparams`` passes unless ``every`` is in
    ``static_args``, is taken as it is: the period is then read at run time.
    """
    if isinstance(every, jax.core.Tracer):
        if every.shape != () or not jnp.issubdtype(every.dtype, jnp.integer):
            raise TypeError(f"`every` must be an integer scalar, got a traced {every.aval}.")
        return cast(jax.Array, every)
    is_int_array = getattr(every, "shape", None) == () and jnp.issubdtype(
        getattr(every, "dtype", None) or np.float64, jnp.integer
    )
    if isinstance(every, (bool, np.bool_)) or not (isinstance(every, int) or is_int_array):
        raise TypeError(
            "`every` must be an int >= 1 (the period of lazy regularisation), got "
            f"{every!r} of type {type(every).__name__}."
        )
    period = int(cast(Any, every))
    if period < 1:
        raise ValueError(
            f"`every` must be >= 1 (apply the penalty every k-th step), got {period}."
        )
    return period


def _times(period: int | jax.Array, strength: jax.Array) -> jax.Array:
    """``period * strength`` in strength's dtype; NaN for a traced period below 1."""
    if isinstance(period, int):
        return strength if period == 1 else period * strength
    k = period.astype(strength.dtype)
    return jnp.where(period >= 1, k, jnp.nan) * strength


class _Leaf(NamedTuple):
    path: Any  # the key path, for error messages
    phi: Any  # the leaf (an array, or a hole: MaskedNode or None)
    dims: OrthoDims | None  # its layout, or None to skip it


def _select(
    params: Any, dimension_numbers: DimensionNumbers
) -> tuple[jax.tree_util.PyTreeDef, list[_Leaf]]:
    """Decides which leaves are penalised, and with which layout.

    The single leaf-selection rule of the package. ``params`` may hold
    ``optax.MaskedNode`` (from ``mask``) and ``None`` leaves; both are skipped.

    Returns:
      The structure of ``params`` with those holes as leaves, and per leaf its path,
      the leaf and an :class:`OrthoDims` or ``None`` (skip).
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_hole)
    if dimension_numbers is None:
        # The default: every floating-point array of rank >= 2, in the default layout.
        layouts = [OrthoDims() if _is_default_target(x) else None for _, x in path_leaves]
    else:
        dims = (
            dimension_numbers(params)
            if _is_function(dimension_numbers, _is_dims_leaf)
            else dimension_numbers
        )
        layouts = _match(path_leaves, dims)
    leaves = [_Leaf(path, x, d) for (path, x), d in zip(path_leaves, layouts, strict=True)]
    return treedef, leaves


def _map_selected(
    fn: Callable[[_Leaf, Any], Any],
    updates: Any,
    params: Any,
    dimension_numbers: DimensionNumbers,
) -> Any:
    """``fn(leaf, u)`` for every selected leaf of ``params`` and its update ``u``.

    The updates keep their own structure: a ``None`` update (a leaf or a whole
    subtree, as optax allows) stays ``None``, and unselected leaves, masked-out
    ``optax.MaskedNode`` places included, pass through untouched.
    """
    treedef, leaves = _select(params, dimension_numbers)
    # A hole sits in its own place (MaskedNode is a node: updates have one there too).
    slots = treedef.unflatten([leaf.phi if _is_hole(leaf.phi) else leaf for leaf in leaves])

    def one(u: Any, slot: Any) -> Any:
        if u is None or not isinstance(slot, _Leaf) or slot.dims is None:
            return u
        return fn(slot, u)

    return jax.tree.map(one, updates, slots, is_leaf=lambda x: x is None)


try:  # not public in jax 0.10; where it moves, those errors pass through unnamed
    from jax._src.core import ShardingTypeError as _ShardingTypeError

    _SHARDING_ERRORS: tuple[type[Exception], ...] = (_ShardingTypeError,)
except ImportError:  # pragma: no cover
    _SHARDING_ERRORS = ()
_NAMED_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, *_SHARDING_ERRORS)


@contextlib.contextmanager
def _naming(leaf: _Leaf) -> Iterator[None]:
    """Errors raised inside name the leaf's path.

    ValueError, TypeError and JAX's ShardingTypeError (an Explicit mesh's sharding
    rules, at trace time) are re-raised as the same type, the leaf's path in front.
    """
    try:
        yield
    except _NAMED_ERRORS as e:
        where = jax.tree_util.keystr(leaf.path) or "the root"
        raise type(e)(f"params leaf {where}: {e}") from e


def _on_leaf(fn: Any, leaf: _Leaf, beta: Any, options: dict[str, Any]) -> jax.Array:
    """``fn(phi, beta, layout, **options)``, with errors naming the leaf's path."""
    assert leaf.dims is not None
    with _naming(leaf):
        return cast(
            jax.Array,
            fn(
                leaf.phi,
                beta,
                vector_axis=leaf.dims.vector_axis,
                column_axis=leaf.dims.column_axis,
                **options,
            ),
        )


def _match(path_leaves: list[tuple[Any, Any]], dims: Any) -> list[OrthoDims | None]:
    """Gives each leaf the entry of ``dims`` at its path or at a prefix of it."""
    entries = jax.tree_util.tree_flatten_with_path(dims, is_leaf=_is_dims_leaf)[0]
    by_path: dict[tuple[Any, ...], OrthoDims | None] = {}
    for path, entry in entries:
        if not _is_dims_leaf(entry):
            raise TypeError(
                "`dimension_numbers` must give an OrthoDims or None for every leaf, got "
                f"{entry!r} at {jax.tree_util.keystr(path) or 'the root'}."
            )
        by_path[path] = entry
    holes = [path for path, x in path_leaves if _is_hole(x)]
    used: set[tuple[Any, ...]] = set()
    out: list[OrthoDims | None] = []
    for path, x in path_leaves:
        if _is_hole(x):
            out.append(None)
            continue
        found = [path[:k] for k in range(len(path) + 1) if path[:k] in by_path]
        if not found:
            raise ValueError(
                "`dimension_numbers` does not match the params: it has no OrthoDims or "
                f"None for the leaf at {jax.tree_util.keystr(path) or 'the root'}. It must "
                "have the structure of the params, or be a prefix of it."
            )
        used.add(found[0])
        out.append(by_path[found[0]])
    for path in by_path.keys() - used:
        # An entry for a masked-out (or None) part of the params is fine.
        if not any(_is_prefix(h, path) or _is_prefix(path, h) for h in holes):
            raise ValueError(
                "`dimension_numbers` does not match the params: its entry at "
                f"{jax.tree_util.keystr(path) or 'the root'} is not a leaf or subtree "
                "of the params."
            )
    return out


# --------------------------------------------------------------------------- public


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

    For every selected leaf :math:`\Phi` of the params, with groups
    :math:`\Phi_i` (see :class:`OrthoDims`),

    .. math::

        u_\Phi \leftarrow u_\Phi + \frac{\partial L_{\beta_t}}{\partial \Phi},
        \qquad
        L_\beta(\Phi) = \beta \sum_i \sum_{jk} f\bigl(\Phi_i^\top\Phi_i - I\bigr)_{jk},
        \qquad
        \frac{\partial L_\beta}{\partial \Phi_i} = \beta\, \Phi_i \bigl(F_i + F_i^\top\bigr),

    computed in closed form by :func:`orthogonality_penalty_grad` (one Gram matrix
    and one matmul per group, no autodiff of the penalty), with
    :math:`\beta_t` = ``beta(count)`` for a schedule. Leaves that are not selected
    pass through untouched. It is modelled on ``optax.add_decayed_weights``.

    **Coupled or decoupled.** Where it sits in the chain decides what the penalty
    means:

    * Before ``scale_by_adam`` (``optax.chain(add_orthogonality_penalty(beta),
      optax.adam(lr))``) it is *coupled*, L2-style: exactly the same as adding
      :func:`tree_orthogonality_penalty` to the loss. Adam then normalises the
      penalty's gradient together with the task's, so its strength is relative to
      the task gradient's scale per entry.
    * After ``scale_by_adam`` (``optax.chain(optax.scale_by_adam(),
      add_orthogonality_penalty(beta), optax.scale_by_learning_rate(lr))``) it is
      *decoupled*, AdamW-style: the step is :math:`-\eta\,(\text{adam direction} +
      \partial L_\beta / \partial \Phi)`, so the penalty pulls with strength
      :math:`\eta\beta` whatever the task gradient's scale.

    **Lazy regularisation** (``every=k``, StyleGAN2's trick). On the steps whose
    count is a multiple of :math:`k` (0, k, 2k, ...) the transform adds
    :math:`k\,\partial L_{\beta_t}/\partial\Phi`; on the others it adds nothing
    and forms no Gram matrix (one ``lax.cond`` per update), so the penalty costs
    about :math:`1/k` of what it costs at ``every=1``. Over :math:`k` steps the
    penalty's total pull is the same. It is safe where the penalty is a small
    term that moves the parameters slowly compared with :math:`k` steps of the
    task: a decoupled placement (after ``scale_by_adam``, or with SGD), where the
    pull is applied as it is, :math:`k` times less often and :math:`k` times
    stronger. A coupled placement before ``scale_by_adam`` feeds Adam a spike of
    :math:`k\beta` every :math:`k` steps, which Adam's second moment averages
    into its scale of every step; measure before relying on it
    (docs/performance.md has both placements at k = 1, 4, 16). Under
    ``jax.vmap`` of the update, the ``cond`` becomes a select and both
    branches run: no saving there.

    **With optax.inject_hyperparams.** ``beta`` can be injected (and then changed
    in ``state.hyperparams["beta"]``). So can ``every``: ``inject_hyperparams``
    traces it (then the period is read at run time, and a period below 1 gives
    NaN updates); name it in ``static_args=("every",)`` to keep it static, which
    at ``every=1`` also leaves out the ``lax.cond``. ``inject_hyperparams`` takes
    every callable argument for a schedule, so a callable ``mask`` or
    ``dimension_numbers`` (or a callable ``subgradient``, such as :func:`deadzone`)
    must be named in ``static_args``::

        optax.inject_hyperparams(
            jop.add_orthogonality_penalty, static_args=("mask", "dimension_numbers")
        )(beta=1e-3, mask=fn)

    Without it, the mask would be ``fn(count)`` (a single bool, which raises here)
    and ``dimension_numbers`` would be ``fn(count)``: usually ``None``, the default
    selection, silently.

    Args:
      beta: the strength :math:`\beta`: a float, a scalar array, or an optax
        schedule (a function of the step count, kept in the state).
      mask: which leaves to penalise, as ``optax.masked`` takes it: a pytree of
        bools with the structure of the params, a prefix of it (a bool for a whole
        subtree), or a callable from the params to one. ``True`` means penalise.
        A pytree whose leaves are all bools is a tree even if it is callable (an
        ``equinox.Module`` or flax ``nnx.Module`` of bools); any other callable is
        called.
      dimension_numbers: the layout of each leaf. ``None`` (default): every leaf of
        rank >= 2 with a floating dtype, in the default layout ``OrthoDims()``
        (vectors on axis 0, columns on the last axis: right for flax ``Dense``
        kernels and ``(l, m, n)`` tensors, not for conv kernels, equinox
        ``(out, in)`` weights or scan-stacked kernels; see :class:`OrthoDims`);
        lower-rank leaves (biases, scales) and integer or boolean leaves
        (counters, masks) are skipped. Otherwise a pytree with the structure of
        the params, or a prefix of it, of :class:`OrthoDims` (penalise with that
        layout) or ``None`` (skip), or a callable from the params to one, like
        ``muon_weight_dimension_numbers`` in ``optax.contrib.muon``. A callable
        receives the params with ``optax.MaskedNode`` in place of the leaves that
        ``mask`` leaves out. An :class:`OrthoDims` that does not fit its leaf
        raises :func:`orthogonality_penalty`'s ``ValueError``, prefixed with the
        leaf's path, when the update is traced. A pytree whose leaves are all
        :class:`OrthoDims` or ``None`` is a tree even if it is callable (an
        ``equinox.Module`` or flax ``nnx.Module`` built with ``jax.tree.map`` over the
        model); any other callable is called.
      norm: the norm: ``"l1"``, ``"squared"``, :func:`huber`, ``"spectral"``,
        :func:`spectral` or ``"max"`` (see :func:`orthogonality_penalty`).
      subgradient: the kink convention (see :func:`orthogonality_penalty`); static.
      precision: the matmul precision, ``HIGHEST`` by default.
      off_diagonal: leave the diagonal of :math:`\Phi_i^\top\Phi_i - I` out.
      normalize: penalise the cosines of unit-norm columns.
      double_sided: add the :math:`\Phi_i\Phi_i^\top - I` term (entrywise norms).
      normalize_eps: the floor on the squared column norm under ``normalize``: a
        static Python float, ``1e-14`` for Keras 3; ``None`` (default) is ``1e-12``.
        (``None`` rather than ``1e-12`` because ``optax.inject_hyperparams`` would
        turn a float default into a traced hyperparameter; pass a float through it
        only with ``static_args=("normalize_eps",)``.)
      every: apply the penalty on every ``every``-th update only, scaled by
        ``every`` (lazy regularisation, above). An int >= 1; 1 (the default)
        applies it on every update.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra keyword arguments of
      ``update`` are accepted and ignored, as by optax's optimizers), wrapped in
      ``optax.masked`` when ``mask`` is given. Its state is
      :class:`AddOrthogonalityPenaltyState` (inside ``optax.MaskedState`` with a
      mask). ``update`` needs ``params``; it returns the updates in their own
      dtypes (bfloat16 stays bfloat16), and ``None`` updates (a leaf, a subtree or
      all of them) as ``None``, as optax's transforms do.

    Raises:
      ValueError, TypeError: at construction, for an unknown ``norm`` or
        ``subgradient``, options of the wrong type, a non-scalar ``beta``, an
        ``every`` that is not an int >= 1 or a mask that is a single value; at
        ``update``, for ``params=None``, a ``dimension_numbers`` that does not match
        the params, or a layout that does not fit its leaf.

    Examples:
      Coupled, L2-style: the same updates as Adam on the loss plus the penalty.

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

      Decoupled, AdamW-style: the penalty's gradient skips Adam's scaling.

      >>> decoupled = optax.chain(
      ...     optax.scale_by_adam(),
      ...     jop.add_orthogonality_penalty(0.1),
      ...     optax.scale_by_learning_rate(1e-2),
      ... )
      >>> u, _ = decoupled.update(jax.grad(task)(params), decoupled.init(params), params)
      >>> scale = optax.scale_by_adam()
      >>> d, _ = scale.update(jax.grad(task)(params), scale.init(params))
      >>> pull = jop.orthogonality_penalty_grad(params["w"], 0.1)
      >>> bool(jnp.allclose(u["w"], -1e-2 * (d["w"] + pull)))
      True
      >>> bool(jnp.allclose(u["b"], -1e-2 * d["b"]))          # rank 1: skipped
      True

      Layouts and a mask: an equinox-style ``(out, in)`` weight, and a mask that
      leaves one matrix out.

      >>> params = {"enc": jnp.eye(3, 2).T, "dec": 2 * jnp.eye(2)}   # (out, in) each
      >>> tx = jop.add_orthogonality_penalty(
      ...     1.0,
      ...     dimension_numbers=jop.OrthoDims(vector_axis=1, column_axis=0),
      ...     mask={"enc": True, "dec": False},
      ... )
      >>> zeros = jax.tree.map(jnp.zeros_like, params)
      >>> u, _ = tx.update(zeros, tx.init(params), params)
      >>> u["enc"]                        # rows of (out, in) orthonormal: no pull
      Array([[0., 0., 0.],
             [0., 0., 0.]], dtype=float32)
      >>> u["dec"]                        # masked out: untouched
      Array([[0., 0.],
             [0., 0.]], dtype=float32)

      With ``optax.inject_hyperparams`` and a callable mask:

      >>> fn = lambda p: {"enc": False, "dec": True}
      >>> tx = optax.inject_hyperparams(
      ...     jop.add_orthogonality_penalty, static_args=("mask", "dimension_numbers")
      ... )(beta=0.5, mask=fn)
      >>> state = tx.init(params)
      >>> state.hyperparams["beta"] = jnp.array(1.0)       # changes the next update
      >>> u, _ = tx.update(zeros, state, params)
      >>> u["dec"]                        # 2 * beta * dec @ sign(dec^T dec - I), beta = 1
      Array([[4., 0.],
             [0., 4.]], dtype=float32)

      Lazy: every 4th step, 4 times the pull.

      >>> tx = jop.add_orthogonality_penalty(1.0, every=4)
      >>> state = tx.init(params)
      >>> pulls = []
      >>> for _ in range(5):
      ...     u, state = tx.update(zeros, state, params)
      ...     pulls.append(float(u["dec"][0, 0]))
      >>> pulls
      [16.0, 0.0, 0.0, 0.0, 16.0]
    """
    _check_mask(mask)
    _check_every(every)
    options: dict[str, Any] = dict(
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
        normalize_eps=NORMALIZE_EPS if normalize_eps is None else normalize_eps,
    )
    # Trace the core once on a small probe, so that bad options raise here and
    # with the core's own messages, not at the first update.
    probe = jax.ShapeDtypeStruct((2, 2), jnp.float32)  # type: ignore[no-untyped-call]
    jax.eval_shape(functools.partial(orthogonality_penalty_grad, **options), probe)
    if not callable(beta):
        check_beta(beta, jnp.dtype(jnp.float32))

    def init_fn(params: Any) -> AddOrthogonalityPenaltyState:
        del params
        return AddOrthogonalityPenaltyState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AddOrthogonalityPenaltyState]:
        if params is None:
            raise ValueError(_no_params("add_orthogonality_penalty"))
        count = cast(AddOrthogonalityPenaltyState, state).count
        new_state = AddOrthogonalityPenaltyState(count=jnp.asarray(optax.safe_increment(count)))
        if updates is None or (isinstance(beta, (int, float)) and beta == 0):
            return updates, new_state
        strength = check_beta(beta(count) if callable(beta) else beta, jnp.dtype(jnp.float32))

        period = _check_every(every)  # traced under optax.inject_hyperparams

        def add(u: optax.Updates) -> optax.Updates:
            scale = _times(period, strength)

            def one(leaf: _Leaf, g: jax.Array) -> jax.Array:
                pull = _on_leaf(orthogonality_penalty_grad, leaf, scale, options)
                with _naming(leaf):  # updates sharded unlike their params fail here
                    return g + pull.astype(g.dtype)

            return cast(optax.Updates, _map_selected(one, u, params, dimension_numbers))

        if isinstance(period, int) and period == 1:
            return add(updates), new_state
        # Lazy: the steps with count 0, k, 2k, ... add k * beta dL/dPhi; the other
        # branch forms no Gram matrix. (Under vmap, cond becomes select: both run.)
        due = count % period == 0
        return cast(optax.Updates, jax.lax.cond(due, add, lambda u: u, updates)), new_state

    return _transformation(init_fn, update_fn, mask)


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
    :func:`add_orthogonality_penalty` chooses them (same ``mask`` and
    ``dimension_numbers`` rules, same code), and each term is
    :func:`orthogonality_penalty`, so ``jax.grad`` of it uses the closed-form
    backward pass and equals what the transform adds to the updates (with a
    callable ``mask``, the transform calls it on the updates and this function on
    the params: a mask that depends only on structure and shapes selects the same).

    Args:
      params: a pytree of parameters.
      beta: the strength, a float or a scalar array (may be traced; its gradient
        is the unscaled sum).
      mask: as in :func:`add_orthogonality_penalty`.
      dimension_numbers: as in :func:`add_orthogonality_penalty`.
      norm: ``"l1"``, ``"squared"``, :func:`huber`, ``"spectral"``, :func:`spectral`
        or ``"max"``.
      subgradient: the kink convention (see :func:`orthogonality_penalty`).
      precision: the matmul precision, ``HIGHEST`` by default.
      off_diagonal: leave the diagonal out.
      normalize: penalise the cosines of unit-norm columns.
      double_sided: add the :math:`\Phi_i\Phi_i^\top - I` term (entrywise norms).
      normalize_eps: the floor on the squared column norm under ``normalize``.

    Returns:
      A scalar: the sum of the leaves' penalties, in their promoted dtype; a
      float32 zero when no leaf is selected.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> params = {"w": 2 * jnp.eye(2), "b": jnp.ones(2), "k": jnp.eye(2)}
      >>> jop.tree_orthogonality_penalty(params, 0.5)    # w: 0.5 * 2 * |4 - 1|; b skipped
      Array(3., dtype=float32)
      >>> jop.tree_orthogonality_penalty(params, 0.5, mask={"w": False, "b": True, "k": True})
      Array(0., dtype=float32)
    """
    _check_mask(mask)
    check_beta(beta, jnp.dtype(jnp.float32))  # also when no leaf is selected
    options: dict[str, Any] = dict(
        norm=norm,
        subgradient=subgradient,
        precision=precision,
        off_diagonal=off_diagonal,
        normalize=normalize,
        double_sided=double_sided,
        normalize_eps=normalize_eps,
    )
    _, leaves = _select(_masked_view(params, mask), dimension_numbers)
    terms = [
        _on_leaf(orthogonality_penalty, leaf, beta, options)
        for leaf in leaves
        if leaf.dims is not None
    ]
    if not terms:
        return jnp.zeros((), jnp.float32)
    # Leaves of several dtypes (bfloat16 and float32) add up in their promoted dtype,
    # cast explicitly, so that strict dtype promotion holds too.
    with jax.numpy_dtype_promotion("standard"):
        dtype = functools.reduce(jnp.promote_types, (t.dtype for t in terms))
    return functools.reduce(jnp.add, (t.astype(dtype) for t in terms))
