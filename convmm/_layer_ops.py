"""Layer ops: the computation of the Flax conv layers on a validated geometry.

Each op takes the :class:`~convmm._layer_geometry.LayerGeometry` a layer built
once, its promoted operands, and calls the convmm core: flatten the leading
batch dimensions, ``jnp.pad`` the modes lax has no name for, convolve, add the
bias. One compiled computation per layer call (see :func:`_compiled`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm import _adjoint, _conv, _im2col
from convmm._budget import current_memory_budget
from convmm._layer_geometry import LayerGeometry, adjoint_input_spatial, in_features_of


def _flatten_batch(
  geometry: LayerGeometry,
  inputs: jax.Array,
  in_features: int | None,
) -> tuple[jax.Array, tuple]:
  in_features_of(geometry, inputs, in_features)
  batch_shape = inputs.shape[: inputs.ndim - geometry.rank - 1]
  flat = inputs.reshape(math.prod(batch_shape), *inputs.shape[len(batch_shape) :])
  return flat, batch_shape


def _finish(y: jax.Array, bias: jax.Array | None, batch_shape: tuple) -> jax.Array:
  if bias is not None:
    y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return y.reshape(*batch_shape, *y.shape[1:])


def _compiled(*static_argnames: str) -> Callable:
  # One compiled computation per layer call. The im2col core is dozens of
  # small ops (a slice per kernel tap, their transposes in the adjoint), which
  # eager use would compile and dispatch one by one; under an outer jit this
  # inner jit is simply inlined. The geometry and options are static. The memory
  # budget in force is part of the cache key (it is read while tracing).
  def decorate(fn: Callable) -> Callable:
    def with_budget(*args, memory_budget_key: int, **kwargs):
      del memory_budget_key
      return fn(*args, **kwargs)

    jitted = jax.jit(
      with_budget, static_argnums=0, static_argnames=(*static_argnames, "memory_budget_key")
    )

    @functools.wraps(fn)
    def call(*args, **kwargs):
      return jitted(*args, memory_budget_key=current_memory_budget(), **kwargs)

    return call

  return decorate


@_compiled(
  "in_features", "precision", "preferred_element_type", "conv_general_dilated", "out_sharding"
)
def conv_layer(
  geometry: LayerGeometry,
  inputs: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  *,
  in_features: int | None = None,
  precision: Any = None,
  preferred_element_type: Any = None,
  conv_general_dilated: Callable[..., jax.Array] | None = None,
  out_sharding: Any = None,
) -> jax.Array:
  """The Conv layer's computation: pad, convolve, add the bias.

  Args:
    geometry: from :func:`~convmm._layer_geometry.conv_layer_geometry`.
    inputs: ``(*batch, *spatial, C)``, already promoted.
    kernel: ``(*kernel_size, C // groups, O)``, masked and promoted.
    bias: ``(O,)`` or ``None``.
    in_features: if given, the inputs' last dimension must equal it.
    precision: passed to the convolution.
    preferred_element_type: passed to the convolution when not ``None``.
    conv_general_dilated: the convolution (default ``convmm.conv_general_dilated``).
    out_sharding: passed to the convolution when not ``None``.

  Returns:
    ``(*batch, *out_spatial, O)``.
  """
  x, batch_shape = _flatten_batch(geometry, inputs, in_features)
  conv_fn = conv_general_dilated or _conv.conv_general_dilated
  # Like flax.nnx, pass preferred_element_type only when set, so that
  # user-supplied convolution functions without that argument keep working.
  extra = (
    {} if preferred_element_type is None else {"preferred_element_type": preferred_element_type}
  )
  if out_sharding is not None:
    extra["out_sharding"] = out_sharding
  y = conv_fn(
    geometry.pad(x),
    kernel,
    geometry.strides,
    geometry.lax_padding,
    lhs_dilation=geometry.input_dilation,
    rhs_dilation=geometry.kernel_dilation,
    dimension_numbers=geometry.dimension_numbers,
    feature_group_count=geometry.feature_group_count,
    precision=precision,
    **extra,
  )
  return _finish(y, bias, batch_shape)


@_compiled("in_features", "input_spatial_shape", "precision", "preferred_element_type")
def conv_local_layer(
  geometry: LayerGeometry,
  inputs: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  *,
  in_features: int | None = None,
  input_spatial_shape: Sequence[int] | None = None,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """The locally connected layer: im2col, then one GEMM per output position.

  Computes what ``lax.conv_general_dilated_local`` computes: the patch of each
  output position (channel-major features, as ``convmm.im2col`` orders them)
  times that position's own ``(K, O)`` kernel matrix, i.e. a dot_general
  batched over the output positions.

  Args:
    geometry: from :func:`~convmm._layer_geometry.conv_layer_geometry`.
    inputs: ``(*batch, *spatial, C)``, already promoted.
    kernel: ``(*out_spatial, prod(kernel_size) * C, O)``.
    bias: ``(*out_spatial, O)`` or ``None``.
    in_features: if given, the inputs' last dimension must equal it.
    input_spatial_shape: if given, the inputs' spatial shape must equal it.
    precision, preferred_element_type: passed to the GEMM.

  Returns:
    ``(*batch, *out_spatial, O)``.
  """
  x, batch_shape = _flatten_batch(geometry, inputs, in_features)
  if input_spatial_shape is not None and x.shape[1:-1] != tuple(input_spatial_shape):
    raise ValueError(
      f"{geometry.layer}: the inputs' spatial shape must be `input_spatial_shape` "
      f"(={tuple(input_spatial_shape)}), the one the kernel was built for, got "
      f"inputs.shape={inputs.shape}"
    )
  patches = _im2col.im2col(
    geometry.pad(x),
    geometry.kernel_size,
    geometry.strides,
    geometry.lax_padding,
    geometry.input_dilation,
    geometry.kernel_dilation,
    geometry.dimension_numbers,
  )
  rank = geometry.rank
  positions = tuple(range(1, rank + 1))
  y = lax.dot_general(
    patches,
    kernel,
    (((rank + 1,), (rank,)), (positions, tuple(range(rank)))),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )  # (*out, N, O)
  return _finish(jnp.moveaxis(y, rank, 0), bias, batch_shape)


def _periodic_fold(y: jax.Array, period: Sequence[int], transpose_kernel: bool) -> jax.Array:
  # Flax's CIRCULAR ConvTranspose: pad each spatial dim of the 'VALID' result to
  # a whole number of periods (in * stride), placed so the input starts on a
  # period boundary, then sum the periods (wrap around).
  size_diffs = [-(n - p) % (2 * p) for n, p in zip(y.shape[1:-1], period)]
  if transpose_kernel:
    pads = [(d // 2, (d + 1) // 2) for d in size_diffs]
  else:
    pads = [((d + 1) // 2, d // 2) for d in size_diffs]
  y = jnp.pad(y, [(0, 0), *pads, (0, 0)])
  for axis, p in enumerate(period, start=1):
    y = y.reshape(*y.shape[:axis], -1, p, *y.shape[axis + 1 :]).sum(axis=axis)
  return y


@_compiled("in_features", "transpose_kernel", "precision", "preferred_element_type")
def conv_transpose_layer(
  geometry: LayerGeometry,
  inputs: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  *,
  in_features: int | None = None,
  transpose_kernel: bool = False,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """Flax's ConvTranspose computation, through ``convmm.conv_transpose``.

  Args:
    geometry: from :func:`~convmm._layer_geometry.transpose_layer_geometry`.
    inputs: ``(*batch, *spatial, C)``, already promoted.
    kernel: ``(*kernel_size, C, O)`` (``(*kernel_size, O, C)`` if ``transpose_kernel``).
    bias: ``(O,)`` or ``None``.
    in_features: if given, the inputs' last dimension must equal it.
    transpose_kernel: flip the kernel spatially and swap its feature axes.
    precision, preferred_element_type: passed to ``convmm.conv_transpose``.

  Returns:
    ``(*batch, *out_spatial, O)``.
  """
  x, batch_shape = _flatten_batch(geometry, inputs, in_features)
  in_spatial = x.shape[1:-1]
  padding = geometry.padding
  if padding == "CIRCULAR":
    padding = "VALID"
  elif padding == "SAME_LOWER":
    # What lax.conv_transpose does with it: a stride-1 'SAME_LOWER' conv.
    padding = lax.padtype_to_pads(
      in_spatial, geometry.effective_kernel_size, (1,) * geometry.rank, "SAME_LOWER"
    )
  y = _adjoint.conv_transpose(
    x,
    kernel,
    geometry.strides,
    padding,
    rhs_dilation=geometry.kernel_dilation,
    dimension_numbers=geometry.dimension_numbers,
    transpose_kernel=transpose_kernel,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if geometry.padding == "CIRCULAR":
    period = [n * s for n, s in zip(in_spatial, geometry.strides)]
    y = _periodic_fold(y, period, transpose_kernel)
  return _finish(y, bias, batch_shape)


@_compiled("in_features", "precision", "preferred_element_type")
def conv_adjoint_layer(
  geometry: LayerGeometry,
  inputs: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  *,
  in_features: int | None = None,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """ConvAdjoint's computation: the transpose of the forward Conv, then the bias.

  The forward Conv maps ``x`` to ``conv(pad(x))`` (``pad`` is the identity
  unless the mode is CIRCULAR, REFLECT, REPLICATE or CAUSAL). Its transpose is
  ``pad^T(conv_adjoint(y))``: ``convmm.conv_adjoint`` for the convolution, and
  ``jax.linear_transpose`` of the same ``jnp.pad`` for the padding (for wrap
  padding this folds the halo back onto the opposite edge).

  Args:
    geometry: from :func:`~convmm._layer_geometry.adjoint_layer_geometry`.
    inputs: ``(*batch, *spatial, C)``, already promoted: the forward's output.
    kernel: ``(*kernel_size, O // groups, C)``, the forward's kernel.
    bias: ``(O,)`` or ``None``.
    in_features: if given, the inputs' last dimension must equal it.
    precision: passed to the core.
    preferred_element_type: dtype of the result; the operands are cast to it
      and the adjoint is computed in it (exact when widening, e.g. bf16 -> f32).

  Returns:
    ``(*batch, *adjoint_input_spatial(...), O)``.
  """
  y, batch_shape = _flatten_batch(geometry, inputs, in_features)
  if preferred_element_type is not None:
    y, kernel = y.astype(preferred_element_type), kernel.astype(preferred_element_type)
  out_features = kernel.shape[-2] * geometry.feature_group_count
  x_shape = (y.shape[0], *adjoint_input_spatial(geometry, y.shape[1:-1]), out_features)
  x_bar = _adjoint.conv_adjoint(
    y,
    kernel,
    geometry.padded_shape(x_shape),
    geometry.strides,
    geometry.lax_padding,
    rhs_dilation=geometry.kernel_dilation,
    dimension_numbers=geometry.dimension_numbers,
    feature_group_count=geometry.feature_group_count,
    precision=precision,
  )
  if geometry.pad_width is not None:
    (x_bar,) = jax.linear_transpose(geometry.pad, jax.ShapeDtypeStruct(x_shape, x_bar.dtype))(x_bar)
  return _finish(x_bar, bias, batch_shape)
