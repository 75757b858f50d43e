"""Whole-network benchmark: convmm's Flax layers against Flax's own, on real architectures.

Each network takes its convolution classes as module fields, the way Flax's ImageNet example
(``examples/imagenet/models.py``) does (``conv: ModuleDef = nn.Conv``), so the convmm model is
the Flax model with ``conv=convmm.linen.Conv`` (and ``conv_transpose=convmm.linen.ConvTranspose``)
and nothing else changed. Parameters are initialised once, by the Flax model, and both models are
applied to them (their parameter trees are identical by design; this is checked).

Networks: ResNet-18 (and optionally ResNet-50) as in Flax's ImageNet example (BatchNorm,
112x112), MobileNetV2 (depthwise, 96x96), EfficientNet-B0 (depthwise + squeeze-excitation,
96x96) and a small diffusers-style U-Net (GroupNorm ResNet blocks, timestep embedding, strided
conv down-sampling, ``ConvTranspose`` 4x4/2 up-sampling, 64x64). Batch 8. Dtypes: float32, and
bfloat16 as Flax's ImageNet example runs half precision (``dtype=bfloat16``, parameters float32).

Each network and dtype runs in its own process (a fresh Python, JAX and allocator, as a
training run has; ``--no-isolate`` runs them all in one): in one process, convmm's bfloat16
ResNet-18 step measured 1.38x the time it took in a fresh process when the float32 networks had
run before it (204 against 148 ms; Flax's 275 against 250 ms). For each network, dtype and
implementation (convmm, flax) it measures, interleaved in that process:

* forward (inference: ``train=False``) and training-step medians, interleaved after a warm-up.
  The step is ``jax.value_and_grad`` of a cross-entropy loss (MSE for the U-Net, which predicts
  noise) with BatchNorm statistics updated, plus an optax adam update, jitted with the state
  donated;
* compile time (``jax.jit(f).lower(*args)`` + ``.compile()``), repeated with ``jax.clear_caches()``
  before each repetition so that every repetition traces and compiles afresh; medians;
* compiled temporary memory, ``compiled.memory_analysis().temp_size_in_bytes``;
* agreement of convmm with Flax from the same parameters: forward outputs, the step's loss, the
  gradients (adam's first moment after one step from a zero state is exactly ``0.1 * grad``) and
  the updated BatchNorm statistics, as ``max |convmm - flax| / max |flax|`` over each tree; in
  bfloat16 also each network against Flax's network in float32 (the two 16-bit networks round
  differently, so only the float32 reference says which is closer). All-zero BatchNorm scales
  (the ImageNet ResNet's zero-initialised residual branches) are set to one so that every
  convolution gets a gradient.

Examples:
  python benchmarks/models.py                               # full run (tens of minutes)
  python benchmarks/models.py --models resnet18 --dtypes bfloat16 --repeats 5
  python benchmarks/models.py --quick --json out.json       # CI smoke test (seconds per model)

Timings on a shared machine move by 20-40% between runs; compare the ratios, which are measured
interleaved in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from tabulate import tabulate

import convmm
from convmm import linen as cnn

ModuleDef = Any

# ------------------------------------------------------------------------------ networks


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


MODELS = {
  spec.name: spec
  for spec in (
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
DEFAULT_MODELS = ("resnet18", "mobilenetv2", "efficientnet_b0", "unet")

# --quick: the same architectures, shallow and narrow, on tiny inputs (a smoke test).
QUICK_MODELS = {
  spec.name: spec
  for spec in (
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
IMPLS = ("convmm", "flax")


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


OPTIMIZER = optax.adam(1e-3)


def functions(spec: ModelSpec, model: nn.Module):
  """``forward(variables, *inputs)`` (inference) and ``step(state, inputs, target)``.

  ``state = (params, model_state, opt_state)``; ``model_state`` holds the non-parameter
  collections (BatchNorm's ``batch_stats``; empty for the U-Net). ``step`` returns the new state
  and the loss.
  """

  def forward(variables, *inputs):
    return model.apply(variables, *inputs, train=False)

  def step(state, inputs, target):
    params, model_state, opt_state = state

    def loss_fn(params):
      output, new_model_state = model.apply(
        {"params": params, **model_state}, *inputs, train=True, mutable=list(model_state)
      )
      return loss_of(spec, output, target), new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_model_state, opt_state), loss

  return forward, step


# ---------------------------------------------------------------------------- measuring


def compile_timed(fn: Callable, args: tuple, donate: tuple[int, ...] = ()):
  """Traces, lowers and compiles ``fn`` afresh: ``(compiled, record)`` with seconds and bytes."""
  jax.clear_caches()
  start = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  memory = compiled.memory_analysis()
  return compiled, dict(
    seconds=end - start,
    lower_seconds=lowered_at - start,
    temp_bytes=None if memory is None else int(memory.temp_size_in_bytes),
  )


def leaf_errors(actual, expected) -> tuple[dict[str, float], float]:
  """``max |actual - expected|`` per leaf, and ``max |expected|`` over the whole tree."""
  errors, scale = {}, 0.0
  for (path, a), e in zip(
    jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
  ):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    errors[jax.tree_util.keystr(path)] = float(np.max(np.abs(a - e), initial=0.0))
    scale = max(scale, float(np.max(np.abs(e), initial=0.0)))
  return errors, scale


def relative_error(actual, expected) -> float:
  """``max |actual - expected| / max |expected|`` over the whole tree (absolute if all 0).

  One scale for the tree, not one per leaf: in a BatchNorm network some gradients and
  statistics are zero in exact arithmetic (a per-channel shift that the next train-mode
  BatchNorm removes), and per leaf both sides' rounding noise would be compared with itself.
  """
  errors, scale = leaf_errors(actual, expected)
  return max(errors.values(), default=0.0) / (scale or 1.0)


def worst_leaf(actual, expected) -> str:
  """The leaf with the largest error relative to its own scale (a diagnostic)."""
  errors, _ = leaf_errors(actual, expected)
  leaf_scales, _ = leaf_errors(jax.tree.map(jnp.zeros_like, expected), expected)
  relative = {k: v / (leaf_scales[k] or 1.0) for k, v in errors.items()}
  return max(relative, key=relative.get) if relative else ""


def agreement(output, loss, state, ref_output, ref_loss, ref_state) -> dict[str, Any]:
  """Relative errors of a forward output and a training step's results against a reference.

  The gradients come from adam's first moment after one step from a zero state,
  ``(1 - b1) * grad``; ``model_state`` are the updated BatchNorm statistics.
  """
  (_, model_state, opt_state), (_, ref_model_state, ref_opt_state) = state, ref_state
  grads, ref_grads = opt_state[0].mu, ref_opt_state[0].mu
  return dict(
    fwd=relative_error(output, ref_output),
    loss=relative_error(loss, ref_loss),
    grads=relative_error(grads, ref_grads),
    grads_worst_leaf=worst_leaf(grads, ref_grads),
    model_state=relative_error(model_state, ref_model_state) if ref_model_state else 0.0,
  )


def unit_zero_scales(params):
  """Sets all-zero normalisation scales to one.

  Flax's ImageNet ResNet zero-initialises the last BatchNorm scale of each residual branch,
  which silences the branch at initialisation: its convolutions would get exactly zero
  gradients and the agreement check would not see them. The timings do not depend on it.
  """

  def fix(path, leaf):
    named_scale = getattr(path[-1], "key", None) == "scale"
    return jnp.ones_like(leaf) if named_scale and not np.any(np.asarray(leaf)) else leaf

  return jax.tree_util.tree_map_with_path(fix, params)


def check_same_parameters(flax_model, other_model, init_args) -> int:
  """Raises unless both models create the same variable tree; returns the parameter count."""
  shapes = [
    jax.eval_shape(functools.partial(m.init, train=False), jax.random.key(0), *init_args)
    for m in (flax_model, other_model)
  ]
  described = [jax.tree.map(lambda s: (s.shape, str(s.dtype)), tree) for tree in shapes]
  if described[0] != described[1]:
    raise ValueError(
      f"models.py: convmm's variable tree differs from Flax's: {described[1]} vs {described[0]}"
    )
  return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes[0]["params"]))


def copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)


def run_model(spec: ModelSpec, dtype_name: str, args, log) -> dict[str, Any]:
  """Every measurement of one network in one dtype, convmm and Flax interleaved."""
  dtype = DTYPES[dtype_name]
  flax_model = spec.build(dtype)
  models = {"convmm": convmm_model(flax_model), "flax": flax_model}
  inputs, target = make_batch(spec, dtype, args.seed)
  num_params = check_same_parameters(flax_model, models["convmm"], inputs)
  # XLA:CPU compiles threefry (JAX's default PRNG) slowly: a small ResNet's init took 14 s of
  # CPU with it and 3 s with "rbg". Only the initial values depend on the choice.
  init_key = jax.random.key(args.seed, impl="rbg")
  variables = jax.jit(functools.partial(flax_model.init, train=False))(init_key, *inputs)
  params = unit_zero_scales(variables["params"])
  model_state = {k: v for k, v in variables.items() if k != "params"}
  variables = {"params": params, **model_state}
  state = (params, model_state, OPTIMIZER.init(params))
  fns = {name: functions(spec, model) for name, model in models.items()}

  # Compile: each repetition traces, lowers and compiles from empty caches; the last
  # repetition's executables are the ones timed below.
  compiled: dict[str, dict[str, Any]] = {name: {} for name in IMPLS}
  compile_records = {name: {"fwd": [], "step": []} for name in IMPLS}
  for rep in range(args.compile_repeats):
    for name in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
      forward, step = fns[name]
      for mode, fn, fn_args, donate in (
        ("fwd", forward, (variables, *inputs), ()),
        ("step", step, (state, inputs, target), (0,)),
      ):
        compiled[name][mode], record = compile_timed(fn, fn_args, donate)
        compile_records[name][mode].append(record)
    log(
      f"    compile repetition {rep + 1}/{args.compile_repeats}: "
      + ", ".join(
        f"{name} fwd {compile_records[name]['fwd'][-1]['seconds']:.1f} s step "
        f"{compile_records[name]['step'][-1]['seconds']:.1f} s"
        for name in IMPLS
      )
    )

  # Agreement, from the same parameters: these calls are also the warm-up.
  outputs, states, losses = {}, {}, {}
  for name in IMPLS:
    outputs[name] = jax.block_until_ready(compiled[name]["fwd"](variables, *inputs))
    states[name], losses[name] = jax.block_until_ready(
      compiled[name]["step"](copy_tree(state), inputs, target)
    )
  errors = agreement(
    outputs["convmm"],
    losses["convmm"],
    states["convmm"],
    outputs["flax"],
    losses["flax"],
    states["flax"],
  )
  errors["output_finite"] = bool(np.all(np.isfinite(np.asarray(outputs["convmm"], np.float32))))
  if dtype != jnp.float32:
    # Both low-precision networks round differently, so their difference alone does not say
    # which is closer to the truth: compare each with Flax's network in float32 (same
    # parameters, same rounded inputs).
    f32_model = spec.build(jnp.float32)
    forward, step = functions(spec, f32_model)
    f32_inputs = tuple(x.astype(jnp.float32) for x in inputs)
    ref_output = jax.jit(forward)(variables, *f32_inputs)
    ref_state, ref_loss = jax.jit(step)(copy_tree(state), f32_inputs, target)
    errors["vs_float32"] = {
      name: agreement(outputs[name], losses[name], states[name], ref_output, ref_loss, ref_state)
      for name in IMPLS
    }

  # Timing: interleaved repetitions, alternating which implementation goes first.
  samples = {name: {"fwd": [], "step": []} for name in IMPLS}
  for rep in range(args.repeats):
    for mode in ("fwd", "step"):
      for name in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
        start = time.perf_counter()
        if mode == "fwd":
          jax.block_until_ready(compiled[name]["fwd"](variables, *inputs))
        else:
          states[name], loss = compiled[name]["step"](states[name], inputs, target)
          jax.block_until_ready(loss)
        samples[name][mode].append(time.perf_counter() - start)

  impls = {}
  for name in IMPLS:
    rec = compile_records[name]
    impls[name] = dict(
      fwd_ms=1e3 * statistics.median(samples[name]["fwd"]),
      step_ms=1e3 * statistics.median(samples[name]["step"]),
      fwd_min_ms=1e3 * min(samples[name]["fwd"]),
      step_min_ms=1e3 * min(samples[name]["step"]),
      fwd_samples_ms=[1e3 * s for s in samples[name]["fwd"]],
      step_samples_ms=[1e3 * s for s in samples[name]["step"]],
      compile_fwd_s=statistics.median(r["seconds"] for r in rec["fwd"]),
      compile_step_s=statistics.median(r["seconds"] for r in rec["step"]),
      lower_fwd_s=statistics.median(r["lower_seconds"] for r in rec["fwd"]),
      lower_step_s=statistics.median(r["lower_seconds"] for r in rec["step"]),
      compile_fwd_samples_s=[r["seconds"] for r in rec["fwd"]],
      compile_step_samples_s=[r["seconds"] for r in rec["step"]],
      temp_fwd_bytes=rec["fwd"][-1]["temp_bytes"],
      temp_step_bytes=rec["step"][-1]["temp_bytes"],
    )
  ratio = lambda key: (
    impls["convmm"][key] / impls["flax"][key]
    if impls["convmm"][key] is not None and impls["flax"][key]
    else None
  )
  ratios = {
    key: ratio(f"{key}_{unit}")
    for key, unit in (
      ("fwd", "ms"),
      ("step", "ms"),
      ("compile_fwd", "s"),
      ("compile_step", "s"),
      ("temp_fwd", "bytes"),
      ("temp_step", "bytes"),
    )
  }
  return dict(
    model=spec.name,
    description=spec.description,
    dtype=dtype_name,
    input_shape=list(spec.image_shape),
    params=num_params,
    params_identical=True,
    repeats=args.repeats,
    compile_repeats=args.compile_repeats,
    impls=impls,
    ratios=ratios,
    errors=errors,
  )


# ------------------------------------------------------------------------------- output


def fmt(value: float | None, digits: int = 3) -> str:
  """``value`` with ``digits`` significant digits (no exponent below 10**digits)."""
  if value is None or not math.isfinite(value):
    return "-"
  return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}" if value else "0"


def tables(results: list[dict[str, Any]]) -> str:
  """Two markdown tables: times and ratios; compile seconds, memory and agreement."""
  mib = lambda b: None if b is None else b / 2**20
  timing, resources = [], []
  for r in results:
    label = f"{r['model']} {r['dtype']}"
    if "error" in r:
      timing.append([label, f"error: {r['error'][:80]}"] + [""] * 7)
      continue
    c, f, q = r["impls"]["convmm"], r["impls"]["flax"], r["ratios"]
    vs_f32 = r["errors"].get("vs_float32")
    timing.append(
      [
        label,
        fmt(c["fwd_ms"]),
        fmt(f["fwd_ms"]),
        fmt(q["fwd"]) + "x",
        fmt(c["step_ms"]),
        fmt(f["step_ms"]),
        fmt(q["step"]) + "x",
        f"{r['errors']['fwd']:.1e} / {r['errors']['grads']:.1e}",
        "-"
        if vs_f32 is None
        else f"{vs_f32['convmm']['grads']:.1e} / {vs_f32['flax']['grads']:.1e}",
      ]
    )
    resources.append(
      [
        label,
        f"{fmt(c['compile_fwd_s'])} / {fmt(f['compile_fwd_s'])}",
        fmt(q["compile_fwd"]) + "x",
        f"{fmt(c['compile_step_s'])} / {fmt(f['compile_step_s'])}",
        fmt(q["compile_step"]) + "x",
        f"{fmt(mib(c['temp_fwd_bytes']))} / {fmt(mib(f['temp_fwd_bytes']))}",
        fmt(q["temp_fwd"]) + "x",
        f"{fmt(mib(c['temp_step_bytes']))} / {fmt(mib(f['temp_step_bytes']))}",
        fmt(q["temp_step"]) + "x",
      ]
    )
  first = tabulate(
    timing,
    headers=[
      "model dtype",
      "fwd ms convmm",
      "flax",
      "/flax",
      "step ms convmm",
      "flax",
      "/flax",
      "err fwd / grad",
      "grad err vs f32 convmm / flax",
    ],
    tablefmt="github",
    disable_numparse=True,
    colalign=("left",) + ("right",) * 8,
  )
  second = tabulate(
    resources,
    headers=[
      "model dtype",
      "compile fwd s convmm / flax",
      "/flax",
      "compile step s",
      "/flax",
      "temp MiB fwd",
      "/flax",
      "temp MiB step",
      "/flax",
    ],
    tablefmt="github",
    disable_numparse=True,
    colalign=("left",) + ("right",) * 8,
  )
  return f"{first}\n\n{second}"


def report(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
  return (
    f"convmm / Flax layers; times are medians of {info['repeats']} interleaved "
    f"repetitions{' (each network and dtype in its own process)' if info.get('isolated') else ''}"
    f", compile times medians of {info['compile_repeats']} (trace + lower + "
    f"compile); {info['cpu']}, {info['cores']} cores, load average "
    f"{info['load_average'][0]:.1f} at the start.\n\n{tables(results)}\n\n"
    "err: max |convmm - flax| / max |flax| over the output, and over all parameters' "
    "gradients; for 16-bit runs also each network's gradient error against Flax's "
    "network in float32."
  )


def write_json(path: str, info: dict[str, Any], results: list[dict[str, Any]]) -> None:
  with open(path, "w") as f:
    json.dump(dict(meta=info, results=results), f, indent=1)


def machine_info(args) -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(
        (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
      )
  except OSError:
    pass
  return dict(
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    argv=sys.argv,
    python=platform.python_version(),
    cpu=cpu,
    cores=len(os.sched_getaffinity(0)),
    load_average=os.getloadavg(),
    jax=jax.__version__,
    flax=flax.__version__,
    optax=optax.__version__,
    convmm=convmm.__version__,
    backend=jax.default_backend(),
    quick=args.quick,
    isolated=args.isolate,
    repeats=args.repeats,
    compile_repeats=args.compile_repeats,
    seed=args.seed,
    xla_flags=os.environ.get("XLA_FLAGS"),
  )


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Whole networks with convmm's Flax layers against Flax's own: forward and "
    "training-step medians, compile time, temporary memory, agreement.",
    epilog="models: " + ", ".join(f"{s.name} ({s.description})" for s in MODELS.values()),
  )
  parser.add_argument(
    "--models",
    default=",".join(DEFAULT_MODELS),
    help=f"comma-separated (default {','.join(DEFAULT_MODELS)})",
  )
  parser.add_argument(
    "--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16 (default both)"
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="timed repetitions of each call (default 10; --quick 1)",
  )
  parser.add_argument(
    "--compile-repeats",
    type=int,
    default=None,
    help="compilations of each function (default 3; --quick 1)",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # of run_isolated
  parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
  parser.add_argument(
    "--table", metavar="PATH", help="print the tables of a JSON file written by --json, and exit"
  )
  parser.add_argument(
    "--isolate",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="run each network and dtype in its own process (default; --no-isolate: all in this "
    "one, the default with --quick)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="small versions of the networks on tiny inputs, one repetition: "
    "a smoke test (seconds per model)",
  )
  args = parser.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  unknown = [m for m in args.models if m not in MODELS]
  if unknown or not args.models:
    parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
  if not args.dtypes or any(d not in DTYPES for d in args.dtypes):
    parser.error(f"--dtypes: got {args.dtypes}; choose from {', '.join(DTYPES)}")
  args.isolate = not args.quick if args.isolate is None else args.isolate
  args.repeats = args.repeats or (1 if args.quick else 10)
  args.compile_repeats = args.compile_repeats or (1 if args.quick else 3)
  if args.repeats < 1 or args.compile_repeats < 1:
    parser.error("--repeats and --compile-repeats must be >= 1")
  return args


def run_isolated(name: str, dtype_name: str, args) -> dict[str, Any]:
  """:func:`run_model` in a fresh process (this script, ``--child --no-isolate``); its result."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    command = [sys.executable, os.path.abspath(__file__), "--child", "--no-isolate", "--json", path]
    command += ["--models", name, "--dtypes", dtype_name, "--seed", str(args.seed)]
    command += ["--repeats", str(args.repeats), "--compile-repeats", str(args.compile_repeats)]
    command += ["--quick"] if args.quick else []
    # The child logs its progress to stderr as it runs; the tables are printed here at the end.
    done = subprocess.run(command, check=False)
    if not os.path.exists(path):
      raise RuntimeError(f"{' '.join(command)} exited with {done.returncode} and no result")
    with open(path) as f:
      (result,) = json.load(f)["results"]
  if "error" in result:
    raise RuntimeError(result["error"])
  return result


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.table:
    with open(args.table) as f:
      saved = json.load(f)
    print(report(saved["results"], saved["meta"]))
    return 0
  suite = QUICK_MODELS if args.quick else MODELS
  log = functools.partial(print, file=sys.stderr, flush=True)
  quiet = (lambda *a, **k: None) if args.child else log  # the parent logs these
  info = machine_info(args)
  quiet(
    f"convmm {info['convmm']}, jax {info['jax']}, flax {info['flax']} on {info['cpu']} "
    f"({info['cores']} cores, load {info['load_average'][0]:.1f})"
  )
  results, start = [], time.perf_counter()
  for name in args.models:
    for dtype_name in args.dtypes:
      spec = suite[name]
      model_start = time.perf_counter()
      try:
        if args.isolate:  # the child process logs the network and its progress
          result = run_isolated(name, dtype_name, args)
        else:
          log(f"{name} {dtype_name}: {spec.description}, batch {spec.image_shape[0]}")
          result = run_model(spec, dtype_name, args, log)
      except Exception as e:  # noqa: BLE001 - one failing network must not lose the others
        result = dict(model=name, dtype=dtype_name, error=f"{type(e).__name__}: {e}"[:2000])
        log(f"    failed: {result['error'][:500]}")
      else:
        q, err = result["ratios"], result["errors"]
        quiet(
          f"    {time.perf_counter() - model_start:.0f} s"
          + (" (own process)" if args.isolate else "")
          + f"; convmm/flax fwd {fmt(q['fwd'])}x, step {fmt(q['step'])}x, compile step "
          f"{fmt(q['compile_step'])}x; rel. err fwd {err['fwd']:.1e}, grads {err['grads']:.1e}"
        )
      results.append(result)
      if args.json:  # after every network, so that an interrupted run keeps what it measured
        write_json(args.json, info, results)
  quiet(f"done in {time.perf_counter() - start:.0f} s")
  if not args.child:
    print(report(results, info))
  if args.json:
    quiet(f"wrote {args.json}")
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
