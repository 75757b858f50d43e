"""Flax linen layers computed by convmm: drop-ins for ``flax.linen`` convolutions.

``Conv``, ``ConvTranspose`` and ``ConvLocal`` have every field of the
``flax.linen`` layer of the same name, with the same defaults and meanings, and
create the same parameters ('kernel', 'bias': same shapes, dtypes, initialisers
and values for the same key), so a model swaps ``nn.Conv`` for
``convmm.linen.Conv`` without other changes and existing checkpoints load.
``ConvAdjoint`` is the transposed convolution defined as the exact adjoint of
the ``Conv`` with the same hyperparameters (PyTorch's ``ConvTranspose``).

The layers hold parameters only; padding, shapes and checks live in
``convmm._layers.geometry`` (shared with :mod:`convmm.nnx`), the computation in
``convmm._layers.ops`` and the convmm core (im2col + GEMM). Importing this
module requires flax.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from convmm import linen as cnn
  >>> layer = cnn.Conv(features=4, kernel_size=(3, 3), strides=2, padding='CIRCULAR')
  >>> y, variables = layer.init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  >>> y.shape, variables['params']['kernel'].shape
  ((1, 4, 4, 4), (3, 3, 3, 4))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from convmm._layers import geometry as geometry_rules
from convmm._layers import ops as _layer_ops
from convmm._layers.extras import missing_extra
from convmm._layers.fields import check_mask

try:
  from flax import linen as nn
  from flax.linen.dtypes import promote_dtype as default_promote_dtype
  from flax.typing import Array, Dtype, Initializer, PaddingLike, PrecisionLike
except ModuleNotFoundError as error:
  raise missing_extra("convmm.linen", "flax", error) from error

default_kernel_init = nn.initializers.lecun_normal()
default_bias_init = nn.initializers.zeros_init()


def _apply(
  module: Any,
  op: Callable[..., jax.Array],
  geometry: geometry_rules.LayerGeometry,
  kernel_shape: Sequence[int],
  bias_shape: Sequence[int],
  inputs: jax.Array,
  **options: Any,
) -> jax.Array:
  """Creates 'kernel' and 'bias' as Flax does, masks the kernel, promotes dtypes, runs ``op``."""
  check_mask(type(module).__name__, module.mask, kernel_shape)
  kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
  if module.mask is not None:
    kernel *= module.mask
  bias = (
    module.param("bias", module.bias_init, bias_shape, module.param_dtype)
    if module.use_bias
    else None
  )
  inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  return _layer_ops.apply(
    op,
    geometry,
    inputs,
    kernel,
    bias,
    precision=module.precision,
    preferred_element_type=module.preferred_element_type,
    **options,
  )


class _ParamFields(nn.Module):
  """The parameter fields every Flax conv layer has, in Flax's order.

  A layer lists it first among its bases, so that its fields follow the layer's
  leading ones (dataclass fields are gathered from the last base to the first).
  """

  use_bias: bool = True
  mask: Array | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init


class _Head(nn.Module):
  """The leading fields of every Flax conv layer."""

  features: int
  kernel_size: int | Sequence[int]
  strides: None | int | Sequence[int] = 1
  padding: PaddingLike = "SAME"


class _ConvHead(_Head):
  input_dilation: None | int | Sequence[int] = 1
  kernel_dilation: None | int | Sequence[int] = 1
  feature_group_count: int = 1


class _ConvFields(_ParamFields, _ConvHead):
  """The fields of ``flax.linen.Conv``/``ConvLocal``, in Flax's order."""

  promote_dtype: Any = default_promote_dtype
  # Deprecated in Flax; kept so that every Flax field is accepted.
  conv_general_dilated: Any = None
  conv_general_dilated_cls: Any = None
  # Beyond flax.linen.Conv (which has no such field; flax.nnx.Conv has).
  preferred_element_type: Dtype | None = None

  def _geometry(self) -> geometry_rules.LayerGeometry:
    return geometry_rules.conv_layer_geometry(
      type(self).__name__,
      self.kernel_size,
      self.strides,
      self.padding,
      self.input_dilation,
      self.kernel_dilation,
      self.feature_group_count,
    )


class Conv(_ConvFields):
  """Convolution layer computed as im2col + GEMM; a drop-in for ``flax.linen.Conv``.

  Same fields, defaults, parameters and results as ``flax.linen.Conv``.
  ``conv_general_dilated`` (or the deprecated ``conv_general_dilated_cls``)
  defaults to ``convmm.conv_general_dilated``. Two fields beyond Flax:
  ``preferred_element_type`` (as in ``flax.nnx.Conv``) and ``method``.

  Attributes:
    features: number of output features (filters).
    kernel_size: kernel spatial shape; an int means a 1-D kernel.
    strides: an int or ``n`` ints (default 1).
    padding: 'SAME', 'SAME_LOWER', 'VALID', 'CIRCULAR' (periodic), 'REFLECT',
      'REPLICATE' (edge values, PyTorch's ``padding_mode='replicate'``),
      'CAUSAL' (1-D: left padding, same-size output), an int, or ``n`` ints or
      ``(low, high)`` pairs.
    input_dilation: an int or ``n`` ints (default 1).
    kernel_dilation: an int or ``n`` ints (default 1; atrous convolution).
    feature_group_count: number of feature groups (default 1).
    use_bias: whether to add a bias (default True).
    mask: optional array of the kernel's shape multiplied into the kernel.
    dtype: computation dtype (default: promoted from inputs and params).
    param_dtype: parameter dtype (default float32).
    precision: ``jax.lax.Precision`` of the GEMM.
    kernel_init: kernel initialiser (default lecun_normal).
    bias_init: bias initialiser (default zeros).
    promote_dtype: ``f(inputs, kernel, bias, dtype=...)`` casting the operands.
    conv_general_dilated: the convolution (default ``convmm.conv_general_dilated``).
    conv_general_dilated_cls: deprecated: a class whose instance is the convolution.
    preferred_element_type: accumulation/output dtype of the GEMM.
    method: who computes each direction (a ``method`` of
      :func:`convmm.conv_general_dilated`); None follows :func:`convmm.default_method`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from convmm import linen as cnn
    >>> layer = cnn.Conv(features=4, kernel_size=(3,), padding='VALID')
    >>> y, variables = layer.init_with_output(jax.random.key(0), jnp.ones((1, 8, 3)))
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'bias': (4,), 'kernel': (3, 3, 4)}}
    >>> y.shape
    (1, 6, 4)

    XLA's convolution, or im2col + GEMM with no XLA convolution in the program:

    >>> conv, x = cnn.Conv(features=8, kernel_size=(3, 3), method='xla'), jnp.ones((1, 8, 8, 3))
    >>> variables = conv.init(jax.random.key(0), x)
    >>> hlo = lambda layer: jax.jit(layer.apply).lower(variables, x).as_text()
    >>> 'convolution' in hlo(conv), 'convolution' in hlo(conv.clone(method='im2col'))
    (True, False)
  """

  method: str | None = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """``(*batch, *spatial, C)`` -> ``(*batch, *out_spatial, features)``."""
    geometry = self._geometry()
    kernel_shape = geometry.kernel_shape(
      geometry_rules.in_features_of(geometry, inputs), self.features
    )
    conv_fn = self.conv_general_dilated
    if self.conv_general_dilated_cls is not None:
      conv_fn = self.conv_general_dilated_cls()
    return _apply(
      self,
      _layer_ops.conv_layer,
      geometry,
      kernel_shape,
      (self.features,),
      inputs,
      conv_general_dilated=conv_fn,
      method=self.method,
    )


class ConvLocal(_ConvFields):
  """Locally connected layer (unshared weights); a drop-in for ``flax.linen.ConvLocal``.

  Computed as ``convmm.im2col`` followed by one GEMM batched over the output
  positions (there is no XLA alternative, hence no ``method``), with the
  parameters and results of ``flax.linen.ConvLocal``: kernel ``(*out_spatial,
  prod(kernel_size) * C, features)`` (patch features channel-major, as in
  ``lax.conv_general_dilated_patches``), bias ``(*out_spatial, features)``.
  ``feature_group_count`` must be 1. ``conv_general_dilated(_cls)`` are
  accepted for field compatibility and unused (output shapes come from
  convmm's shape rule).

  Attributes:
    features, kernel_size, strides, padding, input_dilation, kernel_dilation,
      feature_group_count, use_bias, mask, dtype, param_dtype, precision,
      kernel_init, bias_init, promote_dtype, conv_general_dilated,
      conv_general_dilated_cls, preferred_element_type: as for :class:`Conv`.

  Example:
    One ``(3 * 3 * 3, 2)`` matrix per output position of a 5x5 RGB image:

    >>> import jax, jax.numpy as jnp
    >>> from convmm import linen as cnn
    >>> layer = cnn.ConvLocal(features=2, kernel_size=(3, 3), padding='VALID')
    >>> x = jnp.ones((1, 5, 5, 3))
    >>> params = layer.init(jax.random.key(0), x)['params']
    >>> params['kernel'].shape, params['bias'].shape, layer.apply({'params': params}, x).shape
    ((3, 3, 27, 2), (3, 3, 2), (1, 3, 3, 2))
  """

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """``(*batch, *spatial, C)`` -> ``(*batch, *out_spatial, features)``, unshared weights."""
    geometry = self._geometry()
    in_features = geometry_rules.in_features_of(geometry, inputs)
    kernel_shape, bias_shape = geometry_rules.local_shapes(
      geometry, jnp.shape(inputs)[-geometry.rank - 1 : -1], in_features, self.features
    )
    return _apply(self, _layer_ops.conv_local_layer, geometry, kernel_shape, bias_shape, inputs)


class _TransposeHead(_Head):
  """The leading fields of ``flax.linen.ConvTranspose`` and :class:`ConvAdjoint`."""

  kernel_dilation: None | int | Sequence[int] = 1


class _AdjointHead(_TransposeHead):
  feature_group_count: int = 1
  output_padding: int | Sequence[int] = 0


class ConvTranspose(_ParamFields, _TransposeHead):
  """Transposed convolution; a drop-in for ``flax.linen.ConvTranspose``.

  Same fields, defaults, parameters and results as ``flax.linen.ConvTranspose``
  (``lax.conv_transpose``'s meaning of padding, ``transpose_kernel``, Flax's
  periodic fold for 'CIRCULAR'), computed by ``convmm.conv_transpose``. For the
  adjoint of a given Conv, with groups and PyTorch-style padding, see
  :class:`ConvAdjoint`.

  Attributes:
    features: number of output features.
    kernel_size: kernel spatial shape; an int means a 1-D kernel.
    strides: ``None`` (1), an int or ``n`` ints: the input dilation.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'SAME_LOWER' (stride 1 only), an
      int, or ``n`` ints or ``(low, high)`` pairs (the padding of the dilated
      input, as in ``lax.conv_transpose``).
    kernel_dilation: ``None`` (1), an int or ``n`` ints.
    use_bias, mask, dtype, param_dtype, precision, kernel_init, bias_init: as
      for :class:`Conv`.
    transpose_kernel: flip the kernel spatially and swap its feature axes; the
      kernel is then ``(*kernel_size, features, C)``.
    promote_dtype: ``f(inputs, kernel, bias, dtype=...)`` casting the operands.
    preferred_element_type: accumulation/output dtype of the GEMM.
    method: as for :class:`Conv` (beyond Flax).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from convmm import linen as cnn
    >>> layer = cnn.ConvTranspose(features=4, kernel_size=(6, 6), strides=(2, 2),
    ...                           padding='CIRCULAR', transpose_kernel=True)
    >>> y, variables = layer.init_with_output(jax.random.key(0), jnp.ones((1, 15, 15, 3)))
    >>> y.shape, variables['params']['kernel'].shape
    ((1, 30, 30, 4), (6, 6, 4, 3))
  """

  strides: None | int | Sequence[int] = None
  kernel_dilation: None | int | Sequence[int] = None
  transpose_kernel: bool = False
  promote_dtype: Any = default_promote_dtype
  preferred_element_type: Dtype | None = None
  method: str | None = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """``(*batch, *spatial, C)`` -> ``(*batch, *out_spatial, features)``, transposed."""
    geometry = geometry_rules.transpose_layer_geometry(
      "ConvTranspose", self.kernel_size, self.strides, self.padding, self.kernel_dilation
    )
    in_features = geometry_rules.in_features_of(geometry, inputs)
    features = (
      (self.features, in_features) if self.transpose_kernel else (in_features, self.features)
    )
    kernel_shape = geometry.kernel_shape(*features)
    return _apply(
      self,
      _layer_ops.conv_transpose_layer,
      geometry,
      kernel_shape,
      (self.features,),
      inputs,
      transpose_kernel=self.transpose_kernel,
      method=self.method,
    )


class ConvAdjoint(_ParamFields, _AdjointHead):
  """The transposed convolution as the exact adjoint of a Conv (PyTorch's ConvTranspose).

  For inputs ``y`` shaped like the output of ``Conv(features=C, ...)`` with the
  same ``kernel_size``, ``strides``, ``padding``, ``kernel_dilation`` and
  ``feature_group_count``, returns ``A^T y`` where ``A`` is that Conv's linear
  map, computed by ``convmm.conv_adjoint`` (and, for the ``jnp.pad`` modes,
  the transpose of the same ``jnp.pad``). The kernel is exactly that Conv's
  kernel, ``(*kernel_size, features // feature_group_count, C)``, so weights
  can be tied. With ``padding=p`` (an int) and ``output_padding`` it equals
  ``torch.nn.ConvTranspose2d(C, features, kernel_size, stride, p,
  output_padding, groups, dilation=kernel_dilation)`` with the kernel
  ``torch_weight.permute(2, 3, 1, 0)``.

  Output spatial size, with ``k_eff = (k - 1) * kernel_dilation + 1``:
  SAME, SAME_LOWER, CIRCULAR, REFLECT, REPLICATE, CAUSAL: ``n * stride``; VALID:
  ``(n - 1) * stride + k_eff + output_padding``; ``(lo, hi)``:
  ``(n - 1) * stride + k_eff - lo - hi + output_padding``.

  Attributes:
    features: number of output features (the forward Conv's input features).
    kernel_size: kernel spatial shape; an int means a 1-D kernel.
    strides: an int or ``n`` ints (default 1): the forward Conv's strides.
    padding: the forward Conv's padding: any value :class:`Conv` accepts.
    kernel_dilation: an int or ``n`` ints (default 1).
    feature_group_count: number of feature groups (default 1).
    output_padding: an int or ``n`` ints (default 0), each ``< strides``,
      added on the high side (VALID or explicit padding only).
    use_bias, mask, dtype, param_dtype, precision, kernel_init, bias_init: as
      for :class:`Conv`.
    preferred_element_type: dtype in which the adjoint is computed and returned.
    promote_dtype: ``f(inputs, kernel, bias, dtype=...)`` casting the operands.
    method: as for :class:`Conv`.

  Example:
    A U-Net up-sampling step (PyTorch's ``ConvTranspose2d(32, 16, 3, stride=2,
    padding=1, output_padding=1)``):

    >>> import jax, jax.numpy as jnp
    >>> from convmm import linen as cnn
    >>> up = cnn.ConvAdjoint(features=16, kernel_size=(3, 3), strides=2, padding=1,
    ...                      output_padding=1)
    >>> y, variables = up.init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 32)))
    >>> y.shape, variables['params']['kernel'].shape
    ((1, 16, 16, 16), (3, 3, 16, 32))

    A tied-weight autoencoder: the decoder's kernel is the encoder's, so one
    parameter tree serves both.

    >>> enc = cnn.Conv(features=8, kernel_size=(3, 3), strides=2, use_bias=False)
    >>> dec = cnn.ConvAdjoint(features=3, kernel_size=(3, 3), strides=2, use_bias=False)
    >>> x = jnp.ones((2, 16, 16, 3))
    >>> params = enc.init(jax.random.key(0), x)
    >>> z = jax.nn.relu(enc.apply(params, x))
    >>> z.shape, dec.apply(params, z).shape
    ((2, 8, 8, 8), (2, 16, 16, 3))
  """

  preferred_element_type: Dtype | None = None
  promote_dtype: Any = default_promote_dtype
  method: str | None = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """The forward Conv's output ``(*batch, *spatial, C)`` -> its input's shape."""
    fields = (self.kernel_size, self.strides, self.padding, self.kernel_dilation)
    geometry = geometry_rules.adjoint_layer_geometry(
      "ConvAdjoint", *fields, self.feature_group_count, self.output_padding
    )
    kernel_shape = geometry.adjoint_kernel_shape(
      geometry_rules.in_features_of(geometry, inputs), self.features
    )
    op = _layer_ops.conv_adjoint_layer
    return _apply(self, op, geometry, kernel_shape, (self.features,), inputs, method=self.method)
