"""The whole-network benchmark's networks, in Flax linen, with their conv classes as fields.

Each network takes its convolution classes as module fields, the way Flax's ImageNet example
(``examples/imagenet/models.py``) does (``conv: ModuleDef = nn.Conv``), so the convmm model is
the Flax model with ``conv=convmm.linen.Conv`` (and ``conv_transpose=convmm.linen.ConvTranspose``)
and nothing else changed (:func:`convmm_model`).

Networks: the CNN of Flax's MNIST quick start (28x28x1, batch 32), ResNet-18 and ResNet-50 as in
Flax's ImageNet example (BatchNorm, 112x112), MobileNetV2 (depthwise, 96x96), EfficientNet-B0
(depthwise + squeeze-excitation, 96x96) and a small diffusers-style U-Net (GroupNorm ResNet
blocks, timestep embedding, strided conv down-sampling, ``ConvTranspose`` 4x4/2 up-sampling,
64x64). Batch 8 unless said otherwise. ``QUICK_MODELS`` are the same architectures, shallow and
narrow, on tiny inputs (a smoke test). ``torch_networks.py`` has PyTorch twins of ResNet-18 and
MobileNetV2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from convmm import linen as cnn

ModuleDef = Any


class MnistCNN(nn.Module):
  """The CNN of Flax's MNIST quick start (its README and "Quick start" tutorial): two 3x3 convs
  (32, 64 features) with ReLU and 2x2 average pooling, then Dense 256, ReLU, Dense 10."""

  num_classes: int = 10
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no dropout or batch statistics
    x = nn.relu(self.conv(features=32, kernel_size=(3, 3), dtype=self.dtype)(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(self.conv(features=64, kernel_size=(3, 3), dtype=self.dtype)(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.relu(nn.Dense(features=256, dtype=self.dtype)(x))
    return nn.Dense(features=self.num_classes, dtype=self.dtype)(x)


class ResNetBlock(nn.Module):
  """Basic ResNet block (two 3x3 convs), as in Flax's ImageNet example."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
  """Bottleneck ResNet block (1x1, 3x3, 1x1 x4), as in Flax's ImageNet example."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


def batch_norm(train: bool, dtype: Any) -> ModuleDef:
  """BatchNorm as Flax's ImageNet example configures it."""
  return functools.partial(
    nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
  )


class ResNet(nn.Module):
  """ResNet V1 written as Flax's ImageNet example writes it: the conv class is a field."""

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = batch_norm(train, self.dtype)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(
          self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


class InvertedResidual(nn.Module):
  """MobileNetV2 / EfficientNet block: 1x1 expand, depthwise kxk, [squeeze-excite], 1x1 project."""

  features: int
  strides: int
  expansion: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  kernel: int = 3
  se_ratio: float = 0.0

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    y = x
    if self.expansion != 1:
      y = self.act(self.norm()(self.conv(in_features * self.expansion, (1, 1))(y)))
    hidden = y.shape[-1]
    y = self.conv(
      hidden, (self.kernel, self.kernel), self.strides, feature_group_count=hidden, name="depthwise"
    )(y)
    y = self.act(self.norm()(y))
    if self.se_ratio:
      squeezed = max(1, int(in_features * self.se_ratio))
      se = jnp.mean(y, axis=(1, 2), keepdims=True)
      se = self.act(self.conv(squeezed, (1, 1), use_bias=True, name="se_reduce")(se))
      y = y * nn.sigmoid(self.conv(hidden, (1, 1), use_bias=True, name="se_expand")(se))
    y = self.norm()(self.conv(self.features, (1, 1), name="project")(y))
    if self.strides == 1 and in_features == self.features:
      y = x + y
    return y


# (expansion, features, repeats, stride, kernel)
MOBILENETV2_BLOCKS = (
  (1, 16, 1, 1, 3),
  (6, 24, 2, 2, 3),
  (6, 32, 3, 2, 3),
  (6, 64, 4, 2, 3),
  (6, 96, 3, 1, 3),
  (6, 160, 3, 2, 3),
  (6, 320, 1, 1, 3),
)
EFFICIENTNET_B0_BLOCKS = (
  (1, 16, 1, 1, 3),
  (6, 24, 2, 2, 3),
  (6, 40, 2, 2, 5),
  (6, 80, 3, 2, 3),
  (6, 112, 3, 1, 5),
  (6, 192, 4, 2, 5),
  (6, 320, 1, 1, 3),
)


class MobileNet(nn.Module):
  """MobileNetV2 (ReLU6, no squeeze-excite) or EfficientNet-B0 (swish, squeeze-excite 0.25).

  EfficientNet's dropout and stochastic depth are left out: the benchmark is deterministic.
  """

  blocks: Sequence[tuple[int, int, int, int, int]]
  num_classes: int
  stem_features: int = 32
  head_features: int = 1280
  se_ratio: float = 0.0
  act: Callable = nn.relu6
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = batch_norm(train, self.dtype)
    x = self.act(norm()(conv(self.stem_features, (3, 3), (2, 2), name="stem")(x)))
    for expansion, features, repeats, stride, kernel in self.blocks:
      for j in range(repeats):
        x = InvertedResidual(
          features, stride if j == 0 else 1, expansion, conv, norm, self.act, kernel, self.se_ratio
        )(x)
    x = self.act(norm()(conv(self.head_features, (1, 1), name="head")(x)))
    x = jnp.mean(x, axis=(1, 2))
    return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of diffusion timesteps, ``(B,) -> (B, dim)``, in float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class UNetResBlock(nn.Module):
  """diffusers' ResnetBlock2D: GroupNorm, swish, 3x3 conv, + timestep, GroupNorm, swish, 3x3."""

  features: int
  conv: ModuleDef
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x, temb):
    norm = functools.partial(nn.GroupNorm, num_groups=self.groups, dtype=self.dtype)
    h = self.conv(self.features, (3, 3))(nn.swish(norm()(x)))
    h = h + nn.Dense(self.features, dtype=self.dtype)(nn.swish(temb))[:, None, None, :]
    h = self.conv(self.features, (3, 3))(nn.swish(norm()(h)))
    if x.shape[-1] != self.features:
      x = self.conv(self.features, (1, 1), name="conv_shortcut")(x)
    return x + h


class UNet(nn.Module):
  """A small diffusers-style UNet2DModel: down blocks with skip connections and a stride-2 conv,
  a middle block, up blocks that concatenate the skips and up-sample with ``ConvTranspose``
  4x4/2 (diffusers' ``Upsample2D(use_conv_transpose=True)``). Predicts noise: MSE loss."""

  channels: Sequence[int] = (32, 64, 128)
  layers_per_block: int = 1
  groups: int = 8
  out_channels: int = 3
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  conv_transpose: ModuleDef = nn.ConvTranspose

  @nn.compact
  def __call__(self, x, t, train: bool = True):
    del train  # no batch statistics: GroupNorm
    conv = functools.partial(self.conv, dtype=self.dtype)
    block = functools.partial(UNetResBlock, conv=conv, groups=self.groups, dtype=self.dtype)
    temb = timestep_embedding(t, self.channels[0])
    temb = nn.Dense(4 * self.channels[0], dtype=self.dtype)(temb)
    temb = nn.Dense(4 * self.channels[0], dtype=self.dtype)(nn.swish(temb))
    h = conv(self.channels[0], (3, 3), name="conv_in")(x)
    skips = [h]
    for i, features in enumerate(self.channels):
      for _ in range(self.layers_per_block):
        h = block(features)(h, temb)
        skips.append(h)
      if i < len(self.channels) - 1:
        h = conv(features, (3, 3), strides=(2, 2), name=f"downsample_{i}")(h)
        skips.append(h)
    h = block(self.channels[-1])(h, temb)
    h = block(self.channels[-1])(h, temb)
    for i, features in reversed(list(enumerate(self.channels))):
      for _ in range(self.layers_per_block + 1):
        h = block(features)(jnp.concatenate([h, skips.pop()], axis=-1), temb)
      if i > 0:
        h = self.conv_transpose(
          features, (4, 4), strides=(2, 2), dtype=self.dtype, name=f"upsample_{i}"
        )(h)
    h = nn.swish(nn.GroupNorm(num_groups=self.groups, dtype=self.dtype)(h))
    return conv(self.out_channels, (3, 3), name="conv_out")(h)


# ------------------------------------------------------------------------------ the suite


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A benchmark network: the Flax model (built for a dtype), its input, its loss."""

  name: str
  description: str
  build: Callable[[Any], nn.Module]  # dtype -> the Flax model
  image_shape: tuple[int, ...]  # (batch, height, width, channels)
  task: str  # "classify" (cross-entropy over num_classes) or "denoise" (MSE, input t)
  num_classes: int = 1000


def resnet(stage_sizes, block_cls, num_filters=64, num_classes=1000):
  return lambda dtype: ResNet(
    stage_sizes=stage_sizes,
    block_cls=block_cls,
    num_classes=num_classes,
    num_filters=num_filters,
    dtype=dtype,
  )


def mobilenet(blocks, stem, head, num_classes=1000, efficient=False):
  extra = dict(se_ratio=0.25, act=nn.swish) if efficient else {}
  return lambda dtype: MobileNet(
    blocks=blocks,
    num_classes=num_classes,
    stem_features=stem,
    head_features=head,
    dtype=dtype,
    **extra,
  )


def unet(channels, groups=8):
  return lambda dtype: UNet(channels=channels, groups=groups, dtype=dtype)


MNIST_CNN = ModelSpec(
  "mnist_cnn",
  "CNN of Flax's MNIST quick start, 28x28x1",
  lambda dtype: MnistCNN(dtype=dtype),
  (32, 28, 28, 1),
  "classify",
  10,
)

MODELS = {
  spec.name: spec
  for spec in (
    MNIST_CNN,
    ModelSpec(
      "resnet18",
      "ResNet-18 (Flax ImageNet example), 112x112",
      resnet([2, 2, 2, 2], ResNetBlock),
      (8, 112, 112, 3),
      "classify",
    ),
    ModelSpec(
      "resnet50",
      "ResNet-50 (Flax ImageNet example), 112x112",
      resnet([3, 4, 6, 3], BottleneckResNetBlock),
      (8, 112, 112, 3),
      "classify",
    ),
    ModelSpec(
      "mobilenetv2",
      "MobileNetV2 (depthwise), 96x96",
      mobilenet(MOBILENETV2_BLOCKS, 32, 1280),
      (8, 96, 96, 3),
      "classify",
    ),
    ModelSpec(
      "efficientnet_b0",
      "EfficientNet-B0 (depthwise, squeeze-excite), 96x96",
      mobilenet(EFFICIENTNET_B0_BLOCKS, 32, 1280, efficient=True),
      (8, 96, 96, 3),
      "classify",
    ),
    ModelSpec(
      "unet",
      "diffusers-style U-Net 32/64/128, ConvTranspose up-sampling, 64x64",
      unet((32, 64, 128)),
      (8, 64, 64, 3),
      "denoise",
    ),
  )
}
DEFAULT_MODELS = ("mnist_cnn", "resnet18", "mobilenetv2", "efficientnet_b0", "unet")

# --quick: the same architectures, shallow and narrow, on tiny inputs (a smoke test).
QUICK_MODELS = {
  spec.name: spec
  for spec in (
    MNIST_CNN,  # small already
    ModelSpec(
      "resnet18",
      "ResNet (2 basic blocks, 8 filters), 32x32",
      resnet([1, 1], ResNetBlock, num_filters=8, num_classes=10),
      (2, 32, 32, 3),
      "classify",
      10,
    ),
    ModelSpec(
      "resnet50",
      "ResNet (2 bottleneck blocks, 8 filters), 32x32",
      resnet([1, 1], BottleneckResNetBlock, num_filters=8, num_classes=10),
      (2, 32, 32, 3),
      "classify",
      10,
    ),
    ModelSpec(
      "mobilenetv2",
      "MobileNetV2 (2 blocks), 32x32",
      mobilenet(((1, 8, 1, 1, 3), (6, 16, 2, 2, 3)), 8, 32, num_classes=10),
      (2, 32, 32, 3),
      "classify",
      10,
    ),
    ModelSpec(
      "efficientnet_b0",
      "EfficientNet (2 blocks, 3x3 and 5x5), 32x32",
      mobilenet(((1, 8, 1, 1, 3), (6, 16, 2, 2, 5)), 8, 32, num_classes=10, efficient=True),
      (2, 32, 32, 3),
      "classify",
      10,
    ),
    ModelSpec("unet", "U-Net 8/16, 16x16", unet((8, 16), groups=4), (2, 16, 16, 3), "denoise"),
  )
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def convmm_model(model: nn.Module) -> nn.Module:
  """The same model with convmm's layers: the conv classes are fields, nothing else changes."""
  swaps = {"conv": cnn.Conv, "conv_transpose": cnn.ConvTranspose}
  return model.clone(**{field: layer for field, layer in swaps.items() if hasattr(model, field)})


def make_batch(spec: ModelSpec, dtype: Any, seed: int):
  """``(model inputs, target)``: images in ``dtype``; integer labels or a noise target."""
  k_image, k_target, k_time = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(k_image, spec.image_shape, jnp.float32).astype(dtype)
  if spec.task == "classify":
    return (images,), jax.random.randint(k_target, spec.image_shape[:1], 0, spec.num_classes)
  t = jax.random.randint(k_time, spec.image_shape[:1], 0, 1000).astype(jnp.float32)
  return (images, t), jax.random.normal(k_target, spec.image_shape, jnp.float32)


def loss_of(spec: ModelSpec, output: jax.Array, target: jax.Array) -> jax.Array:
  output = output.astype(jnp.float32)
  if spec.task == "classify":
    return optax.softmax_cross_entropy_with_integer_labels(output, target).mean()
  return jnp.mean((output - target) ** 2)
