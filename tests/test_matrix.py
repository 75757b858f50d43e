"""conv_matrix against the Jacobian of lax's convolution (an independent reference)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import sparse as jsparse
from tolerances import assert_close

import convmm

HIGHEST = lax.Precision.HIGHEST


def reference_matrix(rhs, lhs_shape, **conv_args):
  """The matrix of lax's conv: its Jacobian in the input (exact, the map is linear)."""

  def conv(x):
    return lax.conv_general_dilated(x, rhs, precision=HIGHEST, **conv_args).ravel()

  jac = jax.jit(jax.jacfwd(conv))(jnp.zeros(lhs_shape, rhs.dtype))
  return jac.reshape(jac.shape[0], math.prod(lhs_shape))


def _case(lhs_shape, rhs_shape, strides, padding, lhs_dil=None, rhs_dil=None, dnums=None, groups=1):
  return dict(
    lhs_shape=lhs_shape,
    rhs_shape=rhs_shape,
    window_strides=strides,
    padding=padding,
    lhs_dilation=lhs_dil,
    rhs_dilation=rhs_dil,
    dimension_numbers=dnums,
    feature_group_count=groups,
  )


CASES = {
  "1d-same-stride2": _case((2, 3, 9), (4, 3, 3), (2,), "SAME"),
  "1d-pairs-rhs-dil": _case((1, 2, 11), (3, 2, 3), (1,), ((2, 1),), rhs_dil=(3,)),
  "1d-nwc-lhs-dil-crop": _case(
    (2, 7, 2), (3, 2, 2), (2,), ((-1, 2),), lhs_dil=(2,), dnums=("NWC", "WIO", "NWC")
  ),
  "2d-valid": _case((1, 1, 5, 4), (2, 1, 3, 2), (1, 1), "VALID"),
  "2d-same-lower-stride": _case((2, 2, 6, 5), (3, 2, 2, 3), (2, 3), "SAME_LOWER"),
  "2d-nhwc-groups-dil": _case(
    (2, 7, 5, 4),
    (3, 3, 2, 6),
    (2, 1),
    ((1, 2), (0, 1)),
    lhs_dil=(1, 2),
    rhs_dil=(2, 1),
    dnums=("NHWC", "HWIO", "NHWC"),
    groups=2,
  ),
  "2d-depthwise": _case((1, 3, 5, 5), (6, 1, 3, 3), (1, 1), "SAME", groups=3),
  "2d-mixed-layouts": _case(
    (3, 4, 2, 2), (3, 2, 2, 2), (1, 2), ((1, 0), (1, 1)), dnums=("HNWC", "OWHI", "CWNH")
  ),
  "2d-kernel-larger-than-input": _case((1, 2, 2, 3), (2, 2, 4, 2), (1, 1), "VALID"),
  "3d-valid-strides": _case((1, 2, 4, 3, 5), (2, 2, 2, 2, 3), (1, 2, 1), "VALID"),
  "3d-ndhwc-same-dil": _case(
    (1, 4, 3, 4, 2),
    (2, 2, 2, 2, 3),
    (1, 1, 2),
    "SAME",
    rhs_dil=(1, 2, 1),
    dnums=("NDHWC", "DHWIO", "NDHWC"),
  ),
}


def _random_cases(count: int, seed: int) -> dict[str, dict]:
  """A seeded sweep over rank, layout, strides, padding forms, dilations and groups."""
  rng = np.random.default_rng(seed)
  cases = {}
  while len(cases) < count:
    nsp = int(rng.integers(1, 4))
    groups = int(rng.choice([1, 1, 2, 3]))
    c_in = groups * int(rng.integers(1, 3))
    c_out = groups * int(rng.integers(1, 3))
    spatial = [int(rng.integers(2, 7 if nsp < 3 else 5)) for _ in range(nsp)]
    kernel = [int(rng.integers(1, 4)) for _ in range(nsp)]
    strides = tuple(int(s) for s in rng.integers(1, 4, nsp))
    rhs_dil = tuple(int(s) for s in rng.integers(1, 3, nsp))
    lhs_dil = tuple(int(s) for s in rng.integers(1, 3, nsp))
    if rng.random() < 0.4:
      padding, lhs_dil = str(rng.choice(["SAME", "VALID", "SAME_LOWER"])), None
    else:
      padding = tuple((int(lo), int(hi)) for lo, hi in rng.integers(-1, 3, (nsp, 2)))
    letters = "DHW"[3 - nsp :]
    if rng.random() < 0.5:
      dnums = ("N" + letters + "C", letters + "IO", "N" + letters + "C")
      lhs_shape = (2, *spatial, c_in)
      rhs_shape = (*kernel, c_in // groups, c_out)
    else:
      dnums = None
      lhs_shape = (2, c_in, *spatial)
      rhs_shape = (c_out, c_in // groups, *kernel)
    case = _case(lhs_shape, rhs_shape, strides, padding, lhs_dil, rhs_dil, dnums, groups)
    try:
      jax.eval_shape(
        lambda x, w, case=case: lax.conv_general_dilated(x, w, **_conv_args(case)),
        jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
        jax.ShapeDtypeStruct(rhs_shape, jnp.float32),
      )
    except (ValueError, TypeError):  # over-cropping pads, which lax rejects too
      continue
    cases[f"random{len(cases)}-{nsp}d"] = case
  return cases


def _conv_args(case):
  return {k: v for k, v in case.items() if k not in ("lhs_shape", "rhs_shape")}


ALL_CASES = {**CASES, **_random_cases(10, seed=4)}


def _normal(shape, seed):
  """Seeded test data (numpy: no per-shape compilation)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _kernel(case, seed=0):
  return _normal(case["rhs_shape"], seed)


@pytest.mark.parametrize("case", list(ALL_CASES.values()), ids=list(ALL_CASES))
def test_dense_and_sparse_equal_jacobian_of_lax_conv(case):
  rhs = _kernel(case)
  args = _conv_args(case)
  expected = reference_matrix(rhs, case["lhs_shape"], **args)
  dense = convmm.conv_matrix(rhs, case["lhs_shape"], **args)
  assert dense.dtype == rhs.dtype
  assert_close(dense, expected)
  matrix = convmm.conv_matrix(rhs, case["lhs_shape"], **args, sparse=True)
  assert isinstance(matrix, jsparse.BCOO) and matrix.shape == dense.shape
  # Summing the entries into a dense array would double any duplicate index.
  from_entries = np.zeros(matrix.shape, np.float32)
  np.add.at(from_entries, tuple(np.asarray(matrix.indices).T), np.asarray(matrix.data))
  np.testing.assert_array_equal(from_entries, dense)
  # Only structural entries: a random kernel has no zero, so they are the nonzeros.
  assert matrix.nse == np.count_nonzero(expected)


ADJOINT_CASES = [
  "1d-nwc-lhs-dil-crop",
  "2d-nhwc-groups-dil",
  "2d-mixed-layouts",
  "3d-ndhwc-same-dil",
]


@pytest.mark.parametrize("case", [CASES[k] for k in ADJOINT_CASES], ids=ADJOINT_CASES)
def test_matvec_is_conv_and_transpose_is_conv_adjoint(case):
  rhs = _kernel(case, seed=1)
  args = _conv_args(case)
  x = _normal(case["lhs_shape"], 2)
  y = lax.conv_general_dilated(x, rhs, precision=HIGHEST, **args)
  cotangent = _normal(y.shape, 3)
  reduction = math.prod(case["rhs_shape"])
  for matrix in (
    convmm.conv_matrix(rhs, case["lhs_shape"], **args),
    convmm.conv_matrix(rhs, case["lhs_shape"], **args, sparse=True),
  ):
    assert_close(matrix @ x.ravel(), y.ravel(), reduction=reduction)
    adjoint = jax.jit(
      lambda ct, w: convmm.conv_adjoint(ct, w, case["lhs_shape"], precision=HIGHEST, **args)
    )(cotangent, rhs)
    assert_close(matrix.T @ cotangent.ravel(), adjoint.ravel(), reduction=reduction)


# The x-Sobel example of "Convolution as a matrix multiplication": a 3x3 kernel on
# a 4x4 image, VALID, is this 4x16 matrix (copied from the article; each row checked
# by hand: output (i, j) reads the flat input indices 4 (i + a) + (j + b)).
SOBEL = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
SOBEL_MATRIX = np.array(
  [
    [1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0, 0, 0, 0, 0],
    [0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0],
    [0, 0, 0, 0, 0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1],
  ],
  np.float32,
)
SOBEL_INPUT = np.array([[1, 0, -1, 1], [1, 2, -2, 0], [1, 1, -1, 1], [0, 1, 1, 0]], np.float32)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_sobel_matrix_of_the_article(sparse):
  matrix = convmm.conv_matrix(SOBEL[None, None], (1, 1, 4, 4), (1, 1), "VALID", sparse=sparse)
  dense = matrix.todense() if sparse else matrix
  np.testing.assert_array_equal(dense, SOBEL_MATRIX)
  # The article prints (122, 148, 126, 134) for this product; by hand it is
  # 1+1+2+4+1+1 = 10, 0-1+4+0+1-1 = 3, 1+2+2+2+0-1 = 6 and 2+0+2-2+1+0 = 3.
  np.testing.assert_array_equal(matrix @ SOBEL_INPUT.ravel(), [10, 3, 6, 3])
  if sparse:
    assert matrix.nse == 4 * 9


def test_jit_and_gradient_in_rhs():
  case = CASES["2d-nhwc-groups-dil"]
  args = _conv_args(case)
  rhs = _kernel(case)
  weights = _normal(reference_matrix(rhs, case["lhs_shape"], **args).shape, 5)

  def loss(w):
    return jnp.sum(convmm.conv_matrix(w, case["lhs_shape"], **args) * weights)

  def loss_sparse(w):
    matrix = convmm.conv_matrix(w, case["lhs_shape"], **args, sparse=True)
    return jnp.sum(matrix.todense() * weights)

  def reference_loss(w):
    return jnp.sum(reference_matrix(w, case["lhs_shape"], **args) * weights)

  expected = jax.grad(reference_loss)(rhs)
  assert_close(jax.jit(loss)(rhs), reference_loss(rhs), reduction=weights.size)
  assert_close(jax.jit(jax.grad(loss))(rhs), expected, reduction=weights.size, grad=True)
  assert_close(jax.jit(jax.grad(loss_sparse))(rhs), expected, reduction=weights.size, grad=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.complex64], ids=["bf16", "c64"])
def test_matrix_keeps_the_kernel_dtype_and_values(dtype):
  rhs = jnp.asarray(
    np.arange(1, 13).reshape(2, 2, 3) * (1 + 1j if dtype == jnp.complex64 else 1), dtype
  )
  matrix = convmm.conv_matrix(rhs, (1, 2, 4), (1,), "VALID")
  assert matrix.dtype == dtype
  # Row for output feature o at position p: kernel[o, c, t] at column c * 4 + p + t.
  expected = np.zeros((4, 8), np.asarray(rhs).dtype)
  for o in range(2):
    for p in range(2):
      for c in range(2):
        expected[o * 2 + p, c * 4 + p : c * 4 + p + 3] = np.asarray(rhs)[o, c]
  np.testing.assert_array_equal(np.asarray(matrix), expected)


def test_empty_output_gives_an_empty_matrix():
  matrix = convmm.conv_matrix(jnp.ones((2, 1, 5)), (1, 1, 3), (1,), "VALID", sparse=True)
  assert matrix.shape == (0, 3) and matrix.nse == 0


def test_dense_limit_suggests_sparse():
  rhs = jnp.ones((4, 3, 3, 3))
  with pytest.raises(
    ValueError,
    match=r"conv_matrix: the dense matrix would have "
    r"4096x3072=12582912 elements.*`max_elements`=1000000.*"
    r"sparse=True",
  ):
    convmm.conv_matrix(rhs, (1, 3, 32, 32), (1, 1), "SAME", max_elements=10**6)
  matrix = convmm.conv_matrix(rhs, (1, 3, 32, 32), (1, 1), "SAME", max_elements=10**6, sparse=True)
  assert matrix.shape == (4096, 3072) and matrix.nse == 4 * 3 * (30 * 30 * 9 + 4 * 30 * 6 + 4 * 4)


def test_index_overflow_is_refused_before_allocation():
  with pytest.raises(ValueError, match=r"conv_matrix: the matrix shape .* does not fit int32"):
    convmm.conv_matrix(jnp.ones((1, 1, 1, 1)), (1, 1, 2**16, 2**16), (1, 1), "VALID", sparse=True)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(rhs="kernel"), TypeError, r"conv_matrix: `rhs` must be an array, got str"),
    (
      dict(rhs=[[["a", "b"]]]),
      TypeError,
      r"conv_matrix: `rhs` must be a numeric array, got dtype=<U1",
    ),
    (dict(rhs=None), TypeError, r"conv_matrix: `rhs` must be an array, got NoneType"),
    (dict(lhs_shape=3), TypeError, r"conv_matrix: `lhs_shape` must be a sequence of ints"),
    (dict(lhs_shape=(1, 1.5, 4)), TypeError, r"conv_matrix: `lhs_shape` must contain.*1.5"),
    (
      dict(lhs_shape=(1, 2, -4)),
      ValueError,
      r"conv_matrix: `lhs_shape` entries must be >= 0"
      r", got lhs_shape=\(1, 2, -4\)",
    ),
    (dict(lhs_shape=(1, 3, 4)), ValueError, r"conv_matrix: lhs feature size 3"),
    (
      dict(feature_group_count=2),
      ValueError,
      r"conv_matrix: lhs feature size 2 divided by `feature_group_count` \(=2\)",
    ),
    (dict(padding="FULL"), ValueError, r"conv_matrix: `padding` must be one of"),
    (
      dict(max_elements=2.5),
      ValueError,
      r"conv_matrix: `max_elements` must be a positive int, got max_elements=2.5",
    ),
  ],
  ids=[
    "rhs-string",
    "rhs-strings",
    "rhs-none",
    "lhs-shape-int",
    "lhs-shape-float",
    "lhs-shape-negative",
    "channel-mismatch",
    "groups",
    "padding",
    "max-elements",
  ],
)
def test_bad_arguments(kwargs, error, match):
  args = dict(rhs=jnp.ones((2, 2, 3)), lhs_shape=(1, 2, 6), window_strides=(1,), padding="VALID")
  args.update(kwargs)
  with pytest.raises(error, match=match):
    convmm.conv_matrix(**args)
