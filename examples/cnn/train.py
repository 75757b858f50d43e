"""Training and evaluation: the jitted steps, the epoch loop, checkpoints and the outputs.

:func:`train_and_evaluate` is the body of ``python -m examples.cnn.main`` once JAX knows its
devices and processes; the steps and :func:`evaluate` are also used on their own (the notebook).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding

from examples.cnn import checkpoints, input_pipeline, models, parallel
from examples.cnn.errors import DataError, FlagError, NoCheckpointError, OutDirInUseError
from examples.cnn.input_pipeline import Dataset
from examples.cnn.parallel import DataParallel, host_value

DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy against integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(model: nn.Module, params: Any, images: jax.Array, labels: jax.Array):
  """``(mean cross-entropy, logits)`` of a linen model on one batch."""
  logits = models.apply(model, {"params": params}, images)
  return cross_entropy(logits, labels), logits


def make_optimizer(
  name: str = "adam", lr: float | None = None, momentum: float = 0.9
) -> optax.GradientTransformation:
  """adam, or sgd with (heavy-ball) momentum."""
  lr = DEFAULT_LR[name] if lr is None else lr
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr, momentum=momentum)
  raise ValueError(f"make_optimizer: `name` must be 'adam' or 'sgd', got {name!r}")


def make_train_step(
  model: nn.Module, tx: optax.GradientTransformation, replicated: NamedSharding | None = None
) -> Callable[..., Any]:
  """A jitted ``(params, opt_state, images, labels) -> (params, opt_state, loss, accuracy)``.

  With a batch sharded over a mesh and ``replicated`` parameters, XLA turns the gradient into
  a per-device partial sum plus an all-reduce: the usual data parallelism, with no explicit
  collective in this code.
  """

  def train_step(params, opt_state, images, labels):
    (loss, logits), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
      model, params, images, labels
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return params, opt_state, loss, accuracy

  return jax.jit(train_step, out_shardings=replicated)


def make_eval_step(model: nn.Module, replicated: NamedSharding | None = None):
  """A jitted ``(params, images, labels, weights) -> (sum of loss, number correct)``."""

  def eval_step(params, images, labels, weights):
    logits = models.apply(model, {"params": params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(losses * weights), jnp.sum(correct * weights)

  return jax.jit(eval_step, out_shardings=replicated)


def _initializer(
  model: nn.Module, tx: optax.GradientTransformation, image_shape: Sequence[int], seed: int
) -> Callable[[], Any]:
  def init():
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    # XLA's RngBitGenerator compiles several times faster on CPU than the default threefry,
    # and the key is used only here.
    params = model.init(jax.random.key(seed, impl="rbg"), dummy)["params"]
    return params, tx.init(params)

  return init


def init_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_shape: Sequence[int],
  seed: int,
  replicated: NamedSharding | None = None,
):
  """Initial ``(params, opt_state)``, created directly with the ``replicated`` sharding."""
  return jax.jit(_initializer(model, tx, image_shape, seed), out_shardings=replicated)()


def state_template(
  model: nn.Module, tx: optax.GradientTransformation, image_shape: Sequence[int]
) -> Any:
  """Zeros shaped like ``(params, opt_state)``, as host arrays, without compiling anything:
  the tree a checkpoint is restored into."""
  shapes = jax.eval_shape(_initializer(model, tx, image_shape, seed=0))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def evaluate(
  eval_step,
  params,
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  put: Callable[[np.ndarray], jax.Array] = jnp.asarray,
) -> tuple[float, float]:
  """``(mean loss, accuracy)`` over all examples, in batches of exactly ``batch_size``.

  The last batch is zero-padded and the padding has weight 0, so one compiled step serves
  every batch and ``batch_size`` can be any multiple of the device count.
  """
  total_loss = total_correct = 0.0
  for start in range(0, len(labels), batch_size):
    chunk = slice(start, start + batch_size)
    count = len(labels[chunk])
    pad = batch_size - count
    batch_images = np.pad(images[chunk], [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    batch_labels = np.pad(labels[chunk], (0, pad))
    weights = np.pad(np.ones(count, np.float32), (0, pad))
    loss_sum, correct = eval_step(params, put(batch_images), put(batch_labels), put(weights))
    total_loss += float(host_value(loss_sum))
    total_correct += float(host_value(correct))
  return total_loss / len(labels), total_correct / len(labels)


def train_epoch(
  train_step,
  params,
  opt_state,
  data: Dataset,
  order: np.ndarray,
  batch_size: int,
  parallel: DataParallel,
  progress,
):
  """One pass over ``order`` in global batches; returns the state, mean loss and accuracy."""
  losses, accuracies = [], []
  for step in progress:
    batch = order[step * batch_size : (step + 1) * batch_size]
    params, opt_state, loss, accuracy = train_step(
      params,
      opt_state,
      parallel.put_batch(data.train_images[batch]),
      parallel.put_batch(data.train_labels[batch]),
    )
    losses.append(loss)
    accuracies.append(accuracy)
    if step % 10 == 0:  # reading the loss waits for the step; do it now and then
      progress.set_postfix(loss=f"{float(host_value(loss)):.4f}")
  return (
    params,
    opt_state,
    float(np.mean([host_value(x) for x in losses])),
    float(np.mean([host_value(x) for x in accuracies])),
  )


def save_plot(history: dict, path: Path) -> None:
  """Loss and accuracy per epoch, side by side, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  epochs = range(1, len(history["train_loss"]) + 1)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
  ax_loss.plot(epochs, history["train_loss"], "o-", label="train")
  ax_loss.plot(epochs, history["test_loss"], "s--", label="test")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
  ax_acc.plot(epochs, history["train_accuracy"], "o-", label="train")
  ax_acc.plot(epochs, history["test_accuracy"], "s--", label="test")
  ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary_table(history: dict) -> str:
  """One row per epoch: losses, accuracies and seconds."""
  lines = [
    f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'test_loss':>9} "
    f"{'test_acc':>8} {'seconds':>7}"
  ]
  for i, row in enumerate(
    zip(
      history["train_loss"],
      history["train_accuracy"],
      history["test_loss"],
      history["test_accuracy"],
      history["epoch_seconds"],
    )
  ):
    lines.append(
      f"{i + 1:>5} {row[0]:>10.4f} {row[1]:>9.4f} {row[2]:>9.4f} {row[3]:>8.4f} {row[4]:>7.2f}"
    )
  return "\n".join(lines)


HISTORY_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds")
# What process 0 may report instead of a start point; every process raises the same error.
START_ERRORS = {cls.__name__: cls for cls in (FlagError, NoCheckpointError, OutDirInUseError)}


def find_start(
  args: argparse.Namespace, out: Path, params, opt_state, config: dict, log: Callable[..., None]
) -> tuple[dict, Any, Any]:
  """Process 0's decision on where the run starts, as ``(outcome, state, manager)``.

  ``outcome`` (JSON, broadcast to every process) is ``{"epoch": e, "history": ...}`` or
  ``{"error": [class name, message]}``; ``state`` is the restored ``(params, opt_state)`` as host
  arrays, or None for a fresh start; ``manager`` saves the run's checkpoints (None on error).
  """
  directory = checkpoints.checkpoint_dir(out)
  if args.resume and not directory.is_dir():  # create nothing
    message = (
      f"train_cnn: no checkpoint in {str(directory)!r} (no such directory); run "
      f"without --resume to start afresh"
    )
    return {"error": [NoCheckpointError.__name__, message]}, None, None
  out.mkdir(parents=True, exist_ok=True)
  manager = checkpoints.checkpoint_manager(out)
  outcome, state = _find_start(args, out, manager, params, opt_state, config, log)
  if "error" in outcome:
    manager.close()
    manager = None
  return outcome, state, manager


def _find_start(args, out, manager, params, opt_state, config, log):
  try:
    if not args.resume:
      checkpoints.refuse_other_run(manager, out)
      return {"epoch": 0, "history": None}, None
    skipped = []

    def on_skip(epoch, reason):
      skipped.append(epoch)
      log(
        f"skipping the checkpoint of epoch {epoch} in {checkpoints.checkpoint_dir(out)}: {reason}"
      )

    epoch, params, opt_state, meta = checkpoints.restore_checkpoint(
      manager, params, opt_state, config, on_skip
    )
    for moved in checkpoints.set_aside(manager, out, skipped):
      log(f"moved the unusable checkpoint to {moved}")
    log(
      f"resuming {out} after epoch {epoch} (checkpoint "
      f"{checkpoints.checkpoint_dir(out) / str(epoch)})"
    )
    # JSON keeps a NaN loss as null; the history in memory holds floats.
    history = {
      key: [math.nan if value is None else value for value in meta["history"][key]]
      for key in HISTORY_KEYS
    }
    return {"epoch": epoch, "history": history}, (params, opt_state)
  except tuple(START_ERRORS.values()) as error:
    return {"error": [type(error).__name__, str(error)]}, None


def train_and_evaluate(args: argparse.Namespace, wall_start: float) -> dict:
  """Trains and evaluates the CNN as the flags say; returns the metrics (also in metrics.json).

  Every process runs this; process 0 alone reads and writes ``--out`` and prints the log.
  """
  from tqdm import tqdm

  is_main = jax.process_index() == 0
  log = print if is_main else (lambda *a, **k: None)
  devices = parallel.data_devices(args.devices)
  data_parallel = DataParallel.over(devices)
  default_out = parallel.default_out_dir()  # a collective: every process calls it
  out = args.out if args.out is not None else default_out

  try:
    data = input_pipeline.load_data(args)
  except ValueError as error:  # read_idx and load_mnist name the file and what is wrong with it
    raise DataError(f"train_cnn: `--data-dir`: {error}") from None
  steps_per_epoch = len(data.train_labels) // args.batch_size  # the last partial batch is dropped
  if steps_per_epoch == 0:
    raise FlagError(
      f"train_cnn: `--batch-size` (={args.batch_size}) exceeds the "
      f"{len(data.train_labels)} training examples"
    )
  eval_batch = min(args.eval_batch_size, len(data.test_labels))
  eval_batch = -(-eval_batch // len(devices)) * len(devices)  # a multiple of the device count

  model = models.CNN(conv=args.conv)
  tx = make_optimizer(args.optimizer, args.lr, args.momentum)
  image_shape = data.train_images.shape[1:]
  template = state_template(model, tx, image_shape)
  config = {name: (str(v) if isinstance(v, Path) else v) for name, v in vars(args).items()}

  # Process 0 checks --out and, with --resume, restores a checkpoint, before anything compiles.
  outcome, restored, manager = {}, None, None
  if is_main:
    outcome, restored, manager = find_start(args, out, *template, config, log)
  outcome = parallel.broadcast_json(outcome)
  if "error" in outcome:
    kind, message = outcome["error"]
    raise START_ERRORS[kind](message)
  start_epoch = outcome["epoch"]
  history = outcome["history"] or {key: [] for key in HISTORY_KEYS}
  if start_epoch:
    # Process 0 restored the state; the others pass their template and receive it.
    params, opt_state = data_parallel.put_replicated(
      parallel.broadcast_tree(restored if restored is not None else template)
    )
  else:
    params, opt_state = init_state(model, tx, image_shape, args.seed, data_parallel.replicated)

  def evaluate_test(params):
    return evaluate(
      eval_step, params, data.test_images, data.test_labels, eval_batch, data_parallel.put_batch
    )

  eval_step = make_eval_step(model, data_parallel.replicated)
  compile_start = time.perf_counter()
  example = [
    data_parallel.put_batch(x[: args.batch_size]) for x in (data.train_images, data.train_labels)
  ]
  train_step = (
    make_train_step(model, tx, data_parallel.replicated)
    .lower(params, opt_state, *example)
    .compile()
  )
  compile_seconds = time.perf_counter() - compile_start

  log(
    f"training a CNN with {args.conv} convolutions on {args.data}: {len(data.train_labels)} "
    f"train / {len(data.test_labels)} test examples, batch {args.batch_size} over "
    f"{len(devices)} device(s) in {jax.process_count()} process(es)"
  )
  test_loss, test_accuracy = None, None
  saved_epochs = []
  for epoch in range(start_epoch + 1, args.epochs + 1):
    epoch_start = time.perf_counter()
    progress = tqdm(
      range(steps_per_epoch),
      desc=f"epoch {epoch}/{args.epochs}",
      unit="step",
      disable=not is_main or args.no_progress,
      leave=False,
      dynamic_ncols=True,
    )
    params, opt_state, train_loss, train_accuracy = train_epoch(
      train_step,
      params,
      opt_state,
      data,
      input_pipeline.epoch_order(len(data.train_labels), args.seed, epoch),
      args.batch_size,
      data_parallel,
      progress,
    )
    epoch_seconds = time.perf_counter() - epoch_start
    test_loss, test_accuracy = evaluate_test(params)
    for key, value in zip(
      HISTORY_KEYS, (train_loss, train_accuracy, test_loss, test_accuracy, epoch_seconds)
    ):
      history[key].append(value)
    log(
      f"epoch {epoch}/{args.epochs}: train_loss={train_loss:.4f} "
      f"test_accuracy={test_accuracy:.4f} ({epoch_seconds:.2f}s)",
      flush=True,
    )
    if is_main:
      meta = {"epoch": epoch, "config": config, "history": history}
      if not checkpoints.save_checkpoint(manager, epoch, params, opt_state, meta):
        raise RuntimeError(
          f"train_cnn: Orbax did not save the checkpoint of epoch {epoch} in "
          f"{str(checkpoints.checkpoint_dir(out))!r}"
        )
      saved_epochs.append(epoch)
  # The manager keeps the newest checkpoints only (checkpoints.MAX_TO_KEEP): list those.
  kept_epochs = sorted(set(manager.all_steps()) & set(saved_epochs)) if manager else []
  if manager is not None:
    manager.close()
  if test_accuracy is None:  # nothing left to train (e.g. resumed at --epochs)
    test_loss, test_accuracy = evaluate_test(params)

  metrics = {
    "test_accuracy": test_accuracy,
    "test_loss": test_loss,
    **{key: history[key] for key in ("train_loss", "train_accuracy", "epoch_seconds")},
    "test_accuracy_per_epoch": history["test_accuracy"],
    "test_loss_per_epoch": history["test_loss"],
    "conv": args.conv,
    "devices": len(devices),
    "local_devices": args.devices,
    "processes": jax.process_count(),
    "platform": jax.default_backend(),
    "data": args.data,
    "num_train": len(data.train_labels),
    "num_test": len(data.test_labels),
    "epochs": len(history["train_loss"]),
    "resumed_from_epoch": start_epoch if args.resume else None,
    "steps_per_epoch": steps_per_epoch,
    "batch_size": args.batch_size,
    "optimizer": args.optimizer,
    "lr": args.lr,
    "seed": args.seed,
    "num_params": sum(x.size for x in jax.tree.leaves(params)),
    "compile_seconds": compile_seconds,  # the train step's; excluded from epoch_seconds
    "wall_seconds": time.perf_counter() - wall_start,  # main(), after Python's imports
    "jax_version": jax.__version__,
    "out": str(out),
  }
  metrics = checkpoints.json_safe(metrics)
  if is_main:
    write_outputs(metrics, history, out, kept_epochs)
  print(f"test_accuracy={test_accuracy:.4f}", flush=True)
  return metrics


def epoch_ranges(epochs: Sequence[int]) -> str:
  """``"epoch 3"``, ``"epochs 11-12"`` or ``"epochs 1, 4-5"`` for sorted epoch numbers.

  >>> epoch_ranges([3]), epoch_ranges([11, 12]), epoch_ranges([1, 4, 5])
  ('epoch 3', 'epochs 11-12', 'epochs 1, 4-5')
  """
  runs: list[list[int]] = []
  for epoch in epochs:
    if runs and epoch == runs[-1][-1] + 1:
      runs[-1].append(epoch)
    else:
      runs.append([epoch])
  text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
  return f"epoch{'s' if len(epochs) > 1 else ''} {text}"


def write_outputs(metrics: dict, history: dict, out: Path, kept_epochs: Sequence[int]) -> None:
  """metrics.json, the plot, the summary table and a list of what was written, on stdout.

  ``kept_epochs``: the epochs of this run whose checkpoints are on disk at the end.
  """
  written = [out / "metrics.json"]
  # allow_nan=False: a diverged run's NaN losses are already null, and must stay valid JSON.
  (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
  if history["train_loss"]:
    save_plot(history, out / "training.png")
    written.append(out / "training.png")
  print()
  print(summary_table(history))
  print(
    f"\nconv={metrics['conv']} devices={metrics['devices']} "
    f"processes={metrics['processes']} params={metrics['num_params']} "
    f"compile={metrics['compile_seconds']:.1f}s train={sum(history['epoch_seconds']):.1f}s "
    f"wall={metrics['wall_seconds']:.1f}s"
  )
  saved = ""
  if kept_epochs:
    saved = f", checkpoints of {epoch_ranges(kept_epochs)} in {checkpoints.checkpoint_dir(out)}"
  print(f"wrote {', '.join(map(str, written))}{saved}")
