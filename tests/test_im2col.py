"""Tests of ``convmm.im2col`` and ``convmm.col2im``.

im2col must equal ``lax.conv_general_dilated_patches`` bit for bit (it only
moves data); col2im must be its adjoint and agree with ``torch.nn.functional.fold``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tolerances import assert_close

import convmm
from convmm._rules.shapes import layout_shape as layout

HIGHEST = lax.Precision.HIGHEST


def lhs_shape_of(c):
  ndim = len(c["lhs"])
  dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, c.get("dimension_numbers"))
  return layout(dn.lhs_spec, c["lhs"])


def make_lhs(c, dtype=np.float32, seed=0):
  values = np.random.default_rng(seed).standard_normal(lhs_shape_of(c))
  if np.issubdtype(dtype, np.integer):
    values = np.round(100 * values)
  return jnp.asarray(values, dtype)


def patch_kwargs(c):
  return {k: v for k, v in c.items() if k != "lhs"}


def jitted(fn, **kw):
  return jax.jit(functools.partial(fn, **kw))


def lax_patches(lhs, **kw):
  return lax.conv_general_dilated_patches(lhs, precision=HIGHEST, **kw)


def case(lhs, filter_shape, strides, padding, **kw):
  return dict(lhs=lhs, filter_shape=filter_shape, window_strides=strides, padding=padding, **kw)


NHWC = ("NHWC", "HWIO", "NHWC")
ODD = ("CNWH", "IHOW", "HWCN")

# lhs is canonical (N, C, *spatial); filter_shape is in the kernel spec's spatial order.
CASES = {
  "0d_no_spatial_dims": case((2, 3), (), (), "VALID"),
  "1d_valid": case((2, 3, 9), (3,), (1,), "VALID"),
  "1d_same_stride2_dilated": case((1, 2, 9), (2,), (2,), "SAME", rhs_dilation=(3,)),
  "2d_valid": case((2, 3, 5, 6), (2, 3), (1, 1), "VALID"),
  "2d_same_stride": case((1, 2, 7, 6), (3, 3), (2, 2), "SAME"),
  "2d_same_lower": case((1, 2, 6, 5), (2, 2), (1, 2), "SAME_LOWER"),
  "2d_pairs": case((1, 2, 5, 5), (3, 2), (1, 1), ((2, 1), (0, 3))),
  "2d_negative_pairs": case((1, 2, 7, 6), (2, 2), (2, 1), ((-2, 1), (1, -1))),
  "2d_lhs_dilation": case((1, 2, 4, 4), (3, 3), (1, 2), ((1, 2), (2, 0)), lhs_dilation=(2, 3)),
  "2d_both_dilations": case(
    (2, 1, 5, 4), (2, 2), (1, 1), ((1, 1), (0, 1)), lhs_dilation=(2, 1), rhs_dilation=(2, 2)
  ),
  "2d_nhwc": case((2, 3, 6, 5), (3, 2), (1, 1), "SAME", dimension_numbers=NHWC),
  "2d_odd_layout": case((2, 3, 6, 5), (3, 2), (2, 1), "SAME", dimension_numbers=ODD),
  "2d_dimension_numbers_object": case(
    (2, 3, 5, 4),
    (2, 3),
    (1, 1),
    ((1, 0), (0, 1)),
    dimension_numbers=lax.ConvDimensionNumbers((3, 0, 2, 1), (1, 3, 0, 2), (2, 1, 3, 0)),
  ),
  "3d_ndhwc": case(
    (1, 2, 4, 5, 3), (2, 3, 2), (1, 2, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
  ),
  "3d_pairs_dilated": case(
    (1, 2, 3, 4, 4),
    (2, 2, 2),
    (2, 1, 1),
    ((0, 1), (1, 1), (-1, 0)),
    rhs_dilation=(1, 2, 1),
    lhs_dilation=(1, 1, 2),
  ),
  "4d": case((1, 2, 3, 3, 4, 3), (2, 1, 2, 2), (1, 1, 2, 1), "VALID"),
  "window_larger_than_input": case((1, 2, 3, 3), (4, 2), (1, 1), "VALID"),
  "zero_spatial": case((1, 2, 0, 3), (1, 2), (1, 1), "VALID"),
  "single_tap": case((2, 3, 4, 4), (1, 1), (2, 2), "VALID"),
}


def random_case(rng):
  nsp = int(rng.choice([1, 2, 3]))
  in_spatial = tuple(int(s) for s in rng.integers(1, {1: 9, 2: 7, 3: 5}[nsp] + 1, nsp))
  kw = {}
  if rng.random() < 0.5:
    kw["rhs_dilation"] = tuple(int(d) for d in rng.integers(1, 3, nsp))
  pad_kind = str(rng.choice(["SAME", "SAME_LOWER", "VALID", "pairs"]))
  if pad_kind == "pairs":
    lhs_dilation = tuple(int(d) for d in rng.integers(1, 3, nsp))
    padding = []
    for size, d in zip(in_spatial, lhs_dilation):
      lo, hi = (int(p) for p in rng.integers(-2, 3, 2))
      lo = max(lo, -((size - 1) * d + 1))
      hi = max(hi, -((size - 1) * d + 1 + lo))
      padding.append((lo, hi))
    padding = tuple(padding)
    kw["lhs_dilation"] = lhs_dilation
  else:
    padding = pad_kind
  if rng.random() < 0.6:
    letters = "HWD"[:nsp]
    kw["dimension_numbers"] = tuple(
      "".join(rng.permutation(list(fixed + letters))) for fixed in ("NC", "OI", "NC")
    )
  return case(
    (int(rng.integers(1, 3)), int(rng.integers(1, 4)), *in_spatial),
    tuple(int(k) for k in rng.integers(1, 4, nsp)),
    tuple(int(s) for s in rng.integers(1, 4, nsp)),
    padding,
    **kw,
  )


SWEEP = {f"seed{2000 + i}": random_case(np.random.default_rng(2000 + i)) for i in range(24)}
ALL = {**CASES, **SWEEP}


def has_empty_output(c):
  """Whether lax's patches for ``c`` have a zero-sized dimension (shape only, no compute)."""
  lhs = jax.ShapeDtypeStruct(lhs_shape_of(c), jnp.float32)
  return 0 in jax.eval_shape(functools.partial(lax_patches, **patch_kwargs(c)), lhs).shape


def params(cases):
  """Case names (empty-output cases included: lax returns shape (..., 0, ...))."""
  return list(cases)


# ------------------------------------------------------------------------------ im2col


@pytest.mark.parametrize("name", params(ALL))
def test_im2col_bit_exact_vs_lax_patches(name):
  c = ALL[name]
  lhs = make_lhs(c)
  expected = jitted(lax_patches, **patch_kwargs(c))(lhs)
  actual = jitted(convmm.im2col, **patch_kwargs(c))(lhs)
  assert actual.shape == expected.shape
  assert actual.dtype == expected.dtype
  np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(
  "dtype", [jnp.bfloat16, jnp.float16, jnp.int32], ids=["bf16", "f16", "int32"]
)
@pytest.mark.parametrize("name", ["2d_odd_layout", "2d_lhs_dilation"])
def test_im2col_bit_exact_other_dtypes(name, dtype):
  c = CASES[name]
  lhs = make_lhs(c, dtype)
  expected = jitted(lax_patches, **patch_kwargs(c))(lhs)
  actual = jitted(convmm.im2col, **patch_kwargs(c))(lhs)
  assert actual.dtype == expected.dtype == dtype
  np.testing.assert_array_equal(actual, expected)


def test_im2col_preferred_element_type():
  c = CASES["2d_same_stride"]
  lhs = make_lhs(c, jnp.bfloat16)
  kw = dict(patch_kwargs(c), preferred_element_type=jnp.float32)
  expected = lax_patches(lhs, **kw)
  actual = convmm.im2col(lhs, **kw)
  assert actual.dtype == expected.dtype == jnp.float32
  np.testing.assert_array_equal(actual, expected)


def test_im2col_is_exact_copy_of_input_values():
  # Values that a rounding GEMM would change (large and tiny magnitudes mixed)
  # must come through untouched, even at default precision.
  c = CASES["2d_pairs"]
  lhs = make_lhs(c) * jnp.asarray([1e30, 1e-30, 1.0, 3.0, 7.0])
  patches = convmm.im2col(lhs, **patch_kwargs(c))
  expected = lax_patches(lhs, **patch_kwargs(c))
  np.testing.assert_array_equal(patches, expected)
  assert set(np.unique(np.asarray(patches))) <= set(np.unique(np.asarray(lhs))) | {0.0}


def test_im2col_vmap_and_grad():
  c = CASES["2d_odd_layout"]
  kw = patch_kwargs(c)
  lhs = make_lhs(c)
  stacked = jnp.stack([lhs, 2 * lhs, -lhs])
  np.testing.assert_array_equal(
    jax.jit(jax.vmap(functools.partial(convmm.im2col, **kw)))(stacked),
    jax.jit(jax.vmap(functools.partial(lax_patches, **kw)))(stacked),
  )
  # The gradient of sum(im2col(x)) counts how many windows see each element.
  weights = jnp.asarray(
    np.random.default_rng(1).standard_normal(
      jax.eval_shape(functools.partial(lax_patches, **kw), lhs).shape
    ),
    jnp.float32,
  )
  loss = lambda f: jax.grad(lambda x: jnp.sum(f(x, **kw) * weights))(lhs)
  assert_close(loss(convmm.im2col), loss(lax_patches), reduction=10)


# ------------------------------------------------------------------------------ col2im


def col2im_kwargs(c):
  return dict(patch_kwargs(c), lhs_shape=lhs_shape_of(c))


@pytest.mark.parametrize("name", params(ALL))
def test_col2im_is_adjoint_of_im2col(name, x64):
  c = ALL[name]
  x = make_lhs(c, np.float64, seed=1)
  patches_shape = jax.eval_shape(functools.partial(lax_patches, **patch_kwargs(c)), x).shape
  p = jnp.asarray(np.random.default_rng(2).standard_normal(patches_shape), jnp.float64)
  folded = jitted(convmm.col2im, **col2im_kwargs(c))(p)
  assert folded.shape == x.shape and folded.dtype == jnp.float64
  # <im2col(x), p> with the lax reference for im2col, so this checks col2im alone.
  lhs_side = jnp.vdot(lax_patches(x, **patch_kwargs(c)), p)
  rhs_side = jnp.vdot(x, folded)
  assert_close(rhs_side, lhs_side, reduction=max(1, p.size))


@pytest.mark.parametrize("name", ["2d_odd_layout", "3d_pairs_dilated"])
def test_col2im_equals_linear_transpose_of_lax_patches(name):
  c = CASES[name]
  x = make_lhs(c)
  patches_shape = jax.eval_shape(functools.partial(lax_patches, **patch_kwargs(c)), x).shape
  p = jnp.asarray(np.random.default_rng(3).standard_normal(patches_shape), jnp.float32)
  (expected,) = jax.linear_transpose(functools.partial(lax_patches, **patch_kwargs(c)), x)(p)
  actual = jitted(convmm.col2im, **col2im_kwargs(c))(p)
  assert_close(actual, expected, reduction=math.prod(c["filter_shape"]))


def test_col2im_of_ones_counts_window_overlaps():
  # Counted by hand: a 2x2 window sliding with stride 1 over a 3x4 input covers
  # the corners once, edges twice and the interior four times.
  p = jnp.ones((1, 4, 2, 3), jnp.float32)
  expected = np.array([[1, 2, 2, 1], [1, 2, 2, 1], [1, 2, 2, 1]], np.float32) * np.array(
    [[1], [2], [1]], np.float32
  )
  np.testing.assert_array_equal(
    convmm.col2im(p, (1, 1, 3, 4), (2, 2), (1, 1), "VALID")[0, 0], expected
  )


FOLD_CASES = {
  "plain": dict(hw=(5, 6), kernel=(2, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1)),
  "stride_padding": dict(hw=(7, 6), kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1)),
  "dilation": dict(hw=(7, 7), kernel=(2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 2)),
  "uncovered_remainder": dict(
    hw=(8, 7), kernel=(2, 2), stride=(3, 3), padding=(0, 1), dilation=(1, 2)
  ),
}


@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_col2im_matches_torch_fold(name):
  torch = pytest.importorskip("torch")
  f = FOLD_CASES[name]
  n, c = 2, 3
  (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
    f["hw"],
    f["kernel"],
    f["stride"],
    f["padding"],
    f["dilation"],
  )
  oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
  ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
  cols = np.random.default_rng(4).standard_normal((n, c * kh * kw, oh * ow)).astype(np.float32)
  expected = torch.nn.functional.fold(
    torch.from_numpy(cols),
    output_size=(h, w),
    kernel_size=(kh, kw),
    dilation=(dh, dw),
    padding=(ph, pw),
    stride=(sh, sw),
  ).numpy()
  # torch's (N, C*kh*kw, L) columns use lax's channel-major feature order.
  actual = convmm.col2im(
    jnp.asarray(cols.reshape(n, c * kh * kw, oh, ow)),
    (n, c, h, w),
    (kh, kw),
    (sh, sw),
    ((ph, ph), (pw, pw)),
    rhs_dilation=(dh, dw),
  )
  assert_close(actual, expected, reduction=kh * kw)


@pytest.mark.parametrize(
  "filter_shape, strides, rhs_dilation",
  [((9, 10), (1, 2), (2, 1)), ((3, 12), (2, 1), (1, 1)), ((16, 11), (1, 1), (1, 1))],
  ids=["9x10", "3x12", "16x11-prime-last"],
)
def test_wide_windows_unfold_in_two_stages_exactly(filter_shape, strides, rhs_dilation):
  # Over 8 taps, a dimension is unfolded as (a, b) sub-taps (XLA's CPU backend fuses
  # at most 8 concatenated slices); the patches, the convolution and its gradients
  # must be unchanged (against lax's patches bit for bit, and lax at HIGHEST).
  from convmm._engine.im2col import tap_split

  assert [tap_split(k) for k in (8, 9, 10, 11, 12, 16, 67)] == [
    None,
    (3, 3),
    (2, 5),
    None,
    (2, 6),
    (2, 8),
    None,
  ]
  kw = dict(
    window_strides=strides,
    padding=((4, 3), (-1, 5)),
    rhs_dilation=rhs_dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 23, 25, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((*filter_shape, 3, 4)), jnp.float32)
  patches = jax.jit(lambda x: convmm.im2col(x, filter_shape, **kw))(x)
  np.testing.assert_array_equal(
    patches,
    lax.conv_general_dilated_patches(x, filter_shape, **kw, precision=lax.Precision.HIGHEST),
  )
  ct = jnp.asarray(rng.standard_normal(patches.shape[:-1] + (4,)), jnp.float32)

  def vjp(conv, **extra):
    y, pull = jax.vjp(lambda x, w: conv(x, w, **kw, **extra), x, w)
    return (y, *pull(ct))

  got = jax.jit(lambda: vjp(convmm.conv_general_dilated))()
  want = jax.jit(lambda: vjp(lax.conv_general_dilated, precision=lax.Precision.HIGHEST))()
  for a, b in zip(got, want):
    assert_close(a, b, reduction=math.prod(filter_shape) * 3, grad=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
  "lhs, filter_shape, strides, padding, rhs_dilation",
  [
    ((2, 13, 3), (9,), (1,), "SAME", (1,)),
    ((2, 11, 9, 3), (3, 3), (1, 1), "SAME", (1, 1)),
    ((1, 23, 19, 2), (10, 3), (2, 1), ((4, 3), (-1, 2)), (1, 2)),
    ((2, 5, 6, 7, 3), (2, 3, 2), (1, 2, 1), "VALID", (2, 1, 1)),
  ],
  ids=["1d-k9", "3x3", "two-stage-10x3", "3d"],
)
def test_taps_first_patches_are_lax_patches_transposed(
  lhs, filter_shape, strides, padding, rhs_dilation, dtype
):
  # The kernel gradient's transposed patches (T, C, N, *out) hold exactly lax's
  # patches (N, *out, C * T with the channel major), bit for bit.
  from conv_cases import channels_last

  from convmm._engine.im2col import patches_taps_first
  from convmm._rules.shapes import conv_spec

  dn = channels_last(len(lhs) - 2)
  x = jnp.asarray(np.random.default_rng(3).standard_normal(lhs), dtype)
  w_shape = (*filter_shape, lhs[-1], 1)
  spec = conv_spec("t", lhs, w_shape, strides, padding, None, rhs_dilation, dn, 1, 1)
  got = jax.jit(lambda x: patches_taps_first(x, spec.geometry))(x)
  want = lax_patches(
    x,
    filter_shape=filter_shape,
    window_strides=strides,
    padding=padding,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dn,
  )  # (N, *out, C * T)
  t = math.prod(filter_shape)
  want = want.reshape(*want.shape[:-1], lhs[-1], t)
  want = jnp.moveaxis(jnp.moveaxis(want, -1, 0), -1, 1)  # (T, C, N, *out)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
