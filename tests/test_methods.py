"""Every computation method of the core against lax, and the memory budget."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tolerances import assert_close

import convmm
import convmm._engine.autodiff
import convmm._engine.plans
import convmm._engine.tiling

HIGHEST = lax.Precision.HIGHEST
DN = ("NHWC", "HWIO", "NHWC")

CASES = [
  pytest.param(
    (2, 7, 6, 4), (3, 3, 4, 5), dict(window_strides=(1, 1), padding="SAME"), id="dense-3x3-same"
  ),
  pytest.param(
    (2, 9, 8, 4),
    (3, 2, 2, 6),
    dict(
      window_strides=(2, 1), padding=((1, 0), (2, -1)), rhs_dilation=(1, 2), feature_group_count=2
    ),
    id="grouped-strided-dilated",
  ),
  pytest.param(
    (2, 8, 7, 6),
    (3, 3, 1, 12),
    dict(window_strides=(2, 2), padding="SAME_LOWER", feature_group_count=6),
    id="depthwise-mult2",
  ),
  pytest.param(
    (4, 6, 5, 3),
    (2, 3, 3, 4),
    dict(window_strides=(1, 1), padding="VALID", batch_group_count=2),
    id="batch-groups",
  ),
  pytest.param(
    (2, 5, 6, 3),
    (3, 3, 3, 2),
    dict(window_strides=(1, 1), padding=((2, 2), (1, 1)), lhs_dilation=(2, 1)),
    id="lhs-dilation",
  ),
]


def _methods_for(kw, c):
  groups = kw.get("feature_group_count", 1)
  methods = ["auto", "im2col", "shift"]
  if groups == c and kw.get("batch_group_count", 1) == 1:
    methods.append("depthwise")
  return methods


@pytest.mark.parametrize("x_shape, w_shape, kw", CASES)
def test_every_method_matches_lax_value_and_grads(x_shape, w_shape, kw):
  kx, kw_ = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw_, w_shape)

  def loss(conv, **extra):
    return lambda x, w: jnp.sum(
      jnp.sin(conv(x, w, dimension_numbers=DN, precision=HIGHEST, **kw, **extra))
    )

  ref_y = lax.conv_general_dilated(x, w, dimension_numbers=DN, precision=HIGHEST, **kw)
  ref_g = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
  reduction = int(np.prod(w_shape[:-1]))
  for method in _methods_for(kw, x_shape[-1]):
    # Jitted: eager autodiff compiles every primitive on its own (minutes in CI).
    conv = functools.partial(
      convmm.conv_general_dilated, dimension_numbers=DN, precision=HIGHEST, method=method, **kw
    )
    y = jax.jit(conv)(x, w)
    assert_close(y, ref_y, reduction=reduction)
    g = jax.jit(jax.grad(loss(convmm.conv_general_dilated, method=method), (0, 1)))(x, w)
    for got, want in zip(g, ref_g):
      assert_close(got, want, reduction=reduction, grad=True)


def test_depthwise_bfloat16_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (3, 3, 1, 8)).astype(jnp.bfloat16)
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN, feature_group_count=8)
  y = convmm.conv_general_dilated(x, w, method="depthwise", **kw)
  ref = lax.conv_general_dilated(
    x.astype(jnp.float32), w.astype(jnp.float32), precision=HIGHEST, **kw
  )
  assert y.dtype == lax.conv_general_dilated(x, w, **kw).dtype == jnp.bfloat16
  assert_close(y, ref, dtype=jnp.bfloat16, reduction=9)


def test_grouped_patches_are_built_group_major():
  # Feature groups: the input moves its group axis first and each group gets its
  # own patch matrix, so no transpose moves the patches (9x the input here), only
  # the input, the kernel and the output (the patches' transpose made a grouped
  # 8x28x28x128 layer's forward 1.6x slower in float32, 2x in bfloat16).
  x, w = jnp.ones((2, 6, 6, 8)), jnp.ones((3, 3, 2, 8))
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN, feature_group_count=4)
  text = jax.jit(functools.partial(convmm.conv_general_dilated, **kw)).lower(x, w).as_text()
  operands = re.findall(r"stablehlo.transpose .*: \(tensor<([\dx]+)x\w+>\)", text)
  sizes = [math.prod(int(d) for d in shape.split("x")) for shape in operands]
  assert sizes and max(sizes) <= x.size
  ref = lax.conv_general_dilated(x, w, precision=HIGHEST, **kw)
  assert_close(convmm.conv_general_dilated(x, w, **kw), ref, reduction=18)


def test_tiled_im2col_matches_untiled_and_lax():
  # A 600-byte budget forces one sample per chunk (lax.map over the batch).
  x = jax.random.normal(jax.random.key(3), (6, 5, 5, 3))
  w = jax.random.normal(jax.random.key(4), (3, 3, 3, 4))
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN, precision=HIGHEST)
  tiled = lambda x, w: convmm.conv_general_dilated(x, w, method="im2col", memory_budget=600, **kw)
  ref = lambda x, w: lax.conv_general_dilated(x, w, **kw)
  assert "while" in jax.jit(tiled).lower(x, w).as_text()  # really tiled
  assert_close(tiled(x, w), ref(x, w), reduction=27)
  g = jax.grad(lambda x, w: jnp.sum(tiled(x, w) ** 2), (0, 1))(x, w)
  g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), (0, 1))(x, w)
  for got, want in zip(g, g_ref):
    assert_close(got, want, reduction=27 * 5 * 5, grad=True)


@pytest.mark.parametrize("method", ["im2col", "depthwise"])
def test_row_tiles_when_one_sample_exceeds_budget(method):
  # One sample's patches (2 * 7*6 * 9 * 4 * 4 bytes) exceed a 1 KiB budget, so the
  # plan tiles output rows inside each sample (plus the batch). The depthwise
  # multiply-accumulate builds no patches: it is never tiled, whatever the budget.
  x = jax.random.normal(jax.random.key(5), (2, 9, 8, 4))
  groups = 4 if method == "depthwise" else 1
  w = jax.random.normal(jax.random.key(6), (3, 3, 4 // groups, 8))
  kw = dict(
    window_strides=(1, 1),
    padding=((1, 0), (0, 1)),
    rhs_dilation=(1, 2),
    dimension_numbers=DN,
    precision=HIGHEST,
    feature_group_count=groups,
  )
  f = lambda x, w: convmm.conv_general_dilated(x, w, memory_budget=1024, method=method, **kw)
  ref = lambda x, w: lax.conv_general_dilated(x, w, **kw)
  assert ("while" in jax.jit(f).lower(x, w).as_text()) == (method == "im2col")
  assert_close(f(x, w), ref(x, w), reduction=36)
  g = jax.grad(lambda x, w: jnp.sum(jnp.cos(f(x, w))), (0, 1))(x, w)
  g_ref = jax.grad(lambda x, w: jnp.sum(jnp.cos(ref(x, w))), (0, 1))(x, w)
  for got, want in zip(g, g_ref):
    assert_close(got, want, reduction=36 * 8 * 8, grad=True)


def test_large_layer_temp_memory_stays_within_budget(monkeypatch):
  # Issue target: a 32x112x112x64 input with a 3x3 kernel (a ~900 MiB patch matrix
  # if built whole) compiles to <= 160 MiB of temporaries for the forward, and a
  # training step to <= lax's temporaries + 160 MiB. Compiled only, never run.
  # On one device: with several (an Auto mesh), the spatial blocks (convmm._engine.blocks)
  # add one padded copy of the input (forward: 240 MiB).
  monkeypatch.setattr(convmm._engine.plans, "unknown_split", lambda x: 1)
  monkeypatch.setattr(convmm._engine.tiling, "unknown_split", lambda x: 1)
  monkeypatch.setattr(convmm._engine.autodiff, "unknown_split", lambda x: 1)
  x = jax.ShapeDtypeStruct((32, 112, 112, 64), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)

  def temp_mib(f):
    return jax.jit(f).lower(x, w).compile().memory_analysis().temp_size_in_bytes / 2**20

  def step(conv):
    return jax.value_and_grad(
      lambda x, w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=DN) ** 2), (0, 1)
    )

  fwd = temp_mib(
    lambda x, w: convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  )
  assert fwd <= 160, fwd
  assert (
    temp_mib(step(convmm.conv_general_dilated)) <= temp_mib(step(lax.conv_general_dilated)) + 160
  )


def test_set_memory_budget_round_trips_and_validates():
  old = convmm.set_memory_budget(1234)
  try:
    assert convmm.set_memory_budget(old) == 1234
  finally:
    convmm.set_memory_budget(old)
  with pytest.raises(ValueError, match="set_memory_budget: `nbytes`"):
    convmm.set_memory_budget(0)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(method="fft"), r"conv_general_dilated: `method` must be one of"),
    (dict(memory_budget=0), r"conv_general_dilated: `memory_budget` must be a positive"),
    (dict(method="depthwise"), r"`method`='depthwise' needs one input feature per group"),
  ],
  ids=["unknown-method", "zero-budget", "depthwise-on-dense"],
)
def test_method_argument_errors(kwargs, match):
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))
  with pytest.raises(ValueError, match=match):
    convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, **kwargs)


def test_a_method_that_is_no_string_is_a_type_error():
  x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  with pytest.raises(TypeError, match=r"conv_general_dilated: `method` must be a string, .*got 1"):
    convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, method=1)
  with pytest.raises(TypeError, match=r"default_method: `method` must be a string"):
    with convmm.default_method(["im2col"]):  # type: ignore[arg-type]
      pass


def _value_grads_vmap(conv, x, w):
  grads = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), (0, 1))(x, w)
  return conv(x, w), grads, jax.vmap(conv, in_axes=(None, 0))(x, jnp.stack([w, -w]))


@pytest.mark.parametrize("x_shape, w_shape, kw", CASES)
def test_core_under_rank_promotion_raise(x_shape, w_shape, kw):
  # JAX's own test suite runs with jax_numpy_rank_promotion='raise': the core, its
  # gradients and vmap must not rely on implicit rank promotion. Every method, tiled
  # or not, on the depthwise case (where it broke); the default path elsewhere.
  x = jax.random.normal(jax.random.key(7), x_shape)
  w = jax.random.normal(jax.random.key(8), w_shape)
  reduction = int(np.prod(w_shape[:-1]))
  ref = lax.conv_general_dilated(x, w, dimension_numbers=DN, precision=HIGHEST, **kw)
  with jax.numpy_rank_promotion("raise"):
    every = kw.get("feature_group_count", 1) == x_shape[-1]
    for method in _methods_for(kw, x_shape[-1]) if every else ["auto"]:
      for budget in [None, 1024] if every else [None]:
        conv = functools.partial(
          convmm.conv_general_dilated,
          dimension_numbers=DN,
          precision=HIGHEST,
          method=method,
          memory_budget=budget,
          **kw,
        )
        everything = jax.jit(functools.partial(_value_grads_vmap, conv))
        y, (gx, gw), batched = everything(x, w)
        assert_close(y, ref, reduction=reduction)
        assert gx.shape == x.shape and gw.shape == w.shape
        assert_close(batched[1], -ref, reduction=reduction)


def test_shift_float16_accumulates_in_float32():
  # Partial sums 4e4 + 4e4 overflow float16 (max 65504); the whole sum 4e4 does not.
  x = jnp.ones((2, 1, 9), jnp.float16)
  w = jnp.array([4e4, 4e4, -4e4], jnp.float16).reshape(1, 1, 3)
  ref = lax.conv_general_dilated(
    x.astype(jnp.float32), w.astype(jnp.float32), (1,), "VALID", precision=HIGHEST
  )
  for method in ["shift", "im2col"]:
    y = convmm.conv_general_dilated(x, w, (1,), "VALID", method=method)
    assert y.dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(y, np.float32))), (method, y)
    assert_close(y, ref, dtype=jnp.float16, reduction=3)


def _dilated_conv_reference(x, w, strides, lo, lhs_dilation, rhs_dilation, out, groups=1):
  """Channels-last NumPy float64 conv that only ever multiplies real input elements."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  n, c, o = x.shape[0], x.shape[-1], w.shape[-1]
  y = np.zeros((n, *out, o))
  for tap in np.ndindex(*w.shape[:-2]):
    # Input element i meets this tap at output (i * D + lo - t * rd) / stride, if whole.
    ins, outs = [], []
    for size, d, low, t, rd, s, o_size in zip(
      x.shape[1:-1], lhs_dilation, lo, tap, rhs_dilation, strides, out
    ):
      pos = np.arange(size) * d + low - t * rd
      keep = (pos % s == 0) & (pos >= 0) & (pos < o_size * s)
      ins.append(np.arange(size)[keep])
      outs.append(pos[keep] // s)
    xs = x[np.ix_(range(n), *ins, range(c))]
    for g in range(groups):
      cg, og = c // groups, o // groups
      with np.errstate(invalid="ignore"):  # Inf taps: Inf - Inf where they meet inputs
        term = xs[..., g * cg : (g + 1) * cg] @ w[tap][:, g * og : (g + 1) * og]
      y[np.ix_(range(n), *outs, range(g * og, (g + 1) * og))] += term
  return y


@pytest.mark.parametrize(
  "x_shape, w_shape, kw",
  [
    pytest.param((2, 7, 3), (3, 3, 4), dict(window_strides=(1,), lhs_dilation=(2,)), id="1d-d2"),
    pytest.param(
      (2, 5, 6, 3),
      (3, 4, 3, 2),
      dict(window_strides=(2, 1), lhs_dilation=(3, 2), rhs_dilation=(1, 2)),
      id="2d-d3x2-strided",
    ),
    pytest.param(
      (2, 4, 4, 4),
      (2, 2, 1, 8),
      dict(window_strides=(1, 1), lhs_dilation=(2, 2), feature_group_count=4),
      id="depthwise-d2",
    ),
  ],
)
def test_lhs_dilation_holes_are_not_multiplied(x_shape, w_shape, kw):
  # An Inf in the kernel stays out of every output whose Inf tap only meets the holes
  # between dilated input elements ('VALID': no zero padding, which may give NaN).
  nsp = len(x_shape) - 2
  dn = ("NWC", "WIO", "NWC") if nsp == 1 else DN
  x = jax.random.normal(jax.random.key(9), x_shape)
  w = jax.random.normal(jax.random.key(10), w_shape)
  w = w.at[(1,) * nsp].set(jnp.inf)
  kw = dict(kw, padding=((0, 0),) * nsp)
  shape = jax.eval_shape(
    lambda x, w: lax.conv_general_dilated(x, w, dimension_numbers=dn, **kw), x, w
  ).shape
  ref = _dilated_conv_reference(
    x,
    w,
    kw["window_strides"],
    (0,) * nsp,
    kw["lhs_dilation"],
    kw.get("rhs_dilation", (1,) * nsp),
    shape[1:-1],
    kw.get("feature_group_count", 1),
  )
  finite = np.isfinite(ref)
  assert finite.any() and not finite.all()
  for method in _methods_for(kw, x_shape[-1]):
    y = np.asarray(
      convmm.conv_general_dilated(
        x, w, dimension_numbers=dn, precision=HIGHEST, method=method, **kw
      )
    )
    assert np.isfinite(y[finite]).all(), method
    assert_close(y[finite], ref[finite].astype(np.float32), reduction=int(np.prod(w_shape[:-1])))
  if nsp == 1:  # lax (XLA:CPU) skips the holes in 1-D too; in 2-D it gives NaN everywhere
    lax_y = np.asarray(
      lax.conv_general_dilated(x, w, dimension_numbers=dn, precision=HIGHEST, **kw)
    )
    assert_close(lax_y[finite], ref[finite].astype(np.float32), reduction=9)


def test_lhs_dilation_matches_lax_randomized():
  # Phases of the input dilation (strides, kernel dilations, negative padding) vs lax.
  rng = np.random.default_rng(11)
  for _ in range(12):
    nsp = int(rng.integers(1, 3))
    dilation, strides, rhs_dilation, k, size = (
      tuple(int(v) for v in rng.integers(1, hi, nsp)) for hi in (4, 4, 3, 5, 7)
    )
    padding = tuple((int(a), int(b)) for a, b in rng.integers(-1, 4, (nsp, 2)))
    x = rng.standard_normal((2, 3, *size)).astype(np.float32)
    w = rng.standard_normal((4, 3, *k)).astype(np.float32)
    args = (strides, padding, dilation, rhs_dilation)
    try:
      ref = lax.conv_general_dilated(x, w, *args, precision=HIGHEST)
    except (ValueError, TypeError):  # an empty or invalid output: not this test's subject
      continue
    y = convmm.conv_general_dilated(x, w, *args, precision=HIGHEST)
    assert_close(y, ref, reduction=3 * int(np.prod(k)))
