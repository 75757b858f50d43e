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

from convmm._engine import autodiff as _autodiff
from convmm._engine import sharding as _sharding
from convmm._engine.budget import current_memory_budget
from convmm._engine.im2col import (
  feature_groups_first,
  from_channels_last,
  pad_input,
  patches_channels_last,
  tap_offsets,
  tap_slice,
  to_channels_last,
)
from convmm._engine.phases import phase_conv
from convmm._engine.tiling import tile_conv
from convmm._rules.canonical import positive_count
from convmm._rules.shapes import ConvSpec, accumulator_dtype, check_dtypes, conv_spec, shape_of


def kernel_taps_last(rhs: jax.Array, spec: ConvSpec) -> jax.Array:
  """Kernel in any layout -> ``(T, I, O)`` with taps in row-major order."""
  _, rhs_spec, _ = spec.geometry.dimension_numbers
  w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  return w.reshape(spec.geometry.num_taps, w.shape[-2], w.shape[-1])


METHODS = ("auto", "im2col", "shift", "depthwise")


def check_method(fn: str, method: Any, memory_budget: Any) -> tuple[str, int]:
  if method not in METHODS:
    raise ValueError(f"{fn}: `method` must be one of {METHODS}, got {method!r}")
  if memory_budget is None:
    return method, current_memory_budget()
  return method, positive_count(fn, "memory_budget", memory_budget, unit="bytes")


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
      f"{spec.feature_group_count} for {geometry.in_features} features"
    )
  if method != "auto":
    return method
  if depthwise_ok and spec.feature_group_count > 1:
    return "depthwise"
  return "im2col"


def _group_gemm(
  lhs: jax.Array,
  w: jax.Array,
  spec: ConvSpec,
  precision: Any,
  preferred_element_type: Any,
  groups_first: bool = False,
) -> jax.Array:
  """``(N, *out, K, C) x (K, C // g, O) -> (N // gb, *out, O)`` as a batched GEMM.

  Contracts the trailing (K, C) axes of ``lhs`` with the leading (K, C//g) axes of
  ``w``. Both kinds of groups are a batch axis of the GEMM: feature groups split C
  (and O), batch groups split N (and O); lax orders both group-major. With
  ``groups_first``, ``lhs`` is ``(g, N, *out, K, C // g)``, its feature groups
  already major (patches of :func:`feature_groups_first`'s input), so the
  GEMM's operand is ``lhs`` itself, not a transposed copy.
  """
  o = spec.out_features
  g, gb = spec.feature_group_count, spec.batch_group_count
  if groups_first:
    _, n, *out, k, cg = lhs.shape
    c = cg * g
  else:
    n, *out, k, c = lhs.shape
  out_dtype = None
  if preferred_element_type is None and accumulator_dtype(lhs.dtype) is not None:
    # 16-bit floats accumulate in float32 and round once: more accurate, and on
    # CPU bfloat16 x bfloat16 -> float32 is XLA's fast GEMM (2-3x float32's).
    preferred_element_type, out_dtype = jnp.float32, lhs.dtype
  if g == 1 and gb == 1:
    y = lax.dot_general(
      lhs,
      w,
      (((lhs.ndim - 2, lhs.ndim - 1), (0, 1)), ((), ())),
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    return y if out_dtype is None else y.astype(out_dtype)
  groups, og, cg = g * gb, o // (g * gb), c // g
  m = (n // gb) * math.prod(out)
  if groups_first:
    lhs = lhs.reshape(groups, m, k * cg)  # a reshape, not a copy
  else:
    lhs = lhs.reshape(gb, n // gb, *out, k, g, cg)
    lhs = jnp.moveaxis(lhs, -2, 0).reshape(groups, m, k * cg)  # (groups, M, K)
  w = jnp.moveaxis(w.reshape(k, cg, groups, og), 2, 0).reshape(groups, k * cg, og)
  y = lax.dot_general(
    lhs,
    w,
    (((2,), (1,)), ((0,), (0,))),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )  # (groups, M, Og)
  y = jnp.moveaxis(y.reshape(groups, n // gb, *out, og), 0, -2)
  y = y.reshape(n // gb, *out, o)
  return y if out_dtype is None else y.astype(out_dtype)


def _im2col_gemm(x, w_tio, spec, precision, preferred_element_type):
  """Patches (padding included), then one (batched) GEMM.

  With feature groups, each group's slice of the input gets its own patch
  matrix (:func:`feature_groups_first`), so the patches never move for the
  batched GEMM (a grouped 8x28x28x128 3x3 layer's forward: 0.62x the time of
  transposed patches in float32, 0.49x in bfloat16).
  """
  g = spec.feature_group_count
  if g == 1:
    patches = patches_channels_last(x, spec.geometry)
    return _group_gemm(patches, w_tio, spec, precision, preferred_element_type)
  geometry = dataclasses.replace(spec.geometry, in_features=spec.geometry.in_features // g)
  patches = jax.vmap(lambda xg: patches_channels_last(xg, geometry))(feature_groups_first(x, g))
  return _group_gemm(patches, w_tio, spec, precision, preferred_element_type, groups_first=True)


def _accumulator_dtype(out_dtype: Any) -> Any:
  """float32 for 16-bit floats (as a GEMM accumulates), else the output dtype."""
  acc_dtype = accumulator_dtype(out_dtype)
  return jnp.dtype(out_dtype) if acc_dtype is None else acc_dtype


def _shift_gemm(x, w_tio, spec, precision, preferred_element_type):
  """Shift-and-accumulate: a sum over taps of slice @ kernel tap; no patch matrix.

  Each tap's GEMM and the running sum are in float32 for 16-bit floats (one
  rounding at the end, like one GEMM over all taps), so float16 does not
  overflow in partial sums where a single accumulation would not.
  """
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x.dtype, w_tio.dtype))
  acc_dtype = _accumulator_dtype(out_dtype)
  x_padded = pad_input(x, spec.geometry)
  y = None
  for t, offset in enumerate(tap_offsets(spec.geometry)):
    tap = tap_slice(x_padded, spec.geometry, offset)[..., None, :]  # (N, *out, 1, C)
    term = _group_gemm(tap, w_tio[t : t + 1], spec, precision, acc_dtype)
    y = term if y is None else y + term
  assert y is not None  # every kernel has at least one tap
  return y.astype(out_dtype)


def _depthwise(x, w_tio, spec, precision, preferred_element_type):
  """One input feature per group: multiply-accumulate over taps (no GEMM needed)."""
  del precision  # elementwise products are exact; the sum is in the accumulator
  geometry = spec.geometry
  c = geometry.in_features
  mult = spec.out_features // c
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x.dtype, w_tio.dtype))
  acc_dtype = _accumulator_dtype(out_dtype)  # as the GEMM would
  x_padded = pad_input(x.astype(acc_dtype), geometry)
  # o = c * mult + j; leading unit axes broadcast each tap's (C, mult) weights over
  # (N, *out) without relying on implicit rank promotion.
  w = w_tio.reshape(geometry.num_taps, *(1,) * (1 + geometry.num_spatial), c, mult)
  w = w.astype(acc_dtype)
  y = None
  for t, offset in enumerate(tap_offsets(geometry)):
    term = tap_slice(x_padded, geometry, offset)[..., None] * w[t]  # (N, *out, C, mult)
    y = term if y is None else y + term
  assert y is not None  # every kernel has at least one tap
  return y.reshape(*y.shape[:-2], c * mult).astype(out_dtype)


_COMPUTE = {"im2col": _im2col_gemm, "shift": _shift_gemm, "depthwise": _depthwise}


def conv_channels_last(
  x_cl: jax.Array,
  w_tio: jax.Array,
  spec: ConvSpec,
  precision: Any,
  preferred_element_type: Any,
  method: str = "auto",
  memory_budget: int | None = None,
) -> jax.Array:
  """The convolution on canonical channels-last operands.

  Args:
    x_cl: input ``(N, *spatial, C)``.
    w_tio: kernel ``(T, C // feature_group_count, O)``, taps in row-major order.
    spec: the validated convolution.
    method: 'im2col' (patches + one GEMM), 'shift' (sum of per-tap GEMMs),
      'depthwise' (multiply-accumulate) or 'auto'. im2col is tiled over the
      batch, then output rows, beyond the memory budget; shift and depthwise
      build no patches and are not tiled.

  Returns:
    ``(N // batch_group_count, *out_spatial, O)``.
  """
  out_dtype = preferred_element_type or jnp.result_type(x_cl.dtype, w_tio.dtype)
  if any(d > 1 for d in spec.geometry.lhs_dilation):  # never multiply the dilation's holes
    return phase_conv(
      lambda x, w, s: conv_channels_last(
        x, w, s, precision, preferred_element_type, method, memory_budget
      ),
      x_cl,
      w_tio,
      spec,
      out_dtype,
    )
  method = choose_method(spec, method)
  compute = functools.partial(
    _COMPUTE[method],
    w_tio=w_tio,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if method != "im2col":  # builds no patches: nothing to tile
    return compute(x_cl, spec=spec)
  return tile_conv(lambda x, s: compute(x, spec=s), x_cl, spec, out_dtype, memory_budget)


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
    batch_group_count: number of batch groups. Both counts also accept an
      integral float (``1.0``), which lax rejects.
    precision: passed to ``lax.dot_general``.
    preferred_element_type: accumulation and output dtype.
    out_sharding: optional sharding of the result (a ``NamedSharding`` or a
      ``PartitionSpec`` under a mesh): a ``jax.sharding.reshard`` on explicit
      mesh axes, a sharding constraint on auto ones (which lax 0.10.2
      rejects; convmm accepts them deliberately). With it, input features
      and kernel input features sharded alike over explicit axes (lax's
      kernel gradient of a batch-sharded input) are convolved slice by slice
      on each device and summed (one all-reduce, as lax's partitioner does).
    method: keyword-only, how to compute it: 'im2col' (patches + one GEMM),
      'shift' (a sum of one GEMM per kernel tap, never building patches),
      'depthwise' (multiply-accumulate when each group has one input feature) or
      'auto' (default: depthwise where it applies, else im2col).
    memory_budget: keyword-only, bytes a tile's whole working set may hold
      (its input window, its patches counted three times, twice in a kernel
      gradient, the unfolding's first stage and its output; default 16 MiB, see
      :func:`convmm.memory_budget`); larger work is mapped over output rows,
      then columns, then batch chunks. The padded input and the output are
      held besides. Only im2col is tiled: 'shift' and 'depthwise' build no
      patches.

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
  lax_args = (
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
  )
  spec = conv_spec(fn, lhs_shape, rhs_shape, *lax_args)
  preferred_element_type = check_dtypes(fn, lhs_dtype, rhs_dtype, preferred_element_type)
  method, memory_budget = check_method(fn, method, memory_budget)
  choose_method(spec, method, fn)
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  # On explicit meshes, lax's sharding rule decides (and rejects what it rejects).
  lax_sharding = (
    None
    if out_sharding is not None
    else _sharding.lax_out_sharding(lhs, rhs, *lax_args, preferred_element_type)
  )
  if out_sharding is not None and (axes := _sharding.contracted_axes(lhs, rhs, spec)):
    # A contraction sharded over explicit axes (lax's kernel gradient of a
    # batch-sharded input): a partial convolution per device, then a sum.
    def local(a, b):
      local_spec = conv_spec(fn, a.shape, b.shape, *lax_args)
      return conv_with_spec(
        a, b, local_spec, precision, preferred_element_type, method, memory_budget
      )

    out = _sharding.sum_over_shards(local, lhs, rhs, spec, axes)
  else:
    out = conv_with_spec(lhs, rhs, spec, precision, preferred_element_type, method, memory_budget)
  if out_sharding is not None:
    out = _sharding.constrain(out, out_sharding)
  elif lax_sharding is not None and jax.typeof(out).sharding.spec != lax_sharding.spec:
    out = jax.sharding.reshard(out, lax_sharding.spec)
  return out


def conv_with_spec(
  lhs: jax.Array,
  rhs: jax.Array,
  spec: ConvSpec,
  precision: Any = None,
  preferred_element_type: Any = None,
  method: str = "auto",
  memory_budget: int | None = None,
) -> jax.Array:
  """The convolution for an already validated :class:`ConvSpec`."""
  lhs_spec, rhs_spec, out_spec = spec.geometry.dimension_numbers
  x_cl = to_channels_last(lhs, lhs_spec)
  if (chosen := choose_method(spec, method)) != "shift":
    # The primitive carries convmm's own derivatives (see _autodiff).
    w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (*window, I, O)
    y = _autodiff.conv(
      x_cl,
      w,
      spec,
      precision=precision,
      preferred_element_type=preferred_element_type,
      method=chosen,
      memory_budget=memory_budget,
    )
  else:
    y = conv_channels_last(
      x_cl,
      kernel_taps_last(rhs, spec),
      spec,
      precision,
      preferred_element_type,
      method,
      memory_budget,
    )
  return from_channels_last(y, out_spec)
