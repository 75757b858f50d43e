"""The benchmark suite: convolution layers from real networks, and their FLOP model.

Each :class:`Layer` is one call of ``conv_general_dilated``, ``conv_transpose`` or
``conv_adjoint`` with the same arguments for every implementation. :func:`gemm_of` gives
the GEMM that im2col turns the layer into, whose ``M, K, N`` set the useful FLOPs and the
bare-GEMM ceiling the measurements are compared with.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One benchmark layer: an ``op`` applied to an input and a kernel.

  ``op`` is ``"conv"`` (``conv_general_dilated``), ``"transpose"``
  (``conv_transpose``) or ``"adjoint"`` (``conv_adjoint``; ``lhs_shape`` is then the
  cotangent's shape and ``kwargs["lhs_shape"]`` the forward input's). ``kwargs`` are
  passed to the op unchanged, identically for convmm and lax.
  """

  name: str
  source: str
  op: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  kwargs: dict[str, Any]


def conv_layer(name, source, lhs, rhs, strides, padding, dn=NHWC, groups=1, dilation=None):
  nsp = len(lhs) - 2
  kwargs = dict(
    window_strides=(strides,) * nsp,
    padding=((padding, padding),) * nsp,
    rhs_dilation=None if dilation is None else (dilation,) * nsp,
    dimension_numbers=dn,
    feature_group_count=groups,
  )
  return Layer(name, source, "conv", lhs, rhs, kwargs)


SUITE = [
  conv_layer("resnet3x3", "ResNet-18 conv3_x", (8, 28, 28, 128), (3, 3, 128, 128), 1, 1),
  conv_layer("resnet3x3_s2", "ResNet-18 conv3_1, stride 2", (8, 56, 56, 64), (3, 3, 64, 128), 2, 1),
  conv_layer("stem7x7_s2", "ResNet stem 7x7/2, 224x224 RGB", (4, 224, 224, 3), (7, 7, 3, 64), 2, 3),
  conv_layer("proj1x1", "ResNet-50 bottleneck expand 1x1", (8, 56, 56, 64), (1, 1, 64, 256), 1, 0),
  conv_layer("proj1x1_s2", "ResNet-50 shortcut 1x1/2", (8, 56, 56, 256), (1, 1, 256, 512), 2, 0),
  conv_layer(
    "depthwise3x3",
    "MobileNetV2 depthwise",
    (8, 56, 56, 96),
    (3, 3, 1, 96),
    1,
    1,
    groups=96,
  ),
  conv_layer(
    "grouped3x3",
    "ResNeXt 8 groups",
    (8, 28, 28, 128),
    (3, 3, 16, 128),
    1,
    1,
    groups=8,
  ),
  conv_layer(
    "dilated3x3", "DeepLab atrous 3x3, rate 2", (8, 28, 28, 128), (3, 3, 128, 128), 1, 2, dilation=2
  ),
  conv_layer(
    "audio1d_k9",
    "1-D audio conv k=9 (wav2letter-like)",
    (8, 2048, 64),
    (9, 64, 64),
    1,
    4,
    dn=("NWC", "WIO", "NWC"),
  ),
  conv_layer(
    "video3d",
    "C3D-like 3x3x3 video conv",
    (2, 8, 28, 28, 64),
    (3, 3, 3, 64, 64),
    1,
    1,
    dn=("NDHWC", "DHWIO", "NDHWC"),
  ),
  Layer(
    "unet_transpose",
    "U-Net up-conv 4x4/2 via conv_transpose",
    "transpose",
    (16, 28, 28, 128),
    (4, 4, 128, 64),
    dict(strides=(2, 2), padding="SAME", dimension_numbers=NHWC),
  ),
  Layer(
    "unet_adjoint",
    "U-Net up-conv 4x4/2 via conv_adjoint",
    "adjoint",
    (16, 28, 28, 128),
    (4, 4, 64, 128),
    dict(
      lhs_shape=(16, 56, 56, 64),
      window_strides=(2, 2),
      padding=((1, 1), (1, 1)),
      dimension_numbers=NHWC,
    ),
  ),
  conv_layer(
    "nchw3x3",
    "ResNet-18 conv2_x in NCHW/OIHW",
    (8, 64, 56, 56),
    (64, 64, 3, 3),
    1,
    1,
    dn=("NCHW", "OIHW", "NCHW"),
  ),
]

QUICK_SUITE = [
  conv_layer("tiny3x3_s2", "small 3x3/2 (smoke test)", (2, 16, 16, 8), (3, 3, 8, 16), 2, 1),
  Layer(
    "tiny_adjoint",
    "small 4x4/2 adjoint (smoke test)",
    "adjoint",
    (2, 8, 8, 16),
    (4, 4, 8, 16),
    dict(
      lhs_shape=(2, 16, 16, 8),
      window_strides=(2, 2),
      padding=((1, 1), (1, 1)),
      dimension_numbers=NHWC,
    ),
  ),
]

# The memory target: a 32x112x112x64 input with a 3x3 kernel (a ~900 MiB patch
# matrix if built whole) must compile to <= 160 MiB of temporary memory for the forward, and
# a training step to <= lax's + 160 MiB. Only compiled, never run.
MEMORY_CASE = conv_layer(
  "memory_target", "32x112x112x64 3x3, compiled only", (32, 112, 112, 64), (3, 3, 64, 64), 1, 1
)
MEMORY_ALLOWANCE = 160 * 2**20


def select_layers(suite: list[Layer], patterns: str | None) -> list[Layer]:
  """The layers whose names match any of the comma-separated globs (all if none)."""
  if not patterns:
    return suite
  wanted = [p.strip() for p in patterns.split(",") if p.strip()]
  chosen = [layer for layer in suite if any(fnmatch.fnmatch(layer.name, p) for p in wanted)]
  if not chosen:
    names = ", ".join(layer.name for layer in suite)
    raise SystemExit(
      f"benchmarks.bench: --layers {patterns!r} matches no layer; layers are: {names}"
    )
  return chosen


# ------------------------------------------------------------------ shapes and flops


@dataclasses.dataclass(frozen=True)
class Gemm:
  """The GEMM of the forward convolution: ``groups`` products ``(M, K) @ (K, N)``.

  For ``transpose``/``adjoint`` layers it is the GEMM of the forward conv they are the
  adjoint of (same useful FLOPs; the zeros of a dilated input are not counted).
  """

  groups: int
  m: int
  k: int
  n: int
  taps: int

  @property
  def flops(self) -> int:
    return 2 * self.groups * self.m * self.k * self.n


def forward_conv_of(layer: Layer) -> tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]:
  """``(lhs_shape, rhs_shape, conv kwargs)`` of the forward conv doing the layer's work."""
  if layer.op == "conv":
    return layer.lhs_shape, layer.rhs_shape, layer.kwargs
  if layer.op == "adjoint":
    kwargs = dict(layer.kwargs)
    return kwargs.pop("lhs_shape"), layer.rhs_shape, kwargs
  # conv_transpose(x, w) is the adjoint of a strided conv from its output back to x's
  # shape, with w's I and O swapped: the same taps and multiply-adds.
  dn = lax.conv_dimension_numbers(
    layer.lhs_shape, layer.rhs_shape, layer.kwargs["dimension_numbers"]
  )
  out = jax.eval_shape(
    lambda x, w: lax.conv_transpose(x, w, **layer.kwargs),
    jax.ShapeDtypeStruct(layer.lhs_shape, jnp.float32),
    jax.ShapeDtypeStruct(layer.rhs_shape, jnp.float32),
  ).shape
  rhs = list(layer.rhs_shape)
  rhs[dn.rhs_spec[0]], rhs[dn.rhs_spec[1]] = rhs[dn.rhs_spec[1]], rhs[dn.rhs_spec[0]]
  kwargs = dict(
    window_strides=layer.kwargs["strides"],
    padding="SAME",
    dimension_numbers=layer.kwargs["dimension_numbers"],
  )
  return tuple(out), tuple(rhs), kwargs


def gemm_of(layer: Layer) -> Gemm:
  lhs_shape, rhs_shape, kwargs = forward_conv_of(layer)
  dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, kwargs.get("dimension_numbers"))
  out = jax.eval_shape(
    lambda x, w: lax.conv_general_dilated(x, w, **kwargs),
    jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
    jax.ShapeDtypeStruct(rhs_shape, jnp.float32),
  ).shape
  groups = kwargs.get("feature_group_count", 1)
  taps = math.prod(rhs_shape[d] for d in dn.rhs_spec[2:])
  m = math.prod(out[d] for d in (dn.out_spec[0], *dn.out_spec[2:]))
  return Gemm(
    groups, m, taps * rhs_shape[dn.rhs_spec[1]], rhs_shape[dn.rhs_spec[0]] // groups, taps
  )
