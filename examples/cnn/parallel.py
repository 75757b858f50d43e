"""Data parallelism with ``jax.sharding``, over the devices of one or several processes.

A 1-D mesh over every device splits each global batch along 'data' and keeps a full copy of the
parameters on every device; XLA turns the gradient into per-device partial sums plus an
all-reduce. Processes join through ``jax.distributed`` (CPU collectives over Gloo). Process 0
alone reads and writes files; what the others need (the run directory's name, a restored
state, an error) reaches them by broadcast, so the processes need no shared filesystem.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class DataParallel(NamedTuple):
  """A 1-D mesh over every device of every process, with the batch split along 'data'."""

  mesh: Mesh
  batch: NamedSharding  # leading (batch) axis split over 'data'
  replicated: NamedSharding  # a full copy on every device

  @classmethod
  def over(cls, devices: Sequence[jax.Device] | None = None) -> DataParallel:
    devices = jax.devices() if devices is None else devices
    # jax.devices() is ordered by process, so each process owns one contiguous block of rows.
    mesh = Mesh(np.asarray(devices), ("data",))
    return cls(mesh, NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))

  def put_batch(self, global_batch: np.ndarray) -> jax.Array:
    """The global batch as one sharded array; this process contributes only its own rows.

    Every process holds the whole global batch here (the data is small), but only its rows
    are passed on, as a multi-host input pipeline that reads its own shard would.
    """
    rows = [
      index[0] for index in self.batch.addressable_devices_indices_map(global_batch.shape).values()
    ]
    start = min(r.indices(len(global_batch))[0] for r in rows)
    stop = max(r.indices(len(global_batch))[1] for r in rows)
    return jax.make_array_from_process_local_data(
      self.batch, global_batch[start:stop], global_batch.shape
    )

  def put_replicated(self, tree: Any) -> Any:
    """A tree of host arrays (the same values in every process) as replicated jax Arrays."""

    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

    return jax.tree.map(put, tree)


def host_value(x: jax.Array) -> np.ndarray:
  """A replicated array's value, read from this process's own copy."""
  return np.asarray(x.addressable_data(0))


def data_devices(per_process: int) -> list[jax.Device]:
  """The first ``per_process`` devices of every process, ordered by process."""
  return [
    device
    for process in range(jax.process_count())
    for device in sorted(
      (d for d in jax.devices() if d.process_index == process), key=lambda d: d.id
    )[:per_process]
  ]


def start_jax(args: argparse.Namespace) -> None:
  """Joins the other processes (if any) and checks that the devices asked for exist.

  On CPU, ``jax_num_cpu_devices`` gives this process ``--devices`` devices; JAX reads it when
  its backend starts, so it only takes effect before the first JAX computation.
  """
  if args.devices > 1 and jax.config.jax_num_cpu_devices != args.devices:
    try:
      jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:  # the backend has started: checked below
      pass
  if args.num_processes > 1:
    # Gloo is JAX's TCP implementation of cross-process collectives on CPU (the default in
    # jax 0.10; set explicitly because without it CPU processes cannot all-reduce).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A process that stops sending heartbeats for heartbeat_timeout_seconds is declared dead and
    # the others are stopped; one that exits is noticed at once by the next collective.
    jax.distributed.initialize(
      args.coordinator,
      args.num_processes,
      args.process_id,
      initialization_timeout=args.init_timeout,
      heartbeat_timeout_seconds=args.heartbeat_timeout,
    )
  if jax.local_device_count() < args.devices:
    raise ValueError(
      f"train_cnn: `--devices` (={args.devices}) exceeds the {jax.local_device_count()} local "
      f"{jax.default_backend()} devices JAX started with; on CPU run the example from the "
      f"command line (it sets jax_num_cpu_devices before JAX starts) or call "
      f"jax.config.update('jax_num_cpu_devices', {args.devices}) right after importing jax"
    )


def is_peer_failure(error: BaseException) -> bool:
  """Whether ``error`` is a failed cross-process collective or coordination call (another
  process died, hung or cannot be reached). JAX raises these as JaxRuntimeError or, from some
  collectives, ValueError, with a text that names Gloo or the coordination service."""
  if jax.process_count() <= 1 or not isinstance(error, RuntimeError | ValueError):
    return False
  return any(
    marker in str(error)
    for marker in (
      "Gloo",
      "Connection closed",
      "Connection reset",
      "coordination service",
      "CoordinationService",
      "DEADLINE_EXCEEDED",
      "UNAVAILABLE",
    )
  )


def peer_failure_message(error: BaseException) -> str:
  """One line for the log of a process whose collective failed."""
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return (
    f"train_cnn: process {jax.process_index()} of {jax.process_count()}: stopping, a "
    f"collective with the other processes failed (another process died or cannot be "
    f"reached): {first_line[:300]}"
  )


def broadcast_json(value: Any) -> Any:
  """Process 0's ``value`` (anything JSON can hold) in every process."""
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else None
  size = int(multihost_utils.broadcast_one_to_all(np.int64(0 if data is None else data.size)))
  buffer = data if data is not None else np.zeros(size, np.uint8)
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())


def broadcast_tree(tree: Any) -> Any:
  """Process 0's tree of host arrays in every process (the others pass any tree of the same
  shapes and dtypes, e.g. their own initial state)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def default_out_dir() -> Path:
  """runs/<timestamp>, the same in every process (process 0's clock decides)."""
  stamp = broadcast_json(int(time.time()))
  return Path("runs") / datetime.datetime.fromtimestamp(stamp).strftime("%Y%m%d-%H%M%S")
