"""Flax NNX layers computed by convmm: drop-ins for ``flax.nnx`` convolutions.

``Conv`` and ``ConvTranspose`` take the constructor arguments of
``flax.nnx.Conv`` / ``flax.nnx.ConvTranspose`` with the same defaults, and
draw the same parameters from the same ``nnx.Rngs`` ('kernel' then 'bias',
each an ``nnx.Param``). ``ConvLocal`` (Flax has none for NNX) and
``ConvAdjoint`` mirror :mod:`convmm.linen` in NNX style.

Like Equinox's, each layer validates its arguments once in ``__init__`` and
keeps the canonical geometry; ``__call__`` only computes. Requires flax.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import convmm.nnx
  >>> layer = convmm.nnx.Conv(3, 4, kernel_size=(3, 3), strides=2, padding='CIRCULAR',
  ...                         rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((1, 8, 8, 3))).shape, layer.kernel.shape
  ((1, 4, 4, 4), (3, 3, 3, 4))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from convmm._conv import conv_general_dilated as default_conv_general_dilated
from convmm._layers import geometry as geometry_rules
from convmm._layers import ops as _layer_ops
from convmm._layers.extras import missing_extra

try:
  from flax import nnx
  from flax.nnx.nn.dtypes import promote_dtype as default_promote_dtype
  from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

  from convmm._layers.nnx_layer import Layer as _Layer
except ModuleNotFoundError as error:
  raise missing_extra("convmm.nnx", "flax", error) from error

Array = jax.Array
default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class Conv(_Layer):
  """Convolution computed as im2col + GEMM; a drop-in for ``flax.nnx.Conv``.

  Same constructor arguments, defaults, parameters and results as
  ``flax.nnx.Conv``, except that ``conv_general_dilated`` defaults to
  ``convmm.conv_general_dilated``; one argument beyond Flax, ``method``.

  Args:
    in_features: number of input features.
    out_features: number of output features (filters).
    kernel_size: kernel spatial shape; an int means a 1-D kernel.
    strides, padding, input_dilation, kernel_dilation, feature_group_count,
      use_bias, mask, dtype, param_dtype, precision, kernel_init, bias_init,
      conv_general_dilated, preferred_element_type: as the fields of
      :class:`convmm.linen.Conv` (padding: 'SAME', 'SAME_LOWER', 'VALID',
      'CIRCULAR', 'REFLECT', 'REPLICATE', 'CAUSAL', ints or pairs).
    promote_dtype: ``f((inputs, kernel, bias), dtype=...)`` casting the operands.
    rngs: the ``nnx.Rngs`` drawing the parameters.
    kernel_metadata: metadata of the kernel ``nnx.Param``.
    bias_metadata: metadata of the bias ``nnx.Param``.
    method: who computes each direction (a ``method`` of
      :func:`convmm.conv_general_dilated`); None follows
      :func:`convmm.default_method`. A static attribute, not part of the state.

  Raises:
    ValueError, TypeError: on invalid arguments, naming the argument.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import convmm.nnx
    >>> layer = convmm.nnx.Conv(3, 4, kernel_size=(3,), padding='VALID', rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.bias.shape
    ((3, 3, 4), (4,))
    >>> layer(jnp.ones((1, 8, 3))).shape
    (1, 6, 4)

    XLA's convolution, or im2col + GEMM with no XLA convolution in the program:

    >>> x = jnp.ones((1, 8, 8, 3))
    >>> def hlo(method):
    ...   layer = convmm.nnx.Conv(3, 8, kernel_size=(3, 3), method=method, rngs=nnx.Rngs(0))
    ...   return nnx.jit(lambda layer, x: layer(x)).lower(layer, x).as_text()
    >>> 'convolution' in hlo('xla'), 'convolution' in hlo('im2col')
    (True, False)
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: None | int | Sequence[int] = 1,
    *,
    padding: PaddingLike = "SAME",
    input_dilation: None | int | Sequence[int] = 1,
    kernel_dilation: None | int | Sequence[int] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    mask: Array | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    conv_general_dilated: Callable[..., Array] = default_conv_general_dilated,
    promote_dtype: Callable[..., Any] = default_promote_dtype,
    preferred_element_type: Dtype | None = None,
    rngs: nnx.Rngs,
    kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    method: str | None = None,
  ):
    geometry = geometry_rules.conv_layer_geometry(
      "Conv", kernel_size, strides, padding, input_dilation, kernel_dilation, feature_group_count
    )
    kernel_shape = geometry.kernel_shape(in_features, out_features)
    self._build(geometry, kernel_shape, (out_features,), locals())

  def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
    """``(*batch, *spatial, in_features)`` -> ``(*batch, *out_spatial, out_features)``.

    ``out_sharding``, if given, is passed to ``conv_general_dilated``.
    """
    return self._apply(
      _layer_ops.conv_layer,
      inputs,
      conv_general_dilated=self.conv_general_dilated,
      out_sharding=out_sharding,
      method=self.method,
    )


class ConvLocal(_Layer):
  """Locally connected layer (unshared weights), NNX style.

  The NNX counterpart of ``flax.linen.ConvLocal`` (and of
  :class:`convmm.linen.ConvLocal`): one ``(prod(kernel_size) * in_features,
  out_features)`` kernel matrix and one bias vector per output position,
  computed as ``convmm.im2col`` + a GEMM batched over the output positions
  (there is no XLA alternative, hence no ``method``).
  Because the parameters depend on the number of output positions, the
  input's spatial shape is a constructor argument.

  Args:
    in_features, out_features, kernel_size, strides: as for :class:`Conv`.
    input_spatial_shape: spatial shape ``(*spatial,)`` of the inputs.
    padding, input_dilation, kernel_dilation, use_bias, mask, dtype,
      param_dtype, precision, kernel_init, bias_init, promote_dtype,
      preferred_element_type, rngs, kernel_metadata, bias_metadata: as for
      :class:`Conv`.
    feature_group_count: must be 1 (as in ``lax.conv_general_dilated_local``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import convmm.nnx
    >>> layer = convmm.nnx.ConvLocal(3, 4, kernel_size=(3,), input_spatial_shape=(8,),
    ...                              padding='VALID', rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.bias.shape
    ((6, 9, 4), (6, 4))
    >>> layer(jnp.ones((1, 8, 3))).shape
    (1, 6, 4)
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: None | int | Sequence[int] = 1,
    *,
    input_spatial_shape: Sequence[int],
    padding: PaddingLike = "SAME",
    input_dilation: None | int | Sequence[int] = 1,
    kernel_dilation: None | int | Sequence[int] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    mask: Array | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    promote_dtype: Callable[..., Any] = default_promote_dtype,
    preferred_element_type: Dtype | None = None,
    rngs: nnx.Rngs,
    kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    fields = (kernel_size, strides, padding, input_dilation, kernel_dilation, feature_group_count)
    geometry = geometry_rules.conv_layer_geometry("ConvLocal", *fields)
    kernel_shape, bias_shape = geometry_rules.local_shapes(
      geometry, input_spatial_shape, in_features, out_features
    )
    input_spatial_shape = tuple(input_spatial_shape)
    self._build(geometry, kernel_shape, bias_shape, locals())

  def __call__(self, inputs: Array) -> Array:
    """``(*batch, *input_spatial_shape, in_features)`` -> ``(*batch, *out, out_features)``."""
    return self._apply(
      _layer_ops.conv_local_layer, inputs, input_spatial_shape=self.input_spatial_shape
    )


class ConvTranspose(_Layer):
  """Transposed convolution; a drop-in for ``flax.nnx.ConvTranspose``.

  Same constructor arguments, defaults, parameters and results as
  ``flax.nnx.ConvTranspose`` (``lax.conv_transpose``'s meaning of padding,
  ``transpose_kernel``, Flax's periodic fold for 'CIRCULAR'), computed by
  ``convmm.conv_transpose``. For the adjoint of a given Conv, with groups and
  PyTorch-style padding, see :class:`ConvAdjoint`.

  Args:
    in_features, out_features, kernel_size: as for :class:`Conv`.
    strides: ``None`` (1), an int or ``n`` ints: the input dilation.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'SAME_LOWER' (stride 1 only), an
      int, or ``n`` ints or ``(low, high)`` pairs (the padding of the dilated
      input, as in ``lax.conv_transpose``).
    kernel_dilation: ``None`` (1), an int or ``n`` ints.
    transpose_kernel: flip the kernel spatially and swap its feature axes; the
      kernel is then ``(*kernel_size, out_features, in_features)``.
    use_bias, mask, dtype, param_dtype, precision, kernel_init, bias_init,
      promote_dtype, preferred_element_type, rngs, kernel_metadata,
      bias_metadata, method: as for :class:`Conv`.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import convmm.nnx
    >>> layer = convmm.nnx.ConvTranspose(3, 4, kernel_size=(3,), padding='VALID',
    ...                                  rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer(jnp.ones((1, 8, 3))).shape
    ((3, 3, 4), (1, 10, 4))
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    *,
    padding: PaddingLike = "SAME",
    kernel_dilation: int | Sequence[int] | None = None,
    use_bias: bool = True,
    mask: Array | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike | None = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    transpose_kernel: bool = False,
    promote_dtype: Callable[..., Any] = default_promote_dtype,
    preferred_element_type: Dtype | None = None,
    rngs: nnx.Rngs,
    kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    method: str | None = None,
  ):
    geometry = geometry_rules.transpose_layer_geometry(
      "ConvTranspose", kernel_size, strides, padding, kernel_dilation
    )
    features = (out_features, in_features) if transpose_kernel else (in_features, out_features)
    kernel_shape = geometry.kernel_shape(*features)
    self._build(geometry, kernel_shape, (out_features,), locals())

  def __call__(self, inputs: Array) -> Array:
    """``(*batch, *spatial, in_features)`` -> ``(*batch, *out_spatial, out_features)``."""
    return self._apply(
      _layer_ops.conv_transpose_layer,
      inputs,
      transpose_kernel=self.transpose_kernel,
      method=self.method,
    )


class ConvAdjoint(_Layer):
  """The transposed convolution as the exact adjoint of a Conv (PyTorch's ConvTranspose).

  NNX counterpart of :class:`convmm.linen.ConvAdjoint`: the adjoint of
  ``Conv(out_features, in_features, kernel_size, strides, padding=...,
  kernel_dilation=..., feature_group_count=...)``, whose kernel
  ``(*kernel_size, out_features // feature_group_count, in_features)`` it
  shares in shape, so weights can be tied; output sizes as in linen.

  Args:
    in_features: number of input features (the forward Conv's output features).
    out_features: number of output features (the forward Conv's input features).
    strides: an int or ``n`` ints (default 1): the forward Conv's strides.
    padding: the forward Conv's padding: any value :class:`Conv` accepts.
    output_padding: an int or ``n`` ints (default 0), each ``< strides``,
      added on the high side (VALID or explicit padding only).
    kernel_dilation, feature_group_count: as for :class:`Conv`.
    use_bias, mask, dtype, param_dtype, precision, kernel_init, bias_init,
      promote_dtype, rngs, kernel_metadata, bias_metadata, method: as for
      :class:`Conv`.
    preferred_element_type: dtype in which the adjoint is computed and returned.

  Example:
    A tied-weight autoencoder: the decoder shares the encoder's kernel.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import convmm.nnx
    >>> rngs = nnx.Rngs(0)
    >>> enc = convmm.nnx.Conv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
    >>> dec = convmm.nnx.ConvAdjoint(8, 3, (3, 3), strides=2, rngs=rngs)
    >>> dec.kernel = enc.kernel  # the same nnx.Param: tied
    >>> x = jnp.ones((2, 16, 16, 3))
    >>> z = jax.nn.relu(enc(x))
    >>> z.shape, dec(z).shape
    ((2, 8, 8, 8), (2, 16, 16, 3))
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: None | int | Sequence[int] = 1,
    *,
    padding: PaddingLike = "SAME",
    output_padding: int | Sequence[int] = 0,
    kernel_dilation: None | int | Sequence[int] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    mask: Array | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    promote_dtype: Callable[..., Any] = default_promote_dtype,
    preferred_element_type: Dtype | None = None,
    rngs: nnx.Rngs,
    kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    method: str | None = None,
  ):
    fields = (kernel_size, strides, padding, kernel_dilation, feature_group_count, output_padding)
    geometry = geometry_rules.adjoint_layer_geometry("ConvAdjoint", *fields)
    kernel_shape = geometry.adjoint_kernel_shape(in_features, out_features)
    self._build(geometry, kernel_shape, (out_features,), locals())

  def __call__(self, inputs: Array) -> Array:
    """The forward's output ``(*batch, *spatial, in_features)`` -> its input's shape."""
    return self._apply(_layer_ops.conv_adjoint_layer, inputs, method=self.method)
