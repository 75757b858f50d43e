"""The convolutions and GEMMs of the convolution's backward pass on canonical operands.

The input gradient as lax's convolution of the cotangent (:func:`input_grad_spec`)
or, unit-stride, im2col of the cotangent + one GEMM (:func:`input_grad_gemm`); of a
strided convolution as ``cotangent @ kernel^T`` summed back into place (col2im, the
transpose of im2col). The kernel gradient as one GEMM ``patches^T @ cotangent`` per
group, with the patches rebuilt from the input, or ``x^T @`` the cotangent's patches;
depthwise, as per-tap sums. :mod:`convmm._engine.autodiff` decides when each is used
and how the work is tiled, asking :mod:`convmm._engine.policy` where a choice was
measured. Operands are canonical: input ``(N, *spatial, C)``, kernel
``(*window, C // groups, O)``, cotangent ``(N // batch_groups, *out, O)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._engine import policy
from convmm._engine.budget import budget_or_current
from convmm._engine.chunks import batch_chunk
from convmm._engine.im2col import (
  feature_groups_first,
  pad_input,
  patches_channels_last,
  patches_taps_first,
  tap_offsets,
)
from convmm._engine.plans import tile_cost
from convmm._engine.sharding import sharding_of
from convmm._rules.canonical import dilate_dim
from convmm._rules.dimension_numbers import channels_last_dimension_numbers
from convmm._rules.shapes import ConvSpec, conv_spec


def split_axis(a: jax.Array, axis: int, parts: int) -> jax.Array:
  """``a`` with ``axis`` split into ``(parts, size // parts)``."""
  return a.reshape(*a.shape[:axis], parts, a.shape[axis] // parts, *a.shape[axis + 1 :])


def _patch_cotangent(ct, w, spec, precision, acc_dtype):
  """``ct @ w^T`` per group: the cotangent of the patch matrix, ``(N, *out, T, C)``."""
  g = spec.geometry
  nsp, t = g.num_spatial, g.num_taps
  groups, bg = spec.feature_group_count * spec.batch_group_count, spec.batch_group_count
  if groups == 1:
    return lax.dot_general(
      ct,
      w.reshape(t, *w.shape[-2:]),
      (((nsp + 1,), (2,)), ((), ())),
      precision=precision,
      preferred_element_type=acc_dtype,
    )
  w = w.reshape(t, w.shape[-2], groups, w.shape[-1] // groups)  # (T, cg, G, og)
  ct = split_axis(ct, nsp + 1, groups)  # (N', *out, G, og)
  dp = lax.dot_general(
    ct,
    w,
    (((nsp + 2,), (3,)), ((nsp + 1,), (2,))),
    precision=precision,
    preferred_element_type=acc_dtype,
  )  # (G, N', *out, T, cg)
  if bg > 1:  # batch groups: the group axis is the batch's major part
    return dp.reshape(-1, *dp.shape[2:])
  dp = jnp.moveaxis(dp, 0, -2)
  return dp.reshape(*dp.shape[:-2], -1)


def _lhs_transpose_padding(spec: ConvSpec) -> tuple[tuple[int, int], ...]:
  # lax's _conv_general_vjp_lhs_padding: the input gradient is a conv of the
  # cotangent dilated by the strides; its low pad is k_eff - 1 - lo, and the high
  # pad restores the input rows the forward windows never reached.
  g = spec.geometry
  pads = []
  for size, k_eff, s, out, (lo, _), d in zip(
    g.in_spatial,
    g.effective_filter_shape,
    g.window_strides,
    g.out_spatial,
    g.padding,
    g.lhs_dilation,
  ):
    in_dilated, out_dilated = dilate_dim(size, d), dilate_dim(out, s)
    before = k_eff - 1 - lo
    pads.append((before, in_dilated + k_eff - 1 - out_dilated - before))
  return tuple(pads)


def input_grad_spec(spec: ConvSpec, ct_shape, w_shape) -> ConvSpec:
  """The input gradient's convolution of the cotangent (lax's), for the forward kernel's shape.

  Its kernel is the forward's flipped, with the groups moved from the output
  features into the input features: ``(*k, cg, O)`` -> ``(*k, O // G, G * cg)``.
  """
  g = spec.geometry
  groups = spec.feature_group_count * spec.batch_group_count
  *window, cg, o = w_shape
  return conv_spec(
    "conv_general_dilated",
    ct_shape,
    (*window, o // groups, groups * cg),
    g.lhs_dilation,
    _lhs_transpose_padding(spec),
    g.window_strides,
    g.rhs_dilation,
    channels_last_dimension_numbers(g.num_spatial),
    groups,
    1,
  )


def input_grad_col2im(
  ct: jax.Array, w: jax.Array, spec: ConvSpec, precision: Any, acc_dtype: Any
) -> jax.Array:
  """Input gradient as the GEMM ``ct @ w^T`` summed back into place (col2im)."""
  # 16-bit cotangents: the overlapping windows are summed in the float32 accumulator.
  dp = _patch_cotangent(ct, w, spec, precision, acc_dtype)
  g = spec.geometry
  primal = jax.ShapeDtypeStruct((g.batch, *g.in_spatial, g.in_features), dp.dtype)
  (dx,) = jax.linear_transpose(lambda x: patches_channels_last(x, g), primal)(dp)
  return dx


def input_grad_gemm(
  ct: jax.Array, w_cto: jax.Array, spec: ConvSpec, precision: Any, acc_dtype: Any
) -> jax.Array:
  """A unit-stride input gradient as im2col of the cotangent + one GEMM, no kernel flip.

  ``spec`` is the input gradient's own convolution of ``ct`` (lax's: padded by
  ``k_eff - 1 - low``, strided by the forward's input dilation) and ``w_cto``
  the forward kernel as ``(C, T * O)``. Its flipped, I/O-swapped kernel is never
  built: the patches take their taps in reverse order instead, and the GEMM
  contracts the kernel's minor axis (a GEMM with a transposed right operand),
  so the only copy of the kernel moves whole output-feature rows.
  """
  patches = patches_channels_last(ct, spec.geometry, reverse_taps=True)  # (N, *in, T, O)
  patches = patches.reshape(*patches.shape[:-2], -1)
  return lax.dot_general(
    patches,
    w_cto,
    (((patches.ndim - 1,), (1,)), ((), ())),
    precision=precision,
    preferred_element_type=acc_dtype,
  )


def grad_batch_chunk(spec: ConvSpec, x: jax.Array, itemsize: int, budget: int | None) -> int:
  """Samples per chunk so that a chunk's working set (two patch copies) fits the budget."""
  g = spec.geometry
  copies = policy.KERNEL_GRAD_PATCH_COPIES
  sample = tile_cost(spec, itemsize, 1, g.out_spatial, patch_copies=copies, out_itemsize=itemsize)
  return batch_chunk(g.batch, budget_or_current(budget) // max(sample, 1), sharding_of(x)[0])


def _replicated_gemm(ct: jax.Array, precision: Any, acc_dtype: Any) -> Any:
  """A kernel gradient's ``lax.dot_general``: replicated, even for a sharded batch (lax's rule)."""
  mesh = jax.typeof(ct).sharding.mesh
  out_sharding = (
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if jax.sharding.AxisType.Explicit in mesh.axis_types
    else None
  )
  return functools.partial(
    lax.dot_general,
    precision=precision,
    preferred_element_type=acc_dtype,
    out_sharding=out_sharding,
  )


def kernel_grad_from_cotangent_patches(
  x: jax.Array,
  ct: jax.Array,
  spec: ConvSpec,
  t_spec: ConvSpec,
  reverse_taps: bool,
  precision: Any,
  acc_dtype: Any,
) -> jax.Array:
  """A unit-stride kernel gradient as ``x^T @ ct_patches``, as ``(*window, C, O)``.

  ``ct_patches`` are the input gradient's patches of the cotangent (``t_spec``
  is its convolution, lax's transpose one), built exactly as the input gradient
  builds them (:func:`input_grad_gemm`, or the im2col of that convolution),
  taps reversed or not, so that XLA computes them once for both: ``(N, *in, T, O)``, whose entry
  ``[n, i, t, o]`` is the cotangent of the output that forward tap ``t``
  (counted from the end unless ``reverse_taps``) reached from input position
  ``i`` (zero where none did). So
  ``dw[t, c, o] = sum_{n, i} x[n, i, c] * ct_patches[n, i, t, o]``: one GEMM
  contracting the batch and input positions (no feature or batch groups).
  """
  g = spec.geometry
  ct_patches = patches_channels_last(ct, t_spec.geometry, reverse_taps=reverse_taps)
  axes = tuple(range(g.num_spatial + 1))  # (N, *in)
  gemm = _replicated_gemm(ct_patches, precision, acc_dtype)
  dw = gemm(x, ct_patches, ((axes, axes), ((), ())))  # (C, T, O)
  if not reverse_taps:
    dw = jnp.flip(dw, 1)
  return jnp.moveaxis(dw, 0, 1).reshape(*g.filter_shape, *dw.shape[::2])


def kernel_grad(
  x: jax.Array,
  ct: jax.Array,
  spec: ConvSpec,
  precision: Any,
  acc_dtype: Any,
  taps_first: bool = False,
) -> jax.Array:
  """``patches^T @ ct`` per group (one GEMM), as ``(*window, cg, O)``.

  With ``taps_first`` (no feature or batch groups), the patches are built
  transposed, ``(T, C, N, *out)`` (:func:`convmm._engine.im2col.patches_taps_first`):
  the GEMM then needs no operand transposed and gives the kernel's layout.
  Otherwise they are the forward's channels-last patches (which XLA computes once
  for both where neither is tiled); the policy chooses
  (:func:`convmm._engine.policy.kernel_grad_taps_first`).
  """
  g = spec.geometry
  nsp, t = g.num_spatial, g.num_taps
  fg, bg = spec.feature_group_count, spec.batch_group_count
  groups = fg * bg
  gemm = _replicated_gemm(ct, precision, acc_dtype)
  o = ct.shape[-1]
  axes = tuple(range(nsp + 1))  # (N, *out): multi-axis, so XLA canonicalises it for YNNPACK
  if groups == 1 and taps_first:
    pt = patches_taps_first(x, g)  # (T, C, N, *out)
    dw = gemm(pt, ct, ((tuple(a + 2 for a in axes), axes), ((), ())))  # (T, C, O)
    return dw.reshape(*g.filter_shape, -1, o)
  if fg > 1:  # (G * N, *sp, cg): one patch matrix per group
    x = feature_groups_first(x, fg)
    x = x.reshape(-1, *x.shape[2:])
  patches = patches_channels_last(
    x, dataclasses.replace(g, batch=x.shape[0], in_features=x.shape[-1])
  )  # (G*N or N, *out, T, cg)
  m = math.prod(ct.shape[:-1])
  k = t * patches.shape[-1]
  # Either operand may go first (:func:`convmm._engine.policy.kernel_grad_patches_first`).
  if groups == 1:
    patches = patches.reshape(*patches.shape[:-2], -1)
    dims = (axes, axes), ((), ())
    if policy.kernel_grad_patches_first(m, k, o):
      return gemm(patches, ct, dims).reshape(*g.filter_shape, -1, o)
    # (O, K) -> (T, cg, O) through a reshape: XLA then keeps the GEMM's own output
    # layout (a transposed output layout falls back to a GEMM without bf16 x bf16 -> f32).
    dw = gemm(ct, patches, dims).reshape(o, t, -1)
    return jnp.transpose(dw, (1, 2, 0)).reshape(*g.filter_shape, -1, o)
  patches = patches.reshape(groups, m, k)  # group-major rows
  ct = split_axis(ct, nsp + 1, groups).reshape(m, groups, -1)
  dw = gemm(ct, patches, (((0,), (1,)), ((1,), (0,))))  # (G, og, K)
  dw = jnp.transpose(dw.reshape(groups, dw.shape[1], t, -1), (2, 3, 0, 1))  # (T, cg, G, og)
  return dw.reshape(*g.filter_shape, dw.shape[1], -1)


def depthwise_kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec, acc_dtype: Any) -> jax.Array:
  """The kernel gradient of a depthwise convolution, ``(*window, 1, O)``, without patches.

  Per tap, the sum over the batch and the output positions of the tap's slice
  of the padded input times the cotangent, in the accumulator dtype (as the
  forward's multiply-accumulate): ``dw[t, c, j] = sum(x_t[..., c] * ct[..., c, j])``.

  One loop over the taps (``lax.map``), whose step cuts its tap's operand at a
  dynamic offset: one tap's product exists at a time, and the taps share one
  compiled step (with static slices XLA's scheduler made every tap's slice in
  the forward pass and kept them for this one; measured in
  :mod:`convmm._engine.policy`). With unit strides the input is
  read in place and the cotangent is the one sliced
  (:func:`_flat_depthwise_kernel_grad`); otherwise each step cuts a strided
  window of the padded input, which XLA copies before summing.
  """
  g = spec.geometry
  nsp, c, o = g.num_spatial, g.in_features, ct.shape[-1]
  acc = acc_dtype or ct.dtype
  ct = ct.astype(acc).reshape(*ct.shape[:-1], c, o // c)  # O = c * multiplier + j
  flat = (
    nsp > 0
    and all(s == 1 for s in (*g.window_strides, *g.lhs_dilation))
    and all(out <= size for out, size in zip(g.out_spatial[1:], g.in_spatial[1:]))
    and not sharding_of(x)[1] - {0}  # explicitly split minor spatial axes cannot be flattened
  )
  if flat:
    return _flat_depthwise_kernel_grad(x.astype(acc), ct, spec).reshape(*g.filter_shape, 1, o)
  x_padded = pad_input(x.astype(acc), g)
  spans = [(out - 1) * s + 1 if out else 0 for out, s in zip(g.out_spatial, g.window_strides)]
  offsets = jnp.asarray(tap_offsets(g), jnp.int32).reshape(g.num_taps, nsp)  # (1, 0) for 0-D

  def tap(offset):
    zero = jnp.zeros((), offset.dtype)
    window = lax.dynamic_slice(x_padded, (zero, *offset, zero), (x_padded.shape[0], *spans, c))
    x_t = lax.slice(window, (0,) * window.ndim, window.shape, (1, *g.window_strides, 1))
    return jnp.sum(x_t[..., None] * ct, axis=tuple(range(1 + nsp)))

  return lax.map(tap, offsets).reshape(*g.filter_shape, 1, o)


def _flat_depthwise_kernel_grad(x: jax.Array, ct: jax.Array, spec: ConvSpec) -> jax.Array:
  """A unit-stride depthwise kernel gradient on flattened positions, ``(T, C, mult)``.

  Tap ``t`` pairs input position ``r`` with output ``r + lo - offset_t`` (where
  that is an output). Both are flattened on the input's grid (the cotangent's
  minor spatial dimensions zero-extended to the input's), so the pairing is a
  constant shift of the flat position: each step multiplies the whole input,
  read in place, with a contiguous run of the cotangent, and selects the
  pairs whose output exists (the others, which a shift wraps across rows,
  are never multiplied into the sum, so an infinite input stays out of taps
  that never read it, as in lax). Faster than strided windows of the padded
  input (see :mod:`convmm._engine.policy`).
  """
  g = spec.geometry
  n, *size, c = x.shape
  mult = ct.shape[-1]
  strides = [math.prod(size[d + 1 :]) for d in range(len(size))]  # of the input's flat grid
  x_flat = x.reshape(n, -1, c)
  extend = [(0, 0, 0)] + [(0, s - out, 0) for s, out in zip(size[1:], g.out_spatial[1:])]
  ct_grid = lax.pad(ct, jnp.zeros((), ct.dtype), [(0, 0, 0), *extend, (0, 0, 0), (0, 0, 0)])
  # Tap t reads the cotangent at flat r + shift[t]; pad so that every shift stays inside.
  lows = [[lo - o for (lo, _), o in zip(g.padding, off)] for off in tap_offsets(g)]
  shifts = [sum(d * s for d, s in zip(low, strides)) for low in lows]
  length, grid = x_flat.shape[1], math.prod(ct_grid.shape[1:-2])
  lead, tail = max(0, -min(shifts)), max(0, length + max(shifts) - grid)
  ct_flat = jnp.pad(ct_grid.reshape(n, grid, c, mult), ((0, 0), (lead, tail), (0, 0), (0, 0)))
  flat = lax.iota(jnp.int32, length)
  positions = [(flat // s) % extent for s, extent in zip(strides, size)]

  def tap(step):
    start, low = step
    inside = jnp.ones((length,), bool)
    for d, (pos, out) in enumerate(zip(positions, g.out_spatial)):
      inside &= (pos + low[d] >= 0) & (pos + low[d] < out)
    ct_t = lax.dynamic_slice_in_dim(ct_flat, start, length, 1)
    product = x_flat[..., None] * ct_t
    product = jnp.where(inside[None, :, None, None], product, jnp.zeros((), ct.dtype))
    return jnp.sum(product, axis=(0, 1))

  steps = (jnp.asarray([lead + s for s in shifts], jnp.int32), jnp.asarray(lows, jnp.int32))
  return lax.map(tap, steps)
