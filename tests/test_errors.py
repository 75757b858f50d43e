"""One ``pytest.raises(..., match=...)`` per validation rule.

Every bad argument must give a ``ValueError`` or ``TypeError`` whose single
message starts with the public function's name, names the argument and shows
the offending values, raised in Python at trace time: eagerly, and also while
``jax.jit`` traces (never an XLA lowering error, a broadcasting error or a
silently wrong result).
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import convmm

conv = convmm.conv_general_dilated
X = jnp.ones((2, 4, 5, 5), jnp.float32)  # NCHW
W = jnp.ones((6, 4, 3, 3), jnp.float32)  # OIHW
Y = jnp.ones((2, 6, 3, 3), jnp.float32)  # conv(X, W, (1, 1), 'VALID')
PATCHES = jnp.ones((2, 36, 3, 3), jnp.float32)  # im2col(X, (3, 3), (1, 1), 'VALID')
XT = jnp.ones((1, 4, 4, 3), jnp.float32)  # NHWC for conv_transpose
WT = jnp.ones((3, 3, 3, 2), jnp.float32)  # HWIO


def rule(fn, args, kwargs, exc, match, marks=()):
  return dict(fn=fn, args=args, kwargs=kwargs, exc=exc, match=match, marks=marks)


def shape(s):
  """A regex matching the tuple ``s`` as printed."""
  return re.escape(str(tuple(s)))


G = "^conv_general_dilated: "
RULES = {
  # --- features and groups
  "channel_mismatch": rule(
    conv,
    (X, jnp.ones((6, 3, 3, 3))),
    dict(window_strides=(1, 1), padding="VALID"),
    ValueError,
    G + r".*\b4\b.*\b3\b.*lhs.shape=" + shape(X.shape) + ".*rhs.shape=" + shape((6, 3, 3, 3)),
  ),
  "feature_groups_not_dividing_channels": rule(
    conv,
    (jnp.ones((2, 3, 5, 5)), jnp.ones((6, 1, 3, 3))),
    dict(window_strides=(1, 1), padding="VALID", feature_group_count=2),
    ValueError,
    G + r"`feature_group_count` \(=2\) must divide the lhs feature size 3",
  ),
  "feature_groups_not_dividing_out_features": rule(
    conv,
    (X, jnp.ones((3, 2, 3, 3))),
    dict(window_strides=(1, 1), padding="VALID", feature_group_count=2),
    ValueError,
    G + r"`feature_group_count` \(=2\) must divide the rhs output-feature size 3",
  ),
  "batch_groups_not_dividing_batch": rule(
    conv,
    (jnp.ones((3, 4, 5, 5)), W),
    dict(window_strides=(1, 1), padding="VALID", batch_group_count=2),
    ValueError,
    G + r"`batch_group_count` \(=2\) must divide the lhs batch size 3",
  ),
  "batch_groups_not_dividing_out_features": rule(
    conv,
    (X, jnp.ones((3, 4, 3, 3))),
    dict(window_strides=(1, 1), padding="VALID", batch_group_count=2),
    ValueError,
    G + r"`batch_group_count` \(=2\) must divide the rhs output-feature size 3",
  ),
  "both_group_counts": rule(
    conv,
    (X, jnp.ones((4, 2, 3, 3))),
    dict(window_strides=(1, 1), padding="VALID", feature_group_count=2, batch_group_count=2),
    ValueError,
    G + r".*`feature_group_count` \(=2\).*`batch_group_count` \(=2\)",
  ),
  "zero_feature_groups": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", feature_group_count=0),
    ValueError,
    G + r"`feature_group_count`.*0",
  ),
  "negative_batch_groups": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", batch_group_count=-1),
    ValueError,
    G + r"`batch_group_count`.*-1",
  ),
  "float_feature_groups": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", feature_group_count=1.5),
    ValueError,
    G + r"`feature_group_count`.*1\.5",
  ),
  # --- strides and dilations
  "zero_stride": rule(
    conv,
    (X, W),
    dict(window_strides=(0, 1), padding="VALID"),
    ValueError,
    G + r"`window_strides`.*\(0, 1\)",
  ),
  "negative_stride": rule(
    conv,
    (X, W),
    dict(window_strides=(1, -2), padding="VALID"),
    ValueError,
    G + r"`window_strides`.*\(1, -2\)",
  ),
  "zero_rhs_dilation": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", rhs_dilation=(1, 0)),
    TypeError,
    G + r"`rhs_dilation`.*\(1, 0\)",
  ),
  "negative_lhs_dilation": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding=((0, 0), (0, 0)), lhs_dilation=(-1, 1)),
    TypeError,
    G + r"`lhs_dilation`.*\(-1, 1\)",
  ),
  "float_stride": rule(
    conv,
    (X, W),
    dict(window_strides=(1.5, 1), padding="VALID"),
    TypeError,
    G + r"`window_strides`.*1\.5",
  ),
  "int_stride_not_sequence": rule(
    conv, (X, W), dict(window_strides=1, padding="VALID"), TypeError, G + r"`window_strides`.*1"
  ),
  # --- sequence lengths and ranks
  "strides_wrong_length": rule(
    conv,
    (X, W),
    dict(window_strides=(1,), padding="VALID"),
    ValueError,
    G + r"`window_strides`.*\(2\).*\(1,\)",
  ),
  "rhs_dilation_wrong_length": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", rhs_dilation=(1, 1, 1)),
    ValueError,
    G + r"`rhs_dilation`.*\(2\).*\(1, 1, 1\)",
  ),
  "lhs_dilation_wrong_length": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding=((0, 0), (0, 0)), lhs_dilation=(2,)),
    ValueError,
    G + r"`lhs_dilation`.*\(2\).*\(2,\)",
  ),
  "rank_too_low": rule(
    conv,
    (jnp.ones(5), jnp.ones(3)),
    dict(window_strides=(), padding="VALID"),
    ValueError,
    G + r"`lhs`.*rank.*1",
  ),
  "rank_mismatch": rule(
    conv,
    (X, jnp.ones((6, 4, 3))),
    dict(window_strides=(1, 1), padding="VALID"),
    TypeError,
    G + r"`lhs` and `rhs`.*rank.*4.*3",
  ),
  # --- padding
  "unknown_padding_string": rule(
    conv, (X, W), dict(window_strides=(1, 1), padding="FULL"), ValueError, G + r"`padding`.*'FULL'"
  ),
  "string_padding_with_lhs_dilation": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="SAME", lhs_dilation=(2, 2)),
    ValueError,
    G + r".*`padding`.*'SAME'.*`lhs_dilation`.*\(2, 2\)",
  ),
  "padding_wrong_count": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding=((1, 1),)),
    TypeError,
    G + r"`padding`.*\(2\).*1",
  ),
  "padding_triple": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding=((1, 1, 1), (0, 0))),
    ValueError,
    G + r"`padding`.*\(1, 1, 1\)",
  ),
  "padding_flat_pair": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding=(1, 1)),
    ValueError,
    G + r"`padding`.*\(1, 1\)",
  ),
  "padding_float": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding=((1.5, 0), (0, 0))),
    ValueError,
    G + r"`padding`.*1\.5",
  ),
  "padding_int": rule(
    conv, (X, W), dict(window_strides=(1, 1), padding=1), ValueError, G + r"`padding`.*1"
  ),
  "negative_padding_beyond_input": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding=((-3, -3), (0, 0))),
    ValueError,
    G + r"negative `padding`.*\(-3, -3\).*\(5, 5\)",
  ),
  "negative_padding_beyond_dilated_input": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding=((-10, 0), (0, 0)), lhs_dilation=(2, 1)),
    ValueError,
    G + r"negative `padding`.*\(-10, 0\).*\(9, 5\)",
  ),
  # --- dimension_numbers
  "dimension_numbers_wrong_length": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NCH", "OIHW", "NCHW")),
    TypeError,
    G + r"`dimension_numbers`.*'NCH'",
  ),
  "dimension_numbers_repeated_letter": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NCHH", "OIHW", "NCHW")),
    TypeError,
    G + r"`dimension_numbers`.*'NCHH'",
  ),
  "dimension_numbers_missing_n": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("XCHW", "OIHW", "NCHW")),
    TypeError,
    G + r"`dimension_numbers`.*'XCHW'.*'N'",
  ),
  "dimension_numbers_missing_c": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NCHW", "OIHW", "NXHW")),
    TypeError,
    G + r"`dimension_numbers`.*'NXHW'.*'C'",
  ),
  "dimension_numbers_missing_o": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NCHW", "XIHW", "NCHW")),
    TypeError,
    G + r"`dimension_numbers`.*'XIHW'.*'O'",
  ),
  "dimension_numbers_missing_i": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NCHW", "OXHW", "NCHW")),
    TypeError,
    G + r"`dimension_numbers`.*'OXHW'.*'I'",
  ),
  "dimension_numbers_spatial_mismatch": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NCHW", "OIHW", "NCHX")),
    TypeError,
    G + r"`dimension_numbers`.*spatial.*'NCHX'",
  ),
  "dimension_numbers_int": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=5),
    TypeError,
    G + r"`dimension_numbers`.*5",
  ),
  "dimension_numbers_string": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers="NCHW"),
    TypeError,
    G + r"`dimension_numbers`.*'NCHW'",
  ),
  "dimension_numbers_two_specs": rule(
    conv,
    (X, W),
    dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NCHW", "OIHW")),
    TypeError,
    G + r"`dimension_numbers`.*\('NCHW', 'OIHW'\)",
  ),
  "dimension_numbers_object_not_permutation": rule(
    conv,
    (X, W),
    dict(
      window_strides=(1, 1),
      padding="VALID",
      dimension_numbers=lax.ConvDimensionNumbers((0, 1, 2, 2), (0, 1, 2, 3), (0, 1, 2, 3)),
    ),
    ValueError,
    G + r"`dimension_numbers.*lhs_spec`.*\(0, 1, 2, 2\)",
  ),
  "dimension_numbers_object_wrong_length": rule(
    conv,
    (X, W),
    dict(
      window_strides=(1, 1),
      padding="VALID",
      dimension_numbers=lax.ConvDimensionNumbers((0, 1, 2, 3), (0, 1, 2), (0, 1, 2, 3)),
    ),
    ValueError,
    G + r"`dimension_numbers.*rhs_spec`.*\(0, 1, 2\)",
  ),
  # --- operands
  "dtype_mismatch": rule(
    conv,
    (X, W.astype(jnp.bfloat16)),
    dict(window_strides=(1, 1), padding="VALID"),
    TypeError,
    G + r"`lhs` and `rhs`.*dtype.*float32.*bfloat16",
  ),
  "lhs_string": rule(
    conv, ("abc", W), dict(window_strides=(1, 1), padding="VALID"), TypeError, G + r"`lhs`.*str"
  ),
  "lhs_none": rule(
    conv, (None, W), dict(window_strides=(1, 1), padding="VALID"), TypeError, G + r"`lhs`.*None"
  ),
  "rhs_object": rule(
    conv,
    (X, object()),
    dict(window_strides=(1, 1), padding="VALID"),
    TypeError,
    G + r"`rhs`.*object",
  ),
  "rhs_dict": rule(
    conv, (X, {"w": 1}), dict(window_strides=(1, 1), padding="VALID"), TypeError, G + r"`rhs`.*dict"
  ),
  "zero_size_kernel": rule(
    # lax rejects a zero-size window too, but with an XLA verifier error.
    conv,
    (X, jnp.ones((6, 4, 0, 3))),
    dict(window_strides=(1, 1), padding="VALID"),
    ValueError,
    G + r".*`rhs`.*" + shape((6, 4, 0, 3)),
  ),
  # --- im2col
  "im2col_filter_shape_wrong_length": rule(
    convmm.im2col,
    (X,),
    dict(filter_shape=(3,), window_strides=(1, 1), padding="VALID"),
    ValueError,
    r"^im2col: `filter_shape`.*\(2\).*\(3,\)",
  ),
  "im2col_negative_filter_shape": rule(
    convmm.im2col,
    (X,),
    dict(filter_shape=(3, -1), window_strides=(1, 1), padding="VALID"),
    ValueError,
    r"^im2col: `filter_shape`.*\(3, -1\)",
  ),
  "im2col_zero_filter_shape": rule(
    convmm.im2col,
    (X,),
    dict(filter_shape=(3, 0), window_strides=(1, 1), padding="VALID"),
    ValueError,
    r"^im2col: `filter_shape`.*\(3, 0\)",
  ),
  "im2col_zero_stride": rule(
    convmm.im2col,
    (X,),
    dict(filter_shape=(3, 3), window_strides=(1, 0), padding="VALID"),
    ValueError,
    r"^im2col: `window_strides`.*\(1, 0\)",
  ),
  "im2col_unknown_padding": rule(
    convmm.im2col,
    (X,),
    dict(filter_shape=(3, 3), window_strides=(1, 1), padding="FULL"),
    ValueError,
    r"^im2col: `padding`.*'FULL'",
  ),
  "im2col_string_padding_with_lhs_dilation": rule(
    convmm.im2col,
    (X,),
    dict(filter_shape=(3, 3), window_strides=(1, 1), padding="SAME", lhs_dilation=(1, 2)),
    ValueError,
    r"^im2col: .*`padding`.*`lhs_dilation`",
  ),
  "im2col_rank_too_low": rule(
    convmm.im2col,
    (jnp.ones(3),),
    dict(filter_shape=(3,), window_strides=(1,), padding="VALID"),
    ValueError,
    r"^im2col: `lhs`.*rank",
  ),
  "im2col_bad_dimension_numbers": rule(
    convmm.im2col,
    (X,),
    dict(
      filter_shape=(3, 3),
      window_strides=(1, 1),
      padding="VALID",
      dimension_numbers=("NCHW", "OIHW"),
    ),
    TypeError,
    r"^im2col: `dimension_numbers`",
  ),
  "im2col_non_array": rule(
    convmm.im2col,
    ("x",),
    dict(filter_shape=(3, 3), window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^im2col: `lhs`.*str",
  ),
  # --- col2im
  "col2im_patches_shape_mismatch": rule(
    convmm.col2im,
    (PATCHES[:, :-1],),
    dict(lhs_shape=X.shape, filter_shape=(3, 3), window_strides=(1, 1), padding="VALID"),
    ValueError,
    r"^col2im: `patches`.*" + shape((2, 36, 3, 3)) + ".*" + shape((2, 35, 3, 3)),
  ),
  "col2im_lhs_shape_mismatch": rule(
    convmm.col2im,
    (PATCHES,),
    dict(lhs_shape=(2, 4, 6, 5), filter_shape=(3, 3), window_strides=(1, 1), padding="VALID"),
    ValueError,
    r"^col2im: `patches`.*" + shape((2, 36, 4, 3)) + ".*" + shape((2, 36, 3, 3)),
  ),
  "col2im_lhs_shape_not_sequence": rule(
    convmm.col2im,
    (PATCHES,),
    dict(lhs_shape=None, filter_shape=(3, 3), window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^col2im: `lhs_shape`.*None",
  ),
  "col2im_lhs_shape_float": rule(
    convmm.col2im,
    (PATCHES,),
    dict(lhs_shape=(2, 4, 5.5, 5), filter_shape=(3, 3), window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^col2im: `lhs_shape`.*5\.5",
  ),
  "col2im_non_array": rule(
    convmm.col2im,
    (None,),
    dict(lhs_shape=X.shape, filter_shape=(3, 3), window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^col2im: `patches`.*None",
  ),
  # --- conv_adjoint
  "conv_adjoint_cotangent_shape": rule(
    convmm.conv_adjoint,
    (Y[:, :, :2], W),
    dict(lhs_shape=X.shape, window_strides=(1, 1), padding="VALID"),
    ValueError,
    r"^conv_adjoint: `cotangent`.*" + shape((2, 6, 3, 3)) + ".*" + shape((2, 6, 2, 3)),
  ),
  "conv_adjoint_cotangent_dtype": rule(
    convmm.conv_adjoint,
    (Y.astype(jnp.bfloat16), W),
    dict(lhs_shape=X.shape, window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^conv_adjoint: `cotangent`.*float32.*bfloat16",
  ),
  "conv_adjoint_cotangent_dtype_vs_preferred": rule(
    convmm.conv_adjoint,
    (Y.astype(jnp.bfloat16), W.astype(jnp.bfloat16)),
    dict(
      lhs_shape=X.shape, window_strides=(1, 1), padding="VALID", preferred_element_type=jnp.float32
    ),
    TypeError,
    r"^conv_adjoint: `cotangent`.*float32.*bfloat16",
  ),
  "conv_adjoint_channel_mismatch": rule(
    convmm.conv_adjoint,
    (Y, W),
    dict(lhs_shape=(2, 3, 5, 5), window_strides=(1, 1), padding="VALID"),
    ValueError,
    r"^conv_adjoint: .*lhs.shape=" + shape((2, 3, 5, 5)),
  ),
  "conv_adjoint_lhs_shape_not_sequence": rule(
    convmm.conv_adjoint,
    (Y, W),
    dict(lhs_shape=5, window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^conv_adjoint: `lhs_shape`.*5",
  ),
  "conv_adjoint_lhs_shape_float": rule(
    convmm.conv_adjoint,
    (Y, W),
    dict(lhs_shape=(2, 4, 5.7, 5), window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^conv_adjoint: `lhs_shape`.*5\.7",
  ),
  "conv_adjoint_lhs_shape_rank": rule(
    convmm.conv_adjoint,
    (Y, W),
    dict(lhs_shape=(2, 4, 5), window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^conv_adjoint: .*rank",
  ),
  "conv_adjoint_zero_stride": rule(
    convmm.conv_adjoint,
    (Y, W),
    dict(lhs_shape=X.shape, window_strides=(0, 1), padding="VALID"),
    ValueError,
    r"^conv_adjoint: `window_strides`.*\(0, 1\)",
  ),
  "conv_adjoint_non_array": rule(
    convmm.conv_adjoint,
    ("y", W),
    dict(lhs_shape=X.shape, window_strides=(1, 1), padding="VALID"),
    TypeError,
    r"^conv_adjoint: `cotangent`.*str",
  ),
  # --- conv_transpose
  "conv_transpose_padding_string": rule(
    convmm.conv_transpose,
    (XT, WT),
    dict(strides=(2, 2), padding="SAME_LOWER"),
    ValueError,
    r"^conv_transpose: `padding`.*'SAME_LOWER'",
  ),
  "conv_transpose_padding_crops_everything": rule(
    convmm.conv_transpose,
    (XT, WT),
    dict(strides=(2, 2), padding=((-8, 0), (0, 0))),
    ValueError,
    r"^conv_transpose: negative `padding`.*crops more than the \(dilated\) input",
  ),
  "conv_transpose_zero_stride": rule(
    convmm.conv_transpose,
    (XT, WT),
    dict(strides=(0, 2), padding="SAME"),
    TypeError,
    r"^conv_transpose: `strides`.*\(0, 2\)",
  ),
  "conv_transpose_strides_wrong_length": rule(
    convmm.conv_transpose,
    (XT, WT),
    dict(strides=(2,), padding="SAME"),
    ValueError,
    r"^conv_transpose: `strides`.*\(2,\)",
  ),
  "conv_transpose_channel_mismatch": rule(
    convmm.conv_transpose,
    (XT, jnp.ones((3, 3, 2, 2))),
    dict(strides=(2, 2), padding="SAME"),
    ValueError,
    r"^conv_transpose: .*\b3\b.*\b2\b.*lhs.shape=" + shape(XT.shape),
  ),
  "conv_transpose_no_default_layout": rule(
    convmm.conv_transpose,
    (jnp.ones((1, 2, 2, 2, 2, 1)), jnp.ones((1, 1, 1, 1, 1, 1))),
    dict(strides=(1, 1, 1, 1), padding="VALID"),
    ValueError,
    r"^conv_transpose: `dimension_numbers`.*rank-6",
  ),
  "conv_transpose_dtype_mismatch": rule(
    convmm.conv_transpose,
    (XT, WT.astype(jnp.float16)),
    dict(strides=(2, 2), padding="SAME"),
    TypeError,
    r"^conv_transpose: `lhs` and `rhs`.*dtype",
  ),
  "conv_transpose_rank_mismatch": rule(
    convmm.conv_transpose,
    (XT, jnp.ones((3, 3, 2))),
    dict(strides=(2, 2), padding="SAME"),
    TypeError,
    r"^conv_transpose: `lhs` and `rhs`.*rank",
  ),
  "conv_transpose_consistent_padding_count": rule(
    convmm.conv_transpose,
    (XT, WT),
    dict(strides=(2, 2), padding=((1, 1),), use_consistent_padding=True),
    TypeError,
    r"^conv_transpose: `padding`.*\(2\)",
  ),
  "conv_transpose_consistent_padding_triple": rule(
    convmm.conv_transpose,
    (XT, WT),
    dict(strides=(2, 2), padding=((1, 1, 1), (1, 1)), use_consistent_padding=True),
    ValueError,
    r"^conv_transpose: `padding`",
  ),
  "conv_transpose_zero_rhs_dilation": rule(
    convmm.conv_transpose,
    (XT, WT),
    dict(strides=(2, 2), padding="SAME", rhs_dilation=(0, 1)),
    TypeError,
    r"^conv_transpose: `rhs_dilation`.*\(0, 1\)",
  ),
  "conv_transpose_non_array": rule(
    convmm.conv_transpose,
    (None, WT),
    dict(strides=(2, 2), padding="SAME"),
    TypeError,
    r"^conv_transpose: `lhs`.*None",
  ),
}


def params(names):
  return [pytest.param(name, marks=RULES[name]["marks"]) for name in names]


@pytest.mark.parametrize("name", params(RULES))
def test_raises_eagerly(name):
  r = RULES[name]
  with pytest.raises(r["exc"], match=r["match"]):
    r["fn"](*r["args"], **r["kwargs"])


# Rules whose operands are all arrays can also be checked while jit traces them.
TRACEABLE = [name for name, r in RULES.items() if all(isinstance(a, jax.Array) for a in r["args"])]


@pytest.mark.parametrize("name", params(TRACEABLE))
def test_raises_while_tracing_under_jit(name):
  r = RULES[name]
  traced = jax.jit(lambda *arrays: r["fn"](*arrays, **r["kwargs"]))
  # `.trace` stops after tracing: nothing is lowered or compiled, so the error
  # must come from convmm's own Python checks (not an XLA verifier error).
  with pytest.raises(r["exc"], match=r["match"]):
    traced.trace(*r["args"])
  with pytest.raises(r["exc"], match=r["match"]):
    traced(*r["args"])


@pytest.mark.parametrize("transform", ["vmap", "grad", "eval_shape"])
def test_raises_under_other_transformations(transform):
  bad = lambda x: conv(x, W, (1, 0), "VALID")
  match = G + r"`window_strides`.*\(1, 0\)"
  with pytest.raises(ValueError, match=match):
    if transform == "vmap":
      jax.vmap(bad)(X[None])
    elif transform == "grad":
      jax.grad(lambda x: jnp.sum(bad(x)))(X)
    else:
      jax.eval_shape(bad, X)


def test_messages_are_single_strings():
  # One f-string per error (STYLE: never a tuple of strings).
  for name in [
    "channel_mismatch",
    "zero_stride",
    "dimension_numbers_int",
    "conv_adjoint_cotangent_shape",
  ]:
    r = RULES[name]
    with pytest.raises(r["exc"]) as info:
      r["fn"](*r["args"], **r["kwargs"])
    assert len(info.value.args) == 1 and isinstance(info.value.args[0], str)


def test_conv_adjoint_integer_dtype_works_or_names_itself():
  x = jnp.arange(2 * 4 * 5 * 5, dtype=jnp.int32).reshape(2, 4, 5, 5) % 7
  w = jnp.arange(6 * 4 * 3 * 3, dtype=jnp.int32).reshape(6, 4, 3, 3) % 5 - 2
  y = lax.conv_general_dilated(x, w, (1, 1), "VALID")
  try:
    result = convmm.conv_adjoint(y, w, x.shape, (1, 1), "VALID")
  except TypeError as e:
    # A clear refusal is acceptable: lax's own linear_transpose gives float0 for ints.
    assert str(e).startswith("conv_adjoint: ") and "int32" in str(e)
    return
  # Otherwise the exact integer adjoint (small integers are exact in float64 too).
  (expected,) = jax.linear_transpose(
    lambda x: lax.conv_general_dilated(
      x, w.astype(jnp.float32), (1, 1), "VALID", precision=lax.Precision.HIGHEST
    ),
    x.astype(jnp.float32),
  )(y.astype(jnp.float32))
  assert result.dtype == jnp.int32
  np.testing.assert_array_equal(result, np.asarray(expected).astype(np.int32))


# --- lax's exception classes. Code written against lax catches lax's classes, so
# for every input lax rejects, convmm raises the same class (with its own message,
# naming the function). Each case runs both.
XL, WL = jnp.ones((1, 2, 5, 5)), jnp.ones((3, 2, 3, 3))  # NCHW, OIHW
XTL, WTL = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3))  # NHWC, HWIO
CONV = (
  lax.conv_general_dilated,
  convmm.conv_general_dilated,
  "conv_general_dilated",
  (XL, WL),
  dict(window_strides=(1, 1), padding="VALID"),
)
PATCHES_FNS = (
  lax.conv_general_dilated_patches,
  convmm.im2col,
  "im2col",
  (XL,),
  dict(filter_shape=(3, 3), window_strides=(1, 1), padding="VALID"),
)
TRANSPOSE = (
  lax.conv_transpose,
  convmm.conv_transpose,
  "conv_transpose",
  (XTL, WTL),
  dict(strides=(2, 2), padding="SAME"),
)


def lax_case(base, args=None, **kwargs):
  lax_fn, fn, name, base_args, base_kwargs = base
  return lax_fn, fn, name, base_args if args is None else args, {**base_kwargs, **kwargs}


LAX_REJECTS = {
  # JAX's testConvInvalidPadding: a malformed padding entry is a ValueError.
  "patches_padding_flat_pair": lax_case(
    PATCHES_FNS,
    (jnp.ones((1, 10, 10, 5), jnp.bfloat16),),
    filter_shape=(5, 5),
    padding=(3, 3),
    dimension_numbers=("NHWC", "OIHW", "NHWC"),
  ),
  "padding_short_pair": lax_case(CONV, padding=((1, 1), (1,))),
  "padding_int_entry": lax_case(CONV, padding=((1, 1), 1)),
  "padding_float_entry": lax_case(CONV, padding=((1.0, 1), (1, 1))),
  "padding_float_array": lax_case(CONV, padding=np.ones((2, 2))),
  "padding_int": lax_case(CONV, padding=3),
  "padding_none": lax_case(CONV, padding=None),
  "padding_wrong_count": lax_case(CONV, padding=((1, 1),)),
  "padding_three_pairs": lax_case(CONV, padding=((1, 1),) * 3),
  "dtype_mismatch": lax_case(CONV, (XL, WL.astype(jnp.bfloat16))),
  "dtype_mismatch_numpy_int64": lax_case(CONV, (XL, np.ones((3, 2, 3, 3), np.int64))),
  "rank_mismatch": lax_case(CONV, (XL, WL[0])),
  "float_stride": lax_case(CONV, window_strides=(1.5, 1)),
  # (lax accepts an integral float stride only from its compile cache, after
  # the same call with ints; a non-integral one never.)
  "numpy_float_strides": lax_case(CONV, window_strides=np.array([1.5, 1.0])),
  "float_rhs_dilation": lax_case(CONV, rhs_dilation=(2.0, 1)),
  "zero_rhs_dilation": lax_case(CONV, rhs_dilation=(0, 1)),
  "zero_lhs_dilation": lax_case(CONV, padding=((0, 0), (0, 0)), lhs_dilation=(0, 1)),
  "stride_not_sequence": lax_case(CONV, window_strides=1),
  "strides_none": lax_case(CONV, window_strides=None),
  "strides_wrong_length": lax_case(CONV, window_strides=(1,)),
  "zero_stride": lax_case(CONV, window_strides=(0, 1)),
  "zero_feature_groups": lax_case(CONV, feature_group_count=0),
  "fractional_feature_groups": lax_case(CONV, feature_group_count=1.5),
  "fractional_batch_groups": lax_case(CONV, batch_group_count=1.5),
  "string_feature_groups": lax_case(CONV, feature_group_count="1"),
  "none_batch_groups": lax_case(CONV, batch_group_count=None),
  "groups_not_dividing": lax_case(CONV, feature_group_count=3),
  "channel_mismatch": lax_case(CONV, (XL, jnp.ones((3, 3, 3, 3)))),
  "dimension_numbers_two_specs": lax_case(CONV, dimension_numbers=("NCHW", "OIHW")),
  "dimension_numbers_int": lax_case(CONV, dimension_numbers=5),
  "dimension_numbers_short_spec": lax_case(CONV, dimension_numbers=("NCH", "OIHW", "NCHW")),
  "dimension_numbers_repeated_letter": lax_case(CONV, dimension_numbers=("NCHH", "OIHW", "NCHW")),
  "dimension_numbers_spatial_mismatch": lax_case(CONV, dimension_numbers=("NCHW", "OIHW", "NCHX")),
  "string_padding_with_lhs_dilation": lax_case(CONV, padding="SAME", lhs_dilation=(2, 2)),
  "negative_padding_beyond_input": lax_case(CONV, padding=((-3, -3), (0, 0))),
  "patches_float_filter_shape": lax_case(PATCHES_FNS, filter_shape=(3.0, 3)),
  "transpose_zero_stride": lax_case(TRANSPOSE, strides=(0, 1)),
  "transpose_padding_short_pair": lax_case(TRANSPOSE, padding=((1,), (1, 1))),
  "transpose_padding_wrong_count": lax_case(TRANSPOSE, padding=((1, 1),)),
  "transpose_crops_everything": lax_case(TRANSPOSE, strides=(1, 1), padding=((-8, -3), (0, 0))),
  "transpose_dtype_mismatch": lax_case(TRANSPOSE, (XTL, WTL.astype(jnp.bfloat16))),
  "transpose_channel_mismatch": lax_case(TRANSPOSE, (XTL, jnp.ones((3, 3, 4, 3)))),
  "transpose_string_padding_with_strides": lax_case(TRANSPOSE, padding="same"),
  "transpose_rank6_no_default_layout": lax_case(
    TRANSPOSE, (jnp.ones((1,) * 6), jnp.ones((1,) * 6)), strides=(1,) * 4
  ),
}


@pytest.mark.parametrize("name", LAX_REJECTS)
def test_same_exception_class_as_lax(name):
  lax_fn, fn, fn_name, args, kwargs = LAX_REJECTS[name]
  with pytest.raises(Exception) as lax_error:
    lax_fn(*args, **kwargs)
  assert lax_error.type in (ValueError, TypeError), lax_error.value
  with pytest.raises(lax_error.type, match=f"^{fn_name}: "):
    fn(*args, **kwargs)


# Inputs lax accepts, convmm must accept too (and compute the same thing).
LAX_ACCEPTS = {
  "bool_strides": lax_case(CONV, window_strides=(True, True)),
  "bool_batch_groups": lax_case(CONV, batch_group_count=True),
  "numpy_int_padding": lax_case(CONV, padding=np.array([[1, 0], [2, 1]])),
  "bool_padding_entries": lax_case(CONV, padding=((True, 0), (0, 1))),
  "lower_case_padding": lax_case(CONV, padding="same"),
  "numpy_float64_kernel": lax_case(CONV, (XL, np.linspace(-1, 1, 54).reshape(3, 2, 3, 3))),
  "numpy_float64_operands": lax_case(
    CONV, (np.linspace(-1, 1, 50).reshape(1, 2, 5, 5), np.ones((3, 2, 3, 3)))
  ),
  "patches_numpy_float64": lax_case(PATCHES_FNS, (np.linspace(-1, 1, 50).reshape(1, 2, 5, 5),)),
  "transpose_bool_strides": lax_case(TRANSPOSE, strides=(True, True)),
  "transpose_numpy_padding": lax_case(TRANSPOSE, padding=np.array([[1, 1], [2, 0]])),
  "transpose_numpy_float64_kernel": lax_case(
    TRANSPOSE, (XTL, np.linspace(-1, 1, 54).reshape(3, 3, 2, 3))
  ),
  "transpose_int8_to_int32": lax_case(
    TRANSPOSE,
    (
      jnp.arange(50, dtype=jnp.int8).reshape(1, 5, 5, 2),
      jnp.arange(54, dtype=jnp.int8).reshape(3, 3, 2, 3) - 27,
    ),
    preferred_element_type=jnp.int32,
  ),
  "transpose_int8_to_float32": lax_case(
    TRANSPOSE,
    (
      jnp.arange(50, dtype=jnp.int8).reshape(1, 5, 5, 2),
      jnp.arange(54, dtype=jnp.int8).reshape(3, 3, 2, 3) - 27,
    ),
    preferred_element_type=jnp.float32,
  ),
  "transpose_bool": lax_case(TRANSPOSE, (XTL.astype(bool), WTL.astype(bool))),
  # Padding that leaves an output dimension empty: an empty result, as in lax.
  "transpose_empty_output": lax_case(TRANSPOSE, strides=(1, 1), padding=((-2, -1), (0, 0))),
  "transpose_empty_output_dilated": lax_case(
    TRANSPOSE,
    (jnp.ones((1, 4, 5, 2)), WTL),
    strides=(1, 2),
    padding=((-1, -3), (1, 1)),
    rhs_dilation=(2, 1),
  ),
  "transpose_empty_output_consistent": lax_case(
    TRANSPOSE, padding=((6, 6), (1, 1)), use_consistent_padding=True
  ),
}


@pytest.mark.parametrize("name", LAX_ACCEPTS)
def test_accepts_what_lax_accepts(name):
  lax_fn, fn, _, args, kwargs = LAX_ACCEPTS[name]
  if "use_consistent_padding" in kwargs and (
    "use_consistent_padding" not in inspect.signature(lax_fn).parameters
  ):
    pytest.skip("the reference, lax.conv_transpose(use_consistent_padding=...), needs a newer jax")
  expected = lax_fn(*args, **kwargs)
  actual = fn(*args, **kwargs)
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  np.testing.assert_allclose(
    np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=1e-5, atol=1e-5
  )


PREFERRED_DTYPES = [
  jnp.bool_,
  jnp.int8,
  jnp.uint8,
  jnp.int32,
  jnp.float16,
  jnp.bfloat16,
  jnp.float32,
  jnp.complex64,
]


def _outcome(fn, operands, kwargs):
  try:
    return jax.eval_shape(lambda: fn(*operands, **kwargs)).dtype
  except (TypeError, ValueError) as e:
    return type(e)


@pytest.mark.parametrize("base", [CONV, PATCHES_FNS, TRANSPOSE], ids=lambda b: b[2])
def test_preferred_element_type_accepted_exactly_where_lax_accepts_it(base):
  # Every (input, preferred) pair: the same result dtype or the same error class
  # (lax: same kind and signedness, integer to floating, or from bool, never narrower).
  lax_fn, fn, _, args, kwargs = base
  mismatches = []
  for a in PREFERRED_DTYPES:
    operands = [x.astype(a) for x in args]
    for p in PREFERRED_DTYPES:
      with_p = dict(kwargs, preferred_element_type=p)
      expected, actual = _outcome(lax_fn, operands, with_p), _outcome(fn, operands, with_p)
      if expected != actual:
        mismatches.append((jnp.dtype(a).name, jnp.dtype(p).name, expected, actual))
  assert not mismatches


def test_preferred_element_type_error_names_the_argument():
  with pytest.raises(
    TypeError,
    match=r"^conv_general_dilated: `preferred_element_type`="
    r"float32.*complex64",
  ):
    conv(
      X.astype(jnp.complex64),
      W.astype(jnp.complex64),
      (1, 1),
      "VALID",
      preferred_element_type=jnp.float32,
    )


@pytest.mark.parametrize("count", [1.0, np.float32(1), np.int64(1), True])
def test_integral_float_group_counts_accepted_beyond_lax(count):
  # Deliberately more than lax (documented in conv_general_dilated): a count that
  # is an integral float reads as the int; lax raises NotImplementedError unless
  # its compile cache already holds the same call with ints.
  x, w = jnp.arange(2 * 4 * 5 * 5.0).reshape(X.shape), jnp.ones((4, 2, 3, 3))
  w1 = jnp.ones((2, 4, 3, 3))
  expected = lax.conv_general_dilated(x, w1, (2, 1), "VALID")
  actual = conv(x, w1, (2, 1), "VALID", feature_group_count=count, batch_group_count=count)
  np.testing.assert_allclose(actual, expected, rtol=1e-6)
  grouped = conv(x, w, (2, 1), "VALID", feature_group_count=2.0 * count)
  np.testing.assert_allclose(
    grouped, lax.conv_general_dilated(x, w, (2, 1), "VALID", feature_group_count=2), rtol=1e-6
  )


# --- Same mistake, same exception, in every function and layer that takes the argument.
def _count_calls(value):
  """Every place a positive count is read, called with ``value``."""
  from flax import nnx

  import convmm.linen
  import convmm.nnx

  x1, w1 = jnp.ones((1, 2, 6)), jnp.ones((2, 2, 3))
  calls = {
    "conv_general_dilated.feature_group_count": lambda: conv(
      x1, w1, (1,), "VALID", feature_group_count=value
    ),
    "conv_general_dilated.batch_group_count": lambda: conv(
      x1, w1, (1,), "VALID", batch_group_count=value
    ),
    "conv_adjoint.feature_group_count": lambda: convmm.conv_adjoint(
      jnp.ones((1, 2, 4)), w1, x1.shape, (1,), "VALID", feature_group_count=value
    ),
    "conv_matrix.feature_group_count": lambda: convmm.conv_matrix(
      w1, x1.shape, (1,), "VALID", feature_group_count=value
    ),
    "conv_matrix.max_elements": lambda: convmm.conv_matrix(
      w1, x1.shape, (1,), "VALID", max_elements=value
    ),
    "operator_norm.num_iters": lambda: convmm.operator_norm(
      w1, x1.shape, (1,), "VALID", num_iters=value
    ),
    "linen.Conv.feature_group_count": lambda: convmm.linen.Conv(
      2, (3,), feature_group_count=value
    ).init(jax.random.key(0), jnp.ones((1, 6, 2))),
    "linen.ConvAdjoint.feature_group_count": lambda: convmm.linen.ConvAdjoint(
      2, (3,), feature_group_count=value
    ).init(jax.random.key(0), jnp.ones((1, 6, 2))),
    "nnx.Conv.feature_group_count": lambda: convmm.nnx.Conv(
      2, 2, (3,), feature_group_count=value, rngs=nnx.Rngs(0)
    ),
    "nnx.ConvLocal.feature_group_count": lambda: convmm.nnx.ConvLocal(
      2, 2, (3,), input_spatial_shape=(6,), feature_group_count=value, rngs=nnx.Rngs(0)
    ),
    "set_memory_budget.nbytes": lambda: convmm.set_memory_budget(value),
    "memory_budget.nbytes": lambda: convmm.memory_budget(value).__enter__(),
  }
  if value is not None:  # None is the default budget where the budget is optional
    calls |= {
      "conv_general_dilated.memory_budget": lambda: conv(
        x1, w1, (1,), "VALID", memory_budget=value
      ),
      "conv_transpose.memory_budget": lambda: convmm.conv_transpose(
        jnp.ones((1, 6, 2)), jnp.ones((3, 2, 2)), (1,), "VALID", memory_budget=value
      ),
      "replace_convs.memory_budget": lambda: convmm.replace_convs(jnp.sin, memory_budget=value),
    }
  return calls


def _int_sequence_calls(name, value):
  """Every place an int sequence of kind ``name`` (strides or dilations) is read."""
  from flax import nnx

  import convmm.linen
  import convmm.nnx

  x1, w1, y1 = jnp.ones((1, 2, 6)), jnp.ones((2, 2, 3)), jnp.ones((1, 2, 4))
  xl, wl = jnp.ones((1, 6, 2)), jnp.ones((3, 2, 2))
  layer_kw = {"strides": {"strides": value}, "dilation": {"kernel_dilation": value}}[name]
  core_kw = {
    "strides": {"window_strides": value},
    "dilation": {"window_strides": (1,), "rhs_dilation": value},
  }[name]
  calls = {
    "conv_general_dilated": lambda: conv(x1, w1, padding="VALID", **core_kw),
    "im2col": lambda: convmm.im2col(x1, (3,), padding="VALID", **core_kw),
    "col2im": lambda: convmm.col2im(
      jnp.ones((1, 6, 4)), x1.shape, (3,), padding="VALID", **core_kw
    ),
    "conv_adjoint": lambda: convmm.conv_adjoint(y1, w1, x1.shape, padding="VALID", **core_kw),
    "linen.Conv": lambda: convmm.linen.Conv(2, (3,), **layer_kw).init(jax.random.key(0), xl),
    "nnx.Conv": lambda: convmm.nnx.Conv(2, 2, (3,), **layer_kw, rngs=nnx.Rngs(0)),
    "nnx.ConvAdjoint": lambda: convmm.nnx.ConvAdjoint(2, 2, (3,), **layer_kw, rngs=nnx.Rngs(0)),
  }
  if name == "dilation":  # conv_transpose's strides dilate its input, as in lax
    calls |= {
      "conv_transpose.strides": lambda: convmm.conv_transpose(xl, wl, value, "VALID"),
      "conv_transpose.rhs_dilation": lambda: convmm.conv_transpose(
        xl, wl, (1,), "VALID", rhs_dilation=value
      ),
      "linen.ConvTranspose.strides": lambda: convmm.linen.ConvTranspose(
        2, (3,), strides=value
      ).init(jax.random.key(0), xl),
      "nnx.ConvTranspose.kernel_dilation": lambda: convmm.nnx.ConvTranspose(
        2, 2, (3,), kernel_dilation=value, rngs=nnx.Rngs(0)
      ),
    }
  return calls


MISTAKES = {
  # kind: (calls, exception class): lax's class where lax has the argument.
  "count_not_a_number": (lambda: _count_calls("2"), TypeError),
  "count_none": (lambda: _count_calls(None), TypeError),
  "count_fractional": (lambda: _count_calls(1.5), ValueError),
  "count_zero": (lambda: _count_calls(0), ValueError),
  "count_negative": (lambda: _count_calls(np.int64(-3)), ValueError),
  "strides_float_entry": (lambda: _int_sequence_calls("strides", (1.5,)), TypeError),
  "strides_string_entry": (lambda: _int_sequence_calls("strides", ("1",)), TypeError),
  "strides_zero": (lambda: _int_sequence_calls("strides", (0,)), ValueError),
  "dilation_float_entry": (lambda: _int_sequence_calls("dilation", (2.5,)), TypeError),
  "dilation_zero": (lambda: _int_sequence_calls("dilation", (0,)), TypeError),
}


@pytest.mark.parametrize("kind", MISTAKES)
def test_same_mistake_same_exception_everywhere(kind):
  pytest.importorskip("flax")  # the layers are among the places checked (not in the floor job)
  calls, exc = MISTAKES[kind]
  for where, call in calls().items():
    with pytest.raises(exc) as info:
      call()
    assert info.type is exc, (where, info.value)  # not a subclass from deeper down
    # Keys are `module.Layer[.argument]` for layers, `function[.argument]` otherwise.
    parts = where.split(".")
    fn = parts[1] if parts[0] in ("linen", "nnx") else parts[0]
    assert str(info.value).startswith(f"{fn}: "), (where, str(info.value))
