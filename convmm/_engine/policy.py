"""Policy: the engine's choices that were measured, and the measurements behind each.

The rest of the engine says what is true: which kernels compute a convolution, which
convolutions and GEMMs are its derivatives, how work splits into tiles. Where several
correct programs exist, the choice among them is made here, because one of them ran
faster or held less memory on some machine, so that a reader of the derivative rules
need not hold the tuning too, and a change of machine or of XLA means one file to
revisit. One section per direction of the convolution (forward, input gradient,
kernel gradient): a per-direction choice of algorithm (XLA's own convolution or
im2col, say) belongs in its section.

Unless noted, figures are from XLA's CPU backend, one process, interleaved medians
of the operation in question; layers are named ``N x *spatial x C`` and kernel size.
Choices the engine makes wherever they apply, with no switch, are listed at the end
with their measurements.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from convmm._rules.shapes import ConvSpec

# ------------------------------------------------------------------------- memory

# A tile's working set larger than this is never materialised whole (see
# convmm._engine.budget). On CPU the budget is also a speed setting: XLA temporaries
# above glibc's 32 MiB mmap threshold are mapped afresh and page-faulted on every
# call, which can cost more than the GEMM, and smaller tiles stay in cache. 16 MiB
# against 32 (one process, three interleaved runs each): ResNet-18's bfloat16
# training step 0.635x Flax's time instead of 0.675x, float32 0.911x instead of
# 0.926x, the layer suite's step 0.43x lax's instead of 0.45x; the step compiles
# ~15% slower.
DEFAULT_MEMORY_BUDGET = 16 * 2**20

# A forward tile is costed at three patch matrices' worth, though it holds one:
# smaller tiles stay under glibc's mmap threshold and ran faster (a 1-D k=9 layer:
# 1.9x lax's time with three, 3.7x with one).
FORWARD_PATCH_COPIES = 3

# A kernel gradient's tile holds two: the patches and the GEMM's copy of them in the
# layout it wants (an estimate, not a measurement).
KERNEL_GRAD_PATCH_COPIES = 2

# ------------------------------------------------------------------------ forward


# convmm's forward kernels a method may name; the other methods leave the choice
# to forward_method (convmm._engine.kernels.choose_method).
ENGINES = ("im2col", "shift", "depthwise")


def forward_method(spec: ConvSpec) -> str:
  """The forward kernel of ``method='auto'``: 'depthwise' or 'im2col'.

  'depthwise' where each of several groups has a single input feature (and no
  batch groups): a multiply-accumulate over the taps, with no patches, beats a
  GEMM whose inner dimension is only the window size (the reason; no
  measurement against im2col was recorded). 'shift' is never chosen.
  """
  g = spec.geometry
  one_feature_per_group = g.in_features // spec.feature_group_count == 1
  if one_feature_per_group and spec.batch_group_count == 1 and spec.feature_group_count > 1:
    return "depthwise"
  return "im2col"


# XLA's CPU backend fuses a concatenation of at most 8 operands into one loop; a
# wider one is copied slice by slice and then concatenated. In two or more spatial
# dims, wider windows are unfolded in two fused stages instead (measured per layer
# against the wide concatenation: 9x9, 3x9 and 10x10 kernels' forward in 0.70-0.98x
# the time); a 1-D signal keeps the wide one, which ran faster there (the fused
# stages: 1.3-1.7x its time). See convmm._engine.im2col.tap_split.
MAX_FUSED_TAPS = 8


def two_stage_unfold(num_spatial: int) -> bool:
  """Whether windows wider than :data:`MAX_FUSED_TAPS` taps unfold in two fused stages."""
  return num_spatial > 1


# ----------------------------------------------------------------- input gradient


def input_grad_reverses_taps(spec: ConvSpec) -> bool:
  """Whether a unit-stride input gradient reverses its patches' taps instead of flipping the kernel.

  Either is the convolution of the cotangent with the flipped kernel
  (:func:`convmm._engine.gradients.input_grad_gemm`). A kernel as large as the
  cotangent's patches (deep layers, no groups): its taps are reversed in the patches
  instead of flipped, and the GEMM reads it with the contraction minor, so it is
  never transposed element by element. Measured per layer (8x4x4x512 3x3: 0.86x
  the time in float32, 0.70x in bfloat16); where the patches dominate, the plain
  GEMM was 3-6% faster.
  """
  g = spec.geometry
  groups = spec.feature_group_count * spec.batch_group_count
  return groups == 1 and 2 * g.in_features >= g.batch * math.prod(g.in_spatial)


# ---------------------------------------------------------------- kernel gradient

# A tiled kernel gradient uses the cotangent's patches only with this many input
# features at least: the rows of its GEMM x^T @ patches (see below).
MIN_GEMM_ROWS = 128


def kernel_grad_uses_cotangent_patches(
  spec: ConvSpec, input_grad_whole: bool, kernel_grad_tiled: bool
) -> bool:
  """Whether a unit-stride kernel gradient without groups uses the cotangent's patches.

  Such a kernel gradient is also ``x^T @`` the input gradient's own patches of the
  cotangent (:func:`convmm._engine.gradients.kernel_grad_from_cotangent_patches`),
  instead of patches of the input ``@`` the cotangent.

  Untiled (``input_grad_whole``), XLA builds those patches once for both
  gradients, in the backward pass. The patches of the input would be the
  forward's, which XLA then keeps from the forward pass to the backward (15.5 MiB
  of ResNet-18's float32 step temporaries at its peak), or rebuilt, and the
  scheduler builds them as soon as the input exists, in the forward pass too.

  Tiled, the kernel gradient walks the input gradient's tiles, each tile's ``x``
  against that tile's cotangent patches, where its own tiling
  (``kernel_grad_tiled``) is tiled too and the GEMM has rows enough
  (:data:`MIN_GEMM_ROWS` input features): that replaces the input's patches built
  transposed for the GEMM (an 8x28x28x128 3x3 layer's: 3.2 ms to unfold against
  0.75 for the cotangent's; its input and kernel gradients in 0.90-0.94x the time
  in float32, 0.97-0.99x in bfloat16). With 64 features the kernel gradient was
  slower (8x28x28x64 in bfloat16: 4.75 ms against 3.29; 2x8x28x28x64 3x3x3 in
  float32: 1.08x).

  Never for 1x1 kernels (whose patches are the input itself), nor where the
  cotangent's patches would be larger than the input's (more output features than
  input ones).
  """
  g = spec.geometry
  if g.num_taps == 1:
    return False
  if spec.out_features * math.prod(g.in_spatial) > g.in_features * math.prod(g.out_spatial):
    return False
  return input_grad_whole or (kernel_grad_tiled and g.in_features >= MIN_GEMM_ROWS)


def kernel_grad_taps_first(shares_forward_patches: bool) -> bool:
  """Whether a kernel gradient builds its own patches of the input transposed, ``(T, C, N, *out)``.

  Where neither the kernel gradient nor the forward is tiled, both build the same
  channels-last patches, which XLA computes once: the gradient keeps their layout.
  Elsewhere it builds its own transposed, which spares the GEMM's operand
  transposes (ResNet-18's tiled 7x7 stem and 3x3x64 layers: 0.83x and 0.92x the
  time of their forward and backward).
  """
  return not shares_forward_patches


def kernel_grad_patches_first(rows: int, depth: int, out_features: int) -> bool:
  """Whether the kernel gradient's GEMM is ``patches^T @ cotangent`` or ``cotangent^T @ patches``.

  For ``(rows, depth)`` channels-last patches and a ``(rows, out_features)``
  cotangent (no groups). XLA's CPU GEMM wants the contraction on its left
  operand's minor axis and transposes the left operand to get it. Patches first,
  the gradient comes out in the kernel's ``(depth, O)`` layout, at the price of
  transposing the patches; cotangent first, only the cotangent is transposed, but
  the gradient comes out as ``(O, depth)`` and every consumer (an optimizer's
  update) reads it transposed. Whichever moves fewer elements goes first. (With
  groups, the cotangent always goes first: XLA's fallback for a batched GEMM's
  transposed output lacks bfloat16 x bfloat16 -> float32.)
  """
  return rows * depth <= depth * out_features + rows * out_features


# ------------------------------------------------- who computes each direction
#
# Each direction of a convolution (forward, input gradient, kernel gradient) is
# computed by convmm's engine ("convmm") or by XLA's own convolution ("xla",
# convmm._engine.native); method="auto" takes this table's choice, deterministic,
# from shapes, dtypes and parameters (convmm._engine.directions applies it, and
# times both instead under method="autotune"). MEASUREMENTS: see direction_rule.

Directions = tuple[str, str, str]  # forward, input gradient, kernel gradient
CONVMM: Directions = ("convmm", "convmm", "convmm")
XLA: Directions = ("xla", "xla", "xla")

# Windows with more taps than this are unfolded by XLA's convolution, not im2col.
MAX_UNFOLDED_TAPS = 64


def direction_rule(spec: ConvSpec, dtype: Any, engine: str, backend: str) -> Directions:
  """``method='auto'``'s choice for each direction of ``spec`` on ``backend``.

  CPU: measured with ``python -m benchmarks.directions`` (each direction alone,
  both candidates, interleaved medians in one process) and whole training steps
  of every assignment, on a 2-core x86-64 CPU whose float32 GEMM ran at 190
  GFLOP/s and bfloat16 -> float32 at 190-370, jax 0.10.2, 2026-12-07.
  convmm / XLA, ms:

  ========================  =============  =============  =============
  float32 layer              forward        input grad     kernel grad
  ========================  =============  =============  =============
  8x28x28x128 3x3            12.9 / 10.1    12.8 / 10.0    12.5 / 14.9
  4x64x64x64 3x3             11.4 / 11.8    11.2 / 11.9    13.1 / 13.7
  32x28x28x1 3x3 (MNIST)     0.51 / 0.35    2.52 / 1.16    0.61 / 0.72
  32x14x14x32 3x3 (MNIST)    2.03 / 2.39    2.74 / 2.39    2.22 / 2.95
  8x112x112x3 7x7/2          5.16 / 5.18    7.09 / 9.91    4.92 / 6.54
  8x56x56x64 3x3/2           6.93 / 9.68    6.92 / 7.29    7.02 / 9.84
  8x28x28x256 1x1            2.02 / 2.69    1.43 / 2.55    3.26 / 6.63
  8x4096x64 k=9 (1-D)        17.8 / 13.6    17.8 / 13.5    24.5 / 17.1
  the same, 2026-12-08:
  8x28x28x128 3x3            13.8 / 10.6    13.8 / 11.0    13.7 / 15.8
  8x28x28x128 3x3 dilated 2  14.1 / 15.2    14.0 / 11.3    13.9 / 18.0
  ========================  =============  =============  =============

  In bfloat16 convmm won every direction of every layer (XLA's CPU convolution
  has no fast bfloat16 kernel: 8x28x28x128 3x3 forward 6.6 / 10.8), and grouped
  convolutions by far (4 groups of 8x28x28x128 3x3: kernel gradient 6.6 / 280).
  Hence, for float32 convolutions without groups or input dilation:

  * 1-D: XLA's in every direction (whole step 44 ms against 56-64 with any
    convmm direction, lax 44);
  * 2-D with a window of more than one tap: the forward is XLA's with few
    (<= 4) input features, or unit strides and many (>= 128), the input
    gradient XLA's with unit strides, the kernel gradient convmm's;
  * 1x1 kernels: convmm's, but for XLA's strided forward;
  * 3-D, other dtypes, groups, input dilation: convmm's.

  (The dilated layer's forward, 8% apart, stays with the unit-stride rule: its whole
  step under this table was 35.5 ms against lax's 37.7.) The layer suite
  (``python -m benchmarks.bench``) added two forwards to these:
  a 4x224x224x3 7x7/2 stem (convmm's tiled forward 22.0 ms, XLA's 11.4) and an
  8x56x56x256 1x1/2 projection (17.1 against 12.3).

  Windows of more than :data:`MAX_UNFOLDED_TAPS` taps (lax's own kernel-gradient
  convolutions, met by ``replace_convs(jax.grad(f))``) are XLA's forward:
  im2col unfolds them tap by tap, and compile time grows with the taps.

  Other backends have no measurements here: XLA's convolution in every
  direction, except the depthwise multiply-accumulate, which stays convmm's.
  """
  if backend != "cpu":
    return CONVMM if engine == "depthwise" else XLA
  g = spec.geometry
  if engine == "im2col" and g.num_taps > MAX_UNFOLDED_TAPS:
    return ("xla", "convmm", "convmm")
  dense = (
    engine == "im2col"
    and spec.feature_group_count == 1
    and spec.batch_group_count == 1
    and all(d == 1 for d in g.lhs_dilation)
    and np.dtype(dtype) == np.float32
  )
  if not dense or g.num_spatial not in (1, 2):
    return CONVMM
  unit_strides = all(s == 1 for s in g.window_strides)
  if g.num_taps == 1:  # a GEMM either way; XLA's strided one skips the strided copy
    return ("convmm" if unit_strides else "xla", "convmm", "convmm")
  if g.num_spatial == 1:
    return XLA
  features = g.in_features
  forward = "xla" if features <= 4 or (unit_strides and features >= 128) else "convmm"
  return (forward, "xla" if unit_strides else "convmm", "convmm")


# --------------------------------------------------------------- fixed choices
#
# Made wherever they apply; the measurements that chose them:
#
# - Grouped forward (convmm._engine.kernels._im2col_gemm): each group's slice of the
#   input gets its own patch matrix, so the patches never move for the batched GEMM
#   (the grouped 8x28x28x128 3x3 layer's forward: 0.62x the time of transposed
#   patches in float32, 0.49x in bfloat16).
# - Depthwise kernel gradient (convmm._engine.gradients.depthwise_kernel_grad): one
#   lax.map over the taps with dynamic offsets, not a static slice per tap (with
#   static slices XLA's scheduler made every tap's slice in the forward pass and kept
#   them for the backward: MobileNetV2's float32 training step, 218 MiB of
#   temporaries against 129); with unit strides, on flattened positions with the input
#   read in place (_flat_depthwise_kernel_grad: the 8x56x56x96 3x3 layer's kernel
#   gradient in 0.29x the time of strided windows of the padded input).
