# %% [markdown]
# # 02 · A convolution is one (sparse) matrix; the transposed convolution is its transpose
#
# This notebook reproduces *Convolution as a matrix multiplication* (the second article in
# `shared/seeds/`) with **convmm**:
#
# 1. the x-Sobel kernel on the article's 4x4 input, written as the 4x16 matrix **M** that
#    `convmm.conv_matrix` builds (drawn as a sparsity picture), the product `M @ x` and its 2x2
#    reshape. **The article's printed product, 122, 148, 126, 134, does not follow from its own
#    matrix and input: they give 10, 3, 6, 3** (section 1 proves it three ways);
# 2. cross-correlation (what deep-learning "convolution" computes) versus true convolution (the
#    kernel mirrored), with `convmm.correlate` and `convmm.convolve`. **The article's "mirrored"
#    kernel is the kernel rotated by 90 degrees, not mirrored** (section 2);
# 3. the transposed convolution as the transpose of that matrix: 2x2 up to 4x4 with
#    `convmm.conv_adjoint`, `convmm.conv_transpose` and `M.T` side by side;
# 4. stride and PyTorch's `output_padding`, on a picture.
#
# Every result is asserted against `jax.lax` (`conv_general_dilated`, `conv_transpose`, or the
# autodiff transpose of lax's convolution) at `precision=HIGHEST`.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax import lax
from matplotlib.patches import Rectangle

import convmm

HIGHEST = lax.Precision.HIGHEST
DN = ("NCHW", "OIHW", "NCHW")  # the article's layout, and lax's default
jax.config.update("jax_platforms", "cpu")
np.set_printoptions(linewidth=120)


def show_matrix(ax, matrix, title, fmt="{:g}", cmap="RdBu_r", symmetric=True):
  """A heat map of a small matrix with every entry written on it."""
  matrix = np.asarray(matrix)
  limit = max(np.abs(matrix).max(), 1e-9)
  image = ax.imshow(matrix, cmap=cmap, vmin=-limit if symmetric else None,
                    vmax=limit if symmetric else None)
  for (row, col), value in np.ndenumerate(matrix):
    shade = image.norm(value)  # light text on the dark ends of the colour map
    dark = (shade < 0.2 or shade > 0.8) if symmetric else shade > 0.6
    ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=7,
            color="w" if dark else "k")
  ax.set_title(title, fontsize=9)
  ax.set_xticks(range(matrix.shape[1]))
  ax.set_yticks(range(matrix.shape[0]))
  ax.tick_params(labelsize=6)


def conv_lax(x, kernel, strides=(1, 1), padding="VALID"):
  """The reference: lax's convolution of one single-channel image (H, W) with a (kh, kw) kernel."""
  return lax.conv_general_dilated(x[None, None], kernel[None, None], strides, padding,
                                  dimension_numbers=DN, precision=HIGHEST)[0, 0]


# %% [markdown]
# ## 1. The Sobel kernel on a 4x4 input, as a 4x16 matrix

# %%
sobel_x = jnp.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
x = jnp.array([[1.0, 0.0, -1.0, 1.0], [1.0, 2.0, -2.0, 0.0], [1.0, 1.0, -1.0, 1.0],
               [0.0, 1.0, 1.0, 0.0]])
lhs_shape = (1, 1, 4, 4)  # (N, C, H, W)

M = convmm.conv_matrix(sobel_x[None, None], lhs_shape, (1, 1), "VALID", dimension_numbers=DN)
print("M =", M.shape)
print(M)

# The article's 4x16 matrix, exactly.
M_article = np.array([
  [1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0, 0, 0, 0, 0],
  [0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0, 0, 0, 0],
  [0, 0, 0, 0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1, 0],
  [0, 0, 0, 0, 0, 1, 0, -1, 0, 2, 0, -2, 0, 1, 0, -1],
], dtype=np.float32)
np.testing.assert_array_equal(M, M_article)

# M is the Jacobian of lax's convolution with respect to its (flattened) input.
jacobian = jax.jacfwd(lambda image: conv_lax(image, sobel_x))(x).reshape(4, 16)
np.testing.assert_array_equal(M, jacobian)

# The sparse form stores only the 4 x 9 structural entries, built from im2col's indices.
M_sparse = convmm.conv_matrix(sobel_x[None, None], lhs_shape, (1, 1), "VALID",
                              dimension_numbers=DN, sparse=True)
np.testing.assert_array_equal(M_sparse.todense(), M)
print(f"sparse: {M_sparse.nse} stored entries out of {M.size} "
      f"({int(np.count_nonzero(M))} non-zero: the kernel's zero column is stored too)")
assert M_sparse.nse == 4 * 9

# %% [markdown]
# Each row of **M** is the kernel laid out on the flattened 4x4 grid at one output position; the
# row for the next output position is the same pattern shifted by one column (one step right) or
# by four (one step down).

# %%
fig = plt.figure(figsize=(12, 4.2))
grid = fig.add_gridspec(2, 4, height_ratios=[1.3, 1])
ax = fig.add_subplot(grid[0, :])
show_matrix(ax, M, "M = convmm.conv_matrix(sobel_x, (1, 1, 4, 4), (1, 1), 'VALID'): 4x16")
for col in (3.5, 7.5, 11.5):
  ax.axvline(col, color="k", lw=0.8, ls=":")
for row in range(4):
  ax_row = fig.add_subplot(grid[1, row])
  show_matrix(ax_row, M[row].reshape(4, 4), f"row {row} of M on the 4x4 grid")
  ax_row.add_patch(Rectangle((row % 2 - 0.5, row // 2 - 0.5), 3, 3, fill=False, ec="g", lw=2))
fig.tight_layout()
plt.show()

fig, ax = plt.subplots(figsize=(10, 3))
ax.spy(np.asarray(M_sparse.todense()) != 0, markersize=9)
sparse_rows, sparse_cols = np.asarray(M_sparse.indices).T
ax.plot(sparse_cols, sparse_rows, "o", mfc="none", mec="tab:red", ms=12,
        label="stored in the BCOO form (sparse=True)")
ax.set_title("Sparsity of the 4x16 matrix: filled = non-zero, circled = stored", fontsize=9)
ax.legend(loc="upper left", fontsize=8, bbox_to_anchor=(1.01, 1))
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The product and its 2x2 reshape

# %%
x_flat = x.ravel()
x_flat_article = np.array([1, 0, -1, 1, 1, 2, -2, 0, 1, 1, -1, 1, 0, 1, 1, 0], dtype=np.float32)
np.testing.assert_array_equal(x_flat, x_flat_article)  # the article's flattened input, exactly

product = M @ x_flat
feature_map = product.reshape(2, 2)
print("M @ x =", product, "-> reshaped:\n", feature_map)

np.testing.assert_array_equal(feature_map, conv_lax(x, sobel_x))
np.testing.assert_array_equal(
  feature_map, convmm.conv_general_dilated(x[None, None], sobel_x[None, None], (1, 1), "VALID",
                                           dimension_numbers=DN, precision=HIGHEST)[0, 0])
np.testing.assert_array_equal(M_sparse @ x_flat, product)

# %% [markdown]
# ### The article's printed product is not what its inputs give
#
# The article prints `k̂ · input = [122, 148, 126, 134]`. Its own 4x16 matrix (checked entry by entry
# above) times its own flattened input (checked above) is `[10, 3, 6, 3]`:
#
# * convmm's matrix, convmm's convolution and lax's convolution all give `[10, 3, 6, 3]`;
# * the article's two printed arrays multiplied by plain numpy give the same;
# * no 3x3 window of this input can give 122 at all: every output is a sum of 9 products
#   `kernel * input`, so `|output| <= sum|kernel| * max|input| = 8 * 2 = 16`.
#
# Worked by hand, the first output is the top-left 3x3 window times the kernel, element by element:
# `(1*1 + 0*0 + (-1)*(-1)) + 2*(1*1 + 0*2 + (-1)*(-2)) + (1*1 + 0*1 + (-1)*(-1)) = 2 + 6 + 2 = 10`.

# %%
article_printed = np.array([122, 148, 126, 134], dtype=np.float32)
numpy_product = M_article @ x_flat_article
print("article's matrix @ article's input (numpy):", numpy_product)
print("article prints:                           ", article_printed)
np.testing.assert_array_equal(numpy_product, product)

bound = float(np.abs(sobel_x).sum() * np.abs(x).max())
assert bound == 16 and np.all(np.abs(article_printed) > bound)
window_sums = [float((np.asarray(x)[i:i + 3, j:j + 3] * np.asarray(sobel_x)).sum())
               for i in range(2) for j in range(2)]
assert window_sums == [10, 3, 6, 3], window_sums
print("window by window (numpy):", window_sums, "| bound on |output|:", bound)

# %% [markdown]
# ## 2. Cross-correlation versus true convolution
#
# A deep-learning "convolution" slides the kernel as it is: that is **cross-correlation**,
# `out[i, j] = sum_{a,b} x[i + a, j + b] * k[a, b]`. The textbook convolution mirrors the kernel
# along both axes first (`k[::-1, ::-1]`, a 180 degree rotation). `convmm.correlate` and
# `convmm.convolve` have `scipy.signal`'s semantics and run on convmm's im2col + GEMM.
#
# **The article's mirrored kernel is wrong.** It writes the mirror of
# `[[1, 0, -1], [2, 0, -2], [1, 0, -1]]` as `[[-1, -2, -1], [0, 0, 0], [1, 2, 1]]`, which is the
# kernel rotated by 90 degrees (the y-Sobel kernel, an edge detector for the *other* direction).
# The mirror along both axes is `[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] = -k`: for this antisymmetric
# kernel, true convolution is exactly minus the cross-correlation.

# %%
mirrored = jnp.flip(sobel_x, axis=(0, 1))
article_mirror = jnp.array([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]])
print("k[::-1, ::-1] =\n", mirrored)
np.testing.assert_array_equal(mirrored, -sobel_x)
np.testing.assert_array_equal(article_mirror, jnp.rot90(sobel_x))  # a rotation by 90 degrees
assert not np.array_equal(article_mirror, mirrored)

correlation = convmm.correlate(x, sobel_x, mode="valid")
convolution = convmm.convolve(x, sobel_x, mode="valid")
with_article_mirror = convmm.correlate(x, article_mirror, mode="valid")
print("correlate(x, k)             =", correlation.ravel())
print("convolve(x, k)              =", convolution.ravel())
print("correlate(x, article's 'k') =", with_article_mirror.ravel())

np.testing.assert_array_equal(correlation, conv_lax(x, sobel_x))  # what a conv layer computes
np.testing.assert_array_equal(convolution, conv_lax(x, mirrored))  # true convolution
np.testing.assert_array_equal(convolution, -correlation)
np.testing.assert_array_equal(with_article_mirror, conv_lax(x, article_mirror))
assert not np.array_equal(with_article_mirror, convolution)

# The 'full' mode (every overlap, 6x6) of true convolution, against lax with the mirrored kernel.
full = convmm.convolve(x, sobel_x, mode="full")
np.testing.assert_allclose(full, conv_lax(x, mirrored, padding=[(2, 2), (2, 2)]), atol=1e-6)
print("convolve(x, k, 'full').shape =", full.shape)

# %%
fig, axes = plt.subplots(1, 6, figsize=(13, 2.6),
                         gridspec_kw={"width_ratios": [4, 3, 3, 3, 2, 2]})
show_matrix(axes[0], x, "input x")
show_matrix(axes[1], sobel_x, "kernel k (x-Sobel)")
show_matrix(axes[2], mirrored, "k mirrored = -k")
show_matrix(axes[3], article_mirror, "article's 'mirror'\n= rot90(k)")
show_matrix(axes[4], correlation, "correlate(x, k)\n(a conv layer)")
show_matrix(axes[5], convolution, "convolve(x, k)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The transposed convolution is the transpose of M
#
# **M** maps 16 numbers to 4; **M.T** maps 4 back to 16, from 2x2 up to 4x4. That is the
# transposed convolution ("deconvolution", "fractionally strided convolution"). It is the
# *adjoint*, not the inverse: `M.T @ (M @ x)` is not `x`. Three ways to compute it, side by side:
#
# * `M.T @ y` with the explicit matrix;
# * `convmm.conv_adjoint(y, k, lhs_shape, ...)`: the exact adjoint of `convmm.conv_general_dilated`
#   for an input of `lhs_shape`, derived by JAX autodiff;
# * `convmm.conv_transpose(y, k, ..., transpose_kernel=True)`: the drop-in for
#   `lax.conv_transpose` (a convolution of the zero-padded y with the mirrored kernel).

# %%
y = feature_map[None, None]  # the 2x2 output of section 1, as (N, C, H, W)
via_matrix = (M.T @ y.ravel()).reshape(4, 4)
via_adjoint = convmm.conv_adjoint(y, sobel_x[None, None], lhs_shape, (1, 1), "VALID",
                                  dimension_numbers=DN, precision=HIGHEST)[0, 0]
via_transpose = convmm.conv_transpose(y, sobel_x[None, None], (1, 1), "VALID",
                                      dimension_numbers=DN, transpose_kernel=True,
                                      precision=HIGHEST)[0, 0]

# References: lax.conv_transpose, and the linear transpose of lax's own convolution.
lax_transpose = lax.conv_transpose(y, sobel_x[None, None], (1, 1), "VALID", dimension_numbers=DN,
                                   transpose_kernel=True, precision=HIGHEST)[0, 0]
(lax_adjoint,) = jax.linear_transpose(lambda image: conv_lax(image, sobel_x), x)(feature_map)
for name, value in [("M.T @ y", via_matrix), ("conv_adjoint", via_adjoint),
                    ("conv_transpose", via_transpose), ("sparse M.T @ y",
                                                        (M_sparse.T @ y.ravel()).reshape(4, 4))]:
  np.testing.assert_array_equal(value, lax_adjoint, err_msg=name)
  np.testing.assert_array_equal(value, lax_transpose, err_msg=name)
print("M.T @ y == conv_adjoint == conv_transpose == lax:\n", via_adjoint)

# The adjoint identity <M x, y> == <x, M.T y>, and "transpose" is not "inverse".
assert float(jnp.vdot(feature_map, feature_map)) == float(jnp.vdot(x, via_adjoint))
assert not np.allclose(via_adjoint, x)

# %%
fig, axes = plt.subplots(1, 5, figsize=(13, 3.6), gridspec_kw={"width_ratios": [2, 4.5, 4, 4, 4]})
show_matrix(axes[0], feature_map, "y (2x2)")
axes[1].spy(np.asarray(M.T) != 0, markersize=6)
axes[1].set_title("M.T: 16x4", fontsize=9)
show_matrix(axes[2], via_matrix, "M.T @ y")
show_matrix(axes[3], via_adjoint, "conv_adjoint(y, k,\n(1, 1, 4, 4), ...)")
show_matrix(axes[4], via_transpose, "conv_transpose(y, k, ...,\ntranspose_kernel=True)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Stride and output_padding
#
# With stride 2, a 3x3 kernel and no padding, a 5x5 input and a 6x6 input **both** give a 2x2
# output: `(5 - 3) // 2 + 1 == (6 - 3) // 2 + 1 == 2` (the 6th row and column are never read). So
# "the transposed convolution of a 2x2 map" is ambiguous: PyTorch asks for `output_padding=1` to
# get 6x6. `convmm.conv_adjoint` is told the input shape instead, so there is nothing to guess: it
# is the transpose of the 4x25 or of the 4x36 matrix. `lax.conv_transpose` reaches 6x6 with explicit
# padding pairs `(k - 1, k - 1 + output_padding) = (2, 3)` on the stride-dilated input.
#
# The picture uses a kernel of ones so that each output pixel shows how many of the four 3x3
# footprints (one per entry of y, placed 2 pixels apart) cover it, weighted by y's values.

# %%
ones_kernel = jnp.ones((3, 3))
y_small = jnp.array([[1.0, 2.0], [3.0, 4.0]])
results = {}
for size, output_padding in [(5, 0), (6, 1)]:
  shape = (1, 1, size, size)
  M_stride = convmm.conv_matrix(ones_kernel[None, None], shape, (2, 2), "VALID",
                                dimension_numbers=DN)
  assert M_stride.shape == (4, size * size)
  adjoint = convmm.conv_adjoint(y_small[None, None], ones_kernel[None, None], shape, (2, 2),
                                "VALID", dimension_numbers=DN, precision=HIGHEST)[0, 0]
  pads = [(2, 2 + output_padding)] * 2
  reference = lax.conv_transpose(y_small[None, None], ones_kernel[None, None], (2, 2), pads,
                                 dimension_numbers=DN, transpose_kernel=True,
                                 precision=HIGHEST)[0, 0]
  ours = convmm.conv_transpose(y_small[None, None], ones_kernel[None, None], (2, 2), pads,
                               dimension_numbers=DN, transpose_kernel=True,
                               precision=HIGHEST)[0, 0]
  np.testing.assert_array_equal(adjoint, reference)
  np.testing.assert_array_equal(ours, reference)
  np.testing.assert_array_equal((M_stride.T @ y_small.ravel()).reshape(size, size), reference)
  # Both forward convolutions give 2x2, and the adjoint identity holds for each size.
  x_probe = jax.random.normal(jax.random.key(size), (size, size))
  forward = conv_lax(x_probe, ones_kernel, strides=(2, 2))
  assert forward.shape == (2, 2)
  np.testing.assert_allclose(jnp.vdot(forward, y_small), jnp.vdot(x_probe, adjoint), rtol=1e-5)
  results[size] = (M_stride, adjoint)
  print(f"input {size}x{size} (output_padding={output_padding}): M is {M_stride.shape}, "
        f"adjoint of the 2x2 map:\n{adjoint}")

# 6x6 = the 5x5 result plus one zero row and column: output_padding only adds unread pixels.
np.testing.assert_array_equal(results[6][1][:5, :5], results[5][1])
assert not np.any(results[6][1][5]) and not np.any(results[6][1][:, 5])

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 5, 6]})
show_matrix(axes[0], y_small, "y (2x2)", cmap="Blues", symmetric=False)
colors = plt.cm.tab10(np.arange(4))
for ax, size in zip(axes[1:], (5, 6)):
  M_stride, adjoint = results[size]
  show_matrix(ax, adjoint, f"conv_adjoint to {size}x{size}"
              + (" (= output_padding=1)" if size == 6 else ""), cmap="Blues", symmetric=False)
  for entry in range(4):  # the footprint of y's entry `entry` is row `entry` of M
    rows, cols = np.divmod(np.flatnonzero(np.asarray(M_stride[entry])), size)
    inset = 0.06 + 0.06 * entry  # nested insets keep overlapping footprints apart
    ax.add_patch(Rectangle((cols.min() - 0.5 + inset, rows.min() - 0.5 + inset),
                           np.ptp(cols) + 1 - 2 * inset, np.ptp(rows) + 1 - 2 * inset, fill=False,
                           ec=colors[entry], lw=2,
                           label=f"footprint of y[{entry // 2}, {entry % 2}]"))
  if size == 6:
    ax.add_patch(Rectangle((-0.5, 4.5), 6, 1, color="grey", alpha=0.3, hatch="//"))
    ax.add_patch(Rectangle((4.5, -0.5), 1, 5, color="grey", alpha=0.3, hatch="//"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
fig.suptitle("Stride 2: each entry of y paints a 3x3 footprint, 2 pixels apart; output_padding "
             "adds a row and column the forward conv never reads", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# - `convmm.conv_matrix` gives the article's 4x16 matrix exactly (and a BCOO form with only the
#   structural entries); it equals the Jacobian of `lax.conv_general_dilated`.
# - The article's product `[122, 148, 126, 134]` is wrong: its matrix and input give
#   `[10, 3, 6, 3]`, and any output of this kernel on this input is bounded by 16 in absolute value.
# - Its "mirrored" kernel is a 90 degree rotation; the mirror of the x-Sobel kernel is `-k`, so true
#   convolution is minus the cross-correlation here.
# - The transposed convolution is `M.T`: `conv_adjoint`, `conv_transpose(transpose_kernel=True)` and
#   `M.T @ y` agree with lax; with stride 2 the input shape (PyTorch's `output_padding`) decides
#   which transpose, and `conv_adjoint` takes it explicitly.
