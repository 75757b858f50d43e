"""Layer geometry: the validated hyperparameters of the Flax conv layers.

``convmm.linen`` and ``convmm.nnx`` validate their fields here and keep the
resulting :class:`LayerGeometry` (the computation is :mod:`convmm._layers.ops`).
Ints, counts and pairs are read by the core's rules (:mod:`convmm._rules.canonical`),
output sizes come from its one shape rule: layers and functions cannot drift.

Conventions are Flax's: inputs are channels-last ``(*batch, *spatial, C)``; the
kernel is ``(*kernel_size, I, O)``. Padding modes that lax has no name for
('CIRCULAR', 'REFLECT', 'REPLICATE', 'CAUSAL') are applied with ``jnp.pad`` and
the convolution is then 'VALID'.

Every check raises a ``ValueError``/``TypeError`` whose message starts with the
layer's name and names the field in backticks, in Python on static shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convmm._layers.fields import (
  CONV_PADDINGS,
  TRANSPOSE_PADDINGS,
  Padding,
  broadcast_ints,
  kernel_size_of,
  layer_padding,
)
from convmm._rules.canonical import (
  conv_geometry,
  conv_transpose_padding,
  dilate_dim,
  positive_count,
)

# Modes lax has no name for: applied with jnp.pad, then the convolution is 'VALID'.
_JNP_PAD_MODES = {
  "CIRCULAR": "wrap",
  "REFLECT": "reflect",
  "REPLICATE": "edge",
  "CAUSAL": "constant",
}


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
  """The validated, canonical hyperparameters of a convolution layer.

  Attributes:
    layer: the layer's name, for error messages.
    kernel_size: kernel spatial sizes; its length is the spatial rank.
    strides: window strides.
    padding: an upper-case mode string or ``(low, high)`` pairs.
    input_dilation: input (lhs) dilation.
    kernel_dilation: kernel (rhs) dilation.
    feature_group_count: number of feature groups.
    output_padding: extra high-side output size (ConvAdjoint only).
  """

  layer: str
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Padding
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int = 1
  output_padding: tuple[int, ...] = ()

  @property
  def rank(self) -> int:
    return len(self.kernel_size)

  @property
  def dimension_numbers(self) -> lax.ConvDimensionNumbers:
    """Channels-last input/output, ``(*kernel_size, I, O)`` kernel, any rank."""
    ndim = self.rank + 2
    lhs_spec = (0, ndim - 1, *range(1, ndim - 1))
    rhs_spec = (ndim - 1, ndim - 2, *range(ndim - 2))
    return lax.ConvDimensionNumbers(lhs_spec, rhs_spec, lhs_spec)

  @property
  def lax_kwargs(self) -> dict[str, Any]:
    """Dilations, dimension numbers and groups as lax's keyword arguments."""
    return {
      "lhs_dilation": self.input_dilation,
      "rhs_dilation": self.kernel_dilation,
      "dimension_numbers": self.dimension_numbers,
      "feature_group_count": self.feature_group_count,
    }

  @property
  def effective_kernel_size(self) -> tuple[int, ...]:
    return tuple(dilate_dim(k, d) for k, d in zip(self.kernel_size, self.kernel_dilation))

  @property
  def pad_width(self) -> tuple[tuple[int, int], ...] | None:
    """Spatial ``jnp.pad`` widths for CIRCULAR/REFLECT/REPLICATE/CAUSAL, else ``None``.

    CIRCULAR, REFLECT and REPLICATE put ``(k_eff - 1) // 2`` before and
    ``k_eff // 2`` after (Flax's convention for even kernels); CAUSAL puts
    ``k_eff - 1`` before.
    """
    if self.padding in ("CIRCULAR", "REFLECT", "REPLICATE"):
      return tuple(((k - 1) // 2, k // 2) for k in self.effective_kernel_size)
    if self.padding == "CAUSAL":
      return tuple((k - 1, 0) for k in self.effective_kernel_size)
    return None

  @property
  def lax_padding(self) -> Padding:
    """The padding passed to the core after :meth:`pad` has run."""
    return "VALID" if self.pad_width is not None else self.padding

  def pad(self, x: jax.Array) -> jax.Array:
    """Applies the ``jnp.pad`` modes to a flat ``(N, *spatial, C)`` input."""
    if self.pad_width is None:
      return x
    return jnp.pad(x, ((0, 0), *self.pad_width, (0, 0)), mode=_JNP_PAD_MODES[str(self.padding)])

  def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of a flat input after :meth:`pad`."""
    if self.pad_width is None:
      return tuple(shape)
    return (shape[0], *(s + lo + hi for s, (lo, hi) in zip(shape[1:-1], self.pad_width)), shape[-1])

  def out_spatial(self, in_spatial: Sequence[int]) -> tuple[int, ...]:
    """Output spatial sizes of the forward convolution of ``in_spatial``."""
    shape = self.padded_shape((1, *in_spatial, 1))
    return conv_geometry(
      self.layer,
      shape,
      len(shape),
      self.kernel_size,
      self.strides,
      self.lax_padding,
      self.input_dilation,
      self.kernel_dilation,
      self.dimension_numbers,
    ).out_spatial

  def _check_groups(self, in_features: int, out_features: int) -> None:
    g = self.feature_group_count
    if in_features % g or out_features % g:
      raise ValueError(
        f"{self.layer}: `feature_group_count` (={g}) must divide both feature counts, got "
        f"{in_features} input and {out_features} output features"
      )

  def kernel_shape(self, in_features: int, out_features: int) -> tuple[int, ...]:
    """Conv kernel ``(*kernel_size, in_features // groups, out_features)``.

    Raises:
      ValueError: if ``feature_group_count`` does not divide both feature counts.
    """
    self._check_groups(in_features, out_features)
    return (*self.kernel_size, in_features // self.feature_group_count, out_features)

  def adjoint_kernel_shape(self, in_features: int, out_features: int) -> tuple[int, ...]:
    """ConvAdjoint kernel: the forward Conv's, ``(*kernel_size, out // groups, in)``.

    Raises:
      ValueError: if ``feature_group_count`` does not divide both feature counts.
    """
    self._check_groups(in_features, out_features)
    return (*self.kernel_size, out_features // self.feature_group_count, in_features)


def conv_layer_geometry(
  layer: str,
  kernel_size: Any,
  strides: Any = 1,
  padding: Any = "SAME",
  input_dilation: Any = 1,
  kernel_dilation: Any = 1,
  feature_group_count: Any = 1,
  *,
  modes: Sequence[str] = CONV_PADDINGS,
  transposed: bool = False,
) -> LayerGeometry:
  """Validates the fields of a Conv/ConvLocal/ConvTranspose layer.

  ``kernel_size`` is an int (1-D) or a sequence of ints; ``strides`` and the
  dilations ``None`` (1), an int, or one int per spatial dimension; ``padding``
  as for :func:`layer_padding`, one of ``modes``. ``transposed``: the strides
  dilate the input (ConvTranspose). Errors (``ValueError``, ``TypeError``) name
  the offending field and its value.
  """
  kernel_size = kernel_size_of(layer, kernel_size)
  rank = len(kernel_size)
  geometry = LayerGeometry(
    layer=layer,
    kernel_size=kernel_size,
    strides=broadcast_ints(layer, "strides", strides, rank, dilation=transposed),
    padding=layer_padding(layer, padding, rank, modes),
    input_dilation=broadcast_ints(layer, "input_dilation", input_dilation, rank, dilation=True),
    kernel_dilation=broadcast_ints(layer, "kernel_dilation", kernel_dilation, rank, dilation=True),
    feature_group_count=positive_count(layer, "feature_group_count", feature_group_count),
  )
  if geometry.padding == "CAUSAL" and rank != 1:
    raise ValueError(
      f"{layer}: `padding`='CAUSAL' is only defined for one spatial dimension, got "
      f"kernel_size={kernel_size} ({rank} dimensions)"
    )
  if isinstance(geometry.padding, str) and any(d != 1 for d in geometry.input_dilation):
    raise ValueError(
      f"{layer}: `padding`={geometry.padding!r} cannot be combined with `input_dilation`"
      f"={geometry.input_dilation}; give explicit (low, high) pairs"
    )
  return geometry


def transpose_layer_geometry(
  layer: str,
  kernel_size: Any,
  strides: Any,
  padding: Any,
  kernel_dilation: Any,
) -> LayerGeometry:
  """Validates the fields of a ConvTranspose layer (Flax's meaning of padding).

  Raises:
    ValueError, TypeError: naming the offending field and its value.
  """
  geometry = conv_layer_geometry(
    layer,
    kernel_size,
    strides,
    padding,
    1,
    kernel_dilation,
    modes=TRANSPOSE_PADDINGS,
    transposed=True,
  )
  if geometry.padding == "SAME_LOWER" and any(s != 1 for s in geometry.strides):
    # lax.conv_transpose passes 'SAME_LOWER' to the dilated conv, which only
    # accepts a padding string without input dilation, i.e. stride 1.
    raise ValueError(
      f"{layer}: `padding`='SAME_LOWER' requires `strides` of 1 (as in lax.conv_transpose), "
      f"got strides={geometry.strides}"
    )
  return geometry


def adjoint_layer_geometry(
  layer: str,
  kernel_size: Any,
  strides: Any,
  padding: Any,
  kernel_dilation: Any,
  feature_group_count: Any,
  output_padding: Any,
) -> LayerGeometry:
  """Validates the fields of a ConvAdjoint layer.

  ``padding`` means the forward Conv's padding (any mode Conv accepts), and
  ``output_padding`` the extra size on the high side of each output dim, which
  must be smaller than the stride and is only defined where the output size is
  ambiguous ('VALID' and explicit padding).

  Raises:
    ValueError, TypeError: naming the offending field and its value.
  """
  geometry = conv_layer_geometry(
    layer, kernel_size, strides, padding, 1, kernel_dilation, feature_group_count
  )
  output_padding = broadcast_ints(
    layer, "output_padding", output_padding, geometry.rank, default=0, minimum=0
  )
  if any(p >= s for p, s in zip(output_padding, geometry.strides)):
    raise ValueError(
      f"{layer}: `output_padding` (={output_padding}) must be < `strides` "
      f"(={geometry.strides}) in every dimension"
    )
  if isinstance(geometry.padding, str) and geometry.padding != "VALID" and any(output_padding):
    raise ValueError(
      f"{layer}: `output_padding` (={output_padding}) must be 0 with `padding`="
      f"{geometry.padding!r}, whose output size is fixed to input size * strides"
    )
  return dataclasses.replace(geometry, output_padding=output_padding)


def local_shapes(
  geometry: LayerGeometry,
  in_spatial: Sequence[int],
  in_features: int,
  out_features: int,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Kernel and bias shapes of a locally connected layer (lax's local conv).

  One ``(prod(kernel_size) * in_features, out_features)`` matrix and one bias
  vector per output position.

  Raises:
    ValueError: if ``feature_group_count`` is not 1 or ``in_spatial`` does not
      match the rank of ``kernel_size``.
  """
  layer = geometry.layer
  if geometry.feature_group_count != 1:
    raise ValueError(
      f"{layer}: `feature_group_count` must be 1 for a locally connected layer (as in "
      f"lax.conv_general_dilated_local), got {geometry.feature_group_count}"
    )
  in_spatial = tuple(in_spatial)
  if len(in_spatial) != geometry.rank:
    raise ValueError(
      f"{layer}: the input spatial shape {in_spatial} must have one size per "
      f"`kernel_size` dimension, kernel_size={geometry.kernel_size}"
    )
  out_spatial = geometry.out_spatial(in_spatial)
  patch_size = math.prod(geometry.kernel_size) * in_features
  return (*out_spatial, patch_size, out_features), (*out_spatial, out_features)


def in_features_of(
  geometry: LayerGeometry,
  inputs: Any,
  in_features: int | None = None,
) -> int:
  """The input feature size, after checking the rank (and ``in_features``).

  Raises:
    ValueError: if ``inputs`` has fewer than ``rank + 1`` dimensions or, when
      ``in_features`` is given, a different last dimension.
  """
  shape = tuple(np.shape(inputs))
  layer, rank = geometry.layer, geometry.rank
  if len(shape) < rank + 1:
    raise ValueError(
      f"{layer}: inputs must be (*batch, *spatial, features) with {rank} spatial "
      f"dimensions (the length of `kernel_size`={geometry.kernel_size}), got "
      f"inputs.shape={shape}"
    )
  if in_features is not None and shape[-1] != in_features:
    raise ValueError(
      f"{layer}: the last dimension of the inputs must be `in_features` (={in_features}), "
      f"got inputs.shape={shape}"
    )
  return shape[-1]


def adjoint_input_spatial(geometry: LayerGeometry, out_spatial: Sequence[int]) -> tuple[int, ...]:
  """The forward input size whose convolution has ``out_spatial`` (ConvAdjoint's output).

  'SAME'-like modes (SAME, SAME_LOWER, CIRCULAR, REFLECT, REPLICATE, CAUSAL):
  ``n * s``. 'VALID' and pairs: the core's shape rule applied to lax's
  transposed convolution (the stride-1 conv over the ``s``-dilated input,
  padded by :func:`~convmm._rules.canonical.conv_transpose_padding`, plus
  ``output_padding`` high), i.e. ``(n - 1) * s + k_eff - lo - hi + output_padding``.

  Raises:
    ValueError: if the size would be negative.
  """
  rank, s = geometry.rank, geometry.strides
  if isinstance(geometry.padding, str) and geometry.padding != "VALID":
    return tuple(n * st for n, st in zip(out_spatial, s))
  pads = ((0, 0),) * rank if geometry.padding == "VALID" else geometry.padding
  transposed = tuple(
    (lo, hi + extra)
    for (lo, hi), extra in zip(
      map(conv_transpose_padding, geometry.effective_kernel_size, s, pads),
      geometry.output_padding or (0,) * rank,
    )
  )
  too_large = (
    f"{geometry.layer}: `padding` (={geometry.padding}) is too large for inputs "
    f"of spatial shape {tuple(out_spatial)}"
  )
  try:
    g = conv_geometry(
      geometry.layer,
      (1, 1, *out_spatial),
      rank + 2,
      geometry.kernel_size,
      (1,) * rank,
      transposed,
      s,
      geometry.kernel_dilation,
      None,
    )
  except ValueError as e:
    raise ValueError(f"{too_large}: {e}") from e
  if any(p < k - 1 for p, k in zip(g.padded_spatial, g.effective_filter_shape)):
    raise ValueError(
      f"{too_large}: the transposed conv's padded input {g.padded_spatial} "
      f"is shorter than the kernel {g.effective_filter_shape} less one"
    )
  return g.out_spatial
