"""im2col and col2im: data movement only.

The input is brought to channels-last canonical order ``(N, *spatial, C)``,
dilated and padded by a single ``lax.pad`` (interior padding is the input
dilation, negative padding crops), then unfolded one spatial dimension at a
time by strided ``lax.slice``s stacked on a tap axis. The result is the patch
tensor ``(N, *out, T, C)`` with ``T = prod(filter_shape)`` in row-major tap
order: contiguous channels for each tap, which is the layout the GEMM wants.
No arithmetic touches the values, so patches are exact at any precision on any
backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._engine.policy import MAX_FUSED_TAPS, two_stage_unfold
from convmm._rules.canonical import ConvGeometry, canonical_shape, conv_geometry
from convmm._rules.shapes import layout_shape, preferred_dtype, shape_of


def to_channels_last(x: jax.Array, spec: Sequence[int]) -> jax.Array:
  """``spec`` layout -> canonical channels-last ``(N, *spatial, C)``."""
  perm = (spec[0], *spec[2:], spec[1])
  return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def kernel_channels_last(w: jax.Array, spec: Sequence[int]) -> jax.Array:
  """A kernel in ``spec`` layout (O, I, *window as lax numbers them) -> ``(*window, I, O)``."""
  perm = (*spec[2:], spec[1], spec[0])
  return w if perm == tuple(range(w.ndim)) else jnp.transpose(w, perm)


def from_channels_last(y: jax.Array, spec: Sequence[int]) -> jax.Array:
  """Canonical channels-last ``(N, *spatial, C)`` -> ``spec`` layout."""
  nsp = y.ndim - 2
  cl_axis = (0, nsp + 1, *range(1, nsp + 1))  # canonical axis k -> channels-last axis
  perm = [0] * y.ndim
  for k, axis in enumerate(spec):
    perm[axis] = cl_axis[k]
  return y if tuple(perm) == tuple(range(y.ndim)) else jnp.transpose(y, perm)


def pad_input(x_cl: jax.Array, geometry: ConvGeometry, channels_first: bool = False) -> jax.Array:
  """Dilates and pads a channels-last or ``(N, C, *spatial)`` input (the one place it happens)."""
  spatial = [(lo, hi, d - 1) for (lo, hi), d in zip(geometry.padding, geometry.lhs_dilation)]
  none = (0, 0, 0)
  config = [none, none, *spatial] if channels_first else [none, *spatial, none]
  if all(c == (0, 0, 0) for c in config):
    return x_cl
  return lax.pad(x_cl, jnp.zeros((), x_cl.dtype), config)


def tap_offsets(geometry: ConvGeometry) -> list[tuple[int, ...]]:
  """Start offset in the padded input of every kernel tap, row-major."""
  return [
    tuple(t * d for t, d in zip(tap, geometry.rhs_dilation))
    for tap in itertools.product(*(range(k) for k in geometry.filter_shape))
  ]


def tap_slice(
  x_padded: jax.Array,
  geometry: ConvGeometry,
  offset: tuple[int, ...],
  channels_first: bool = False,
) -> jax.Array:
  """The input values seen by one kernel tap at every output position (layout kept)."""
  n, c = x_padded.shape[0], x_padded.shape[1 if channels_first else -1]
  # An empty output dimension (window larger than the padded input) slices nothing.
  starts = tuple(o if s_out else 0 for o, s_out in zip(offset, geometry.out_spatial))
  limits = tuple(
    o + (s_out - 1) * st + 1 if s_out else 0
    for o, s_out, st in zip(starts, geometry.out_spatial, geometry.window_strides)
  )
  if channels_first:
    start, limit, strides = (0, 0, *starts), (n, c, *limits), (1, 1, *geometry.window_strides)
  else:
    start, limit, strides = (0, *starts, 0), (n, *limits, c), (1, *geometry.window_strides, 1)
  return lax.slice(x_padded, start, limit, strides)


def tap_split(k: int) -> tuple[int, int] | None:
  """``(a, b)`` with ``a * b == k``, both at most 8 (``b`` largest), for ``k > 8``; else None.

  XLA fuses a concatenation of at most 8 operands into one loop
  (:data:`convmm._engine.policy.MAX_FUSED_TAPS`): ``k`` taps as ``a`` stacks of ``b``.
  """
  if k <= MAX_FUSED_TAPS:
    return None
  for b in range(MAX_FUSED_TAPS, 1, -1):
    if k % b == 0 and k // b <= MAX_FUSED_TAPS:
      return k // b, b
  return None  # a prime or k > 64: one wide (unfused) concatenation


def _unfold_dim(
  y: jax.Array, geometry: ConvGeometry, d: int, reverse: bool, axis: int, at: int
) -> jax.Array:
  """``k`` strided slices along ``axis`` (spatial dimension ``d``), stacked at axis ``at``.

  Over 8 taps where the policy says so (2-D and up), ``k = a * b`` is unfolded in two
  fused stages (taps ``q * b + r``):
  ``b`` unit-stride slices (offsets ``r``), then ``a`` strided slices of those
  (offsets ``q * b``), on two tap axes that merge in row-major order.
  """
  nsp = geometry.num_spatial
  out, stride, dil = geometry.out_spatial[d], geometry.window_strides[d], geometry.rhs_dilation[d]
  k = geometry.filter_shape[d]

  def stack(z, starts, step, length, axis):
    # An empty output dimension (window larger than the padded input) slices nothing.
    slices = [lax.slice_in_dim(z, s, s + length, step, axis=axis) for s in starts]
    return jnp.stack(slices[::-1] if reverse else slices, axis=at)

  if not out:
    return stack(y, [0] * k, stride, 0, axis)
  span = (out - 1) * stride + 1
  if not two_stage_unfold(nsp) or (split := tap_split(k)) is None:
    return stack(y, [t * dil for t in range(k)], stride, span, axis)
  a, b = split
  inner = stack(y, [r * dil for r in range(b)], 1, span + (a - 1) * b * dil, axis)
  # The inner tap axis precedes the sliced one when stacked before it.
  return stack(inner, [q * b * dil for q in range(a)], stride, span, axis + (at <= axis))


def unfold_padded(
  x_padded: jax.Array, geometry: ConvGeometry, reverse_taps: bool = False
) -> jax.Array:
  """im2col of an already padded channels-last input: ``(N, *out, T, C)``.

  Unfolds one spatial dimension at a time, last to first: ``k`` strided slices
  along that dimension, stacked on a new tap axis. That is ``sum(k)`` slices
  instead of ``prod(k)`` (a 7x7 window: 14 instead of 49), which compiles
  faster and moves small-channel inputs in longer contiguous runs, and gives
  the same row-major tap order as slicing every tap directly. With
  ``reverse_taps`` the taps come in reverse order (the patches of a flipped
  kernel), at no extra cost.
  """
  nsp = geometry.num_spatial
  y = x_padded
  for d in reversed(range(nsp)):
    y = _unfold_dim(y, geometry, d, reverse_taps, axis=1 + d, at=1 + nsp)
  return y.reshape(*y.shape[: 1 + nsp], geometry.num_taps, y.shape[-1])


def feature_groups_first(x_cl: jax.Array, groups: int) -> jax.Array:
  """``(N, *spatial, C)`` -> ``(groups, N, *spatial, C // groups)``, lax's group-major order.

  The input of one patch matrix per feature group: patches of each group's
  slice come out group-major, as a batched GEMM over the groups wants them,
  and moving the input costs ``1 / T`` of moving the patches. The group axis
  stays separate from the batch, so a sharded batch stays sharded.
  """
  n, *spatial, c = x_cl.shape
  return jnp.moveaxis(x_cl.reshape(n, *spatial, groups, c // groups), -2, 0)


def to_bits(x: jax.Array) -> jax.Array:
  """16-bit floats as ``uint16`` (the same bits); other dtypes unchanged."""
  # XLA's CPU backend computes pads and concatenations of 16-bit floats in
  # float32 (twice the bytes moved, plus conversions); the same bits as uint16
  # are moved as they are. im2col is pure data movement, so this is exact.
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
    return lax.bitcast_convert_type(x, jnp.uint16)
  return x


def from_bits(x: jax.Array, dtype: Any) -> jax.Array:
  """The inverse of :func:`to_bits`."""
  return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def patches_channels_last(
  x_cl: jax.Array, geometry: ConvGeometry, reverse_taps: bool = False
) -> jax.Array:
  """im2col in channels-last canonical form: ``(N, *out, T, C)`` (see :func:`unfold_padded`)."""
  patches = unfold_padded(pad_input(to_bits(x_cl), geometry), geometry, reverse_taps)
  return from_bits(patches, x_cl.dtype)


def patches_taps_first(x_cl: jax.Array, geometry: ConvGeometry) -> jax.Array:
  """The patches transposed, ``(T, C, N, *out)``, from a channels-last input.

  The kernel gradient's GEMM operand: contracting ``(N, *out)`` with the
  cotangent's leading axes is a plain GEMM whose result is the kernel's own
  ``(T, C, O)`` layout, so neither the patches, the cotangent nor the result is
  transposed (only the input, once, to channels-first).
  """
  nsp = geometry.num_spatial
  y = jnp.moveaxis(pad_input(to_bits(x_cl), geometry), -1, 0)  # (C, N, *padded)
  for d in reversed(range(nsp)):  # each new tap axis goes first; spatial axes stay last
    y = _unfold_dim(y, geometry, d, False, axis=y.ndim - nsp + d, at=0)
  y = y.reshape(geometry.num_taps, *y.shape[-2 - nsp :])
  return from_bits(y, x_cl.dtype)


def _patches_geometry(fn: str, lhs_shape: tuple[int, ...], *args: Any) -> ConvGeometry:
  """The geometry of im2col's arguments ``(filter_shape, ..., dimension_numbers)``."""
  return conv_geometry(fn, lhs_shape, len(lhs_shape), *args)


def _patches_shape(geometry: ConvGeometry) -> tuple[int, ...]:
  return layout_shape(
    geometry.dimension_numbers.out_spec,
    (geometry.batch, geometry.in_features * geometry.num_taps, *geometry.out_spatial),
  )


def _im2col(x: jax.Array, geometry: ConvGeometry) -> jax.Array:
  lhs_spec, _, out_spec = geometry.dimension_numbers
  patches = patches_channels_last(to_channels_last(x, lhs_spec), geometry)
  # lax orders the patch features channel-major: feature = c * T + tap.
  patches = jnp.swapaxes(patches, -1, -2)
  patches = patches.reshape(*patches.shape[:-2], geometry.in_features * geometry.num_taps)
  return from_channels_last(patches, out_spec)


def im2col(
  lhs: jax.typing.ArrayLike,
  filter_shape: Sequence[int],
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
  precision: lax.PrecisionLike = None,
  preferred_element_type: jax.typing.DTypeLike | None = None,
) -> jax.Array:
  """Extracts convolution patches, exactly like ``lax.conv_general_dilated_patches``.

  Built from data movement only (pad and strided slices), never from a
  convolution, so values are bit-exact copies of the input at any precision.

  Args:
    lhs: input of rank ``n + 2``, laid out as ``dimension_numbers[0]``
      (default ``(N, C, *spatial)``).
    filter_shape: ``n`` window sizes, in the kernel spec's spatial order.
    window_strides: ``n`` strides.
    padding: 'SAME', 'SAME_LOWER', 'VALID' or ``n`` ``(low, high)`` pairs.
    lhs_dilation: optional ``n`` input dilations.
    rhs_dilation: optional ``n`` window dilations.
    dimension_numbers: ``None``, a ``lax.ConvDimensionNumbers`` or a tuple of
      spec strings such as ``('NHWC', 'HWIO', 'NHWC')``.
    precision: accepted for compatibility with lax and ignored: no arithmetic.
    preferred_element_type: optional output dtype.

  Returns:
    Patches in the layout of ``dimension_numbers[2]``, with feature size
    ``C * prod(filter_shape)`` ordered channel-major, then the window's
    spatial positions in row-major order.

  Raises:
    ValueError, TypeError: on malformed arguments (named in the message).

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x = jnp.arange(16.).reshape(1, 1, 4, 4)
    >>> convmm.im2col(x, (2, 2), (1, 1), 'VALID').shape
    (1, 4, 3, 3)
  """
  del precision
  fn = "im2col"
  shape, dtype = shape_of(fn, "lhs", lhs)
  geometry = _patches_geometry(
    fn, shape, filter_shape, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers
  )
  preferred_element_type = preferred_dtype(fn, dtype, preferred_element_type)
  out = _im2col(jnp.asarray(lhs), geometry)
  if preferred_element_type is not None:
    out = out.astype(preferred_element_type)
  return out


def col2im(
  patches: jax.typing.ArrayLike,
  lhs_shape: Sequence[int],
  filter_shape: Sequence[int],
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
) -> jax.Array:
  """Sums patches back into an array of ``lhs_shape``: the adjoint of :func:`im2col`.

  Each patch entry is added to the input position it was copied from
  (overlapping windows accumulate; padding positions are dropped). This is
  ``torch.nn.functional.fold`` generalised to N-D, dilation and any layout,
  and satisfies ``<im2col(x), p> == <x, col2im(p)>``.

  Args:
    patches: array shaped like ``im2col(x, ...)`` for ``x.shape == lhs_shape``.
    lhs_shape: the shape of the array to rebuild.
    filter_shape, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers: as for :func:`im2col`.

  Returns:
    An array of shape ``lhs_shape`` and the dtype of ``patches``.

  Raises:
    ValueError: if ``patches`` does not have the shape im2col would produce.

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> p = jnp.ones((1, 4, 3, 3))
    >>> convmm.col2im(p, (1, 1, 4, 4), (2, 2), (1, 1), 'VALID')[0, 0]
    Array([[1., 2., 2., 1.],
           [2., 4., 4., 2.],
           [2., 4., 4., 2.],
           [1., 2., 2., 1.]], dtype=float32)
  """
  fn = "col2im"
  shape, dtype = shape_of(fn, "patches", patches)
  lhs_shape = canonical_shape(fn, "lhs_shape", lhs_shape)
  geometry = _patches_geometry(
    fn,
    lhs_shape,
    filter_shape,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
  )
  expected = _patches_shape(geometry)
  if shape != expected:
    raise ValueError(
      f"{fn}: `patches` must have shape {expected} (im2col of lhs_shape={lhs_shape}), "
      f"got patches.shape={shape}"
    )
  primal = jax.ShapeDtypeStruct(lhs_shape, dtype)
  (out,) = jax.linear_transpose(lambda x: _im2col(x, geometry), primal)(jnp.asarray(patches))
  return out
