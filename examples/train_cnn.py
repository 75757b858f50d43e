"""Train a small CNN whose convolutions are convmm's (im2col + GEMM), data-parallel with JAX.

The default run trains on scikit-learn's handwritten digits (1,797 8x8 images, no download):

  python examples/train_cnn.py                       # convmm convolutions, one device
  python examples/train_cnn.py --conv lax            # Flax's own convolutions, for comparison
  python examples/train_cnn.py --devices 2           # data-parallel over 2 (host) devices
  python examples/train_cnn.py --data mnist --data-dir ~/data/mnist   # IDX files you already have

Two processes (two terminals, or two hosts sharing the --out directory):

  python examples/train_cnn.py --num-processes 2 --process-id 0 --coordinator 127.0.0.1:1234 \
      --out runs/mp
  python examples/train_cnn.py --num-processes 2 --process-id 1 --coordinator 127.0.0.1:1234 \
      --out runs/mp

Continue a run from its latest checkpoint, e.g. to 30 epochs in total:

  python examples/train_cnn.py --out runs/a --epochs 30 --resume

The global batch and the order of batches depend only on --seed and --batch-size, never on the
number of devices or processes, so every layout computes the same losses up to float rounding.

The pieces (data loading, model, train step, evaluation) are importable:
``sys.path.insert(0, "examples"); import train_cnn``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

NUM_CLASSES = 10
DIGITS_SPLIT_SEED = 0  # the digits train/test split never depends on --seed
DIGITS_TEST_FRACTION = 0.2
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
# Flags that fix the sequence of batches and updates: resuming with other values would not
# continue the same run.
RESUME_FLAGS = ("data", "batch_size", "seed", "optimizer", "lr", "momentum", "train_limit")


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags of :func:`main`."""
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add = parser.add_argument
  add("--epochs", type=int, default=12, help="total number of epochs (counting resumed ones)")
  add("--batch-size", type=int, default=32,
      help="global batch size; must be divisible by the total number of devices")
  add("--lr", type=float, default=None,
      help="learning rate (default: 1e-3 for adam, 0.05 for sgd)")
  add("--optimizer", choices=("adam", "sgd"), default="adam", help="optax optimiser")
  add("--momentum", type=float, default=0.9, help="momentum of --optimizer sgd")
  add("--seed", type=int, default=0, help="seed of the initial parameters and the batch order")
  add("--conv", choices=("convmm", "lax"), default="convmm",
      help="what computes the convolutions: convmm (im2col + GEMM) or Flax's own (lax)")
  add("--devices", type=int, default=1,
      help="local devices per process for data parallelism (on CPU, XLA is asked for this many "
      "host devices)")
  add("--num-processes", type=int, default=1, help="number of processes (jax.distributed)")
  add("--process-id", type=int, default=0, help="index of this process, 0 .. num-processes - 1")
  add("--coordinator", default=None, metavar="HOST:PORT",
      help="address of process 0's coordinator service (required with --num-processes > 1)")
  add("--init-timeout", type=int, default=300,
      help="seconds to wait for all processes to join the coordinator")
  add("--data", choices=("digits", "mnist"), default="digits",
      help="digits: scikit-learn's 8x8 digits; mnist: MNIST-format IDX files in --data-dir")
  add("--data-dir", type=Path, default=None,
      help="directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (MNIST or "
      "Fashion-MNIST)")
  add("--train-limit", type=int, default=None, help="use only the first N training examples")
  add("--test-limit", type=int, default=None, help="use only the first N test examples")
  add("--eval-batch-size", type=int, default=500, help="examples per evaluation batch")
  add("--out", type=Path, default=None,
      help="output directory for metrics.json, the plot and checkpoints (default: "
      "runs/<timestamp>)")
  add("--resume", action="store_true",
      help="continue from the latest checkpoint in --out up to --epochs")
  add("--no-progress", action="store_true", help="do not show progress bars")
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses and checks the flags (no JAX needed)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  for name in ("epochs", "batch_size", "devices", "num_processes", "eval_batch_size"):
    minimum = 0 if name == "epochs" else 1
    if getattr(args, name) < minimum:
      parser.error(f"`--{name.replace('_', '-')}` must be at least {minimum}, "
                   f"got {getattr(args, name)}")
  if args.num_processes > 1 and args.coordinator is None:
    parser.error(f"`--coordinator HOST:PORT` is required with --num-processes {args.num_processes}")
  if not 0 <= args.process_id < args.num_processes:
    parser.error(f"`--process-id` must be in [0, {args.num_processes}), got {args.process_id}")
  total_devices = args.devices * args.num_processes
  if args.batch_size % total_devices:
    parser.error(f"`--batch-size` ({args.batch_size}) must be divisible by the total number of "
                 f"devices ({args.devices} x {args.num_processes} processes = {total_devices})")
  if args.data == "mnist" and args.data_dir is None:
    parser.error("`--data mnist` needs `--data-dir DIR` (nothing is downloaded)")
  if args.resume and args.out is None:
    parser.error("`--resume` continues the run in `--out DIR`; give --out")
  if args.lr is None:
    args.lr = DEFAULT_LR[args.optimizer]
  return args


def request_host_devices(num_devices: int) -> None:
  """Asks XLA for ``num_devices`` CPU devices; only effective before JAX starts its backend."""
  if num_devices <= 1:
    return
  flag = f"--xla_force_host_platform_device_count={num_devices}"
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags.strip()} {flag}".strip()


if __name__ == "__main__":
  # XLA reads XLA_FLAGS when JAX starts, so the device count must be set before the import.
  request_host_devices(parse_args().devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import convmm  # noqa: E402
import convmm.linen  # noqa: E402
import convmm.nnx  # noqa: E402

# --------------------------------------------------------------------------------------------
# Data


class Dataset(NamedTuple):
  """Images ``(N, H, W, 1)`` float32 in [0, 1] and integer labels ``(N,)``."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def load_digits(test_fraction: float = DIGITS_TEST_FRACTION,
                split_seed: int = DIGITS_SPLIT_SEED) -> Dataset:
  """scikit-learn's 8x8 handwritten digits, split into train/test by a fixed permutation.

  >>> data = load_digits()
  >>> data.train_images.shape, data.test_images.shape
  ((1438, 8, 8, 1), (359, 8, 8, 1))
  """
  from sklearn.datasets import load_digits as sklearn_digits

  digits = sklearn_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # pixel values are 0..16
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(split_seed).permutation(len(labels))
  num_test = round(len(labels) * test_fraction)
  test, train = order[:num_test], order[num_test:]
  return Dataset(images[train], labels[train], images[test], labels[test])


# IDX type codes (http://yann.lecun.com/exdb/mnist/): the data is big-endian.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (``.gz`` compressed or not) as a numpy array.

  Args:
    path: an IDX file such as ``train-images-idx3-ubyte`` or ``t10k-labels-idx1-ubyte.gz``.

  Returns:
    The array with the file's shape and dtype (native byte order).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is not valid gzip, has a bad IDX header, or holds fewer or more bytes
      than its header declares (e.g. an interrupted download).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"read_idx: `path` {str(path)!r} does not exist or is not a file")
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut gzip stream is EOF
    raise ValueError(f"read_idx: {str(path)!r} is not a readable gzip file ({e})") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
    raise ValueError(f"read_idx: {str(path)!r} is not an IDX file: expected the magic bytes "
                     f"00 00 <type in {sorted(IDX_DTYPES)}> <ndim>, got {raw[:4].hex(' ')!r}")
  dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"read_idx: {str(path)!r} is truncated: its header declares {ndim} "
                     f"dimensions ({header} header bytes) but the file has {len(raw)} bytes")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  expected = math.prod(shape) * dtype.itemsize
  found = len(raw) - header
  if found != expected:
    problem = "is truncated" if found < expected else "has trailing bytes"
    raise ValueError(f"read_idx: {str(path)!r} {problem}: shape {shape} of {dtype.name} needs "
                     f"{expected} data bytes, found {found}")
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(data_dir: Path, split: str, kind: str) -> Path:
  """The IDX file of ``split`` ('train' or 't10k') and ``kind`` ('images' or 'labels')."""
  rank = 3 if kind == "images" else 1
  names = [f"{split}-{kind}{sep}idx{rank}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
  for name in names:
    if (data_dir / name).is_file():
      return data_dir / name
  raise FileNotFoundError(f"load_mnist: no {split} {kind} file in `data_dir` {str(data_dir)!r}; "
                          f"looked for {', '.join(names)}")


def load_mnist(data_dir: str | os.PathLike) -> Dataset:
  """MNIST or Fashion-MNIST from the standard IDX files a user already has (no download)."""
  data_dir = Path(data_dir).expanduser()
  arrays = []
  for split in ("train", "t10k"):
    images_path = find_idx(data_dir, split, "images")
    labels_path = find_idx(data_dir, split, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(f"load_mnist: {str(images_path)!r} should hold uint8 images (N, H, W), "
                       f"got {images.dtype.name} {images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"load_mnist: {str(labels_path)!r} should hold {images.shape[0]} labels "
                       f"(one per image in {images_path.name}), got shape {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
      raise ValueError(f"load_mnist: {str(labels_path)!r} has labels outside 0..{NUM_CLASSES - 1}: "
                       f"min {labels.min()}, max {labels.max()}")
    arrays += [(images / 255.0).astype(np.float32)[..., None], labels.astype(np.int32)]
  return Dataset(*arrays)


def load_data(args: argparse.Namespace) -> Dataset:
  """The data set the flags ask for, cut to --train-limit / --test-limit."""
  data = load_digits() if args.data == "digits" else load_mnist(args.data_dir)
  train, test = slice(args.train_limit), slice(args.test_limit)
  return Dataset(data.train_images[train], data.train_labels[train],
                 data.test_images[test], data.test_labels[test])


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a function of (seed, epoch) only, so a resumed run and
  any device or process layout see the same batches."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


# --------------------------------------------------------------------------------------------
# Model

FEATURES = (32, 64, 64)  # conv widths; the second conv has stride 2
HIDDEN = 128


def conv_class(conv: str = "convmm", api: str = "linen") -> type:
  """The Conv layer class behind the CNN: convmm's (im2col + GEMM) or Flax's own ('lax').

  Both take the same arguments and create the same parameters.
  """
  if conv not in ("convmm", "lax") or api not in ("linen", "nnx"):
    raise ValueError(f"conv_class: expected `conv` in ('convmm', 'lax') and `api` in "
                     f"('linen', 'nnx'), got conv={conv!r}, api={api!r}")
  if api == "linen":
    return convmm.linen.Conv if conv == "convmm" else nn.Conv
  return convmm.nnx.Conv if conv == "convmm" else nnx.Conv


class CNN(nn.Module):
  """Three 3x3 convolutions with ReLU (the second one strided), then a two-layer Dense head.

  ``conv`` picks the implementation ('convmm' or 'lax'); the parameters are the same either way.
  Input ``(N, H, W, C)``, output logits ``(N, num_classes)``.
  """
  conv: str = "convmm"
  num_classes: int = NUM_CLASSES
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = conv_class(self.conv, "linen")
    for i, features in enumerate(FEATURES):
      strides = 2 if i == 1 else 1
      x = conv(features, (3, 3), strides=strides, precision=self.precision, name=f"conv{i + 1}")(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(HIDDEN, precision=self.precision, name="hidden")(x))
    return nn.Dense(self.num_classes, precision=self.precision, name="head")(x)


class NnxCNN(nnx.Module):
  """The same CNN as :class:`CNN` written with Flax NNX layers."""

  def __init__(self, conv: str = "convmm", *, image_shape: Sequence[int] = (8, 8, 1),
               num_classes: int = NUM_CLASSES, precision: Any = None, rngs: nnx.Rngs):
    conv_cls = conv_class(conv, "nnx")
    height, width, channels = image_shape
    widths = (channels, *FEATURES)
    self.convs = nnx.List([
        conv_cls(widths[i], widths[i + 1], (3, 3), strides=2 if i == 1 else 1,
                 precision=precision, rngs=rngs)
        for i in range(len(FEATURES))])
    flat = math.ceil(height / 2) * math.ceil(width / 2) * FEATURES[-1]  # SAME padding, stride 2
    self.hidden = nnx.Linear(flat, HIDDEN, precision=precision, rngs=rngs)
    self.head = nnx.Linear(HIDDEN, num_classes, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = nnx.relu(conv(x))
    x = x.reshape(x.shape[0], -1)
    return self.head(nnx.relu(self.hidden(x)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy against integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(model: nn.Module, params: Any, images: jax.Array, labels: jax.Array):
  """``(mean cross-entropy, logits)`` of a linen model on one batch."""
  logits = model.apply({"params": params}, images)
  return cross_entropy(logits, labels), logits


def make_optimizer(name: str = "adam", lr: float | None = None,
                   momentum: float = 0.9) -> optax.GradientTransformation:
  """adam, or sgd with (heavy-ball) momentum."""
  lr = DEFAULT_LR[name] if lr is None else lr
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr, momentum=momentum)
  raise ValueError(f"make_optimizer: `name` must be 'adam' or 'sgd', got {name!r}")


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    replicated: NamedSharding | None = None) -> Callable[..., Any]:
  """A jitted ``(params, opt_state, images, labels) -> (params, opt_state, loss, accuracy)``.

  With a batch sharded over a mesh and ``replicated`` parameters, XLA turns the gradient into
  a per-device partial sum plus an all-reduce: the usual data parallelism, with no explicit
  collective in this code.
  """
  def train_step(params, opt_state, images, labels):
    (loss, logits), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        model, params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return params, opt_state, loss, accuracy

  return jax.jit(train_step, out_shardings=replicated)


def make_eval_step(model: nn.Module, replicated: NamedSharding | None = None):
  """A jitted ``(params, images, labels, weights) -> (sum of loss, number correct)``."""
  def eval_step(params, images, labels, weights):
    logits = model.apply({"params": params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(losses * weights), jnp.sum(correct * weights)

  return jax.jit(eval_step, out_shardings=replicated)


# --------------------------------------------------------------------------------------------
# Data parallelism


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
    rows = [index[0] for index in
            self.batch.addressable_devices_indices_map(global_batch.shape).values()]
    start = min(r.indices(len(global_batch))[0] for r in rows)
    stop = max(r.indices(len(global_batch))[1] for r in rows)
    return jax.make_array_from_process_local_data(
        self.batch, global_batch[start:stop], global_batch.shape)


def host_value(x: jax.Array) -> np.ndarray:
  """A replicated array's value, read from this process's own copy."""
  return np.asarray(x.addressable_data(0))


def init_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: Sequence[int],
               seed: int, replicated: NamedSharding | None = None):
  """Initial ``(params, opt_state)``, created directly with the ``replicated`` sharding."""
  def init():
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    # XLA's RngBitGenerator compiles several times faster on CPU than the default threefry,
    # and the key is used only here.
    params = model.init(jax.random.key(seed, impl="rbg"), dummy)["params"]
    return params, tx.init(params)

  return jax.jit(init, out_shardings=replicated)()


def evaluate(eval_step, params, images: np.ndarray, labels: np.ndarray, batch_size: int,
             put: Callable[[np.ndarray], jax.Array] = jnp.asarray) -> tuple[float, float]:
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


# --------------------------------------------------------------------------------------------
# Checkpoints (orbax) and outputs


def checkpoint_manager(out: Path):
  import orbax.checkpoint as ocp

  # Synchronous saves: the run is short and a finished epoch should be on disk when it says so.
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  return ocp.CheckpointManager(out.absolute() / "checkpoints", options=options)


def save_checkpoint(manager, epoch: int, params, opt_state, meta: dict) -> None:
  """Saves the state after ``epoch`` and the run's history (JSON) as orbax step ``epoch``."""
  import orbax.checkpoint as ocp

  manager.save(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
      meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(manager, params, opt_state, sharding: NamedSharding | None = None):
  """``(epoch, params, opt_state, meta)`` from the latest checkpoint.

  ``params`` and ``opt_state`` give the tree structure; the restored arrays get ``sharding``,
  so a run saved on one device layout resumes on another.
  """
  import orbax.checkpoint as ocp

  epoch = manager.latest_step()
  if epoch is None:
    raise FileNotFoundError(f"restore_checkpoint: no checkpoint in {str(manager.directory)!r}")
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding),
      {"params": params, "opt_state": opt_state})
  restored = manager.restore(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  state = restored["state"]
  return epoch, state["params"], state["opt_state"], restored["meta"]


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
  lines = [f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'test_loss':>9} "
           f"{'test_acc':>8} {'seconds':>7}"]
  for i, row in enumerate(zip(history["train_loss"], history["train_accuracy"],
                              history["test_loss"], history["test_accuracy"],
                              history["epoch_seconds"])):
    lines.append(f"{i + 1:>5} {row[0]:>10.4f} {row[1]:>9.4f} {row[2]:>9.4f} {row[3]:>8.4f} "
                 f"{row[4]:>7.2f}")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The program


def default_out_dir() -> Path:
  """runs/<timestamp>, the same in every process (process 0's clock decides)."""
  stamp = int(time.time())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
  return Path("runs") / datetime.datetime.fromtimestamp(stamp).strftime("%Y%m%d-%H%M%S")


def start_jax(args: argparse.Namespace) -> None:
  """Joins the other processes (if any) and checks that the devices asked for exist."""
  request_host_devices(args.devices)  # effective if JAX's backend has not started yet
  if args.num_processes > 1:
    # Gloo is JAX's TCP implementation of cross-process collectives on CPU (the default in
    # jax 0.10; set explicitly because without it CPU processes cannot all-reduce).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               initialization_timeout=args.init_timeout)
  if jax.local_device_count() < args.devices:
    raise ValueError(
        f"train_cnn: `--devices` (={args.devices}) exceeds the {jax.local_device_count()} local "
        f"{jax.default_backend()} devices JAX started with; on CPU run the script from the command "
        f"line (it sets XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts) or set "
        f"that flag yourself before importing jax")


def main(argv: Sequence[str] | None = None) -> dict:
  """Trains the CNN as the flags say; returns the metrics also written to metrics.json."""
  wall_start = time.perf_counter()
  args = parse_args(argv)
  start_jax(args)
  try:
    return train(args, wall_start)
  finally:
    if args.num_processes > 1:
      jax.distributed.shutdown()


def data_devices(per_process: int) -> list[jax.Device]:
  """The first ``per_process`` devices of every process, ordered by process."""
  return [device for process in range(jax.process_count())
          for device in sorted((d for d in jax.devices() if d.process_index == process),
                               key=lambda d: d.id)[:per_process]]


def check_resume_config(saved: dict, config: dict, out: Path) -> None:
  for name in RESUME_FLAGS:
    if saved[name] != config[name]:
      raise ValueError(
          f"train_cnn: `--{name.replace('_', '-')}` (={config[name]}) differs from the "
          f"checkpoint's (={saved[name]}) in {str(out)!r}; a resumed run must keep the flags "
          f"that fix the batches and updates: {', '.join(RESUME_FLAGS)}")


def train_epoch(train_step, params, opt_state, data: Dataset, order: np.ndarray,
                batch_size: int, parallel: DataParallel, progress):
  """One pass over ``order`` in global batches; returns the state, mean loss and accuracy."""
  losses, accuracies = [], []
  for step in progress:
    batch = order[step * batch_size:(step + 1) * batch_size]
    params, opt_state, loss, accuracy = train_step(
        params, opt_state, parallel.put_batch(data.train_images[batch]),
        parallel.put_batch(data.train_labels[batch]))
    losses.append(loss)
    accuracies.append(accuracy)
    if step % 10 == 0:  # reading the loss waits for the step; do it now and then
      progress.set_postfix(loss=f"{float(host_value(loss)):.4f}")
  return (params, opt_state, float(np.mean([host_value(x) for x in losses])),
          float(np.mean([host_value(x) for x in accuracies])))


def train(args: argparse.Namespace, wall_start: float) -> dict:
  """The body of :func:`main`, once JAX knows its devices and processes."""
  from tqdm import tqdm

  is_main = jax.process_index() == 0
  log = print if is_main else (lambda *a, **k: None)
  devices = data_devices(args.devices)
  parallel = DataParallel.over(devices)
  out = args.out if args.out is not None else default_out_dir()
  if is_main:
    out.mkdir(parents=True, exist_ok=True)

  data = load_data(args)
  steps_per_epoch = len(data.train_labels) // args.batch_size  # the last partial batch is dropped
  if steps_per_epoch == 0:
    raise ValueError(f"train_cnn: `--batch-size` (={args.batch_size}) exceeds the "
                     f"{len(data.train_labels)} training examples")
  eval_batch = min(args.eval_batch_size, len(data.test_labels))
  eval_batch = -(-eval_batch // len(devices)) * len(devices)  # a multiple of the device count

  model = CNN(conv=args.conv)
  tx = make_optimizer(args.optimizer, args.lr, args.momentum)
  params, opt_state = init_state(model, tx, data.train_images.shape[1:], args.seed,
                                 parallel.replicated)
  config = {name: (str(v) if isinstance(v, Path) else v) for name, v in vars(args).items()}
  history = {key: [] for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
                                 "epoch_seconds")}
  manager = checkpoint_manager(out)
  start_epoch = 0
  if args.resume:
    start_epoch, params, opt_state, meta = restore_checkpoint(
        manager, params, opt_state, parallel.replicated)
    check_resume_config(meta["config"], config, out)
    history = meta["history"]
    log(f"resuming {out} after epoch {start_epoch}")

  def evaluate_test(params):
    return evaluate(eval_step, params, data.test_images, data.test_labels, eval_batch,
                    parallel.put_batch)

  eval_step = make_eval_step(model, parallel.replicated)
  compile_start = time.perf_counter()
  example = [parallel.put_batch(x[:args.batch_size])
             for x in (data.train_images, data.train_labels)]
  train_step = make_train_step(model, tx, parallel.replicated).lower(
      params, opt_state, *example).compile()
  compile_seconds = time.perf_counter() - compile_start

  log(f"training a CNN with {args.conv} convolutions on {args.data}: {len(data.train_labels)} "
      f"train / {len(data.test_labels)} test examples, batch {args.batch_size} over "
      f"{len(devices)} device(s) in {jax.process_count()} process(es)")
  test_loss, test_accuracy = None, None
  for epoch in range(start_epoch + 1, args.epochs + 1):
    epoch_start = time.perf_counter()
    progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", unit="step",
                    disable=not is_main or args.no_progress, leave=False, dynamic_ncols=True)
    params, opt_state, train_loss, train_accuracy = train_epoch(
        train_step, params, opt_state, data, epoch_order(len(data.train_labels), args.seed, epoch),
        args.batch_size, parallel, progress)
    epoch_seconds = time.perf_counter() - epoch_start
    test_loss, test_accuracy = evaluate_test(params)
    for key, value in zip(history, (train_loss, train_accuracy, test_loss, test_accuracy,
                                    epoch_seconds)):
      history[key].append(value)
    log(f"epoch {epoch}/{args.epochs}: train_loss={train_loss:.4f} "
        f"test_accuracy={test_accuracy:.4f} ({epoch_seconds:.2f}s)", flush=True)
    # Every process takes part in an orbax save; only process 0 writes the replicated arrays.
    save_checkpoint(manager, epoch, params, opt_state,
                    {"epoch": epoch, "config": config, "history": history})
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
  if is_main:
    write_outputs(metrics, history, out)
  print(f"test_accuracy={test_accuracy:.4f}", flush=True)
  return metrics


def write_outputs(metrics: dict, history: dict, out: Path) -> None:
  """metrics.json, the plot, and the summary table on stdout."""
  (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  if history["train_loss"]:
    save_plot(history, out / "training.png")
  print()
  print(summary_table(history))
  print(f"\nconv={metrics['conv']} devices={metrics['devices']} "
        f"processes={metrics['processes']} params={metrics['num_params']} "
        f"compile={metrics['compile_seconds']:.1f}s train={sum(history['epoch_seconds']):.1f}s "
        f"wall={metrics['wall_seconds']:.1f}s")
  print(f"wrote {out / 'metrics.json'}, {out / 'training.png'}, {out / 'checkpoints'}")


if __name__ == "__main__":
  main()
