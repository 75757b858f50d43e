"""Layer ops: the computation of the Flax conv layers on a validated geometry.

:func:`apply` takes the :class:`~convmm._layers.geometry.LayerGeometry` a layer
built once and its promoted operands, flattens the leading batch dimensions,
runs one op (:func:`conv_layer`, :func:`conv_local_layer`,
:func:`conv_transpose_layer` or :func:`conv_adjoint_layer`: ``jnp.pad`` the
modes lax has no name for, call the convmm core) and adds the bias, as one
compiled computation per layer call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm import _adjoint, _conv, _local
from convmm._engine.settings import unkeyed_values
from convmm._layers.fields import check_layer_method
from convmm._layers.geometry import LayerGeometry, adjoint_input_spatial, in_features_of

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Options:
  """A layer's computation options (static: part of the compiled call's key).

  Attributes:
    precision: passed to the core.
    preferred_element_type: passed to the core (ConvAdjoint: the dtype in
      which the adjoint is computed and returned).
    method: passed to the core; None follows :func:`convmm.default_method`.
    conv_general_dilated: Conv's convolution (default ``convmm.conv_general_dilated``).
    out_sharding: Conv's output sharding, passed to the convolution when set.
    transpose_kernel: ConvTranspose's kernel flip and feature swap.
  """

  precision: Any = None
  preferred_element_type: Any = None
  method: str | None = None
  conv_general_dilated: Callable[..., jax.Array] | None = None
  out_sharding: Any = None
  transpose_kernel: bool = False


def apply(
  op: Callable[[LayerGeometry, jax.Array, jax.Array, Options], jax.Array],
  geometry: LayerGeometry,
  inputs: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  *,
  in_features: int | None = None,
  input_spatial_shape: Sequence[int] | None = None,
  **options: Any,
) -> jax.Array:
  """A layer's computation: flatten the batch, ``op``, add the bias.

  One compiled computation per layer call. The im2col core is dozens of small
  ops (a slice per kernel tap, their transposes in the adjoint), which eager
  use would compile and dispatch one by one; under an outer jit this inner jit
  is simply inlined.

  Args:
    op: one of this module's ops, ``op(geometry, x, kernel, options)`` on
      flat inputs ``x`` of shape ``(N, *spatial, C)``.
    geometry: the layer's validated geometry.
    inputs: ``(*batch, *spatial, C)``, already promoted.
    kernel: the layer's kernel, masked and promoted.
    bias: broadcast against the output's trailing dimensions, or ``None``.
    in_features: if given, the inputs' last dimension must equal it.
    input_spatial_shape: if given, the inputs' spatial shape must equal it.
    **options: the fields of :class:`Options`.

  Returns:
    ``(*batch, *out_spatial, O)``.
  """
  shape = tuple(inputs.shape)
  in_features_of(geometry, inputs, in_features)
  if input_spatial_shape is not None and shape[-geometry.rank - 1 : -1] != tuple(
    input_spatial_shape
  ):
    raise ValueError(
      f"{geometry.layer}: the inputs' spatial shape must be `input_spatial_shape` "
      f"(={tuple(input_spatial_shape)}), the one the kernel was built for, got "
      f"inputs.shape={shape}"
    )
  checked = Options(**options)
  check_layer_method(geometry.layer, checked.method)
  # Settings jax does not key on (older jax) are keyed here, since they are read while tracing.
  settings = unkeyed_values()
  return _compiled(op, geometry, checked, settings, inputs, kernel, bias)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _compiled(op, geometry, options, settings_key, inputs, kernel, bias) -> jax.Array:
  del settings_key
  batch_shape = inputs.shape[: inputs.ndim - geometry.rank - 1]
  x = inputs.reshape(math.prod(batch_shape), *inputs.shape[len(batch_shape) :])
  y = op(geometry, x, kernel, options)
  if bias is not None:
    y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return y.reshape(*batch_shape, *y.shape[1:])


def conv_layer(geometry: LayerGeometry, x: Array, kernel: Array, o: Options) -> Array:
  """The Conv layer: pad, then ``o.conv_general_dilated`` (default convmm's).

  ``kernel`` is ``(*kernel_size, C // groups, O)``.
  """
  conv_fn = o.conv_general_dilated or _conv.conv_general_dilated
  # Like flax.nnx, pass preferred_element_type (and the other extras) only when
  # set, so that user-supplied convolution functions without them keep working.
  extra = {
    name: value
    for name, value in [
      ("preferred_element_type", o.preferred_element_type),
      ("out_sharding", o.out_sharding),
      ("method", o.method),
    ]
    if value is not None
  }
  return conv_fn(
    geometry.pad(x),
    kernel,
    geometry.strides,
    geometry.lax_padding,
    **geometry.lax_kwargs,
    precision=o.precision,
    **extra,
  )


def conv_local_layer(geometry: LayerGeometry, x: Array, kernel: Array, o: Options) -> Array:
  """The locally connected layer: ``convmm.conv_general_dilated_local`` of the padded input.

  ``kernel`` is ``(*out_spatial, prod(kernel_size) * C, O)``: the patch of each
  output position times that position's own ``(K, O)`` matrix, as
  ``lax.conv_general_dilated_local`` computes it.
  """
  window = (geometry.kernel_size, geometry.input_dilation, geometry.kernel_dilation)
  return _local.conv_general_dilated_local(
    geometry.pad(x),
    kernel,
    geometry.strides,
    geometry.lax_padding,
    *window,
    geometry.dimension_numbers,
    o.precision,
    preferred_element_type=o.preferred_element_type,
  )


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


def conv_transpose_layer(geometry: LayerGeometry, x: Array, kernel: Array, o: Options) -> Array:
  """Flax's ConvTranspose computation, through ``convmm.conv_transpose``.

  ``kernel`` is ``(*kernel_size, C, O)`` (``(*kernel_size, O, C)`` if
  ``o.transpose_kernel``: flipped spatially, feature axes swapped).
  """
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
    transpose_kernel=o.transpose_kernel,
    precision=o.precision,
    preferred_element_type=o.preferred_element_type,
    method=o.method,
  )
  if geometry.padding == "CIRCULAR":
    period = [n * s for n, s in zip(in_spatial, geometry.strides)]
    y = _periodic_fold(y, period, o.transpose_kernel)
  return y


def conv_adjoint_layer(geometry: LayerGeometry, y: Array, kernel: Array, o: Options) -> Array:
  """ConvAdjoint's computation: the transpose of the forward Conv.

  The forward Conv maps ``x`` to ``conv(pad(x))`` (``pad`` is the identity
  unless the mode is CIRCULAR, REFLECT, REPLICATE or CAUSAL). Its transpose is
  ``pad^T(conv_adjoint(y))``: ``convmm.conv_adjoint`` for the convolution, and
  ``jax.linear_transpose`` of the same ``jnp.pad`` for the padding (for wrap
  padding this folds the halo back onto the opposite edge). ``kernel`` is the
  forward's, ``(*kernel_size, O // groups, C)``; with
  ``o.preferred_element_type`` the operands are cast to it and the adjoint is
  computed in it (exact when widening, e.g. bf16 -> f32).
  """
  if o.preferred_element_type is not None:
    y, kernel = y.astype(o.preferred_element_type), kernel.astype(o.preferred_element_type)
  out_features = kernel.shape[-2] * geometry.feature_group_count
  x_shape = (y.shape[0], *adjoint_input_spatial(geometry, y.shape[1:-1]), out_features)
  x_bar = _adjoint.conv_adjoint(
    y,
    kernel,
    geometry.padded_shape(x_shape),
    geometry.strides,
    geometry.lax_padding,
    **geometry.lax_kwargs,
    precision=o.precision,
    method=o.method,
  )
  if geometry.pad_width is not None:
    (x_bar,) = jax.linear_transpose(geometry.pad, jax.ShapeDtypeStruct(x_shape, x_bar.dtype))(x_bar)
  return x_bar
