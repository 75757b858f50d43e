"""Differential tests of ``convmm.conv_general_dilated_local`` against ``jax.lax``.

The reference is ``lax.conv_general_dilated_local(..., precision=HIGHEST)``, called with
the same arguments; the kernel shape of each case is read off lax's own
``conv_general_dilated_patches``, so no shape rule of convmm's is assumed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads
from tolerances import assert_close

import convmm

HIGHEST = lax.Precision.HIGHEST


def case(lhs_shape, strides, padding, filter_shape, out_features=3, **kw):
  return dict(
    lhs_shape=lhs_shape,
    out_features=out_features,
    window_strides=strides,
    padding=padding,
    filter_shape=filter_shape,
    **kw,
  )


CASES = {
  "2d_default_valid": case((2, 3, 5, 6), (1, 1), "VALID", (3, 3)),
  "2d_nhwc_same_stride2": case(
    (2, 7, 6, 3), (2, 2), "SAME", (3, 3), dimension_numbers=("NHWC", "HWIO", "NHWC")
  ),
  "2d_odd_layout": case(
    (2, 6, 5, 3), (2, 1), "SAME", (3, 2), out_features=4, dimension_numbers=("NWHC", "WHOI", "NCWH")
  ),
  "2d_same_lower_rhs_dilation": case(
    (1, 2, 7, 6), (1, 2), "SAME_LOWER", (2, 3), rhs_dilation=(2, 1)
  ),
  "2d_lhs_dilation_crop": case(
    (2, 2, 4, 5), (1, 1), [(1, -1), (-1, 2)], (3, 2), lhs_dilation=(2, 1), rhs_dilation=(1, 2)
  ),
  "1d_pairs_stride2": case((3, 4, 11), (2,), [(2, 1)], (3,), rhs_dilation=(2,)),
  "3d_ndhwc": case(
    (1, 5, 4, 6, 2),
    (1, 2, 1),
    "SAME",
    (2, 3, 2),
    out_features=2,
    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
  ),
}


def conv_kwargs(c):
  return {k: v for k, v in c.items() if k not in ("lhs_shape", "out_features")}


def make_operands(c, dtype=np.float32, seed=0):
  """Random lhs and rhs; the rhs shape comes from lax's patches of the lhs."""
  kw = conv_kwargs(c)
  rng = np.random.default_rng(seed)
  lhs = rng.standard_normal(c["lhs_shape"])
  patches = jax.eval_shape(
    functools.partial(lax.conv_general_dilated_patches, **kw),
    jax.ShapeDtypeStruct(lhs.shape, jnp.float32),
  )
  _, rhs_spec, out_spec = lax.conv_dimension_numbers(
    lhs.shape, (1, 1, *c["filter_shape"]), kw.get("dimension_numbers")
  )
  # rhs: O and I = patch size at the rhs spec's O/I axes, output positions at its spatial axes.
  rhs_shape = [0] * lhs.ndim
  rhs_shape[rhs_spec[0]] = c["out_features"]
  rhs_shape[rhs_spec[1]] = patches.shape[out_spec[1]]
  for rhs_axis, out_axis in zip(rhs_spec[2:], out_spec[2:]):
    rhs_shape[rhs_axis] = patches.shape[out_axis]
  rhs = rng.standard_normal(rhs_shape)
  return jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)


def reduction(c):
  """Terms summed per output element: ``C * prod(filter_shape)``."""
  lhs_spec = lax.conv_dimension_numbers(
    c["lhs_shape"], (1, 1, *c["filter_shape"]), c.get("dimension_numbers")
  ).lhs_spec
  return c["lhs_shape"][lhs_spec[1]] * math.prod(c["filter_shape"])


def ours(lhs, rhs, precision=HIGHEST, **kw):
  return convmm.conv_general_dilated_local(lhs, rhs, precision=precision, **kw)


def ref(lhs, rhs, precision=HIGHEST, **kw):
  return lax.conv_general_dilated_local(lhs, rhs, precision=precision, **kw)


def jitted(fn, **kw):
  """``fn`` with its static arguments bound, compiled as one program (im2col's many
  small ops dispatched one by one would dominate the test time)."""
  return jax.jit(functools.partial(fn, **kw))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_lax(name):
  c = CASES[name]
  lhs, rhs = make_operands(c)
  expected = jitted(ref, **conv_kwargs(c))(lhs, rhs)
  actual = jitted(ours, **conv_kwargs(c))(lhs, rhs)
  assert actual.dtype == expected.dtype
  assert_close(actual, expected, reduction=reduction(c))


@pytest.mark.parametrize("name", ["2d_odd_layout", "2d_lhs_dilation_crop", "1d_pairs_stride2"])
def test_vjp_matches_lax(name):
  c = CASES[name]
  lhs, rhs = make_operands(c, seed=1)
  kw = conv_kwargs(c)

  def pullback(fn, cotangent):
    return jax.vjp(functools.partial(fn, **kw), lhs, rhs)[1](cotangent)

  out = jax.eval_shape(functools.partial(ref, **kw), lhs, rhs)
  cotangent = jax.random.normal(jax.random.key(2), out.shape, out.dtype)
  got = jax.jit(functools.partial(pullback, ours))(cotangent)
  want = jax.jit(functools.partial(pullback, ref))(cotangent)
  for g, w in zip(got, want):
    assert_close(g, w, reduction=math.prod(out.shape[1:]), grad=True)


def test_second_order_grads_float64(x64):
  c = case(
    (1, 2, 5, 4),
    (2, 1),
    [(1, 0), (-1, 2)],
    (2, 2),
    out_features=2,
    lhs_dilation=(1, 2),
    rhs_dilation=(2, 1),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  lhs, rhs = make_operands(c, np.float64, seed=3)
  assert lhs.dtype == jnp.float64
  f = jitted(ours, **conv_kwargs(c))
  check_grads(f, (lhs, rhs), order=2, modes=("fwd", "rev"))
  assert_close(f(lhs, rhs), jitted(ref, **conv_kwargs(c))(lhs, rhs))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_low_precision_dtypes(dtype):
  c = CASES["2d_nhwc_same_stride2"]
  lhs, rhs = make_operands(c, np.float32, seed=4)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  actual = jitted(ours, **conv_kwargs(c))(lhs, rhs)
  assert actual.dtype == dtype
  # Reference from the same rounded operands, computed in float32.
  expected = jitted(ref, **conv_kwargs(c))(lhs.astype(jnp.float32), rhs.astype(jnp.float32))
  assert_close(actual, expected, dtype=dtype, reduction=reduction(c))


def test_numpy_float64_and_mixed_dtypes_follow_lax():
  c = CASES["2d_default_valid"]
  lhs, rhs = make_operands(c, np.float32, seed=5)
  lhs64, rhs64 = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)  # x64 is off
  f, f_ref = jitted(ours, **conv_kwargs(c)), jitted(ref, **conv_kwargs(c))
  actual, expected = f(lhs64, rhs64), f_ref(lhs64, rhs64)
  assert actual.dtype == expected.dtype == jnp.float32
  assert_close(actual, expected, reduction=reduction(c))
  mixed = jax.eval_shape(f, lhs, rhs.astype(jnp.bfloat16))
  assert mixed.dtype == jax.eval_shape(f_ref, lhs, rhs.astype(jnp.bfloat16)).dtype


@pytest.mark.parametrize(
  "precision", [None, "highest", (HIGHEST, HIGHEST)], ids=["none", "name", "pair"]
)
def test_precision_forms_match_lax(precision):
  c = CASES["1d_pairs_stride2"]
  lhs, rhs = make_operands(c, seed=6)
  kw = dict(conv_kwargs(c), precision=precision)
  tolerance = dict(reduction=reduction(c)) if precision else dict(dtype=jnp.bfloat16)
  assert_close(jitted(ours, **kw)(lhs, rhs), jitted(ref, **kw)(lhs, rhs), **tolerance)


def test_vmap_and_no_rank_promotion():
  c = CASES["2d_odd_layout"]
  lhs, rhs = make_operands(c, seed=7)
  stacked = jnp.stack([lhs, 2 * lhs])
  with jax.numpy_rank_promotion("raise"):
    actual = jax.jit(jax.vmap(jitted(ours, **conv_kwargs(c)), in_axes=(0, None)))(stacked, rhs)
  expected = jax.jit(jax.vmap(jitted(ref, **conv_kwargs(c)), in_axes=(0, None)))(stacked, rhs)
  assert_close(actual, expected, reduction=reduction(c))


# ------------------------------------------------------------------------------- errors


def _lhs_rhs():
  return make_operands(CASES["2d_default_valid"])  # rhs (3, 27, 3, 4)


@pytest.mark.parametrize(
  "rhs_shape, match",
  [
    ((3, 27, 12), r"`rhs` must have the rank of `lhs` \(4\).*rhs.shape=\(3, 27, 12\)"),
    ((3, 26, 3, 4), r"`rhs` must have shape \(3, 27, 3, 4\).*rhs.shape=\(3, 26, 3, 4\)"),
    ((3, 27, 4, 4), r"`rhs` must have shape \(3, 27, 3, 4\).*output positions \(3, 4\)"),
  ],
  ids=["rank", "patch_size", "positions"],
)
def test_bad_rhs_shape_is_a_type_error_like_lax(rhs_shape, match):
  lhs, _ = _lhs_rhs()
  rhs = jnp.ones(rhs_shape)
  with pytest.raises(TypeError):
    lax.conv_general_dilated_local(lhs, rhs, (1, 1), "VALID", (3, 3))
  with pytest.raises(TypeError, match="conv_general_dilated_local: " + match):
    convmm.conv_general_dilated_local(lhs, rhs, (1, 1), "VALID", (3, 3))


def test_dot_algorithm_precision_is_a_value_error_like_lax():
  lhs, rhs = _lhs_rhs()
  preset = lax.DotAlgorithmPreset.F32_F32_F32
  with pytest.raises(ValueError):
    lax.conv_general_dilated_local(lhs, rhs, (1, 1), "VALID", (3, 3), precision=preset)
  with pytest.raises(ValueError, match="conv_general_dilated_local: unsupported `precision`"):
    convmm.conv_general_dilated_local(lhs, rhs, (1, 1), "VALID", (3, 3), precision=preset)


def test_bad_arguments_name_the_function():
  lhs, rhs = _lhs_rhs()
  with pytest.raises(ValueError, match="conv_general_dilated_local: .*filter_shape"):
    convmm.conv_general_dilated_local(lhs, rhs, (1, 1), "VALID", (3, 3, 3))
  with pytest.raises(TypeError, match="conv_general_dilated_local: `lhs` must be an array"):
    convmm.conv_general_dilated_local("x", rhs, (1, 1), "VALID", (3, 3))


def test_preferred_element_type_accumulates_bf16_in_f32():
  # Beyond lax: bf16 products are exact in float32, so the float32 result of bf16
  # operands is lax's float32 local conv of the same (widened) values.
  lhs, rhs = _lhs_rhs()
  lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
  actual = convmm.conv_general_dilated_local(
    lhs, rhs, (1, 1), "VALID", (3, 3), preferred_element_type=jnp.float32
  )
  expected = lax.conv_general_dilated_local(
    lhs.astype(jnp.float32), rhs.astype(jnp.float32), (1, 1), "VALID", (3, 3), precision=HIGHEST
  )
  assert actual.dtype == jnp.float32
  assert_close(actual, expected, reduction=27)
