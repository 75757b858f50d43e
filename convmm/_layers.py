"""Padding, shape and validation logic shared by the Flax layers (linen and nnx).

``convmm.linen`` and ``convmm.nnx`` only create parameters and call one
function of this module, so the two APIs cannot drift apart (Flax keeps two
copies of this logic). Data flows as in the core:
``layer fields -> LayerGeometry -> (jnp.pad) -> convmm core -> bias``.

Conventions are Flax's: inputs are channels-last ``(*batch, *spatial, C)``;
leading batch dimensions are flattened into one (zero batch dimensions mean a
single unbatched example); the kernel is ``(*kernel_size, I, O)``. Padding
modes that lax has no name for ('CIRCULAR', 'REFLECT', 'CAUSAL') are applied
here with ``jnp.pad`` and the convolution is then 'VALID'.

Every check raises a ``ValueError``/``TypeError`` whose message starts with the
layer's name and names the field in backticks. Checks run in Python on static
shapes (when the layer is built, or while its call is traced), never inside
compiled code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convmm import _canonical
from convmm import conv_adjoint as core_conv_adjoint
from convmm import conv_general_dilated as core_conv_general_dilated
from convmm import conv_transpose as core_conv_transpose
from convmm import im2col as core_im2col
from convmm._tiling import current_memory_budget

CONV_PADDINGS = ("SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")
TRANSPOSE_PADDINGS = ("SAME", "SAME_LOWER", "VALID", "CIRCULAR")
# Modes lax has no name for: applied with jnp.pad, then the convolution is 'VALID'.
_JNP_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect", "CAUSAL": "constant"}

Padding = str | tuple[tuple[int, int], ...]


def _is_int(x: Any) -> bool:
  return not isinstance(x, bool) and isinstance(x, int | np.integer)


def _positive_int(layer: str, name: str, value: Any) -> int:
  if not _is_int(value):
    raise TypeError(f"{layer}: `{name}` must be a positive int, got {value!r}")
  if value < 1:
    raise ValueError(f"{layer}: `{name}` must be >= 1, got {name}={value}")
  return operator.index(value)


def _kernel_size(layer: str, kernel_size: Any) -> tuple[int, ...]:
  if _is_int(kernel_size):
    kernel_size = (kernel_size,)
  if isinstance(kernel_size, str) or not isinstance(kernel_size, Sequence | np.ndarray):
    raise TypeError(
        f"{layer}: `kernel_size` must be an int or a sequence of ints, got {kernel_size!r}")
  if len(kernel_size) == 0:
    raise ValueError(f"{layer}: `kernel_size` must have at least one entry, got "
                     f"kernel_size={kernel_size!r}")
  return _canonical.canonical_ints(layer, "kernel_size", kernel_size, len(kernel_size))


def _broadcast_ints(
    layer: str, name: str, value: Any, rank: int, default: int = 1, minimum: int = 1
) -> tuple[int, ...]:
  """Flax's ``maybe_broadcast``: ``None`` -> ``default``, an int -> ``rank`` copies."""
  if value is None:
    value = default
  if _is_int(value):
    value = (value,) * rank
  return _canonical.canonical_ints(layer, name, value, rank, minimum=minimum)


def canonical_padding(layer: str, padding: Any, rank: int, modes: Sequence[str]) -> Padding:
  """Flax's ``canonicalize_padding``, with errors that name the layer.

  Args:
    layer: layer name for error messages.
    padding: a string in ``modes`` (any case), an int (same on both sides of
      every dim), or ``rank`` entries, each an int or a ``(low, high)`` pair.
    rank: number of spatial dimensions.
    modes: accepted padding strings.

  Returns:
    An upper-case mode string or a tuple of ``rank`` ``(low, high)`` pairs.

  Raises:
    ValueError: on an unknown string or a sequence of the wrong length.
    TypeError: on anything else.
  """
  if isinstance(padding, str):
    mode = padding.upper()
    if mode not in modes:
      raise ValueError(
          f"{layer}: `padding` must be one of {tuple(modes)}, an int, or {rank} ints or "
          f"(low, high) pairs, got padding={padding!r}")
    return mode
  if _is_int(padding):
    return ((int(padding), int(padding)),) * rank
  if not isinstance(padding, Sequence | np.ndarray):
    raise TypeError(
        f"{layer}: `padding` must be a string, an int, or {rank} ints or (low, high) pairs, "
        f"got {padding!r}")
  entries = tuple(padding)
  if len(entries) != rank:
    raise ValueError(
        f"{layer}: `padding` must have one entry per spatial dimension ({rank}, the length "
        f"of `kernel_size`), got {len(entries)}: padding={padding!r}")
  pairs = []
  for entry in entries:
    if _is_int(entry):
      pairs.append((int(entry), int(entry)))
    elif (isinstance(entry, Sequence | np.ndarray) and not isinstance(entry, str)
          and len(entry) == 2 and all(_is_int(p) for p in entry)):
      pairs.append((int(entry[0]), int(entry[1])))
    else:
      raise TypeError(
          f"{layer}: `padding` entries must be ints or (low, high) pairs of ints, got "
          f"padding={padding!r}")
  return tuple(pairs)


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
  def effective_kernel_size(self) -> tuple[int, ...]:
    return tuple((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation))

  @property
  def pad_width(self) -> tuple[tuple[int, int], ...] | None:
    """Spatial ``jnp.pad`` widths for CIRCULAR/REFLECT/CAUSAL, else ``None``.

    CIRCULAR and REFLECT put ``(k_eff - 1) // 2`` before and ``k_eff // 2``
    after (Flax's convention for even kernels); CAUSAL puts ``k_eff - 1`` before.
    """
    if self.padding in ("CIRCULAR", "REFLECT"):
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
    mode = _JNP_PAD_MODES[cast(str, self.padding)]  # a named mode when pad_width is set
    return jnp.pad(x, ((0, 0), *self.pad_width, (0, 0)), mode=mode)

  def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of a flat input after :meth:`pad`."""
    if self.pad_width is None:
      return tuple(shape)
    return (shape[0], *(s + lo + hi for s, (lo, hi) in zip(shape[1:-1], self.pad_width)),
            shape[-1])

  def out_spatial(self, in_spatial: Sequence[int]) -> tuple[int, ...]:
    """Output spatial sizes of the forward convolution of ``in_spatial``."""
    shape = self.padded_shape((1, *in_spatial, 1))
    return _canonical.conv_geometry(
        self.layer, shape, len(shape), self.kernel_size, self.strides, self.lax_padding,
        self.input_dilation, self.kernel_dilation, self.dimension_numbers).out_spatial

  def _check_groups(self, in_features: int, out_features: int) -> None:
    g = self.feature_group_count
    if in_features % g or out_features % g:
      raise ValueError(
          f"{self.layer}: `feature_group_count` (={g}) must divide both feature counts, got "
          f"{in_features} input and {out_features} output features")

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


def conv_geometry(
    layer: str,
    kernel_size: Any,
    strides: Any = 1,
    padding: Any = "SAME",
    input_dilation: Any = 1,
    kernel_dilation: Any = 1,
    feature_group_count: Any = 1,
    *,
    modes: Sequence[str] = CONV_PADDINGS,
) -> LayerGeometry:
  """Validates the fields of a Conv/ConvLocal/ConvTranspose layer.

  Args:
    layer: the layer's name, for error messages.
    kernel_size: an int (1-D) or a sequence of ints.
    strides, input_dilation, kernel_dilation: ``None`` (1), an int, or one int
      per spatial dimension.
    padding: see :func:`canonical_padding`.
    feature_group_count: a positive int.
    modes: accepted padding strings.

  Returns:
    The :class:`LayerGeometry`.

  Raises:
    ValueError, TypeError: naming the offending field and its value.
  """
  kernel_size = _kernel_size(layer, kernel_size)
  rank = len(kernel_size)
  geometry = LayerGeometry(
      layer=layer,
      kernel_size=kernel_size,
      strides=_broadcast_ints(layer, "strides", strides, rank),
      padding=canonical_padding(layer, padding, rank, modes),
      input_dilation=_broadcast_ints(layer, "input_dilation", input_dilation, rank),
      kernel_dilation=_broadcast_ints(layer, "kernel_dilation", kernel_dilation, rank),
      feature_group_count=_positive_int(layer, "feature_group_count", feature_group_count),
  )
  if geometry.padding == "CAUSAL" and rank != 1:
    raise ValueError(
        f"{layer}: `padding`='CAUSAL' is only defined for one spatial dimension, got "
        f"kernel_size={kernel_size} ({rank} dimensions)")
  if isinstance(geometry.padding, str) and any(d != 1 for d in geometry.input_dilation):
    raise ValueError(
        f"{layer}: `padding`={geometry.padding!r} cannot be combined with `input_dilation`"
        f"={geometry.input_dilation}; give explicit (low, high) pairs")
  return geometry


def transpose_geometry(
    layer: str, kernel_size: Any, strides: Any, padding: Any, kernel_dilation: Any,
) -> LayerGeometry:
  """Validates the fields of a ConvTranspose layer (Flax's meaning of padding).

  Raises:
    ValueError, TypeError: naming the offending field and its value.
  """
  geometry = conv_geometry(layer, kernel_size, strides, padding, 1, kernel_dilation,
                           modes=TRANSPOSE_PADDINGS)
  if geometry.padding == "SAME_LOWER" and any(s != 1 for s in geometry.strides):
    # lax.conv_transpose passes 'SAME_LOWER' to the dilated conv, which only
    # accepts a padding string without input dilation, i.e. stride 1.
    raise ValueError(
        f"{layer}: `padding`='SAME_LOWER' requires `strides` of 1 (as in lax.conv_transpose), "
        f"got strides={geometry.strides}")
  return geometry


def adjoint_geometry(
    layer: str, kernel_size: Any, strides: Any, padding: Any, kernel_dilation: Any,
    feature_group_count: Any, output_padding: Any,
) -> LayerGeometry:
  """Validates the fields of a ConvAdjoint layer.

  ``padding`` means the forward Conv's padding (any mode Conv accepts), and
  ``output_padding`` the extra size on the high side of each output dim, which
  must be smaller than the stride and is only defined where the output size is
  ambiguous ('VALID' and explicit padding).

  Raises:
    ValueError, TypeError: naming the offending field and its value.
  """
  geometry = conv_geometry(layer, kernel_size, strides, padding, 1, kernel_dilation,
                           feature_group_count)
  output_padding = _broadcast_ints(layer, "output_padding", output_padding, geometry.rank,
                                   default=0, minimum=0)
  if any(p >= s for p, s in zip(output_padding, geometry.strides)):
    raise ValueError(
        f"{layer}: `output_padding` (={output_padding}) must be < `strides` "
        f"(={geometry.strides}) in every dimension")
  if isinstance(geometry.padding, str) and geometry.padding != "VALID" and any(output_padding):
    raise ValueError(
        f"{layer}: `output_padding` (={output_padding}) must be 0 with `padding`="
        f"{geometry.padding!r}, whose output size is fixed to input size * strides")
  return dataclasses.replace(geometry, output_padding=output_padding)


def local_shapes(
    geometry: LayerGeometry, in_spatial: Sequence[int], in_features: int, out_features: int,
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
        f"lax.conv_general_dilated_local), got {geometry.feature_group_count}")
  in_spatial = tuple(in_spatial)
  if len(in_spatial) != geometry.rank:
    raise ValueError(
        f"{layer}: the input spatial shape {in_spatial} must have one size per "
        f"`kernel_size` dimension, kernel_size={geometry.kernel_size}")
  out_spatial = geometry.out_spatial(in_spatial)
  patch_size = math.prod(geometry.kernel_size) * in_features
  return (*out_spatial, patch_size, out_features), (*out_spatial, out_features)


def check_mask(layer: str, mask: Any, kernel_shape: Sequence[int]) -> None:
  """Raises a ValueError if ``mask`` is given and is not shaped like the kernel."""
  if mask is not None and tuple(np.shape(mask)) != tuple(kernel_shape):
    raise ValueError(
        f"{layer}: `mask` must have the kernel's shape {tuple(kernel_shape)}, got "
        f"mask.shape={tuple(np.shape(mask))}")


def in_features_of(
    geometry: LayerGeometry, inputs: Any, in_features: int | None = None,
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
        f"inputs.shape={shape}")
  if in_features is not None and shape[-1] != in_features:
    raise ValueError(
        f"{layer}: the last dimension of the inputs must be `in_features` (={in_features}), "
        f"got inputs.shape={shape}")
  return shape[-1]


def _flatten_batch(
    geometry: LayerGeometry, inputs: jax.Array, in_features: int | None,
) -> tuple[jax.Array, tuple]:
  in_features_of(geometry, inputs, in_features)
  batch_shape = inputs.shape[: inputs.ndim - geometry.rank - 1]
  flat = inputs.reshape(math.prod(batch_shape), *inputs.shape[len(batch_shape):])
  return flat, batch_shape


def _finish(y: jax.Array, bias: jax.Array | None, batch_shape: tuple) -> jax.Array:
  if bias is not None:
    y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return y.reshape(*batch_shape, *y.shape[1:])


def _compiled(*static_argnames: str) -> Callable:
  # One compiled computation per layer call. The im2col core is dozens of
  # small ops (a slice per kernel tap, their transposes in the adjoint), which
  # eager use would compile and dispatch one by one; under an outer jit this
  # inner jit is simply inlined. The geometry and options are static.
  # The memory budget in force is part of the cache key (it is read while tracing).
  def decorate(fn: Callable) -> Callable:
    def with_budget(*args, memory_budget_key: int, **kwargs):
      del memory_budget_key
      return fn(*args, **kwargs)

    jitted = jax.jit(with_budget, static_argnums=0,
                     static_argnames=(*static_argnames, "memory_budget_key"))

    @functools.wraps(fn)
    def call(*args, **kwargs):
      return jitted(*args, memory_budget_key=current_memory_budget(), **kwargs)

    return call

  return decorate


@_compiled("in_features", "precision", "preferred_element_type", "conv_general_dilated",
           "out_sharding")
def conv(
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
    geometry: from :func:`conv_geometry`.
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
  conv_fn = conv_general_dilated or core_conv_general_dilated
  # Like flax.nnx, pass preferred_element_type only when set, so that
  # user-supplied convolution functions without that argument keep working.
  extra = {} if preferred_element_type is None else {
      "preferred_element_type": preferred_element_type}
  if out_sharding is not None:
    extra["out_sharding"] = out_sharding
  y = conv_fn(
      geometry.pad(x), kernel, geometry.strides, geometry.lax_padding,
      lhs_dilation=geometry.input_dilation, rhs_dilation=geometry.kernel_dilation,
      dimension_numbers=geometry.dimension_numbers,
      feature_group_count=geometry.feature_group_count, precision=precision, **extra)
  return _finish(y, bias, batch_shape)


@_compiled("in_features", "input_spatial_shape", "precision", "preferred_element_type")
def conv_local(
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
    geometry: from :func:`conv_geometry`.
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
        f"inputs.shape={inputs.shape}")
  patches = core_im2col(
      geometry.pad(x), geometry.kernel_size, geometry.strides, geometry.lax_padding,
      geometry.input_dilation, geometry.kernel_dilation, geometry.dimension_numbers)
  rank = geometry.rank
  positions = tuple(range(1, rank + 1))
  y = lax.dot_general(
      patches, kernel, (((rank + 1,), (rank,)), (positions, tuple(range(rank)))),
      precision=precision, preferred_element_type=preferred_element_type)  # (*out, N, O)
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
    y = y.reshape(*y.shape[:axis], -1, p, *y.shape[axis + 1:]).sum(axis=axis)
  return y


@_compiled("in_features", "transpose_kernel", "precision", "preferred_element_type")
def conv_transpose(
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
    geometry: from :func:`transpose_geometry`.
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
    padding = lax.padtype_to_pads(in_spatial, geometry.effective_kernel_size,
                                  (1,) * geometry.rank, "SAME_LOWER")
  y = core_conv_transpose(
      x, kernel, geometry.strides, padding, rhs_dilation=geometry.kernel_dilation,
      dimension_numbers=geometry.dimension_numbers, transpose_kernel=transpose_kernel,
      precision=precision, preferred_element_type=preferred_element_type)
  if geometry.padding == "CIRCULAR":
    period = [n * s for n, s in zip(in_spatial, geometry.strides)]
    y = _periodic_fold(y, period, transpose_kernel)
  return _finish(y, bias, batch_shape)


def adjoint_input_spatial(geometry: LayerGeometry, out_spatial: Sequence[int]) -> tuple[int, ...]:
  """The forward input size whose convolution has ``out_spatial`` (ConvAdjoint's output).

  'SAME'-like modes (SAME, SAME_LOWER, CIRCULAR, REFLECT, CAUSAL): ``n * s``;
  'VALID': ``(n - 1) * s + k_eff + output_padding``; pairs:
  ``(n - 1) * s + k_eff - lo - hi + output_padding``.

  Raises:
    ValueError: if the size would be negative.
  """
  s, op = geometry.strides, geometry.output_padding or (0,) * geometry.rank
  if isinstance(geometry.padding, str) and geometry.padding != "VALID":
    return tuple(n * st for n, st in zip(out_spatial, s))
  pads = ((0, 0),) * geometry.rank if geometry.padding == "VALID" else geometry.padding
  sizes = tuple((n - 1) * st + k - lo - hi + p for n, st, k, (lo, hi), p in
                zip(out_spatial, s, geometry.effective_kernel_size, pads, op))
  if any(size < 0 for size in sizes):
    raise ValueError(
        f"{geometry.layer}: `padding` (={geometry.padding}) is too large for inputs of "
        f"spatial shape {tuple(out_spatial)}: the output spatial shape would be {sizes}")
  return sizes


@_compiled("in_features", "precision", "preferred_element_type")
def conv_adjoint(
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
  unless the mode is CIRCULAR, REFLECT or CAUSAL). Its transpose is
  ``pad^T(conv_adjoint(y))``: ``convmm.conv_adjoint`` for the convolution, and
  ``jax.linear_transpose`` of the same ``jnp.pad`` for the padding (for wrap
  padding this folds the halo back onto the opposite edge).

  Args:
    geometry: from :func:`adjoint_geometry`.
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
  x_bar = core_conv_adjoint(
      y, kernel, geometry.padded_shape(x_shape), geometry.strides, geometry.lax_padding,
      rhs_dilation=geometry.kernel_dilation, dimension_numbers=geometry.dimension_numbers,
      feature_group_count=geometry.feature_group_count, precision=precision)
  if geometry.pad_width is not None:
    (x_bar,) = jax.linear_transpose(
        geometry.pad, jax.ShapeDtypeStruct(x_shape, x_bar.dtype))(x_bar)
  return _finish(x_bar, bias, batch_shape)
