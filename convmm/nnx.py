"""Flax NNX layers computed by convmm: drop-ins for ``flax.nnx`` convolutions.

``Conv`` and ``ConvTranspose`` take the constructor arguments of
``flax.nnx.Conv`` / ``flax.nnx.ConvTranspose`` with the same defaults, and
draw the same parameters from the same ``nnx.Rngs`` ('kernel' then 'bias',
each an ``nnx.Param``). ``ConvLocal`` (Flax has none for NNX) and
``ConvAdjoint`` mirror :mod:`convmm.linen` in NNX style.

The layers hold parameters only; padding, shapes and checks live in
``convmm._layers`` (shared with :mod:`convmm.linen`) and the arithmetic in the
convmm core (im2col + GEMM). Importing this module requires flax.

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
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype as default_promote_dtype
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

from convmm import _layers
from convmm import conv_general_dilated as default_conv_general_dilated

Array = jax.Array
default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


def _init_parameters(
    module: Any, kernel_shape: Sequence[int], bias_shape: Sequence[int], *,
    use_bias: bool, kernel_init: Initializer, bias_init: Initializer, param_dtype: Dtype,
    rngs: nnx.Rngs, kernel_metadata: Mapping[str, Any], bias_metadata: Mapping[str, Any],
) -> None:
  """Creates ``kernel`` then ``bias`` from ``rngs.params()``, as flax.nnx does."""
  module.kernel_shape = tuple(kernel_shape)
  module.kernel = nnx.Param(
      kernel_init(rngs.params(), tuple(kernel_shape), param_dtype), **kernel_metadata)
  module.bias = nnx.Param(
      bias_init(rngs.params(), tuple(bias_shape), param_dtype), **bias_metadata
  ) if use_bias else nnx.data(None)


def _operands(module: Any, inputs: Array) -> tuple[Array, Array, Array | None]:
  """Masks the kernel and promotes ``(inputs, kernel, bias)``, as flax.nnx does."""
  _layers.check_mask(type(module).__name__, module.mask, module.kernel_shape)
  kernel = module.kernel[...]
  if module.mask is not None:
    kernel *= module.mask
  bias = module.bias[...] if module.bias is not None else None
  return module.promote_dtype((inputs, kernel, bias), dtype=module.dtype)


class Conv(nnx.Module):
  """Convolution computed as im2col + GEMM; a drop-in for ``flax.nnx.Conv``.

  Same constructor arguments, defaults, parameters and results as
  ``flax.nnx.Conv``, except that ``conv_general_dilated`` defaults to
  ``convmm.conv_general_dilated``.

  Args:
    in_features: number of input features.
    out_features: number of output features (filters).
    kernel_size: kernel spatial shape; an int means a 1-D kernel.
    strides: an int or ``n`` ints (default 1).
    padding: 'SAME', 'SAME_LOWER', 'VALID', 'CIRCULAR' (periodic), 'REFLECT',
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
    conv_general_dilated: the convolution (default ``convmm.conv_general_dilated``).
    promote_dtype: ``f((inputs, kernel, bias), dtype=...)`` casting the operands.
    preferred_element_type: accumulation/output dtype of the GEMM.
    rngs: the ``nnx.Rngs`` drawing the parameters.
    kernel_metadata: metadata of the kernel ``nnx.Param``.
    bias_metadata: metadata of the bias ``nnx.Param``.

  Raises:
    ValueError, TypeError: on invalid arguments, naming the argument.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import convmm.nnx
    >>> layer = convmm.nnx.Conv(3, 4, kernel_size=(3,), padding='VALID', rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.bias.shape
    ((3, 3, 4), (4,))
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
  ):
    geometry = _layers.conv_geometry(
        "Conv", kernel_size, strides, padding, input_dilation, kernel_dilation,
        feature_group_count)
    kernel_shape = geometry.kernel_shape(in_features, out_features)
    _layers.check_mask("Conv", mask, kernel_shape)
    self.kernel_size = geometry.kernel_size
    _init_parameters(self, kernel_shape, (out_features,), use_bias=use_bias,
                     kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype,
                     rngs=rngs, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self.in_features = in_features
    self.out_features = out_features
    self.strides = strides
    self.padding = padding
    self.input_dilation = input_dilation
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.mask = mask
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.conv_general_dilated = conv_general_dilated
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type

  def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
    """Applies the convolution.

    Args:
      inputs: ``(*batch, *spatial, in_features)``; zero or several batch dims.
      out_sharding: optional sharding of the convolution's output (passed to
        ``conv_general_dilated``).

    Returns:
      ``(*batch, *out_spatial, out_features)``.

    Raises:
      ValueError, TypeError: on invalid arguments or inputs, naming them.
    """
    geometry = _layers.conv_geometry(
        "Conv", self.kernel_size, self.strides, self.padding, self.input_dilation,
        self.kernel_dilation, self.feature_group_count)
    inputs, kernel, bias = _operands(self, inputs)
    return _layers.conv(
        geometry, inputs, kernel, bias, in_features=self.in_features,
        precision=self.precision, preferred_element_type=self.preferred_element_type,
        conv_general_dilated=self.conv_general_dilated, out_sharding=out_sharding)


class ConvLocal(nnx.Module):
  """Locally connected layer (unshared weights), NNX style.

  The NNX counterpart of ``flax.linen.ConvLocal`` (and of
  :class:`convmm.linen.ConvLocal`): one ``(prod(kernel_size) * in_features,
  out_features)`` kernel matrix and one bias vector per output position,
  computed as ``convmm.im2col`` + a GEMM batched over the output positions.
  Because the parameters depend on the number of output positions, the
  input's spatial shape is a constructor argument.

  Args:
    in_features: number of input features.
    out_features: number of output features.
    kernel_size: kernel spatial shape; an int means a 1-D kernel.
    strides: an int or ``n`` ints (default 1).
    input_spatial_shape: spatial shape ``(*spatial,)`` of the inputs.
    padding, input_dilation, kernel_dilation, use_bias, mask, dtype,
      param_dtype, precision, kernel_init, bias_init, promote_dtype,
      preferred_element_type, rngs, kernel_metadata, bias_metadata: as for
      :class:`Conv`.
    feature_group_count: must be 1 (as in ``lax.conv_general_dilated_local``).

  Raises:
    ValueError, TypeError: on invalid arguments, naming the argument.

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
    geometry = _layers.conv_geometry(
        "ConvLocal", kernel_size, strides, padding, input_dilation, kernel_dilation,
        feature_group_count)
    kernel_shape, bias_shape = _layers.local_shapes(
        geometry, input_spatial_shape, in_features, out_features)
    _layers.check_mask("ConvLocal", mask, kernel_shape)
    _init_parameters(self, kernel_shape, bias_shape, use_bias=use_bias,
                     kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype,
                     rngs=rngs, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = geometry.kernel_size
    self.strides = strides
    self.input_spatial_shape = tuple(input_spatial_shape)
    self.padding = padding
    self.input_dilation = input_dilation
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.mask = mask
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type

  def __call__(self, inputs: Array) -> Array:
    """Applies the locally connected layer.

    Args:
      inputs: ``(*batch, *input_spatial_shape, in_features)``.

    Returns:
      ``(*batch, *out_spatial, out_features)``.

    Raises:
      ValueError, TypeError: on invalid arguments or inputs, naming them.
    """
    geometry = _layers.conv_geometry(
        "ConvLocal", self.kernel_size, self.strides, self.padding, self.input_dilation,
        self.kernel_dilation, self.feature_group_count)
    inputs, kernel, bias = _operands(self, inputs)
    return _layers.conv_local(
        geometry, inputs, kernel, bias, in_features=self.in_features,
        input_spatial_shape=self.input_spatial_shape,
        precision=self.precision, preferred_element_type=self.preferred_element_type)


class ConvTranspose(nnx.Module):
  """Transposed convolution; a drop-in for ``flax.nnx.ConvTranspose``.

  Same constructor arguments, defaults, parameters and results as
  ``flax.nnx.ConvTranspose`` (``lax.conv_transpose``'s meaning of padding,
  ``transpose_kernel``, Flax's periodic fold for 'CIRCULAR'), computed by
  ``convmm.conv_transpose``. For the adjoint of a given Conv, with groups and
  PyTorch-style padding, see :class:`ConvAdjoint`.

  Args:
    in_features: number of input features.
    out_features: number of output features.
    kernel_size: kernel spatial shape; an int means a 1-D kernel.
    strides: ``None`` (1), an int or ``n`` ints: the input dilation.
    padding: 'SAME', 'VALID', 'CIRCULAR', 'SAME_LOWER' (stride 1 only), an
      int, or ``n`` ints or ``(low, high)`` pairs (the padding of the dilated
      input, as in ``lax.conv_transpose``).
    kernel_dilation: ``None`` (1), an int or ``n`` ints.
    use_bias: whether to add a bias (default True).
    mask: optional array of the kernel's shape multiplied into the kernel.
    dtype: computation dtype (default: promoted from inputs and params).
    param_dtype: parameter dtype (default float32).
    precision: ``jax.lax.Precision`` of the GEMM.
    kernel_init: kernel initialiser (default lecun_normal).
    bias_init: bias initialiser (default zeros).
    transpose_kernel: flip the kernel spatially and swap its feature axes; the
      kernel is then ``(*kernel_size, out_features, in_features)``.
    promote_dtype: ``f((inputs, kernel, bias), dtype=...)`` casting the operands.
    preferred_element_type: accumulation/output dtype of the GEMM.
    rngs: the ``nnx.Rngs`` drawing the parameters.
    kernel_metadata: metadata of the kernel ``nnx.Param``.
    bias_metadata: metadata of the bias ``nnx.Param``.

  Raises:
    ValueError, TypeError: on invalid arguments, naming the argument.

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
  ):
    geometry = _layers.transpose_geometry(
        "ConvTranspose", kernel_size, strides, padding, kernel_dilation)
    features = (out_features, in_features) if transpose_kernel else (in_features, out_features)
    kernel_shape = geometry.kernel_shape(*features)
    _layers.check_mask("ConvTranspose", mask, kernel_shape)
    self.kernel_size = geometry.kernel_size
    self.in_features = in_features
    self.out_features = out_features
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.use_bias = use_bias
    self.mask = mask
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.transpose_kernel = transpose_kernel
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type
    _init_parameters(self, kernel_shape, (out_features,), use_bias=use_bias,
                     kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype,
                     rngs=rngs, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)

  def __call__(self, inputs: Array) -> Array:
    """Applies the transposed convolution.

    Args:
      inputs: ``(*batch, *spatial, in_features)``; zero or several batch dims.

    Returns:
      ``(*batch, *out_spatial, out_features)``.

    Raises:
      ValueError, TypeError: on invalid arguments or inputs, naming them.
    """
    geometry = _layers.transpose_geometry(
        "ConvTranspose", self.kernel_size, self.strides, self.padding, self.kernel_dilation)
    inputs, kernel, bias = _operands(self, inputs)
    return _layers.conv_transpose(
        geometry, inputs, kernel, bias, in_features=self.in_features,
        transpose_kernel=self.transpose_kernel, precision=self.precision,
        preferred_element_type=self.preferred_element_type)


class ConvAdjoint(nnx.Module):
  """The transposed convolution as the exact adjoint of a Conv (PyTorch's ConvTranspose).

  NNX counterpart of :class:`convmm.linen.ConvAdjoint`: the adjoint of
  ``Conv(out_features, in_features, kernel_size, strides, padding=...,
  kernel_dilation=..., feature_group_count=...)``, whose kernel
  ``(*kernel_size, out_features // feature_group_count, in_features)`` it
  shares in shape, so weights can be tied. Output spatial sizes: SAME-like
  modes ``n * stride``; VALID ``(n - 1) * stride + k_eff + output_padding``;
  ``(lo, hi)`` ``(n - 1) * stride + k_eff - lo - hi + output_padding``.

  Args:
    in_features: number of input features (the forward Conv's output features).
    out_features: number of output features (the forward Conv's input features).
    kernel_size: kernel spatial shape; an int means a 1-D kernel.
    strides: an int or ``n`` ints (default 1): the forward Conv's strides.
    padding: the forward Conv's padding: any value :class:`Conv` accepts.
    output_padding: an int or ``n`` ints (default 0), each ``< strides``,
      added on the high side (VALID or explicit padding only).
    kernel_dilation: an int or ``n`` ints (default 1).
    feature_group_count: number of feature groups (default 1).
    use_bias, mask, dtype, param_dtype, precision, kernel_init, bias_init,
      promote_dtype, rngs, kernel_metadata, bias_metadata: as for :class:`Conv`.
    preferred_element_type: dtype in which the adjoint is computed and returned.

  Raises:
    ValueError, TypeError: on invalid arguments, naming the argument.

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
  ):
    geometry = _layers.adjoint_geometry(
        "ConvAdjoint", kernel_size, strides, padding, kernel_dilation, feature_group_count,
        output_padding)
    kernel_shape = geometry.adjoint_kernel_shape(in_features, out_features)
    _layers.check_mask("ConvAdjoint", mask, kernel_shape)
    _init_parameters(self, kernel_shape, (out_features,), use_bias=use_bias,
                     kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype,
                     rngs=rngs, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = geometry.kernel_size
    self.strides = strides
    self.padding = padding
    self.output_padding = output_padding
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.mask = mask
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type

  def __call__(self, inputs: Array) -> Array:
    """Applies the adjoint of the forward Conv.

    Args:
      inputs: ``(*batch, *spatial, in_features)``, shaped like the forward's output.

    Returns:
      ``(*batch, *out_spatial, out_features)``, shaped like the forward's input.

    Raises:
      ValueError, TypeError: on invalid arguments or inputs, naming them.
    """
    geometry = _layers.adjoint_geometry(
        "ConvAdjoint", self.kernel_size, self.strides, self.padding, self.kernel_dilation,
        self.feature_group_count, self.output_padding)
    inputs, kernel, bias = _operands(self, inputs)
    return _layers.conv_adjoint(
        geometry, inputs, kernel, bias, in_features=self.in_features,
        precision=self.precision, preferred_element_type=self.preferred_element_type)
