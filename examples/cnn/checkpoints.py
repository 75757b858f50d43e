"""Checkpoints: process 0 saves the replicated state with Orbax; resuming picks the newest usable.

Every process holds the same parameters and optimiser state, so process 0 alone writes them (as
host arrays, with Orbax told that it is the only active process) and, on resume, reads them and
broadcasts them to the others: ``--out`` need not be shared between processes.

A checkpoint ``<out>/checkpoints/<epoch>/`` holds ``state`` (parameters and optimiser state),
``meta`` (the flags and the history so far, JSON) and ``integrity`` (a SHA-256 of the state's
bytes). A checkpoint is used only if Orbax finished writing it, its metadata parse, its flags
match, its arrays read back with the recorded digest and all are finite; otherwise the next
older one is tried.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from examples.cnn.errors import FlagError, NoCheckpointError, OutDirInUseError

# Flags that fix the sequence of batches and updates: resuming with other values would not
# continue the same run.
RESUME_FLAGS = ("data", "batch_size", "seed", "optimizer", "lr", "momentum", "train_limit")
# Checkpoints kept in <out>/checkpoints: the newest two (older ones are deleted as new ones land),
# so that a damaged newest checkpoint still leaves one to resume from.
MAX_TO_KEEP = 2


def checkpoint_dir(out: Path) -> Path:
  return Path(out).absolute() / "checkpoints"


def checkpoint_manager(out: Path):
  """An Orbax manager of ``<out>/checkpoints`` used by this process alone (process 0)."""
  import orbax.checkpoint as ocp

  directory = checkpoint_dir(out)
  directory.mkdir(parents=True, exist_ok=True)
  # Synchronous saves: the run is short and a finished epoch should be on disk when it says so.
  # active_processes={0}: no other process takes part (or needs to see this directory).
  options = ocp.CheckpointManagerOptions(
    max_to_keep=MAX_TO_KEEP,
    enable_async_checkpointing=False,
    create=False,
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=0, active_processes={jax.process_index()}
    ),
  )
  return ocp.CheckpointManager(directory, options=options)


def host_tree(tree: Any) -> Any:
  """A tree of replicated jax Arrays (or host arrays) as NumPy arrays, from this process."""

  def host(x):
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)

  return jax.tree.map(host, tree)


def state_digest(state: Any) -> str:
  """SHA-256 of every leaf's dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def json_safe(value: Any) -> Any:
  """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
  if isinstance(value, dict):
    return {key: json_safe(item) for key, item in value.items()}
  if isinstance(value, list | tuple):
    return [json_safe(item) for item in value]
  if isinstance(value, float | np.floating) and not math.isfinite(value):
    return None
  return value


def save_checkpoint(manager, epoch: int, params, opt_state, meta: dict) -> bool:
  """Saves the state after ``epoch``, the run's ``meta`` (JSON) and the state's digest as Orbax
  step ``epoch``; returns whether Orbax wrote it."""
  import orbax.checkpoint as ocp

  state = host_tree({"params": params, "opt_state": opt_state})
  return bool(
    manager.save(
      epoch,
      force=True,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(json_safe(meta)),
        integrity=ocp.args.JsonSave({"state_sha256": state_digest(state)}),
      ),
    )
  )


def _reason(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def check_resume_config(saved: dict, config: dict, out: Path) -> None:
  for name in RESUME_FLAGS:
    if saved.get(name) != config[name]:
      raise FlagError(
        f"train_cnn: `--{name.replace('_', '-')}` (={config[name]}) differs from the "
        f"checkpoint's (={saved.get(name)}) in {str(out)!r}; a resumed run must keep the flags "
        f"that fix the batches and updates: {', '.join(RESUME_FLAGS)}"
      )


def refuse_other_run(manager, out: Path) -> None:
  """Raises unless ``<out>/checkpoints`` is free of complete checkpoints (a run without
  --resume would otherwise mix its epochs with another run's)."""
  steps = sorted(manager.all_steps())
  if steps:
    raise OutDirInUseError(
      f"train_cnn: `--out` {str(out)!r} already holds checkpoints of a run (epochs "
      f"{', '.join(map(str, steps))}); pass --resume to continue that run, or choose another "
      f"--out"
    )


def restore_checkpoint(
  manager,
  params,
  opt_state,
  config: dict | None = None,
  on_skip: Callable[[int, str], None] | None = None,
):
  """``(epoch, params, opt_state, meta)`` of the newest usable checkpoint, as NumPy arrays.

  ``params`` and ``opt_state`` give the tree structure, shapes and dtypes. Newer checkpoints
  that are unreadable, fail their digest or hold non-finite values are skipped, each reported
  through ``on_skip(epoch, reason)``. With ``config`` (the current flags), the first readable
  checkpoint's flags must match it.

  Raises:
    NoCheckpointError: no checkpoint, or none usable (the message lists why).
    FlagError: the flags differ from the checkpoint's in one of RESUME_FLAGS.
  """
  import orbax.checkpoint as ocp

  directory = Path(manager.directory)
  target = host_tree({"params": params, "opt_state": opt_state})
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    partial = sorted(p.name for p in directory.glob("*.orbax-checkpoint-tmp*"))
    detail = f" (only unfinished saves: {', '.join(partial)})" if partial else ""
    raise NoCheckpointError(
      f"train_cnn: no checkpoint in {str(directory)!r}{detail}; run "
      f"without --resume to start afresh"
    )
  skipped = []

  def skip(step, reason):
    skipped.append(f"epoch {step}: {reason}")
    if on_skip is not None:
      on_skip(step, reason)

  for step in steps:
    try:
      restored = manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore())
      )
      meta, integrity = restored["meta"], restored["integrity"]
      digest = integrity["state_sha256"]
      if not isinstance(meta, dict) or not isinstance(meta.get("history"), dict):
        raise ValueError("its metadata is not a run's")
    except Exception as error:  # any failure to read makes the checkpoint unusable
      skip(step, f"unreadable metadata ({_reason(error)})")
      continue
    if config is not None:
      check_resume_config(meta.get("config", {}), config, directory.parent)
    try:
      state = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )["state"]
      state = host_tree(state)
    except Exception as error:  # likewise
      skip(step, f"unreadable arrays ({_reason(error)})")
      continue
    if state_digest(state) != digest:
      skip(step, "its arrays differ from what was saved (digest mismatch)")
      continue
    if not all(
      np.all(np.isfinite(leaf))
      for leaf in jax.tree.leaves(state)
      if np.issubdtype(leaf.dtype, np.inexact)
    ):
      skip(step, "it holds non-finite values")
      continue
    return step, state["params"], state["opt_state"], meta
  raise NoCheckpointError(
    f"train_cnn: no usable checkpoint in {str(directory)!r} ("
    f"{'; '.join(skipped)}); run without --resume to start afresh"
  )


def set_aside(manager, out: Path, epochs: list[int]) -> list[Path]:
  """Moves the checkpoints of ``epochs`` (found unusable) to ``<out>/damaged-checkpoints/``
  so that the resumed run can save those epochs again; returns where they went."""
  moved = []
  for step in epochs:
    source = checkpoint_dir(out) / str(step)
    if source.is_dir():
      target = Path(out).absolute() / "damaged-checkpoints" / f"{step}-{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
      moved.append(target)
  manager.reload()
  return moved
