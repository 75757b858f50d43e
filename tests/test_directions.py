"""Each direction of a convolution by its own algorithm (issue 23): values, purity, the rules.

Every assignment of XLA's convolution or convmm's engine to the forward pass,
the input gradient and the kernel gradient is compared with
``lax.conv_general_dilated`` at ``precision=HIGHEST`` in every direction
(forward, vjp, jvp), and the explicit convmm methods are checked to leave no
XLA convolution in the compiled program.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_testing import compiled, training_step, xla_convolutions
from jax import lax
from tolerances import assert_close

import convmm
from convmm._engine import directions as _directions
from convmm._engine import policy
from convmm._rules.shapes import conv_spec

HIGHEST = lax.Precision.HIGHEST
NHWC = ("NHWC", "HWIO", "NHWC")

CASES = {
  # name: (lhs shape, rhs shape, kwargs); lhs/rhs in the layout of dimension_numbers
  "dense-3x3": ((2, 9, 8, 5), (3, 3, 5, 6), dict(padding="SAME", dimension_numbers=NHWC)),
  "strided-cropped": (
    (2, 11, 9, 3),
    (3, 2, 3, 4),
    dict(window_strides=(2, 3), padding=[(-1, 2), (1, -2)], dimension_numbers=NHWC),
  ),
  "grouped-dilated": (
    (2, 6, 10, 7),
    (4, 3, 3, 2),
    dict(padding=[(2, 1), (0, 3)], rhs_dilation=(2, 1), feature_group_count=2),
  ),
  "depthwise-ncw": ((2, 4, 13), (8, 1, 5), dict(padding="SAME", feature_group_count=4)),
  "input-dilated": (
    (2, 5, 5, 3),
    (3, 3, 3, 2),
    dict(padding=[(1, 2), (2, 1)], lhs_dilation=(2, 3), dimension_numbers=NHWC),
  ),
  "batch-groups": ((4, 3, 6, 5), (4, 3, 2, 2), dict(padding="VALID", batch_group_count=2)),
  "3d": ((1, 2, 5, 4, 6), (3, 2, 2, 3, 2), dict(padding="SAME", window_strides=(1, 2, 1))),
}
ASSIGNMENTS = list(itertools.product(("convmm", "xla"), repeat=3))


def _operands(name, seed=0):
  lhs_shape, rhs_shape, kw = CASES[name]
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)
  return lhs, rhs, {"window_strides": (1,) * (lhs.ndim - 2), **kw}


def _reference(lhs, rhs, kw):
  # lax on an input padded by lax.pad (XLA's convolution mishandles some negative low
  # padding, see convmm._native), so that the reference is right for every case.
  return lax.conv_general_dilated(lhs, rhs, precision=HIGHEST, **kw)


@pytest.mark.parametrize("directions", ASSIGNMENTS, ids=lambda d: "-".join(d))
@pytest.mark.parametrize("name", list(CASES))
def test_every_assignment_matches_lax_in_every_direction(monkeypatch, name, directions):
  monkeypatch.setattr(_directions, "choose", lambda *a: directions)
  lhs, rhs, kw = _operands(name)
  ours = lambda a, b: convmm.conv_general_dilated(a, b, precision=HIGHEST, **kw)
  ref = lambda a, b: _reference(a, b, kw)
  y, vjp = jax.vjp(ours, lhs, rhs)
  y_ref, vjp_ref = jax.vjp(ref, lhs, rhs)
  reduction = int(np.prod(rhs.shape)) // max(1, y.shape[-1])
  assert_close(y, y_ref, reduction=reduction)
  ct = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
  for got, want in zip(vjp(ct), vjp_ref(ct)):
    assert_close(got, want, reduction=y.size, grad=True)
  tangents = (jnp.ones_like(lhs), jnp.full_like(rhs, 0.5))
  assert_close(
    jax.jvp(ours, (lhs, rhs), tangents)[1],
    jax.jvp(ref, (lhs, rhs), tangents)[1],
    reduction=2 * reduction,
    grad=True,
  )


@pytest.mark.parametrize("method", ["convmm", "im2col", "depthwise", "shift"])
@pytest.mark.parametrize("name", ["dense-3x3", "depthwise-ncw", "strided-cropped"])
def test_pure_methods_emit_no_xla_convolution(name, method):
  lhs, rhs, kw = _operands(name)
  if method == "depthwise" and name != "depthwise-ncw":
    pytest.skip("depthwise needs one input feature per group")
  conv = lambda a, b: convmm.conv_general_dilated(a, b, method=method, **kw)
  assert xla_convolutions(compiled(lambda a, b: training_step(conv, a, b), lhs, rhs)) == 0
  # ...and the default does use XLA's convolution (the input gradient) on CPU.
  if name == "dense-3x3" and jax.default_backend() == "cpu":
    auto = lambda a, b: convmm.conv_general_dilated(a, b, **kw)
    assert xla_convolutions(compiled(lambda a, b: training_step(auto, a, b), lhs, rhs)) > 0


def test_replace_convs_with_a_pure_method_leaves_no_convolution():
  lhs, rhs, kw = _operands("dense-3x3")

  def f(a, b):
    return jnp.sum(jnp.tanh(lax.conv_general_dilated(a, b, **kw)))

  step = jax.grad(f, argnums=(0, 1))
  pure = convmm.replace_convs(step, method="convmm")
  assert xla_convolutions(compiled(step, lhs, rhs)) > 0
  assert xla_convolutions(compiled(pure, lhs, rhs)) == 0
  for got, want in zip(jax.jit(pure)(lhs, rhs), step(lhs, rhs)):
    assert_close(got, want, reduction=lhs.size, grad=True)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule table")
@pytest.mark.parametrize(
  "name, dtype, expected",
  [
    ("dense-3x3", jnp.float32, ("im2col", "xla", "im2col")),
    ("strided-cropped", jnp.float32, ("xla", "im2col", "im2col")),
    ("dense-3x3", jnp.bfloat16, ("im2col", "im2col", "im2col")),
    ("grouped-dilated", jnp.float32, ("im2col", "im2col", "im2col")),
    ("depthwise-ncw", jnp.float32, ("depthwise", "depthwise", "depthwise")),
    ("input-dilated", jnp.float32, ("im2col", "im2col", "im2col")),
    ("3d", jnp.float32, ("im2col", "im2col", "im2col")),
  ],
)
def test_cpu_rules(name, dtype, expected):
  lhs, rhs, kw = _operands(name)
  chosen = convmm.algorithms(
    jax.ShapeDtypeStruct(lhs.shape, dtype), jax.ShapeDtypeStruct(rhs.shape, dtype), **kw
  )
  assert tuple(chosen.values()) == expected
  assert list(chosen) == ["forward", "input_grad", "kernel_grad"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule table")
def test_long_windows_go_to_xla():
  # lax's kernel-gradient convolution: a window as long as the signal.
  x = jax.ShapeDtypeStruct((4, 1024, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((1000, 8, 8), jnp.float32)
  chosen = convmm.algorithms(x, w, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
  assert chosen["forward"] == "xla"


def test_rules_on_other_backends():
  lhs, rhs, kw = _operands("dense-3x3")
  spec = conv_spec("t", lhs.shape, rhs.shape, kw["window_strides"], "SAME", None, None, NHWC, 1, 1)
  assert policy.direction_rule(spec, jnp.float32, "im2col", "gpu") == policy.XLA
  assert policy.direction_rule(spec, jnp.float32, "depthwise", "tpu") == policy.CONVMM


def test_auto_keeps_every_transformation():
  lhs, rhs, kw = _operands("dense-3x3")
  lhs, rhs = lhs[:1, :5, :4, :2], rhs[:, :, :2, :3]
  ours = lambda a, b: convmm.conv_general_dilated(a, b, precision=HIGHEST, **kw)
  ref = lambda a, b: _reference(a, b, kw)
  assert convmm.algorithms(lhs, rhs, **kw)["forward"] == "xla"
  for transform in (jax.jacfwd, jax.jacrev, jax.hessian):
    assert_close(transform(ours, 1)(lhs, rhs), transform(ref, 1)(lhs, rhs), grad=True)
  batch = jnp.stack([lhs, 2 * lhs])
  assert_close(jax.vmap(ours, (0, None))(batch, rhs), jax.vmap(ref, (0, None))(batch, rhs))
  y = ours(lhs, rhs)
  (dx,) = jax.linear_transpose(lambda a: ours(a, rhs), lhs)(y)
  (dx_ref,) = jax.linear_transpose(lambda a: ref(a, rhs), lhs)(y)
  assert_close(dx, dx_ref, grad=True)


def test_autotune_measures_once_and_reports(monkeypatch, tmp_path):
  monkeypatch.setenv("CONVMM_CACHE_DIR", str(tmp_path))
  convmm.clear_autotune_cache()
  lhs, rhs, kw = _operands("dense-3x3")
  f = jax.jit(
    lambda a, b: training_step(
      lambda a, b: convmm.conv_general_dilated(a, b, precision=HIGHEST, method="autotune", **kw),
      a,
      b,
    )
  )
  got = f(lhs, rhs)
  want = training_step(lambda a, b: _reference(a, b, kw), lhs, rhs)
  for g, r in zip(got, want):
    assert_close(g, r, reduction=lhs.size, grad=True)
  report = convmm.autotune_report()
  assert {r["problem"]["direction"] for r in report} == set(_directions.DIRECTION_NAMES)
  assert all(r["source"] == "measured" and r["choice"] in ("convmm", "xla") for r in report)
  assert (tmp_path / "convmm-autotune.json").exists()
  # A new process would read the file; this one answers from memory, measuring nothing.
  convmm.algorithms(lhs, rhs, **kw, precision=HIGHEST, method="autotune")
  assert [r["source"] for r in convmm.autotune_report()[3:]] == ["memory"] * 3
  convmm.clear_autotune_cache()
  convmm.algorithms(lhs, rhs, **kw, precision=HIGHEST, method="autotune")
  assert [r["source"] for r in convmm.autotune_report()] == ["file"] * 3
