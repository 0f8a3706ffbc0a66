r"""Which axes of a convolution kernel are what, and the conv's static options.

A kernel in the layout ``kernel_layout`` (a string like ``jax.lax``'s: ``"HWIO"`` for
flax, ``"OIHW"`` for equinox and torch) has one axis ``O`` of out channels :math:`M`,
one axis ``I`` of in channels :math:`C / G` (``G = feature_group_count``) and
:math:`d \ge 1` spatial axes, in the order the string names them. Extra *leading*
axes beyond the string (a stack of layers from ``nn.scan``) are independent
operators. Everything here but :func:`arrange` runs at trace time on shapes and
Python values; it imports nothing from the rest of the package.

The operator penalty reduces a stride-:math:`S` conv to a stride-1 one by
space-to-depth: with the dilated kernel size :math:`k` per spatial axis, the
polyphase kernel :math:`K'` has :math:`C' = (C/G) \prod_i S_i` in channels and
:math:`k'_i = \lceil k_i / S_i \rceil` taps per axis. The *rows* case
(:math:`\mathcal K \mathcal K^\top - I`) applies when :math:`M / G \le C'`, the
*columns* case (:math:`\mathcal K^\top \mathcal K - I`) otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["ConvLayout", "arrange", "check_kernel_array", "make_conv_layout"]


@dataclasses.dataclass(frozen=True)
class ConvLayout:
    """A validated kernel layout and the conv's stride, dilation and groups.

    Hashable and compared by value, so it can be a static argument. Axis indices
    are absolute (they count the leading stack axes).
    """

    ndim: int  # the kernel's rank, leading stack axes included
    kernel_layout: str
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    feature_group_count: int

    @property
    def lead(self) -> int:
        """How many leading stack axes the kernel has beyond ``kernel_layout``."""
        return self.ndim - len(self.kernel_layout)

    @property
    def spatial_ndim(self) -> int:
        """:math:`d`, the number of spatial axes."""
        return len(self.kernel_layout) - 2

    @property
    def out_axis(self) -> int:
        return self.lead + self.kernel_layout.index("O")

    @property
    def in_axis(self) -> int:
        return self.lead + self.kernel_layout.index("I")

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        return tuple(self.lead + i for i, c in enumerate(self.kernel_layout) if c not in "OI")

    @property
    def canonical_order(self) -> tuple[int, ...]:
        """The transpose that brings a kernel to ``(*lead, O, I, *spatial)``."""
        return (*range(self.lead), self.out_axis, self.in_axis, *self.spatial_axes)

    @property
    def phases(self) -> int:
        r""":math:`\prod_i S_i`, the in-channel factor of space-to-depth."""
        return math.prod(self.stride)

    def kernel_size(self, kernel_shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial size of the kernel, per axis, before dilation."""
        return tuple(int(kernel_shape[a]) for a in self.spatial_axes)

    def dilated_size(self, kernel_shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial size of the zero-inserted (dilated) kernel: ``D (k - 1) + 1``."""
        k = self.kernel_size(kernel_shape)
        return tuple(d * (n - 1) + 1 for d, n in zip(self.dilation, k, strict=True))

    def reduced_size(self, kernel_shape: Sequence[int]) -> tuple[int, ...]:
        r""":math:`k' = \lceil k / S \rceil` per axis: the polyphase kernel's taps."""
        k = self.dilated_size(kernel_shape)
        return tuple(-(-n // s) for n, s in zip(k, self.stride, strict=True))

    def channels(self, kernel_shape: Sequence[int]) -> tuple[int, int]:
        r"""Per group, :math:`(M/G, C')` with :math:`C' = (C/G) \prod_i S_i`."""
        m = int(kernel_shape[self.out_axis]) // self.feature_group_count
        return m, int(kernel_shape[self.in_axis]) * self.phases

    def rows(self, kernel_shape: Sequence[int]) -> bool:
        r"""Whether the penalty is on rows, :math:`\mathcal K\mathcal K^\top - I`
        (:math:`M/G \le C'`), rather than columns."""
        m, c = self.channels(kernel_shape)
        return m <= c

    def group_shape(self, kernel_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of per-group arrays (the operators), as :meth:`Layout.group_shape`."""
        return self.operator_shape(kernel_shape)

    def operator_shape(self, kernel_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of per-operator arrays: the leading axes, then ``(G,)`` if G > 1."""
        lead = tuple(kernel_shape[: self.lead])
        return lead + ((self.feature_group_count,) if self.feature_group_count > 1 else ())

    def check_input_shape(
        self, input_shape: object, kernel_shape: Sequence[int]
    ) -> tuple[int, ...]:
        """A circular input's spatial shape, checked against the stride and the kernel."""
        d = self.spatial_ndim
        if not isinstance(input_shape, (tuple, list)) or len(input_shape) != d:
            raise ValueError(
                f"`input_shape` must be a tuple of {d} ints (one per spatial axis of "
                f"{self.kernel_layout!r}), got {input_shape!r}."
            )
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in input_shape):
            raise ValueError(f"`input_shape` must hold Python ints, got {input_shape!r}.")
        shape = tuple(input_shape)
        if any(n % s for n, s in zip(shape, self.stride, strict=True)):
            raise ValueError(
                f"`input_shape`={shape} must be divisible by the stride {self.stride} (a "
                "circular input of a strided conv)."
            )
        size = self.dilated_size(kernel_shape)
        if any(n < w for n, w in zip(shape, size, strict=True)):
            raise ValueError(
                f"`input_shape`={shape} must be at least the (dilated) kernel size {size}."
            )
        return shape

    def check_kernel(self, kernel_shape: Sequence[int]) -> None:
        """Checks a kernel's shape against the layout (rank, group divisibility, sizes)."""
        if len(kernel_shape) != self.ndim:
            raise ValueError(
                f"`kernel` must have rank {self.ndim} for this layout, got shape "
                f"{tuple(kernel_shape)}."
            )
        named = [int(kernel_shape[a]) for a in range(self.lead, self.ndim)]
        if any(n == 0 for n in named):
            raise ValueError(
                f"`kernel` of shape {tuple(kernel_shape)} has an empty channel or spatial "
                f"axis (layout {self.kernel_layout!r}): a convolution needs at least one "
                "channel and one tap."
            )
        out = int(kernel_shape[self.out_axis])
        if out % self.feature_group_count:
            raise ValueError(
                f"`feature_group_count`={self.feature_group_count} must divide the "
                f"kernel's out channels (axis 'O', {out}), as jax.lax.conv_general_dilated "
                "requires."
            )


def _check_layout_string(kernel_layout: object) -> str:
    if not isinstance(kernel_layout, str):
        raise TypeError(
            f"`kernel_layout` must be a string like 'HWIO' or 'OIHW', got {kernel_layout!r} "
            f"of type {type(kernel_layout).__name__}."
        )
    expected = (
        "one 'O' (out channels), one 'I' (in channels) and at least one other distinct "
        "letter per spatial axis, like 'HWIO' (flax), 'OIHW' (equinox, torch), 'WIO' or "
        "'OIDHW'"
    )
    ok = (
        kernel_layout.count("O") == 1
        and kernel_layout.count("I") == 1
        and len(kernel_layout) >= 3
        and len(set(kernel_layout)) == len(kernel_layout)
        and all(c.isalpha() and c.isascii() for c in kernel_layout)
    )
    if not ok:
        raise ValueError(f"`kernel_layout` must have {expected}; got {kernel_layout!r}.")
    return kernel_layout


def _check_per_axis(name: str, value: object, d: int) -> tuple[int, ...]:
    """A positive int, or a tuple of ``d`` positive ints (Python or NumPy integers)."""

    def positive(x: object) -> int | None:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            return None
        return int(x) if int(x) >= 1 else None

    expected = f"a positive int or a tuple of {d} positive ints (one per spatial axis)"
    if isinstance(value, (tuple, list)):
        items = [positive(x) for x in value]
        if len(items) != d or any(x is None for x in items):
            raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
        return tuple(x for x in items if x is not None)
    one = positive(value)
    if one is None:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"`{name}` must be {expected}, got {value!r}.")
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return (one,) * d


def make_conv_layout(
    ndim: int,
    kernel_layout: str,
    stride: int | Sequence[int],
    dilation: int | Sequence[int],
    feature_group_count: int,
) -> ConvLayout:
    """Validates the layout and options for a kernel of rank ``ndim`` (at trace time).

    Raises:
      TypeError: ``kernel_layout`` not a string; ``stride``, ``dilation`` or
        ``feature_group_count`` not integers.
      ValueError: a malformed ``kernel_layout``; a ``kernel`` of lower rank than it;
        ``stride`` or ``dilation`` not positive or of the wrong length;
        ``feature_group_count < 1``.
    """
    layout = _check_layout_string(kernel_layout)
    if ndim < len(layout):
        raise ValueError(
            f"`kernel` must have rank >= {len(layout)} for kernel_layout={layout!r} (extra "
            f"leading axes are stacked operators), got rank {ndim}."
        )
    d = len(layout) - 2
    g = feature_group_count
    if isinstance(g, (bool, np.bool_)) or not isinstance(g, (int, np.integer)):
        raise TypeError(f"`feature_group_count` must be a positive Python int, got {g!r}.")
    if g < 1:
        raise ValueError(f"`feature_group_count` must be >= 1, got {g}.")
    return ConvLayout(
        ndim=int(ndim),
        kernel_layout=layout,
        stride=_check_per_axis("stride", stride, d),
        dilation=_check_per_axis("dilation", dilation, d),
        feature_group_count=int(g),
    )


def arrange(kernel: jax.Array, layout: ConvLayout, polyphase: bool, swap: bool) -> jax.Array:
    """The operators ``(L, G, R, Q, *k)`` of a kernel: differentiable.

    Transpose to ``(*lead, O, I, *k)``, split ``O`` into its groups, zero-insert for
    dilation; with ``polyphase``, space-to-depth for the stride (``Q = C S^d / G``,
    ``k' = ceil(k / S)`` taps); with ``swap``, exchange the two channel axes so that
    ``R`` is the axis of the Gram (the columns case).
    """
    k = jnp.transpose(kernel, layout.canonical_order)
    d, g, s = layout.spatial_ndim, layout.feature_group_count, layout.stride
    lead = k.shape[: layout.lead]
    m, cg = k.shape[layout.lead] // g, k.shape[layout.lead + 1]
    k = k.reshape((math.prod(lead), g, m, cg, *k.shape[layout.lead + 2 :]))
    zero = jnp.zeros((), k.dtype)
    if any(dl > 1 for dl in layout.dilation):
        k = jax.lax.pad(k, zero, [(0, 0, 0)] * 4 + [(0, 0, dl - 1) for dl in layout.dilation])
    kp = layout.reduced_size(kernel.shape)
    if polyphase and any(st > 1 for st in s):
        high = [r * st - n for r, st, n in zip(kp, s, k.shape[4:], strict=True)]
        k = jax.lax.pad(k, zero, [(0, 0, 0)] * 4 + [(0, h, 0) for h in high])
        k = k.reshape((*k.shape[:4], *(x for r, st in zip(kp, s, strict=True) for x in (r, st))))
        perm = (0, 1, 2, 3, *(5 + 2 * i for i in range(d)), *(4 + 2 * i for i in range(d)))
        k = jnp.transpose(k, perm).reshape((*k.shape[:3], cg * layout.phases, *kp))
    return jnp.swapaxes(k, 2, 3) if swap else k


def check_kernel_array(kernel: ArrayLike) -> jax.Array:
    """``kernel`` as an array of a real floating dtype (complex: not supported)."""
    if not hasattr(kernel, "dtype"):
        kernel = jnp.asarray(kernel, dtype=float)
    dtype = jnp.dtype(kernel.dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"`kernel` has the complex dtype {dtype}: complex kernels are not supported for "
            "the conv operator penalty (use a real floating kernel)."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`kernel` must have a real floating dtype (float16, bfloat16, float32, "
            f"float64), got {dtype}."
        )
    return jnp.asarray(kernel)


def prepare_kernel(kernel: Any, geometry: tuple[Any, ...]) -> tuple[jax.Array, ConvLayout]:
    """The kernel as a floating array and its validated layout, from ``(kernel_layout,
    stride, dilation, feature_group_count)``; every check at trace time."""
    k = check_kernel_array(kernel)
    layout = make_conv_layout(k.ndim, *geometry)
    layout.check_kernel(k.shape)
    return k, layout
