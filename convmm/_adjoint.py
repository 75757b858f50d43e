"""The transposed convolution, obtained as the adjoint of the im2col convolution.

A convolution is linear in its input, ``y = A_w x``. Its adjoint ``A_w^T`` is
what deep-learning frameworks call the transposed convolution (or
"deconvolution"). Rather than hand-write a second algorithm, convmm asks JAX
for the transpose of its own forward convolution with ``jax.linear_transpose``:
the strided slices of im2col transpose to pads summed together (col2im) and
the GEMM to a GEMM with the kernel transposed. Since the input shape is given
explicitly, there is no ``output_padding`` ambiguity, and every feature of the
forward convolution (groups, N-D, both dilations, any padding) carries over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convmm._conv import check_method, conv_with_spec
from convmm._engine.kernels import choose_method
from convmm._rules.canonical import (
  canonical_ints,
  canonical_padding,
  conv_transpose_padding,
  dilate_dim,
)
from convmm._rules.dimension_numbers import ConvDimensionNumbers, canonical_dimension_numbers
from convmm._rules.shapes import (
  ConvSpec,
  check_dtypes,
  conv_spec,
  layout_shape,
  operator_spec,
  preferred_dtype,
  shape_of,
)


def conv_adjoint(
  cotangent: jax.typing.ArrayLike,
  rhs: jax.typing.ArrayLike,
  lhs_shape: Sequence[int],
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
) -> jax.Array:
  """The exact adjoint (transpose) of :func:`conv_general_dilated` in its input.

  For ``y = conv_general_dilated(x, rhs, ...)`` with ``x.shape == lhs_shape``,
  returns ``A^T cotangent`` so that
  ``<conv_general_dilated(x, rhs, ...), c> == <x, conv_adjoint(c, rhs, x.shape, ...)>``.
  This is PyTorch's ``conv_transpose`` (with ``lhs_shape`` fixing what torch
  calls ``output_padding``) for every configuration the forward supports.

  Args:
    cotangent: array shaped like the forward output.
    rhs: the forward kernel (layout ``dimension_numbers[1]``).
    lhs_shape: shape of the forward input, i.e. of the result.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision,
      preferred_element_type: those of the forward convolution.
    method, memory_budget: as for :func:`conv_general_dilated`.

  Returns:
    An array of shape ``lhs_shape``.

  Raises:
    ValueError: if ``cotangent`` is not shaped like the forward output, or any
      forward argument is invalid.
    TypeError: on dtypes that do not match the forward convolution's output.

  Example:
    PyTorch's ``conv_transpose2d(y, W, stride=2, padding=1, output_padding=1)``
    with ``W`` of shape ``(in, out, 3, 3)``:

    >>> import jax.numpy as jnp, convmm
    >>> y = jnp.ones((1, 4, 5, 5)); W = jnp.ones((4, 2, 3, 3))
    >>> convmm.conv_adjoint(y, W, (1, 2, 10, 10), (2, 2), ((1, 1), (1, 1))).shape
    (1, 2, 10, 10)
  """
  fn = "conv_adjoint"
  ct_shape, ct_dtype = shape_of(fn, "cotangent", cotangent)
  conv_args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
  spec, lhs_shape, rhs_shape, rhs_dtype = operator_spec(
    fn, rhs, lhs_shape, *conv_args, feature_group_count, batch_group_count
  )
  if not jnp.issubdtype(rhs_dtype, jnp.inexact):
    raise TypeError(
      f"{fn}: the adjoint is computed by autodiff and needs a floating or complex "
      f"dtype, got rhs.dtype={np.dtype(rhs_dtype)}; cast the operands first"
    )
  if ct_shape != spec.out_shape:
    raise ValueError(
      f"{fn}: `cotangent` must have the forward output shape {spec.out_shape} for "
      f"lhs_shape={lhs_shape} and rhs.shape={rhs_shape}, got cotangent.shape={ct_shape}"
    )
  preferred = preferred_dtype(fn, rhs_dtype, preferred_element_type)
  method, memory_budget = check_method(fn, method, memory_budget)
  choose_method(spec, method, fn)
  # lax's rule: the output has the operands' dtype unless one is preferred.
  out_dtype = rhs_dtype if preferred is None else preferred
  if np.dtype(ct_dtype) != np.dtype(out_dtype):
    raise TypeError(
      f"{fn}: `cotangent` must have the forward output dtype {np.dtype(out_dtype)}, "
      f"got cotangent.dtype={np.dtype(ct_dtype)} (rhs.dtype={np.dtype(rhs_dtype)})"
    )
  options = (precision, preferred, method, memory_budget)
  return _adjoint_with_spec(jnp.asarray(cotangent), jnp.asarray(rhs), spec, lhs_shape, *options)


def _adjoint_with_spec(
  cotangent: jax.Array,
  rhs: jax.Array,
  spec: ConvSpec,
  lhs_shape: tuple[int, ...],
  precision: Any,
  preferred: Any,
  method: str,
  memory_budget: int,
) -> jax.Array:
  """The adjoint of the convolution by ``rhs`` for an already validated spec."""

  def forward(x):
    return conv_with_spec(x, rhs, spec, precision, preferred, method, memory_budget)

  primal = jax.ShapeDtypeStruct(lhs_shape, rhs.dtype)
  (x_bar,) = jax.linear_transpose(forward, primal)(cotangent)
  return x_bar


def transpose_pads(
  fn: str,
  padding: Any,
  in_spatial: tuple[int, ...],
  k_eff: tuple[int, ...],
  strides: tuple[int, ...],
  use_consistent_padding: bool,
) -> tuple[tuple[int, int], ...]:
  """The padding of lax.conv_transpose's stride-1 conv over the dilated input."""
  ones = (1,) * len(strides)
  if isinstance(padding, str) and padding in ("SAME", "VALID"):
    return tuple(conv_transpose_padding(k, s, padding) for k, s in zip(k_eff, strides))
  if isinstance(padding, str):
    # Like lax, any other string is the padding of the stride-1 conv over the
    # dilated input, which only exists when nothing is dilated.
    if any(s != 1 for s in strides):
      raise ValueError(
        f"{fn}: `padding`={padding!r} needs `strides` of 1, got strides={strides}; "
        f"only 'SAME' and 'VALID' (upper case, as in lax) describe a strided forward conv"
      )
    return canonical_padding(fn, padding, in_spatial, k_eff, ones, strides)
  pads = canonical_padding(fn, padding, in_spatial, k_eff, ones, ones)
  if use_consistent_padding:
    pads = tuple(conv_transpose_padding(k, s, p) for k, s, p in zip(k_eff, strides, pads))
  return pads


def transpose_spec(
  fn: str,
  lhs_shape: tuple[int, ...],
  rhs_shape: tuple[int, ...],
  strides: Any,
  padding: Any,
  rhs_dilation: Any,
  dimension_numbers: Any,
  transpose_kernel: bool,
  use_consistent_padding: bool,
) -> ConvSpec:
  """Validates a conv_transpose and returns the spec of its fractionally strided conv.

  That is ``conv(dilate(lhs, strides), k', pads)`` with stride 1, where ``k'``
  is the kernel, flipped and with I and O swapped if ``transpose_kernel``.
  """
  ndim = len(lhs_shape)
  if dimension_numbers is None:
    if ndim < 2 or ndim > 5:
      raise ValueError(
        f"{fn}: `dimension_numbers` has no default for rank-{ndim} inputs "
        f"(lhs.shape={lhs_shape}); pass it explicitly"
      )
    spatial = "HWD"[: ndim - 2]
    dimension_numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  dnums = canonical_dimension_numbers(fn, ndim, len(rhs_shape), dimension_numbers)
  lhs_spec, rhs_spec, _ = dnums
  nsp = ndim - 2
  strides = canonical_ints(fn, "strides", strides, nsp, too_small=TypeError)
  rhs_dil = canonical_ints(fn, "rhs_dilation", rhs_dilation, nsp, default=1, too_small=TypeError)
  k_eff = tuple(dilate_dim(rhs_shape[d], r) for d, r in zip(rhs_spec[2:], rhs_dil))
  in_spatial = tuple(lhs_shape[d] for d in lhs_spec[2:])
  pads = transpose_pads(fn, padding, in_spatial, k_eff, strides, use_consistent_padding)
  kernel_in = rhs_shape[rhs_spec[0] if transpose_kernel else rhs_spec[1]]
  if kernel_in != lhs_shape[lhs_spec[1]]:
    raise ValueError(
      f"{fn}: lhs feature size {lhs_shape[lhs_spec[1]]} must equal the kernel's "
      f"{'output' if transpose_kernel else 'input'}-feature size {kernel_in} "
      f"(transpose_kernel={transpose_kernel}); lhs.shape={lhs_shape}, rhs.shape={rhs_shape}"
    )
  prime_shape = list(rhs_shape)
  if transpose_kernel:
    prime_shape[rhs_spec[0]], prime_shape[rhs_spec[1]] = rhs_shape[rhs_spec[1]], kernel_in
  return conv_spec(fn, lhs_shape, prime_shape, (1,) * nsp, pads, strides, rhs_dil, dnums, 1, 1)


def _transpose_integer(
  lhs, rhs, spec, transpose_kernel, precision, preferred, method, memory_budget
) -> jax.Array:
  # Integers have no autodiff adjoint: lax's own formulation (the fractionally
  # strided conv) through the im2col conv.
  rhs_spec = spec.geometry.dimension_numbers.rhs_spec
  if transpose_kernel:
    rhs = jnp.swapaxes(jnp.flip(rhs, axis=tuple(rhs_spec[2:])), rhs_spec[0], rhs_spec[1])
  return conv_with_spec(lhs, rhs, spec, precision, preferred, method, memory_budget)


def _transpose_by_adjoint(
  fn, lhs, rhs, spec, transpose_kernel, precision, preferred, method, memory_budget
) -> jax.Array:
  # lax computes the fractionally strided conv conv(dilate(x, s), k', pads), with
  # k' = flip+swap(k) if transpose_kernel else k. That is the adjoint of the
  # strided forward conv whose kernel is flip+swap(k'), with forward padding
  # (k_eff - 1 - lo, k_eff - 1 - hi): the adjoint pads its dilated cotangent by
  # exactly (lo, hi). Taking this route runs the GEMM on the undilated input
  # (s^nsp times fewer rows) instead of multiplying inserted zeros.
  g = spec.geometry
  lhs_spec, rhs_spec, out_spec = g.dimension_numbers
  if transpose_kernel:
    forward_rhs_spec = rhs_spec
  else:
    rhs = jnp.flip(rhs, axis=tuple(rhs_spec[2:]))
    forward_rhs_spec = (rhs_spec[1], rhs_spec[0], *rhs_spec[2:])  # swap O and I roles
  forward_dnums = ConvDimensionNumbers(out_spec, forward_rhs_spec, lhs_spec)
  forward_in_shape = layout_shape(
    out_spec, (g.batch, rhs.shape[forward_rhs_spec[1]], *g.out_spatial)
  )
  forward_pads = tuple(
    (k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(g.effective_filter_shape, g.padding)
  )
  if preferred is not None:
    # The adjoint returns the primal dtype; compute in the requested type instead
    # (products of the narrower inputs are exact in it, as in a widening GEMM).
    lhs, rhs = lhs.astype(preferred), rhs.astype(preferred)
  forward_args = (g.lhs_dilation, forward_pads, None, g.rhs_dilation, forward_dnums, 1, 1)
  forward_spec = conv_spec(fn, forward_in_shape, rhs.shape, *forward_args)
  choose_method(forward_spec, method, fn)
  options = (precision, None, method, memory_budget)
  return _adjoint_with_spec(lhs, rhs, forward_spec, forward_in_shape, *options)


def conv_transpose(
  lhs: jax.typing.ArrayLike,
  rhs: jax.typing.ArrayLike,
  strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
  transpose_kernel: bool = False,
  precision: lax.PrecisionLike = None,
  preferred_element_type: jax.typing.DTypeLike | None = None,
  use_consistent_padding: bool = False,
  *,
  method: str | None = None,
  memory_budget: int | None = None,
) -> jax.Array:
  """A drop-in for ``jax.lax.conv_transpose``, computed by the im2col conv.

  Same arguments, defaults and results as lax (including
  ``use_consistent_padding``, PyTorch-style padding meaning). Like lax, it is
  the fractionally strided convolution: the input dilated by ``strides`` and
  convolved with stride 1. With ``transpose_kernel=True`` (and matching
  shapes) it equals :func:`conv_adjoint` of a forward conv with the same
  kernel; prefer :func:`conv_adjoint` when you think of the transposed conv as
  the adjoint of a specific forward conv: it supports groups and any padding.

  Args:
    lhs: input of rank ``n + 2``.
    rhs: kernel of rank ``n + 2``.
    strides: ``n`` fractional strides (the input dilation).
    padding: 'SAME', 'VALID' or ``n`` ``(low, high)`` pairs; pairs are the
      transposed conv's own padding unless ``use_consistent_padding``.
    rhs_dilation: optional ``n`` kernel dilations.
    dimension_numbers: as in lax; defaults to ``NH..C``, ``H..IO``, ``NH..C``.
    transpose_kernel: flip the kernel spatially and swap its I and O axes.
    precision, preferred_element_type: passed to the GEMM.
    use_consistent_padding: read pairs as the forward conv's padding.
    method, memory_budget: keyword-only, as for :func:`conv_general_dilated`.

  Returns:
    The transposed convolution.

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x = jnp.ones((1, 7, 7, 8)); w = jnp.ones((4, 4, 8, 3))
    >>> convmm.conv_transpose(x, w, (2, 2), 'SAME').shape
    (1, 14, 14, 3)
  """
  fn = "conv_transpose"
  lhs_shape, lhs_dtype = shape_of(fn, "lhs", lhs)
  rhs_shape, rhs_dtype = shape_of(fn, "rhs", rhs)
  conv_args = (strides, padding, rhs_dilation, dimension_numbers)
  spec = transpose_spec(
    fn, lhs_shape, rhs_shape, *conv_args, transpose_kernel, use_consistent_padding
  )
  preferred = check_dtypes(fn, lhs_dtype, rhs_dtype, preferred_element_type)
  method, memory_budget = check_method(fn, method, memory_budget)
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  if math.prod(spec.out_shape) == 0:  # as lax: an empty result, nothing to transpose
    return jnp.zeros(spec.out_shape, lhs.dtype if preferred is None else preferred)
  if not jnp.issubdtype(lhs.dtype, jnp.inexact):
    return _transpose_integer(
      lhs, rhs, spec, transpose_kernel, precision, preferred, method, memory_budget
    )
  return _transpose_by_adjoint(
    fn, lhs, rhs, spec, transpose_kernel, precision, preferred, method, memory_budget
  )
