# %% [markdown]
# # 04 · Train a small CNN whose convolutions are convmm's
#
# The project's training example, `examples/cnn/`, trains a small CNN (three 3x3
# `convmm.linen.Conv` layers with ReLU, the second one strided, then a Dense head) on the 8x8
# handwritten digits that ship with scikit-learn (nothing is downloaded). This notebook imports its
# pieces (data, model, optimiser, train and eval steps) instead of copying them, then:
#
# 1. trains the convmm model for a few epochs and plots the training curves;
# 2. shows test digits with the model's predictions;
# 3. compares convmm's gradients with those of the same model built on Flax's own `nn.Conv`
#    (which calls `lax.conv_general_dilated`) on one batch, with the same parameters.
#
# The full program adds flags, a progress bar, checkpoints and data parallelism:
# `python -m examples.cnn.main --help`.

# %%
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax import lax

import convmm

# `examples/` is a folder of the repository, not an installed package: import it from the
# repository root, whichever folder Jupyter started in.
root = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "examples" / "cnn").is_dir())
sys.path.insert(0, str(root))
from examples.cnn import input_pipeline, models, train  # noqa: E402

jax.config.update("jax_platforms", "cpu")
print("the example's modules:", ", ".join(m.__name__ for m in (input_pipeline, models, train)))
print("jax", jax.__version__, "| devices:", jax.devices())

# %% [markdown]
# ## The data and the model

# %%
data = input_pipeline.load_digits()
print("train:", data.train_images.shape, "test:", data.test_images.shape)
assert len(data.train_labels) + len(data.test_labels) == 1797  # scikit-learn's digits
assert data.train_images.shape[1:] == data.test_images.shape[1:] == (8, 8, 1)
assert abs(len(data.test_labels) / 1797 - input_pipeline.DIGITS_TEST_FRACTION) < 1e-3
assert data.train_images.min() >= 0 and data.train_images.max() <= 1
assert set(np.unique(data.test_labels)) == set(range(10))

model = models.CNN(conv="convmm")  # every Conv is convmm.linen.Conv
tx = train.make_optimizer("adam")
SEED, BATCH_SIZE, EPOCHS = 0, 32, 4
params, opt_state = train.init_state(model, tx, data.train_images.shape[1:], seed=SEED)
for path, value in jax.tree_util.tree_leaves_with_path(params):
  print(f"{'/'.join(key.key for key in path):14s} {str(value.shape):>16s}")
print(f"{sum(value.size for value in jax.tree_util.tree_leaves(params)):,} parameters")
assert models.conv_class("convmm", "linen") is convmm.linen.Conv

# %% [markdown]
# ## 1. Training
#
# Adam with the example's default learning rate, batches of 32 in the example's order
# (`epoch_order`, a function of the seed and the epoch only), its jitted `train_step` and its
# `evaluate` on the held-out test digits after every epoch.

# %%
train_step = train.make_train_step(model, tx)
eval_step = train.make_eval_step(model)

history = {key: [] for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
                               "epoch_seconds")}
step_losses = []
steps_per_epoch = len(data.train_labels) // BATCH_SIZE
for epoch in range(EPOCHS):
  start = time.perf_counter()
  order = input_pipeline.epoch_order(len(data.train_labels), SEED, epoch)
  losses, accuracies = [], []
  for step in range(steps_per_epoch):
    batch = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
    params, opt_state, loss, accuracy = train_step(
      params, opt_state, data.train_images[batch], data.train_labels[batch])
    losses.append(float(loss))
    accuracies.append(float(accuracy))
  test_loss, test_accuracy = train.evaluate(eval_step, params, data.test_images,
                                            data.test_labels, BATCH_SIZE)
  step_losses += losses
  history["train_loss"].append(float(np.mean(losses)))
  history["train_accuracy"].append(float(np.mean(accuracies)))
  history["test_loss"].append(test_loss)
  history["test_accuracy"].append(test_accuracy)
  history["epoch_seconds"].append(time.perf_counter() - start)

print(train.summary_table(history))
assert history["train_loss"][-1] < history["train_loss"][0] / 3  # it learns
assert history["test_accuracy"][-1] >= 0.95, history["test_accuracy"]

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
steps = np.arange(1, len(step_losses) + 1) / steps_per_epoch
axes[0].semilogy(steps, step_losses, lw=0.8, alpha=0.6, label="per batch")
axes[0].semilogy(np.arange(1, EPOCHS + 1), history["train_loss"], "o-", label="epoch mean")
axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
epochs = np.arange(1, EPOCHS + 1)
axes[1].plot(epochs, history["train_loss"], "o-", label="train")
axes[1].plot(epochs, history["test_loss"], "s--", label="test")
axes[1].set(xlabel="epoch", ylabel="cross-entropy", title="loss per epoch", yscale="log")
axes[2].plot(epochs, history["train_accuracy"], "o-", label="train")
axes[2].plot(epochs, history["test_accuracy"], "s--", label="test")
axes[2].set(xlabel="epoch", ylabel="accuracy", title="accuracy per epoch")
for ax in axes:
  ax.grid(alpha=0.3)
  ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Test digits and predictions
#
# The first 24 test digits, then every digit the model gets wrong (title: prediction, and the true
# label when it differs).

# %%
logits = model.apply({"params": params}, data.test_images)
predictions = np.asarray(jnp.argmax(logits, -1))
accuracy = float(np.mean(predictions == data.test_labels))
np.testing.assert_allclose(accuracy, history["test_accuracy"][-1], atol=1e-6)
wrong = np.flatnonzero(predictions != data.test_labels)
print(f"test accuracy {accuracy:.4f}: {len(wrong)} of {len(predictions)} digits misclassified")


def show_digits(indices, title):
  columns = 12
  rows = max(1, -(-len(indices) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 1.35 + 0.4), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, index in zip(axes.flat, indices):
    ax.imshow(data.test_images[index, :, :, 0], cmap="gray_r")
    ok = predictions[index] == data.test_labels[index]
    label = f"{predictions[index]}" + ("" if ok else f" (true {data.test_labels[index]})")
    ax.set_title(label, fontsize=8, color="k" if ok else "r")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  plt.show()


show_digits(np.arange(24), "The first 24 test digits, with the predicted label")
if len(wrong):
  show_digits(wrong[:24], f"Misclassified test digits ({len(wrong)} in all; red: prediction)")

# %% [markdown]
# ## 3. convmm's gradients versus lax's, on one batch
#
# `models.CNN(conv="lax")` is the same network on Flax's own `nn.Conv`, which calls
# `lax.conv_general_dilated`; both create the same parameters, so the trained parameters can be fed
# to either. On one training batch, the loss and the gradient of every parameter are compared, at
# `precision=HIGHEST` so that both sides compute in full float32.

# %%
HIGHEST = lax.Precision.HIGHEST
model_convmm = models.CNN(conv="convmm", precision=HIGHEST)
model_lax = models.CNN(conv="lax", precision=HIGHEST)
images, labels = data.train_images[:BATCH_SIZE], data.train_labels[:BATCH_SIZE]


@jax.jit
def loss_and_grads(params, images, labels):
  out = {}
  for name, net in (("convmm", model_convmm), ("lax", model_lax)):
    (loss, _), grads = jax.value_and_grad(train.loss_fn, argnums=1, has_aux=True)(
      net, params, images, labels)
    out[name] = (loss, grads)
  return out


results = loss_and_grads(params, images, labels)
(loss_convmm, grads_convmm), (loss_lax, grads_lax) = results["convmm"], results["lax"]
print(f"loss: convmm {float(loss_convmm):.8f}  lax {float(loss_lax):.8f}")
np.testing.assert_allclose(loss_convmm, loss_lax, rtol=1e-6)

print(f"{'parameter':18s} {'shape':>16s} {'max |diff|':>11s} {'|diff| / |grad|':>16s}")
flat_convmm = jax.tree_util.tree_leaves_with_path(grads_convmm)
flat_lax = jax.tree_util.tree_leaves(grads_lax)
for (path, g_convmm), g_lax in zip(flat_convmm, flat_lax):
  name = "/".join(str(getattr(key, "key", key)) for key in path)
  diff = np.asarray(g_convmm - g_lax)
  relative = np.linalg.norm(diff) / np.linalg.norm(np.asarray(g_lax))
  print(f"{name:18s} {str(g_lax.shape):>16s} {np.abs(diff).max():11.2e} {relative:16.2e}")
  assert relative < 1e-5, (name, relative)
  np.testing.assert_allclose(g_convmm, g_lax, rtol=1e-4, atol=1e-6 * np.abs(g_lax).max())

# The trained parameters give the same predictions through Flax's own convolutions.
logits_lax = model_lax.apply({"params": params}, data.test_images)
np.testing.assert_array_equal(np.argmax(logits_lax, -1), predictions)

# %%
all_convmm = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads_convmm)])
all_lax = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads_lax)])
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
axes[0].plot(all_lax, all_convmm, ".", ms=2, alpha=0.5)
limit = np.abs(all_lax).max()
axes[0].plot([-limit, limit], [-limit, limit], "k--", lw=0.8)
axes[0].set(xlabel="gradient with Flax/lax convolutions", ylabel="gradient with convmm",
            title=f"all {all_lax.size:,} gradient entries on one batch")
axes[1].hist(np.abs(all_convmm - all_lax) / (np.abs(all_lax).max()), bins=50, log=True)
axes[1].set(xlabel="|convmm - lax| / max |lax gradient|", ylabel="count",
            title="their differences: float32 rounding")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# - The example's CNN, with every convolution computed by convmm as im2col + GEMM, learns the
#   digits to the test accuracy printed above in a few epochs on a CPU.
# - On one batch, the loss and all gradients equal those of the same network on Flax's own
#   `nn.Conv` (`lax.conv_general_dilated`) to float32 rounding, and the trained parameters give the
#   same test predictions through either.
