"""Train a small CNN whose convolutions are convmm's (im2col + GEMM), data-parallel with JAX.

The default run trains on scikit-learn's handwritten digits (1,797 8x8 images, no download).
From the repository root:

  python -m examples.cnn.main                       # convmm convolutions, one device
  python -m examples.cnn.main --conv lax            # Flax's own convolutions, for comparison
  python -m examples.cnn.main --conv replace        # Flax's own model, in convmm.replace_convs
  python -m examples.cnn.main --devices 2           # data-parallel over 2 (host) devices
  python -m examples.cnn.main --data mnist --data-dir ~/data/mnist   # IDX files you already have

Two processes (two terminals or two hosts; each --out may be its own local directory: process
0 writes the outputs and checkpoints, the others receive what they need by broadcast):

  python -m examples.cnn.main --num-processes 2 --process-id 0 --coordinator 127.0.0.1:1234 \
      --out runs/mp
  python -m examples.cnn.main --num-processes 2 --process-id 1 --coordinator 127.0.0.1:1234 \
      --out runs/mp

If a process dies, the others stop at once with a one-line message; if one hangs, JAX's
coordination service stops the others after --heartbeat-timeout seconds (with its own message).

Continue a run from its newest usable checkpoint, e.g. to 30 epochs in total:

  python -m examples.cnn.main --out runs/a --epochs 30 --resume

A checkpoint that is incomplete, unreadable, altered or non-finite is skipped (and moved to
<out>/damaged-checkpoints/) in favour of the previous one; with none usable, --resume stops with
a one-line error and exit status 1. Without --resume, an --out that holds checkpoints is refused.

The global batch and the order of batches depend only on --seed and --batch-size, never on the
number of devices or processes, so every layout computes the same losses up to float rounding.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

import convmm
from examples.cnn import input_pipeline, models, parallel, train
from examples.cnn.errors import UsageError
from examples.cnn.train import DEFAULT_LR


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows a flag's default in ``--help`` unless it has none to show (None, or False for a
  switch); a flag whose default depends on others says so in its own help."""

  def _get_help_string(self, action: argparse.Action) -> str | None:
    if action.default is None or action.default is False:
      return action.help
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags of :func:`main`."""
  parser = argparse.ArgumentParser(
    prog="python -m examples.cnn.main",
    description=__doc__.split("\n\n")[0],
    formatter_class=HelpFormatter,
  )
  add = parser.add_argument
  add("--epochs", type=int, default=12, help="total number of epochs (counting resumed ones)")
  add(
    "--batch-size",
    type=int,
    default=32,
    help="global batch size; must be divisible by the total number of devices",
  )
  add("--lr", type=float, default=None, help="learning rate (default: 1e-3 for adam, 0.05 for sgd)")
  add("--optimizer", choices=("adam", "sgd"), default="adam", help="optax optimiser")
  add("--momentum", type=float, default=0.9, help="momentum of --optimizer sgd")
  add("--seed", type=int, default=0, help="seed of the initial parameters and the batch order")
  add(
    "--conv",
    choices=models.CONVS,
    default="convmm",
    help="what computes the convolutions: convmm's layers (im2col + GEMM), Flax's own (lax), "
    "or Flax's own model wrapped in convmm.replace_convs (replace)",
  )
  add(
    "--method",
    choices=("auto", "autotune", "xla", "convmm", "im2col", "shift", "depthwise"),
    default="auto",
    help="who computes each direction of a convolution (set with convmm's method setting): a "
    "rule table (auto), timing (autotune), XLA's convolution (xla), or convmm's engine only",
  )
  add(
    "--devices",
    type=int,
    default=1,
    help="local devices per process for data parallelism (on CPU, JAX is asked for this many "
    "devices through jax_num_cpu_devices)",
  )
  add("--num-processes", type=int, default=1, help="number of processes (jax.distributed)")
  add("--process-id", type=int, default=0, help="index of this process, 0 .. num-processes - 1")
  add(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="address of process 0's coordinator service (required with --num-processes > 1)",
  )
  add(
    "--init-timeout",
    type=int,
    default=300,
    help="seconds to wait for all processes to join the coordinator",
  )
  add(
    "--heartbeat-timeout",
    type=int,
    default=30,
    help="seconds after which a process that stopped responding is declared dead and the "
    "others stop",
  )
  add(
    "--data",
    choices=("digits", "mnist"),
    default="digits",
    help="digits: scikit-learn's 8x8 digits; mnist: MNIST-format IDX files in --data-dir",
  )
  add(
    "--data-dir",
    type=Path,
    default=None,
    help="directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (MNIST or "
    "Fashion-MNIST)",
  )
  add("--train-limit", type=int, default=None, help="use only the first N training examples")
  add("--test-limit", type=int, default=None, help="use only the first N test examples")
  add("--eval-batch-size", type=int, default=500, help="examples per evaluation batch")
  add(
    "--out",
    type=Path,
    default=None,
    help="output directory for metrics.json, the plot and checkpoints (default: runs/<timestamp>)",
  )
  add(
    "--resume",
    action="store_true",
    help="continue from the newest usable checkpoint in --out up to --epochs",
  )
  add("--no-progress", action="store_true", help="do not show progress bars")
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses and checks the flags; a value out of range is a one-line usage error (exit 2)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  minimums = {
    "epochs": 0,
    "batch_size": 1,
    "devices": 1,
    "num_processes": 1,
    "eval_batch_size": 1,
    "seed": 0,
    "init_timeout": 1,
    "heartbeat_timeout": 1,
    "train_limit": 1,
    "test_limit": 1,
  }
  for name, minimum in minimums.items():
    value = getattr(args, name)
    if value is not None and value < minimum:
      parser.error(f"`--{name.replace('_', '-')}` must be at least {minimum}, got {value}")
  if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
    parser.error(f"`--lr` must be a positive finite number, got {args.lr}")
  if not (math.isfinite(args.momentum) and 0 <= args.momentum < 1):
    parser.error(f"`--momentum` must be in [0, 1), got {args.momentum}")
  if args.num_processes > 1 and args.coordinator is None:
    parser.error(f"`--coordinator HOST:PORT` is required with --num-processes {args.num_processes}")
  if not 0 <= args.process_id < args.num_processes:
    parser.error(f"`--process-id` must be in [0, {args.num_processes}), got {args.process_id}")
  total_devices = args.devices * args.num_processes
  if args.batch_size % total_devices:
    parser.error(
      f"`--batch-size` ({args.batch_size}) must be divisible by the total number of "
      f"devices ({args.devices} x {args.num_processes} processes = {total_devices})"
    )
  if args.data == "mnist" and args.data_dir is None:
    parser.error("`--data mnist` needs `--data-dir DIR` (nothing is downloaded)")
  if args.data == "mnist" and (missing := input_pipeline.missing_mnist_files(args.data_dir)):
    parser.error(
      f"`--data-dir` {str(args.data_dir)!r} holds no IDX file of the MNIST {', '.join(missing)} "
      f"(e.g. {input_pipeline.idx_names(*missing[0].split())[0]}, plain or .gz)"
    )
  if args.resume and args.out is None:
    parser.error("`--resume` continues the run in `--out DIR`; give --out")
  if args.out is not None and args.out.exists() and not args.out.is_dir():
    parser.error(f"`--out` {str(args.out)!r} exists and is not a directory")
  if args.lr is None:
    args.lr = DEFAULT_LR[args.optimizer]
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Trains the CNN as the flags say; returns the metrics also written to metrics.json.

  Raises:
    UsageError: (a ValueError, FileNotFoundError or FileExistsError) a flag, --out or its
      checkpoints do not allow the run; the message is one line.
  """
  wall_start = time.perf_counter()
  args = parse_args(argv)
  parallel.start_jax(args)
  try:
    with convmm.default_method(args.method):
      return train.train_and_evaluate(args, wall_start)
  except Exception as error:
    if not parallel.is_peer_failure(error):
      raise
    # Another process is gone: say so in one line and leave at once. jax.distributed.shutdown
    # would wait for the missing process (and JAX stops the process anyway when the
    # coordination service reports the failure).
    print(parallel.peer_failure_message(error), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  finally:
    if args.num_processes > 1:
      jax.distributed.shutdown()


def cli(argv: Sequence[str] | None = None) -> None:
  """The command line: :func:`main`, with a usage error printed as one line (exit status 1)."""
  try:
    main(argv)
  except UsageError as error:
    print(error, file=sys.stderr, flush=True)  # the message names the program and the flag
    sys.exit(1)


if __name__ == "__main__":
  cli()
