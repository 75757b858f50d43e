"""The common part of the NNX conv layers: their fields, parameters and operands.

Like flax.nnx, a layer keeps its constructor arguments as attributes and draws
``kernel`` then ``bias`` (each an ``nnx.Param``) from ``rngs.params()``; before
computing it masks the kernel and promotes ``(inputs, kernel, bias)``. The
public layers are in :mod:`convmm.nnx`. Requires flax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from convmm._layers import geometry as geometry_rules
from convmm._layers import ops as _layer_ops
from convmm._layers.fields import check_layer_method, check_mask

Array = jax.Array


class Layer(nnx.Module):
  """Its constructor arguments (as flax.nnx keeps them), geometry and parameters."""

  in_features: int
  out_features: int
  kernel_size: tuple[int, ...]
  strides: Any
  padding: Any
  input_dilation: Any
  kernel_dilation: Any
  feature_group_count: int
  use_bias: bool
  mask: Array | None
  dtype: Dtype | None
  param_dtype: Dtype
  precision: PrecisionLike
  promote_dtype: Callable[..., Any]
  preferred_element_type: Dtype | None
  method: str | None
  conv_general_dilated: Callable[..., Array]
  input_spatial_shape: tuple[int, ...]
  output_padding: Any
  transpose_kernel: bool
  geometry: geometry_rules.LayerGeometry
  kernel_shape: tuple[int, ...]
  kernel: nnx.Param
  bias: nnx.Param | None

  def _apply(self, op: Callable[..., Array], inputs: Array, **options: Any) -> Array:
    """Masks the kernel, promotes ``(inputs, kernel, bias)`` as flax.nnx does, runs ``op``."""
    check_mask(type(self).__name__, self.mask, self.kernel_shape)
    kernel = self.kernel[...]
    if self.mask is not None:
      kernel *= self.mask
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    return _layer_ops.apply(
      op,
      self.geometry,
      inputs,
      kernel,
      bias,
      in_features=self.in_features,
      precision=self.precision,
      preferred_element_type=self.preferred_element_type,
      **options,
    )

  def _build(
    self,
    geometry: geometry_rules.LayerGeometry,
    kernel_shape: Sequence[int],
    bias_shape: Sequence[int],
    arguments: Mapping[str, Any],
  ) -> None:
    """Keeps the geometry and arguments; draws ``kernel`` then ``bias`` as flax.nnx does."""
    check_mask(geometry.layer, arguments["mask"], kernel_shape)
    check_layer_method(geometry.layer, arguments.get("method"))
    self.geometry = geometry
    for name in Layer.__annotations__:
      if name in arguments:
        setattr(self, name, arguments[name])
    self.kernel_size = geometry.kernel_size
    self.kernel_shape = tuple(kernel_shape)
    rngs, param_dtype = arguments["rngs"], arguments["param_dtype"]
    self.kernel = nnx.Param(
      arguments["kernel_init"](rngs.params(), tuple(kernel_shape), param_dtype),
      **arguments["kernel_metadata"],
    )
    bias_init, bias_metadata = arguments["bias_init"], arguments["bias_metadata"]
    self.bias = (
      nnx.Param(bias_init(rngs.params(), tuple(bias_shape), param_dtype), **bias_metadata)
      if arguments["use_bias"]
      else nnx.data(None)
    )
