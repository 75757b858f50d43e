"""Tile plans: how a convolution beyond the memory budget is cut into tiles.

A tile's working set (its patch matrices and their companions, :func:`tile_cost`)
must fit the budget (:mod:`convmm._engine.budget`). :func:`tile_plan` finds the
largest tiles that do: the whole batch by the first output spatial dimension's rows
(then the second's columns, for kernels so large that one output row does not fit);
the batch is split only when one row of the whole batch does not fit, into chunks
that keep a sharded batch sharded. With several devices and no explicit sharding to
read (Auto meshes), the split spatial dimensions are first cut into contiguous
blocks that line up with the devices (:mod:`convmm._engine.blocks`). The tile loops
that walk a plan are :mod:`convmm._engine.tiling`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from convmm._engine import blocks as _blocks
from convmm._engine.budget import budget_or_current
from convmm._engine.im2col import tap_split
from convmm._engine.policy import FORWARD_PATCH_COPIES
from convmm._engine.sharding import sharding_of, unknown_split
from convmm._rules.shapes import ConvSpec


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """``batch`` samples (of ``n``) by ``tile_out`` output positions per tile.

  A dimension with ``blocks[d]`` > 1 is cut into that many contiguous blocks
  (see :mod:`convmm._engine.blocks`); ``tile_out[d]`` and ``counts[d]`` are then per
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


def window_extent(spec: ConvSpec, tile_out: tuple[int, ...]) -> tuple[int, ...]:
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

  ``patch_copies`` patch matrices (the policy's count: three for a forward
  convolution, a speed setting; two for a kernel gradient, the patches and their
  GEMM operand copy; see :mod:`convmm._engine.policy`), the input window, the
  first stage of the unfolding and the tile's output.
  """
  g = spec.geometry
  c = g.in_features * itemsize
  window = window_extent(spec, tile_out)
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
  patch_copies: int = FORWARD_PATCH_COPIES,
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
  ``devices``, split dimensions are cut into :func:`convmm._engine.blocks.spatial_blocks`
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
