"""Tests of examples/train_cnn.py: gradients against Flax's own layers, learning, data
parallelism over devices and processes, the IDX reader, and checkpoint/resume.

The training runs are tiny (256 examples, 2 epochs) so that the file stays fast; runs that
need more than one device are subprocesses, because XLA fixes the device count when JAX starts.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from tolerances import assert_close, tol

import convmm.linen
import convmm.nnx

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_cnn.py"
HIGHEST = lax.Precision.HIGHEST
# A small run shared by the comparisons: 8 steps of 32 per epoch, 2 epochs.
RUN_FLAGS = ["--train-limit", "256", "--test-limit", "100", "--epochs", "2", "--no-progress"]
SUBPROCESS_TIMEOUT = 240  # seconds; a run takes ~10-30 s on a loaded 2-core machine


def load_example():
  spec = importlib.util.spec_from_file_location("train_cnn", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["train_cnn"] = module  # flax dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(module)
  return module


train_cnn = load_example()


def run_main(argv):
  """``(metrics, stdout)`` of an in-process run."""
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    metrics = train_cnn.main(argv)
  return metrics, stdout.getvalue()


def script_env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def run_script(args, cwd):
  """Runs the example as a program; fails the test with its output if it fails."""
  proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=script_env(),
                        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


def read_metrics(out: Path) -> dict:
  return json.loads((out / "metrics.json").read_text())


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits_batch():
  data = train_cnn.load_digits()
  return jnp.asarray(data.train_images[:16]), jnp.asarray(data.train_labels[:16])


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("one_device")
  metrics, stdout = run_main([*RUN_FLAGS, "--out", str(out)])
  return out, metrics, stdout


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("two_devices")
  stdout = run_script([*RUN_FLAGS, "--devices", "2", "--out", str(out)], cwd=out)
  return out, read_metrics(out), stdout


# ----------------------------------------------------------------------------- gradients


def assert_nonzero(grads):
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.any(np.asarray(g) != 0), f"zero gradient at {jax.tree_util.keystr(path)}"


def test_linen_cnn_gradients_match_flax_conv(digits_batch):
  images, labels = digits_batch
  ours = train_cnn.CNN(conv="convmm", precision=HIGHEST)
  flax_own = train_cnn.CNN(conv="lax", precision=HIGHEST)
  params = ours.init(jax.random.key(0), images)["params"]
  grad_fn = jax.jit(jax.value_and_grad(train_cnn.loss_fn, argnums=1, has_aux=True),
                    static_argnums=0)
  (loss, logits), grads = grad_fn(ours, params, images, labels)
  (ref_loss, ref_logits), ref_grads = grad_fn(flax_own, params, images, labels)
  assert_nonzero(ref_grads)
  # The table's unscaled float32 tolerances (1e-5, gradients 1e-4) hold although conv3 sums
  # 3 * 3 * 64 terms per output: both sides run at HIGHEST and differ by ~1e-6 here.
  assert_close(logits, ref_logits)
  assert_close(loss, ref_loss)
  jax.tree.map(lambda g, r: assert_close(g, r, grad=True), grads, ref_grads)


def test_nnx_cnn_gradients_match_flax_conv(digits_batch):
  images, labels = digits_batch
  ours = train_cnn.NnxCNN("convmm", precision=HIGHEST, rngs=nnx.Rngs(0))
  flax_own = train_cnn.NnxCNN("lax", precision=HIGHEST, rngs=nnx.Rngs(1))
  assert isinstance(ours.convs[0], convmm.nnx.Conv)
  assert type(flax_own.convs[0]) is nnx.Conv
  nnx.update(flax_own, nnx.state(ours, nnx.Param))  # the same parameters in both

  def loss(model):
    return train_cnn.cross_entropy(model(images), labels)

  ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(loss))(flax_own)
  got_loss, grads = nnx.jit(nnx.value_and_grad(loss))(ours)
  assert_nonzero(ref_grads)
  assert_close(got_loss, ref_loss)
  jax.tree.map(lambda g, r: assert_close(g, r, grad=True), grads, ref_grads)


def test_conv_class_picks_the_implementation():
  assert train_cnn.conv_class("convmm", "linen") is convmm.linen.Conv
  assert train_cnn.conv_class("lax", "linen") is nn.Conv
  with pytest.raises(ValueError, match=r"conv_class: expected `conv`.*conv='torch'"):
    train_cnn.conv_class("torch")


# ----------------------------------------------------------------------------- training


def test_short_run_learns_and_writes_outputs(one_device_run):
  out, metrics, stdout = one_device_run
  losses = metrics["train_loss"]
  assert len(losses) == 2 and len(metrics["epoch_seconds"]) == 2
  assert losses[1] < 0.9 * losses[0], losses
  assert metrics["test_accuracy"] > 0.5  # chance is 0.1
  assert metrics["conv"] == "convmm" and metrics["devices"] == 1 and metrics["processes"] == 1
  assert read_metrics(out) == json.loads(json.dumps(metrics))
  assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert stdout.splitlines()[-1] == f"test_accuracy={metrics['test_accuracy']:.4f}"


def test_two_devices_match_one_device(one_device_run, two_device_run):
  _, one, _ = one_device_run
  _, two, stdout = two_device_run
  assert two["devices"] == 2 and two["processes"] == 1
  assert stdout.splitlines()[-1] == f"test_accuracy={two['test_accuracy']:.4f}"
  # Same batches and parameters; only the order of the gradient's sum may differ.
  np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=tol(np.float32))
  np.testing.assert_allclose(two["test_loss"], one["test_loss"], rtol=tol(np.float32))


def test_two_processes_match_two_devices(two_device_run, tmp_path):
  _, two, _ = two_device_run
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, str(SCRIPT), *RUN_FLAGS, "--num-processes", "2", "--process-id", str(i),
       "--coordinator", coordinator, "--init-timeout", "120", "--out", str(tmp_path)],
      cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=SUBPROCESS_TIMEOUT))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for proc, (stdout, stderr) in zip(procs, outputs):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr}"
  multi = read_metrics(tmp_path)
  assert multi["devices"] == 2 and multi["processes"] == 2
  np.testing.assert_allclose(multi["train_loss"], two["train_loss"], rtol=tol(np.float32))
  np.testing.assert_allclose(multi["test_accuracy"], two["test_accuracy"])
  # Only process 0 prints the table; both end with the same accuracy line.
  assert "train_loss" in outputs[0][0] and "train_loss" not in outputs[1][0]
  assert outputs[0][0].splitlines()[-1] == outputs[1][0].splitlines()[-1]


def test_resume_continues_from_saved_epoch(one_device_run, tmp_path):
  _, uninterrupted, _ = one_device_run
  flags = [*RUN_FLAGS, "--out", str(tmp_path)]
  first, _ = run_main([*flags, "--epochs", "1"])  # the last --epochs wins
  assert len(first["train_loss"]) == 1
  resumed, stdout = run_main([*flags, "--resume"])
  assert resumed["resumed_from_epoch"] == 1
  assert f"resuming {tmp_path} after epoch 1" in stdout
  assert len(resumed["train_loss"]) == 2 and len(resumed["epoch_seconds"]) == 2
  # The same arithmetic on the same device as the uninterrupted run: equal to rounding.
  np.testing.assert_allclose(resumed["train_loss"], uninterrupted["train_loss"], rtol=1e-6)
  np.testing.assert_allclose(resumed["test_loss"], uninterrupted["test_loss"], rtol=1e-6)


def test_resume_rejects_changed_batch_flags(one_device_run):
  out, _, _ = one_device_run
  with pytest.raises(ValueError, match=r"`--batch-size` \(=64\) differs from the checkpoint's"):
    run_main([*RUN_FLAGS, "--out", str(out), "--resume", "--batch-size", "64"])


def test_resume_without_checkpoint_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    run_main([*RUN_FLAGS, "--out", str(tmp_path), "--resume"])


def test_checkpoint_round_trip(tmp_path):
  model, tx = train_cnn.CNN(), train_cnn.make_optimizer("sgd", 0.1, momentum=0.9)
  params, opt_state = train_cnn.init_state(model, tx, (8, 8, 1), seed=3)
  # Make the optimizer state non-trivial so that a restore of zeros would be caught.
  opt_state = jax.tree.map(lambda x: x + 1, opt_state)
  meta = {"epoch": 5, "history": {"train_loss": [0.5, 0.25]}}
  manager = train_cnn.checkpoint_manager(tmp_path)
  train_cnn.save_checkpoint(manager, 5, params, opt_state, meta)
  manager.close()
  zeros = jax.tree.map(jnp.zeros_like, (params, opt_state))
  epoch, got_params, got_opt_state, got_meta = train_cnn.restore_checkpoint(
      train_cnn.checkpoint_manager(tmp_path), *zeros)
  assert epoch == 5 and got_meta == meta
  jax.tree.map(np.testing.assert_array_equal, (got_params, got_opt_state), (params, opt_state))


def test_flag_checks():
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--devices", "2", "--batch-size", "33"])
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--num-processes", "2"])  # no --coordinator
  with pytest.raises(SystemExit):
    train_cnn.parse_args(["--resume"])  # no --out
  assert train_cnn.parse_args(["--optimizer", "sgd"]).lr == train_cnn.DEFAULT_LR["sgd"]


def test_epoch_order_depends_only_on_seed_and_epoch():
  a = train_cnn.epoch_order(100, seed=0, epoch=1)
  np.testing.assert_array_equal(a, train_cnn.epoch_order(100, seed=0, epoch=1))
  assert not np.array_equal(a, train_cnn.epoch_order(100, seed=0, epoch=2))
  np.testing.assert_array_equal(np.sort(a), np.arange(100))


# ----------------------------------------------------------------------------- data


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> bytes:
  """Writes ``array`` in IDX format (big-endian), gzipped if the name ends in .gz."""
  dtype = np.dtype(train_cnn.IDX_DTYPES[type_code])
  raw = (bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
         + np.asarray(array, dtype).tobytes())
  path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
  return raw


@pytest.mark.parametrize("name", ["x-images-idx3-ubyte", "x-images-idx3-ubyte.gz"],
                         ids=["plain", "gz"])
def test_read_idx_round_trip(tmp_path, name):
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
  write_idx(tmp_path / name, images)
  got = train_cnn.read_idx(tmp_path / name)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, images)


def test_read_idx_big_endian_int32(tmp_path):
  values = np.array([[1, -2, 70000], [3, 4, -5]], np.int32)
  write_idx(tmp_path / "v-idx2-int", values, type_code=0x0C)
  got = train_cnn.read_idx(tmp_path / "v-idx2-int")
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, values)


def test_read_idx_errors_name_the_file(tmp_path):
  images = np.zeros((3, 4, 5), np.uint8)
  raw = write_idx(tmp_path / "ok-idx3-ubyte", images)
  (tmp_path / "cut-idx3-ubyte").write_bytes(raw[:-7])
  with pytest.raises(ValueError, match=r"'.*cut-idx3-ubyte' is truncated: shape \(3, 4, 5\) "
                                       r"of uint8 needs 60 data bytes, found 53"):
    train_cnn.read_idx(tmp_path / "cut-idx3-ubyte")
  (tmp_path / "cut-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-12])
  with pytest.raises(ValueError, match=r"cut-idx3-ubyte\.gz' is not a readable gzip file"):
    train_cnn.read_idx(tmp_path / "cut-idx3-ubyte.gz")
  (tmp_path / "header-idx3-ubyte").write_bytes(raw[:9])
  with pytest.raises(ValueError, match=r"header-idx3-ubyte' is truncated: its header declares 3"):
    train_cnn.read_idx(tmp_path / "header-idx3-ubyte")
  (tmp_path / "long-idx3-ubyte").write_bytes(raw + b"\0")
  with pytest.raises(ValueError, match=r"long-idx3-ubyte' has trailing bytes"):
    train_cnn.read_idx(tmp_path / "long-idx3-ubyte")
  (tmp_path / "text-idx3-ubyte").write_text("hello world")
  with pytest.raises(ValueError, match=r"text-idx3-ubyte' is not an IDX file"):
    train_cnn.read_idx(tmp_path / "text-idx3-ubyte")
  with pytest.raises(FileNotFoundError, match=r"missing-idx3-ubyte' does not exist"):
    train_cnn.read_idx(tmp_path / "missing-idx3-ubyte")


def write_mnist(directory: Path, gz: bool, num_train: int = 6, num_test: int = 4):
  rng = np.random.default_rng(1)
  suffix = ".gz" if gz else ""
  arrays = {}
  for split, n in (("train", num_train), ("t10k", num_test)):
    arrays[split] = (rng.integers(0, 256, (n, 7, 7), dtype=np.uint8),
                     rng.integers(0, 10, n, dtype=np.uint8))
    write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", arrays[split][0])
    write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", arrays[split][1])
  return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_load_mnist(tmp_path, gz):
  arrays = write_mnist(tmp_path, gz)
  data = train_cnn.load_mnist(tmp_path)
  assert data.train_images.shape == (6, 7, 7, 1) and data.test_images.shape == (4, 7, 7, 1)
  assert data.train_images.dtype == np.float32
  np.testing.assert_allclose(data.train_images[..., 0], arrays["train"][0] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(data.test_labels, arrays["t10k"][1])


def test_load_mnist_errors(tmp_path):
  write_mnist(tmp_path, gz=False)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))  # 4 images, 3 labels
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte' should hold 4 labels"):
    train_cnn.load_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match=r"no t10k labels file in `data_dir`"):
    train_cnn.load_mnist(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"no train images file"):
    run_main(["--data", "mnist", "--data-dir", str(tmp_path / "empty"), "--out",
              str(tmp_path / "out")])


def test_digits_split_is_fixed():
  a, b = train_cnn.load_digits(), train_cnn.load_digits()
  assert len(a.train_labels) + len(a.test_labels) == 1797
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  np.testing.assert_array_equal(a.test_images, b.test_images)
  assert a.train_images.max() == 1.0 and a.train_images.min() == 0.0
