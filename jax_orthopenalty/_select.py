r"""Which leaves a transform acts on, and in which layout: the selection they all share.

Every tree-wide entry point (the soft penalty, landing, the projection, the tree penalty,
:func:`summary`) acts on the *selected* leaves of a pytree of parameters, chosen in two
steps:

1. ``mask``, exactly as ``optax.masked`` takes it (a pytree of bools, a prefix of one, or a
   callable): a transform is wrapped in ``optax.masked`` (:func:`transformation`), and
   the tree-wide functions use the same view of the params (:func:`masked_view`).
2. ``dimension_numbers``: ``None`` (every floating array of rank >= 2, in the default
   layout), or a pytree or callable giving each leaf an :class:`OrthoDims` or ``None``
   (skip), matched to the leaves by path: an entry at a prefix covers the subtree.

Then one contract per leaf. :func:`map_selected` calls ``kernel(phi, u, layout) -> u'``
for every selected leaf ``phi`` and its update ``u``; :func:`map_params` calls
``fn(phi, layout)`` for the tree-wide values. The layout is validated once per leaf,
``phi`` is checked, several column axes are folded into one (and the result unfolded),
and any error names the leaf's path: the kernels see none of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._conv_layout import ConvLayout, make_conv_layout, prepare_kernel
from ._layout import Axes, ColumnAxis, VectorAxis, check_phi, make_axes

__all__ = [
    "ConvDims",
    "DimensionNumbers",
    "Dims",
    "Leaf",
    "MaskOrFn",
    "OrthoDims",
    "check_mask",
    "default_skip",
    "is_hole",
    "map_params",
    "map_selected",
    "map_selected_with",
    "masked_paths",
    "masked_view",
    "naming",
    "no_params",
    "select",
    "selected_tree",
    "shape_and_dtype",
    "transformation",
    "where",
]


class OrthoDims(NamedTuple):
    r"""The layout of one parameter leaf: which axes are vectors and which columns.

    The fields are the ``vector_axis`` and ``column_axis`` of
    :func:`orthogonality_penalty`: the vectors (one axis, or several flattened
    together) are contracted in the Gram matrix, the column axis (or several, flattened
    together) indexes the :math:`n` vectors that should be orthonormal, and every other
    axis is a group axis. Give one per leaf in ``dimension_numbers``, or ``None`` to skip
    a leaf, as ``optax.contrib.muon`` takes ``MuonDimensionNumbers``.
    :func:`dimension_numbers_for` gives them for flax and equinox models; the table of
    common layouts (Dense, Conv, equinox, stacked layers, wide matrices) is in the docs'
    *Layouts* page.

    Attributes:
      vector_axis: the axis of the vectors, or a tuple of axes flattened together.
        Default 0.
      column_axis: the axis that indexes the vectors of a group, or a tuple of axes
        flattened together (the rows of a wide conv kernel). Default -1.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> kernels = jnp.stack([jnp.eye(3, 2), 2 * jnp.eye(3, 2)])   # (layers, in, out)
      >>> dims = jop.OrthoDims(vector_axis=1, column_axis=2)
      >>> jop.orthogonality_error(kernels, vector_axis=dims.vector_axis,
      ...                         column_axis=dims.column_axis)      # one per layer
      Array([0., 3.], dtype=float32)
    """

    vector_axis: VectorAxis = 0
    column_axis: ColumnAxis = -1

    def layout(self, ndim: int) -> Axes:
        """The validated axes of a leaf of rank ``ndim``."""
        return make_axes(ndim, self.vector_axis, self.column_axis)

    def checked(self, phi: Any) -> tuple[jax.Array, Axes]:
        """The leaf as a floating array, and its validated axes."""
        arr = check_phi(phi)
        return arr, self.layout(arr.ndim)


class ConvDims(NamedTuple):
    r"""A conv kernel leaf penalised as the convolution *operator* it defines.

    In ``dimension_numbers`` in place of an :class:`OrthoDims`: the leaf is a conv
    kernel, and :func:`add_orthogonality_penalty`, :func:`tree_orthogonality_penalty`
    and :func:`summary` take it as :func:`conv_orthogonality_penalty` does (rows,
    :math:`\mathcal K\mathcal K^\top = I`, when the out channels are at most
    :math:`C S^d`, else columns). :func:`dimension_numbers_for` with
    ``conv="operator"`` gives one per conv kernel, with the module's own stride,
    dilation and groups; the docs' *Convolutions* page says when to use it.
    :func:`landing` and :func:`project_orthonormal` keep matrices orthonormal, not
    operators: they raise for a ``ConvDims`` leaf, naming it.

    Attributes:
      kernel_layout: ``"HWIO"`` (flax), ``"OIHW"`` (equinox, torch), or any string of
        one ``'O'``, one ``'I'`` and the spatial letters; extra leading axes of the
        leaf (``nn.scan``) are stacked operators.
      stride: the conv's stride, an int or one per spatial axis.
      dilation: the kernel dilation, an int or one per spatial axis.
      feature_group_count: the number of groups of a grouped conv.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> params = {"conv": jnp.zeros((3, 3, 2, 2)).at[1, 1].set(2 * jnp.eye(2))}
      >>> dims = {"conv": jop.ConvDims("HWIO", stride=1)}
      >>> jop.tree_orthogonality_penalty(params, 1.0, dimension_numbers=dims)
      Array(6., dtype=float32)
    """

    kernel_layout: str = "HWIO"
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    feature_group_count: int = 1

    def layout(self, ndim: int) -> ConvLayout:
        """The validated conv layout of a kernel of rank ``ndim``."""
        return make_conv_layout(
            ndim, self.kernel_layout, self.stride, self.dilation, self.feature_group_count
        )

    def checked(self, phi: Any) -> tuple[jax.Array, ConvLayout]:
        """The kernel as a floating array, and its validated conv layout."""
        return prepare_kernel(phi, tuple(self))


Dims: TypeAlias = OrthoDims | ConvDims


DimensionNumbers: TypeAlias = Any
"""``None``, a pytree of :class:`OrthoDims` or ``None`` (the structure of the params
or a prefix of it), or a callable from the params to such a pytree."""

MaskOrFn: TypeAlias = Any
"""``None``, a pytree of bools (the structure of the params or a prefix of it), or a
callable from the params to such a pytree: as ``optax.masked``."""

Path: TypeAlias = tuple[Any, ...]


def no_params(name: str) -> str:
    """The error for ``update(..., params=None)``, as optax raises it, naming ``name``."""
    return (
        f"{name} needs the current parameters: call `update(updates, state, params)` "
        "with `params`, not `params=None`."
    )


def where(path: Path) -> str:
    """A key path as a user reads it: ``['layer']['kernel']``, or "the root"."""
    return jax.tree_util.keystr(path) or "the root"


# --------------------------------------------------------------------------- mask


def is_hole(x: object) -> bool:
    """A place in the params with nothing to penalise: a masked-out or None leaf."""
    return x is None or isinstance(x, optax.MaskedNode)


def _is_dims_leaf(x: object) -> bool:
    return x is None or isinstance(x, (OrthoDims, ConvDims))


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


def check_mask(mask: MaskOrFn) -> None:
    """Raises for a ``mask`` that is a single value (what ``inject_hyperparams`` passes
    for a callable it took for a schedule)."""
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


def _unreachable_update(*_: Any, **__: Any) -> Any:
    raise AssertionError("only the init of optax.masked is used to build the masked view")


def masked_view(params: Any, mask: MaskOrFn) -> Any:
    """``params`` with every leaf that ``mask`` leaves out replaced by ``optax.MaskedNode``.

    ``optax.masked`` hands its inner ``init`` exactly this view, so it is taken from
    there: the tree-wide functions mask as ``optax.masked`` does inside the transforms,
    with no second copy of the rules (prefix masks, callable masks).
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


def masked_paths(view: Any) -> set[Path]:
    """The paths of the ``optax.MaskedNode`` places of a :func:`masked_view` (each covers
    its whole subtree of the params)."""
    flat = jax.tree_util.tree_flatten_with_path(view, is_leaf=is_hole)[0]
    return {path for path, x in flat if isinstance(x, optax.MaskedNode)}


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
        masked_view(params, mask)
        return inner.init(params)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        if updates is None:
            view = None if params is None else masked_view(params, mask)
            inner_state = cast(optax.MaskedState, state).inner_state
            _, inner_state = tx.update(None, inner_state, view)
            return None, optax.MaskedState(inner_state=inner_state)
        masked_view(updates, mask)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def transformation(
    init_fn: Callable[..., Any], update_fn: Callable[..., Any], mask: MaskOrFn
) -> optax.GradientTransformationExtraArgs:
    """The transform of ``init_fn``/``update_fn``, masked by ``mask`` unless it is None.

    Always a ``GradientTransformationExtraArgs`` (extra keyword arguments of
    ``update``, such as ``value=``, are accepted and ignored), as optax's
    optimizers and ``optax.masked`` are, so it can be called where they can.
    """
    check_mask(mask)

    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
        del extra_args  # none is used
        return update_fn(updates, state, params)

    tx = optax.GradientTransformationExtraArgs(init_fn, update)
    return tx if mask is None else _masked(tx, mask)


# --------------------------------------------------------------------------- layouts


def default_skip(x: Any) -> str | None:
    """Why ``dimension_numbers=None`` skips the leaf ``x``, or None if it selects it.

    The default selection: every real or complex floating array of rank >= 2. Complex
    leaves are selected too (unitary groups): a path that cannot take them raises,
    naming the leaf, rather than skipping them silently.
    """
    known = shape_and_dtype(x)
    if known is None:
        return f"not an array ({type(x).__name__})"
    shape, dtype = known
    if len(shape) < 2:
        return f"rank {len(shape)} < 2"
    if not jnp.issubdtype(dtype, jnp.inexact):  # integers, bools, PRNG keys
        return f"dtype {dtype} is not floating"
    return None


def shape_and_dtype(x: Any) -> tuple[tuple[int, ...], Any] | None:
    """The shape and dtype of an array, an abstract array (``jax.ShapeDtypeStruct``) or a
    Python or NumPy number; None for anything else (a function, a string)."""
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return (), jnp.result_type(x)
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if isinstance(shape, tuple) and dtype is not None and not isinstance(x, (str, bytes)):
        return shape, dtype
    return None


def _match(leaves: list[tuple[Path, Any]], dims: Any) -> list[Dims | None]:
    """Gives each leaf the entry of ``dims`` at its path or at its nearest prefix.

    Linear in the number of leaves: one dictionary lookup per prefix of each path.
    """
    by_path: dict[Path, Dims | None] = {}
    for path, entry in jax.tree_util.tree_flatten_with_path(dims, is_leaf=_is_dims_leaf)[0]:
        if not _is_dims_leaf(entry):
            raise TypeError(
                "`dimension_numbers` must give an OrthoDims, a ConvDims or None for every "
                "leaf, got "
                f"{entry!r} at {where(path)}."
            )
        by_path[path] = entry
    holes: set[Path] = set()
    used: set[Path] = set()
    out: list[Dims | None] = []
    for path, x in leaves:
        if is_hole(x):
            holes.update(path[:k] for k in range(len(path) + 1))
            out.append(None)
            continue
        found = next((path[:k] for k in range(len(path) + 1) if path[:k] in by_path), None)
        if found is None:
            raise ValueError(
                "`dimension_numbers` does not match the params: it has no entry "
                f"(OrthoDims, ConvDims or None) for the leaf at {where(path)}. It must have "
                "the structure of the params, or be a prefix of it."
            )
        used.add(found)
        out.append(by_path[found])
    hole_paths = {path for path, x in leaves if is_hole(x)}
    for path in by_path.keys() - used:
        # An entry for a masked-out (or None) part of the params, or inside one, is fine.
        inside = any(path[:k] in hole_paths for k in range(len(path) + 1))
        if path not in holes and not inside:
            raise ValueError(
                "`dimension_numbers` does not match the params: its entry at "
                f"{where(path)} is not a leaf or subtree of the params."
            )
    return out


class Leaf(NamedTuple):
    """A leaf of the params as the selection sees it."""

    path: Path  # the key path, for error messages
    phi: Any  # the leaf (an array, or a hole: MaskedNode or None)
    dims: Dims | None  # its layout, or None: not selected


def select(params: Any, dimension_numbers: DimensionNumbers) -> tuple[Any, list[Leaf]]:
    """Decides which leaves are selected, and with which layout: the one rule.

    ``params`` may hold ``optax.MaskedNode`` (from ``mask``) and ``None`` leaves; both
    are skipped.

    Returns:
      The structure of ``params`` with those holes as leaves, and every leaf.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_hole)
    if dimension_numbers is None:
        # The default: every floating-point array of rank >= 2, in the default layout.
        dims: list[Dims | None] = [
            None if is_hole(x) or default_skip(x) else OrthoDims() for _, x in flat
        ]
    else:
        given = (
            dimension_numbers(params)
            if _is_function(dimension_numbers, _is_dims_leaf)
            else dimension_numbers
        )
        dims = _match(flat, given)
    return treedef, [Leaf(path, x, d) for (path, x), d in zip(flat, dims, strict=True)]


# --------------------------------------------------------------------------- per leaf

try:  # not public in jax 0.10; where it moves, those errors pass through unnamed
    from jax._src.core import ShardingTypeError as _ShardingTypeError

    _SHARDING_ERRORS: tuple[type[Exception], ...] = (_ShardingTypeError,)
except ImportError:  # pragma: no cover
    _SHARDING_ERRORS = ()
_NAMED_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, *_SHARDING_ERRORS)


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Errors raised inside name the leaf's path.

    ValueError, TypeError and JAX's ShardingTypeError (an Explicit mesh's sharding
    rules, at trace time) are re-raised as the same type, the leaf's path in front.
    """
    try:
        yield
    except _NAMED_ERRORS as e:
        raise type(e)(f"params leaf {where(path)}: {e}") from e


def map_selected(
    kernel: Callable[[jax.Array, jax.Array, Any], jax.Array],
    updates: Any,
    params: Any,
    dimension_numbers: DimensionNumbers,
) -> Any:
    """``kernel(phi, u, layout)`` for every selected leaf ``phi`` and its update ``u``.

    ``phi`` is checked (a floating array), ``layout`` validated, and the column axes of
    ``phi`` and ``u`` folded into one; the kernel's result is unfolded. The updates keep
    their own structure: a ``None`` update (a leaf or a whole subtree, as optax allows)
    stays ``None``, and unselected leaves, masked-out places included, pass through.
    """
    treedef, leaves = select(params, dimension_numbers)
    # A hole sits in its own place (MaskedNode is a node: updates have one there too).
    slots = treedef.unflatten([leaf.phi if is_hole(leaf.phi) else leaf for leaf in leaves])

    def one(u: Any, slot: Any) -> Any:
        if u is None or not isinstance(slot, Leaf) or slot.dims is None:
            return u
        with naming(slot.path):
            phi, axes = _prepare(slot)
            u = jnp.asarray(u)
            if u.shape != phi.shape:
                raise ValueError(f"`updates` has shape {u.shape}, the params leaf {phi.shape}.")
            return axes.unfold(kernel(axes.fold(phi), axes.fold(u), axes.inner), u.shape)

    return jax.tree.map(one, updates, slots, is_leaf=lambda x: x is None)


def map_params(
    fn: Callable[[jax.Array, Any], Any], params: Any, dimension_numbers: DimensionNumbers
) -> list[tuple[Path, Any]]:
    """``(path, fn(phi, layout))`` for every selected leaf of ``params`` (a
    :func:`masked_view`), in the order of the leaves; errors name the leaf."""
    out = []
    for leaf in select(params, dimension_numbers)[1]:
        if leaf.dims is not None:
            with naming(leaf.path):
                phi, axes = _prepare(leaf)
                out.append((leaf.path, fn(axes.fold(phi), axes.inner)))
    return out


def selected_tree(
    fn: Callable[[jax.Array, Any], Any], params: Any, dimension_numbers: DimensionNumbers
) -> Any:
    """A tree of the params' structure: ``fn(phi, layout)`` at every selected leaf and
    ``None`` elsewhere (per-leaf state, such as one multiplier per group)."""
    treedef, leaves = select(params, dimension_numbers)
    out: list[Any] = []
    for leaf in leaves:
        if leaf.dims is None:
            out.append(None)
            continue
        with naming(leaf.path):
            phi, axes = _prepare(leaf)
            out.append(fn(axes.fold(phi), axes.inner))
    return treedef.unflatten(out)


def map_selected_with(
    kernel: Callable[[jax.Array, jax.Array, Any, Any], tuple[jax.Array, Any]],
    updates: Any,
    params: Any,
    dimension_numbers: DimensionNumbers,
    state: Any,
) -> tuple[Any, Any]:
    """:func:`map_selected` with per-leaf state: ``kernel(phi, u, layout, s) -> (u', s')``
    for every selected leaf, ``s`` its entry in ``state`` (a :func:`selected_tree`).

    Returns the new updates and the new state (unchanged where an update is ``None``).
    """
    treedef, leaves = select(params, dimension_numbers)
    entries = treedef.flatten_up_to(state)
    new_state = list(entries)
    slots = treedef.unflatten(
        [leaf.phi if is_hole(leaf.phi) else (k, leaf) for k, leaf in enumerate(leaves)]
    )

    def one(u: Any, slot: Any) -> Any:
        if u is None or not isinstance(slot, tuple) or slot[1].dims is None:
            return u
        k, leaf = slot
        with naming(leaf.path):
            phi, axes = _prepare(leaf)
            u = jnp.asarray(u)
            if u.shape != phi.shape:
                raise ValueError(f"`updates` has shape {u.shape}, the params leaf {phi.shape}.")
            out, new_state[k] = kernel(axes.fold(phi), axes.fold(u), axes.inner, entries[k])
            return axes.unfold(out, u.shape)

    # A slot (k, leaf) is a tuple: a subtree below the update's leaf, handed to `one` whole.
    new_updates = jax.tree.map(one, updates, slots, is_leaf=lambda x: x is None)
    return new_updates, treedef.unflatten(new_state)


def _prepare(leaf: Leaf) -> tuple[jax.Array, Folding]:
    """The leaf, checked, and how the kernels see it: an OrthoDims leaf with several
    column axes is folded to one; a ConvDims leaf is passed as it is."""
    assert leaf.dims is not None
    phi, layout = leaf.dims.checked(leaf.phi)
    return phi, layout if isinstance(layout, Axes) else _Unfolded(layout)


class _Unfolded(NamedTuple):
    """A layout the kernels take as it is (a conv kernel's): no folding."""

    inner: ConvLayout

    def fold(self, x: jax.Array) -> jax.Array:
        return x

    def unfold(self, y: jax.Array, shape: Any) -> jax.Array:
        del shape
        return y


Folding: TypeAlias = Axes | _Unfolded
