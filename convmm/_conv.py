"""conv_general_dilated: the public convolution, validated, then the engine's primitive.

Arguments are read and checked first (:mod:`convmm._rules`), then the operands go
channels-last into :func:`convmm._engine.autodiff.conv` (the im2col and depthwise
kernels, with convmm's own derivatives) or, for ``method='shift'``, straight into the
forward kernels (:mod:`convmm._engine.kernels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from convmm._engine import autodiff as _autodiff
from convmm._engine import directions as _directions
from convmm._engine import native
from convmm._engine import sharding as _sharding
from convmm._engine.budget import current_memory_budget
from convmm._engine.channels_first import depthwise_in_layout
from convmm._engine.im2col import from_channels_last, kernel_channels_last, to_channels_last
from convmm._engine.kernels import choose_method, conv_channels_last, kernel_taps_last
from convmm._engine.policy import CONVMM, XLA
from convmm._rules.canonical import positive_count
from convmm._rules.shapes import ConvSpec, check_dtypes, conv_spec, shape_of


def check_method(fn: str, method: Any, memory_budget: Any) -> tuple[str, int]:
  method = _directions.method_name(fn, method)
  if memory_budget is None:
    return method, current_memory_budget()
  return method, positive_count(fn, "memory_budget", memory_budget, unit="bytes")


class _Checked(NamedTuple):
  spec: ConvSpec
  dtypes: tuple[Any, Any]  # lhs, rhs
  preferred_element_type: Any
  method: str
  memory_budget: int
  engine: str


def _checked(fn, lhs, rhs, lax_args, preferred_element_type, method, memory_budget) -> _Checked:
  """Every argument checked before tracing, and convmm's engine for the convolution."""
  lhs_shape, lhs_dtype = shape_of(fn, "lhs", lhs)
  rhs_shape, rhs_dtype = shape_of(fn, "rhs", rhs)
  spec = conv_spec(fn, lhs_shape, rhs_shape, *lax_args)
  preferred_element_type = check_dtypes(fn, lhs_dtype, rhs_dtype, preferred_element_type)
  method, memory_budget = check_method(fn, method, memory_budget)
  engine = choose_method(spec, method, fn)
  dtypes = (lhs_dtype, rhs_dtype)
  return _Checked(spec, dtypes, preferred_element_type, method, memory_budget, engine)


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
  method: str | None = None,
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
    method: keyword-only, who computes each direction (forward, input
      gradient, kernel gradient; :func:`convmm.algorithms` tells).
      'auto' (default): a rule table per backend, from shapes, dtypes and
      parameters, when traced (on CPU, measured: XLA's own convolution for
      dense float32 1-D convolutions and for the unit-stride input gradient
      and some forwards of dense float32 2-D ones; convmm's engine for 2-D
      kernel gradients and for grouped, depthwise, input-dilated, 1x1, 3-D
      and 16-bit ones; on GPU/TPU XLA's except depthwise; see the design page
      of the docs).
      'autotune': both timed on this exact convolution when first traced, the
      faster kept (remembered in memory and in a cache file; see
      :func:`convmm.autotune_report`). 'xla': XLA's convolution in every
      direction. Pure convmm, never XLA's convolution: 'convmm' (its engine
      chosen by shape: depthwise where each group has one input feature,
      else im2col), 'im2col' (patches + one GEMM), 'shift' (a sum of one
      GEMM per kernel tap, never building patches), 'depthwise'
      (multiply-accumulate, one input feature per group).
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
  lax_args = (
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
  )
  fn = "conv_general_dilated"
  spec, _, preferred_element_type, method, memory_budget, _ = _checked(
    fn, lhs, rhs, lax_args, preferred_element_type, method, memory_budget
  )
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
  """The convolution for an already validated :class:`ConvSpec`.

  Computed in the operands' own layouts where the chosen algorithms allow (XLA's
  convolution in every direction; convmm's depthwise multiply-accumulate on
  channels-first operands), otherwise channels-last around convmm's primitive.
  """
  lhs_spec, rhs_spec, out_spec = spec.geometry.dimension_numbers
  if (chosen := choose_method(spec, method)) == "shift":
    y = conv_channels_last(
      to_channels_last(lhs, lhs_spec),
      kernel_taps_last(rhs, spec),
      spec,
      precision,
      preferred_element_type,
      method,
      memory_budget,
    )
    return from_channels_last(y, out_spec)
  x_aval, w_aval = _canonical_avals(spec, lhs.dtype, rhs.dtype)
  directions = _directions.choose(
    method, spec, x_aval, w_aval, chosen, precision, preferred_element_type, memory_budget
  )
  if directions == XLA:
    dn = spec.geometry.dimension_numbers
    return native.forward(lhs, rhs, spec, precision, preferred_element_type, dn)
  if chosen == "depthwise" and directions == CONVMM:
    y = depthwise_in_layout(lhs, rhs, spec, preferred_element_type, memory_budget)
    if y is not None:
      return y
  # The primitive carries convmm's own derivatives (see convmm._engine.autodiff).
  w = kernel_channels_last(rhs, rhs_spec)  # (*window, I, O)
  y = _autodiff.conv(
    to_channels_last(lhs, lhs_spec),
    w,
    spec,
    precision=precision,
    preferred_element_type=preferred_element_type,
    method=chosen,
    memory_budget=memory_budget,
    directions=directions,
  )
  return from_channels_last(y, out_spec)


def _canonical_avals(spec: ConvSpec, lhs_dtype: Any, rhs_dtype: Any):
  """The channels-last input ``(N, *sp, C)`` and kernel ``(*k, I, O)`` of ``spec``, as avals."""
  g = spec.geometry
  x = jax.ShapeDtypeStruct((g.batch, *g.in_spatial, g.in_features), lhs_dtype)
  w = jax.ShapeDtypeStruct(
    (*g.filter_shape, g.in_features // spec.feature_group_count, spec.out_features), rhs_dtype
  )
  return x, w


def algorithms(
  lhs: Any,
  rhs: Any,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: lax.PrecisionLike = None,
  preferred_element_type: jax.typing.DTypeLike | None = None,
  *,
  method: str | None = None,
  memory_budget: int | None = None,
) -> dict[str, str]:
  """Which algorithm computes each direction of a :func:`conv_general_dilated` call.

  Takes the same arguments (arrays or ``jax.ShapeDtypeStruct``) and computes
  nothing but the choice (with ``method='autotune'``, the measurement on first
  use). 'xla' is XLA's own convolution; 'im2col', 'depthwise' and 'shift'
  are convmm's engines.

  Returns:
    ``{'forward': ..., 'input_grad': ..., 'kernel_grad': ...}``.

  Example:
    >>> import jax, convmm
    >>> x = jax.ShapeDtypeStruct((8, 28, 28, 128), 'float32')
    >>> w = jax.ShapeDtypeStruct((3, 3, 128, 128), 'float32')
    >>> convmm.algorithms(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    ...                   method='im2col')
    {'forward': 'im2col', 'input_grad': 'im2col', 'kernel_grad': 'im2col'}
  """
  lax_args = (
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
  )
  spec, (lhs_dtype, rhs_dtype), preferred_element_type, method, memory_budget, engine = _checked(
    "algorithms", lhs, rhs, lax_args, preferred_element_type, method, memory_budget
  )
  if engine == "shift":
    return dict.fromkeys(_directions.DIRECTION_NAMES, engine)
  x, w = _canonical_avals(spec, lhs_dtype, rhs_dtype)
  chosen = _directions.choose(
    method, spec, x, w, engine, precision, preferred_element_type, memory_budget
  )
  return {
    name: engine if who == "convmm" else who
    for name, who in zip(_directions.DIRECTION_NAMES, chosen)
  }
