# %% [markdown]
# # 03 · Why the matrix view matters: initialisation and the spectrum of a conv layer
#
# The first article ends with *"So what?"*: writing a convolution as a matrix product is what let
# He et al. (2015, *Delving Deep into Rectifiers*) reason about a deep network with the properties
# of random matrices, and derive the initialisation that bears their name. This notebook does that
# reasoning with **convmm** and checks it numerically:
#
# 1. one conv layer is `y = K @ P` (im2col + GEMM), so every output is a sum of `n = k*k*C_in`
#    products of a weight and an input; from that, the variance of the outputs layer after layer;
# 2. the activation variance through a deep stack of conv + ReLU layers, for fan-in-scaled
#    initialisation (LeCun), He's, and a badly scaled one, measured against the prediction;
# 3. the whole layer as one matrix: its singular values, exactly (`convmm.circular_singular_values`)
#    and its largest one matrix-free (`convmm.operator_norm`), and what He's rule means for them.
#
# Layout: Flax's channel-last `NHWC` input and `HWIO` kernel. Every convolution is checked against
# `lax.conv_general_dilated` at `precision=HIGHEST`.

# %%
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax import lax

import convmm

jax.config.update("jax_platforms", "cpu")
HIGHEST = lax.Precision.HIGHEST
DN = ("NHWC", "HWIO", "NHWC")
np.set_printoptions(linewidth=120, precision=4)


def conv(x, w, padding="VALID", impl=convmm):
  """One stride-1 convolution, by convmm (default) or by lax (the reference)."""
  return impl.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN, precision=HIGHEST)


# %% [markdown]
# ## 1. One layer as a matrix product, and the variance of its output
#
# With `P = im2col(x)` (one column per output position, `n = k*k*C_in` rows) and `K` the kernel
# flattened to `C_out x n`, the layer is `Y = K @ P`. An output is `y = sum_i w_i x_i` over `n`
# terms. If the weights are independent, zero-mean with variance `Var[w]`, and independent of the
# inputs, then
#
# `Var[y] = n * Var[w] * E[x^2]`
#
# (note `E[x^2]`, not `Var[x]`: after a ReLU the inputs are not zero-mean). If `y` of the previous
# layer is symmetric around zero, `x = relu(y)` has `E[x^2] = Var[y_prev] / 2`. Hence, layer after
# layer,
#
# `Var[y_l] = Var[y_(l-1)] * n * Var[w] / 2`.
#
# The factor `n * Var[w] / 2` is 1 exactly when `Var[w] = 2 / n`: **He initialisation**. LeCun's
# `Var[w] = 1 / n` (right for linear or tanh layers) halves the variance at every ReLU layer; a
# variance that ignores `n` multiplies it by an arbitrary factor per layer. First, the matrix
# product itself, on one layer:

# %%
channels, kernel_size, batch = 16, 3, 8
fan_in = kernel_size * kernel_size * channels
key_x, key_w = jax.random.split(jax.random.key(0))
x = jax.random.normal(key_x, (batch, 12, 12, channels))
w = jax.random.normal(key_w, (kernel_size, kernel_size, channels, channels)) * math.sqrt(2 / fan_in)

patches = convmm.im2col(x, (3, 3), (1, 1), "VALID", dimension_numbers=DN)  # (N, 10, 10, n)
P = patches.reshape(-1, fan_in).T  # n x (N * 10 * 10): one column per output position
# im2col's feature order is input channel major, then the kernel's spatial positions.
K = jnp.transpose(w, (3, 2, 0, 1)).reshape(channels, fan_in)  # C_out x n, the same order
Y = (K @ P).T.reshape(batch, 10, 10, channels)
print(f"n = k*k*C_in = {fan_in}; P is {P.shape}, K is {K.shape}, Y = K @ P is {Y.shape}")

np.testing.assert_allclose(Y, conv(x, w, impl=lax), rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(conv(x, w), conv(x, w, impl=lax), rtol=1e-5, atol=1e-5)

# The variance rule on this one layer: x ~ N(0, 1), so E[x^2] = mean(P**2) ~ 1.
predicted = fan_in * float(jnp.var(w)) * float(jnp.mean(P**2))
measured = float(jnp.var(Y))
print(f"Var[y]: predicted n*Var[w]*E[x^2] = {predicted:.3f}, measured = {measured:.3f}")
assert abs(measured / predicted - 1) < 0.1

# %% [markdown]
# ## 2. Activation variance through a deep conv + ReLU stack
#
# 16 layers of 3x3 convolutions with 32 channels (`n = 288`), no bias, ReLU after each, on a batch
# of 8 random 16x16 images. Each layer pads circularly (wrap-pad by one pixel, then a `VALID`
# convolution): every output then has exactly `n` inputs, with no border effect to bend the curves,
# and it is the layer whose spectrum section 3 computes. Three ways to draw the weights (JAX's
# initialisers, whose `fan_in` is `k*k*C_in` for an `HWIO` kernel):
#
# | name | `Var[w]` | predicted factor per layer `n Var[w] / 2` |
# |---|---|---|
# | LeCun (`lecun_normal`) | `1/n` | 0.5: vanishes |
# | He (`he_normal`) | `2/n` | 1: preserved |
# | bad: fixed `std = 0.2` | `0.04`, whatever `n` | 5.76: explodes |
#
# He's argument is about the expectation over the random weights. For *one* draw of a finite-width
# layer, each output channel has a non-zero mean (`E[x] * sum(w)`, since the inputs after a ReLU are
# positive), so the ReLU does not keep exactly half of the energy and the variance wanders from
# layer to layer. So the stack is run for 4 independent weight draws (batched with `jax.vmap`), and
# the curves show their geometric mean and their range. Every run is done twice, with
# `convmm.conv_general_dilated` and with `lax.conv_general_dilated` on the same weights, and the
# pre-activation variances of all layers are compared. (The geometric mean of a fluctuating factor
# sits a few percent below the factor's mean, by Jensen's inequality; hence the 15% tolerance.)

# %%
depth, draws, size, channels_deep = 16, 4, 16, 32
fan_in_deep = kernel_size * kernel_size * channels_deep
inits = {
  "LeCun  Var[w] = 1/n": (jax.nn.initializers.lecun_normal(), 1 / fan_in_deep),
  "He  Var[w] = 2/n": (jax.nn.initializers.he_normal(), 2 / fan_in_deep),
  "bad  std = 0.2": (jax.nn.initializers.normal(stddev=0.2), 0.2**2),
}
kernel_shape = (kernel_size, kernel_size, channels_deep, channels_deep)
x0 = jax.random.normal(jax.random.key(1), (batch, size, size, channels_deep))


def circular_conv(x, w, impl=convmm):
  """Stride-1 convolution with periodic boundary: wrap-pad the input, then VALID."""
  return conv(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap"), w, impl=impl)


def stack_variances(kernels, impl):
  """The variance of every layer's pre-activation for kernels of shape (depth, *kernel_shape)."""
  def layer(h, w):
    y = circular_conv(h, w, impl)
    return jax.nn.relu(y), jnp.var(y)
  return lax.scan(layer, x0, kernels)[1]


run = {name: jax.jit(jax.vmap(lambda kernels, impl=impl: stack_variances(kernels, impl)))
       for name, impl in (("convmm", convmm), ("lax", lax))}

variances, first_layers = {}, {}
for index, (name, (init, _)) in enumerate(inits.items()):
  keys = jax.random.split(jax.random.key(100 + index), draws * depth)
  kernels = jax.vmap(lambda k, init=init: init(k, kernel_shape, jnp.float32))(keys)
  kernels = kernels.reshape(draws, depth, *kernel_shape)
  ours, reference = run["convmm"](kernels), run["lax"](kernels)
  np.testing.assert_allclose(ours, reference, rtol=1e-4)
  variances[name] = np.asarray(ours)  # (draws, depth)
  first_layers[name] = kernels[0, 0]  # for section 3

factors = {}
for name, (_, weight_variance) in inits.items():
  var = variances[name]
  predicted = fan_in_deep * weight_variance / 2
  factors[name] = float(np.exp(np.mean(np.log(var[:, 1:] / var[:, :-1]))))  # geometric mean
  print(f"{name:20s} Var[y_16] / Var[y_1] per draw: {np.array2string(var[:, -1] / var[:, 0])}\n"
        f"{'':20s} factor per layer: measured {factors[name]:.3f}, predicted {predicted:.3f}")
  assert abs(factors[name] / predicted - 1) < 0.15

# %% [markdown]
# The prediction `Var[y_l] = Var[y_1] * (n Var[w] / 2) ** (l - 1)` (dashed) against the measurement
# (solid: geometric mean over the 4 draws; band: their range), on a log scale:

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.4))
layers = np.arange(1, depth + 1)
for (name, (_, weight_variance)), color in zip(inits.items(), ("tab:blue", "tab:green", "tab:red")):
  var = variances[name]
  mean_curve = np.exp(np.log(var).mean(axis=0))
  prediction = mean_curve[0] * (fan_in_deep * weight_variance / 2) ** (layers - 1)
  ax.fill_between(layers, var.min(axis=0), var.max(axis=0), color=color, alpha=0.2)
  ax.semilogy(layers, mean_curve, "o-", color=color, ms=4, label=f"{name} (measured)")
  ax.semilogy(layers, prediction, "--", color=color, alpha=0.8)
ax.set_xlabel("layer")
ax.set_ylabel("variance of the pre-activation")
ax.set_title("Activation variance through 16 conv(3x3, 32 ch) + ReLU layers\n"
             "solid: measured with convmm (4 weight draws); dashed: n Var[w] / 2 per layer",
             fontsize=10)
ax.legend(fontsize=8)
ax.grid(True, which="major", alpha=0.3)
fig.tight_layout()
plt.show()

ratio = {name: variances[name][:, -1] / variances[name][:, 0] for name in inits}
assert np.all((ratio["He  Var[w] = 2/n"] > 0.1) & (ratio["He  Var[w] = 2/n"] < 10))  # level
assert np.all(ratio["LeCun  Var[w] = 1/n"] < 1e-3)  # about 0.5**15 = 3e-5
assert np.all(ratio["bad  std = 0.2"] > 1e8)  # about 5.76**15 = 2.5e11

# %% [markdown]
# ## 3. The layer as one matrix: its singular values
#
# The variance argument is about the *average* gain of the layer's matrix on random inputs. The
# singular values describe all of it: the largest one (the operator norm) bounds how much any
# input can grow, and the spread says how unevenly directions are treated.
#
# For a stride-1 layer on a periodic (circularly padded) input, the matrix is block-circulant and
# the FFT diagonalises it: `convmm.circular_singular_values(kernel, spatial_shape)` returns all of
# its singular values exactly from one FFT and one small `C_in x C_out` SVD per frequency (Sedghi,
# Gupta & Long, ICLR 2019). `convmm.operator_norm` finds the largest singular value of any conv
# (any padding, stride, dilation) matrix-free, by power iteration with `conv_general_dilated` and
# `conv_adjoint`.
#
# First both are checked on a small layer (4 channels, 8x8) against a dense SVD of the layer's
# matrix: for circular padding, the Jacobian of "wrap-pad then VALID convolution"; for zero padding,
# `convmm.conv_matrix`.

# %%
small = jax.random.normal(jax.random.key(2), (3, 3, 4, 4)) * math.sqrt(2 / 36)
lhs_small = (1, 8, 8, 4)
x_small = jnp.zeros(lhs_small)
jacobian = jax.jacfwd(circular_conv)(x_small, small).reshape(256, 256)
np.testing.assert_allclose(
  jacobian, jax.jacfwd(lambda x: circular_conv(x, small, impl=lax))(x_small).reshape(256, 256),
  atol=1e-6)
exact = np.linalg.svd(np.asarray(jacobian, np.float64), compute_uv=False)
fft_values = convmm.circular_singular_values(small, (8, 8))
assert fft_values.shape == (8 * 8 * 4,)
np.testing.assert_allclose(fft_values, exact, rtol=1e-4, atol=1e-5)
print("circular_singular_values == SVD of the circular conv matrix; largest:", float(fft_values[0]))

M_small = convmm.conv_matrix(small, lhs_small, (1, 1), "SAME", dimension_numbers=DN)
norm_dense = np.linalg.norm(np.asarray(M_small, np.float64), 2)
norm_free = float(convmm.operator_norm(small, lhs_small, (1, 1), "SAME", dimension_numbers=DN))
print(f"zero-padded SAME conv: operator_norm = {norm_free:.5f}, "
      f"|conv_matrix|_2 = {norm_dense:.5f}")
assert abs(norm_free / norm_dense - 1) < 1e-3
# conv_matrix is lax's convolution: M @ x == conv(x).
x_probe = jax.random.normal(jax.random.key(3), lhs_small)
np.testing.assert_allclose(M_small @ x_probe.ravel(), conv(x_probe, small, "SAME", lax).ravel(),
                           rtol=1e-5, atol=1e-5)

# %% [markdown]
# Now the first layer of section 2's stack (32 channels, 16x16, periodic), for each
# initialisation: 16 * 16 * 32 = 8192 singular values. A link with He's rule: the squared singular
# values of a circular layer sum to `||M||_F^2 = H * W * sum(w^2)`, so their **mean is
# `sum(w^2) / C_out = n * mean(w^2)`**, about `n Var[w]`: He's condition `n Var[w] = 2` says the
# mean squared singular value is 2, which the ReLU (keeping half of the energy on average) brings
# back to 1. The operator norm is the worst case, well above that mean.

# %%
spatial = (16, 16)
spectra, norms = {}, {}
for name, w_layer in first_layers.items():
  values = convmm.circular_singular_values(w_layer, spatial)
  assert values.shape == (16 * 16 * 32,) and np.all(np.diff(values) <= 0)
  mean_square = float(jnp.mean(values**2))
  np.testing.assert_allclose(mean_square, float(jnp.sum(w_layer**2)) / channels_deep, rtol=1e-4)
  # The zero-padded layer is a compression of the circular one on a larger grid, so its norm
  # can only be smaller than that circular layer's largest singular value.
  norm = float(convmm.operator_norm(w_layer, (1, *spatial, channels_deep), (1, 1), "SAME",
                                    dimension_numbers=DN))
  largest_circular_18 = float(convmm.circular_singular_values(w_layer, (18, 18))[0])
  assert norm <= largest_circular_18 * (1 + 1e-3)
  spectra[name], norms[name] = np.asarray(values), norm
  n_mean_square_w = fan_in_deep * float(jnp.mean(w_layer**2))
  print(f"{name:20s} mean sigma^2 = {mean_square:7.3f} (n mean(w^2) = {n_mean_square_w:7.3f}); "
        f"largest sigma: circular {float(values[0]):6.3f}, zero-padded SAME (operator_norm) "
        f"{norm:6.3f}")

assert abs(float(np.mean(spectra["He  Var[w] = 2/n"] ** 2)) - 2) < 0.1
assert abs(float(np.mean(spectra["LeCun  Var[w] = 1/n"] ** 2)) - 1) < 0.1

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for (name, values), color in zip(spectra.items(), ("tab:blue", "tab:green", "tab:red")):
  axes[0].semilogy(values, color=color, label=name)
  axes[0].axhline(norms[name], color=color, ls=":", lw=1)
  axes[1].hist(values, bins=np.linspace(0, 7, 71), color=color, histtype="step", lw=1.5,
               label=name, density=True)
  rms = math.sqrt(float(np.mean(values**2)))
  axes[1].axvline(rms, color=color, ls="--", lw=1)
axes[0].axhline(math.sqrt(2), color="k", ls="--", lw=1, label="sqrt(2): RMS value under He")
axes[0].set_xlabel("index (descending)")
axes[0].set_ylabel("singular value")
axes[0].set_title("All 8192 singular values of one 3x3, 32-channel layer on 16x16 (circular)\n"
                  "dotted: operator_norm of the zero-padded SAME layer", fontsize=9)
axes[0].legend(fontsize=8)
axes[1].set_xlabel("singular value")
axes[1].set_title("Their distribution (dashed: root mean square = sqrt(n mean(w^2)));\n"
                  "the initialisation's scale stretches the whole spectrum", fontsize=9)
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# - A conv layer is `K @ im2col(x)`: each output sums `n = k*k*C_in` weight-input products, so its
#   variance is `n Var[w] E[x^2]`, and with ReLU the variance changes by `n Var[w] / 2` per layer
#   (in expectation over the weights).
# - Measured through 16 convmm conv + ReLU layers (and equal to lax's): He's `Var[w] = 2/n` keeps
#   the variance level, LeCun's `1/n` halves it each layer, a fixed `std = 0.2` multiplies it by
#   about 5.8 each layer (with 32 channels), as predicted.
# - As a matrix, the layer's mean squared singular value is `n * mean(w^2)` (2 for He); the exact
#   spectrum comes from `circular_singular_values` (checked against a dense SVD) and the operator
#   norm of any conv from `operator_norm` (checked against `conv_matrix`'s 2-norm).
