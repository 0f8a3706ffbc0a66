r"""The exact spectrum of a convolution operator on a circular input.

On a circular input the stride-1 (polyphase) conv is block circulant, so the Fourier
transform block-diagonalises it: its singular values are those of one small
:math:`M \times C'` matrix per frequency (Sedghi, Gupta and Long, ICLR 2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._conv_layout import arrange, prepare_kernel
from ._layout import accumulation_dtype

__all__ = ["conv_singular_values"]

Stride = int | Sequence[int]


def conv_singular_values(
    kernel: ArrayLike,
    input_shape: Sequence[int],
    *,
    kernel_layout: str = "HWIO",
    stride: Stride = 1,
    dilation: Stride = 1,
    feature_group_count: int = 1,
) -> jax.Array:
    r"""Every singular value of the conv operator on a circular input.

    On a circular input of spatial shape :math:`N` the stride-1 polyphase conv is
    block circulant, so the Fourier transform block-diagonalises it (Sedghi, Gupta
    and Long): its singular values are those of the :math:`M \times C'` matrices

    .. math::

        \hat K'(\omega) = \sum_v K'[:, :, v]\, e^{-2\pi i\, \omega \cdot v / n},
        \qquad \omega \in \{0..n-1\}^d,\quad n = N / S,

    one small SVD per frequency (:math:`\prod n` of them). The operator is
    orthogonal exactly when every value is 1; :math:`\sigma_{\max}` is its
    Lipschitz constant.

    Args:
      kernel: the conv kernel (see :func:`conv_orthogonality_penalty`).
      input_shape: the spatial shape :math:`N` of the circular input, one Python int
        per spatial axis, divisible by the stride and at least the dilated kernel.
      kernel_layout: the kernel's axes, ``"HWIO"`` by default.
      stride: the conv's stride.
      dilation: the kernel dilation.
      feature_group_count: the number of groups (one operator each).

    Returns:
      Shape ``(*leading, [G,] prod(N / S), min(M / G, C S^d / G))``: the leading stack
      axes, ``G`` when ``feature_group_count > 1``, the frequencies in ``jnp.fft.fftn``
      order (row-major over the :math:`N / S` grid), and each frequency's singular
      values in descending order. Together they are all the operator's
      non-trivially-zero singular values (those of the dense matrix, up to order;
      the dense matrix has :math:`|M - C'| \prod n` further zeros on its larger side).
      In the kernel's real dtype (float32 for bfloat16 and float16).

    Raises:
      ValueError: an ``input_shape`` of the wrong length, not divisible by the
        stride, or smaller than the dilated kernel; bad options as
        :func:`conv_orthogonality_penalty`.
      TypeError: as :func:`conv_orthogonality_penalty`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_orthopenalty as jop
      >>> k = jnp.array([[[1.0]], [[1.0]]])             # WIO: x[p] + x[p + 1]
      >>> jop.conv_singular_values(k, (4,), kernel_layout="WIO").ravel()  # |1 + e^(-i pi w/2)|
      Array([2.       , 1.4142135, 0.       , 1.4142135], dtype=float32)

    References:
      Sedghi, Gupta and Long, *The Singular Values of Convolutional Layers*, ICLR 2019.
    """
    k, layout = prepare_kernel(kernel, (kernel_layout, stride, dilation, feature_group_count))
    shape = layout.check_input_shape(input_shape, k.shape)
    a = arrange(k.astype(accumulation_dtype(k.dtype)), layout, polyphase=True, swap=False)
    n = tuple(x // s for x, s in zip(shape, layout.stride, strict=True))
    a = jnp.pad(a, [(0, 0)] * 4 + [(0, x - w) for x, w in zip(n, a.shape[4:], strict=True)])
    d = layout.spatial_ndim
    t = jnp.fft.fftn(a, axes=tuple(range(4, 4 + d)))
    t = jnp.moveaxis(t, (2, 3), (-2, -1)).reshape((*a.shape[:2], math.prod(n), *a.shape[2:4]))
    s = jnp.linalg.svd(t, compute_uv=False)
    return s.reshape((*layout.operator_shape(k.shape), *s.shape[2:]))
