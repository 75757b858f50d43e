"""Tests of ``convmm.conv_adjoint`` and ``convmm.conv_transpose``.

conv_adjoint is checked by the dot-product identity, against the linear
transpose of lax's convolution (an independent implementation) and against
PyTorch's ``conv_transpose2d``; conv_transpose against ``lax.conv_transpose``.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import CASES, HIGHEST, SWEEP, case, conv_kwargs, jitted, make_operands, ref
from jax import lax
from jax.test_util import check_grads
from tolerances import assert_close

import convmm


def adjoint(cotangent, rhs, lhs_shape, **kw):
  return convmm.conv_adjoint(cotangent, rhs, lhs_shape, precision=HIGHEST, **kw)


def random_like(shape, dtype, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def out_shape(lhs, rhs, kw):
  return jax.eval_shape(functools.partial(ref, **kw), lhs, rhs).shape


# Every forward feature: padding forms, both dilations, layouts, groups, 1-D to 4-D.
ADJOINT_CASES = [
  "0d_no_spatial_dims",
  "1d_same_stride2",
  "1d_nwc_same_lower_even_k",
  "2d_same_stride2",
  "2d_pairs",
  "2d_negative_pairs",
  "2d_stride_gt_kernel",
  "2d_lhs_dilation_stride",
  "2d_rhs_dilation_same",
  "2d_both_dilations",
  "2d_odd_layout",
  "2d_dimension_numbers_object",
  "2d_feature_groups",
  "2d_depthwise_multiplier_nhwc",
  "2d_batch_groups",
  "2d_batch_groups_odd_layout",
  "3d_ndhwc_strides",
  "3d_pairs_rhs_dilation_groups",
  "4d_valid",
  "kernel_larger_than_input",
]
ADJOINT_PARAMS = [pytest.param(CASES[n], id=n) for n in ADJOINT_CASES] + [
  pytest.param(c, id=f"seed{1000 + i}") for i, c in enumerate(SWEEP[:16])
]


# -------------------------------------------------------------------------- conv_adjoint


@pytest.mark.parametrize("c", ADJOINT_PARAMS)
def test_dot_product_identity(c, x64):
  # <conv(x, w), y> == <x, conv_adjoint(y, w, x.shape)>, with convmm's own forward.
  x, w = make_operands(c, np.float64, seed=1)
  kw = conv_kwargs(c)
  y = random_like(out_shape(x, w, kw), jnp.float64, seed=2)
  forward = jitted(convmm.conv_general_dilated, precision=HIGHEST, **kw)(x, w)
  x_bar = jitted(adjoint, lhs_shape=x.shape, **kw)(y, w)
  assert x_bar.shape == x.shape and x_bar.dtype == x.dtype
  assert_close(jnp.vdot(x, x_bar), jnp.vdot(forward, y), reduction=max(1, x.size + y.size))


@pytest.mark.parametrize("c", ADJOINT_PARAMS)
def test_equals_linear_transpose_of_lax_conv(c):
  x, w = make_operands(c, seed=3)
  kw = conv_kwargs(c)
  y = random_like(out_shape(x, w, kw), jnp.float32, seed=4)
  (expected,) = jax.linear_transpose(lambda x: ref(x, w, **kw), x)(y)
  actual = jitted(adjoint, lhs_shape=x.shape, **kw)(y, w)
  assert actual.dtype == expected.dtype
  # Each input element collects O * prod(k) products.
  assert_close(actual, expected, reduction=c["rhs"][0] * math.prod(c["rhs"][2:]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_low_precision_matches_lax_transpose(dtype):
  c = CASES["2d_feature_groups"]
  x, w = make_operands(c, dtype, seed=5)
  kw = conv_kwargs(c)
  y = random_like(out_shape(x, w, kw), dtype, seed=6)
  (expected,) = jax.linear_transpose(lambda x: ref(x, w, **kw), x)(y)
  actual = jitted(adjoint, lhs_shape=x.shape, **kw)(y, w)
  assert actual.dtype == expected.dtype == dtype
  assert_close(actual, expected, reduction=c["rhs"][0] * math.prod(c["rhs"][2:]))


def test_conv_adjoint_vmap_over_cotangent():
  c = CASES["2d_odd_layout"]
  x, w = make_operands(c, seed=7)
  kw = conv_kwargs(c)
  ys = random_like((3, *out_shape(x, w, kw)), jnp.float32, seed=8)
  actual = jax.jit(jax.vmap(lambda y: adjoint(y, w, x.shape, **kw)))(ys)
  expected = jax.vmap(lambda y: jax.linear_transpose(lambda x: ref(x, w, **kw), x)(y)[0])(ys)
  assert_close(actual, expected, reduction=c["rhs"][0] * math.prod(c["rhs"][2:]))


@pytest.mark.parametrize("name", ["2d_lhs_dilation_stride", "2d_feature_groups"])
def test_conv_adjoint_check_grads_float64(name, x64):
  # conv_adjoint is bilinear in (cotangent, rhs); order 2 exercises both arguments.
  c = {
    "2d_lhs_dilation_stride": case(
      (1, 2, 3, 3), (2, 2, 2, 2), (2, 1), ((1, 0), (0, 1)), lhs_dilation=(1, 2)
    ),
    "2d_feature_groups": case((1, 4, 3, 3), (2, 2, 2, 2), (1, 1), "SAME", feature_group_count=2),
  }[name]
  x, w = make_operands(c, np.float64, seed=9)
  kw = conv_kwargs(c)
  y = random_like(out_shape(x, w, kw), jnp.float64, seed=10)
  check_grads(jitted(adjoint, lhs_shape=x.shape, **kw), (y, w), order=2, modes=("fwd", "rev"))


def test_conv_adjoint_gradient_wrt_rhs_matches_lax():
  c = CASES["2d_both_dilations"]
  x, w = make_operands(c, seed=11)
  kw = conv_kwargs(c)
  y = random_like(out_shape(x, w, kw), jnp.float32, seed=12)
  weights = random_like(x.shape, jnp.float32, seed=13)

  def loss_ref(w):
    return jnp.vdot(jax.linear_transpose(lambda x: ref(x, w, **kw), x)(y)[0], weights)

  def loss_ours(w):
    return jnp.vdot(adjoint(y, w, x.shape, **kw), weights)

  assert_close(jax.jit(jax.grad(loss_ours))(w), jax.grad(loss_ref)(w), reduction=100, grad=True)


# -------------------------------------------------------- PyTorch's conv_transpose2d


TORCH_CASES = {
  "stride2_pad1_outpad1": dict(
    h=(4, 5),
    k=(3, 3),
    stride=(2, 2),
    padding=(1, 1),
    output_padding=(1, 1),
    groups=1,
    dilation=(1, 1),
  ),
  "plain": dict(
    h=(3, 4),
    k=(2, 3),
    stride=(1, 1),
    padding=(0, 0),
    output_padding=(0, 0),
    groups=1,
    dilation=(1, 1),
  ),
  "groups": dict(
    h=(4, 4),
    k=(3, 2),
    stride=(2, 1),
    padding=(1, 0),
    output_padding=(1, 0),
    groups=2,
    dilation=(1, 1),
  ),
  "dilation_asymmetric": dict(
    h=(3, 4),
    k=(2, 3),
    stride=(3, 2),
    padding=(2, 1),
    output_padding=(2, 0),
    groups=1,
    dilation=(2, 2),
  ),
  "depthwise": dict(
    h=(5, 3),
    k=(3, 3),
    stride=(2, 2),
    padding=(0, 1),
    output_padding=(0, 1),
    groups=4,
    dilation=(1, 2),
  ),
}


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_reproduces_torch_conv_transpose2d(name):
  torch = pytest.importorskip("torch")
  t = TORCH_CASES[name]
  g = t["groups"]
  n, c_in, c_out = 2, 4, 4 if g == 4 else 6
  weight = np.random.default_rng(14).standard_normal((c_in, c_out // g, *t["k"]))
  y = np.random.default_rng(15).standard_normal((n, c_in, *t["h"]))
  expected = torch.nn.functional.conv_transpose2d(
    torch.from_numpy(y),
    torch.from_numpy(weight),
    stride=t["stride"],
    padding=t["padding"],
    output_padding=t["output_padding"],
    groups=g,
    dilation=t["dilation"],
  ).numpy()
  # torch's output size formula fixes the forward input shape (no ambiguity left).
  out_spatial = tuple(
    (h - 1) * s - 2 * p + d * (k - 1) + op + 1
    for h, s, p, d, k, op in zip(
      t["h"], t["stride"], t["padding"], t["dilation"], t["k"], t["output_padding"]
    )
  )
  assert expected.shape == (n, c_out, *out_spatial)
  # W (in, out/groups, kh, kw) is the OIHW kernel of the forward conv x -> y.
  actual = convmm.conv_adjoint(
    jnp.asarray(y, jnp.float32),
    jnp.asarray(weight, jnp.float32),
    (n, c_out, *out_spatial),
    t["stride"],
    tuple((p, p) for p in t["padding"]),
    rhs_dilation=t["dilation"],
    feature_group_count=g,
    precision=HIGHEST,
  )
  assert_close(
    actual, expected.astype(np.float32), dtype=jnp.float32, reduction=c_in * math.prod(t["k"])
  )


# ------------------------------------------------------------------------ conv_transpose


def transpose_case(lhs, rhs, strides, padding, **kw):
  """lhs and rhs shapes in the given (default NH..C / H..IO) layout."""
  return dict(lhs=lhs, rhs=rhs, strides=strides, padding=padding, **kw)


TRANSPOSE_CASES = {
  "1d_same": transpose_case((2, 5, 3), (3, 3, 4), (2,), "SAME"),
  "1d_valid_k_lt_s": transpose_case((1, 4, 2), (2, 2, 3), (3,), "VALID"),
  "2d_same": transpose_case((2, 4, 5, 3), (3, 3, 3, 4), (2, 2), "SAME"),
  "2d_same_k_lt_s": transpose_case((1, 3, 4, 2), (2, 2, 2, 3), (3, 3), "SAME"),
  "2d_valid": transpose_case((1, 4, 3, 2), (3, 2, 2, 3), (2, 1), "VALID"),
  "2d_pairs": transpose_case((1, 4, 4, 2), (3, 3, 2, 3), (2, 2), ((1, 2), (0, 1))),
  "2d_negative_pairs": transpose_case((1, 5, 4, 2), (3, 2, 2, 2), (2, 1), ((-1, 2), (1, -1))),
  "2d_rhs_dilation_same": transpose_case(
    (1, 4, 4, 2), (3, 3, 2, 3), (2, 2), "SAME", rhs_dilation=(2, 1)
  ),
  "2d_rhs_dilation_valid": transpose_case(
    (1, 3, 4, 2), (2, 3, 2, 2), (1, 2), "VALID", rhs_dilation=(2, 2)
  ),
  "2d_nchw_oihw": transpose_case(
    (2, 3, 4, 5), (2, 3, 3, 3), (2, 2), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
  ),
  "2d_odd_layout": transpose_case(
    (4, 2, 5, 3), (3, 2, 4, 2), (2, 1), "VALID", dimension_numbers=("WNHC", "IHOW", "HCNW")
  ),
  "3d_same": transpose_case((1, 3, 2, 3, 2), (2, 2, 3, 2, 3), (2, 2, 1), "SAME"),
  "3d_pairs_dilated": transpose_case(
    (1, 2, 3, 2, 2), (2, 2, 2, 2, 2), (2, 1, 2), ((1, 1), (0, 2), (2, 0)), rhs_dilation=(1, 2, 1)
  ),
}

CONSISTENT_PADDING_CASES = {
  "2d_torch_like": transpose_case((1, 4, 5, 2), (3, 3, 2, 3), (2, 2), ((1, 1), (1, 1))),
  "2d_asymmetric": transpose_case((1, 3, 4, 2), (3, 2, 2, 2), (2, 3), ((0, 1), (1, 0))),
  "2d_dilated_same": transpose_case(
    (1, 3, 3, 2), (3, 3, 2, 2), (2, 2), "SAME", rhs_dilation=(2, 1)
  ),
  "1d_valid": transpose_case((2, 4, 3), (3, 3, 2), (2,), "VALID"),
}


def transpose_operands(c, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.standard_normal(c["lhs"]), dtype),
    jnp.asarray(rng.standard_normal(c["rhs"]), dtype),
  )


def transpose_kwargs(c):
  return {k: v for k, v in c.items() if k not in ("lhs", "rhs")}


@pytest.mark.parametrize(
  "name, transpose_kernel",
  [
    *((name, False) for name in TRANSPOSE_CASES),
    # Other layouts with transpose_kernel=True: test_conv_transpose_kernel_with_layouts.
    *((name, True) for name, c in TRANSPOSE_CASES.items() if "dimension_numbers" not in c),
  ],
)
def test_conv_transpose_matches_lax(name, transpose_kernel):
  c = TRANSPOSE_CASES[name]
  kw = dict(transpose_kwargs(c), transpose_kernel=transpose_kernel, precision=HIGHEST)
  if transpose_kernel:
    # The swapped kernel reads lhs features through its O axis (default H..IO layout).
    c = dict(c, rhs=(*c["rhs"][:-2], c["rhs"][-1], c["rhs"][-2]))
  lhs, rhs = transpose_operands(c)
  expected = jitted(lax.conv_transpose, **kw)(lhs, rhs)
  actual = jitted(convmm.conv_transpose, **kw)(lhs, rhs)
  assert actual.shape == expected.shape and actual.dtype == expected.dtype
  assert_close(actual, expected, reduction=math.prod(c["rhs"]))


@pytest.mark.parametrize("name", ["2d_nchw_oihw", "2d_odd_layout"])
def test_conv_transpose_kernel_with_layouts(name):
  c = TRANSPOSE_CASES[name]
  lhs, rhs = transpose_operands(c)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, c["dimension_numbers"])
  # Swap rhs's O and I sizes so the flipped-and-swapped kernel reads lhs's features.
  shape = list(rhs.shape)
  shape[dn.rhs_spec[0]], shape[dn.rhs_spec[1]] = shape[dn.rhs_spec[1]], shape[dn.rhs_spec[0]]
  rhs = random_like(tuple(shape), jnp.float32, seed=16)
  kw = dict(transpose_kwargs(c), transpose_kernel=True, precision=HIGHEST)
  expected = jitted(lax.conv_transpose, **kw)(lhs, rhs)
  actual = jitted(convmm.conv_transpose, **kw)(lhs, rhs)
  assert actual.shape == expected.shape
  assert_close(actual, expected, reduction=math.prod(rhs.shape))


@pytest.mark.skipif(
  "use_consistent_padding" not in inspect.signature(lax.conv_transpose).parameters,
  reason="the reference, lax.conv_transpose(use_consistent_padding=...), needs a newer jax",
)
@pytest.mark.parametrize("name", list(CONSISTENT_PADDING_CASES))
def test_conv_transpose_use_consistent_padding_matches_lax(name):
  c = CONSISTENT_PADDING_CASES[name]
  lhs, rhs = transpose_operands(c, seed=17)
  kw = dict(transpose_kwargs(c), use_consistent_padding=True, precision=HIGHEST)
  expected = jitted(lax.conv_transpose, **kw)(lhs, rhs)
  actual = jitted(convmm.conv_transpose, **kw)(lhs, rhs)
  assert actual.shape == expected.shape
  assert_close(actual, expected, reduction=math.prod(c["rhs"]))


@pytest.mark.parametrize(
  "dtype, preferred",
  [(jnp.bfloat16, None), (jnp.float16, None), (jnp.bfloat16, jnp.float32)],
  ids=["bf16", "f16", "bf16_to_f32"],
)
def test_conv_transpose_dtypes(dtype, preferred):
  c = TRANSPOSE_CASES["2d_same"]
  lhs, rhs = transpose_operands(c, dtype, seed=18)
  kw = dict(transpose_kwargs(c), precision=HIGHEST, preferred_element_type=preferred)
  expected = jitted(lax.conv_transpose, **kw)(lhs, rhs)
  actual = jitted(convmm.conv_transpose, **kw)(lhs, rhs)
  assert actual.dtype == expected.dtype
  assert_close(actual, expected, dtype=dtype, reduction=math.prod(c["rhs"]))


def test_conv_transpose_vjp_matches_lax():
  c = TRANSPOSE_CASES["2d_pairs"]
  lhs, rhs = transpose_operands(c, seed=19)
  kw = dict(transpose_kwargs(c), precision=HIGHEST)

  def grads(fn):
    y, vjp = jax.vjp(functools.partial(fn, **kw), lhs, rhs)
    return vjp(random_like(y.shape, y.dtype, seed=20))

  for actual, expected in zip(
    jax.jit(lambda: grads(convmm.conv_transpose))(), grads(lax.conv_transpose)
  ):
    assert_close(actual, expected, reduction=100, grad=True)


# The transposed conv with transpose_kernel=True is the adjoint of the forward conv
# with the same kernel, strides and padding string, whenever the transposed conv's
# output shape equals the forward input shape: SAME with H divisible by the stride,
# VALID with k >= s and (H - k) divisible by s.
ADJOINT_AGREEMENT = {
  "same_stride2": dict(x=(2, 8, 6, 3), k=(3, 3), o=4, s=(2, 2), padding="SAME"),
  "same_even_kernel": dict(x=(1, 6, 9, 2), k=(4, 2), o=3, s=(2, 3), padding="SAME"),
  "same_k_lt_s": dict(x=(1, 6, 6, 2), k=(2, 1), o=2, s=(3, 2), padding="SAME"),
  "valid": dict(x=(1, 7, 8, 2), k=(3, 2), o=3, s=(2, 2), padding="VALID"),
  "valid_stride1": dict(x=(2, 5, 4, 3), k=(2, 3), o=2, s=(1, 1), padding="VALID"),
  "1d_same": dict(x=(2, 9, 2), k=(3,), o=3, s=(3,), padding="SAME"),
  "3d_valid": dict(x=(1, 5, 4, 3, 2), k=(3, 2, 1), o=2, s=(2, 2, 1), padding="VALID"),
}


@pytest.mark.parametrize("name", list(ADJOINT_AGREEMENT))
def test_conv_transpose_kernel_equals_conv_adjoint(name):
  a = ADJOINT_AGREEMENT[name]
  nsp = len(a["k"])
  letters = "HWD"[:nsp]
  dn = (f"N{letters}C", f"{letters}IO", f"N{letters}C")
  x_shape = a["x"]
  w = random_like((*a["k"], x_shape[-1], a["o"]), jnp.float32, seed=21)
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  y_shape = jax.eval_shape(
    lambda x: ref(x, w, window_strides=a["s"], padding=a["padding"], dimension_numbers=dn), x
  ).shape
  y = random_like(y_shape, jnp.float32, seed=22)
  transposed = convmm.conv_transpose(
    y, w, a["s"], a["padding"], dimension_numbers=dn, transpose_kernel=True, precision=HIGHEST
  )
  assert transposed.shape == x_shape  # the precondition of this identity
  adjoint_result = adjoint(
    y, w, x_shape, window_strides=a["s"], padding=a["padding"], dimension_numbers=dn
  )
  assert_close(transposed, adjoint_result, reduction=a["o"] * math.prod(a["k"]))
