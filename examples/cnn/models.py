"""The CNN: three 3x3 convolutions (the second strided) and a Dense head, in Flax linen and NNX.

``conv`` picks what computes the convolutions: ``'convmm'`` (convmm's layers, im2col + GEMM),
``'lax'`` (Flax's own layers, ``lax.conv_general_dilated``) or ``'replace'`` (Flax's own layers,
with the model's function wrapped in :func:`convmm.replace_convs`, which computes every XLA
convolution in it, forward and backward, with convmm). All create the same parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

import convmm.linen
import convmm.nnx
from examples.cnn.input_pipeline import NUM_CLASSES

FEATURES = (32, 64, 64)  # conv widths; the second conv has stride 2
HIDDEN = 128


CONVS = ("convmm", "lax", "replace")


def conv_class(conv: str = "convmm", api: str = "linen") -> type:
  """The Conv layer class behind the CNN: convmm's (im2col + GEMM) or Flax's own ('lax', and
  'replace', where :func:`apply` wraps the model in convmm.replace_convs).

  All take the same arguments and create the same parameters.
  """
  if conv not in CONVS or api not in ("linen", "nnx"):
    raise ValueError(
      f"conv_class: expected `conv` in {CONVS} and `api` in "
      f"('linen', 'nnx'), got conv={conv!r}, api={api!r}"
    )
  if api == "linen":
    return convmm.linen.Conv if conv == "convmm" else nn.Conv
  return convmm.nnx.Conv if conv == "convmm" else nnx.Conv


class CNN(nn.Module):
  """Three 3x3 convolutions with ReLU (the second one strided), then a two-layer Dense head.

  ``conv`` picks the implementation ('convmm' or 'lax'); the parameters are the same either way.
  Input ``(N, H, W, C)``, output logits ``(N, num_classes)``.
  """

  conv: str = "convmm"
  num_classes: int = NUM_CLASSES
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = conv_class(self.conv, "linen")
    for i, features in enumerate(FEATURES):
      strides = 2 if i == 1 else 1
      x = conv(features, (3, 3), strides=strides, precision=self.precision, name=f"conv{i + 1}")(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(HIDDEN, precision=self.precision, name="hidden")(x))
    return nn.Dense(self.num_classes, precision=self.precision, name="head")(x)


class NnxCNN(nnx.Module):
  """The same CNN as :class:`CNN` written with Flax NNX layers."""

  def __init__(
    self,
    conv: str = "convmm",
    *,
    image_shape: Sequence[int] = (8, 8, 1),
    num_classes: int = NUM_CLASSES,
    precision: Any = None,
    rngs: nnx.Rngs,
  ):
    conv_cls = conv_class(conv, "nnx")
    height, width, channels = image_shape
    widths = (channels, *FEATURES)
    self.convs = nnx.List(
      [
        conv_cls(
          widths[i],
          widths[i + 1],
          (3, 3),
          strides=2 if i == 1 else 1,
          precision=precision,
          rngs=rngs,
        )
        for i in range(len(FEATURES))
      ]
    )
    flat = math.ceil(height / 2) * math.ceil(width / 2) * FEATURES[-1]  # SAME padding, stride 2
    self.hidden = nnx.Linear(flat, HIDDEN, precision=precision, rngs=rngs)
    self.head = nnx.Linear(HIDDEN, num_classes, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = nnx.relu(conv(x))
    x = x.reshape(x.shape[0], -1)
    return self.head(nnx.relu(self.hidden(x)))


def apply(model: CNN, variables: Any, images: jax.Array) -> jax.Array:
  """``model.apply(variables, images)``; with ``conv='replace'``, through
  ``convmm.replace_convs`` (the one line a user of any JAX model adds)."""
  if model.conv == "replace":
    return convmm.replace_convs(model.apply)(variables, images)
  return model.apply(variables, images)
