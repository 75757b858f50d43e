"""conv_general_dilated as im2col followed by one (batched) GEMM."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._im2col import from_channels_last, patches_channels_last, to_channels_last
from convmm._shapes import ConvSpec, check_same_dtype, conv_spec, shape_of


def kernel_taps_last(rhs: jax.Array, spec: ConvSpec) -> jax.Array:
  """Kernel in any layout -> ``(T, I, O)`` with taps in row-major order."""
  _, rhs_spec, _ = spec.geometry.dimension_numbers
  w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  return w.reshape(spec.geometry.num_taps, w.shape[-2], w.shape[-1])


def conv_channels_last(
    x_cl: jax.Array, w_tio: jax.Array, spec: ConvSpec, precision: Any,
    preferred_element_type: Any,
) -> jax.Array:
  """The im2col + GEMM convolution on canonical channels-last operands.

  Args:
    x_cl: input ``(N, *spatial, C)``.
    w_tio: kernel ``(T, C // feature_group_count, O)``.
    spec: the validated convolution.

  Returns:
    ``(N // batch_group_count, *out_spatial, O)``.
  """
  geometry = spec.geometry
  patches = patches_channels_last(x_cl, geometry)  # (N, *out, T, C)
  n, *out, taps, c = patches.shape
  o = spec.out_features
  g, gb = spec.feature_group_count, spec.batch_group_count
  # Both kinds of groups are a batched GEMM over a group axis: feature groups
  # split C (and O), batch groups split N (and O); lax orders both group-major.
  groups = g * gb
  og = o // groups
  patches = patches.reshape(gb, n // gb, *out, taps, g, c // g)
  patches = jnp.moveaxis(patches, -2, 0)  # (G, Gb, N', *out, T, Cg)
  patches = patches.reshape(g * gb, -1, taps * (c // g))  # (groups, M, K)
  w = w_tio.reshape(taps, c // g, groups, og)
  w = jnp.moveaxis(w, 2, 0).reshape(groups, taps * (c // g), og)  # (groups, K, Og)
  y = lax.dot_general(
      patches, w, (((2,), (1,)), ((0,), (0,))), precision=precision,
      preferred_element_type=preferred_element_type)  # (groups, M, Og)
  y = y.reshape(groups, n // gb, *out, og)
  y = jnp.moveaxis(y, 0, -2)
  return y.reshape(n // gb, *out, o)


def conv_general_dilated(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """General N-D convolution computed as im2col + GEMM; a drop-in for lax's.

  Same signature, defaults, semantics, output shape and dtype as
  ``jax.lax.conv_general_dilated``. The input is unfolded into patches with
  pure data movement (:func:`convmm.im2col`), then multiplied with the
  flattened kernel by one ``lax.dot_general`` (a batched GEMM over the group
  axis when ``feature_group_count`` or ``batch_group_count`` exceeds 1), to
  which ``precision`` and ``preferred_element_type`` are passed.

  Args:
    lhs: input of rank ``n + 2``, layout ``dimension_numbers[0]``.
    rhs: kernel of rank ``n + 2``, layout ``dimension_numbers[1]``.
    window_strides: ``n`` strides.
    padding: 'SAME', 'SAME_LOWER', 'VALID' or ``n`` ``(low, high)`` pairs
      (negative values crop).
    lhs_dilation: optional ``n`` input dilations (transposed convolution).
    rhs_dilation: optional ``n`` kernel dilations (atrous convolution).
    dimension_numbers: ``None`` (``NC...``, ``OI...``, ``NC...``), a
      ``lax.ConvDimensionNumbers`` or spec strings like
      ``('NHWC', 'HWIO', 'NHWC')``.
    feature_group_count: number of feature groups (``C_in`` for depthwise).
    batch_group_count: number of batch groups.
    precision: passed to ``lax.dot_general``.
    preferred_element_type: accumulation and output dtype.

  Returns:
    The convolution, in the layout of ``dimension_numbers[2]``.

  Raises:
    ValueError, TypeError: on malformed arguments, before any tracing.

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x = jnp.ones((2, 8, 8, 3))  # NHWC
    >>> w = jnp.ones((3, 3, 3, 16))  # HWIO
    >>> convmm.conv_general_dilated(x, w, (1, 1), 'SAME',
    ...     dimension_numbers=('NHWC', 'HWIO', 'NHWC')).shape
    (2, 8, 8, 16)
  """
  fn = "conv_general_dilated"
  lhs_shape, lhs_dtype = shape_of(fn, "lhs", lhs)
  rhs_shape, rhs_dtype = shape_of(fn, "rhs", rhs)
  spec = conv_spec(fn, lhs_shape, rhs_shape, window_strides, padding, lhs_dilation,
                   rhs_dilation, dimension_numbers, feature_group_count,
                   batch_group_count)
  check_same_dtype(fn, lhs_dtype, rhs_dtype)
  return conv_with_spec(jnp.asarray(lhs), jnp.asarray(rhs), spec, precision,
                        preferred_element_type)


def conv_with_spec(
    lhs: jax.Array, rhs: jax.Array, spec: ConvSpec, precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
  """The convolution for an already validated :class:`ConvSpec`."""
  lhs_spec, _, out_spec = spec.geometry.dimension_numbers
  y = conv_channels_last(
      to_channels_last(lhs, lhs_spec), kernel_taps_last(rhs, spec), spec, precision,
      preferred_element_type)
  return from_channels_last(y, out_spec)
