"""conv_general_dilated as im2col followed by one (batched) GEMM."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._im2col import (
    from_channels_last,
    pad_input,
    patches_channels_last,
    tap_offsets,
    tap_slice,
    to_channels_last,
)
from convmm._shapes import ConvSpec, check_same_dtype, conv_spec, shape_of


def kernel_taps_last(rhs: jax.Array, spec: ConvSpec) -> jax.Array:
  """Kernel in any layout -> ``(T, I, O)`` with taps in row-major order."""
  _, rhs_spec, _ = spec.geometry.dimension_numbers
  w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  return w.reshape(spec.geometry.num_taps, w.shape[-2], w.shape[-1])


METHODS = ("auto", "im2col", "shift", "depthwise")

# Patch matrices larger than this are never materialised whole: the im2col GEMM is
# tiled over the batch. Change it per call with `memory_budget=` or globally with
# `set_memory_budget`.
_DEFAULT_MEMORY_BUDGET = 128 * 2**20


def set_memory_budget(nbytes: int) -> int:
  """Sets the default patch-matrix budget in bytes; returns the previous value.

  Example:
    >>> import convmm
    >>> old = convmm.set_memory_budget(64 * 2**20)
    >>> _ = convmm.set_memory_budget(old)
  """
  global _DEFAULT_MEMORY_BUDGET
  if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
    raise ValueError(f"set_memory_budget: `nbytes` must be a positive int, got {nbytes!r}")
  old, _DEFAULT_MEMORY_BUDGET = _DEFAULT_MEMORY_BUDGET, nbytes
  return old


def _check_method(fn: str, method: Any, memory_budget: Any) -> tuple[str, int]:
  if method not in METHODS:
    raise ValueError(f"{fn}: `method` must be one of {METHODS}, got {method!r}")
  if memory_budget is None:
    return method, _DEFAULT_MEMORY_BUDGET
  if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
    raise ValueError(
        f"{fn}: `memory_budget` must be a positive number of bytes, got {memory_budget!r}")
  return method, memory_budget


def _patch_bytes_per_sample(spec: ConvSpec, itemsize: int) -> int:
  g = spec.geometry
  return math.prod(g.out_spatial) * g.num_taps * g.in_features * itemsize


def choose_method(spec: ConvSpec, method: str, itemsize: int = 4,
                  memory_budget: int | None = None) -> str:
  """Resolves ``method="auto"`` for a convolution (static, shape-based).

  'depthwise' where each group has a single input feature; 'shift' where even
  one sample's patch matrix would exceed the memory budget (it builds none);
  'im2col' otherwise (tiled over the batch when the whole batch does not fit).
  """
  geometry = spec.geometry
  budget = _DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
  cg = geometry.in_features // spec.feature_group_count
  depthwise_ok = cg == 1 and spec.batch_group_count == 1
  if method == "depthwise" and not depthwise_ok:
    raise ValueError(
        "conv_general_dilated: `method`='depthwise' needs one input feature per group "
        f"(feature_group_count == lhs features); got feature_group_count="
        f"{spec.feature_group_count} for {geometry.in_features} features")
  if method != "auto":
    return method
  if depthwise_ok and spec.feature_group_count > 1:
    return "depthwise"
  per_sample = _patch_bytes_per_sample(spec, itemsize)
  if geometry.num_taps > 1 and 2 * per_sample > budget:
    return "shift"
  return "im2col"


def _group_gemm(
    lhs: jax.Array, w: jax.Array, spec: ConvSpec, precision: Any, preferred_element_type: Any,
) -> jax.Array:
  """``(N, *out, K, C) x (K, C // g, O) -> (N // gb, *out, O)`` as a batched GEMM.

  Contracts the trailing (K, C) axes of ``lhs`` with the leading (K, C//g) axes of
  ``w``. Both kinds of groups are a batch axis of the GEMM: feature groups split C
  (and O), batch groups split N (and O); lax orders both group-major.
  """
  n, *out, k, c = lhs.shape
  o = spec.out_features
  g, gb = spec.feature_group_count, spec.batch_group_count
  if g == 1 and gb == 1:
    return lax.dot_general(
        lhs, w, (((lhs.ndim - 2, lhs.ndim - 1), (0, 1)), ((), ())), precision=precision,
        preferred_element_type=preferred_element_type)
  groups, og, cg = g * gb, o // (g * gb), c // g
  lhs = lhs.reshape(gb, n // gb, *out, k, g, cg)
  m = (n // gb) * math.prod(out)
  lhs = jnp.moveaxis(lhs, -2, 0).reshape(groups, m, k * cg)  # (groups, M, K)
  w = jnp.moveaxis(w.reshape(k, cg, groups, og), 2, 0).reshape(groups, k * cg, og)
  y = lax.dot_general(
      lhs, w, (((2,), (1,)), ((0,), (0,))), precision=precision,
      preferred_element_type=preferred_element_type)  # (groups, M, Og)
  y = jnp.moveaxis(y.reshape(groups, n // gb, *out, og), 0, -2)
  return y.reshape(n // gb, *out, o)


def _conv_im2col(x_cl, w_tio, spec, precision, preferred_element_type, memory_budget):
  geometry = spec.geometry
  n = geometry.batch
  per_sample = _patch_bytes_per_sample(spec, jnp.dtype(x_cl.dtype).itemsize)
  chunk = _batch_chunk(n, spec.batch_group_count, per_sample, memory_budget)

  def gemm(x):
    return _group_gemm(patches_channels_last(x, geometry), w_tio, spec, precision,
                       preferred_element_type)

  if chunk == n:
    return gemm(x_cl)
  # Too large to build whole: map over batch chunks. Rematerialise each chunk's
  # patches in the backward pass so autodiff does not keep all of them alive.
  xs = x_cl.reshape(n // chunk, chunk, *x_cl.shape[1:])
  ys = lax.map(jax.checkpoint(gemm), xs)
  return ys.reshape(n, *ys.shape[2:])


def _batch_chunk(n: int, batch_groups: int, per_sample: int, budget: int) -> int:
  """Largest batch chunk whose patches fit the budget (whole groups only)."""
  # XLA may hold a second patch-sized buffer (the GEMM operand next to the
  # concatenation that builds it), so a chunk gets half the budget.
  if 2 * n * per_sample <= budget or batch_groups > 1 or n == 0:
    return n
  fits = max(1, budget // max(1, 2 * per_sample))
  return max(d for d in range(1, min(n, fits) + 1) if n % d == 0)


def _conv_shift(x_cl, w_tio, spec, precision, preferred_element_type):
  """Shift-and-accumulate: a sum over taps of slice @ kernel tap; no patch matrix."""
  geometry = spec.geometry
  x_padded = pad_input(x_cl, geometry)
  y = None
  for t, offset in enumerate(tap_offsets(geometry)):
    tap = tap_slice(x_padded, geometry, offset)[..., None, :]  # (N, *out, 1, C)
    term = _group_gemm(tap, w_tio[t:t + 1], spec, precision, preferred_element_type)
    y = term if y is None else y + term
  return y


def _conv_depthwise(x_cl, w_tio, spec, precision, preferred_element_type):
  """One input feature per group: multiply-accumulate over taps (no GEMM needed)."""
  del precision  # elementwise products are exact; the sum is in the output dtype
  geometry = spec.geometry
  c = geometry.in_features
  mult = spec.out_features // c
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_cl.dtype, w_tio.dtype))
  # Accumulate 16-bit floats in float32, as the GEMM would.
  acc_dtype = jnp.float32 if jnp.issubdtype(out_dtype, jnp.floating) and (
      out_dtype.itemsize < 4) else out_dtype
  x_padded = pad_input(x_cl, geometry).astype(acc_dtype)
  w = w_tio.reshape(geometry.num_taps, c, mult).astype(acc_dtype)  # o = c * mult + j
  y = None
  for t, offset in enumerate(tap_offsets(geometry)):
    term = tap_slice(x_padded, geometry, offset)[..., None] * w[t]
    y = term if y is None else y + term
  if y is None:  # no taps at all (a zero-size kernel)
    y = jnp.zeros((geometry.batch, *geometry.out_spatial, c, mult), acc_dtype)
  return y.reshape(*y.shape[:-2], c * mult).astype(out_dtype)


def conv_channels_last(
    x_cl: jax.Array, w_tio: jax.Array, spec: ConvSpec, precision: Any,
    preferred_element_type: Any, method: str = "auto", memory_budget: int | None = None,
) -> jax.Array:
  """The convolution on canonical channels-last operands.

  Args:
    x_cl: input ``(N, *spatial, C)``.
    w_tio: kernel ``(T, C // feature_group_count, O)``, taps in row-major order.
    spec: the validated convolution.
    method: 'im2col' (patches + one GEMM, tiled over the batch beyond the memory
      budget), 'shift' (sum of per-tap GEMMs), 'depthwise' (multiply-accumulate)
      or 'auto'.

  Returns:
    ``(N // batch_group_count, *out_spatial, O)``.
  """
  budget = _DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
  method = choose_method(spec, method, jnp.dtype(x_cl.dtype).itemsize, budget)
  if method == "depthwise":
    return _conv_depthwise(x_cl, w_tio, spec, precision, preferred_element_type)
  if method == "shift":
    return _conv_shift(x_cl, w_tio, spec, precision, preferred_element_type)
  return _conv_im2col(x_cl, w_tio, spec, precision, preferred_element_type, budget)


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
    out_sharding: Any = None,
    *,
    method: str = "auto",
    memory_budget: int | None = None,
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
    out_sharding: optional sharding of the result (a ``NamedSharding`` or a
      ``PartitionSpec`` under a mesh), applied with ``jax.sharding.reshard``.
    method: keyword-only, how to compute it: 'im2col' (patches + one GEMM),
      'shift' (a sum of one GEMM per kernel tap, never building patches),
      'depthwise' (multiply-accumulate when each group has one input feature) or
      'auto' (default: depthwise where it applies, else im2col).
    memory_budget: keyword-only, the largest patch matrix in bytes that im2col
      may build at once (default 128 MiB, see :func:`set_memory_budget`); larger
      work is mapped over batch chunks.

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
  method, memory_budget = _check_method(fn, method, memory_budget)
  choose_method(spec, method)
  out = conv_with_spec(jnp.asarray(lhs), jnp.asarray(rhs), spec, precision,
                       preferred_element_type, method, memory_budget)
  if out_sharding is not None:
    out = jax.sharding.reshard(out, out_sharding)
  return out


def conv_with_spec(
    lhs: jax.Array, rhs: jax.Array, spec: ConvSpec, precision: Any = None,
    preferred_element_type: Any = None, method: str = "auto",
    memory_budget: int | None = None,
) -> jax.Array:
  """The convolution for an already validated :class:`ConvSpec`."""
  lhs_spec, _, out_spec = spec.geometry.dimension_numbers
  y = conv_channels_last(
      to_channels_last(lhs, lhs_spec), kernel_taps_last(rhs, spec), spec, precision,
      preferred_element_type, method, memory_budget)
  return from_channels_last(y, out_spec)
