"""Output shardings on 2 CPU devices equal lax's, tiled or not (issue 13).

The checks run in a fresh process (``sharding_checks.py``), because the number of
CPU devices is fixed when JAX initialises its backends.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results():
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
    [sys.executable, str(HERE / "sharding_checks.py")],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  by_check = {}
  for row in rows:
    by_check.setdefault(row.pop("check"), []).append(row)
  return by_check


def test_output_sharding_equals_lax(results):
  rows = results["output_sharding"]
  assert len(rows) == 12
  assert sum(row["tiled"] for row in rows) == 6  # the 4 KiB budget really tiles
  for row in rows:
    assert row["error"] < 1e-4, row
    assert row["convmm"] == row["lax"], row


def test_tiled_sharded_inputs_are_not_gathered(results):
  # Batch-, row- and column-sharded inputs tiled by a 4 KiB budget on Auto meshes
  # (spatial blocks, convmm._engine.blocks) and Explicit ones: no all-gather, as in lax.
  rows = [row for row in results["output_sharding"] if row["tiled"]]
  assert {(row["axis_type"], row["spec"]) for row in rows} == {
    (t, s) for t in ["Auto", "Explicit"] for s in ["P('x',)", "P(None, 'x')", "P(None, None, 'x')"]
  }
  for row in rows:
    assert row["lax_all_gathers"] == 0 and row["all_gathers"] == 0, row


def test_blocked_tiles_equal_lax_and_do_not_gather(results):
  # Auto mesh, rows or columns sharded, tiled into spatial blocks: values and both
  # gradients equal lax's, the output sharding is lax's, and wherever lax compiles
  # no all-gather, neither does convmm (forward and gradient).
  rows = results["blocked_tiles"]
  assert len(rows) == 19
  assert sum(row["wider_input_grad"] for row in rows) == 5  # through the forward's blocks
  for row in rows:
    assert max(row["errors"]) < 1e-5, row
    assert row["sharding"] == row["lax_sharding"], row
    assert max(row["blocks"]) > 1 and row["tiles"] > 1, row
    (fwd, grad), (lax_fwd, lax_grad) = row["all_gathers"], row["lax_all_gathers"]
    assert fwd == 0 or lax_fwd > 0, row
    assert grad == 0 or lax_grad > 0, row


def test_data_parallel_tiled_grad_has_no_all_gather(results):
  rows = {row["impl"]: row for row in results["data_parallel_grad"]}
  assert rows["lax"]["all_gathers"] == 0
  assert rows["convmm"]["tiled"], rows
  assert rows["convmm"]["all_gathers"] == 0, rows


def test_out_sharding_on_auto_mesh_is_a_constraint(results):
  for row in results["out_sharding_auto"]:
    assert row["convmm"] == row["want"] and row["error"] == 0.0, row


def test_pjit_conv_1d_same_keeps_batch_and_width_sharded(results):
  rows = results["pjit_conv_1d_same"]
  assert len(rows) == 2
  for row in rows:
    assert row["convmm"] == row["lax"] == "P('x', 'y', None)", row


def test_depthwise_training_on_meshes_equals_lax(results):
  # Both meshes (and a column-sharded input on an Explicit one), unit and strided:
  # values and gradients match lax's, the input gradient keeps lax's sharding, and
  # for a batch-sharded input nothing is gathered that lax does not gather.
  rows = results["depthwise_training"]
  cases = {("Auto", "P('x',)"), ("Explicit", "P('x',)"), ("Explicit", "P(None, None, 'x')")}
  assert {(r["axis_type"], r["x_spec"], r["strides"]) for r in rows} == {
    (a, x, s) for a, x in cases for s in ("(1, 1)", "(2, 2)") if s == "(1, 1)" or x == "P('x',)"
  }
  for row in rows:
    assert row["error"] < 1e-4, row
    assert row["convmm"] == row["lax"], row
    if row["x_spec"] == "P('x',)":  # column-sharded: convmm gathers once (lax: none)
      assert row["all_gathers"] <= row["lax_all_gathers"], row


def test_directions_split_between_xla_and_convmm_keep_shardings(results):
  # method='auto': XLA's forward and input gradient, convmm's kernel gradient.
  rows = results["mixed_directions"]
  assert len(rows) == 4
  for row in rows:
    assert row["algorithms"] == {
      "forward": "xla",
      "input_grad": "xla",
      "kernel_grad": "im2col",
    }, row
    assert row["error"] < 1e-3, row
    assert row["convmm"] == row["lax"], row
    assert row["all_gathers"] <= row["lax_all_gathers"], row
