"""operator_norm and circular_singular_values against dense SVDs of lax-built matrices."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tolerances import assert_close

import convmm

HIGHEST = lax.Precision.HIGHEST
# operator_norm promises 1e-3 relative accuracy with its default num_iters.
NORM_RTOL = 1e-3


def reference_matrix(rhs, lhs_shape, **conv_args):
  """The matrix of lax's conv: its Jacobian in the input (exact, the map is linear)."""

  def conv(x):
    return lax.conv_general_dilated(x, rhs, precision=HIGHEST, **conv_args).ravel()

  jacobian = jax.jacfwd(conv, holomorphic=jnp.iscomplexobj(rhs))
  jac = jax.jit(jacobian)(jnp.zeros(lhs_shape, rhs.dtype))
  return jac.reshape(jac.shape[0], math.prod(lhs_shape))


def _normal(shape, seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if np.issubdtype(dtype, np.complexfloating):
    x = x + 1j * rng.standard_normal(shape)
  return jnp.asarray(x.astype(dtype))


def _case(
  lhs_shape,
  rhs_shape,
  strides,
  padding,
  lhs_dil=None,
  rhs_dil=None,
  dnums=None,
  groups=1,
  dtype=np.float32,
):
  return dict(
    lhs_shape=lhs_shape,
    rhs_shape=rhs_shape,
    dtype=dtype,
    args=dict(
      window_strides=strides,
      padding=padding,
      lhs_dilation=lhs_dil,
      rhs_dilation=rhs_dil,
      dimension_numbers=dnums,
      feature_group_count=groups,
    ),
  )


# Inputs of more than num_iters elements, so the Krylov space is a proper subspace.
NORM_CASES = {
  "1d-stride2-rhs-dil": _case((1, 2, 40), (3, 2, 3), (2,), ((2, 1),), rhs_dil=(2,)),
  "2d-batch2-same": _case((2, 3, 8, 8), (4, 3, 3, 3), (1, 1), "SAME"),
  "2d-nhwc-groups-lhs-dil": _case(
    (1, 6, 5, 4),
    (2, 2, 2, 4),
    (1, 1),
    ((1, 1), (0, 1)),
    lhs_dil=(2, 1),
    dnums=("NHWC", "HWIO", "NHWC"),
    groups=2,
  ),
  "2d-depthwise-stride2": _case((1, 3, 9, 9), (6, 1, 3, 3), (2, 2), "SAME", groups=3),
  "2d-batch-not-first": _case(
    (6, 3, 5, 2), (3, 4, 3, 2), (1, 1), "VALID", dnums=("HNWC", "OWHI", "CWNH")
  ),
  "3d-strides": _case((1, 2, 4, 5, 4), (3, 2, 2, 2, 2), (1, 2, 1), "VALID"),
  "1d-complex": _case((1, 2, 48), (2, 2, 4), (1,), "SAME", dtype=np.complex64),
}


@pytest.mark.parametrize("case", list(NORM_CASES.values()), ids=list(NORM_CASES))
def test_operator_norm_matches_the_largest_singular_value(case):
  rhs = _normal(case["rhs_shape"], 0, case["dtype"])
  exact = np.linalg.norm(
    np.asarray(reference_matrix(rhs, case["lhs_shape"], **case["args"]), np.complex128), 2
  )
  sigma = convmm.operator_norm(rhs, case["lhs_shape"], **case["args"])
  assert sigma.dtype == np.float32 and sigma.shape == ()
  np.testing.assert_allclose(sigma, exact, rtol=NORM_RTOL)
  # |A v| for a unit v never exceeds the norm (up to float32 rounding).
  assert sigma <= exact * (1 + 1e-5)


def test_operator_norm_on_a_typical_layer():
  """3x3 conv, 4 -> 8 features, 16x16 input: the setting the default num_iters is for."""
  rhs = _normal((3, 3, 4, 8), 1) / 6
  args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  exact = np.linalg.norm(np.asarray(reference_matrix(rhs, (1, 16, 16, 4), **args), np.float64), 2)
  norm = jax.jit(lambda w, key: convmm.operator_norm(w, (1, 16, 16, 4), **args, key=key))
  for seed in (0, 1):
    np.testing.assert_allclose(norm(rhs, jax.random.key(seed)), exact, rtol=NORM_RTOL)
  # Three iterations are not enough, and still a lower bound.
  rough = convmm.operator_norm(rhs, (1, 16, 16, 4), **args, num_iters=3)
  assert 0.5 * exact < rough < exact * (1 - NORM_RTOL)


def test_operator_norm_gradient_is_that_of_the_largest_singular_value():
  lhs_shape, args = (1, 2, 5, 5), dict(window_strides=(2, 1), padding="SAME")
  rhs = _normal((3, 2, 3, 3), 2)

  def exact(w):
    return jnp.linalg.svd(reference_matrix(w, lhs_shape, **args), compute_uv=False)[0]

  def ours(w):
    return convmm.operator_norm(w, lhs_shape, **args)

  expected = jax.grad(exact)(rhs)
  assert_close(ours(rhs), exact(rhs), reduction=18, grad=True)
  assert_close(jax.grad(ours)(rhs), expected, reduction=18, grad=True)
  assert_close(jax.jit(jax.grad(ours))(rhs), expected, reduction=18, grad=True)


def test_operator_norm_when_the_input_space_is_smaller_than_num_iters():
  # The matrix [[1, 2, 0], [0, 1, 2]]: M M^T = [[5, 2], [2, 5]], eigenvalues 7 and 3.
  rhs = jnp.array([[[1.0, 2.0]]])
  sigma = convmm.operator_norm(rhs, (1, 1, 3), (1,), "VALID")
  np.testing.assert_allclose(sigma, np.sqrt(7.0), rtol=1e-6)
  assert convmm.operator_norm(rhs, (1, 1, 1), (1,), "VALID") == 0  # empty output
  assert convmm.operator_norm(rhs, (0, 1, 3), (1,), "VALID") == 0  # empty batch


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(num_iters=0), ValueError, r"`num_iters` must be >= 1, got num_iters=0"),
    (dict(num_iters=2.5), ValueError, r"`num_iters` must be a positive int"),
    (dict(num_iters=True), ValueError, r"`num_iters` must be a positive int"),
    (dict(rhs="kernel"), TypeError, r"`rhs` must be an array, got str"),
    (dict(rhs=[[["a", "b"]]]), TypeError, r"`rhs` must be a numeric array, got dtype=<U1"),
    (dict(lhs_shape="NCH"), TypeError, r"`lhs_shape` must be a sequence of ints"),
    (dict(window_strides=(0,)), ValueError, r"`window_strides` entries must be >= 1"),
    (dict(feature_group_count=2), ValueError, r"lhs feature size 2 divided by"),
  ],
  ids=[
    "num-iters-zero",
    "num-iters-float",
    "num-iters-bool",
    "rhs-string",
    "rhs-strings",
    "lhs-shape-str",
    "stride",
    "groups",
  ],
)
def test_operator_norm_bad_arguments(kwargs, error, match):
  args = dict(rhs=jnp.ones((2, 2, 3)), lhs_shape=(1, 2, 6), window_strides=(1,), padding="VALID")
  args.update(kwargs)
  with pytest.raises(error, match=rf"operator_norm: {match}"):
    convmm.operator_norm(**args)


def circular_matrix(kernel, spatial_shape):
  """Matrix of the Flax-layout conv on a periodic input, from lax on a wrap-padded input."""
  nsp = len(spatial_shape)
  letters = "DHW"[3 - nsp :]
  dnums = ("N" + letters + "C", letters + "IO", "N" + letters + "C")
  c_in = kernel.shape[-2]

  def conv(x):
    wrapped = jnp.pad(
      x, [(0, 0)] + [(0, k - 1) for k in kernel.shape[:nsp]] + [(0, 0)], mode="wrap"
    )
    return lax.conv_general_dilated(
      wrapped, kernel, (1,) * nsp, "VALID", dimension_numbers=dnums, precision=HIGHEST
    ).ravel()

  jacobian = jax.jacfwd(conv, holomorphic=jnp.iscomplexobj(kernel))
  jac = jax.jit(jacobian)(jnp.zeros((1, *spatial_shape, c_in), kernel.dtype))
  return np.asarray(jac.reshape(jac.shape[0], -1))


CIRCULAR_CASES = {
  "1d": ((3, 2, 3), (7,), np.float32),
  "1d-complex": ((4, 2, 2), (6,), np.complex64),
  "2d": ((3, 3, 3, 2), (5, 6), np.float32),
  "2d-even-kernel": ((2, 4, 1, 1), (4, 5), np.float32),
  "2d-kernel-fills-input": ((3, 2, 2, 2), (3, 2), np.float32),
  "2d-1x1": ((1, 1, 1, 3), (4, 4), np.float32),
  "3d": ((2, 2, 2, 2, 2), (3, 4, 3), np.float32),
}


@pytest.mark.parametrize(
  "kernel_shape, spatial_shape, dtype", list(CIRCULAR_CASES.values()), ids=list(CIRCULAR_CASES)
)
def test_circular_singular_values_match_svd_of_the_circular_matrix(
  kernel_shape, spatial_shape, dtype
):
  kernel = _normal(kernel_shape, 3, dtype)
  values = convmm.circular_singular_values(kernel, spatial_shape)
  expected = np.linalg.svd(
    circular_matrix(kernel, spatial_shape).astype(np.complex128), compute_uv=False
  )
  assert values.shape == (math.prod(spatial_shape) * min(kernel_shape[-2:]),)
  assert values.dtype == np.float32
  assert np.all(np.diff(np.asarray(values)) <= 0)
  assert_close(values, expected.astype(np.float32), reduction=math.prod(kernel_shape))


def test_circular_singular_values_under_jit_and_grad():
  kernel = _normal((3, 3, 2, 2), 4)
  values = jax.jit(convmm.circular_singular_values, static_argnums=1)(kernel, (5, 5))
  assert_close(values, convmm.circular_singular_values(kernel, (5, 5)))

  # The sum of all singular values is the nuclear norm of the circular matrix.
  def nuclear(w):
    return jnp.sum(jnp.linalg.svd(jnp.asarray(circular_matrix_jnp(w, (5, 5))), compute_uv=False))

  grad = jax.grad(lambda w: jnp.sum(convmm.circular_singular_values(w, (5, 5))))(kernel)
  assert_close(grad, jax.grad(nuclear)(kernel), reduction=18, grad=True)


def circular_matrix_jnp(kernel, spatial_shape):
  """Like :func:`circular_matrix`, traceable in ``kernel`` (for gradients)."""

  def conv(x):
    wrapped = jnp.pad(
      x, [(0, 0), (0, kernel.shape[0] - 1), (0, kernel.shape[1] - 1), (0, 0)], mode="wrap"
    )
    return lax.conv_general_dilated(
      wrapped,
      kernel,
      (1, 1),
      "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=HIGHEST,
    ).ravel()

  jac = jax.jacfwd(conv)(jnp.zeros((1, *spatial_shape, kernel.shape[-2]), kernel.dtype))
  return jac.reshape(jac.shape[0], -1)


@pytest.mark.parametrize(
  "kernel, spatial_shape, error, match",
  [
    (
      np.ones((3, 2), np.float32),
      (4,),
      ValueError,
      r"`kernel` must have rank >= 3, \(\*kernel_size, C_in, C_out\), "
      r"got kernel.shape=\(3, 2\)",
    ),
    (
      np.ones((3, 3, 2, 2), np.float32),
      (8,),
      ValueError,
      r"`spatial_shape` must have one entry per kernel spatial axis \(2 for "
      r"kernel.shape=\(3, 3, 2, 2\)\), got spatial_shape=\(8,\)",
    ),
    (
      np.ones((3, 5, 2, 2), np.float32),
      (8, 4),
      ValueError,
      r"the kernel size \(3, 5\) must not exceed the circular input `spatial_shape`=\(8, 4\)",
    ),
    (np.ones((3, 2, 2), np.float32), (0,), ValueError, r"`spatial_shape` entries must be >= 1"),
    (np.ones((3, 2, 2), np.float32), 8, TypeError, r"`spatial_shape` must be a sequence"),
    (np.ones((3, 2, 2), np.float32), (8.0,), TypeError, r"`spatial_shape` must contain ints"),
    ("kernel", (8,), TypeError, r"`kernel` must be an array, got str"),
    ([[["a"]]], (8,), TypeError, r"`kernel` must be a numeric array, got dtype=<U1"),
  ],
  ids=[
    "kernel-rank",
    "spatial-rank",
    "kernel-larger",
    "spatial-zero",
    "spatial-int",
    "spatial-float",
    "kernel-string",
    "kernel-strings",
  ],
)
def test_circular_singular_values_bad_arguments(kernel, spatial_shape, error, match):
  with pytest.raises(error, match=rf"circular_singular_values: {match}"):
    convmm.circular_singular_values(kernel, spatial_shape)
