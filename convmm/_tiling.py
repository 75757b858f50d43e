"""The memory budget and the tiling of a convolution that exceeds it.

A convolution whose working set (patch matrices and their companions, see
:func:`tile_cost`) exceeds the budget is computed tile by tile: one
``lax.map`` body, shared by all tiles, cuts its input window out of the padded
input with ``lax.dynamic_slice`` and convolves it. Only one tile's window and
patches exist at a time, tracing and compiling do not grow with the number of
tiles, and output sizes need not divide evenly (the padded input is extended
so that the last tile has a full window; the surplus outputs are dropped).

Tiles cover the whole batch and split the first output spatial dimension
(then the second, for kernels so large that one output row does not fit). The
batch is split only when one row of the whole batch does not fit; its chunks
take every ``nb``-th sample (``x.reshape(b, nb, ...)``) so that a batch
sharded over devices stays sharded inside every tile.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._im2col import pad_input
from convmm._shapes import ConvSpec

# A tile's working set larger than this is never materialised whole. On CPU the
# budget is also a speed setting: XLA temporaries above glibc's 32 MiB mmap
# threshold are mapped afresh and page-faulted on every call, which can cost
# more than the GEMM; 32 MiB measured best across the benchmark suite.
_DEFAULT_MEMORY_BUDGET = 32 * 2**20
_budget_override: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "convmm_memory_budget", default=None)


def check_budget(fn: str, name: str, nbytes: Any) -> int:
  """``nbytes`` as a positive Python int (NumPy integers accepted), else an error."""
  if isinstance(nbytes, bool):
    raise TypeError(f"{fn}: `{name}` must be a positive int number of bytes, got {nbytes!r}")
  try:
    value = operator.index(nbytes)
  except TypeError:
    raise TypeError(
        f"{fn}: `{name}` must be a positive int number of bytes, got {nbytes!r}") from None
  if value < 1:
    raise ValueError(f"{fn}: `{name}` must be a positive number of bytes, got {nbytes!r}")
  return value


def current_memory_budget() -> int:
  """The budget in force: the innermost :func:`memory_budget`, else the default."""
  override = _budget_override.get()
  return _DEFAULT_MEMORY_BUDGET if override is None else override


def set_memory_budget(nbytes: int) -> int:
  """Sets the default tile working-set budget in bytes; returns the previous value.

  The budget bounds the temporaries of one tile of a convolution (see
  :func:`memory_budget`). It is read when a convolution is traced: functions
  already compiled keep the tiling they were traced with.

  Example:
    >>> import convmm
    >>> old = convmm.set_memory_budget(64 * 2**20)
    >>> _ = convmm.set_memory_budget(old)
  """
  global _DEFAULT_MEMORY_BUDGET
  nbytes = check_budget("set_memory_budget", "nbytes", nbytes)
  old, _DEFAULT_MEMORY_BUDGET = _DEFAULT_MEMORY_BUDGET, nbytes
  return old


@contextlib.contextmanager
def memory_budget(nbytes: int) -> Iterator[None]:
  """Context manager: convolutions traced inside use a tile budget of ``nbytes``.

  The budget bounds a tile's whole working set: its input window, the patch
  matrix counted three times (the rematerialised patches, their cotangent and
  a GEMM operand copy in the backward pass; once for the depthwise method),
  the first unfolding stage and the tile's output. Work beyond it is computed
  tile by tile (output rows, then columns, then batch chunks). The whole
  padded input and the output are held besides. Like
  ``jax.default_matmul_precision``, it applies to what is traced inside the
  block; an explicit ``memory_budget=`` argument takes precedence.

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x, w = jnp.ones((1, 64, 64, 8)), jnp.ones((3, 3, 8, 8))
    >>> with convmm.memory_budget(2**20):
    ...   y = convmm.conv_general_dilated(x, w, (1, 1), 'SAME',
    ...       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> y.shape
    (1, 64, 64, 8)
  """
  token = _budget_override.set(check_budget("memory_budget", "nbytes", nbytes))
  try:
    yield
  finally:
    _budget_override.reset(token)


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """``batch`` samples (of ``n``) by ``tile_out`` output positions per tile."""

  batch: int
  tile_out: tuple[int, ...]
  counts: tuple[int, ...]  # tiles along each output spatial dimension

  @property
  def num_tiles(self) -> int:
    return math.prod(self.counts)


def _window(spec: ConvSpec, tile_out: tuple[int, ...]) -> tuple[int, ...]:
  """Padded-input extent that ``tile_out`` outputs read along each dimension."""
  g = spec.geometry
  return tuple((t - 1) * s + k if t else 0
               for t, s, k in zip(tile_out, g.window_strides, g.effective_filter_shape))


def tile_cost(spec: ConvSpec, itemsize: int, b: int, tile_out: tuple[int, ...],
              patch_copies: int, out_itemsize: int) -> int:
  """Bytes a tile of ``b`` samples by ``tile_out`` outputs holds at once.

  ``patch_copies`` patch matrices (im2col: three, as the backward pass holds the
  rematerialised patches, their cotangent and a GEMM operand copy; depthwise
  builds none, but its backward holds one shifted copy of the input per tap,
  about one patch matrix), the input window, the first stage of the unfolding
  and the tile's output.
  """
  g = spec.geometry
  c = g.in_features * itemsize
  window = _window(spec, tile_out)
  positions = b * math.prod(tile_out)
  cost = patch_copies * positions * g.num_taps * c + b * math.prod(window) * c
  if len(tile_out) > 1:  # unfold_padded's first stage: the last dim unfolded only
    cost += b * math.prod(window[:-1]) * tile_out[-1] * g.filter_shape[-1] * c
  return cost + positions * spec.out_features * out_itemsize


def tile_plan(spec: ConvSpec, itemsize: int, budget: int, patch_copies: int = 3,
              out_itemsize: int | None = None, batch_shards: int = 1,
              sharded_spatial: frozenset[int] = frozenset()) -> TilePlan:
  """The largest tiles whose :func:`tile_cost` fits ``budget``.

  Whole batch first, splitting output rows, then (row tiles of one) columns;
  the batch is split only when one row of every sample does not fit, into
  chunks that keep ``batch_shards`` whole (a sharded batch stays sharded).
  Spatial dimensions in ``sharded_spatial`` are never split. Tile sizes need not
  divide the output: tiles are balanced, the last one padded.
  """
  g = spec.geometry
  n, out = g.batch, g.out_spatial
  cost = functools.partial(tile_cost, spec, itemsize, patch_copies=patch_copies,
                           out_itemsize=itemsize if out_itemsize is None else out_itemsize)
  whole = TilePlan(n, out, (1,) * len(out))
  if n == 0 or 0 in out or cost(n, out) <= budget:
    return whole

  def levels(b: int) -> Iterator[TilePlan]:
    """Coarsest first: whole spatial, then tiles of dim j (dims before j of size 1)."""
    yield TilePlan(b, out, (1,) * len(out))
    for j in range(min(2, len(out))):
      if any(d in sharded_spatial for d in range(j + 1)):
        return
      ones = (1,) * j
      fits = lambda r: cost(b, (*ones, r, *out[j + 1:])) <= budget  # noqa: B023
      if not fits(1) and j + 1 < min(2, len(out)):
        continue
      lo, hi = 1, out[j]  # largest r that fits (1 if none does)
      while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
      count = -(-out[j] // lo)
      r = -(-out[j] // count)  # balanced tiles, the last one padded by < count outputs
      yield TilePlan(b, (*ones, r, *out[j + 1:]),
                     (*out[:j], count, *(1,) * (len(out) - j - 1)))
      return

  # Batch groups are kept whole; otherwise chunks are divisors of n that keep
  # the shards whole, largest first.
  chunks = [n] if spec.batch_group_count > 1 else [
      d for d in range(n, 0, -1) if n % d == 0 and d % batch_shards == 0] or [n]
  plan = whole
  for b in chunks:
    for plan in levels(b):
      if cost(plan.batch, plan.tile_out) <= budget:
        return plan
  return plan  # nothing fits: the finest tiling


def sharding_of(x: jax.Array) -> tuple[int, frozenset[int]]:
  """Devices the batch axis is split over, and the split spatial axes (explicit meshes)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if not spec or mesh is None or not getattr(mesh, "shape", None):
    return 1, frozenset()

  def shards(entry: Any) -> int:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[name] for name in names)

  sizes = [shards(entry) for entry in spec] + [1] * (x.ndim - len(spec))
  return sizes[0], frozenset(d for d in range(x.ndim - 2) if sizes[1 + d] > 1)


def tiled(compute: Callable[[jax.Array, ConvSpec], jax.Array], x_cl: jax.Array,
          spec: ConvSpec, plan: TilePlan) -> jax.Array:
  """``compute(window, window_spec)`` over the tiles of ``plan``, through one ``lax.map``.

  Each step slices its window out of the padded input (the overlapping windows
  are never stacked) and is rematerialised in the backward pass, so neither the
  forward nor autodiff keeps more than one tile's patches alive.
  """
  g = spec.geometry
  n, out = g.batch, g.out_spatial
  b, tile_out, counts = plan.batch, plan.tile_out, plan.counts
  nb = n // b if b else 1
  window = _window(spec, tile_out) if out and 0 not in out else g.padded_spatial
  window = tuple(g.padded_spatial[d] if counts[d] == 1 else window[d] for d in range(len(out)))
  # Extend the high padding so that the last, partial tile has a whole window.
  need = [(c * t - 1) * s + k if c > 1 else p for c, t, s, k, p in zip(
      counts, tile_out, g.window_strides, g.effective_filter_shape, g.padded_spatial)]
  padding = tuple((lo, hi + max(0, m - p)) for (lo, hi), m, p in zip(
      g.padding, need, g.padded_spatial))
  x_padded = pad_input(x_cl, dataclasses.replace(g, padding=padding))
  nsp = len(out)
  tile_spec = dataclasses.replace(spec, geometry=dataclasses.replace(
      g, batch=b, padding=((0, 0),) * nsp, lhs_dilation=(1,) * nsp, in_spatial=window,
      out_spatial=tile_out))
  if nb == 1 and plan.num_tiles == 1:
    return compute(x_padded, tile_spec)
  # Chunk k holds samples k, k + nb, ...: the major (possibly sharded) batch axis
  # stays whole and the chunk index is a minor axis.
  x_chunks = x_padded.reshape(b, nb, *x_padded.shape[1:])

  def step(index):
    chunk, position = jnp.divmod(index, plan.num_tiles)
    starts = []
    for count, t, s in zip(reversed(counts), reversed(tile_out), reversed(g.window_strides)):
      position, i = jnp.divmod(position, count)
      starts.append(i * t * s)
    starts = [0, chunk, *reversed(starts), 0]
    starts = [jnp.asarray(s, jnp.int32) for s in starts]
    x = lax.dynamic_slice(x_chunks, starts, (b, 1, *window, x_padded.shape[-1]))
    return compute(x.reshape(b, *window, x.shape[-1]), tile_spec)

  remat = functools.partial(jax.checkpoint, prevent_cse=False)
  ys = lax.map(remat(step), jnp.arange(nb * plan.num_tiles, dtype=jnp.int32))
  # (nb * tiles, b', *tile_out, O) -> (b' * nb, *out, O), sample = i * nb + chunk
  bo, o = ys.shape[1], ys.shape[-1]
  ys = ys.reshape(nb, *counts, bo, *tile_out, o)
  perm = [1 + nsp, 0] + [a for d in range(nsp) for a in (1 + d, 2 + nsp + d)] + [ys.ndim - 1]
  ys = jnp.transpose(ys, perm)
  shape = (bo * nb, *(c * t for c, t in zip(counts, tile_out)), o)
  batch_shards, sharded_spatial = sharding_of(x_cl)
  if batch_shards > 1 or sharded_spatial:  # explicit axes: say where the shards go
    spec = jax.typeof(x_cl).sharding.spec
    spec = (*spec, *(None,) * (x_cl.ndim - len(spec)))
    ys = lax.reshape(ys, shape, out_sharding=jax.sharding.PartitionSpec(*spec[:-1], None))
  else:
    ys = ys.reshape(shape)
  return lax.slice(ys, (0,) * ys.ndim, (ys.shape[0], *out, o))
