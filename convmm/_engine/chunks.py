"""Batch chunks: a batch split into chunks of every ``num``-th sample, one ``lax.scan`` step each.

Used where only the batch is split (strided input gradients, kernel gradients
of input-dilated convolutions); :func:`convmm._engine.tiling.tiled` chunks the batch
the same way inside its tiles. The chunk index is the minor part of the batch
axis, so a batch sharded over devices stays sharded inside every chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from convmm._engine.sharding import explicit_spec
from convmm._rules.shapes import ConvSpec


def batch_chunk(n: int, limit: int, batch_shards: int = 1) -> int:
  """Samples per chunk: at most ``limit``, keeping ``batch_shards`` whole where it can.

  A divisor of ``n`` (no padded samples) unless the largest one is under half of
  ``limit``, then ``limit`` itself (the last chunk padded).
  """
  limit = max(1, min(n, limit))
  divisors = [d for d in range(limit, 0, -1) if n % d == 0]
  shard_whole = [d for d in divisors if d % batch_shards == 0]
  best = (shard_whole or divisors)[0]
  return best if 2 * best > limit or shard_whole else limit


def map_batch_chunks(
  fn: Callable[..., jax.Array],
  arrays: list[jax.Array],
  chunk: int,
  *,
  reduce: bool,
  spec: ConvSpec,
) -> jax.Array:
  """``fn(*chunks, chunk_spec)`` over batch chunks of ``arrays`` in one ``lax.scan``.

  Chunk ``k`` holds samples ``k, k + num, ...`` (``x.reshape(chunk, num, ...)``),
  so that a batch sharded over devices stays sharded inside every chunk, as in
  :func:`convmm._engine.tiling.tiled`. With ``reduce`` the chunk results are summed (a kernel
  gradient); otherwise they are the per-sample results, put back in order.
  Samples padded to fill the last chunk are zeros and are dropped.
  """
  n = arrays[0].shape[0]
  num = -(-n // chunk)
  if num * chunk != n:
    arrays = [jnp.pad(a, ((0, num * chunk - n),) + ((0, 0),) * (a.ndim - 1)) for a in arrays]
  chunks = [a.reshape(chunk, num, *a.shape[1:]) for a in arrays]
  chunk_spec = dataclasses.replace(spec, geometry=dataclasses.replace(spec.geometry, batch=chunk))
  take = lambda k: [
    *(lax.dynamic_index_in_dim(a, k, axis=1, keepdims=False) for a in chunks),
    chunk_spec,
  ]
  zero = jnp.zeros((), jnp.int32)
  first = jax.eval_shape(lambda: fn(*take(zero)))
  if reduce:
    init = jnp.zeros(first.shape, first.dtype)
    step = lambda acc, k: (acc + fn(*take(k)), None)
  else:
    shape = (first.shape[0], num, *first.shape[1:])
    x_spec = explicit_spec(arrays[0])
    init = jnp.zeros(
      shape,
      first.dtype,
      out_sharding=None if x_spec is None else jax.sharding.PartitionSpec(x_spec[0]),
    )
    step = lambda y, k: (
      lax.dynamic_update_index_in_dim(y, fn(*take(k))[:, None], k, axis=1),
      None,
    )
  y, _ = lax.scan(step, init, jnp.arange(num, dtype=jnp.int32))
  return y if reduce else y.reshape(-1, *y.shape[2:])[:n]
