"""conv_general_dilated as im2col followed by one (batched) GEMM."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm import _autodiff
from convmm._im2col import (
    from_channels_last,
    pad_input,
    tap_offsets,
    tap_slice,
    to_channels_last,
    unfold_padded,
)
from convmm._shapes import ConvSpec, check_same_dtype, conv_spec, shape_of


def kernel_taps_last(rhs: jax.Array, spec: ConvSpec) -> jax.Array:
  """Kernel in any layout -> ``(T, I, O)`` with taps in row-major order."""
  _, rhs_spec, _ = spec.geometry.dimension_numbers
  w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  return w.reshape(spec.geometry.num_taps, w.shape[-2], w.shape[-1])


METHODS = ("auto", "im2col", "shift", "depthwise")

# A tile's working set (patches and their companions, see `tile_plan`) larger than
# this is never materialised whole: the work is tiled over the batch, then over
# output rows. On CPU the budget is also a speed setting: XLA temporaries above
# glibc's 32 MiB mmap threshold are mapped afresh and page-faulted on every call,
# which can cost more than the GEMM; 32 MiB measured best across the benchmark
# suite (16 and 64 MiB were slower on most layers). Change it per call with
# `memory_budget=` or globally with `set_memory_budget`.
_DEFAULT_MEMORY_BUDGET = 32 * 2**20


def set_memory_budget(nbytes: int) -> int:
  """Sets the default tile working-set budget in bytes; returns the previous value.

  The budget is read when a convolution is traced: functions already compiled
  keep the tiling they were traced with.

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


def choose_method(spec: ConvSpec, method: str, fn: str = "conv_general_dilated") -> str:
  """Resolves ``method="auto"`` for a convolution (static, shape-based).

  'depthwise' where each group has a single input feature (a multiply-accumulate
  beats a GEMM whose inner dimension is the window size), 'im2col' otherwise.
  """
  geometry = spec.geometry
  cg = geometry.in_features // spec.feature_group_count
  depthwise_ok = cg == 1 and spec.batch_group_count == 1
  if method == "depthwise" and not depthwise_ok:
    raise ValueError(
        f"{fn}: `method`='depthwise' needs one input feature per group "
        f"(feature_group_count == lhs features); got feature_group_count="
        f"{spec.feature_group_count} for {geometry.in_features} features")
  if method != "auto":
    return method
  if depthwise_ok and spec.feature_group_count > 1:
    return "depthwise"
  return "im2col"


def tile_plan(spec: ConvSpec, itemsize: int, budget: int,
              patch_copies: int = 3) -> tuple[int, int]:
  """Batch chunk ``b`` and output-row chunk ``r`` whose working set fits ``budget``.

  A tile's working set is counted as ``patch_copies`` patch matrices (im2col:
  three, as the backward pass holds the rematerialised patches, their cotangent
  and a GEMM operand copy; depthwise builds none, but its backward holds one
  shifted copy of the input per tap, about one patch matrix), the intermediate
  of the first unfolding stage, and the padded input. Whole batches are split
  first (batch groups are kept whole), then the first output spatial dimension;
  both chunks divide evenly.
  """
  g = spec.geometry
  n, out, padded = g.batch, g.out_spatial, g.padded_spatial
  c = g.in_features * itemsize
  sample = patch_copies * math.prod(out) * g.num_taps * c + math.prod(padded) * c
  if len(out) > 1:  # unfold_padded's first stage: the last dim unfolded only
    sample += math.prod(padded[:-1]) * out[-1] * g.filter_shape[-1] * c
  rows = out[0] if out else 1
  if n * sample <= budget or n == 0 or rows == 0:
    return n, rows

  def largest_divisor(size: int, unit: float) -> int:
    fitting = [d for d in range(1, size + 1) if size % d == 0 and d * unit <= budget]
    return max(fitting, default=1)

  b = n if spec.batch_group_count > 1 else largest_divisor(n, sample)
  if b * sample <= budget or not out:
    return b, rows
  return b, largest_divisor(rows, b * sample / rows)


def _tiled(compute, x_cl: jax.Array, spec: ConvSpec, b: int, r: int) -> jax.Array:
  """Runs ``compute(x_tile, tile_spec)`` over batch and output-row tiles.

  Each batch chunk of ``x_cl`` is dilated and padded on its own (the padded
  whole input is never built), then each tile is a convolution with no
  padding of its own. Tiles go through ``lax.map`` (batch chunks, and
  row windows within a chunk) with each body rematerialised in the backward
  pass, so neither the forward nor autodiff keeps more than one tile's patches
  alive.
  """
  g = spec.geometry
  zeros = ((0, 0),) * g.num_spatial
  ones = (1,) * g.num_spatial
  padded = g.padded_spatial
  n, out = g.batch, g.out_spatial
  rows_in = (r - 1) * g.window_strides[0] + g.effective_filter_shape[0] if out else 0
  tile_geometry = dataclasses.replace(
      g, batch=b, padding=zeros, lhs_dilation=ones,
      in_spatial=(rows_in if r < out[0] else padded[0], *padded[1:]) if out else (),
      out_spatial=(r, *out[1:]) if out else ())
  tile_spec = dataclasses.replace(spec, geometry=tile_geometry)
  nr = out[0] // r if out and r else 1
  remat = functools.partial(jax.checkpoint, prevent_cse=False)

  def rows_of(xb):  # (b, *spatial, C) -> (b', *out, O)
    xb = pad_input(xb, g)
    if nr == 1:
      return compute(xb, tile_spec)
    step = r * g.window_strides[0]
    windows = jnp.stack([lax.slice_in_dim(xb, i * step, i * step + rows_in, axis=1)
                         for i in range(nr)])
    ys = lax.map(remat(lambda w: compute(w, tile_spec)), windows)  # (nr, b', r, ..., O)
    ys = jnp.swapaxes(ys, 0, 1)
    return ys.reshape(ys.shape[0], *out, ys.shape[-1])

  if b == n:
    return rows_of(x_cl)
  nb = n // b
  # Batch chunks are a free reshape; row windows overlap, so they are cut inside
  # each batch chunk and only one chunk's windows exist at a time.
  ys = lax.map(remat(rows_of), x_cl.reshape(nb, b, *x_cl.shape[1:]))
  return ys.reshape(nb * ys.shape[1], *ys.shape[2:])


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
  out_dtype = None
  if preferred_element_type is None and jnp.issubdtype(lhs.dtype, jnp.floating) and (
      jnp.dtype(lhs.dtype).itemsize < 4):
    # 16-bit floats accumulate in float32 and round once: more accurate, and on
    # CPU bfloat16 x bfloat16 -> float32 is XLA's fast GEMM (2-3x float32's).
    preferred_element_type, out_dtype = jnp.float32, lhs.dtype
  if g == 1 and gb == 1:
    y = lax.dot_general(
        lhs, w, (((lhs.ndim - 2, lhs.ndim - 1), (0, 1)), ((), ())), precision=precision,
        preferred_element_type=preferred_element_type)
    return y if out_dtype is None else y.astype(out_dtype)
  groups, og, cg = g * gb, o // (g * gb), c // g
  lhs = lhs.reshape(gb, n // gb, *out, k, g, cg)
  m = (n // gb) * math.prod(out)
  lhs = jnp.moveaxis(lhs, -2, 0).reshape(groups, m, k * cg)  # (groups, M, K)
  w = jnp.moveaxis(w.reshape(k, cg, groups, og), 2, 0).reshape(groups, k * cg, og)
  y = lax.dot_general(
      lhs, w, (((2,), (1,)), ((0,), (0,))), precision=precision,
      preferred_element_type=preferred_element_type)  # (groups, M, Og)
  y = jnp.moveaxis(y.reshape(groups, n // gb, *out, og), 0, -2)
  y = y.reshape(n // gb, *out, o)
  return y if out_dtype is None else y.astype(out_dtype)


def _im2col_gemm(x_padded, w_tio, spec, precision, preferred_element_type):
  """Patches of a padded input, then one (batched) GEMM."""
  patches = _autodiff.from_bits(unfold_padded(_autodiff.to_bits(x_padded), spec.geometry),
                                x_padded.dtype)
  return _group_gemm(patches, w_tio, spec, precision, preferred_element_type)


def _accumulator_dtype(out_dtype: Any) -> Any:
  """float32 for 16-bit floats (as a GEMM accumulates), else the output dtype."""
  out_dtype = jnp.dtype(out_dtype)
  if jnp.issubdtype(out_dtype, jnp.floating) and out_dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return out_dtype


def _shift_gemm(x_padded, w_tio, spec, precision, preferred_element_type):
  """Shift-and-accumulate: a sum over taps of slice @ kernel tap; no patch matrix.

  Each tap's GEMM and the running sum are in float32 for 16-bit floats (one
  rounding at the end, like one GEMM over all taps), so float16 does not
  overflow in partial sums where a single accumulation would not.
  """
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_padded.dtype, w_tio.dtype))
  acc_dtype = _accumulator_dtype(out_dtype)
  y = None
  for t, offset in enumerate(tap_offsets(spec.geometry)):
    tap = tap_slice(x_padded, spec.geometry, offset)[..., None, :]  # (N, *out, 1, C)
    term = _group_gemm(tap, w_tio[t:t + 1], spec, precision, acc_dtype)
    y = term if y is None else y + term
  assert y is not None  # every kernel has at least one tap
  return y.astype(out_dtype)


def _depthwise(x_padded, w_tio, spec, precision, preferred_element_type):
  """One input feature per group: multiply-accumulate over taps (no GEMM needed)."""
  del precision  # elementwise products are exact; the sum is in the accumulator
  geometry = spec.geometry
  c = geometry.in_features
  mult = spec.out_features // c
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_padded.dtype, w_tio.dtype))
  acc_dtype = _accumulator_dtype(out_dtype)  # as the GEMM would
  x_padded = x_padded.astype(acc_dtype)
  # o = c * mult + j; leading unit axes broadcast each tap's (C, mult) weights over
  # (N, *out) without relying on implicit rank promotion.
  w = w_tio.reshape(geometry.num_taps, *(1,) * (1 + geometry.num_spatial), c, mult)
  w = w.astype(acc_dtype)
  y = None
  for t, offset in enumerate(tap_offsets(geometry)):
    tap = tap_slice(x_padded, geometry, offset)[..., None]  # (N, *out, C, 1)
    term = tap * w[t]
    y = term if y is None else y + term
  assert y is not None  # every kernel has at least one tap
  return y.reshape(*y.shape[:-2], c * mult).astype(out_dtype)


_COMPUTE = {"im2col": _im2col_gemm, "shift": _shift_gemm, "depthwise": _depthwise}


def conv_channels_last(
    x_cl: jax.Array, w_tio: jax.Array, spec: ConvSpec, precision: Any,
    preferred_element_type: Any, method: str = "auto", memory_budget: int | None = None,
) -> jax.Array:
  """The convolution on canonical channels-last operands.

  Args:
    x_cl: input ``(N, *spatial, C)``.
    w_tio: kernel ``(T, C // feature_group_count, O)``, taps in row-major order.
    spec: the validated convolution.
    method: 'im2col' (patches + one GEMM), 'shift' (sum of per-tap GEMMs),
      'depthwise' (multiply-accumulate) or 'auto'. im2col and depthwise are
      tiled over the batch, then output rows, beyond the memory budget.

  Returns:
    ``(N // batch_group_count, *out_spatial, O)``.
  """
  method = choose_method(spec, method)
  budget = _DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
  compute = functools.partial(_COMPUTE[method], w_tio=w_tio, precision=precision,
                              preferred_element_type=preferred_element_type)
  if method == "shift":  # builds no patches: nothing to tile
    return compute(pad_input(x_cl, spec.geometry), spec=spec)
  b, r = tile_plan(spec, jnp.dtype(x_cl.dtype).itemsize, budget,
                   patch_copies=1 if method == "depthwise" else 3)
  return _tiled(lambda x, s: compute(x, spec=s), x_cl, spec, b, r)


def conv_general_dilated(
    lhs: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    out_sharding: jax.sharding.NamedSharding | jax.sharding.PartitionSpec | None = None,
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
      may build at once (default 32 MiB, see :func:`set_memory_budget`); larger
      work is mapped over batch chunks, then output-row chunks.

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
  choose_method(spec, method, fn)
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
  lhs_spec, rhs_spec, out_spec = spec.geometry.dimension_numbers
  x_cl = to_channels_last(lhs, lhs_spec)
  if choose_method(spec, method) == "im2col":
    # The primitive carries convmm's own derivatives (see _autodiff).
    w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (*window, I, O)
    y = _autodiff.conv(x_cl, w, spec, precision, preferred_element_type, "im2col",
                       memory_budget)
  else:
    y = conv_channels_last(x_cl, kernel_taps_last(rhs, spec), spec, precision,
                           preferred_element_type, method, memory_budget)
  return from_channels_last(y, out_spec)
