"""convolve / correlate against scipy.signal (an independent reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from jax import lax
from tolerances import assert_close

import convmm

MODES = ("full", "same", "valid")
FUNCTIONS = {
  "convolve": (convmm.convolve, scipy.signal.convolve),
  "correlate": (convmm.correlate, scipy.signal.correlate),
}

# (in1.shape, in2.shape): in1 larger, in2 larger in every dim (SciPy swaps them for
# 'valid'; 'same' keeps in1's shape), and neither larger (no 'valid' result).
SHAPES = {
  "1d": ((7,), (3,)),
  "1d-in2-larger": ((4,), (6,)),
  "1d-even-kernel": ((6,), (4,)),
  "2d": ((5, 6), (3, 2)),
  "2d-in2-larger": ((3, 4), (4, 5)),
  "2d-mixed": ((5, 3), (2, 4)),
  "3d": ((4, 3, 5), (2, 3, 2)),
  "3d-in2-larger": ((2, 2, 3), (3, 4, 3)),
}
COMPLEX_SHAPES = ["1d-in2-larger", "2d", "3d"]


def _data(shape, seed, dtype):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if np.issubdtype(dtype, np.complexfloating):
    x = x + 1j * rng.standard_normal(shape)
  return x.astype(dtype)


def _compare(name, shapes, dtype):
  ours, reference = FUNCTIONS[name]
  in1, in2 = _data(shapes[0], 0, dtype), _data(shapes[1], 1, dtype)
  for mode in MODES:
    try:
      expected = reference(in1, in2, mode)
    except ValueError:
      with pytest.raises(ValueError, match=rf"{name}: for mode='valid' one input must be"):
        ours(in1, in2, mode)
      continue
    actual = ours(in1, in2, mode)
    assert actual.dtype == expected.dtype, (mode, actual.dtype, expected.dtype)
    # Complex values are compared with the tolerance of their real components.
    assert_close(actual, expected, dtype=np.finfo(dtype).dtype, reduction=in2.size)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_real_matches_scipy_in_every_mode(shapes, name):
  _compare(name, shapes, np.float32)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("shapes", [SHAPES[k] for k in COMPLEX_SHAPES], ids=COMPLEX_SHAPES)
def test_complex_matches_scipy_in_every_mode(shapes, name):
  _compare(name, shapes, np.complex64)


def test_correlate_conjugates_in2():
  in1, in2 = np.array([1.0 + 0j, 0, 0]), np.array([1j, 0])
  # sum_k in1[n + k] conj(in2[k]) with the full offset: in2 has length 2.
  np.testing.assert_array_equal(
    convmm.correlate(in1, in2.astype(np.complex64)), np.array([0, -1j, 0, 0], np.complex64)
  )
  assert_close(convmm.correlate(in1, in2), scipy.signal.correlate(in1, in2), dtype=np.float32)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_integers_and_booleans_are_exact(name):
  ours, reference = FUNCTIONS[name]
  rng = np.random.default_rng(7)
  in1, in2 = rng.integers(-9, 9, (6, 5)).astype(np.int32), rng.integers(-9, 9, (3, 2))
  in2 = in2.astype(np.int32)
  for mode in MODES:
    actual = ours(in1, in2, mode)
    assert actual.dtype == np.int32
    np.testing.assert_array_equal(actual, reference(in1, in2, mode))
  bits1, bits2 = rng.random(9) < 0.4, rng.random(4) < 0.5
  np.testing.assert_array_equal(ours(bits1, bits2), reference(bits1, bits2))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_scalars_multiply(name):
  ours, reference = FUNCTIONS[name]
  np.testing.assert_allclose(ours(2 + 1j, 3 + 2j), reference(np.array(2 + 1j), np.array(3 + 2j)))


def test_deep_learning_convolution_is_correlation_and_convolution_mirrors():
  image = _data((6, 5), 3, np.float32)
  kernel = _data((3, 2), 4, np.float32)
  layer = lax.conv_general_dilated(
    image[None, None], kernel[None, None], (1, 1), "VALID", precision=lax.Precision.HIGHEST
  )[0, 0]
  assert_close(convmm.correlate(image, kernel, "valid"), layer, reduction=6)
  mirrored = lax.conv_general_dilated(
    image[None, None],
    kernel[None, None, ::-1, ::-1],
    (1, 1),
    "VALID",
    precision=lax.Precision.HIGHEST,
  )[0, 0]
  assert_close(convmm.convolve(image, kernel, "valid"), mirrored, reduction=6)
  assert not np.allclose(convmm.convolve(image, kernel, "valid"), layer, atol=1e-3)


def test_jit_and_grad():
  in1, in2 = _data((5, 4), 5, np.float32), _data((2, 3), 6, np.float32)
  for mode in MODES:
    jitted = jax.jit(convmm.correlate, static_argnames="mode")(in1, in2, mode=mode)
    assert_close(jitted, scipy.signal.correlate(in1, in2, mode), reduction=6)
  # d/d in1 of <convolve(in1, in2), c> is correlate(c, in2) in 'valid' mode.
  cotangent = _data((6, 6), 8, np.float32)
  grad = jax.grad(lambda a: jnp.vdot(convmm.convolve(a, in2), cotangent))(in1)
  assert_close(grad, scipy.signal.correlate(cotangent, in2, "valid"), reduction=6)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize(
  "in1, in2, mode, error, match",
  [
    (
      np.ones(3),
      np.ones(2),
      "circular",
      ValueError,
      r"`mode` must be one of \('full', 'same', 'valid'\), got 'circular'",
    ),
    (np.ones(3), np.ones(2), None, ValueError, r"`mode` must be one of .* got None"),
    (
      np.ones(3),
      np.ones((2, 2)),
      "full",
      ValueError,
      r"`in1` and `in2` must have the same number of dimensions, got in1.shape=\(3,\) "
      r"and in2.shape=\(2, 2\)",
    ),
    (
      np.ones((3, 2)),
      np.ones((2, 3)),
      "valid",
      ValueError,
      r"for mode='valid' one input must be at least as large as the other in every "
      r"dimension, got in1.shape=\(3, 2\) and in2.shape=\(2, 3\)",
    ),
    (
      np.ones((0, 2)),
      np.ones((2, 2)),
      "same",
      ValueError,
      r"`in1` and `in2` must be non-empty, got in1.shape=\(0, 2\)",
    ),
    ("signal", np.ones(2), "full", TypeError, r"`in1` must be an array, got str"),
    (np.ones(2), {"k": 1}, "full", TypeError, r"`in2` must be an array, got dict"),
    (["a", "b"], np.ones(2), "full", TypeError, r"`in1` must be a numeric array, got dtype=<U1"),
  ],
  ids=[
    "unknown-mode",
    "mode-none",
    "rank-mismatch",
    "valid-neither-larger",
    "empty",
    "in1-string",
    "in2-dict",
    "in1-strings",
  ],
)
def test_bad_arguments(name, in1, in2, mode, error, match):
  with pytest.raises(error, match=rf"{name}: {match}"):
    FUNCTIONS[name][0](in1, in2, mode)
