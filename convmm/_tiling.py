"""The tiling of a convolution that exceeds the memory budget (see :mod:`convmm._budget`).

A convolution whose working set (patch matrices and their companions, see
:func:`tile_cost`) exceeds the budget is computed tile by tile: one
``lax.scan`` body, shared by all tiles, cuts its input window out of the padded
input with ``lax.dynamic_slice`` and convolves it. Only one tile's window and
patches exist at a time, tracing and compiling do not grow with the number of
tiles, and output sizes need not divide evenly (the padded input is extended
so that the last tile has a full window; the surplus outputs are dropped).

Tiles cover the whole batch and split the first output spatial dimension
(then the second, for kernels so large that one output row does not fit). The
batch is split only when one row of the whole batch does not fit; its chunks
take every ``nb``-th sample (``x.reshape(b, nb, ...)``) so that a batch
sharded over devices stays sharded inside every tile. With several devices and
no explicit sharding to read (Auto meshes), the split spatial dimensions are
first cut into contiguous blocks that line up with the devices, so that a
spatially sharded input stays sharded too (:mod:`convmm._blocks`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm import _blocks
from convmm._budget import budget_or_current
from convmm._im2col import tap_split
from convmm._shapes import ConvSpec
from convmm._sharding import explicit_spec, sharding_of, unknown_split


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """``batch`` samples (of ``n``) by ``tile_out`` output positions per tile.

  A dimension with ``blocks[d]`` > 1 is cut into that many contiguous blocks
  (see :mod:`convmm._blocks`); ``tile_out[d]`` and ``counts[d]`` are then per
  block, and a tile covers all blocks at once.
  """

  batch: int
  tile_out: tuple[int, ...]
  counts: tuple[int, ...]  # tiles along each output spatial dimension
  blocks: tuple[int, ...] = ()  # blocks along each spatial dimension (): none

  @property
  def num_tiles(self) -> int:
    return math.prod(self.counts)

  def is_whole(self, n: int) -> bool:
    """One tile: all ``n`` samples, every output position, no blocks."""
    return self.batch == n and self.num_tiles == 1 and not self.blocks

  @property
  def samples(self) -> int:
    """Samples a tile convolves: the batch times the blocks."""
    return self.batch * math.prod(self.blocks)


def _window(spec: ConvSpec, tile_out: tuple[int, ...]) -> tuple[int, ...]:
  """Padded-input extent that ``tile_out`` outputs read along each dimension."""
  g = spec.geometry
  return tuple(
    (t - 1) * s + k if t else 0
    for t, s, k in zip(tile_out, g.window_strides, g.effective_filter_shape)
  )


def tile_cost(
  spec: ConvSpec,
  itemsize: int,
  b: int,
  tile_out: tuple[int, ...],
  patch_copies: int,
  out_itemsize: int,
) -> int:
  """Bytes a tile of ``b`` samples by ``tile_out`` outputs holds at once.

  ``patch_copies`` patch matrices (three for a forward convolution, a speed
  setting, see :func:`convmm._conv.conv_channels_last`; two for a kernel
  gradient, the patches and their GEMM operand copy), the input window, the
  first stage of the unfolding and the tile's output.
  """
  g = spec.geometry
  c = g.in_features * itemsize
  window = _window(spec, tile_out)
  positions = b * math.prod(tile_out)
  cost = patch_copies * positions * g.num_taps * c + b * math.prod(window) * c
  if len(tile_out) > 1:  # unfold_padded's first stage: the last dim unfolded only
    cost += b * math.prod(window[:-1]) * tile_out[-1] * g.filter_shape[-1] * c
    if split := tap_split(g.filter_shape[-1]):  # and its inner stage (see _unfold_dim)
      cost += b * math.prod(window) * split[1] * c
  return cost + positions * spec.out_features * out_itemsize


def tile_plan(
  spec: ConvSpec,
  itemsize: int,
  budget: int,
  patch_copies: int = 3,
  out_itemsize: int | None = None,
  batch_shards: int = 1,
  sharded_spatial: frozenset[int] = frozenset(),
  devices: int = 1,
) -> TilePlan:
  """The largest tiles whose :func:`tile_cost` fits ``budget``.

  Whole batch first, splitting output rows, then (row tiles of one) columns;
  the batch is split only when one row of every sample does not fit, into
  chunks that keep ``batch_shards`` whole (a sharded batch stays sharded), or
  a split over a divisor of ``devices``.
  Spatial dimensions in ``sharded_spatial`` are never split. Tile sizes need not
  divide the output: tiles are balanced, the last one padded. With several
  ``devices``, split dimensions are cut into :func:`convmm._blocks.spatial_blocks`
  first, the blocks counted as samples of the tile.
  """
  g = spec.geometry
  n, out = g.batch, g.out_spatial
  cost = functools.partial(
    tile_cost,
    spec,
    itemsize,
    patch_copies=patch_copies,
    out_itemsize=itemsize if out_itemsize is None else out_itemsize,
  )
  whole = TilePlan(n, out, (1,) * len(out))
  if n == 0 or 0 in out or cost(n, out) <= budget:
    return whole
  all_blocks = (1,) * len(out) if sharded_spatial else _blocks.spatial_blocks(spec, devices)

  def levels(b: int) -> Iterator[TilePlan]:
    """Coarsest first: whole spatial, then tiles of dim j (dims before j of size 1)."""
    yield TilePlan(b, out, (1,) * len(out))
    for j in range(min(2, len(out))):
      if any(d in sharded_spatial for d in range(j + 1)):
        return
      ones = (1,) * j
      # The tiled dimensions are blocked; a tile loop walks the outputs of one block.
      blocks = (*all_blocks[: j + 1], *(1,) * (len(out) - j - 1))
      blocks = blocks if max(blocks) > 1 else ()
      extent = _blocks.extent(spec, blocks or (1,) * len(out))
      samples = b * math.prod(blocks)
      fits = lambda r: cost(samples, (*ones, r, *extent[j + 1 :])) <= budget  # noqa: B023
      if not fits(1) and j + 1 < min(2, len(out)):
        continue
      lo, hi = 1, extent[j]  # largest r that fits (1 if none does)
      while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
      count = -(-extent[j] // lo)
      r = -(-extent[j] // count)  # balanced tiles, the last one padded by < count outputs
      counts = (*extent[:j], count, *(1,) * (len(out) - j - 1))
      yield TilePlan(b, (*ones, r, *extent[j + 1 :]), counts, blocks)
      return

  # Batch groups are kept whole; otherwise chunks are divisors of n that keep
  # the shards whole, largest first (with several devices, a split over any
  # divisor of them: an Auto mesh's batch may be sharded unseen).
  shards = max(batch_shards, math.gcd(n, devices))
  chunks = (
    [n]
    if spec.batch_group_count > 1
    else [d for d in range(n, 0, -1) if n % d == 0 and d % shards == 0] or [n]
  )
  plan = whole
  for b in chunks:
    for plan in levels(b):
      if cost(plan.samples, plan.tile_out) <= budget:
        return plan
  return plan  # nothing fits: the finest tiling


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


def tiled(
  compute: Callable[..., jax.Array],
  x_cl: jax.Array,
  spec: ConvSpec,
  plan: TilePlan,
  cotangent: jax.Array | None = None,
) -> jax.Array:
  """``compute(window, window_spec)`` over the tiles of ``plan``, through one ``lax.scan``.

  ``compute`` takes an unpadded input and a spec whose padding it applies.

  Each step cuts its padded window out of the unpadded input (the overlapping
  windows are never stacked, the padded input never built) and writes its output
  into the result in place; the last tile along a dimension is moved back to end
  at the edge (recomputing a few outputs) instead of padding a remainder. Each
  step's convolution is rematerialised in the backward pass, so neither the
  forward nor autodiff keeps more than one tile's patches alive. Needs
  ``lhs_dilation`` of 1 (see :mod:`convmm._phases`).

  With spatial blocks (``plan.blocks``, see :mod:`convmm._blocks`), the input
  is built once as ``(N, blocks, window, ...)`` along each blocked dimension
  (each block's padded window, halo included); a step cuts the same positions
  out of every block (only the within-block axes are sliced) and ``compute``
  is vmapped over the block axes, which stay whole, so sharded ones stay
  sharded. The output comes out as ``(N, blocks, per_block, ...)`` and is cut
  to the output size.

  With a ``cotangent`` (output-shaped), each step calls
  ``compute(window, cotangent_tile, window_spec)`` instead and the results are
  summed (a kernel gradient); the outputs a moved-back last tile shares with
  its neighbour are zeroed in its cotangent tile, so each is counted once (and
  outputs past the end, computed by the last blocks, get zero cotangents).
  """
  g = spec.geometry
  n, out, nsp = g.batch, g.out_spatial, g.num_spatial
  b, tile_out, counts = plan.batch, plan.tile_out, plan.counts
  blocks = plan.blocks or (1,) * nsp
  nb = n // b if b else 1
  blocked = [d for d in range(nsp) if blocks[d] > 1]
  extent = _blocks.extent(spec, blocks)  # outputs a tile loop walks (per block)
  tiles = [d for d in range(nsp) if counts[d] > 1 or d in blocked]
  # Tiled dimensions: a tile's window, cut out of the input with its padding.
  # The others: the whole input, padded by compute (fused into the unfolding).
  window = tuple(_window(spec, tile_out)[d] if d in tiles else g.in_spatial[d] for d in range(nsp))
  padding = tuple((0, 0) if d in tiles else g.padding[d] for d in range(nsp))
  tile_spec = dataclasses.replace(
    spec,
    geometry=dataclasses.replace(
      g, batch=b, padding=padding, in_spatial=window, out_spatial=tile_out
    ),
  )
  if plan.is_whole(n):
    return compute(x_cl, spec) if cotangent is None else compute(x_cl, cotangent, spec)
  pos = _blocks.axes(blocks)  # axis of each spatial dimension in a step's operands
  x_view = x_cl
  if blocked:  # the block axes stay separate (and sharded): compute is vmapped over them
    x_view = _blocks.padded_view(x_cl, spec, blocks)
    per_tile = compute
    compute = lambda *a: _blocks.over_blocks(lambda *ops: per_tile(*ops, tile_spec), blocks)(
      *(_blocks.leading(op, blocks) for op in a[:-1])
    )
  # Chunk k holds samples k, k + nb, ...: the major (possibly sharded) batch axis
  # stays whole and the chunk index is a minor axis.
  # One chunk: the whole batch, not reshaped (XLA would copy it for the layout).
  chunks_of = lambda a: a if nb == 1 else a.reshape(b, nb, *a.shape[1:])
  chunk_of = lambda a, chunk: (
    a if nb == 1 else lax.dynamic_index_in_dim(a, chunk, axis=1, keepdims=False)
  )
  x_chunks = chunks_of(x_view)

  def out_starts(position):
    starts, indices = [], []
    for d in reversed(range(nsp)):
      position, i = jnp.divmod(position, counts[d])
      starts.append(jnp.minimum(i * tile_out[d], extent[d] - tile_out[d]))
      indices.append(i)
    return starts[::-1], indices[::-1]

  def window_of(chunk, starts):
    x = chunk_of(x_chunks, chunk)
    for d in tiles:
      if d in blocked:  # a block's window is padded already
        x = lax.dynamic_slice_in_dim(x, starts[d] * g.window_strides[d], window[d], pos[d])
      else:
        start = starts[d] * g.window_strides[d] - g.padding[d][0]
        x = _zero_extended_window(x, pos[d], start, window[d])
    return x

  zero = jnp.zeros((), jnp.int32)

  def at(starts):  # a tile's offsets in the output view: every block, ``starts`` within
    return [s for d in range(nsp) for s in ([zero, starts[d]] if d in blocked else [starts[d]])]

  steps = jnp.arange(nb * plan.num_tiles, dtype=jnp.int32)
  if cotangent is not None:
    ct_view = cotangent
    if blocked:  # outputs past the end (computed by the last blocks) count zero
      sizes = tuple(m * e if m > 1 else o for m, e, o in zip(blocks, extent, out))
      ct_view = _blocks.view(ct_view, blocks, sizes)
    ct_chunks = chunks_of(ct_view)
    size = [m for d in range(nsp) for m in ([blocks[d]] if d in blocked else []) + [tile_out[d]]]

    def ct_tile(chunk, starts, indices):
      ct = chunk_of(ct_chunks, chunk)
      ct = lax.dynamic_slice(ct, [zero, *at(starts), zero], (b, *size, ct.shape[-1]))
      for d in tiles:  # outputs the previous tile already counted
        if counts[d] > 1:
          fresh = starts[d] + jnp.arange(tile_out[d]) >= indices[d] * tile_out[d]
          fresh = lax.broadcast_in_dim(fresh, ct.shape, (pos[d],))
          ct = jnp.where(fresh, ct, jnp.zeros((), ct.dtype))
      return ct

    def summand(index):
      chunk, position = jnp.divmod(index, plan.num_tiles)
      starts, indices = out_starts(position)
      return compute(window_of(chunk, starts), ct_tile(chunk, starts, indices), tile_spec)

    total = jax.eval_shape(summand, zero)
    init = jnp.zeros(total.shape, total.dtype)
    total, _ = lax.scan(lambda acc, i: (acc + summand(i), None), init, steps)
    return total.sum(tuple(range(len(blocked)))) if blocked else total  # the blocks lead

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def tile(chunk, starts):
    y = compute(window_of(chunk, starts), tile_spec)
    return _blocks.back(y, blocks) if blocked else y

  y_tile = jax.eval_shape(tile, zero, [zero] * nsp)
  bo, o = y_tile.shape[0], y_tile.shape[-1]
  x_spec = explicit_spec(x_cl)
  view = [s for d in range(nsp) for s in ([blocks[d]] if d in blocked else []) + [extent[d]]]
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
    starts, _ = out_starts(position)
    update = tile(chunk, starts)[:, None]
    return lax.dynamic_update_slice(y, update, [zero, chunk, *at(starts), zero]), None

  y, _ = lax.scan(step, init, steps)
  if x_spec is None:
    sizes = tuple(m * e for m, e in zip(blocks, extent))
    y = y.reshape(bo * nb, *sizes, o)
    return y if sizes == out else y[(slice(None), *(slice(0, s) for s in out))]
  return lax.reshape(
    y, (bo * nb, *out, o), out_sharding=jax.sharding.PartitionSpec(*x_spec[:-1], None)
  )


# A forward tile is costed at three patch matrices' worth, though it holds one:
# smaller tiles stay under glibc's mmap threshold and ran faster (a 1-D k=9 layer:
# 1.9x lax's time with three, 3.7x with one). Kernel gradients count two.
FORWARD_PATCH_COPIES = 3


def plan_for(
  spec: ConvSpec,
  x_cl: jax.Array,
  memory_budget: int | None,
  patch_copies: int,
  out_itemsize: int,
) -> TilePlan:
  """:func:`tile_plan` for input ``x_cl``: its sharding, the devices, the budget in force.

  Tiles keep a sharded batch whole and never split a sharded spatial
  dimension (on Auto meshes, spatial blocks).
  """
  batch_shards, sharded_spatial = sharding_of(x_cl)
  return tile_plan(
    spec,
    jnp.dtype(x_cl.dtype).itemsize,
    budget_or_current(memory_budget),
    patch_copies=patch_copies,
    out_itemsize=out_itemsize,
    batch_shards=batch_shards,
    sharded_spatial=sharded_spatial,
    devices=unknown_split(x_cl),
  )


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
