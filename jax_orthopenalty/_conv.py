r"""The orthogonality penalty of a convolution *operator*, and its exact spectrum.

A conv (cross-correlation, as :func:`jax.lax.conv_general_dilated` computes it)
:math:`y[m, p] = \sum_c \sum_u K[m, c, u]\, x[c, S p + u]` is reduced to stride 1 by
space-to-depth: :math:`K'[m, (c, r), v] = K[m, c, S v + r]`, :math:`r \in \{0..S-1\}^d`,
:math:`v \in \{0..k'-1\}^d`, :math:`k' = \lceil k/S\rceil` (zero where
:math:`S v + r \ge k`). The rows residual, the penalty and its gradient (by the
symmetry :math:`X[m, m', \delta] = X[m', m, -\delta]`, one more correlation) are

.. math::

    X[m, m', \delta] = \sum_{c', v} K'[m, c', v]\, K'[m', c', v + \delta]
    - [m = m'][\delta = 0], \qquad L = \beta \sum f(X),

    \frac{\partial L}{\partial K'[a, c, w]}
    = \beta \sum_{m', \delta} (F + \tilde F)[a, m', \delta]\, K'[m', c, w + \delta],
    \quad F = f'(X),\ \tilde F[a, m', \delta] = F[m', a, -\delta];

the columns residual swaps the two channel axes. The rows X is formed from the kernel
itself, correlated with itself at stride :math:`S` (OCNN's
:math:`\mathrm{Conv}(K, K, S)`, without the zero taps of :math:`K'`); the columns case
needs :math:`K'`. Dilation zero-inserts the kernel; groups and leading stack axes are
independent operators. These rearrangements (:func:`._conv_layout.arrange`) stay
outside the custom_vjp, and autodiff carries the gradient back through them. Inside,
operators are arrays ``(L, G, R, Q, *k)``: ``L`` the flattened stack axes, ``G`` the
groups, ``R`` the channels of the Gram and ``Q`` the contracted ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from ._contract import explicit_sharding
from ._conv_layout import ConvLayout, arrange, prepare_kernel
from ._layout import DEFAULT_PRECISION, accumulation_dtype, check_beta
from ._matrix import max_or_nan
from ._penalty import same_varying_axes
from ._rules import Norm, Rule, Subgradient, make_rule

__all__ = [
    "conv_error",
    "conv_orthogonality_error",
    "conv_orthogonality_penalty",
    "conv_orthogonality_penalty_grad",
    "conv_penalty",
    "conv_pull",
]

Stride = int | Sequence[int]


# --------------------------------------------------------------------------- layout


def _operators(
    kernel: jax.Array, layout: ConvLayout
) -> tuple[Callable[[jax.Array], jax.Array], tuple[int, ...]]:
    """How the penalty sees a kernel: the arrangement and the correlation's stride.

    Rows: the (dilated) kernel itself, correlated with itself at stride S (OCNN's
    ``Conv(K, K, S)``, no zero taps from space-to-depth). Columns: the polyphase
    kernel with its channel axes swapped, at stride 1.
    """
    rows = layout.rows(kernel.shape)
    fn = functools.partial(arrange, layout=layout, polyphase=not rows, swap=not rows)
    return fn, layout.stride if rows else (1,) * layout.spatial_ndim


def _over_operators(fn: Callable[..., Any], *arrays: jax.Array) -> Any:
    """Applies ``fn``, written for ``(N, ...)`` arrays with a static ``N``, to
    ``(L, G, ...)`` arrays.

    With a static ``L`` the two axes are merged (one grouped conv for all); with a
    symbolic ``L`` (``jax.export``), whose size a conv's group count cannot take, it
    maps over ``L`` with :func:`jax.lax.map`.
    """
    lg = arrays[0].shape[:2]
    if not all(isinstance(n, int) for n in lg):
        return jax.lax.map(lambda xs: fn(*xs), arrays)
    n = lg[0] * lg[1]
    if n == 0:
        probe = [
            jax.ShapeDtypeStruct((1, *a.shape[2:]), a.dtype)  # type: ignore[no-untyped-call]
            for a in arrays
        ]
        shapes = jax.eval_shape(fn, *probe)
        return jax.tree.map(lambda t: jnp.zeros((*lg, *t.shape[1:]), t.dtype), shapes)
    out = fn(*(a.reshape((n, *a.shape[2:])) for a in arrays))
    return jax.tree.map(lambda o: o.reshape((*lg, *o.shape[1:])), out)


def _numbers(d: int, lhs: tuple[int, int], out: tuple[int, int]) -> jax.lax.ConvDimensionNumbers:
    spatial = tuple(range(2, 2 + d))
    return jax.lax.ConvDimensionNumbers((*lhs, *spatial), (0, 1, *spatial), (*out, *spatial))


def _autocorrelation(a: jax.Array, stride: tuple[int, ...], precision: Any) -> jax.Array:
    """``(N, R, Q, *k) -> (N, R, R, *(2k'-1))``: the Gram at every overlapping shift
    that is a multiple of ``stride`` (``k' = ceil(k / S)``).

    One grouped conv: the input's batch is ``m'`` and its features ``(n, c)``, the
    kernel's out features ``(n, m)``; ``out[(n, m), m', delta]`` is the Gram
    ``sum K[m, c, u] K[m', c, u + S delta]``.
    """
    n, r, q, *k = a.shape
    kp = [-(-w // st) for w, st in zip(k, stride, strict=True)]
    lhs = jnp.swapaxes(a, 0, 1).reshape((r, n * q, *k))
    return jax.lax.conv_general_dilated(
        lhs,
        a.reshape((n * r, q, *k)),
        window_strides=stride,
        padding=[((w - 1) * st,) * 2 for w, st in zip(kp, stride, strict=True)],
        dimension_numbers=_numbers(len(k), (0, 1), (1, 0)),
        feature_group_count=n,
        precision=precision,
        preferred_element_type=a.dtype,
    ).reshape((n, r, r, *(2 * w - 1 for w in kp)))


def _correlate_back(
    a: jax.Array, w: jax.Array, stride: tuple[int, ...], precision: Any
) -> jax.Array:
    """``sum_{m', delta} W[n, a, m', delta] K[n, m', c, u + S delta]``: one grouped conv.

    Written with ``W`` as the conv's input and the flipped kernel as its filter (a
    small filter over a larger input, the shape XLA's convolutions are fast at; the
    transposed form, the 2k'-1 taps of ``W`` over the kernel, is up to 100x slower
    on CPU). The input ``flip(W)`` has batch ``a``, features ``(n, m')``, and is
    dilated by the stride; the filter ``flip(K)`` has out features ``(n, c)`` and in
    features ``m'``; padding ``k - 1 - S (k' - 1)`` each side gives ``k`` outputs.
    Channels-last (``NHWC``/``HWIO``), the layout XLA:CPU's convolutions run in.
    """
    n, r, q, *k = a.shape
    d = len(k)
    spatial = tuple(range(3, 3 + d))
    kp = [(s + 1) // 2 for s in w.shape[3:]]
    pad = [(kk - 1 - st * (p - 1),) * 2 for kk, st, p in zip(k, stride, kp, strict=True)]
    lhs = jnp.moveaxis(jnp.flip(w, spatial), (1, 0, 2), (0, -2, -1))  # (a, *D, n, m')
    rhs = jnp.moveaxis(jnp.flip(a, spatial), (1, 0, 2), (-3, -2, -1))  # (*k, m', n, c)
    out = jax.lax.conv_general_dilated(
        lhs.reshape((r, *w.shape[3:], n * r)),
        rhs.reshape((*k, r, n * q)),
        window_strides=(1,) * d,
        padding=pad,
        lhs_dilation=stride,
        dimension_numbers=jax.lax.ConvDimensionNumbers(
            (0, d + 1, *range(1, d + 1)), (d + 1, d, *range(d)), (0, d + 1, *range(1, d + 1))
        ),
        feature_group_count=n,
        precision=precision,
        preferred_element_type=a.dtype,
    )  # (a, *k, (n, c))
    return jnp.moveaxis(out.reshape((r, *k, n, q)), (0, -2, -1), (1, 0, 2))


# --------------------------------------------------------------------------- math


def _residual(a: jax.Array, stride: tuple[int, ...], precision: Any) -> jax.Array:
    """X = the autocorrelation minus the identity at shift 0: ``(L, G, R, R, *(2k'-1))``."""
    fn = functools.partial(_autocorrelation, stride=stride, precision=precision)
    x: jax.Array = _over_operators(fn, a)
    r, centre = x.shape[2], tuple(s // 2 for s in x.shape[4:])
    eye = jnp.eye(r, dtype=x.dtype)[None, None]
    return x.at[(slice(None),) * 4 + centre].add(-eye)


def _derivative(rule: Rule, x: jax.Array) -> jax.Array:
    """F = f'(X), NaN for every operator whose X has a non-finite entry.

    Where the autocorrelation overflows, the signs (or clipped slopes) of its
    infinite entries are finite but say nothing about the gradient: the operator's
    gradient is NaN instead, never finite and wrong.
    """
    f = rule.derivative(x).astype(x.dtype)
    finite = jnp.all(jnp.isfinite(x), axis=tuple(range(2, x.ndim)), keepdims=True)
    return jnp.where(finite, f, jnp.nan)


def _pullback(
    a: jax.Array, f: jax.Array, scale: jax.Array, stride: tuple[int, ...], precision: Any
) -> jax.Array:
    """d(scale * sum f(X))/dK' from F: symmetrise, then one correlation per operator."""
    spatial = tuple(range(4, f.ndim))
    w = scale * (f + jnp.flip(jnp.swapaxes(f, 2, 3), axis=spatial))
    grad: jax.Array = _over_operators(
        functools.partial(_correlate_back, stride=stride, precision=precision), a, w
    )
    return grad


def _error(x: jax.Array, layout: ConvLayout, kernel_shape: Sequence[int]) -> jax.Array:
    """max |X| per operator, NaN for an operator with NaN, shaped ``operator_shape``."""
    e = max_or_nan(jnp.abs(x), axis=tuple(range(2, x.ndim)))
    return e.reshape(layout.operator_shape(kernel_shape))


def _operator_scale(
    scale: ArrayLike, layout: ConvLayout, kernel_shape: Sequence[int], dtype: Any
) -> jax.Array:
    """A scalar, or one multiplier per operator broadcast onto ``(L, G, R, R, *shifts)``."""
    s = jnp.asarray(scale).astype(dtype)
    if s.ndim == 0:
        return s
    shape = layout.operator_shape(kernel_shape)
    if s.shape != tuple(shape):
        raise ValueError(
            f"`scale` must be a scalar or have the operator shape {tuple(shape)}, got "
            f"shape {s.shape}."
        )
    lead = kernel_shape[: layout.lead]
    s = s.reshape((math.prod(lead), layout.feature_group_count))
    return s.reshape((*s.shape, 1, 1, *(1,) * layout.spatial_ndim))


# --------------------------------------------------------------------------- custom_vjp


@dataclasses.dataclass(frozen=True)
class _Options:
    """Everything static about one penalty: hashable, a nondiff argument."""

    rule: Rule
    precision: Any
    stride: tuple[int, ...] = ()  # the correlation's stride (rows: S, columns: 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _penalty(opts: _Options, a: jax.Array, beta: jax.Array) -> jax.Array:
    return _penalty_fwd(opts, a, beta)[0]


def _penalty_fwd(
    opts: _Options, a: jax.Array, beta: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    x = _residual(a, opts.stride, opts.precision)
    total = jnp.sum(opts.rule.value(x)).astype(a.dtype)
    # Only F (small: R x R per shift) and the kernel are kept for the backward pass.
    f = _derivative(opts.rule, x)
    return beta.astype(a.dtype) * total, (a, beta, f, total)


def _penalty_bwd(
    opts: _Options, saved: tuple[jax.Array, jax.Array, jax.Array, jax.Array], ct: jax.Array
) -> tuple[jax.Array, jax.Array]:
    a, beta, f, total = saved
    # After jax.checkpoint, scan or cond the residual beta can come back as a typed
    # Python scalar constant rather than an array.
    beta = jnp.asarray(beta)
    ct = jnp.asarray(ct).astype(a.dtype)
    grad = _pullback(a, f, ct * beta.astype(a.dtype), opts.stride, opts.precision)
    return grad, (ct * total).astype(beta.dtype)


_penalty.defvjp(_penalty_fwd, _penalty_bwd)


# --------------------------------------------------------------------------- checks


def check_conv_rule(norm: Norm, subgradient: Subgradient) -> Rule:
    """The entrywise rule of ``norm``; the per-group norms raise ``ValueError``."""
    rule = make_rule(norm, subgradient)
    if rule.per_group:
        raise ValueError(
            f"`norm`={norm!r} is a per-group matrix norm, not supported for the conv "
            "operator penalty: use an entrywise norm ('l1', 'squared' or huber(delta))."
        )
    return rule


def _prepare(
    kernel: ArrayLike,
    beta: ArrayLike,
    geometry: tuple[Any, ...],
    norm: Norm,
    subgradient: Subgradient,
    precision: Any,
) -> tuple[jax.Array, ConvLayout, _Options, jax.Array]:
    """Every check, at trace time: the kernel, its layout, the rule and ``beta``."""
    k, layout = prepare_kernel(kernel, geometry)
    rule = check_conv_rule(norm, subgradient)
    # A callable subgradient is checked by the rule where it is applied, on X.
    acc = accumulation_dtype(k.dtype)
    return k, layout, _Options(rule, precision), check_beta(beta, acc)


# --------------------------------------------------------------------------- internal API


def _whole(kernel: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """On an Explicit mesh (``jax.set_mesh``), the kernel replicated, and a function that
    gives a kernel-shaped result the kernel's sharding back; elsewhere both are the
    identity. The operator's autocorrelation mixes every channel and tap, and a conv
    kernel is small: one all-gather of it, where XLA's partitioner inserts the same on
    an Auto mesh."""
    sharding = explicit_sharding(kernel)
    if sharding is None:
        return kernel, lambda y: y
    whole = NamedSharding(sharding.mesh, PartitionSpec())  # type: ignore[no-untyped-call]
    back = functools.partial(jax.sharding.reshard, out_shardings=sharding)
    return jax.sharding.reshard(kernel, whole), back  # type: ignore[no-untyped-call]


def conv_pull(
    kernel: jax.Array, scale: ArrayLike, layout: ConvLayout, rule: Rule, precision: Any
) -> tuple[jax.Array, jax.Array]:
    """The gradient and the per-operator error from one forward pass.

    Returns ``(dL/dK, max|X|)``: the gradient of :func:`conv_orthogonality_penalty`
    with ``beta`` replaced by ``scale`` (a scalar, or one multiplier per operator, of
    ``layout.operator_shape(kernel.shape)``), shaped like the kernel in its dtype,
    and the error of each operator (from the ``X`` the gradient already formed), of
    the operator shape, in the accumulation dtype.
    """
    if rule.per_group:
        raise ValueError("`rule` must be entrywise: the per-group norms are not supported.")
    kernel, back = _whole(jnp.asarray(kernel))
    acc = accumulation_dtype(kernel.dtype)
    arrange, stride = _operators(kernel, layout)
    a, pull = jax.vjp(arrange, kernel.astype(acc))
    x = _residual(a, stride, precision)
    s = _operator_scale(scale, layout, kernel.shape, acc)
    (grad,) = pull(_pullback(a, _derivative(rule, x), s, stride, precision))
    return back(grad.astype(kernel.dtype)), _error(x, layout, kernel.shape)


def conv_penalty(
    kernel: jax.Array, beta: ArrayLike, layout: ConvLayout, rule: Rule, precision: Any
) -> jax.Array:
    """The penalty (the custom_vjp) of a checked kernel in a validated layout."""
    acc = accumulation_dtype(kernel.dtype)
    beta_arr = check_beta(beta, acc)
    kernel = _whole(kernel)[0]  # autodiff gives its gradient the kernel's sharding back
    arrange, stride = _operators(kernel, layout)
    opts = _Options(rule, precision, stride)
    value = _penalty(opts, *same_varying_axes(arrange(kernel.astype(acc)), beta_arr))
    return value.astype(kernel.dtype)


def conv_error(kernel: jax.Array, layout: ConvLayout, precision: Any) -> jax.Array:
    """max |X| per operator, of ``layout.operator_shape(kernel.shape)`` (for metrics)."""
    kernel = _whole(jnp.asarray(kernel))[0]
    arrange, stride = _operators(kernel, layout)
    a = arrange(kernel.astype(accumulation_dtype(kernel.dtype)))
    return _error(_residual(a, stride, precision), layout, kernel.shape)


# --------------------------------------------------------------------------- public


def conv_orthogonality_penalty(
    kernel: ArrayLike,
    beta: ArrayLike = 1.0,
    *,
    kernel_layout: str = "HWIO",
    stride: Stride = 1,
    dilation: Stride = 1,
    feature_group_count: int = 1,
    norm: Norm = "l1",
    subgradient: Subgradient = "zero",
    precision: Any = DEFAULT_PRECISION,
) -> jax.Array:
    r"""The orthogonality penalty of a convolution operator, closed-form backward pass.

    For the conv :math:`y[m, p] = \sum_c \sum_u K[m, c, u]\, x[c, S p + u]` with its
    stride-1 polyphase kernel :math:`K'` (space-to-depth,
    :math:`k' = \lceil k / S \rceil` taps per axis):

    .. math::

        L = \beta \sum_{m, m', \delta} f\Bigl(\sum_{c', v} K'[m, c', v]\,
            K'[m', c', v + \delta] - [m = m'][\delta = 0]\Bigr),

    OCNN's :math:`\lVert \mathrm{Conv}(K, K, S, P) - I_{r_0}\rVert` with
    :math:`P = \lfloor (k-1)/S \rfloor S`, when :math:`M \le C S^d` (rows,
    :math:`\mathcal K \mathcal K^\top = I`); otherwise the same with the two channel
    axes swapped (columns, :math:`\mathcal K^\top\mathcal K = I`). On a circular
    input of size :math:`N` it is :math:`\sum f(\mathcal K\mathcal K^\top - I)`
    (or :math:`\mathcal K^\top\mathcal K`) over the dense operator divided by
    :math:`(N/S)^d`. The backward pass is one conv of :math:`K'` with
    :math:`F + \tilde F`, :math:`F = f'(X)`; at an exactly orthogonal conv the
    gradient is exactly 0 under ``subgradient="zero"``. Forward mode raises
    ``TypeError``: use :func:`conv_orthogonality_penalty_grad`. See
    ``docs/convolutions.md``.

    Args:
      kernel: the conv kernel, real floating, in ``kernel_layout``; extra leading
        axes are a stack of independent operators (``nn.scan``).
      beta: the strength: a Python float or int, a NumPy or JAX scalar, possibly
        traced. Its gradient is the unscaled penalty.
      kernel_layout: one ``'O'``, one ``'I'`` and one letter per spatial axis:
        ``"HWIO"`` (flax), ``"OIHW"`` (equinox, torch), ``"WIO"``, ``"OIDHW"``...
      stride: the conv's stride, an int or one per spatial axis.
      dilation: the kernel (rhs) dilation, an int or one per spatial axis.
      feature_group_count: ``G``: the kernel's ``I`` axis holds ``C / G`` channels and
        each of the ``G`` blocks of out channels is an independent operator.
      norm: ``"l1"``, ``"squared"`` or :func:`huber` ``(delta)``, entrywise on X.
      subgradient: the derivative of :math:`|x|` at 0 for ``"l1"`` (``"zero"``,
        ``"positive"``, ``"negative"``, :func:`deadzone` ``(tol)`` or a callable).
      precision: the conv precision, ``HIGHEST`` by default.

    Returns:
      The scalar penalty in the kernel's real dtype (accumulated in float32 for
      bfloat16 and float16). NaN in the kernel gives NaN, and a NaN gradient.

    Raises:
      ValueError: a malformed ``kernel_layout``, ``stride``, ``dilation`` or
        ``feature_group_count``, a ``kernel`` of the wrong rank or with an empty axis,
        a per-group ``norm`` (``"spectral"``, ``"max"``), a bad concrete ``beta``.
      TypeError: a complex or non-floating ``kernel``, options of the wrong type.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> k = jnp.zeros((3, 3, 2, 2)).at[1, 1].set(jnp.eye(2))   # HWIO identity conv
      >>> jop.conv_orthogonality_penalty(k)
      Array(0., dtype=float32)
      >>> float(jnp.abs(jax.grad(jop.conv_orthogonality_penalty)(k)).max())
      0.0
      >>> jop.conv_orthogonality_penalty(2 * k)       # X = 3 I at shift 0: |3| + |3|
      Array(6., dtype=float32)

    References:
      Wang, Chen, Chakraborty and Yu, *Orthogonal Convolutional Neural Networks*,
      CVPR 2020. Achour, Malgouyres and Mamalet, *Existence, stability and
      scalability of orthogonal convolutional neural networks*, JMLR 2022.
    """
    geometry = (kernel_layout, stride, dilation, feature_group_count)
    k, layout, opts, beta_arr = _prepare(kernel, beta, geometry, norm, subgradient, precision)
    return conv_penalty(k, beta_arr, layout, opts.rule, precision)


def conv_orthogonality_penalty_grad(
    kernel: ArrayLike,
    beta: ArrayLike = 1.0,
    *,
    kernel_layout: str = "HWIO",
    stride: Stride = 1,
    dilation: Stride = 1,
    feature_group_count: int = 1,
    norm: Norm = "l1",
    subgradient: Subgradient = "zero",
    precision: Any = DEFAULT_PRECISION,
) -> jax.Array:
    r"""The closed-form gradient of :func:`conv_orthogonality_penalty`, as plain JAX.

    .. math::

        \frac{\partial L}{\partial K'[a, c, w]}
        = \beta \sum_{m', \delta} (F + \tilde F)[a, m', \delta]\, K'[m', c, w + \delta],
        \qquad \tilde F[a, m', \delta] = F[m', a, -\delta],

    carried back through space-to-depth, dilation and the layout. The same
    computation as the penalty's backward pass, so it equals ``jax.grad`` of it, but
    an ordinary function: :func:`jax.jvp` and :func:`jax.jacfwd` work through it.

    Args:
      kernel: the conv kernel (see :func:`conv_orthogonality_penalty`).
      beta: the strength, a Python float or a scalar array.
      kernel_layout: the kernel's axes, ``"HWIO"`` by default.
      stride: the conv's stride.
      dilation: the kernel dilation.
      feature_group_count: the number of groups.
      norm: ``"l1"``, ``"squared"`` or :func:`huber` ``(delta)``.
      subgradient: the kink convention of ``"l1"``.
      precision: the conv precision, ``HIGHEST`` by default.

    Returns:
      An array of the kernel's shape and dtype.

    Raises:
      ValueError, TypeError: as :func:`conv_orthogonality_penalty`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> k = jnp.zeros((1, 2, 1)).at[0, 0, 0].set(2.0)   # WIO: one tap, X = 3
      >>> jop.conv_orthogonality_penalty_grad(k, kernel_layout="WIO")[:, :, 0]  # 2 K sign(X)
      Array([[4., 0.]], dtype=float32)
    """
    geometry = (kernel_layout, stride, dilation, feature_group_count)
    k, layout, opts, beta_arr = _prepare(kernel, beta, geometry, norm, subgradient, precision)
    acc = accumulation_dtype(k.dtype)
    return conv_pull(k, beta_arr.astype(acc), layout, opts.rule, opts.precision)[0]


def conv_orthogonality_error(
    kernel: ArrayLike,
    *,
    kernel_layout: str = "HWIO",
    stride: Stride = 1,
    dilation: Stride = 1,
    feature_group_count: int = 1,
    precision: Any = DEFAULT_PRECISION,
) -> jax.Array:
    r"""How far each conv operator is from orthogonal: :math:`\max |X|`.

    .. math::

        e = \max_{m, m', \delta} |X[m, m', \delta]|

    with :math:`X` the residual of :func:`conv_orthogonality_penalty` (rows or
    columns, whichever applies). It is 0 exactly when the operator is orthogonal
    (:math:`\mathcal K\mathcal K^\top = I` or :math:`\mathcal K^\top\mathcal K = I`).

    Args:
      kernel: the conv kernel (see :func:`conv_orthogonality_penalty`).
      kernel_layout: the kernel's axes, ``"HWIO"`` by default.
      stride: the conv's stride.
      dilation: the kernel dilation.
      feature_group_count: the number of groups.
      precision: the conv precision, ``HIGHEST`` by default.

    Returns:
      One error per operator: shape = the leading stack axes, then ``(G,)`` when
      ``feature_group_count > 1`` (a scalar for a plain kernel), in the kernel's
      dtype (float32 for bfloat16 and float16). NaN for an operator with NaN.

    Raises:
      ValueError, TypeError: as :func:`conv_orthogonality_penalty`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> k = jnp.zeros((3, 3, 2, 2)).at[1, 1].set(jnp.eye(2))
      >>> jop.conv_orthogonality_error(k)
      Array(0., dtype=float32)
      >>> jop.conv_orthogonality_error(k.at[0, 0].set(0.5 * jnp.eye(2)))  # shifts overlap
      Array(0.5, dtype=float32)
    """
    k, layout = prepare_kernel(kernel, (kernel_layout, stride, dilation, feature_group_count))
    return conv_error(k, layout, precision)
