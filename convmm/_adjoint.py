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

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convmm._canonical import (
    ConvDimensionNumbers,
    canonical_dimension_numbers,
    canonical_ints,
    canonical_padding,
    canonical_shape,
)
from convmm._conv import _check_method, choose_method, conv_with_spec
from convmm._shapes import check_same_dtype, conv_spec, layout_shape, shape_of


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
    method: str = "auto",
    memory_budget: int | None = None,
    _fn: str = "conv_adjoint",
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
  fn = _fn
  ct_shape, ct_dtype = shape_of(fn, "cotangent", cotangent)
  rhs_shape, rhs_dtype = shape_of(fn, "rhs", rhs)
  lhs_shape = canonical_shape(fn, "lhs_shape", lhs_shape)
  if not jnp.issubdtype(rhs_dtype, jnp.inexact):
    raise TypeError(
        f"{fn}: the adjoint is computed by autodiff and needs a floating or complex "
        f"dtype, got rhs.dtype={np.dtype(rhs_dtype)}; cast the operands first")
  spec = conv_spec(fn, lhs_shape, rhs_shape, window_strides, padding, lhs_dilation,
                   rhs_dilation, dimension_numbers, feature_group_count,
                   batch_group_count)
  if ct_shape != spec.out_shape:
    raise ValueError(
        f"{fn}: `cotangent` must have the forward output shape {spec.out_shape} for "
        f"lhs_shape={lhs_shape} and rhs.shape={rhs_shape}, got cotangent.shape={ct_shape}")
  method, memory_budget = _check_method(fn, method, memory_budget)
  choose_method(spec, method, fn)
  rhs = jnp.asarray(rhs)
  primal = jax.ShapeDtypeStruct(lhs_shape, rhs_dtype)

  def forward(x):
    return conv_with_spec(x, rhs, spec, precision, preferred_element_type, method,
                          memory_budget)

  # lax's rule: the output has the operands' dtype unless one is preferred.
  out_dtype = (rhs_dtype if preferred_element_type is None
               else jax.dtypes.canonicalize_dtype(preferred_element_type))
  if np.dtype(ct_dtype) != np.dtype(out_dtype):
    raise TypeError(
        f"{fn}: `cotangent` must have the forward output dtype {np.dtype(out_dtype)}, "
        f"got cotangent.dtype={np.dtype(ct_dtype)} (rhs.dtype={np.dtype(rhs_dtype)})")
  (x_bar,) = jax.linear_transpose(forward, primal)(jnp.asarray(cotangent))
  return x_bar


def _transpose_padding(k: int, s: int, padding: Any) -> tuple[int, int]:
  # lax's rule (jax/_src/lax/convolution.py, _conv_transpose_padding): the pads of
  # the stride-1 conv over the s-dilated input that make this the gradient of a
  # forward conv with the given padding.
  if padding == "SAME":
    pad_len = k + s - 2
    pad_a = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
  elif padding == "VALID":
    pad_len = k + s - 2 + max(k - s, 0)
    pad_a = k - 1
  else:
    pads = tuple(k - p - 1 for p in padding)
    pad_a, pad_len = pads[0], sum(pads)
  return pad_a, pad_len - pad_a


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
    method: str = "auto",
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
  ndim = len(lhs_shape)
  if dimension_numbers is None:
    if ndim < 2 or ndim > 5:
      raise ValueError(
          f"{fn}: `dimension_numbers` has no default for rank-{ndim} inputs "
          f"(lhs.shape={lhs_shape}); pass it explicitly")
    spatial = "HWD"[: ndim - 2]
    dimension_numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  dnums = canonical_dimension_numbers(fn, ndim, len(rhs_shape), dimension_numbers)
  nsp = ndim - 2
  strides = canonical_ints(fn, "strides", strides, nsp)
  rhs_dil = canonical_ints(fn, "rhs_dilation", rhs_dilation, nsp, default=1)
  k_eff = [(rhs_shape[d] - 1) * r + 1 for d, r in zip(dnums.rhs_spec[2:], rhs_dil)]
  lhs_spec, rhs_spec, out_spec = dnums
  in_spatial = [lhs_shape[d] for d in lhs_spec[2:]]
  if padding in ("SAME", "VALID"):
    pads = tuple(_transpose_padding(k, s, padding) for k, s in zip(k_eff, strides))
  elif isinstance(padding, str):
    # Like lax, any other string is the padding of the stride-1 conv over the
    # dilated input, which only exists when nothing is dilated.
    if any(s != 1 for s in strides):
      raise ValueError(
          f"{fn}: `padding`={padding!r} needs `strides` of 1, got strides={strides}; "
          f"only 'SAME' and 'VALID' (upper case, as in lax) describe a strided forward conv")
    pads = canonical_padding(fn, padding, in_spatial, k_eff, (1,) * nsp, strides)
  else:
    pads = canonical_padding(fn, padding, in_spatial, k_eff, (1,) * nsp, (1,) * nsp)
    if use_consistent_padding:
      pads = tuple(_transpose_padding(k, s, p) for k, s, p in zip(k_eff, strides, pads))
  check_same_dtype(fn, lhs_dtype, rhs_dtype)
  kernel_in = rhs_shape[rhs_spec[0] if transpose_kernel else rhs_spec[1]]
  if kernel_in != lhs_shape[lhs_spec[1]]:
    raise ValueError(
        f"{fn}: lhs feature size {lhs_shape[lhs_spec[1]]} must equal the kernel's "
        f"{'output' if transpose_kernel else 'input'}-feature size {kernel_in} "
        f"(transpose_kernel={transpose_kernel}); lhs.shape={lhs_shape}, rhs.shape={rhs_shape}")
  # lax computes the fractionally strided conv conv(dilate(x, s), k', pads), with
  # k' = flip+swap(k) if transpose_kernel else k. That is the adjoint of the
  # strided forward conv whose kernel is flip+swap(k'), with forward padding
  # (k_eff - 1 - lo, k_eff - 1 - hi): the adjoint pads its dilated cotangent by
  # exactly (lo, hi). Taking this route runs the GEMM on the undilated input
  # (s^nsp times fewer rows) instead of multiplying inserted zeros.
  # The fractionally strided conv, validated by the one shape rule (k' has I and O
  # swapped when transpose_kernel).
  prime_shape = list(rhs_shape)
  if transpose_kernel:
    prime_shape[rhs_spec[0]], prime_shape[rhs_spec[1]] = rhs_shape[rhs_spec[1]], kernel_in
  spec = conv_spec(fn, lhs_shape, prime_shape, (1,) * nsp, pads, strides, rhs_dil, dnums, 1, 1)
  rhs = jnp.asarray(rhs)
  if not jnp.issubdtype(rhs.dtype, jnp.inexact) and preferred_element_type is None:
    # Integers have no autodiff adjoint: run lax's own formulation through the
    # im2col conv.
    if transpose_kernel:
      rhs = jnp.swapaxes(jnp.flip(rhs, axis=tuple(rhs_spec[2:])), rhs_spec[0], rhs_spec[1])
    method, memory_budget = _check_method(fn, method, memory_budget)
    return conv_with_spec(jnp.asarray(lhs), rhs, spec, precision, None, method, memory_budget)
  if transpose_kernel:
    forward_rhs_spec = rhs_spec
  else:
    rhs = jnp.flip(rhs, axis=tuple(rhs_spec[2:]))
    forward_rhs_spec = (rhs_spec[1], rhs_spec[0], *rhs_spec[2:])  # swap O and I roles
  forward_dnums = ConvDimensionNumbers(out_spec, forward_rhs_spec, lhs_spec)
  out_features = rhs_shape[forward_rhs_spec[1]]
  forward_in_shape = layout_shape(out_spec, (lhs_shape[lhs_spec[0]], out_features,
                                             *spec.geometry.out_spatial))
  forward_pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(k_eff, pads))
  lhs = jnp.asarray(lhs)
  if preferred_element_type is not None:
    # The adjoint returns the primal dtype; compute in the requested type instead
    # (products of the narrower inputs are exact in it, as in a widening GEMM).
    lhs, rhs = lhs.astype(preferred_element_type), rhs.astype(preferred_element_type)
  return conv_adjoint(lhs, rhs, forward_in_shape, strides, forward_pads,
                      rhs_dilation=rhs_dil, dimension_numbers=forward_dnums,
                      precision=precision, method=method, memory_budget=memory_budget,
                      _fn=fn)
