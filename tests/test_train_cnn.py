"""Tests of the training example (examples/cnn/): gradients against Flax's own layers, learning,
data parallelism over devices and processes, the IDX reader, checkpoint/resume and its faults.

The training runs are tiny (256 examples, 2 epochs) so that the file stays fast; runs that
need more than one device are subprocesses, because XLA fixes the device count when JAX starts.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from tolerances import assert_close, tol

import convmm
import convmm.linen
import convmm.nnx
from examples.cnn import checkpoints, input_pipeline, models, train
from examples.cnn.main import build_parser, main, parse_args

REPO = Path(__file__).resolve().parents[1]
# The example as a program, exactly as the README runs it (from the repository root).
COMMAND = [sys.executable, "-m", "examples.cnn.main"]
HIGHEST = lax.Precision.HIGHEST
# A small run shared by the comparisons: 8 steps of 32 per epoch, 2 epochs.
RUN_FLAGS = ["--train-limit", "256", "--test-limit", "100", "--epochs", "2", "--no-progress"]
SUBPROCESS_TIMEOUT = 240  # seconds; a run takes ~10-30 s on a loaded 2-core machine


def run_main(argv):
  """``(metrics, stdout)`` of an in-process run."""
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    metrics = main(argv)
  return metrics, stdout.getvalue()


def script_env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def run_script(args, cwd=REPO):
  """Runs the example as a program; fails the test with its output if it fails."""
  proc = subprocess.run(
    [*COMMAND, *args],
    cwd=cwd,
    env=script_env(),
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT,
  )
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
  data = input_pipeline.load_digits()
  return jnp.asarray(data.train_images[:16]), jnp.asarray(data.train_labels[:16])


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("one_device")
  metrics, stdout = run_main([*RUN_FLAGS, "--out", str(out)])
  return out, metrics, stdout


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("two_devices")
  stdout = run_script([*RUN_FLAGS, "--devices", "2", "--out", str(out)])
  return out, read_metrics(out), stdout


# ----------------------------------------------------------------------------- gradients


def assert_nonzero(grads):
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.any(np.asarray(g) != 0), f"zero gradient at {jax.tree_util.keystr(path)}"


def test_linen_cnn_gradients_match_flax_conv(digits_batch):
  images, labels = digits_batch
  ours = models.CNN(conv="convmm", precision=HIGHEST)
  flax_own = models.CNN(conv="lax", precision=HIGHEST)
  params = ours.init(jax.random.key(0), images)["params"]
  grad_fn = jax.jit(jax.value_and_grad(train.loss_fn, argnums=1, has_aux=True), static_argnums=0)
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
  ours = models.NnxCNN("convmm", precision=HIGHEST, rngs=nnx.Rngs(0))
  flax_own = models.NnxCNN("lax", precision=HIGHEST, rngs=nnx.Rngs(1))
  assert isinstance(ours.convs[0], convmm.nnx.Conv)
  assert type(flax_own.convs[0]) is nnx.Conv
  nnx.update(flax_own, nnx.state(ours, nnx.Param))  # the same parameters in both

  def loss(model):
    return train.cross_entropy(model(images), labels)

  ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(loss))(flax_own)
  got_loss, grads = nnx.jit(nnx.value_and_grad(loss))(ours)
  assert_nonzero(ref_grads)
  assert_close(got_loss, ref_loss)
  jax.tree.map(lambda g, r: assert_close(g, r, grad=True), grads, ref_grads)


def test_conv_class_picks_the_implementation():
  assert models.conv_class("convmm", "linen") is convmm.linen.Conv
  assert models.conv_class("lax", "linen") is nn.Conv
  with pytest.raises(ValueError, match=r"conv_class: expected `conv`.*conv='torch'"):
    models.conv_class("torch")


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
  procs = [
    subprocess.Popen(
      [
        *COMMAND,
        *RUN_FLAGS,
        "--num-processes",
        "2",
        "--process-id",
        str(i),
        "--coordinator",
        coordinator,
        "--init-timeout",
        "120",
        "--out",
        str(tmp_path),
      ],
      cwd=REPO,
      env=script_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
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
  model, tx = models.CNN(), train.make_optimizer("sgd", 0.1, momentum=0.9)
  params, opt_state = train.init_state(model, tx, (8, 8, 1), seed=3)
  # Make the optimizer state non-trivial so that a restore of zeros would be caught.
  opt_state = jax.tree.map(lambda x: x + 1, opt_state)
  meta = {"epoch": 5, "history": {"train_loss": [0.5, 0.25]}}
  manager = checkpoints.checkpoint_manager(tmp_path)
  checkpoints.save_checkpoint(manager, 5, params, opt_state, meta)
  manager.close()
  zeros = jax.tree.map(jnp.zeros_like, (params, opt_state))
  epoch, got_params, got_opt_state, got_meta = checkpoints.restore_checkpoint(
    checkpoints.checkpoint_manager(tmp_path), *zeros
  )
  assert epoch == 5 and got_meta == meta
  jax.tree.map(np.testing.assert_array_equal, (got_params, got_opt_state), (params, opt_state))


def test_flag_checks():
  with pytest.raises(SystemExit):
    parse_args(["--devices", "2", "--batch-size", "33"])
  with pytest.raises(SystemExit):
    parse_args(["--num-processes", "2"])  # no --coordinator
  with pytest.raises(SystemExit):
    parse_args(["--resume"])  # no --out
  assert parse_args(["--optimizer", "sgd"]).lr == train.DEFAULT_LR["sgd"]


def test_epoch_order_depends_only_on_seed_and_epoch():
  a = input_pipeline.epoch_order(100, seed=0, epoch=1)
  np.testing.assert_array_equal(a, input_pipeline.epoch_order(100, seed=0, epoch=1))
  assert not np.array_equal(a, input_pipeline.epoch_order(100, seed=0, epoch=2))
  np.testing.assert_array_equal(np.sort(a), np.arange(100))


# ----------------------------------------------------------------------------- data


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> bytes:
  """Writes ``array`` in IDX format (big-endian), gzipped if the name ends in .gz."""
  dtype = np.dtype(input_pipeline.IDX_DTYPES[type_code])
  raw = (
    bytes([0, 0, type_code, array.ndim])
    + np.asarray(array.shape, ">u4").tobytes()
    + np.asarray(array, dtype).tobytes()
  )
  path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
  return raw


@pytest.mark.parametrize(
  "name", ["x-images-idx3-ubyte", "x-images-idx3-ubyte.gz"], ids=["plain", "gz"]
)
def test_read_idx_round_trip(tmp_path, name):
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
  write_idx(tmp_path / name, images)
  got = input_pipeline.read_idx(tmp_path / name)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, images)


def test_read_idx_big_endian_int32(tmp_path):
  values = np.array([[1, -2, 70000], [3, 4, -5]], np.int32)
  write_idx(tmp_path / "v-idx2-int", values, type_code=0x0C)
  got = input_pipeline.read_idx(tmp_path / "v-idx2-int")
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, values)


def test_read_idx_errors_name_the_file(tmp_path):
  images = np.zeros((3, 4, 5), np.uint8)
  raw = write_idx(tmp_path / "ok-idx3-ubyte", images)
  (tmp_path / "cut-idx3-ubyte").write_bytes(raw[:-7])
  with pytest.raises(
    ValueError,
    match=r"'.*cut-idx3-ubyte' is truncated: shape \(3, 4, 5\) "
    r"of uint8 needs 60 data bytes, found 53",
  ):
    input_pipeline.read_idx(tmp_path / "cut-idx3-ubyte")
  (tmp_path / "cut-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-12])
  with pytest.raises(ValueError, match=r"cut-idx3-ubyte\.gz' is not a readable gzip file"):
    input_pipeline.read_idx(tmp_path / "cut-idx3-ubyte.gz")
  (tmp_path / "header-idx3-ubyte").write_bytes(raw[:9])
  with pytest.raises(ValueError, match=r"header-idx3-ubyte' is truncated: its header declares 3"):
    input_pipeline.read_idx(tmp_path / "header-idx3-ubyte")
  (tmp_path / "long-idx3-ubyte").write_bytes(raw + b"\0")
  with pytest.raises(ValueError, match=r"long-idx3-ubyte' has trailing bytes"):
    input_pipeline.read_idx(tmp_path / "long-idx3-ubyte")
  (tmp_path / "text-idx3-ubyte").write_text("hello world")
  with pytest.raises(ValueError, match=r"text-idx3-ubyte' is not an IDX file"):
    input_pipeline.read_idx(tmp_path / "text-idx3-ubyte")
  with pytest.raises(FileNotFoundError, match=r"missing-idx3-ubyte' does not exist"):
    input_pipeline.read_idx(tmp_path / "missing-idx3-ubyte")


def write_mnist(directory: Path, gz: bool, num_train: int = 6, num_test: int = 4):
  rng = np.random.default_rng(1)
  suffix = ".gz" if gz else ""
  arrays = {}
  for split, n in (("train", num_train), ("t10k", num_test)):
    arrays[split] = (
      rng.integers(0, 256, (n, 7, 7), dtype=np.uint8),
      rng.integers(0, 10, n, dtype=np.uint8),
    )
    write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", arrays[split][0])
    write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", arrays[split][1])
  return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_load_mnist(tmp_path, gz):
  arrays = write_mnist(tmp_path, gz)
  data = input_pipeline.load_mnist(tmp_path)
  assert data.train_images.shape == (6, 7, 7, 1) and data.test_images.shape == (4, 7, 7, 1)
  assert data.train_images.dtype == np.float32
  np.testing.assert_allclose(data.train_images[..., 0], arrays["train"][0] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(data.test_labels, arrays["t10k"][1])


def test_load_mnist_errors(tmp_path):
  write_mnist(tmp_path, gz=False)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))  # 4 images, 3 labels
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte' should hold 4 labels"):
    input_pipeline.load_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match=r"no t10k labels file in `data_dir`"):
    input_pipeline.load_mnist(tmp_path)
  with pytest.raises(ValueError, match=r"`--data-dir`: load_mnist: .*should hold uint8 images"):
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((6, 7, 7), np.int32), 0x0C)
    run_main(["--data", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()


def test_mnist_without_idx_files_is_a_usage_error(tmp_path, capsys):
  """No IDX files in --data-dir: one usage line and exit status 2, before JAX starts."""
  (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")  # present; the other three are not
  with pytest.raises(SystemExit) as exit_info:
    parse_args(["--data", "mnist", "--data-dir", str(tmp_path)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  error_lines = [line for line in err.splitlines() if "error:" in line]
  assert len(error_lines) == 1 and "Traceback" not in err, err
  assert re_search(
    r"`--data-dir` '.*' holds no IDX file of the MNIST train images, train labels, "
    r"t10k images \(e\.g\. train-images-idx3-ubyte, plain or \.gz\)$",
    error_lines[0],
  )


def test_corrupt_idx_file_is_a_one_line_error(tmp_path):
  write_mnist(tmp_path, gz=True)
  raw = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])  # cut download
  proc = subprocess.run(
    [*COMMAND, "--data", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")],
    cwd=REPO,
    env=script_env(),
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.count("\n") == 1, proc.stderr
  assert re_search(r"^train_cnn: `--data-dir`: read_idx: '.*' is not a readable gzip", proc.stderr)


def test_help_shows_each_default_once():
  entries = re.split(r"\n  (?=-)", build_parser().format_help())
  by_flag = {
    entry.split()[0]: " ".join(entry.split()) for entry in entries if entry.startswith("-")
  }
  assert all(text.count("default") <= 1 for text in by_flag.values()), by_flag
  assert "(default: None)" not in by_flag["--lr"] and "1e-3 for adam" in by_flag["--lr"]
  assert by_flag["--out"].endswith("(default: runs/<timestamp>)"), by_flag["--out"]
  assert by_flag["--epochs"].endswith("(default: 12)"), by_flag["--epochs"]
  assert "default" not in by_flag["--resume"]


def test_digits_split_is_fixed():
  a, b = input_pipeline.load_digits(), input_pipeline.load_digits()
  assert len(a.train_labels) + len(a.test_labels) == 1797
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  np.testing.assert_array_equal(a.test_images, b.test_images)
  assert a.train_images.max() == 1.0 and a.train_images.min() == 0.0


# ----------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def adam_state():
  """The CNN's ``(params, opt_state)`` for adam (Flax's convolutions: the same tree, and it
  compiles faster)."""
  return train.init_state(models.CNN(conv="lax"), train.make_optimizer("adam"), (8, 8, 1), seed=0)


def shifted(state, offset):
  """``state`` with ``offset`` added to every float leaf (a state that differs from it)."""
  return jax.tree.map(lambda x: x + offset if jnp.issubdtype(x.dtype, jnp.inexact) else x, state)


def save_epochs(out: Path, states: dict, config: dict | None = None):
  """Saves ``{epoch: (params, opt_state)}`` as the example does."""
  manager = checkpoints.checkpoint_manager(out)
  for epoch, (params, opt_state) in states.items():
    meta = {"epoch": epoch, "config": config or {}, "history": {"train_loss": [1.0] * epoch}}
    assert checkpoints.save_checkpoint(manager, epoch, params, opt_state, meta)
  manager.close()


def flip_bytes(directory: Path, count: int = 8):
  """Inverts ``count`` bytes in the middle of the largest file under ``directory``."""
  path = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
  path.write_bytes(bytes(data))


def restore(out: Path, like, config=None):
  skipped = []
  result = checkpoints.restore_checkpoint(
    checkpoints.checkpoint_manager(out),
    *like,
    config,
    on_skip=lambda epoch, why: skipped.append((epoch, why)),
  )
  return result, skipped


@pytest.mark.parametrize("damage", ["array_bytes", "meta_json", "non_finite"])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, damage, adam_state):
  one, two = shifted(adam_state, 1.0), shifted(adam_state, 2.0)
  if damage == "non_finite":  # saved as such, digest and all: a diverged run
    two = shifted(adam_state, np.nan)
  save_epochs(tmp_path, {1: one, 2: two})
  latest = tmp_path / "checkpoints" / "2"
  if damage == "array_bytes":
    flip_bytes(latest / "state")
  elif damage == "meta_json":
    (latest / "meta" / "metadata").write_text('{"epoch": 2, "hist')
  (epoch, params, opt_state, _), skipped = restore(tmp_path, adam_state)
  assert epoch == 1
  jax.tree.map(np.testing.assert_array_equal, (params, opt_state), checkpoints.host_tree(one))
  why = {
    "array_bytes": r"digest mismatch|unreadable arrays",
    "meta_json": "unreadable metadata",
    "non_finite": "non-finite",
  }[damage]
  assert [e for e, _ in skipped] == [2] and re_search(why, skipped[0][1]), skipped


def re_search(pattern, text):
  return re.search(pattern, text) is not None


def test_resume_with_every_checkpoint_damaged_says_so(tmp_path, adam_state):
  save_epochs(tmp_path, {1: adam_state})
  flip_bytes(tmp_path / "checkpoints" / "1" / "state")
  with pytest.raises(
    checkpoints.NoCheckpointError,
    match=r"no usable checkpoint in .*\(epoch 1: .*\); run without --resume",
  ):
    restore(tmp_path, adam_state)


def test_resume_after_a_kill_before_the_first_checkpoint(tmp_path, adam_state):
  # What a kill during the first save leaves: Orbax's unfinished temporary directory.
  (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp-1795813000").mkdir(parents=True)
  with pytest.raises(
    FileNotFoundError, match=r"no checkpoint in .* \(only unfinished saves: 1\.orbax-checkpoint-tmp"
  ):
    restore(tmp_path, adam_state)
  (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp-1795813000").rmdir()  # empty checkpoints/
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*checkpoints'; run without"):
    restore(tmp_path, adam_state)


def test_resume_into_a_missing_out_creates_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*missing.*\(no such directory\)"):
    run_main([*RUN_FLAGS, "--out", str(tmp_path / "missing"), "--resume"])
  assert not (tmp_path / "missing").exists()


def test_resume_command_without_checkpoint_is_one_line(tmp_path):
  (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp-1795813000").mkdir(parents=True)
  proc = subprocess.run(
    [*COMMAND, *RUN_FLAGS, "--out", str(tmp_path), "--resume"],
    cwd=REPO,
    env=script_env(),
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT,
  )
  assert proc.returncode == 1, (proc.stdout, proc.stderr)
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "train_cnn" in line]
  assert len(errors) == 1 and "no checkpoint in" in errors[0], proc.stderr


def test_resume_with_another_optimizer_is_a_flag_error(one_device_run):
  out, _, _ = one_device_run
  with pytest.raises(
    ValueError,
    match=r"`--optimizer` \(=sgd\) differs from the checkpoint's "
    r"\(=adam\)",
  ):
    run_main([*RUN_FLAGS, "--out", str(out), "--resume", "--optimizer", "sgd"])


def test_new_run_into_an_out_with_checkpoints_refuses(one_device_run):
  out, _, _ = one_device_run
  before = sorted(p.name for p in (out / "checkpoints").iterdir())
  stdout = io.StringIO()
  with (
    contextlib.redirect_stdout(stdout),
    pytest.raises(
      FileExistsError, match=r"already holds checkpoints of a run \(epochs 1, 2\); pass --resume"
    ),
  ):
    main([*RUN_FLAGS, "--out", str(out)])
  assert "wrote" not in stdout.getvalue()
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_wrote_line_lists_the_checkpoints_saved(one_device_run):
  out, _, stdout = one_device_run
  assert f"checkpoints of epochs 1-2 in {out.absolute() / 'checkpoints'}" in stdout
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]


def test_wrote_line_lists_only_the_checkpoints_kept(tmp_path):
  """Orbax keeps the newest two: after 3 epochs the line names epochs 2-3, not 1-3."""
  flags = ["--train-limit", "64", "--test-limit", "20", "--epochs", "3", "--no-progress"]
  _, stdout = run_main([*flags, "--out", str(tmp_path)])
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
  assert f"checkpoints of epochs 2-3 in {tmp_path.absolute() / 'checkpoints'}" in stdout


def test_epoch_ranges():
  assert train.epoch_ranges([12]) == "epoch 12"
  assert train.epoch_ranges([11, 12]) == "epochs 11-12"
  assert train.epoch_ranges([1, 3, 4, 5, 9]) == "epochs 1, 3-5, 9"


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--lr", "nan"], "`--lr` must be a positive finite number, got nan"),
    (["--lr", "-1"], "`--lr` must be a positive finite number, got -1.0"),
    (["--lr", "inf"], "`--lr` must be a positive finite number, got inf"),
    (["--momentum", "-3"], r"`--momentum` must be in \[0, 1\), got -3.0"),
    (["--momentum", "nan"], r"`--momentum` must be in \[0, 1\), got nan"),
    (["--test-limit", "0"], "`--test-limit` must be at least 1, got 0"),
    (["--train-limit", "-5"], "`--train-limit` must be at least 1, got -5"),
    (["--seed", "-1"], "`--seed` must be at least 0, got -1"),
    (["--heartbeat-timeout", "0"], "`--heartbeat-timeout` must be at least 1, got 0"),
  ],
  ids=[
    "lr_nan",
    "lr_negative",
    "lr_inf",
    "momentum_negative",
    "momentum_nan",
    "test_limit_0",
    "train_limit_negative",
    "seed_negative",
    "heartbeat_0",
  ],
)
def test_flags_out_of_range_are_one_line_errors(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    parse_args(flags)
  assert exit_info.value.code == 2
  error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
  assert len(error_lines) == 1 and re_search(message, error_lines[0]), error_lines


def test_metrics_json_is_valid_json_when_training_diverges(tmp_path):
  metrics, _ = run_main(
    [
      "--train-limit",
      "64",
      "--test-limit",
      "16",
      "--epochs",
      "1",
      "--no-progress",
      "--lr",
      "1e30",
      "--conv",
      "lax",
      "--out",
      str(tmp_path),
    ]
  )
  assert metrics["train_loss"] == [None]  # the loss is NaN: JSON null, not a bare NaN

  def reject(constant):
    raise AssertionError(f"metrics.json holds {constant}, which is not JSON")

  assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=reject) == metrics


def start_processes(flags_of, tmp_path: Path) -> list[tuple[subprocess.Popen, Path]]:
  """Starts the two processes of a run, ``flags_of(i)`` giving process i's own flags; their
  stdout and stderr go to files (``<tmp_path>/process<i>.log``)."""
  coordinator = f"127.0.0.1:{free_port()}"
  started = []
  for i in range(2):
    log = tmp_path / f"process{i}.log"
    with open(log, "w") as sink:
      started.append(
        (
          subprocess.Popen(
            [
              *COMMAND,
              "--num-processes",
              "2",
              "--process-id",
              str(i),
              "--coordinator",
              coordinator,
              "--init-timeout",
              "120",
              *flags_of(i),
            ],
            cwd=REPO,
            env=script_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
          ),
          log,
        )
      )
  return started


def stop_all(started):
  for proc, _ in started:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def epoch_one_checkpoint(tmp_path_factory):
  """An --out holding the checkpoint of epoch 1 of RUN_FLAGS, from a one-device run."""
  out = tmp_path_factory.mktemp("epoch_one")
  run_main([*RUN_FLAGS, "--epochs", "1", "--out", str(out)])
  return out


def test_two_processes_resume_without_a_shared_out(one_device_run, epoch_one_checkpoint, tmp_path):
  # Process 0 resumes from its own --out; process 1's --out is empty and stays so.
  _, uninterrupted, _ = one_device_run
  outs = [tmp_path / "process0_out", tmp_path / "process1_out"]
  shutil.copytree(epoch_one_checkpoint, outs[0])
  started = start_processes(lambda i: [*RUN_FLAGS, "--resume", "--out", str(outs[i])], tmp_path)
  try:
    for proc, _ in started:
      proc.wait(timeout=SUBPROCESS_TIMEOUT)
  finally:
    stop_all(started)
  logs = [log.read_text() for _, log in started]
  for (proc, _), text in zip(started, logs):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{text}"
  metrics = read_metrics(outs[0])
  assert metrics["processes"] == 2 and metrics["resumed_from_epoch"] == 1
  assert f"resuming {outs[0]} after epoch 1" in logs[0]
  np.testing.assert_allclose(
    metrics["train_loss"], uninterrupted["train_loss"], rtol=tol(np.float32)
  )
  np.testing.assert_allclose(metrics["test_loss"], uninterrupted["test_loss"], rtol=tol(np.float32))
  assert not outs[1].exists() or not any(outs[1].iterdir())  # process 1 wrote nothing
  assert sorted(p.name for p in (outs[0] / "checkpoints").iterdir()) == ["1", "2"]
  assert logs[0].splitlines()[-1] == logs[1].splitlines()[-1]  # the same test accuracy


def test_when_a_process_dies_the_other_stops_within_60_seconds(tmp_path):
  flags = [
    "--train-limit",
    "256",
    "--test-limit",
    "100",
    "--epochs",
    "100000",
    "--no-progress",
    "--conv",
    "lax",
  ]
  started = start_processes(lambda i: [*flags, "--out", str(tmp_path / f"out{i}")], tmp_path)
  (survivor, survivor_log), (victim, _) = started
  try:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while "epoch 2/" not in survivor_log.read_text():  # training, checkpoints written
      assert survivor.poll() is None and victim.poll() is None, survivor_log.read_text()
      assert time.monotonic() < deadline, "the run did not start"
      time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor.wait(timeout=90)
    seconds = time.monotonic() - killed
  finally:
    stop_all(started)
  text = survivor_log.read_text()
  assert survivor.returncode != 0 and seconds < 60, (survivor.returncode, seconds, text)
  assert re_search(
    r"train_cnn: process 0 of 2: stopping, a collective with the other "
    r"processes failed \(another process died",
    text,
  ), text
  assert "Traceback" not in text


# ----------------------------------------------------------------------------- --conv replace


def primitive_names(jaxpr) -> set[str]:
  """Every primitive in ``jaxpr`` and in the jaxprs its equations carry, at any depth."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for item in value if isinstance(value, tuple | list) else (value,):
        if hasattr(item, "eqns") or hasattr(getattr(item, "jaxpr", None), "eqns"):
          names |= primitive_names(item)
  return names


def test_conv_replace_computes_every_convolution_with_convmm(digits_batch):
  images, labels = digits_batch
  replaced, flax_own = models.CNN(conv="replace"), models.CNN(conv="lax")
  assert models.conv_class("replace", "linen") is nn.Conv  # Flax's own model, wrapped
  params = jax.eval_shape(flax_own.init, jax.random.key(0), images)["params"]
  grad_fn = jax.value_and_grad(train.loss_fn, argnums=1, has_aux=True)
  # The loss and its gradient (the backward convolutions too) hold no XLA convolution. (The
  # values: replace_convs's own tests compare Flax models with and without it.)
  assert "conv_general_dilated" in primitive_names(
    jax.make_jaxpr(lambda p: grad_fn(flax_own, p, images, labels))(params)
  )
  with convmm.default_method("convmm"):  # 'auto' gives some directions to XLA's convolution
    jaxpr = jax.make_jaxpr(lambda p: grad_fn(replaced, p, images, labels))(params)
  assert "conv_general_dilated" not in primitive_names(jaxpr)


def test_conv_replace_reaches_97_percent_on_digits(tmp_path):
  metrics, stdout = run_main(["--conv", "replace", "--no-progress", "--out", str(tmp_path)])
  assert metrics["conv"] == "replace" and metrics["epochs"] == 12  # the default run
  assert metrics["test_accuracy"] >= 0.97, metrics["test_accuracy_per_epoch"]
  assert stdout.splitlines()[-1] == f"test_accuracy={metrics['test_accuracy']:.4f}"
