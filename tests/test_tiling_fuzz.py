"""The tiled path against lax: named regressions and a seeded differential fuzz (issue 26).

Small memory budgets force tiles of one row, one column and one batch element
on small shapes, so every geometry the tile loops meet (negative and asymmetric
padding, windows that read only padding, feature and batch groups, strides and
both dilations) is exercised in a few milliseconds per configuration. Each
configuration is compared in every direction (forward, input and kernel
gradients through ``jax.vjp``, and the JVP) with ``lax.conv_general_dilated`` at
``precision=HIGHEST``; integers must agree exactly. ``CONVMM_FUZZ_N`` sets the
number of fuzzed configurations (default sized for CI).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tolerances import assert_close

import convmm
from convmm._engine.plans import tile_cost, tile_plan
from convmm._rules.shapes import conv_spec

HIGHEST = lax.Precision.HIGHEST
FLOATS = (jnp.float32, jnp.float16, jnp.bfloat16)


def _operands(lhs_shape, rhs_shape, dtype, seed):
  rng = np.random.default_rng(seed)
  lhs, rhs = rng.standard_normal(lhs_shape), rng.standard_normal(rhs_shape)
  if jnp.issubdtype(dtype, jnp.integer):
    lhs, rhs = np.round(3 * lhs), np.round(3 * rhs)
  return jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)


def _reduction(rhs_shape, kw):
  """Terms summed per output element (input features per group times taps)."""
  dn = lax.conv_dimension_numbers((1,) * len(rhs_shape), rhs_shape, kw.get("dimension_numbers"))
  return max(1, math.prod(rhs_shape[d] for d in dn.rhs_spec[1:]))


def _lax_reference(lhs, rhs, **kw):
  """lax at HIGHEST, with the padding and input dilation applied by ``lax.pad`` first.

  XLA's CPU convolution itself is wrong for some strided convolutions with
  negative low padding (e.g. a length-13 input, k=3, stride 3, padding
  (-2, 3): outputs of uninitialised memory, up to 1e28); padding the input
  explicitly and convolving it ``VALID`` computes the same mathematics.
  """
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kw.pop("dimension_numbers", None))
  spatial = [lhs.shape[d] for d in dn.lhs_spec[2:]]
  window = [rhs.shape[d] for d in dn.rhs_spec[2:]]
  strides = kw.pop("window_strides")
  dilation = kw.pop("lhs_dilation", None) or (1,) * len(spatial)
  padding = kw.pop("padding")
  if isinstance(padding, str):
    rhs_dilation = kw.get("rhs_dilation") or (1,) * len(spatial)
    effective = [(k - 1) * r + 1 for k, r in zip(window, rhs_dilation)]
    padding = lax.padtype_to_pads(spatial, effective, strides, padding)
  config = [(0, 0, 0)] * lhs.ndim
  for d, (lo, hi), r in zip(dn.lhs_spec[2:], padding, dilation):
    config[d] = (lo, hi, r - 1)
  padded = lax.pad(lhs, jnp.zeros((), lhs.dtype), config)
  return lax.conv_general_dilated(
    padded, rhs, strides, "VALID", dimension_numbers=dn, precision=HIGHEST, **kw
  )


def _check(lhs, rhs, kw, budget, grads=True, seed=0):
  """Forward, vjp (both gradients) and jvp of convmm under ``budget`` against lax."""
  dtype = lhs.dtype
  ref_kw = dict(kw)
  if jnp.issubdtype(dtype, jnp.floating):  # the reference in float32 on the same values
    lhs32, rhs32 = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
  else:
    lhs32, rhs32 = lhs, rhs
  ours = lambda a, b: convmm.conv_general_dilated(
    a, b, precision=HIGHEST, memory_budget=budget, **kw
  )
  ref = functools.partial(_lax_reference, **ref_kw)
  y = jax.jit(ours)(lhs, rhs)
  y_ref = jax.jit(ref)(lhs32, rhs32)
  lax_out = jax.eval_shape(functools.partial(lax.conv_general_dilated, **kw), lhs, rhs)
  assert (y.shape, y.dtype) == (lax_out.shape, lax_out.dtype)
  red = _reduction(rhs.shape, kw)
  if not jnp.issubdtype(dtype, jnp.floating):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    return
  assert_close(y, y_ref, dtype=y.dtype, reduction=red)
  if not grads or y.size == 0:
    return
  rng = np.random.default_rng(seed + 1)
  ct = jnp.asarray(rng.standard_normal(y.shape), dtype)
  tx = jnp.asarray(rng.standard_normal(lhs.shape), dtype)
  tw = jnp.asarray(rng.standard_normal(rhs.shape), dtype)

  def directions(fn, a, b, c, ta, tb):
    _, vjp = jax.vjp(fn, a, b)
    return (*vjp(c), jax.jvp(fn, (a, b), (ta, tb))[1])

  got = jax.jit(lambda *a: directions(ours, *a))(lhs, rhs, ct, tx, tw)
  f32 = lambda a: a.astype(jnp.float32)
  want = jax.jit(lambda *a: directions(ref, *a))(lhs32, rhs32, f32(ct), f32(tx), f32(tw))
  # Each gradient entry sums over the positions its operand meets.
  terms = (y.size // max(1, lhs.shape[0]) * red, y.size, 2 * red)
  for name, g, r, t in zip(("input gradient", "kernel gradient", "jvp"), got, want, terms):
    assert g.shape == r.shape, (name, g.shape, r.shape)
    try:
      assert_close(g, r, dtype=dtype, reduction=t, grad=True)
    except AssertionError as err:
      raise AssertionError(f"{name}: {err}") from None


# ------------------------------------------------------------------ the issue's cases

REGRESSIONS = {
  # (lhs, rhs, dtype, kwargs): lhs/rhs in the layout the kwargs name (default NCHW, OIHW).
  "batch-groups-negative-padding": (
    (4, 1, 5, 1),
    (2, 1, 1, 2),
    jnp.float32,
    dict(window_strides=(1, 1), padding=[(3, -3), (3, 0)], batch_group_count=2),
  ),
  "feature-groups-strided-dilated-bf16": (
    (2, 6, 7, 5),
    (6, 2, 2, 2),
    jnp.bfloat16,
    dict(
      window_strides=(2, 1),
      padding=[(2, 3), (4, 1)],
      rhs_dilation=(1, 3),
      feature_group_count=3,
    ),
  ),
  "feature-groups-1x1-cropped-nhwc-int32": (
    (2, 5, 4, 4),
    (1, 1, 2, 4),
    jnp.int32,
    dict(
      window_strides=(1, 1),
      padding=[(-2, 3), (4, 1)],
      feature_group_count=2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ),
  ),
  "batch-groups-cropped-bf16": (
    (6, 2, 5, 4),
    (3, 2, 2, 2),
    jnp.bfloat16,
    dict(window_strides=(1, 1), padding=[(-2, -1), (3, -1)], batch_group_count=3),
  ),
  "3d-strided-int8": (
    (2, 2, 4, 4, 5),
    (2, 2, 2, 3, 2),
    jnp.int8,
    dict(
      window_strides=(1, 2, 3),
      padding=[(3, 3), (2, 2), (-3, 3)],
      preferred_element_type=jnp.int32,
    ),
  ),
}


@pytest.mark.parametrize("budget", [1, 2000], ids=["b1", "b2000"])
@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_issue_cases_match_lax(name, budget):
  lhs_shape, rhs_shape, dtype, kw = REGRESSIONS[name]
  lhs, rhs = _operands(lhs_shape, rhs_shape, dtype, seed=3)
  _check(lhs, rhs, kw, budget)


@pytest.mark.parametrize(
  "lhs_shape, rhs_shape, dtype, kw",
  [
    ((2, 1, 3, 0, 4), (2, 1, 2, 1, 2), jnp.int8, dict(preferred_element_type=jnp.float16)),
    ((2, 0, 5, 5), (6, 0, 3, 3), jnp.float32, dict(feature_group_count=3)),
    ((0, 2, 5, 5), (4, 2, 3, 3), jnp.float32, {}),
    ((2, 0, 5, 5), (6, 0, 3, 3), jnp.bfloat16, dict(feature_group_count=3, padding=[(1, 1)] * 2)),
    ((3, 2, 0, 4), (2, 2, 1, 2), jnp.float32, dict(padding=[(2, 1), (0, 0)])),
  ],
  ids=[
    "3d-zero-spatial-int8-f16",
    "zero-features-3-groups",
    "zero-batch",
    "zero-features-padded",
    "zero-spatial-padded",
  ],
)
@pytest.mark.parametrize("budget", [1, 10**6], ids=["tiled", "whole"])
def test_zero_sized_dimensions_match_lax(lhs_shape, rhs_shape, dtype, kw, budget):
  kw = {"window_strides": (1,) * (len(lhs_shape) - 2), "padding": "VALID", **kw}
  lhs, rhs = _operands(lhs_shape, rhs_shape, dtype, seed=4)
  _check(lhs, rhs, kw, budget)


# ---------------------------------------------------------------------- the fuzz


def fuzz_case(rng):
  """One random configuration of the tiled path: shapes, layout, groups, padding, dtype, budget."""
  nsp = int(rng.choice([1, 2, 3], p=[0.3, 0.5, 0.2]))
  in_spatial = [int(s) for s in rng.integers(1, {1: 12, 2: 8, 3: 5}[nsp] + 1, nsp)]
  filter_shape = [int(k) for k in rng.integers(1, 4, nsp)]
  strides = tuple(int(s) for s in rng.integers(1, 4, nsp))
  rhs_dilation = tuple(int(d) for d in rng.integers(1, 4, nsp))
  lhs_dilation = tuple(int(d) for d in rng.integers(1, 3, nsp))
  n, c, o, fgc, bgc = int(rng.integers(1, 4)), int(rng.integers(1, 4)), 2, 1, 1
  groups = str(rng.choice(["none", "feature", "depthwise", "batch"], p=[0.4, 0.25, 0.15, 0.2]))
  if groups == "feature":
    fgc = int(rng.integers(2, 4))
    c, o = fgc * int(rng.integers(1, 3)), fgc * int(rng.integers(1, 3))
  elif groups == "depthwise":
    fgc = c = int(rng.integers(2, 4))
    o = c * int(rng.integers(1, 3))
  elif groups == "batch":
    bgc = int(rng.integers(2, 4))
    n, o = bgc * int(rng.integers(1, 3)), bgc * int(rng.integers(1, 3))
  else:
    o = int(rng.integers(1, 4))
  kw: dict = {"window_strides": strides}
  if rng.random() < 0.3:
    kw["rhs_dilation"] = rhs_dilation
  if rng.random() < 0.2:
    kw["lhs_dilation"] = lhs_dilation
  dilated = [(s - 1) * kw.get("lhs_dilation", (1,) * nsp)[d] + 1 for d, s in enumerate(in_spatial)]
  if rng.random() < 0.2 and "lhs_dilation" not in kw:  # (convmm rejects strings with it)
    kw["padding"] = str(rng.choice(["SAME", "VALID", "SAME_LOWER"]))
  else:
    padding = []
    for size in dilated:
      lo, hi = (int(p) for p in rng.integers(-3, 5, 2))
      lo = max(lo, -size)  # lax allows cropping at most the whole input
      hi = max(hi, -(size + lo))
      padding.append((lo, hi))
    kw["padding"] = padding
  letters = "HWD"[:nsp]
  if rng.random() < 0.5:
    kw["dimension_numbers"] = (
      "".join(rng.permutation(list("NC" + letters))),
      "".join(rng.permutation(list("OI" + letters))),
      "".join(rng.permutation(list("NC" + letters))),
    )
  if fgc > 1:
    kw["feature_group_count"] = fgc
  if bgc > 1:
    kw["batch_group_count"] = bgc
  dtype = rng.choice([jnp.float32, jnp.float32, jnp.float16, jnp.bfloat16, jnp.int8])
  if dtype == jnp.int8:
    kw["preferred_element_type"] = jnp.int32
  dn = lax.conv_dimension_numbers((1,) * (nsp + 2), (1,) * (nsp + 2), kw.get("dimension_numbers"))
  canonical_lhs, canonical_rhs = (n, c, *in_spatial), (o, c // fgc, *filter_shape)
  lhs_shape = [0] * (nsp + 2)
  rhs_shape = [0] * (nsp + 2)
  for i, d in enumerate(dn.lhs_spec):
    lhs_shape[d] = canonical_lhs[i]
  for i, d in enumerate(dn.rhs_spec):
    rhs_shape[d] = canonical_rhs[i]
  return tuple(lhs_shape), tuple(rhs_shape), dtype, kw


def _spec(lhs_shape, rhs_shape, kw):
  """The convolution's spec with the input dilation left out (the tile loops see its phases)."""
  return conv_spec(
    "fuzz",
    lhs_shape,
    rhs_shape,
    kw["window_strides"],
    kw["padding"],
    None,
    kw.get("rhs_dilation"),
    kw.get("dimension_numbers"),
    kw.get("feature_group_count", 1),
    kw.get("batch_group_count", 1),
  )


def _budget(rng, lhs_shape, rhs_shape, kw):
  """A budget that tiles: one byte (the finest tiles) or a fraction of the whole working set."""
  if rng.random() < 0.4:
    return 1
  spec = _spec(lhs_shape, rhs_shape, kw)
  g = spec.geometry
  whole = tile_cost(spec, 4, g.batch, g.out_spatial, 3, 4)
  return max(1, int(whole * rng.uniform(0.05, 0.7)))


FUZZ_N = int(os.environ.get("CONVMM_FUZZ_N", "48"))


@pytest.mark.parametrize("start", range(0, FUZZ_N, 8), ids=lambda s: f"seeds{s}-{s + 7}")
def test_tiled_path_fuzz_matches_lax(start):
  failures = []
  for seed in range(start, min(start + 8, FUZZ_N)):
    rng = np.random.default_rng(26_000 + seed)
    lhs_shape, rhs_shape, dtype, kw = fuzz_case(rng)
    budget = _budget(rng, lhs_shape, rhs_shape, kw)
    lhs, rhs = _operands(lhs_shape, rhs_shape, dtype, seed)
    try:
      _check(lhs, rhs, kw, budget, seed=seed)
    except AssertionError as err:
      failures.append(
        f"seed {seed}: lhs {lhs_shape} rhs {rhs_shape} {jnp.dtype(dtype).name} "
        f"budget {budget} {kw}\n{str(err)[:1500]}"
      )
  assert not failures, "\n\n".join(failures)


def test_fuzz_tiles_its_cases():
  # The fuzz must exercise the tile loops, not only the whole-convolution path.
  tiled = 0
  for seed in range(FUZZ_N):
    rng = np.random.default_rng(26_000 + seed)
    lhs_shape, rhs_shape, _, kw = fuzz_case(rng)
    budget = _budget(rng, lhs_shape, rhs_shape, kw)
    if "lhs_dilation" in kw:
      continue
    spec = _spec(lhs_shape, rhs_shape, kw)
    tiled += not tile_plan(spec, 4, budget).is_whole(spec.geometry.batch)
  assert tiled > FUZZ_N // 3, tiled
