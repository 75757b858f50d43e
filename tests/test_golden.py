"""Golden tests: the worked examples of the two im2col articles in shared/seeds/.

Article 1 ("An Illustrated Explanation of Performing 2D Convolutions Using
Matrix Multiplications") works in PyTorch's channel-first layout: image
(C, H, W), kernel (O, I, kh, kw), patch matrix P of shape (C * kh * kw, L)
with channel-major rows and row-major output positions as columns, result
K @ P. That is exactly the feature order of im2col (lax's patches), so P is
``im2col(x)[0].reshape(C * kh * kw, -1)``.

Every literal below was computed independently (by hand and by the plain
numpy loop ``patch_matrix`` in this file, which the tests also run) and
compared with the article's printed values before being written down.
All values are small integers, exact in float32, so comparisons are exact.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import convmm

HIGHEST = lax.Precision.HIGHEST


def patch_matrix(image, kernel_shape, strides):
  """Plain-loop im2col of a (C, *spatial) image: columns are row-major windows."""
  c, *spatial = image.shape
  out = [(size - k) // s + 1 for size, k, s in zip(spatial, kernel_shape, strides)]
  columns = []
  for position in np.ndindex(*out):
    window = tuple(slice(p * s, p * s + k) for p, s, k in zip(position, strides, kernel_shape))
    columns.append(np.concatenate([image[(ch, *window)].ravel() for ch in range(c)]))
  return np.array(columns).T


def convmm_patch_matrix(image, kernel_shape, strides):
  """convmm's im2col of one channel-first image, as the article's P."""
  patches = convmm.im2col(jnp.asarray(image[None]), kernel_shape, strides, "VALID")
  return np.asarray(patches[0]).reshape(patches.shape[1], -1)


def convmm_conv(image, kernel, strides):
  """convmm's VALID cross-correlation of one channel-first image (NC..., OI...)."""
  return np.asarray(
    convmm.conv_general_dilated(
      jnp.asarray(image[None]), jnp.asarray(kernel), strides, "VALID", precision=HIGHEST
    )[0]
  )


# ----------------------------------------------------- article 1, small example (1 channel)

SMALL_X = np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4)  # one channel, 1..16
SMALL_W = np.array([[[[1, 2], [3, 4]]]], np.float32)  # (O, I, kh, kw) = (1, 1, 2, 2)
# The article shows P and the result only as images; worked out by hand: column
# (i, j) is [x[i, j], x[i, j+1], x[i+1, j], x[i+1, j+1]].
SMALL_P = np.array(
  [
    [1, 2, 3, 5, 6, 7, 9, 10, 11],
    [2, 3, 4, 6, 7, 8, 10, 11, 12],
    [5, 6, 7, 9, 10, 11, 13, 14, 15],
    [6, 7, 8, 10, 11, 12, 14, 15, 16],
  ],
  np.float32,
)
# K = [1, 2, 3, 4]; e.g. the first entry is 1*1 + 2*2 + 3*5 + 4*6 = 44.
SMALL_RESULT = np.array([[44, 54, 64], [84, 94, 104], [124, 134, 144]], np.float32)

# ----------------------------------------------------- article 1, bigger example (3 channels)

BIG_X = np.arange(1, 49, dtype=np.float32).reshape(3, 4, 4)  # channels 1..16, 17..32, 33..48
# The article calls W "(2, 2, 2, 3), i.e. (filters, kh, kw, channels)", but its K rows
# ([1..12] and [13..24]) are each filter's channels concatenated, channel-major: that
# is the PyTorch OIHW kernel arange(1, 25).reshape(2, 3, 2, 2), used here.
BIG_W = np.arange(1, 25, dtype=np.float32).reshape(2, 3, 2, 2)
BIG_P = np.array(
  [  # printed in the article (12 x 9)
    [1, 2, 3, 5, 6, 7, 9, 10, 11],
    [2, 3, 4, 6, 7, 8, 10, 11, 12],
    [5, 6, 7, 9, 10, 11, 13, 14, 15],
    [6, 7, 8, 10, 11, 12, 14, 15, 16],
    [17, 18, 19, 21, 22, 23, 25, 26, 27],
    [18, 19, 20, 22, 23, 24, 26, 27, 28],
    [21, 22, 23, 25, 26, 27, 29, 30, 31],
    [22, 23, 24, 26, 27, 28, 30, 31, 32],
    [33, 34, 35, 37, 38, 39, 41, 42, 43],
    [34, 35, 36, 38, 39, 40, 42, 43, 44],
    [37, 38, 39, 41, 42, 43, 45, 46, 47],
    [38, 39, 40, 42, 43, 44, 46, 47, 48],
  ],
  np.float32,
)
BIG_K = np.array([np.arange(1, 13), np.arange(13, 25)], np.float32)  # printed (2 x 12)
BIG_RESULT = np.array(
  [  # printed K P (2 x 9); first entry 44 + 516 + 1500 = 2060
    [2060, 2138, 2216, 2372, 2450, 2528, 2684, 2762, 2840],
    [4868, 5090, 5312, 5756, 5978, 6200, 6644, 6866, 7088],
  ],
  np.float32,
)

# ------------------------------------------------------- article 1, appendix (1-D, stride 2)

# The appendix's text is garbled: it announces "a 3 channel 12-dimensional vector" but
# prints only two rows (1..12 and 13..24), and its "12 x 5" P shows only 8 rows (those
# of channels 13..24 and 25..36). The consistent reading, which reproduces the printed
# result exactly, is three channels 1..12, 13..24, 25..36 (an image of shape (3, 1, 12)
# in the article's 2-D view), a kernel (2, 3, 1, 4) = arange(1, 25) (its K is printed),
# kernel 1 x 4, stride 2, no padding: (12 - 4) // 2 + 1 = 5 windows.
APPENDIX_X = np.arange(1, 37, dtype=np.float32).reshape(3, 12)
APPENDIX_W = np.arange(1, 25, dtype=np.float32).reshape(2, 3, 4)
APPENDIX_P = np.array(
  [
    [1, 3, 5, 7, 9],  # channel 1..12: these four rows are missing from the article
    [2, 4, 6, 8, 10],
    [3, 5, 7, 9, 11],
    [4, 6, 8, 10, 12],
    [13, 15, 17, 19, 21],  # the rows below are printed
    [14, 16, 18, 20, 22],
    [15, 17, 19, 21, 23],
    [16, 18, 20, 22, 24],
    [25, 27, 29, 31, 33],
    [26, 28, 30, 32, 34],
    [27, 29, 31, 33, 35],
    [28, 30, 32, 34, 36],
  ],
  np.float32,
)
# Printed (2 x 5); first entry 30 + 382 + 1118 = 1530.
APPENDIX_RESULT = np.array(
  [[1530, 1686, 1842, 1998, 2154], [3618, 4062, 4506, 4950, 5394]], np.float32
)


EXAMPLES = {
  "small_4x4_1ch": (SMALL_X, SMALL_W, (1, 1), SMALL_P, SMALL_RESULT.reshape(1, 3, 3)),
  "big_4x4_3ch_2filters": (BIG_X, BIG_W, (1, 1), BIG_P, BIG_RESULT.reshape(2, 3, 3)),
  "appendix_1d_stride2": (APPENDIX_X, APPENDIX_W, (2,), APPENDIX_P, APPENDIX_RESULT),
  "appendix_as_2d_1x4": (
    APPENDIX_X.reshape(3, 1, 12),
    APPENDIX_W.reshape(2, 3, 1, 4),
    (1, 2),
    APPENDIX_P,
    APPENDIX_RESULT.reshape(2, 1, 5),
  ),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_literals_match_plain_loop(name):
  # Guards the hand-written literals themselves, with no convmm involved.
  x, w, strides, p, result = EXAMPLES[name]
  loop_p = patch_matrix(x, w.shape[2:], strides)
  np.testing.assert_array_equal(loop_p, p)
  k = w.reshape(w.shape[0], -1)
  np.testing.assert_array_equal((k @ loop_p).reshape(result.shape), result)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_patch_matrix(name):
  x, w, strides, p, _ = EXAMPLES[name]
  np.testing.assert_array_equal(convmm_patch_matrix(x, w.shape[2:], strides), p)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_convolution_result(name):
  x, w, strides, _, result = EXAMPLES[name]
  np.testing.assert_array_equal(convmm_conv(x, w, strides), result)


def test_big_example_k_is_the_flattened_oihw_kernel():
  np.testing.assert_array_equal(BIG_W.reshape(2, 12), BIG_K)
  np.testing.assert_array_equal(BIG_K @ convmm_patch_matrix(BIG_X, (2, 2), (1, 1)), BIG_RESULT)


def test_big_example_channels_last_layout():
  # The article reshapes K P to "3 x 3 x 2 (channel dimension last)": the NHWC view.
  out = convmm.conv_general_dilated(
    jnp.asarray(BIG_X.transpose(1, 2, 0)[None]),
    jnp.asarray(BIG_W.transpose(2, 3, 1, 0)),
    (1, 1),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=HIGHEST,
  )
  np.testing.assert_array_equal(np.asarray(out[0]), BIG_RESULT.T.reshape(3, 3, 2))


# --------------------------------------------------------------- article 2, Sobel operator

SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
SOBEL_INPUT = np.array([[1, 0, -1, 1], [1, 2, -2, 0], [1, 1, -1, 1], [0, 1, 1, 0]], np.float32)
# The article's 4 x 16 matrix k-hat (the kernel embedded at each window), as printed.
SOBEL_K_HAT = np.array(
  [
    [1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0, 0, 0, 0, 0],
    [0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0],
    [0, 0, 0, 0, 0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1],
  ],
  np.float32,
)
# The article prints k-hat . input = [122, 148, 126, 134], which does not follow from its
# inputs: the outputs are bounded by sum(|k|) * max|input| = 8 * 2 = 16. Worked out by
# hand, the VALID cross-correlation is, e.g. at (0, 0): row 0 gives 1*1 + (-1)*(-1) = 2,
# row 1 gives 2*1 + (-2)*(-2) = 6, row 2 gives 1*1 + (-1)*(-1) = 2, total 10. The article's
# own k-hat times the flattened input gives the same [10, 3, 6, 3].
SOBEL_PRINTED = np.array([122, 148, 126, 134], np.float32)
SOBEL_RESULT = np.array([[10, 3], [6, 3]], np.float32)


def test_sobel_literal_matches_plain_loop_and_article_matrix():
  np.testing.assert_array_equal(
    (SOBEL_X.ravel() @ patch_matrix(SOBEL_INPUT[None], (3, 3), (1, 1))).reshape(2, 2), SOBEL_RESULT
  )
  np.testing.assert_array_equal(SOBEL_K_HAT @ SOBEL_INPUT.ravel(), SOBEL_RESULT.ravel())


def test_sobel_cross_correlation():
  result = convmm_conv(SOBEL_INPUT[None], SOBEL_X[None, None], (1, 1))[0]
  np.testing.assert_array_equal(result, SOBEL_RESULT)
  assert not np.array_equal(result.ravel(), SOBEL_PRINTED)  # the article's misprint


def test_sobel_k_hat_is_the_conv_matrix():
  # Row r of the article's k-hat is the conv's response to the unit image e_r:
  # the matrix of the linear map x -> conv(x) has these rows.
  basis = np.eye(16, dtype=np.float32).reshape(16, 1, 4, 4)
  responses = convmm.conv_general_dilated(
    jnp.asarray(basis), jnp.asarray(SOBEL_X[None, None]), (1, 1), "VALID", precision=HIGHEST
  )
  np.testing.assert_array_equal(np.asarray(responses).reshape(16, 4).T, SOBEL_K_HAT)


def test_sobel_true_convolution_flips_the_kernel():
  # The article's textbook convolution mirrors the kernel on both axes; the Sobel-x
  # kernel is symmetric vertically and antisymmetric horizontally, so the flip negates it.
  flipped = SOBEL_X[::-1, ::-1]
  np.testing.assert_array_equal(flipped, -SOBEL_X)
  result = convmm_conv(SOBEL_INPUT[None], np.ascontiguousarray(flipped)[None, None], (1, 1))[0]
  np.testing.assert_array_equal(result, -SOBEL_RESULT)
