"""``python -m benchmarks.bench`` runs end to end, writes well-formed JSON, and convmm agrees
with lax.

The quick suite runs as a subprocess from the repository root, as CI and users run it. Timings
are only checked to be positive numbers: these machines are too noisy to assert anything about
speed.
"""

import json
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tolerances import tol

import convmm
from benchmarks.chosen import conv_algorithms
from benchmarks.report import algorithms_text, fmt
from benchmarks.suite import NHWC, QUICK_SUITE

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK_LAYERS = ["tiny3x3_s2", "tiny_adjoint"]
IMPL_KEYS = [
  "fwd_ms",
  "step_ms",
  "fwd_median_ms",
  "step_min_ms",
  "fwd_samples_ms",
  "step_samples_ms",
  "fwd_page_faults",
  "step_page_faults",
  "gflops_fwd",
  "gflops_step",
  "gemm_fraction_fwd",
  "gemm_fraction_step",
]
JAX_KEYS = [
  "compile_fwd_s",
  "compile_step_s",
  "lower_fwd_s",
  "xla_compile_step_s",
  "temp_fwd_bytes",
  "temp_step_bytes",
]
RATIO_KEYS = [
  "fwd_vs_lax",
  "step_vs_lax",
  "fwd_vs_torch",
  "step_vs_torch",
  "compile_fwd_vs_lax",
  "compile_step_vs_lax",
  "temp_fwd_vs_lax",
  "temp_step_vs_lax",
]
SUMMARY_KEYS = [
  "geomean_step_vs_lax",
  "geomean_fwd_vs_lax",
  "geomean_step_vs_torch",
  "geomean_fwd_vs_torch",
  "max_step_vs_lax",
  "max_compile_vs_lax",
  "layers",
]


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "benchmarks.bench", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def check_rates(meta) -> None:
  """The machine's GEMM and convolution rates are recorded with every run."""
  rates = meta["rates"]
  assert [(g["operands"], g["shape"]) for g in rates["gemm"]] == [
    (operands, shape)
    for operands in ("float32", "bfloat16")
    for shape in ([6272, 1152, 128], [2048, 2048, 2048])
  ]
  assert all(is_positive(g["gflops"]) and g["result"] == "float32" for g in rates["gemm"])
  (conv,) = rates["conv"]
  assert conv["lhs_shape"] == [8, 28, 28, 128] and conv["rhs_shape"] == [3, 3, 128, 128]
  # 2 * 8*28*28 outputs * 3*3*128*128 multiply-adds, in the time measured
  assert conv["gflops"] == pytest.approx(2 * 8 * 28 * 28 * 9 * 128 * 128 / conv["ms"] / 1e6)


def is_positive(value) -> bool:
  return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """``(process, path of its JSON)`` of one ``--quick`` run, shared by the tests below."""
  path = tmp_path_factory.mktemp("bench") / "quick.json"
  proc = run_bench("--quick", "--reps", "2", "--json", str(path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, path


def test_quick_run_writes_json_and_convmm_matches_lax(quick_run):
  proc, path = quick_run
  report = json.loads(path.read_text())

  assert set(report) == {"meta", "variants", "layers", "summary", "memory_target"}
  assert report["memory_target"] is None  # compiled by full runs only
  assert report["meta"]["cores"] >= 1 and report["meta"]["reps"] == 2
  check_rates(report["meta"])
  torch_used = report["meta"]["torch_used"]
  assert [layer["name"] for layer in report["layers"]] == QUICK_LAYERS
  assert set(report["summary"]) == {"convmm"}
  assert set(report["summary"]["convmm"]) == set(SUMMARY_KEYS)
  assert report["summary"]["convmm"]["layers"] == len(QUICK_LAYERS)

  for layer in report["layers"]:
    name = layer["name"]
    assert layer["reps"] == 2, name
    assert is_positive(layer["gemm"]["ms"]) and layer["flops"]["step"] == 3 * layer["flops"]["fwd"]
    expected_impls = {"convmm", "lax", "torch"} if torch_used else {"convmm", "lax"}
    assert set(layer["impls"]) == expected_impls, name
    for impl, record in layer["impls"].items():
      assert record["error"] is None, (name, impl, record["error"])
      keys = IMPL_KEYS + (JAX_KEYS if impl != "torch" else [])
      missing = [key for key in keys if key not in record]
      assert not missing, (name, impl, missing)
      assert all(is_positive(record[key]) for key in ("fwd_ms", "step_ms")), (name, impl)
      assert len(record["fwd_samples_ms"]) == 2, (name, impl)
      if impl != "torch":
        assert isinstance(record["temp_step_bytes"], int), (name, impl)
    assert set(layer["ratios"]["convmm"]) == set(RATIO_KEYS), name
    assert is_positive(layer["ratios"]["convmm"]["step_vs_lax"]), name

    # convmm against lax: output, loss and both gradients, within the float32 tolerance of
    # the longest reduction involved (tests/tolerances.py).
    errors = layer["errors"]["convmm"]
    reduction = errors["reduction"]
    for key in ("fwd", "loss"):
      assert errors[key] <= tol(np.float32, reduction), (name, key, errors)
    for key in ("dlhs", "drhs"):
      assert errors[key] <= tol(np.float32, reduction, grad=True), (name, key, errors)
    if torch_used:  # the PyTorch layer computes the same function, so timings compare
      assert layer["errors"]["torch"]["fwd"] <= tol(np.float32, reduction), (name, layer["errors"])

  # Which algorithm each direction used: lax's program is one XLA convolution; convmm's strided
  # conv is what convmm.algorithms says for the same call, its strided adjoint col2im (no
  # convolution primitive).
  conv_run, adjoint_run = report["layers"]
  assert [r["impls"]["lax"]["algorithms"] for r in report["layers"]] == [{"xla/xla/xla": 1}] * 2
  tiny = QUICK_SUITE[0]
  x, w = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in (tiny.lhs_shape, tiny.rhs_shape))
  expected = "/".join(convmm.algorithms(x, w, **tiny.kwargs).values())
  assert conv_run["impls"]["convmm"]["algorithms"] == {expected: 1}
  assert adjoint_run["impls"]["convmm"]["algorithms"] == {}

  table = proc.stdout
  assert "\n| layer | fwd ms | lax | torch |" in table, table[:500]
  assert f"| {expected} |\n| tiny_adjoint |" in table, table
  assert "*none*: no convolution primitive" in table, table
  assert "XLA's GFLOP/s on this machine (median of 3): float32 GEMM " in table, table[:800]
  assert all(f"| {name} |" in table for name in QUICK_LAYERS), table
  assert "**convmm** over 2 layers (geometric means): step vs lax" in table


def test_list_shows_every_layer(capsys):
  from benchmarks import bench  # in-process: a subprocess would import jax and torch again

  assert bench.main(["--list"]) == 0
  stdout = capsys.readouterr().out
  for name in (
    "resnet3x3",
    "depthwise3x3",
    "grouped3x3",
    "unet_transpose",
    "unet_adjoint",
    "audio1d_k9",
    "video3d",
    "nchw3x3",
  ):
    assert name in stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--layers", "no_such_layer"], "matches no layer"),
    (["--reps", "0"], "--reps and --min-reps must be >= 1"),
    (["--variant", "method"], "expected key=value"),
  ],
  ids=["unknown-layer", "zero-reps", "bad-variant"],
)
def test_bad_arguments_fail_with_a_message(args, message, capsys):
  from benchmarks import bench

  with pytest.raises(SystemExit) as exit_info:
    bench.main(args)
  assert exit_info.value.code != 0
  assert message in capsys.readouterr().err + str(exit_info.value.code)


def test_results_go_to_the_ignored_out_folder():
  from benchmarks import bench

  assert bench.parse_args(["--quick"]).json == str(REPO / "benchmarks/out/layers-quick.json")
  assert bench.parse_args([]).json == str(REPO / "benchmarks/out/layers.json")
  assert "benchmarks/out/" in (REPO / ".gitignore").read_text().splitlines()


def test_performance_page_is_generated_from_the_json(quick_run, tmp_path):
  from benchmarks import performance_page

  _, path = quick_run
  report = json.loads(path.read_text())
  readme = tmp_path / "README.md"
  readme.write_text(
    f"# x\n\n{performance_page.README_START}\nold table\n{performance_page.README_END}\n\nend\n"
  )
  page = tmp_path / "performance.md"
  argv = ["--layers", str(path), "--models", "none", "--out", str(page), "--readme", str(readme)]
  assert performance_page.main(argv) == 0
  text = page.read_text()
  gemm = report["meta"]["rates"]["gemm"][0]
  assert f"| XLA float32 GEMM | {gemm['gflops']:.0f} GFLOP/s (6272x1152x128)," in text, text
  assert report["meta"]["date"][:10] in text
  for layer in report["layers"]:
    step_ms = layer["impls"]["convmm"]["step_ms"]
    assert re.search(rf"\n\| {layer['name']} \| [^|]+ \|.* \| {fmt(step_ms)} \|", text), text
  assert "No whole-network run on this page yet" in text
  assert "| tiny_adjoint |" in text and " | none |\n" in text, text
  # Runs from before the algorithms were recorded still make a page ('-' in their column).
  for layer in report["layers"]:
    for record in layer["impls"].values():
      record.pop("algorithms", None)
  old_page = performance_page.page(report, None)
  assert re.search(r"\n\| tiny_adjoint \|.* \| - \|\n", old_page), old_page
  new_readme = readme.read_text()
  assert new_readme.startswith("# x\n\n") and new_readme.endswith("\n\nend\n")
  assert "old table" not in new_readme and "all 2 suite layers (geometric mean)" in new_readme
  geomean = report["summary"]["convmm"]["geomean_step_vs_lax"]
  assert f"| all 2 suite layers (geometric mean) | {performance_page._x(geomean)} |" in new_readme


# ------------------------------------------- which algorithm each direction used (chosen.py)


def operand(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


X, W, W_DEPTHWISE = operand(2, 8, 8, 8), operand(3, 3, 8, 8), operand(3, 3, 1, 8)


def conv(x, w, method, strides=(1, 1), **kwargs):
  return convmm.conv_general_dilated(
    x, w, strides, "SAME", dimension_numbers=NHWC, method=method, **kwargs
  )


@pytest.mark.parametrize(
  "method, w, groups, expected",
  [
    ("xla", W, 1, {"xla/xla/xla": 1}),
    ("im2col", W, 1, {"im2col/im2col/im2col": 1}),
    ("depthwise", W_DEPTHWISE, 8, {"depthwise/depthwise/depthwise": 1}),
    ("shift", W, 1, {}),  # per-tap GEMMs, no convolution primitive (documented in chosen.py)
  ],
  ids=["xla", "im2col", "depthwise", "shift"],
)
def test_jaxpr_walk_reads_the_method_asked_for(method, w, groups, expected):
  found = conv_algorithms(lambda x, w: conv(x, w, method, feature_group_count=groups), X, w)
  assert found == expected


# name: (lhs, rhs, window_strides, dimension_numbers, feature_group_count)
AUTO_CASES = {
  "3x3": (X, W, (1, 1), NHWC, 1),
  "3x3-stride-2": (X, W, (2, 2), NHWC, 1),
  "rgb-stem": (operand(2, 8, 8, 3), operand(3, 3, 3, 8), (2, 2), NHWC, 1),
  "1-d": (operand(2, 16, 8), operand(3, 8, 8), (1,), ("NWC", "WIO", "NWC"), 1),
  "depthwise": (X, W_DEPTHWISE, (1, 1), NHWC, 8),
  "bfloat16": (operand(2, 8, 8, 8, dtype=jnp.bfloat16), operand(3, 3, 8, 8, dtype=jnp.bfloat16),
               (1, 1), NHWC, 1),
}  # fmt: skip


def test_jaxpr_walk_under_auto_agrees_with_convmm_algorithms():
  """What the traced program holds is what ``convmm.algorithms`` predicts for the same call,
  over cases where auto mixes XLA's directions with convmm's."""
  found = {}
  for name, (x, w, strides, dn, groups) in AUTO_CASES.items():
    kwargs = dict(dimension_numbers=dn, feature_group_count=groups)
    expected = "/".join(convmm.algorithms(x, w, strides, "SAME", **kwargs).values())
    traced = conv_algorithms(
      lambda x, w, s=strides, kw=kwargs: convmm.conv_general_dilated(x, w, s, "SAME", **kw), x, w
    )
    assert traced == {expected: 1}, name
    found[name] = expected
  # The comparison covers mixed choices, not one answer everywhere (auto's CPU rules today).
  assert len(set(found.values())) >= 3, found


def _custom_vjp_conv(x, w):
  f = jax.custom_vjp(lambda x: conv(x, w, "im2col"))
  f.defvjp(lambda x: (conv(x, w, "im2col"), None), lambda _, ct: (ct,))
  return f(x)


def _custom_jvp_conv(x, w):
  f = jax.custom_jvp(lambda x: conv(x, w, "im2col"))
  f.defjvp(lambda primals, tangents: (conv(primals[0], w, "im2col"), tangents[0]))
  return f(x)


@pytest.mark.parametrize(
  "wrap",
  [
    lambda x, w: jax.jit(jax.checkpoint(lambda x: conv(x, w, "im2col")))(x),
    lambda x, w: lax.scan(lambda c, _: (conv(c, w, "im2col"), None), x, None, length=3)[0],
    lambda x, w: lax.cond(x.sum() > 0, lambda x: conv(x, w, "im2col"), lambda x: x, x),
    lambda x, w: jax.vmap(lambda x: conv(x[None], w, "im2col")[0])(x),
    _custom_vjp_conv,
    _custom_jvp_conv,
  ],
  ids=["jit-checkpoint", "scan", "cond", "vmap", "custom_vjp", "custom_jvp"],
)
def test_jaxpr_walk_finds_nested_convolutions(wrap):
  """A convolution inside a sub-jaxpr is found, next to lax's own at the top level (XLA's in
  every direction); one in a loop body counts once."""
  fn = lambda x, w: wrap(x, w) + lax.conv_general_dilated(x, w, (1, 1), "SAME", None, None, NHWC)
  assert conv_algorithms(fn, X, W) == {"im2col/im2col/im2col": 1, "xla/xla/xla": 1}


def test_algorithms_text():
  assert algorithms_text({"xla/xla/im2col": 1}) == "xla/xla/im2col"
  many = {"im2col/im2col/im2col": 1, "xla/xla/im2col": 12, "depthwise/depthwise/depthwise": 1}
  assert algorithms_text(many) == (
    "12x xla/xla/im2col, 1x im2col/im2col/im2col, 1x depthwise/depthwise/depthwise"
  )
  # Convolutions the reference program has and convmm's has no primitive for (col2im, shift).
  assert algorithms_text({}, {"xla/xla/xla": 1}) == "none"
  assert algorithms_text({"im2col/xla/im2col": 2}, {"xla/xla/xla": 3}) == (
    "2x im2col/xla/im2col, 1x none"
  )
  assert algorithms_text(None, {"xla/xla/xla": 1}) == "-"  # a run that did not record them


def test_performance_page_channels_first_section():
  from benchmarks import performance_page

  assert "python -m benchmarks.layouts" in performance_page.layouts_section(None)[0]
  run = {
    "shape": dict(batch=2, channels=8, length=16, kernel=3),
    "one depthwise layer": {
      "ms": {"convmm NCW:fwd": 1.25, "convmm NCW:step": 3.5},
      "algorithms": {"convmm NCW": {"depthwise/depthwise/depthwise": 1}},
    },
    "compile_s": {"lax": 0.5, "replace_convs": 0.75},
  }
  text = re.sub(" +", " ", "\n".join(performance_page.layouts_section(run)))
  row = "| one depthwise layer | convmm NCW | 1.25 | 3.50 | 1x depthwise/depthwise/depthwise |"
  assert row in text, text
  assert "lax 0.50 s; `replace_convs` of it 0.75 s" in text
