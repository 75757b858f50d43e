"""The tile loops: a convolution beyond the memory budget, computed tile by tile.

A plan (:mod:`convmm._engine.plans`) says how large a tile is; here one
``lax.scan`` body, shared by all tiles, cuts a tile's input window out of the
unpadded input with ``lax.dynamic_slice`` and convolves it. Only one tile's window
and patches exist at a time, tracing and compiling do not grow with the number of
tiles, and output sizes need not divide evenly (the last tile along a dimension is
moved back to end at the edge). Batch chunks take every ``nb``-th sample
(``x.reshape(b, nb, ...)``) so that a batch sharded over devices stays sharded
inside every tile; spatial blocks (:mod:`convmm._engine.blocks`) do the same for
spatially sharded inputs on Auto meshes.

Two forms share the loop: :func:`tiled` writes each tile's output in place (a
forward convolution), :func:`tiled_sum` sums what each tile gives (a kernel
gradient).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._engine import blocks as _blocks
from convmm._engine.plans import TilePlan, plan_for, window_extent
from convmm._engine.policy import FORWARD_PATCH_COPIES
from convmm._engine.sharding import explicit_spec, unknown_split
from convmm._rules.shapes import ConvSpec


def _zero_extended_window(x: jax.Array, axis: int, start: jax.Array, size: int) -> jax.Array:
  """``x[start:start + size]`` along ``axis``, zeros where the range leaves ``x``.

  ``start`` is traced and may be negative or run past the end (the padding).
  """
  length = x.shape[axis]
  if length < size:  # the window is mostly padding: make room once
    x = lax.pad(
      x, jnp.zeros((), x.dtype), [(0, size - length if a == axis else 0, 0) for a in range(x.ndim)]
    )
    length = size
  clamped = jnp.clip(start, 0, length - size)
  part = lax.dynamic_slice_in_dim(x, clamped, size, axis)
  # Shift by start - clamped, filling with zeros. A window wholly outside ``x``
  # (a tile of outputs that read only padding) shifts by ``size`` or more: the
  # shift is clipped to [-size, size], a slice of zeros only. (Unclipped, a
  # negative index would wrap around: dynamic_slice reads index ``i < 0`` as
  # ``i + len``, and the tile would read data from the far end.)
  part = lax.pad(
    part,
    jnp.zeros((), x.dtype),
    [(size, size, 0) if a == axis else (0, 0, 0) for a in range(x.ndim)],
  )
  shift = jnp.clip(start - clamped, -size, size)
  return lax.dynamic_slice_in_dim(part, size + shift, size, axis)


@dataclasses.dataclass(frozen=True)
class _TileLoop:
  """A plan's tile loop: where a step's window and output are, shared by both forms.

  A step's operands are views ``(N, [blocks, window] or size..., C)``
  (:mod:`convmm._engine.blocks`), cut into batch chunks: chunk ``k`` holds samples
  ``k, k + nb, ...``, so the major (possibly sharded) batch axis stays whole and the
  chunk index is a minor axis. One chunk is the whole batch, not reshaped (XLA would
  copy it for the layout).
  """

  spec: ConvSpec
  plan: TilePlan
  tile_spec: ConvSpec  # a tile's convolution: its window, padded by compute where not tiled
  blocks: tuple[int, ...]  # blocks along each spatial dimension, 1 where not blocked
  blocked: list[int]  # the blocked dimensions
  tiles: list[int]  # the dimensions cut into windows (split or blocked)
  extent: tuple[int, ...]  # outputs a tile loop walks along each dimension (per block)
  pos: list[int]  # axis of each spatial dimension in a step's operands
  nb: int  # batch chunks

  def chunks_of(self, a: jax.Array) -> jax.Array:
    return a if self.nb == 1 else a.reshape(self.plan.batch, self.nb, *a.shape[1:])

  def chunk_of(self, a: jax.Array, chunk: jax.Array) -> jax.Array:
    return a if self.nb == 1 else lax.dynamic_index_in_dim(a, chunk, axis=1, keepdims=False)

  def input_chunks(self, x_cl: jax.Array) -> jax.Array:
    """The input's view, chunked; blocked, every block with its padded window."""
    # The block axes stay separate (and sharded): compute is vmapped over them.
    x_view = _blocks.padded_view(x_cl, self.spec, self.blocks) if self.blocked else x_cl
    return self.chunks_of(x_view)

  def over_blocks(self, compute: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``compute(*operands, tile_spec)``, vmapped over the block axes where blocked."""
    if not self.blocked:
      return compute
    blocks, tile_spec = self.blocks, self.tile_spec
    return lambda *a: _blocks.over_blocks(lambda *ops: compute(*ops, tile_spec), blocks)(
      *(_blocks.leading(op, blocks) for op in a[:-1])
    )

  def out_starts(self, position: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """Tile ``position``'s first output and index along each dimension.

    The last tile along a dimension is moved back to end at the edge.
    """
    counts, tile_out = self.plan.counts, self.plan.tile_out
    starts, indices = [], []
    for d in reversed(range(len(counts))):
      position, i = jnp.divmod(position, counts[d])
      starts.append(jnp.minimum(i * tile_out[d], self.extent[d] - tile_out[d]))
      indices.append(i)
    return starts[::-1], indices[::-1]

  def window_of(self, x_chunks: jax.Array, chunk: jax.Array, starts: list[jax.Array]) -> jax.Array:
    """The padded input window of the tile at ``starts`` in batch chunk ``chunk``."""
    g, window = self.spec.geometry, self.tile_spec.geometry.in_spatial
    x = self.chunk_of(x_chunks, chunk)
    for d in self.tiles:
      if d in self.blocked:  # a block's window is padded already
        x = lax.dynamic_slice_in_dim(x, starts[d] * g.window_strides[d], window[d], self.pos[d])
      else:
        start = starts[d] * g.window_strides[d] - g.padding[d][0]
        x = _zero_extended_window(x, self.pos[d], start, window[d])
    return x

  def at(self, starts: list[jax.Array], zero: jax.Array) -> list[jax.Array]:
    """A tile's offsets in the output view: every block, ``starts`` within."""
    return [
      s
      for d in range(len(starts))
      for s in ([zero, starts[d]] if d in self.blocked else [starts[d]])
    ]

  def view_shape(self, sizes: tuple[int, ...]) -> list[int]:
    """Spatial shape of an output view whose dimensions hold ``sizes`` per block."""
    blocks = self.blocks
    return [
      s for d, m in enumerate(sizes) for s in ([blocks[d]] if d in self.blocked else []) + [m]
    ]


def _tile_loop(spec: ConvSpec, plan: TilePlan) -> _TileLoop:
  g = spec.geometry
  nsp, tile_out = g.num_spatial, plan.tile_out
  blocks = plan.blocks or (1,) * nsp
  blocked = [d for d in range(nsp) if blocks[d] > 1]
  tiles = [d for d in range(nsp) if plan.counts[d] > 1 or d in blocked]
  # Tiled dimensions: a tile's window, cut out of the input with its padding.
  # The others: the whole input, padded by compute (fused into the unfolding).
  window_dims = window_extent(spec, tile_out)
  window = tuple(window_dims[d] if d in tiles else g.in_spatial[d] for d in range(nsp))
  padding = tuple((0, 0) if d in tiles else g.padding[d] for d in range(nsp))
  tile_geometry = dataclasses.replace(
    g, batch=plan.batch, padding=padding, in_spatial=window, out_spatial=tile_out
  )
  return _TileLoop(
    spec=spec,
    plan=plan,
    tile_spec=dataclasses.replace(spec, geometry=tile_geometry),
    blocks=blocks,
    blocked=blocked,
    tiles=tiles,
    extent=_blocks.extent(spec, blocks),
    pos=_blocks.axes(blocks),
    nb=g.batch // plan.batch if plan.batch else 1,
  )


def tiled(
  compute: Callable[[jax.Array, ConvSpec], jax.Array],
  x_cl: jax.Array,
  spec: ConvSpec,
  plan: TilePlan,
) -> jax.Array:
  """``compute(window, window_spec)`` over the tiles of ``plan``, through one ``lax.scan``.

  ``compute`` takes an unpadded input and a spec whose padding it applies.

  Each step cuts its padded window out of the unpadded input (the overlapping
  windows are never stacked, the padded input never built) and writes its output
  into the result in place; the last tile along a dimension is moved back to end
  at the edge (recomputing a few outputs) instead of padding a remainder. Each
  step's convolution is rematerialised in the backward pass, so neither the
  forward nor autodiff keeps more than one tile's patches alive. Needs
  ``lhs_dilation`` of 1 (see :mod:`convmm._engine.phases`).

  With spatial blocks (``plan.blocks``, see :mod:`convmm._engine.blocks`), the input
  is built once as ``(N, blocks, window, ...)`` along each blocked dimension
  (each block's padded window, halo included); a step cuts the same positions
  out of every block (only the within-block axes are sliced) and ``compute``
  is vmapped over the block axes, which stay whole, so sharded ones stay
  sharded. The output comes out as ``(N, blocks, per_block, ...)`` and is cut
  to the output size.
  """
  if plan.is_whole(spec.geometry.batch):
    return compute(x_cl, spec)
  loop = _tile_loop(spec, plan)
  out, nsp, nb = spec.geometry.out_spatial, spec.geometry.num_spatial, loop.nb
  blocks, blocked, extent = loop.blocks, loop.blocked, loop.extent
  compute = loop.over_blocks(compute)
  x_chunks = loop.input_chunks(x_cl)
  zero = jnp.zeros((), jnp.int32)
  steps = jnp.arange(nb * plan.num_tiles, dtype=jnp.int32)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def tile(chunk, starts):
    y = compute(loop.window_of(x_chunks, chunk, starts), loop.tile_spec)
    return _blocks.back(y, blocks) if blocked else y

  y_tile = jax.eval_shape(tile, zero, [zero] * nsp)
  bo, o = y_tile.shape[0], y_tile.shape[-1]
  x_spec = explicit_spec(x_cl)
  view = loop.view_shape(extent)
  if x_spec is None and not blocked and unknown_split(x_cl) == 1 and x_cl.size:
    # Every output is written by a tile, so the initial values are never read. A
    # value of the input rather than zeros: XLA gives loops of one output shape one
    # shared zero buffer and copies it into each (ResNet-18's float32 step: seven
    # copies, 8 MiB more temporaries, 1.6% more time).
    seed = lax.convert_element_type(x_cl.reshape(-1)[0], y_tile.dtype)
    init = lax.broadcast(seed, (bo, nb, *view, o))
  else:
    init = jnp.zeros(
      (bo, nb, *view, o),
      y_tile.dtype,
      out_sharding=None
      if x_spec is None
      else jax.sharding.PartitionSpec(x_spec[0], None, *x_spec[1:-1], None),
    )

  def step(y, index):
    chunk, position = jnp.divmod(index, plan.num_tiles)
    starts, _ = loop.out_starts(position)
    update = tile(chunk, starts)[:, None]
    return lax.dynamic_update_slice(y, update, [zero, chunk, *loop.at(starts, zero), zero]), None

  y, _ = lax.scan(step, init, steps)
  if x_spec is None:
    sizes = tuple(m * e for m, e in zip(blocks, extent))
    y = y.reshape(bo * nb, *sizes, o)
    return y if sizes == out else y[(slice(None), *(slice(0, s) for s in out))]
  return lax.reshape(
    y, (bo * nb, *out, o), out_sharding=jax.sharding.PartitionSpec(*x_spec[:-1], None)
  )


def tiled_sum(
  compute: Callable[[jax.Array, jax.Array, ConvSpec], jax.Array],
  x_cl: jax.Array,
  cotangent: jax.Array,
  spec: ConvSpec,
  plan: TilePlan,
) -> jax.Array:
  """``compute(window, cotangent_tile, window_spec)`` summed over the tiles of ``plan``.

  A kernel gradient, tiled as :func:`tiled` tiles the forward (windows, blocks,
  batch chunks, one ``lax.scan``), with ``cotangent`` output-shaped. The outputs a
  moved-back last tile shares with its neighbour are zeroed in its cotangent tile,
  so each is counted once (and outputs past the end, computed by the last blocks,
  get zero cotangents).
  """
  if plan.is_whole(spec.geometry.batch):
    return compute(x_cl, cotangent, spec)
  loop = _tile_loop(spec, plan)
  out, tile_out, counts = spec.geometry.out_spatial, plan.tile_out, plan.counts
  blocks, blocked, extent, pos = loop.blocks, loop.blocked, loop.extent, loop.pos
  compute = loop.over_blocks(compute)
  x_chunks = loop.input_chunks(x_cl)
  zero = jnp.zeros((), jnp.int32)
  steps = jnp.arange(loop.nb * plan.num_tiles, dtype=jnp.int32)
  ct_view = cotangent
  if blocked:  # outputs past the end (computed by the last blocks) count zero
    sizes = tuple(m * e if m > 1 else o for m, e, o in zip(blocks, extent, out))
    ct_view = _blocks.view(ct_view, blocks, sizes)
  ct_chunks = loop.chunks_of(ct_view)
  size = loop.view_shape(tile_out)

  def ct_tile(chunk, starts, indices):
    ct = loop.chunk_of(ct_chunks, chunk)
    ct = lax.dynamic_slice(
      ct, [zero, *loop.at(starts, zero), zero], (plan.batch, *size, ct.shape[-1])
    )
    for d in loop.tiles:  # outputs the previous tile already counted
      if counts[d] > 1:
        fresh = starts[d] + jnp.arange(tile_out[d]) >= indices[d] * tile_out[d]
        fresh = lax.broadcast_in_dim(fresh, ct.shape, (pos[d],))
        ct = jnp.where(fresh, ct, jnp.zeros((), ct.dtype))
    return ct

  def summand(index):
    chunk, position = jnp.divmod(index, plan.num_tiles)
    starts, indices = loop.out_starts(position)
    x_window = loop.window_of(x_chunks, chunk, starts)
    return compute(x_window, ct_tile(chunk, starts, indices), loop.tile_spec)

  total = jax.eval_shape(summand, zero)
  init = jnp.zeros(total.shape, total.dtype)
  total, _ = lax.scan(lambda acc, i: (acc + summand(i), None), init, steps)
  return total.sum(tuple(range(len(blocked)))) if blocked else total  # the blocks lead


def tile_conv(
  compute: Callable[[jax.Array, ConvSpec], jax.Array],
  x_cl: jax.Array,
  spec: ConvSpec,
  out_dtype: Any,
  memory_budget: int | None,
) -> jax.Array:
  """``compute(x, spec)``, a convolution of unpadded ``x_cl``, tiled to fit the budget."""
  itemsize = jnp.dtype(out_dtype).itemsize
  plan = plan_for(spec, x_cl, memory_budget, FORWARD_PATCH_COPIES, itemsize)
  return tiled(compute, x_cl, spec, plan)
