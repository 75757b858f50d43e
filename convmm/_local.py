"""Unshared (locally connected) convolution: im2col, then one GEMM per output position.

``lax.conv_general_dilated_local`` computes its patches with a convolution against
an identity kernel; here they come from :func:`convmm.im2col` (data movement
only), and each output position multiplies its own patch vector by its own
``(C * prod(filter_shape), O)`` kernel matrix: a ``dot_general`` batched over the
output positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from convmm._engine.im2col import (
  _im2col,
  _patches_geometry,
  from_channels_last,
  kernel_channels_last,
  to_channels_last,
)
from convmm._rules.shapes import layout_shape, shape_of


def _check_precision(fn: str, precision: lax.PrecisionLike) -> None:
  # lax's local conv takes a precision it can also hand to its patches
  # convolution: None, one Precision (or its name), or a pair; not an algorithm.
  if isinstance(precision, lax.DotAlgorithm | lax.DotAlgorithmPreset):
    raise ValueError(
      f"{fn}: unsupported `precision` {precision!r}: use None, a "
      f"lax.Precision, its name, or a pair of them"
    )


def conv_general_dilated_local(
  lhs: jax.typing.ArrayLike,
  rhs: jax.typing.ArrayLike,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  filter_shape: Sequence[int],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers | None = None,
  precision: lax.PrecisionLike = None,
  *,
  preferred_element_type: jax.typing.DTypeLike | None = None,
) -> jax.Array:
  """Unshared N-D convolution, exactly like ``lax.conv_general_dilated_local``.

  A locally connected layer: a convolution whose kernel is different at every
  output position. Same arguments and results as lax's; the patches come from
  :func:`convmm.im2col` instead of a convolution against an identity kernel.

  Args:
    lhs: input of rank ``n + 2``, laid out as ``dimension_numbers[0]``
      (default ``(N, C, *spatial)``).
    rhs: kernels of rank ``n + 2``, laid out as ``dimension_numbers[1]``
      (default ``(O, I, *out_spatial)``): its spatial dimensions are the
      *output* positions, and its ``I`` dimension has size
      ``C * prod(filter_shape)``, ordered channel-major then the window's
      positions (the feature order of :func:`convmm.im2col`).
    window_strides: ``n`` strides.
    padding: 'SAME', 'SAME_LOWER', 'VALID' or ``n`` ``(low, high)`` pairs.
    filter_shape: ``n`` window sizes, in the kernel spec's spatial order.
    lhs_dilation: optional ``n`` input dilations.
    rhs_dilation: optional ``n`` window dilations.
    dimension_numbers: ``None``, a ``lax.ConvDimensionNumbers`` or a tuple of
      spec strings such as ``('NHWC', 'HWIO', 'NHWC')``.
    precision: ``None``, a ``lax.Precision`` (or its name) or a pair of them,
      for the GEMM.
    preferred_element_type: keyword-only (beyond lax), the GEMM's accumulation
      and output dtype.

  Returns:
    The output in the layout of ``dimension_numbers[2]``: ``(N, O, *out_spatial)``
    by default, with the dtype ``lax.dot_general`` gives the operands.

  Raises:
    TypeError: if ``rhs`` does not have the rank, ``I`` size or output spatial
      sizes the other arguments imply (lax's class for the same mistake), or if
      an argument has the wrong type.
    ValueError: on malformed strides, padding, dilations, dimension numbers or
      precision.

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x = jnp.ones((2, 3, 5, 6))                  # (N, C, H, W)
    >>> w = jnp.ones((4, 3 * 3 * 3, 3, 4))          # (O, C * 3 * 3, out H, out W)
    >>> convmm.conv_general_dilated_local(x, w, (1, 1), 'VALID', (3, 3)).shape
    (2, 4, 3, 4)
  """
  fn = "conv_general_dilated_local"
  lhs_shape, _ = shape_of(fn, "lhs", lhs)
  rhs_shape, _ = shape_of(fn, "rhs", rhs)
  _check_precision(fn, precision)
  window = (filter_shape, window_strides, padding, lhs_dilation, rhs_dilation)
  geometry = _patches_geometry(fn, lhs_shape, *window, dimension_numbers)
  _, rhs_spec, out_spec = geometry.dimension_numbers
  num_spatial = geometry.num_spatial
  if len(rhs_shape) != len(lhs_shape):
    raise TypeError(
      f"{fn}: `rhs` must have the rank of `lhs` ({len(lhs_shape)}), got "
      f"rhs.shape={rhs_shape}, lhs.shape={lhs_shape}"
    )
  patch_size = geometry.in_features * geometry.num_taps
  out_features = rhs_shape[rhs_spec[0]]
  expected = layout_shape(rhs_spec, (out_features, patch_size, *geometry.out_spatial))
  if rhs_shape != expected:
    raise TypeError(
      f"{fn}: `rhs` must have shape {expected} (I = C * prod(filter_shape) = {patch_size}, "
      f"spatial = the output positions {geometry.out_spatial}), got rhs.shape={rhs_shape}"
    )

  patches = to_channels_last(_im2col(jnp.asarray(lhs), geometry), out_spec)  # (N, *out, K)
  kernels = kernel_channels_last(jnp.asarray(rhs), rhs_spec)
  positions = tuple(range(num_spatial))
  out = lax.dot_general(  # (*out, N, O): one (N, K) @ (K, O) product per output position
    patches,
    kernels,
    (((num_spatial + 1,), (num_spatial,)), (tuple(p + 1 for p in positions), positions)),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  return from_channels_last(jnp.moveaxis(out, num_spatial, 0), out_spec)
