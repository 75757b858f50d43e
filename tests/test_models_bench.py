"""``python -m benchmarks.models``: the whole-network benchmark runs, reports every field, and
convmm's networks compute what Flax's compute from the same parameters.

The smoke run is a subprocess from the repository root on the small ``--quick`` networks, as CI
and users run it. Timings are only checked to be positive numbers: these machines are too noisy
to assert speed.
"""

import functools
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import agreement, models, networks
from benchmarks.impls import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
JAX_KEYS = [
  "fwd_ms",
  "step_ms",
  "fwd_min_ms",
  "step_min_ms",
  "fwd_samples_ms",
  "step_samples_ms",
  "compile_fwd_s",
  "compile_step_s",
  "lower_fwd_s",
  "lower_step_s",
  "compile_fwd_samples_s",
  "compile_step_samples_s",
  "temp_fwd_bytes",
  "temp_step_bytes",
]
TORCH_KEYS = ["fwd_ms", "step_ms", "fwd_min_ms", "step_min_ms", "params"]
RATIO_KEYS = ["fwd", "step", "compile_fwd", "compile_step", "temp_fwd", "temp_step"]
ERROR_KEYS = ["fwd", "loss", "grads", "grads_worst_leaf", "model_state", "output_finite"]
# max |convmm - flax| / max |flax| over each tree, float32, these shallow --quick networks:
# both sides round each reduction differently (measured: 1e-7 to 1e-6).
TOLERANCE_F32 = {"fwd": 1e-5, "loss": 1e-5, "grads": 1e-5, "model_state": 1e-5}


def is_positive(value) -> bool:
  return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_field_and_convmm_matches_flax(tmp_path, capsys):
  path = tmp_path / "models.json"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.models",
      "--quick",
      "--isolate",  # each network and dtype in its own process, as a full run does
      "--models",
      "resnet18",
      "--dtypes",
      "float32,bfloat16",
      "--json",
      str(path),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(path.read_text())
  meta = report["meta"]
  assert meta["quick"] is True and meta["repeats"] == 1 and meta["isolated"] is True
  assert meta["rates"]["repeats"] == 3 and len(meta["rates"]["gemm"]) == 4, meta["rates"]
  assert [(r["model"], r["dtype"]) for r in report["results"]] == [
    ("resnet18", "float32"),
    ("resnet18", "bfloat16"),
  ]
  with_torch = meta["torch_used"]
  for r in report["results"]:
    label = (r["model"], r["dtype"])
    assert "error" not in r, (label, r.get("error"))
    assert r["params_identical"] is True and r["params"] > 0, label
    assert set(r["impls"]) == {"convmm", "flax"} | ({"torch"} if with_torch else set()), label
    for impl, record in r["impls"].items():
      keys = TORCH_KEYS if impl == "torch" else JAX_KEYS
      missing = [key for key in keys if key not in record]
      assert not missing, (label, impl, missing)
      assert all(is_positive(record[key]) for key in ("fwd_ms", "step_ms")), (label, impl, record)
      assert len(record["fwd_samples_ms"]) == 1, (label, impl)
      if impl != "torch":
        assert all(is_positive(record[key]) for key in ("compile_fwd_s", "compile_step_s"))
        assert isinstance(record["temp_step_bytes"], int), (label, impl)
        assert len(record["compile_step_samples_s"]) == 1, (label, impl)
    if with_torch:  # the PyTorch twin is the same network: ResNet (2 basic blocks, 8 filters)
      assert r["impls"]["torch"]["params"] == r["params"], label
    torch_ratios = {"fwd_vs_torch", "step_vs_torch"} if with_torch else set()
    assert set(r["ratios"]) == set(RATIO_KEYS) | torch_ratios, label
    assert all(is_positive(r["ratios"][key]) for key in ("fwd", "step", "compile_step")), label
    # Which algorithms convmm's convolutions used: one per convolution of Flax's network (the
    # quick ResNet-18 has no transposed convolution, which could be computed without one).
    flax_convs, convmm_convs = (r["impls"][impl]["algorithms"] for impl in ("flax", "convmm"))
    assert list(flax_convs) == ["xla/xla/xla"], (label, flax_convs)
    assert sum(convmm_convs.values()) == flax_convs["xla/xla/xla"], (label, convmm_convs)
    errors = r["errors"]
    assert errors["output_finite"] is True, label
    assert set(errors) == set(ERROR_KEYS) | ({"vs_float32"} if r["dtype"] != "float32" else set())

  f32, bf16 = report["results"]
  for key, bound in TOLERANCE_F32.items():
    assert f32["errors"][key] <= bound, (key, f32["errors"])
  # bfloat16: the two networks round differently, so each is compared with Flax's float32
  # network; convmm must be about as accurate as Flax's own bfloat16 layers (measured on this
  # network: gradients 2.8e-2 from float32 for convmm, 1.5e-2 for Flax; outputs 2e-3 for both),
  # and not wildly off in absolute terms.
  vs_f32 = bf16["errors"]["vs_float32"]
  for key in ("fwd", "loss", "grads"):
    assert vs_f32["convmm"][key] <= 2 * vs_f32["flax"][key] + 1e-2, (key, vs_f32)
    assert vs_f32["convmm"][key] <= 0.5, (key, vs_f32)
  table = proc.stdout
  assert "| model dtype |" in table and "| resnet18 float32 |" in table, table
  assert "| resnet18 bfloat16 |" in table, table
  assert "XLA's GFLOP/s on this machine (median of 3): float32 GEMM " in table, table
  assert "| model dtype | convmm's convolutions by algorithm fwd/dx/dw |" in table, table
  # --table renders a saved run again, identically.
  assert models.main(["--table", str(path)]) == 0
  assert capsys.readouterr().out == table


def test_convmm_models_run_no_lax_convolution():
  """The convmm networks really are computed by convmm: no XLA convolution in their programs
  (otherwise the agreement above would hold trivially), while Flax's are made of them."""
  for name in ("mnist_cnn", "resnet18", "mobilenetv2", "efficientnet_b0", "unet"):
    spec = networks.QUICK_MODELS[name]
    flax_model = spec.build(jnp.float32)
    inputs, _ = networks.make_batch(spec, jnp.float32, 0)
    variables = jax.eval_shape(
      functools.partial(flax_model.init, train=False), jax.random.key(0), *inputs
    )
    primitives = {}
    for impl, model in (("flax", flax_model), ("convmm", networks.convmm_model(flax_model))):
      jaxpr = jax.make_jaxpr(lambda v, *x, m=model: m.apply(v, *x, train=False))(variables, *inputs)
      primitives[impl] = str(jaxpr)
    assert "conv_general_dilated" in primitives["flax"], name
    assert "conv_general_dilated" not in primitives["convmm"], name
    assert "dot_general" in primitives["convmm"], name


def parameter_count(spec) -> int:
  model = spec.build(jnp.float32)
  inputs, _ = networks.make_batch(spec, jnp.float32, 0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
  return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))


def test_parameter_trees_are_checked():
  spec = networks.QUICK_MODELS["resnet18"]
  inputs, _ = networks.make_batch(spec, jnp.float32, 0)
  flax_model = spec.build(jnp.float32)
  count = agreement.check_same_parameters(flax_model, networks.convmm_model(flax_model), inputs)
  assert count == parameter_count(spec)
  wider = flax_model.clone(num_filters=16)
  with pytest.raises(ValueError, match="variable tree differs"):
    agreement.check_same_parameters(flax_model, wider, inputs)


def test_mnist_cnn_is_flax_quick_start_cnn():
  """Conv 32 and Conv 64 (3x3, SAME), two 2x2 average pools (28 -> 7), Dense 256, Dense 10."""
  expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (7 * 7 * 64 * 256 + 256) + (256 * 10 + 10)
  assert parameter_count(networks.MODELS["mnist_cnn"]) == expected == 824_458
  assert networks.MODELS["mnist_cnn"].image_shape == (32, 28, 28, 1)


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize(
  "name, torchvision_count",
  [("resnet18", 11_689_512), ("mobilenetv2", 3_504_872)],
  ids=["resnet18", "mobilenetv2"],
)
def test_torch_twins_have_torchvision_and_flax_parameter_counts(name, torchvision_count):
  from benchmarks import torch_networks

  spec = networks.MODELS[name]
  twin = torch_networks.twin_of(name, spec.build(jnp.float32))
  assert sum(p.numel() for p in twin.parameters()) == torchvision_count
  assert parameter_count(spec) == torchvision_count
  batch, height, width, channels = spec.image_shape
  assert twin.eval()(torch.zeros(1, channels, height, width)).shape == (1, spec.num_classes)


def test_quick_defaults_to_one_network_in_one_dtype():
  args = models.parse_args(["--quick"])
  assert args.models == ["mnist_cnn"] and args.dtypes == ["float32"] and not args.isolate
  assert args.json.endswith("benchmarks/out/models-quick.json")
  args = models.parse_args([])
  assert args.models == list(networks.DEFAULT_MODELS) and args.dtypes == ["float32", "bfloat16"]
  assert args.json.endswith("benchmarks/out/models.json") and args.isolate


@pytest.mark.parametrize(
  "args, message",
  [
    (["--models", "vgg"], "--models: unknown ['vgg']"),
    (["--dtypes", "float16"], "--dtypes: got ['float16']"),
    (["--repeats", "-1"], "must be >= 1"),
  ],
  ids=["unknown-model", "unknown-dtype", "negative-repeats"],
)
def test_bad_arguments_fail_with_a_message(args, message, capsys):
  with pytest.raises(SystemExit):
    models.parse_args(args)
  assert message in capsys.readouterr().err
