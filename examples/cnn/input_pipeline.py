"""Input pipeline: scikit-learn's 8x8 digits or MNIST-format IDX files, and the batch order.

Plain NumPy (no JAX), so the data can be loaded and checked before JAX starts.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10
DIGITS_SPLIT_SEED = 0  # the digits train/test split never depends on --seed
DIGITS_TEST_FRACTION = 0.2


class Dataset(NamedTuple):
  """Images ``(N, H, W, 1)`` float32 in [0, 1] and integer labels ``(N,)``."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def load_digits(
  test_fraction: float = DIGITS_TEST_FRACTION, split_seed: int = DIGITS_SPLIT_SEED
) -> Dataset:
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
    raise ValueError(
      f"read_idx: {str(path)!r} is not an IDX file: expected the magic bytes "
      f"00 00 <type in {sorted(IDX_DTYPES)}> <ndim>, got {raw[:4].hex(' ')!r}"
    )
  dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(
      f"read_idx: {str(path)!r} is truncated: its header declares {ndim} "
      f"dimensions ({header} header bytes) but the file has {len(raw)} bytes"
    )
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  expected = math.prod(shape) * dtype.itemsize
  found = len(raw) - header
  if found != expected:
    problem = "is truncated" if found < expected else "has trailing bytes"
    raise ValueError(
      f"read_idx: {str(path)!r} {problem}: shape {shape} of {dtype.name} needs "
      f"{expected} data bytes, found {found}"
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


MNIST_FILES = (("train", "images"), ("train", "labels"), ("t10k", "images"), ("t10k", "labels"))


def idx_names(split: str, kind: str) -> list[str]:
  """The file names an IDX file of ``split`` ('train' or 't10k') and ``kind`` ('images' or
  'labels') may have, e.g. ``train-images-idx3-ubyte`` or ``t10k-labels.idx1-ubyte.gz``."""
  rank = 3 if kind == "images" else 1
  return [f"{split}-{kind}{sep}idx{rank}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]


def missing_mnist_files(data_dir: str | os.PathLike) -> list[str]:
  """The MNIST files (``"train images"``, ...) of which ``data_dir`` holds no IDX file."""
  data_dir = Path(data_dir).expanduser()
  return [
    f"{split} {kind}"
    for split, kind in MNIST_FILES
    if not any((data_dir / name).is_file() for name in idx_names(split, kind))
  ]


def find_idx(data_dir: Path, split: str, kind: str) -> Path:
  """The IDX file of ``split`` ('train' or 't10k') and ``kind`` ('images' or 'labels')."""
  names = idx_names(split, kind)
  for name in names:
    if (data_dir / name).is_file():
      return data_dir / name
  raise FileNotFoundError(
    f"load_mnist: no {split} {kind} file in `data_dir` {str(data_dir)!r}; "
    f"looked for {', '.join(names)}"
  )


def load_mnist(data_dir: str | os.PathLike) -> Dataset:
  """MNIST or Fashion-MNIST from the standard IDX files a user already has (no download)."""
  data_dir = Path(data_dir).expanduser()
  arrays = []
  for split in ("train", "t10k"):
    images_path = find_idx(data_dir, split, "images")
    labels_path = find_idx(data_dir, split, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(
        f"load_mnist: {str(images_path)!r} should hold uint8 images (N, H, W), "
        f"got {images.dtype.name} {images.shape}"
      )
    if labels.shape != images.shape[:1]:
      raise ValueError(
        f"load_mnist: {str(labels_path)!r} should hold {images.shape[0]} labels "
        f"(one per image in {images_path.name}), got shape {labels.shape}"
      )
    if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
      raise ValueError(
        f"load_mnist: {str(labels_path)!r} has labels outside 0..{NUM_CLASSES - 1}: "
        f"min {labels.min()}, max {labels.max()}"
      )
    arrays += [(images / 255.0).astype(np.float32)[..., None], labels.astype(np.int32)]
  return Dataset(*arrays)


def load_data(args: argparse.Namespace) -> Dataset:
  """The data set the flags ask for, cut to --train-limit / --test-limit."""
  data = load_digits() if args.data == "digits" else load_mnist(args.data_dir)
  train, test = slice(args.train_limit), slice(args.test_limit)
  return Dataset(
    data.train_images[train],
    data.train_labels[train],
    data.test_images[test],
    data.test_labels[test],
  )


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a function of (seed, epoch) only, so a resumed run and
  any device or process layout see the same batches."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)
