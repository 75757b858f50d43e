"""Spatial blocks: a tiled layout that keeps spatially sharded axes sharded.

A tile loop (:func:`convmm._engine.tiling.tiled`) that cuts its windows out of an
axis sharded over devices with ``lax.dynamic_slice`` makes XLA's SPMD
partitioner gather that axis on every device. On explicit mesh axes the tile
planner sees the sharding and does not split such an axis; on an Auto mesh a
traced input does not say how it is sharded. So with several devices, a tiled
spatial dimension ``d`` of ``size`` input positions is viewed as
``(blocks, size // blocks)``: contiguous blocks (a major axis, whole in every
tile, so it stays sharded wherever the input was) of positions (a minor axis,
the one the tile loop slices). The block counts divide the number of devices,
so the blocks line up with any even split of the axis over a divisor of it.
Batch chunks solve the same problem for the batch (chunks of every ``nb``-th
sample, a multiple of a divisor of the devices; see :func:`convmm._engine.tiling.tiled`).

Block ``i`` computes the ``size // blocks // stride`` outputs whose windows
start in it; the window also reads a halo from the neighbouring blocks (its
low padding's worth from the previous one, ``k_eff - stride - low`` positions
from the next one), taken with static shifts along the block axis, which XLA
partitions as collective-permutes. Outputs past the end (when the blocks cover
more outputs than the convolution has) are computed from zeros and dropped.
A tile convolves the same positions of every block: the convolution is
vmapped over the block axes, moved in front of the batch so that the patches
need no transpose (the blocks become the major part of the GEMM's rows).

Where the blocks cannot line up (a size the block count does not divide, a
stride that does not divide a block, a halo wider than a block, or more
outputs than ``size // stride``) the dimension is tiled as on one device, and
a sharded axis is gathered. The input gradient of a unit-stride conv with more
outputs than inputs (that of a ``VALID`` conv) is instead computed through the
forward's blocks (:func:`input_grad`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._rules.shapes import ConvSpec

_BLOCKED_DIMS = 2  # rows and columns: the dimensions the planner tiles


def halo(spec: ConvSpec, d: int, blocks: int) -> tuple[int, int, int]:
  """Input positions per block along ``d``, and those its window reads before and after it."""
  g = spec.geometry
  lo = g.padding[d][0]
  return g.in_spatial[d] // blocks, lo, g.effective_filter_shape[d] - g.window_strides[d] - lo


def spatial_blocks(spec: ConvSpec, devices: int) -> tuple[int, ...]:
  """Blocks along each spatial dimension when it is tiled: ``devices`` or its largest
  divisor that divides the dimension into blocks of whole strides, covers every output
  and takes each halo from one neighbour; 1 (none) without several devices.
  """
  g = spec.geometry
  if devices < 2 or spec.batch_group_count > 1:
    return (1,) * g.num_spatial

  def fits(d: int, blocks: int) -> bool:
    size, stride = g.in_spatial[d], g.window_strides[d]
    per_block, before, after = halo(spec, d, blocks)
    return (
      size % blocks == 0
      and per_block % stride == 0
      and max(before, after) <= per_block
      and per_block >= max(-before, 0) + max(-after, 0)
      and g.out_spatial[d] <= size // stride
    )

  divisors = [m for m in range(devices, 1, -1) if devices % m == 0]
  return tuple(
    next((m for m in divisors if fits(d, m)), 1) if d < _BLOCKED_DIMS else 1
    for d in range(g.num_spatial)
  )


def extent(spec: ConvSpec, blocks: tuple[int, ...]) -> tuple[int, ...]:
  """Outputs per block along each dimension (all outputs where not blocked)."""
  g = spec.geometry
  return tuple(
    halo(spec, d, m)[0] // g.window_strides[d] if m > 1 else out
    for d, (m, out) in enumerate(zip(blocks, g.out_spatial))
  )


def axes(blocks: tuple[int, ...]) -> list[int]:
  """Axis of each spatial dimension in the view ``(N, [blocks, per_block] or size..., C)``."""
  pos, axis = [], 1
  for m in blocks:
    axis += m > 1
    pos.append(axis)
    axis += 1
  return pos


def view(a: jax.Array, blocks: tuple[int, ...], sizes: tuple[int, ...]) -> jax.Array:
  """``(N, *spatial, C)`` zero-extended to ``sizes``, then split into blocks (:func:`axes`)."""
  if any(s > n for s, n in zip(sizes, a.shape[1:-1])):
    a = jnp.pad(a, [(0, 0), *((0, s - n) for s, n in zip(sizes, a.shape[1:-1])), (0, 0)])
  shape = [s for m, s in zip(blocks, sizes) for s in ((m, s // m) if m > 1 else (s,))]
  return a.reshape(a.shape[0], *shape, a.shape[-1])


def padded_view(x: jax.Array, spec: ConvSpec, blocks: tuple[int, ...]) -> jax.Array:
  """``x`` as ``(N, [blocks, window] or size..., C)``: every block with the padded window it reads.

  Along each blocked dimension, a block's window is the previous block's last
  positions (zeros before the first block: the low padding), the block's own
  positions and the next block's first ones (zeros after the last). Built once
  (XLA hoists it out of the tile loop anyway): an input-sized copy plus halos.
  """
  pos = axes(blocks)
  zero = jnp.zeros((), x.dtype)
  a = view(x, blocks, spec.geometry.in_spatial)
  for d in (d for d, m in enumerate(blocks) if m > 1):
    ax, per_block = pos[d], a.shape[pos[d]]
    _, before, after = halo(spec, d, blocks[d])
    shift = lambda part, lo, hi, ax=ax: lax.pad(
      part, zero, [(lo, hi, 0) if i == ax - 1 else (0, 0, 0) for i in range(part.ndim)]
    )
    parts = [lax.slice_in_dim(a, max(-before, 0), per_block - max(-after, 0), axis=ax)]
    if before > 0:
      prev = lax.slice_in_dim(a, 0, a.shape[ax - 1] - 1, axis=ax - 1)
      parts.insert(0, shift(lax.slice_in_dim(prev, per_block - before, per_block, axis=ax), 1, 0))
    if after > 0:
      nxt = lax.slice_in_dim(a, 1, a.shape[ax - 1], axis=ax - 1)
      parts.append(shift(lax.slice_in_dim(nxt, 0, after, axis=ax), 0, 1))
    a = parts[0] if len(parts) == 1 else lax.concatenate(parts, ax)
  return a


def block_axes(blocks: tuple[int, ...]) -> list[int]:
  """The block axes of the view (see :func:`axes`)."""
  return [p - 1 for p, m in zip(axes(blocks), blocks) if m > 1]


def leading(a: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
  """A view-shaped tile with its block axes moved to the front."""
  return jnp.moveaxis(a, block_axes(blocks), list(range(len(block_axes(blocks)))))


def back(a: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`leading`."""
  return jnp.moveaxis(a, list(range(len(block_axes(blocks)))), block_axes(blocks))


def over_blocks(fn: Any, blocks: tuple[int, ...]) -> Any:
  """``fn`` vmapped over the leading block axes of its operands (outputs: blocks first).

  Leading, so that vmapping the unfolding and the GEMM moves no patches: the
  blocks become the major part of the GEMM's rows.
  """
  for _ in block_axes(blocks):
    fn = jax.vmap(fn)
  return fn


def input_grad(
  ct: jax.Array, spec: ConvSpec, blocks: tuple[int, ...], grad: Callable[..., jax.Array]
) -> jax.Array:
  """The input gradient of unit-stride ``spec`` through its blocked layout.

  Its own input gradient may have more outputs than inputs (``VALID``), which
  cannot be blocked. The gradient with respect to the blocks' padded windows
  (:func:`padded_view`) can: each block's cotangent, followed by ``k_eff - 1``
  zeros, laid side by side along its dimension (the block axis stays major, so
  it stays sharded), is the cotangent of one convolution padded by
  ``(0, k_eff - 1)`` whose input gradient ``grad(ct, spec)`` has as many outputs
  as inputs, every block's window. The windows' halos are then summed back into
  their neighbours by the transpose of :func:`padded_view` (static shifts).
  """
  g = spec.geometry
  pos, per_block = axes(blocks), extent(spec, blocks)
  cut = [m > 1 for m in blocks]
  sizes = tuple(m * e if c else o for c, m, e, o in zip(cut, blocks, per_block, g.out_spatial))
  ct = view(ct, blocks, sizes)  # (N, [blocks, outputs] or size..., O)
  kernel = g.effective_filter_shape
  gaps = {pos[d]: kernel[d] - 1 for d in range(g.num_spatial) if cut[d]}
  ct = jnp.pad(ct, [(0, gaps.get(a, 0)) for a in range(ct.ndim)])
  window = tuple(e + k - 1 if c else n for c, e, k, n in zip(cut, per_block, kernel, g.in_spatial))
  flat = tuple(m * w if c else n for c, m, w, n in zip(cut, blocks, window, g.in_spatial))
  geometry = dataclasses.replace(
    g,
    in_spatial=flat,
    padding=tuple((0, k - 1) if c else p for c, k, p in zip(cut, kernel, g.padding)),
    out_spatial=tuple(f if c else o for c, f, o in zip(cut, flat, g.out_spatial)),
  )
  ct = ct.reshape(ct.shape[0], *geometry.out_spatial, ct.shape[-1])
  dv = grad(ct, dataclasses.replace(spec, geometry=geometry))
  dv = view(dv, blocks, flat)  # (N, [blocks, window] or size..., C)
  x_aval = jax.ShapeDtypeStruct((g.batch, *g.in_spatial, dv.shape[-1]), dv.dtype)
  (dx,) = jax.linear_transpose(lambda x: padded_view(x, spec, blocks), x_aval)(dv)
  return dx
