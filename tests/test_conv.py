"""Differential tests of ``convmm.conv_general_dilated`` against ``jax.lax``.

The reference is ``lax.conv_general_dilated(..., precision=HIGHEST)``; convmm
runs at HIGHEST too, so float32 agrees to rounding of the reduction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import (
  CASES,
  HIGHEST,
  NHWC,
  ODD,
  SWEEP,
  case,
  conv_kwargs,
  jitted,
  make_operands,
  ours,
  reduction,
  ref,
)
from jax import lax
from jax.test_util import check_grads
from tolerances import assert_close

import convmm

# ------------------------------------------------------------------ hand-picked float32


@pytest.mark.parametrize("name", list(CASES))
def test_matches_lax_float32(name):
  c = CASES[name]
  lhs, rhs = make_operands(c)
  expected = jitted(ref, **conv_kwargs(c))(lhs, rhs)
  actual = jitted(ours, **conv_kwargs(c))(lhs, rhs)
  assert actual.dtype == expected.dtype
  assert_close(actual, expected, reduction=reduction(c))


# -------------------------------------------------------------- randomized sweep (seeded)


@pytest.mark.parametrize("c", SWEEP, ids=[f"seed{1000 + i}" for i in range(len(SWEEP))])
def test_random_sweep_matches_lax(c):
  lhs, rhs = make_operands(c, seed=7)
  expected = jitted(ref, **conv_kwargs(c))(lhs, rhs)
  actual = jitted(ours, **conv_kwargs(c))(lhs, rhs)
  assert actual.dtype == expected.dtype
  assert_close(actual, expected, reduction=reduction(c))


# ------------------------------------------------------------------------------- dtypes


F64_CASES = [
  "1d_same_stride2",
  "2d_both_dilations",
  "2d_odd_layout",
  "2d_depthwise",
  "2d_batch_groups",
  "3d_pairs_rhs_dilation_groups",
]


@pytest.mark.parametrize("name", F64_CASES)
def test_matches_lax_float64(name, x64):
  c = CASES[name]
  lhs, rhs = make_operands(c, np.float64)
  assert lhs.dtype == jnp.float64
  expected = jitted(ref, **conv_kwargs(c))(lhs, rhs)
  actual = jitted(ours, **conv_kwargs(c))(lhs, rhs)
  assert actual.dtype == expected.dtype == jnp.float64
  assert_close(actual, expected, reduction=reduction(c))


LOW_PRECISION_CASES = ["2d_odd_layout", "2d_feature_groups", "2d_batch_groups", "3d_ndhwc_strides"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_matches_lax_low_precision(name, dtype):
  c = CASES[name]
  lhs, rhs = make_operands(c, dtype)
  expected = jitted(ref, **conv_kwargs(c))(lhs, rhs)
  actual = jitted(ours, **conv_kwargs(c))(lhs, rhs)
  assert actual.dtype == expected.dtype == dtype
  assert_close(actual, expected, reduction=reduction(c))


@pytest.mark.parametrize(
  "dtype, preferred",
  [
    (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32),
    (jnp.float32, None),
    (jnp.int32, None),
    (jnp.int8, jnp.int32),
    (jnp.int16, None),
  ],
  ids=["bf16_to_f32", "f16_to_f32", "f32", "int32", "int8_to_int32", "int16"],
)
def test_output_dtype_and_preferred_element_type(dtype, preferred):
  c = CASES["2d_same_stride2"]
  lhs, rhs = make_operands(c, dtype)
  kw = conv_kwargs(c)
  expected = jitted(ref, preferred_element_type=preferred, **kw)(lhs, rhs)
  actual = jitted(ours, preferred_element_type=preferred, **kw)(lhs, rhs)
  assert actual.dtype == expected.dtype
  if jnp.issubdtype(dtype, jnp.integer):
    np.testing.assert_array_equal(actual, expected)  # small ints: exact
  else:
    assert_close(actual, expected, dtype=dtype, reduction=reduction(c))


def test_default_precision_is_accepted():
  c = CASES["2d_same_stride2"]
  lhs, rhs = make_operands(c)
  actual = convmm.conv_general_dilated(lhs, rhs, **conv_kwargs(c))
  expected = ref(lhs, rhs, **conv_kwargs(c))
  # Default precision may use a faster, less exact GEMM on some backends: bf16 room.
  assert_close(actual, expected, dtype=jnp.bfloat16, reduction=reduction(c))


def test_numpy_inputs_match_lax():
  c = CASES["2d_nhwc"]
  lhs, rhs = make_operands(c)
  lhs, rhs = np.asarray(lhs), np.asarray(rhs)
  expected = ref(lhs, rhs, **conv_kwargs(c))
  actual = ours(lhs, rhs, **conv_kwargs(c))
  assert isinstance(actual, jax.Array)
  assert_close(actual, expected, reduction=reduction(c))


# --------------------------------------------------------------------- transformations


@pytest.mark.parametrize("name", ["2d_odd_layout", "2d_batch_groups", "2d_lhs_dilation"])
def test_jit(name):
  c = CASES[name]
  lhs, rhs = make_operands(c)
  kw = conv_kwargs(c)
  actual = jax.jit(functools.partial(ours, **kw))(lhs, rhs)
  assert_close(actual, ref(lhs, rhs, **kw), reduction=reduction(c))


@pytest.mark.parametrize(
  "in_axes", [(0, None), (None, 0), (0, 0), (2, 1)], ids=["lhs", "rhs", "both", "inner_axes"]
)
def test_vmap(in_axes):
  c = CASES["2d_feature_groups"]
  kw = conv_kwargs(c)
  lhs, rhs = make_operands(c)
  rng = np.random.default_rng(3)
  batch = 3
  lhs = (
    jnp.stack([lhs + i for i in range(batch)], axis=in_axes[0]) if in_axes[0] is not None else lhs
  )
  rhs = (
    jnp.stack([rhs * (i + 1) for i in range(batch)], axis=in_axes[1])
    if in_axes[1] is not None
    else rhs
  )
  lhs = lhs + jnp.asarray(rng.standard_normal(lhs.shape), lhs.dtype)
  actual = jax.jit(jax.vmap(functools.partial(ours, **kw), in_axes))(lhs, rhs)
  expected = jax.jit(jax.vmap(functools.partial(ref, **kw), in_axes))(lhs, rhs)
  assert_close(actual, expected, reduction=reduction(c))


NNX_CONFIGS = {
  "same_stride": dict(kernel_size=(3, 3), strides=(2, 1), padding="SAME"),
  "valid_dilated": dict(kernel_size=(2, 3), padding="VALID", kernel_dilation=(2, 1)),
  "circular": dict(kernel_size=(3, 3), padding="CIRCULAR"),
  "pairs_input_dilation": dict(kernel_size=(3, 2), padding=((1, 2), (0, 1)), input_dilation=(2, 1)),
  "groups": dict(kernel_size=(3, 3), feature_group_count=2),
  "1d_causal": dict(kernel_size=(3,), padding="CAUSAL"),
}


def drop_out_sharding(lhs, rhs, *args, out_sharding=None, **kw):
  """convmm behind a shim that swallows the ``out_sharding=None`` flax passes."""
  assert out_sharding is None
  return convmm.conv_general_dilated(lhs, rhs, *args, **kw)


@pytest.mark.parametrize(
  "conv",
  [
    pytest.param(convmm.conv_general_dilated, id="direct"),
    pytest.param(drop_out_sharding, id="shim"),
  ],
)
@pytest.mark.parametrize("name", list(NNX_CONFIGS))
def test_flax_nnx_conv(name, conv):
  nnx = pytest.importorskip("flax.nnx")
  config = NNX_CONFIGS[name]
  nsp = len(config["kernel_size"])
  in_features, out_features = 4, 6

  def layer(conv):
    return nnx.Conv(
      in_features,
      out_features,
      precision=HIGHEST,
      conv_general_dilated=conv,
      bias_init=nnx.initializers.normal(1.0),
      rngs=nnx.Rngs(0),
      **config,
    )

  ours_layer, ref_layer = layer(conv), layer(lax.conv_general_dilated)
  np.testing.assert_array_equal(ours_layer.kernel[...], ref_layer.kernel[...])
  x = jnp.asarray(
    np.random.default_rng(5).standard_normal((2, *(7,) * nsp, in_features)), jnp.float32
  )
  expected = nnx.jit(lambda m, x: m(x))(ref_layer, x)
  actual = nnx.jit(lambda m, x: m(x))(ours_layer, x)
  assert actual.shape == expected.shape
  assert_close(actual, expected, reduction=math.prod(config["kernel_size"]) * in_features)


# --------------------------------------------------------------------------- gradients

# Tiny configurations for check_grads: finite differences at order 2 evaluate the
# function many times, so shapes stay minimal while still exercising each feature.
CHECK_GRADS_CASES = {
  "1d_same_stride2": case((1, 2, 5), (2, 2, 3), (2,), "SAME"),
  "2d_both_dilations_odd_layout": case(
    (1, 2, 4, 3),
    (2, 2, 2, 2),
    (2, 1),
    ((1, 1), (1, 0)),
    lhs_dilation=(2, 1),
    rhs_dilation=(1, 2),
    dimension_numbers=ODD,
  ),
  "2d_feature_groups": case((1, 4, 3, 3), (2, 2, 2, 2), (1, 1), "SAME", feature_group_count=2),
  "2d_batch_groups": case(
    (2, 2, 3, 3), (2, 2, 2, 2), (1, 1), ((0, 1), (-1, 1)), batch_group_count=2
  ),
}


@pytest.mark.parametrize("name", list(CHECK_GRADS_CASES))
def test_check_grads_order2_float64(name, x64):
  c = CHECK_GRADS_CASES[name]
  lhs, rhs = make_operands(c, np.float64, seed=11)
  check_grads(jitted(ours, **conv_kwargs(c)), (lhs, rhs), order=2, modes=("fwd", "rev"))


GRAD_CASES = [
  "1d_same_stride2",
  "2d_both_dilations",
  "2d_negative_pairs",
  "2d_odd_layout",
  "2d_feature_groups",
  "2d_batch_groups",
  "3d_ndhwc_strides",
]


def value_and_vjp(lhs, rhs, cotangent, *, conv, **kw):
  y, vjp = jax.vjp(functools.partial(conv, **kw), lhs, rhs)
  return (y, *vjp(cotangent))


@pytest.mark.parametrize(
  "c",
  [CASES[n] for n in GRAD_CASES] + SWEEP[:12],
  ids=GRAD_CASES + [f"seed{1000 + i}" for i in range(12)],
)
def test_vjp_matches_lax(c):
  lhs, rhs = make_operands(c, seed=13)
  kw = conv_kwargs(c)
  out_shape = jax.eval_shape(functools.partial(ref, **kw), lhs, rhs).shape
  cotangent = jnp.asarray(np.random.default_rng(17).standard_normal(out_shape), lhs.dtype)
  y, lhs_bar, rhs_bar = jitted(value_and_vjp, conv=ours, **kw)(lhs, rhs, cotangent)
  y_ref, lhs_bar_ref, rhs_bar_ref = jitted(value_and_vjp, conv=ref, **kw)(lhs, rhs, cotangent)
  assert_close(y, y_ref, reduction=reduction(c))
  assert lhs_bar.dtype == lhs.dtype and rhs_bar.dtype == rhs.dtype
  # lhs_bar sums over output features and taps; rhs_bar over batch and output positions.
  out_positions = math.prod(out_shape) // max(1, c["rhs"][0])
  assert_close(lhs_bar, lhs_bar_ref, reduction=c["rhs"][0] * math.prod(c["rhs"][2:]), grad=True)
  assert_close(rhs_bar, rhs_bar_ref, reduction=out_positions, grad=True)


@pytest.mark.parametrize("jac", [jax.jacfwd, jax.jacrev], ids=["jacfwd", "jacrev"])
def test_jacobians_tiny(jac, x64):
  c = case((1, 2, 3, 3), (2, 2, 2, 2), (1, 1), ((1, 0), (0, 1)), dimension_numbers=NHWC)
  lhs, rhs = make_operands(c, np.float64, seed=19)
  kw = conv_kwargs(c)
  jacobians = lambda conv: jax.jit(jac(functools.partial(conv, **kw), (0, 1)))(lhs, rhs)
  for actual, expected in zip(jacobians(ours), jacobians(ref)):
    assert actual.shape == expected.shape
    assert_close(actual, expected)


def test_second_order_matches_lax(x64):
  # The Hessian-vector product of a loss through the bilinear conv mixes both
  # arguments' second derivatives.
  c = CHECK_GRADS_CASES["2d_both_dilations_odd_layout"]
  lhs, rhs = make_operands(c, np.float64, seed=23)
  kw = conv_kwargs(c)

  def hvp(conv, lhs, rhs):
    loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w, **kw)))
    return jax.jvp(
      jax.grad(loss, argnums=(0, 1)), (lhs, rhs), (jnp.ones_like(lhs), jnp.ones_like(rhs))
    )[1]

  actual = jax.jit(functools.partial(hvp, ours))(lhs, rhs)
  expected = jax.jit(functools.partial(hvp, ref))(lhs, rhs)
  for a, e in zip(actual, expected):
    assert_close(a, e, reduction=100)
