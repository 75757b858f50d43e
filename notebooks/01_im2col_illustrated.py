# %% [markdown]
# # 01 · 2-D convolution as one matrix multiplication (im2col), illustrated
#
# This notebook walks through *An Illustrated Explanation of Performing 2D Convolutions Using Matrix
# Multiplications* (the first article in `shared/seeds/`) and computes every step with **convmm**:
#
# 1. the 4x4 single-channel image and the 2x2 kernel: the nine patches, the 4x9 patch matrix **P**,
#    the flattened kernel **K**, the product **KP** and the 3x3 result;
# 2. the 3-channel, two-filter example: the 12x9 **P**, the 2x12 **K**, the 2x9 product and the
#    3x3x2 result;
# 3. the output-size formula;
# 4. the 1-D appendix example (stride 2).
#
# `convmm.im2col` is `lax.conv_general_dilated_patches` built from data movement only, and
# `convmm.conv_general_dilated` is im2col followed by one GEMM. Every result below is asserted
# against `jax.lax.conv_general_dilated` at `precision=HIGHEST`, and against the numbers the article
# prints. The article uses PyTorch's channel-first layout (`NCHW` input, `OIHW` kernel), which is
# also lax's default, so the arrays below are written exactly as the article writes them.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax import lax
from matplotlib.patches import Rectangle

import convmm

HIGHEST = lax.Precision.HIGHEST
jax.config.update("jax_platforms", "cpu")
np.set_printoptions(linewidth=120)


def show_matrix(ax, matrix, title, fmt="{:g}", cmap="viridis"):
  """A heat map of a small matrix with every entry written on it."""
  matrix = np.asarray(matrix)
  image = ax.imshow(matrix, cmap=cmap)
  for (row, col), value in np.ndenumerate(matrix):
    shade = image.norm(value)  # dark text on the bright end of the colour map
    ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=7,
            color="k" if shade > 0.6 else "w")
  ax.set_title(title, fontsize=9)
  ax.set_xticks(range(matrix.shape[1]))
  ax.set_yticks(range(matrix.shape[0]))
  ax.tick_params(labelsize=7)


print("jax", jax.__version__, "| devices:", jax.devices())

# %% [markdown]
# ## 1. The small example: a 4x4 image and a 2x2 kernel
#
# Padding 0, stride 1, no bias, one output channel, weights `W = [[1, 2], [3, 4]]`.

# %%
X = jnp.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # (N, C, H, W)
W = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)  # (O, I, kh, kw)
print(X[0, 0])

# %% [markdown]
# ### The nine 2x2 patches
#
# `convmm.im2col` returns, for every output position, the receptive field of that position flattened
# (input channel major, then the kernel's spatial positions in row-major order), exactly like
# `lax.conv_general_dilated_patches`. For one image and one channel that is the article's **P**:
# column *i* is patch *i*.

# %%
patches = convmm.im2col(X, filter_shape=(2, 2), window_strides=(1, 1), padding="VALID")
print("im2col output shape (N, C*kh*kw, out_h, out_w):", patches.shape)
P = patches.reshape(4, 9)  # rows: the 4 taps of a patch; columns: the 9 output positions
print(P)

# The patch matrix the article builds by hand, and lax's own patch extractor.
P_article = np.array([
  [1, 2, 3, 5, 6, 7, 9, 10, 11],
  [2, 3, 4, 6, 7, 8, 10, 11, 12],
  [5, 6, 7, 9, 10, 11, 13, 14, 15],
  [6, 7, 8, 10, 11, 12, 14, 15, 16],
], dtype=np.float32)
np.testing.assert_array_equal(P, P_article)
np.testing.assert_array_equal(patches, lax.conv_general_dilated_patches(X, (2, 2), (1, 1), "VALID"))

# %% [markdown]
# The picture below is drawn *from P*: panel *i* highlights the pixels whose values appear in
# column *i* of the patch matrix convmm computed (the pixel values 1..16 are all distinct).

# %%
fig, axes = plt.subplots(3, 3, figsize=(6.5, 6.5))
image = np.asarray(X[0, 0])
colors = plt.cm.tab10(np.arange(9))
for i, ax in enumerate(axes.flat):
  ax.imshow(np.zeros_like(image), cmap="Greys", vmin=0, vmax=1)
  in_patch = np.isin(image, np.asarray(P[:, i]))
  for (row, col), value in np.ndenumerate(image):
    if in_patch[row, col]:
      ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, color=colors[i], alpha=0.8))
    ax.text(col, row, f"{value:g}", ha="center", va="center", fontsize=9)
  rows, cols = np.nonzero(in_patch)
  assert in_patch.sum() == 4 and np.ptp(rows) == 1 and np.ptp(cols) == 1  # a 2x2 block
  ax.set_title(f"patch {i + 1} = column {i + 1} of P", fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])
fig.suptitle("The nine 2x2 patches of the 4x4 image (from convmm.im2col)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### K, KP and the 3x3 result
#
# The kernel flattened in the same order as a patch is the 1x4 row **K**. One matrix product gives
# all nine outputs at once; reshaping the 1x9 row gives the 3x3 feature map.

# %%
K = W.reshape(1, 4)
KP = K @ P
result = KP.reshape(3, 3)
print("K  =", K)
print("KP =", KP)
print("reshaped to 3x3:\n", result)

# The article's first patch: 1*1 + 2*2 + 5*3 + 6*4 = 44.
assert KP[0, 0] == 1 * 1 + 2 * 2 + 5 * 3 + 6 * 4 == 44
reference = lax.conv_general_dilated(X, W, (1, 1), "VALID", precision=HIGHEST)
np.testing.assert_array_equal(result, reference[0, 0])
# convmm.conv_general_dilated does exactly im2col + GEMM and agrees with lax too.
ours = convmm.conv_general_dilated(X, W, (1, 1), "VALID", precision=HIGHEST, method="im2col")
np.testing.assert_array_equal(ours, reference)
print("convmm == K @ P == lax.conv_general_dilated:", ours.shape)

# %%
fig, axes = plt.subplots(1, 4, figsize=(11, 2.6), gridspec_kw={"width_ratios": [1.1, 9, 9, 3]})
show_matrix(axes[0], K.T, "K (as a column)")
show_matrix(axes[1], P, "P = im2col(X), 4x9")
show_matrix(axes[2], KP, "KP, 1x9")
show_matrix(axes[3], result, "KP reshaped, 3x3")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The bigger example: 3 input channels, 2 filters
#
# The input is a 3-channel 4x4 image with values 1..48 (channel 1 holds 1..16, channel 2 17..32,
# channel 3 33..48: that is what the article's printed **P** shows). Each of the two filters has a
# 2x2 kernel per input channel, 24 weights in all, set to 1..24.
#
# **Layout note.** The article says W "must have shape (2, 2, 2, 3) i.e. (output filters, kernel
# height, kernel width, input image's channels)", but its **K** (row *i* = filter *i*'s channel 1, 2
# and 3 kernels one after the other, `[1, ..., 12]` and `[13, ..., 24]`) and its printed products
# follow from PyTorch's weight layout **(output, input channel, kh, kw) = (2, 3, 2, 2)**, i.e.
# `W = arange(1, 25).reshape(2, 3, 2, 2)`. The cell after the checks shows that the layout the text
# names would give different numbers.

# %%
X3 = jnp.arange(1.0, 49.0).reshape(1, 3, 4, 4)  # (N, C, H, W)
W3 = jnp.arange(1.0, 25.0).reshape(2, 3, 2, 2)  # (O, I, kh, kw)

P3 = convmm.im2col(X3, (2, 2), (1, 1), "VALID").reshape(12, 9)
K3 = W3.reshape(2, 12)
KP3 = K3 @ P3
result3 = KP3.reshape(2, 3, 3)  # (C_out, H, W); the article prints it channel-last as 3x3x2
print("P (12x9):\n", P3)
print("K (2x12):\n", K3)
print("KP (2x9):\n", KP3)

P3_article = np.array([
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
], dtype=np.float32)
KP3_article = np.array([
  [2060, 2138, 2216, 2372, 2450, 2528, 2684, 2762, 2840],
  [4868, 5090, 5312, 5756, 5978, 6200, 6644, 6866, 7088],
], dtype=np.float32)
np.testing.assert_array_equal(P3, P3_article)
np.testing.assert_array_equal(K3, np.arange(1, 25).reshape(2, 12))
np.testing.assert_array_equal(KP3, KP3_article)

reference3 = lax.conv_general_dilated(X3, W3, (1, 1), "VALID", precision=HIGHEST)
ours3 = convmm.conv_general_dilated(X3, W3, (1, 1), "VALID", precision=HIGHEST, method="im2col")
np.testing.assert_array_equal(ours3[0], result3)
np.testing.assert_array_equal(ours3, reference3)
print("result, channel last (3x3x2), as the article prints it:\n", jnp.moveaxis(result3, 0, -1))

# %%
W3_as_named = jnp.arange(1.0, 25.0).reshape(2, 2, 2, 3)  # (O, kh, kw, I), as the text names it
named = convmm.conv_general_dilated(X3, W3_as_named, (1, 1), "VALID", precision=HIGHEST,
                                    dimension_numbers=("NCHW", "OHWI", "NCHW"))
np.testing.assert_array_equal(
  named, lax.conv_general_dilated(X3, W3_as_named, (1, 1), "VALID", precision=HIGHEST,
                                  dimension_numbers=("NCHW", "OHWI", "NCHW")))
print("with W = arange(1, 25).reshape(2, 2, 2, 3) read as (O, kh, kw, I):", named[0, :, 0, 0])
assert not np.array_equal(named[0].reshape(2, 9), KP3_article)

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), gridspec_kw={"width_ratios": [9, 12, 9]})
show_matrix(axes[0], P3, "P = im2col(X), 12x9\n(channel 1, 2, 3 taps stacked)", cmap="magma")
show_matrix(axes[1], K3, "K = W.reshape(2, 12)", cmap="magma")
show_matrix(axes[2], KP3, "KP, 2x9", cmap="magma", fmt="{:.0f}")
for row in (3.5, 7.5):
  axes[0].axhline(row, color="w", lw=2)
for col in (3.5, 7.5):
  axes[1].axvline(col, color="w", lw=2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The output-size formula
#
# For each spatial dimension, `out = (in - kernel + 2 * padding) / stride + 1` (rounded down when
# the stride does not divide). For the examples above: `(4 - 2 + 2*0) / 1 + 1 = 3`. The cell
# below checks the formula against the shapes convmm and lax produce for a few sizes, paddings and
# strides.

# %%
def output_size(size, kernel, padding, stride):
  return (size - kernel + 2 * padding) // stride + 1


assert output_size(4, 2, 0, 1) == 3
key = jax.random.key(0)
for size, kernel, padding, stride in [(4, 2, 0, 1), (7, 3, 1, 2), (8, 3, 0, 2), (12, 4, 0, 2),
                                      (9, 5, 2, 3), (5, 1, 0, 1)]:
  x = jax.random.normal(key, (1, 1, size, size))
  w = jax.random.normal(key, (1, 1, kernel, kernel))
  pads = [(padding, padding)] * 2
  y = convmm.conv_general_dilated(x, w, (stride, stride), pads, precision=HIGHEST)
  y_lax = lax.conv_general_dilated(x, w, (stride, stride), pads, precision=HIGHEST)
  np.testing.assert_allclose(y, y_lax, rtol=1e-5, atol=1e-5)
  expected = output_size(size, kernel, padding, stride)
  assert y.shape[2:] == (expected, expected), (y.shape, expected)
  print(f"in={size:2d} kernel={kernel} padding={padding} stride={stride} -> out={expected}")

# %% [markdown]
# ## 4. The appendix: a 1-D convolution with stride 2
#
# The article's input is "a 3 channel 12-dimensional vector", the kernel is 1x4 with 2 output
# channels, stride 2, padding 0, and W has shape (2, 3, 1, 4) (a PyTorch `Conv2d` with a 1x4
# kernel) holding 1..24; **P** is 12x5 and **K** is 2x12.
#
# **What the article's text shows is incomplete.** It prints only *two* input rows,
# `[1..12]` and `[13..24]`, and only *eight* of the twelve rows of **P**, starting at
# `[13, 15, 17, 19, 21]` and ending at `[28, 30, 32, 34, 36]`. Values up to 36 in **P** mean the
# input has a third channel `[25..36]`; the missing four rows of **P** are channel 1's patches
# (`[1, 3, 5, 7, 9]` ... `[4, 6, 8, 10, 12]`). The only reading consistent with every shape the
# article states (3 channels, P 12x5, K 2x12) *and* with its result `[1530, ..., 2154]`,
# `[3618, ..., 5394]` is: **input = `arange(1, 37).reshape(3, 12)`**. The cells below compute it
# with a true 1-D convolution (layout `NCH`, kernel `OIH`) and with the article's 2-D formulation,
# and show that either truncated reading gives other numbers.

# %%
X1 = jnp.arange(1.0, 37.0).reshape(1, 3, 12)  # (N, C, L): three channels 1..12, 13..24, 25..36
W1 = jnp.arange(1.0, 25.0).reshape(2, 3, 4)  # (O, I, k)

P1 = convmm.im2col(X1, (4,), (2,), "VALID").reshape(12, 5)
K1 = W1.reshape(2, 12)
KP1 = K1 @ P1
print("P (12x5):\n", P1)
print("KP (2x5):\n", KP1)

P1_article_rows_5_to_12 = np.array([
  [13, 15, 17, 19, 21], [14, 16, 18, 20, 22], [15, 17, 19, 21, 23], [16, 18, 20, 22, 24],
  [25, 27, 29, 31, 33], [26, 28, 30, 32, 34], [27, 29, 31, 33, 35], [28, 30, 32, 34, 36],
], dtype=np.float32)
KP1_article = np.array([[1530, 1686, 1842, 1998, 2154], [3618, 4062, 4506, 4950, 5394]],
                       dtype=np.float32)
np.testing.assert_array_equal(P1[4:], P1_article_rows_5_to_12)
np.testing.assert_array_equal(KP1, KP1_article)

reference1 = lax.conv_general_dilated(X1, W1, (2,), "VALID", precision=HIGHEST)
ours1 = convmm.conv_general_dilated(X1, W1, (2,), "VALID", precision=HIGHEST, method="im2col")
np.testing.assert_array_equal(ours1, reference1)
np.testing.assert_array_equal(ours1[0], KP1)
assert ours1.shape == (1, 2, 5)  # the article's (2, 1, 5) result with a 1x5 "image" per channel

# The article's own formulation: a 2-D convolution with a 1x4 kernel on a 1x12 "image".
ours1_2d = convmm.conv_general_dilated(X1[:, :, None, :], W1[:, :, None, :], (1, 2), "VALID",
                                       precision=HIGHEST)
np.testing.assert_array_equal(ours1_2d[:, :, 0, :], ours1)
print("1-D and 2-D (1x4 kernel) formulations agree; result shape (N, C_out, 1, 5):", ours1_2d.shape)

# %%
# Reading the text literally gives other numbers: (a) only the two printed input rows, with each
# filter's first 8 weights; (b) only the printed rows of P (channels 2 and 3), with K's columns
# 5..12.
X1_two, W1_two = X1[:, :2], W1[:, :2]
two_printed_rows = convmm.conv_general_dilated(X1_two, W1_two, (2,), "VALID", precision=HIGHEST)
printed_rows_of_P = K1[:, 4:] @ P1[4:]
np.testing.assert_array_equal(
  two_printed_rows, lax.conv_general_dilated(X1_two, W1_two, (2,), "VALID", precision=HIGHEST))
print("(a) channels [1..12], [13..24] only:", two_printed_rows[0, 0])
print("(b) printed rows of P only:         ", printed_rows_of_P[0])
print("all three channels (the article):   ", ours1[0, 0])
assert not np.array_equal(two_printed_rows[0], KP1_article)
assert not np.array_equal(printed_rows_of_P, KP1_article)

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 4), gridspec_kw={"width_ratios": [5, 12, 5]})
show_matrix(axes[0], P1, "P, 12x5 (rows 1-4: channel 1,\nnot printed in the article)",
            cmap="cividis")
axes[0].add_patch(Rectangle((-0.5, -0.5), 5, 4, fill=False, ec="r", lw=2))
show_matrix(axes[1], K1, "K = W.reshape(2, 12)", cmap="cividis")
show_matrix(axes[2], KP1, "KP, 2x5", cmap="cividis", fmt="{:.0f}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# - `convmm.im2col` produces the article's patch matrices bit for bit (and equals
#   `lax.conv_general_dilated_patches`); `K @ P` reshaped is the convolution, and
#   `convmm.conv_general_dilated` (im2col + one GEMM) equals `lax.conv_general_dilated` in every
#   example.
# - The article's printed numbers check out, with two readings made explicit: in the bigger example
#   W is laid out (output, input channel, kh, kw) = (2, 3, 2, 2), not (2, 2, 2, 3) as the text says;
#   in the appendix the input has a third channel `[25..36]` that the text does not print (nor the
#   first four rows of P).
