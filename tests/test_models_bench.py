"""benchmarks/models.py: the whole-network benchmark runs, reports every field, and convmm's
networks compute what Flax's compute from the same parameters.

The smoke run is a subprocess on the small ``--quick`` networks, as CI and users run it.
Timings are only checked to be positive numbers: these machines are too noisy to assert speed.
"""

import functools
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

MODELS_PY = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "models.py"
IMPL_KEYS = [
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
RATIO_KEYS = ["fwd", "step", "compile_fwd", "compile_step", "temp_fwd", "temp_step"]
ERROR_KEYS = ["fwd", "loss", "grads", "grads_worst_leaf", "model_state", "output_finite"]
# max |convmm - flax| / max |flax| over each tree, float32, these shallow --quick networks:
# both sides round each reduction differently (measured: 1e-7 to 1e-6).
TOLERANCE_F32 = {"fwd": 1e-5, "loss": 1e-5, "grads": 1e-5, "model_state": 1e-5}


@pytest.fixture(scope="module")
def models():
  spec = importlib.util.spec_from_file_location("benchmark_models", MODELS_PY)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while it executes
  spec.loader.exec_module(module)
  return module


def is_positive(value) -> bool:
  return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_field_and_convmm_matches_flax(tmp_path, models, capsys):
  path = tmp_path / "models.json"
  proc = subprocess.run(
    [
      sys.executable,
      str(MODELS_PY),
      "--quick",
      "--isolate",  # each network and dtype in its own process, as a full run does
      "--models",
      "resnet18",
      "--dtypes",
      "float32,bfloat16",
      "--json",
      str(path),
    ],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(path.read_text())
  assert report["meta"]["quick"] is True and report["meta"]["repeats"] == 1
  assert report["meta"]["isolated"] is True
  assert [(r["model"], r["dtype"]) for r in report["results"]] == [
    ("resnet18", "float32"),
    ("resnet18", "bfloat16"),
  ]
  for r in report["results"]:
    label = (r["model"], r["dtype"])
    assert "error" not in r, (label, r.get("error"))
    assert r["params_identical"] is True and r["params"] > 0, label
    assert set(r["impls"]) == {"convmm", "flax"}, label
    for impl, record in r["impls"].items():
      missing = [key for key in IMPL_KEYS if key not in record]
      assert not missing, (label, impl, missing)
      assert all(
        is_positive(record[key]) for key in ("fwd_ms", "step_ms", "compile_fwd_s", "compile_step_s")
      ), (label, impl, record)
      assert isinstance(record["temp_step_bytes"], int), (label, impl)
      assert len(record["fwd_samples_ms"]) == 1 and len(record["compile_step_samples_s"]) == 1
    assert set(r["ratios"]) == set(RATIO_KEYS), label
    assert all(is_positive(r["ratios"][key]) for key in ("fwd", "step", "compile_step")), label
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
  assert "| model dtype" in table and "| resnet18 float32" in table, table
  assert "| resnet18 bfloat16" in table, table
  # --table renders a saved run again, identically.
  assert models.main(["--table", str(path)]) == 0
  assert capsys.readouterr().out == table


def test_convmm_models_run_no_lax_convolution(models):
  """The convmm networks really are computed by convmm: no XLA convolution in their programs
  (otherwise the agreement above would hold trivially), while Flax's are made of them."""
  for name in ("resnet18", "mobilenetv2", "efficientnet_b0", "unet"):
    spec = models.QUICK_MODELS[name]
    flax_model = spec.build(jnp.float32)
    inputs, _ = models.make_batch(spec, jnp.float32, 0)
    variables = jax.eval_shape(
      functools.partial(flax_model.init, train=False), jax.random.key(0), *inputs
    )
    primitives = {}
    for impl, model in (("flax", flax_model), ("convmm", models.convmm_model(flax_model))):
      jaxpr = jax.make_jaxpr(lambda v, *x, m=model: m.apply(v, *x, train=False))(variables, *inputs)
      primitives[impl] = str(jaxpr)
    assert "conv_general_dilated" in primitives["flax"], name
    assert "conv_general_dilated" not in primitives["convmm"], name
    assert "dot_general" in primitives["convmm"], name


def test_parameter_trees_are_checked(models):
  spec = models.QUICK_MODELS["resnet18"]
  inputs, _ = models.make_batch(spec, jnp.float32, 0)
  flax_model = spec.build(jnp.float32)
  count = models.check_same_parameters(flax_model, models.convmm_model(flax_model), inputs)
  shapes = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), *inputs, train=False))
  assert count == sum(math.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))
  wider = flax_model.clone(num_filters=16)
  with pytest.raises(ValueError, match="variable tree differs"):
    models.check_same_parameters(flax_model, wider, inputs)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--models", "vgg"], "--models: unknown ['vgg']"),
    (["--dtypes", "float16"], "--dtypes: got ['float16']"),
    (["--repeats", "-1"], "must be >= 1"),
  ],
  ids=["unknown-model", "unknown-dtype", "negative-repeats"],
)
def test_bad_arguments_fail_with_a_message(models, args, message, capsys):
  with pytest.raises(SystemExit):
    models.parse_args(args)
  assert message in capsys.readouterr().err
