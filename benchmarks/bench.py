"""Benchmark suite: convmm against jax.lax (and PyTorch CPU) on layers from real networks.

For every layer it measures, in one process with interleaved repetitions after a
warm-up call, the median time of

* the forward pass, and
* a training step: ``jax.value_and_grad`` of ``sum(y**2)`` w.r.t. input and kernel
  (PyTorch: forward + backward of the same loss with both tensors requiring grad),

for convmm, lax and PyTorch, plus the ratios, GFLOP/s, the fraction of the throughput
XLA reaches on this machine for a plain GEMM of the same ``M, K, N`` (the practical
ceiling of im2col + GEMM), compile time (``lower`` + ``compile``), and the temporary
memory XLA reserves (``compiled.memory_analysis().temp_size_in_bytes``). It also checks
once per layer that convmm's output and gradients match lax's and records the errors.

Examples:
  python benchmarks/bench.py                          # full suite (a few minutes)
  python benchmarks/bench.py --quick --json out.json  # CI smoke test (seconds)
  python benchmarks/bench.py --layers 'depthwise*,unet*' --reps 11
  python benchmarks/bench.py --variant method=shift   # add a convmm variant to compare

Extra convmm variants (keyword arguments passed to every convmm call) go in
``CONVMM_VARIANTS`` below or on the command line with ``--variant``, e.g.
``--variant method=im2col --variant memory_budget=16777216``.

Reading the numbers: XLA:CPU allocates a program's temporary buffer on every call, and glibc
serves allocations above its mmap threshold (at most 32 MiB) with fresh pages, so a program
whose ``temp`` exceeds ~32 MiB page-faults through all of it on every call (the "page
faults/call" column; roughly 0.75 us per 4 KiB page here). That cost is real for users and
is measured as such; to see a run without it, start the process with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483648``.
On a busy machine prefer ``--stat min``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import fnmatch
import functools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import convmm

# PyTorch's OpenMP threads otherwise busy-wait after each call: in the interleaved loop they
# steal the cores from the next (JAX) call, and on a shared machine every barrier stalls
# (measured here: a 2x16x16x8 conv took 50 ms with 2 spinning threads, 0.05 ms passive).
# Set OMP_WAIT_POLICY yourself to override; it must be set before PyTorch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
  import torch
  import torch.nn.functional as torch_functional
except ImportError:  # PyTorch is an optional reference.
  torch = None

# Named convmm variants: keyword arguments added to every convmm call. The baseline is
# "convmm" with no extra arguments; add e.g. {"convmm[shift]": {"method": "shift"}}.
CONVMM_VARIANTS: dict[str, dict[str, Any]] = {"convmm": {}}

NHWC = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------- layers


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


def _conv(name, source, lhs, rhs, strides, padding, dn=NHWC, groups=1, dilation=None):
  nsp = len(lhs) - 2
  kwargs = dict(window_strides=(strides,) * nsp, padding=((padding, padding),) * nsp,
                rhs_dilation=None if dilation is None else (dilation,) * nsp,
                dimension_numbers=dn, feature_group_count=groups)
  return Layer(name, source, "conv", lhs, rhs, kwargs)


SUITE = [
    _conv("resnet3x3", "ResNet-18 conv3_x (issue table)", (8, 28, 28, 128), (3, 3, 128, 128),
          1, 1),
    _conv("resnet3x3_s2", "ResNet-18 conv3_1, stride 2", (8, 56, 56, 64), (3, 3, 64, 128), 2, 1),
    _conv("stem7x7_s2", "ResNet stem 7x7/2, 224x224 RGB", (4, 224, 224, 3), (7, 7, 3, 64), 2, 3),
    _conv("proj1x1", "ResNet-50 bottleneck expand 1x1", (8, 56, 56, 64), (1, 1, 64, 256), 1, 0),
    _conv("proj1x1_s2", "ResNet-50 shortcut 1x1/2", (8, 56, 56, 256), (1, 1, 256, 512), 2, 0),
    _conv("depthwise3x3", "MobileNetV2 depthwise (issue table)", (8, 56, 56, 96), (3, 3, 1, 96),
          1, 1, groups=96),
    _conv("grouped3x3", "ResNeXt 8 groups (issue table)", (8, 28, 28, 128), (3, 3, 16, 128),
          1, 1, groups=8),
    _conv("dilated3x3", "DeepLab atrous 3x3, rate 2", (8, 28, 28, 128), (3, 3, 128, 128), 1, 2,
          dilation=2),
    _conv("audio1d_k9", "1-D audio conv k=9 (wav2letter-like)", (8, 2048, 64), (9, 64, 64), 1, 4,
          dn=("NWC", "WIO", "NWC")),
    _conv("video3d", "C3D-like 3x3x3 video conv", (2, 8, 28, 28, 64), (3, 3, 3, 64, 64), 1, 1,
          dn=("NDHWC", "DHWIO", "NDHWC")),
    Layer("unet_transpose", "U-Net up-conv 4x4/2 via conv_transpose (issue table)", "transpose",
          (16, 28, 28, 128), (4, 4, 128, 64),
          dict(strides=(2, 2), padding="SAME", dimension_numbers=NHWC)),
    Layer("unet_adjoint", "U-Net up-conv 4x4/2 via conv_adjoint", "adjoint",
          (16, 28, 28, 128), (4, 4, 64, 128),
          dict(lhs_shape=(16, 56, 56, 64), window_strides=(2, 2), padding=((1, 1), (1, 1)),
               dimension_numbers=NHWC)),
    _conv("nchw3x3", "ResNet-18 conv2_x in NCHW/OIHW", (8, 64, 56, 56), (64, 64, 3, 3), 1, 1,
          dn=("NCHW", "OIHW", "NCHW")),
]

QUICK_SUITE = [
    _conv("tiny3x3_s2", "small 3x3/2 (smoke test)", (2, 16, 16, 8), (3, 3, 8, 16), 2, 1),
    Layer("tiny_adjoint", "small 4x4/2 adjoint (smoke test)", "adjoint", (2, 8, 8, 16),
          (4, 4, 8, 16), dict(lhs_shape=(2, 16, 16, 8), window_strides=(2, 2),
                              padding=((1, 1), (1, 1)), dimension_numbers=NHWC)),
]


# ------------------------------------------------------------------ implementations


@dataclasses.dataclass(frozen=True)
class JaxImpl:
  """The three public entry points of one JAX implementation."""

  conv_general_dilated: Callable[..., jax.Array]
  conv_transpose: Callable[..., jax.Array]
  conv_adjoint: Callable[..., jax.Array]

  def apply(self, layer: Layer, x: jax.Array, w: jax.Array) -> jax.Array:
    op = {"conv": self.conv_general_dilated, "transpose": self.conv_transpose,
          "adjoint": self.conv_adjoint}[layer.op]
    return op(x, w, **layer.kwargs)


def lax_conv_adjoint(cotangent, rhs, lhs_shape, window_strides, padding, rhs_dilation=None,
                     dimension_numbers=None):
  """The adjoint of a forward conv, the way lax computes it: ``lax.conv_transpose``
  with ``transpose_kernel=True`` and the padding that reproduces ``lhs_shape``."""
  dn = lax.conv_dimension_numbers(lhs_shape, rhs.shape, dimension_numbers)
  nsp = len(lhs_shape) - 2
  rhs_dilation = rhs_dilation or (1,) * nsp
  pads = []
  for i in range(nsp):
    size = lhs_shape[dn.lhs_spec[2 + i]]
    k_eff = (rhs.shape[dn.rhs_spec[2 + i]] - 1) * rhs_dilation[i] + 1
    lo, hi = padding[i]
    # The forward conv drops `rest` trailing input rows; the adjoint must give them back.
    rest = (size + lo + hi - k_eff) % window_strides[i]
    pads.append((k_eff - 1 - lo, k_eff - 1 - hi + rest))
  return lax.conv_transpose(cotangent, rhs, window_strides, pads, rhs_dilation,
                            dimension_numbers, transpose_kernel=True)


LAX = JaxImpl(lax.conv_general_dilated, lax.conv_transpose, lax_conv_adjoint)


def convmm_impl(**kwargs) -> JaxImpl:
  if not kwargs:
    return JaxImpl(convmm.conv_general_dilated, convmm.conv_transpose, convmm.conv_adjoint)
  return JaxImpl(functools.partial(convmm.conv_general_dilated, **kwargs),
                 functools.partial(convmm.conv_transpose, **kwargs),
                 functools.partial(convmm.conv_adjoint, **kwargs))


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
  """``"method=shift,budget=1e6"`` -> ``("convmm[method=shift,budget=1e6]", {...})``."""
  kwargs = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise argparse.ArgumentTypeError(f"--variant: expected key=value, got {item!r}")
    try:
      kwargs[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      kwargs[key.strip()] = value.strip()
  return f"convmm[{text}]", kwargs


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
  dn = lax.conv_dimension_numbers(layer.lhs_shape, layer.rhs_shape,
                                  layer.kwargs["dimension_numbers"])
  out = jax.eval_shape(lambda x, w: LAX.apply(layer, x, w),
                       jax.ShapeDtypeStruct(layer.lhs_shape, jnp.float32),
                       jax.ShapeDtypeStruct(layer.rhs_shape, jnp.float32)).shape
  rhs = list(layer.rhs_shape)
  rhs[dn.rhs_spec[0]], rhs[dn.rhs_spec[1]] = rhs[dn.rhs_spec[1]], rhs[dn.rhs_spec[0]]
  kwargs = dict(window_strides=layer.kwargs["strides"], padding="SAME",
                dimension_numbers=layer.kwargs["dimension_numbers"])
  return tuple(out), tuple(rhs), kwargs


def gemm_of(layer: Layer) -> Gemm:
  lhs_shape, rhs_shape, kwargs = forward_conv_of(layer)
  dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, kwargs.get("dimension_numbers"))
  out = jax.eval_shape(
      lambda x, w: lax.conv_general_dilated(x, w, **kwargs),
      jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
      jax.ShapeDtypeStruct(rhs_shape, jnp.float32)).shape
  groups = kwargs.get("feature_group_count", 1)
  taps = math.prod(rhs_shape[d] for d in dn.rhs_spec[2:])
  m = math.prod(out[d] for d in (dn.out_spec[0], *dn.out_spec[2:]))
  return Gemm(groups, m, taps * rhs_shape[dn.rhs_spec[1]], rhs_shape[dn.rhs_spec[0]] // groups,
              taps)


# ------------------------------------------------------------------------ PyTorch


def lax_transpose_pads(k: int, s: int, padding: Any) -> tuple[int, int]:
  """The (low, high) pads lax.conv_transpose applies to the ``s``-dilated input."""
  if padding == "SAME":
    pad_len = k + s - 2
    lo = k - 1 if s > k - 1 else math.ceil(pad_len / 2)
    return lo, pad_len - lo
  if padding == "VALID":
    return k - 1, k + s - 2 + max(k - s, 0) - (k - 1)
  return tuple(padding)


def torch_ops(layer: Layer, x: np.ndarray, w: np.ndarray):
  """PyTorch tensors and a forward function computing the layer in PyTorch's layout.

  PyTorch runs in its default contiguous ``(N, C, *spatial)`` layout, as users call it.
  Returns ``(x_t, w_t, forward, to_torch_layout)``; ``to_torch_layout`` maps a lax
  output to PyTorch's layout for the agreement check.
  """
  kw = layer.kwargs
  dn = lax.conv_dimension_numbers(x.shape, w.shape, kw["dimension_numbers"])
  nsp = x.ndim - 2
  x_t = torch.from_numpy(np.array(np.transpose(x, dn.lhs_spec), order="C"))
  to_torch_layout = lambda y: np.transpose(np.asarray(y), dn.out_spec)
  k = [w.shape[d] for d in dn.rhs_spec[2:]]
  in_sp = [x.shape[d] for d in dn.lhs_spec[2:]]
  if layer.op == "conv":
    w_t = np.transpose(w, dn.rhs_spec)
    if any(lo != hi for lo, hi in kw["padding"]):
      raise ValueError(f"{layer.name}: PyTorch needs symmetric padding, got {kw['padding']}")
    forward = functools.partial(
        getattr(torch_functional, f"conv{nsp}d"), stride=kw["window_strides"],
        padding=[lo for lo, _ in kw["padding"]], dilation=kw["rhs_dilation"] or 1,
        groups=kw["feature_group_count"])
  elif layer.op == "transpose":
    # lax correlates the dilated, (lo, hi)-padded input with w; PyTorch pads with
    # (k-1-p, k-1-p+output_padding) and correlates with the flipped (I, O, ...) kernel.
    w_t = np.flip(np.transpose(w, (dn.rhs_spec[1], dn.rhs_spec[0], *dn.rhs_spec[2:])),
                  axis=tuple(range(2, 2 + nsp)))
    pads = [lax_transpose_pads(k_, s, kw["padding"] if isinstance(kw["padding"], str) else p)
            for k_, s, p in zip(k, kw["strides"], kw["padding"])]
    forward = functools.partial(
        getattr(torch_functional, f"conv_transpose{nsp}d"), stride=kw["strides"],
        padding=[k_ - 1 - lo for k_, (lo, _) in zip(k, pads)],
        output_padding=[hi - lo for lo, hi in pads])
  else:
    # PyTorch's transposed conv is the adjoint of its conv with the same (O, I, ...) weight.
    w_t = np.transpose(w, dn.rhs_spec)
    fwd_dn = lax.conv_dimension_numbers(kw["lhs_shape"], w.shape, kw["dimension_numbers"])
    out_sp = [kw["lhs_shape"][d] for d in fwd_dn.lhs_spec[2:]]
    pads = [lo for lo, _ in kw["padding"]]
    strides = kw["window_strides"]
    forward = functools.partial(
        getattr(torch_functional, f"conv_transpose{nsp}d"), stride=strides, padding=pads,
        output_padding=[o - ((i - 1) * s - 2 * p + k_)
                        for o, i, s, p, k_ in zip(out_sp, in_sp, strides, pads, k)])
  return x_t, torch.from_numpy(np.array(w_t, order="C")), forward, to_torch_layout


# ---------------------------------------------------------------------- measuring


def compile_timed(fn: Callable, *args) -> tuple[Any, dict[str, Any]]:
  """``jax.jit(fn)`` compiled for ``args``, with lower/compile seconds and temporary bytes."""
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  memory = compiled.memory_analysis()
  return compiled, dict(
      compile_s=end - start, lower_s=lowered_at - start, xla_compile_s=end - lowered_at,
      temp_bytes=None if memory is None else int(memory.temp_size_in_bytes))


def warm_up_compiler(jax_impls: dict[str, JaxImpl]) -> None:
  """Pays one-time tracing and XLA start-up costs before any compile time is measured."""
  layer = _conv("warm_up", "", (1, 4, 4, 2), (2, 2, 2, 2), 1, 0)
  x, w = random_operands(layer, 0)
  for impl in jax_impls.values():
    forward = functools.partial(impl.apply, layer)
    for fn in (forward, training_step(forward)):
      try:
        jax.block_until_ready(jax.jit(fn)(x, w))
      except Exception:  # noqa: BLE001 -- measure_layer reports broken implementations
        pass


def training_step(forward: Callable) -> Callable:
  """``value_and_grad`` of ``sum(y**2)`` with respect to input and kernel."""
  return jax.value_and_grad(lambda x, w: jnp.sum(forward(x, w) ** 2), argnums=(0, 1))


def max_error(actual, expected) -> float:
  """``max|a - e| / max(1, max|e|)``: the measure of tests/tolerances.py's atol."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  if actual.shape != expected.shape:
    return math.inf
  return float(np.max(np.abs(actual - expected), initial=0.0)
               / max(1.0, float(np.max(np.abs(expected), initial=0.0))))


def random_operands(layer: Layer, seed: int) -> tuple[jax.Array, jax.Array]:
  """Input ~ N(0, 1) and kernel ~ N(0, 1/fan_in), so outputs are O(1)."""
  key_x, key_w = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(key_x, layer.lhs_shape, jnp.float32)
  fan_in = math.prod(layer.rhs_shape) / max(layer.rhs_shape)  # all but the widest axis
  w = jax.random.normal(key_w, layer.rhs_shape, jnp.float32) / math.sqrt(fan_in)
  return x, w


STATISTICS = {"median": statistics.median, "min": min}


def summary_ms(samples: list[float], stat: str) -> float | None:
  return 1e3 * STATISTICS[stat](samples) if samples else None


def measure_layer(layer: Layer, jax_impls: dict[str, JaxImpl], args, log) -> dict[str, Any]:
  """Compiles, checks and times one layer for every implementation."""
  x, w = random_operands(layer, args.seed)
  gemm = gemm_of(layer)
  out_shape = jax.eval_shape(lambda a, b: LAX.apply(layer, a, b), x, w).shape
  impls: dict[str, dict[str, Any]] = {}
  runners: dict[tuple[str, str], Callable[[], Any]] = {}
  outputs: dict[str, dict[str, Any]] = {}

  for name, impl in jax_impls.items():
    record = impls[name] = {"error": None}
    forward = functools.partial(impl.apply, layer)
    try:
      executables = {}
      for mode, fn in (("fwd", forward), ("step", training_step(forward))):
        executables[mode], stats = compile_timed(fn, x, w)
        if args.dump_hlo:
          path = os.path.join(args.dump_hlo, f"{layer.name}.{name}.{mode}.txt")
          with open(path, "w") as f:
            f.write(executables[mode].as_text())
        record[f"compile_{mode}_s"] = stats["compile_s"]
        record[f"lower_{mode}_s"] = stats["lower_s"]
        record[f"xla_compile_{mode}_s"] = stats["xla_compile_s"]
        record[f"temp_{mode}_bytes"] = stats["temp_bytes"]
      fwd, step = executables["fwd"], executables["step"]
      y = jax.block_until_ready(fwd(x, w))  # warm-up calls, kept for the agreement check
      loss, (dx, dw) = jax.block_until_ready(step(x, w))
    except Exception as e:  # noqa: BLE001 -- report a broken implementation, keep going
      record["error"] = f"{type(e).__name__}: {e}"[:500]
      log(f"    {name} failed: {record['error'][:200]}")
      continue
    outputs[name] = dict(fwd=y, loss=loss, dlhs=dx, drhs=dw)
    runners[name, "fwd"] = lambda fwd=fwd: fwd(x, w).block_until_ready()
    runners[name, "step"] = lambda step=step: jax.block_until_ready(step(x, w))

  # The ceiling: XLA's own GEMM of the same (groups,) M, K, N.
  key_a, key_b = jax.random.split(jax.random.key(args.seed + 1))
  batch = (gemm.groups,) if gemm.groups > 1 else ()
  a = jax.random.normal(key_a, (*batch, gemm.m, gemm.k), jnp.float32)
  b = jax.random.normal(key_b, (*batch, gemm.k, gemm.n), jnp.float32)
  matmul, _ = compile_timed(jnp.matmul, a, b)
  matmul(a, b).block_until_ready()
  runners["gemm", "fwd"] = lambda: matmul(a, b).block_until_ready()

  torch_errors = {}
  if torch is not None and not args.no_torch:
    record = impls["torch"] = {"error": None}
    try:
      x_t, w_t, forward_t, to_torch_layout = torch_ops(layer, np.asarray(x), np.asarray(w))
      x_g, w_g = x_t.clone().requires_grad_(), w_t.clone().requires_grad_()

      def torch_fwd():
        with torch.no_grad():
          return forward_t(x_t, w_t)

      def torch_step():
        x_g.grad = w_g.grad = None
        loss = (forward_t(x_g, w_g) ** 2).sum()
        loss.backward()
        return loss

      torch_errors["fwd"] = max_error(torch_fwd().numpy(), to_torch_layout(outputs["lax"]["fwd"])
                                      if "lax" in outputs else np.nan)
      torch_step()
      runners["torch", "fwd"], runners["torch", "step"] = torch_fwd, torch_step
    except Exception as e:  # noqa: BLE001
      record["error"] = f"{type(e).__name__}: {e}"[:500]
      log(f"    torch failed: {record['error']}")

  samples: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
  # Minor page faults per call: XLA allocates its temporary buffer afresh for every call,
  # and above glibc's mmap threshold (32 MiB) each page of it faults again every time.
  faults: dict[tuple[str, str], list[int]] = {key: [] for key in runners}
  order = list(runners)
  start = time.perf_counter()
  reps = 0
  for rep in range(args.reps):
    for key in order[rep % len(order):] + order[: rep % len(order)]:  # rotate the order
      faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      runners[key]()
      samples[key].append(time.perf_counter() - t0)
      faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    reps += 1
    if reps >= args.min_reps and time.perf_counter() - start > args.max_seconds:
      break

  gemm_ms = summary_ms(samples["gemm", "fwd"], args.stat)
  for name, record in impls.items():
    if record["error"] is not None:
      continue
    for mode, flops, gemm_calls in (("fwd", gemm.flops, 1), ("step", 3 * gemm.flops, 3)):
      ms = summary_ms(samples[name, mode], args.stat)
      record[f"{mode}_ms"] = ms  # the statistic chosen by --stat (median by default)
      record[f"{mode}_median_ms"] = summary_ms(samples[name, mode], "median")
      record[f"{mode}_min_ms"] = summary_ms(samples[name, mode], "min")
      record[f"{mode}_page_faults"] = int(statistics.median(faults[name, mode]))
      record[f"{mode}_samples_ms"] = [1e3 * s for s in samples[name, mode]]
      record[f"gflops_{mode}"] = flops / ms / 1e6
      # A step is three GEMMs of this size (forward, input and kernel gradients).
      record[f"gemm_fraction_{mode}"] = gemm_calls * gemm_ms / ms

  errors, ratios = {}, {}
  # The longest sum behind any compared value (output: K; input grad: taps * N;
  # kernel grad: M), which is what the tolerance of a float comparison scales with.
  reduction = max(gemm.m, gemm.k, gemm.taps * gemm.n)
  for name in jax_impls:
    if name == "lax":
      continue
    if name in outputs and "lax" in outputs:
      errors[name] = {key: max_error(outputs[name][key], outputs["lax"][key])
                      for key in ("fwd", "loss", "dlhs", "drhs")}
      errors[name]["reduction"] = reduction
    if impls[name]["error"] is None:
      ratios[name] = layer_ratios(impls, name)
  if torch_errors:
    errors["torch"] = torch_errors

  return dict(
      name=layer.name, source=layer.source, op=layer.op, lhs_shape=list(layer.lhs_shape),
      rhs_shape=list(layer.rhs_shape), out_shape=list(out_shape), kwargs=layer.kwargs,
      gemm=dict(dataclasses.asdict(gemm), flops=gemm.flops, ms=gemm_ms),
      flops=dict(fwd=gemm.flops, step=3 * gemm.flops), reps=reps,
      seconds=time.perf_counter() - start, impls=impls, ratios=ratios, errors=errors)


def layer_ratios(impls: dict[str, dict[str, Any]], name: str) -> dict[str, float | None]:
  """convmm variant ``name`` over lax and torch: time, compile time, temporary memory."""
  def ratio(key, other):
    a, b = impls.get(name, {}).get(key), impls.get(other, {}).get(key)
    return a / b if a is not None and b else None

  return dict(
      fwd_vs_lax=ratio("fwd_ms", "lax"), step_vs_lax=ratio("step_ms", "lax"),
      fwd_vs_torch=ratio("fwd_ms", "torch"), step_vs_torch=ratio("step_ms", "torch"),
      compile_fwd_vs_lax=ratio("compile_fwd_s", "lax"),
      compile_step_vs_lax=ratio("compile_step_s", "lax"),
      temp_fwd_vs_lax=ratio("temp_fwd_bytes", "lax"),
      temp_step_vs_lax=ratio("temp_step_bytes", "lax"))


# The memory target: a 32x112x112x64 input with a 3x3 kernel (a ~900 MiB patch
# matrix if built whole) must compile to <= 160 MiB of temporary memory for the forward, and
# a training step to <= lax's + 160 MiB. Only compiled, never run.
MEMORY_CASE = _conv("memory_target", "32x112x112x64 3x3, compiled only", (32, 112, 112, 64),
                    (3, 3, 64, 64), 1, 1)
MEMORY_ALLOWANCE = 160 * 2**20


def memory_target(jax_impls: dict[str, JaxImpl], log) -> dict[str, Any]:
  """Temporary bytes of the forward and step of ``MEMORY_CASE`` for each implementation."""
  x = jax.ShapeDtypeStruct(MEMORY_CASE.lhs_shape, jnp.float32)
  w = jax.ShapeDtypeStruct(MEMORY_CASE.rhs_shape, jnp.float32)
  temps = {}
  for name, impl in jax_impls.items():
    forward = functools.partial(impl.apply, MEMORY_CASE)
    try:
      temps[name] = {mode: compile_timed(fn, x, w)[1]["temp_bytes"]
                     for mode, fn in (("fwd", forward), ("step", training_step(forward)))}
    except Exception as e:  # noqa: BLE001
      temps[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
      log(f"    memory target: {name} failed: {temps[name]['error'][:200]}")
  lax_step = temps.get("lax", {}).get("step")
  for name, record in temps.items():
    if name != "lax" and "error" not in record and record["fwd"] is not None:
      record["fwd_ok"] = record["fwd"] <= MEMORY_ALLOWANCE
      record["step_ok"] = None if lax_step is None else (
          record["step"] <= lax_step + MEMORY_ALLOWANCE)
  return dict(lhs_shape=list(MEMORY_CASE.lhs_shape), rhs_shape=list(MEMORY_CASE.rhs_shape),
              allowance_bytes=MEMORY_ALLOWANCE, temp_bytes=temps)


def memory_lines(memory: dict[str, Any]) -> list[str]:
  mib = lambda v: "-" if v is None else f"{v / 2**20:.0f}"
  lines = ["", f"Memory target ({shape_str(memory['lhs_shape'])} input, "
           f"{shape_str(memory['rhs_shape'])} kernel, compiled only): temporary MiB "
           f"(fwd <= {mib(memory['allowance_bytes'])}; step <= lax + "
           f"{mib(memory['allowance_bytes'])})", "",
           "| implementation | fwd | step | fwd ok | step ok |", "|---|---:|---:|---|---|"]
  for name, record in memory["temp_bytes"].items():
    if "error" in record:
      lines.append(f"| {name} | error: {record['error'][:60]} | | | |")
      continue
    lines.append(f"| {name} | {mib(record['fwd'])} | {mib(record['step'])} | "
                 f"{record.get('fwd_ok', '')} | {record.get('step_ok', '')} |")
  return lines


def geomean(values: list[float | None]) -> float | None:
  values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
  return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(results: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
  summary = {}
  for name in variants:
    per_layer = [r["ratios"][name] for r in results if name in r["ratios"]]
    column = lambda key, per_layer=per_layer: [ratios[key] for ratios in per_layer]
    summary[name] = {f"geomean_{key}": geomean(column(key)) for key in (
        "step_vs_lax", "fwd_vs_lax", "step_vs_torch", "fwd_vs_torch")}
    valid = lambda values: [v for v in values if v is not None]
    summary[name]["max_step_vs_lax"] = max(valid(column("step_vs_lax")), default=None)
    summary[name]["max_compile_vs_lax"] = max(
        valid(column("compile_fwd_vs_lax") + column("compile_step_vs_lax")), default=None)
    summary[name]["layers"] = len(per_layer)
  return summary


# ------------------------------------------------------------------------ output


def fmt(value: float | None, unit: str = "") -> str:
  if value is None or not math.isfinite(value):
    return "-"
  if isinstance(value, int):
    return f"{value}{unit}"
  digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
  return f"{value:.{digits}f}{unit}"


def fmt_pair(record_a: dict, record_b: dict, key: str, scale: float = 1.0) -> str:
  a, b = record_a.get(key), record_b.get(key)
  return "/".join(fmt(v * scale if v is not None and scale != 1 else v) for v in (a, b))


def shape_str(shape) -> str:
  return "x".join(map(str, shape))


def markdown_tables(results: list[dict[str, Any]], variants: list[str],
                    summary: dict[str, Any], meta: dict[str, Any]) -> str:
  """Time table, resource table and geometric means, as markdown."""
  lines = [
      f"Times in ms, {meta['stat']} of up to {meta['reps']} interleaved repetitions; "
      f"{meta['cpu']}, {meta['cores']} cores, jax {meta['jax']}, torch {meta['torch']}; "
      "/lax and /torch are convmm's time over theirs; GEMM frac is XLA's time for the bare "
      "GEMM of the same M, K, N (x3 for a step) over convmm's.",
      "",
      "| layer | fwd ms | lax | torch | /lax | /torch | step ms | lax | torch | /lax | /torch "
      "| GFLOP/s fwd | GEMM frac fwd/step |",
      "|---|" + "---:|" * 12,
  ]
  for r in results:
    lax_r, torch_r = r["impls"].get("lax", {}), r["impls"].get("torch", {})
    for name in variants:
      c = r["impls"].get(name, {})
      ratio = r["ratios"].get(name, {})
      label = r["name"] if name == "convmm" else f"{r['name']} {name[len('convmm'):]}"
      if c.get("error"):
        lines.append(f"| {label} | error: {c['error'][:60]} |" + " |" * 11)
        continue
      lines.append(
          f"| {label} | {fmt(c.get('fwd_ms'))} | {fmt(lax_r.get('fwd_ms'))} | "
          f"{fmt(torch_r.get('fwd_ms'))} | {fmt(ratio.get('fwd_vs_lax'), 'x')} | "
          f"{fmt(ratio.get('fwd_vs_torch'), 'x')} | {fmt(c.get('step_ms'))} | "
          f"{fmt(lax_r.get('step_ms'))} | {fmt(torch_r.get('step_ms'))} | "
          f"{fmt(ratio.get('step_vs_lax'), 'x')} | {fmt(ratio.get('step_vs_torch'), 'x')} | "
          f"{fmt(c.get('gflops_fwd'))} | {fmt(c.get('gemm_fraction_fwd'))}/"
          f"{fmt(c.get('gemm_fraction_step'))} |")
  lines += [
      "",
      "| layer | op | input, kernel | GEMM (groups x) MxKxN | compile fwd s convmm/lax "
      "| compile step s | temp MiB fwd convmm/lax | temp MiB step | page faults/call fwd "
      "| page faults/call step | max err vs lax |",
      "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  mib = 1 / 2**20
  for r in results:
    g = r["gemm"]
    gemm = f"{g['groups']} x {g['m']}x{g['k']}x{g['n']}" if g["groups"] > 1 else (
        f"{g['m']}x{g['k']}x{g['n']}")
    lax_r = r["impls"].get("lax", {})
    for name in variants:
      c = r["impls"].get(name, {})
      if c.get("error"):
        continue
      err = r["errors"].get(name)
      err = "-" if err is None else f"{max(err[k] for k in ('fwd', 'loss', 'dlhs', 'drhs')):.1e}"
      label = r["name"] if name == "convmm" else f"{r['name']} {name[len('convmm'):]}"
      lines.append(
          f"| {label} | {r['op']} | {shape_str(r['lhs_shape'])}, {shape_str(r['rhs_shape'])} "
          f"| {gemm} | {fmt_pair(c, lax_r, 'compile_fwd_s')} | "
          f"{fmt_pair(c, lax_r, 'compile_step_s')} | {fmt_pair(c, lax_r, 'temp_fwd_bytes', mib)} "
          f"| {fmt_pair(c, lax_r, 'temp_step_bytes', mib)} "
          f"| {fmt_pair(c, lax_r, 'fwd_page_faults')} | {fmt_pair(c, lax_r, 'step_page_faults')} "
          f"| {err} |")
  lines.append("")
  for name, s in summary.items():
    if not s["layers"]:
      lines.append(f"**{name}** ran on no layer.")
      continue
    lines.append(
        f"**{name}** over {s['layers']} layers (geometric means): step vs lax "
        f"{fmt(s['geomean_step_vs_lax'], 'x')}, fwd vs lax {fmt(s['geomean_fwd_vs_lax'], 'x')}, "
        f"step vs torch {fmt(s['geomean_step_vs_torch'], 'x')}, fwd vs torch "
        f"{fmt(s['geomean_fwd_vs_torch'], 'x')}; worst step vs lax "
        f"{fmt(s['max_step_vs_lax'], 'x')}; worst compile time vs lax "
        f"{fmt(s['max_compile_vs_lax'], 'x')}.")
  return "\n".join(lines)


# Settings that change what is measured; recorded with the results.
ENVIRONMENT = ("XLA_FLAGS", "GLIBC_TUNABLES", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
               "JAX_PLATFORMS", "LD_PRELOAD")


def machine_info(args) -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  return dict(
      date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      argv=sys.argv, python=platform.python_version(), platform=platform.platform(),
      cpu=cpu, cores=len(os.sched_getaffinity(0)), jax=jax.__version__,
      jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      backend=jax.default_backend(), convmm=convmm.__version__,
      torch=None if torch is None or args.no_torch else torch.__version__,
      torch_threads=None if torch is None or args.no_torch else torch.get_num_threads(),
      torch_layout="NC* contiguous (PyTorch's default)",
      reps=args.reps,
      min_reps=args.min_reps, max_seconds=args.max_seconds, stat=args.stat, seed=args.seed,
      environment={key: value for key, value in os.environ.items()
                   if key in ENVIRONMENT or key.startswith("MALLOC_")})


def select_layers(suite: list[Layer], patterns: str | None) -> list[Layer]:
  if not patterns:
    return suite
  wanted = [p.strip() for p in patterns.split(",") if p.strip()]
  chosen = [layer for layer in suite if any(fnmatch.fnmatch(layer.name, p) for p in wanted)]
  if not chosen:
    names = ", ".join(layer.name for layer in suite)
    raise SystemExit(f"bench.py: --layers {patterns!r} matches no layer; layers are: {names}")
  return chosen


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Time convmm against jax.lax (and PyTorch CPU) on convolution layers from "
      "real networks: forward and training step medians, ratios, GFLOP/s, fraction of "
      "XLA's GEMM throughput, compile time, temporary memory, agreement with lax.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="layers: " + ", ".join(layer.name for layer in SUITE))
  parser.add_argument("--quick", action="store_true",
                      help="two small layers, few repetitions: a smoke test (seconds)")
  parser.add_argument("--layers", metavar="PATTERNS",
                      help="comma-separated layer names or globs, e.g. 'resnet*,unet_adjoint'")
  parser.add_argument("--reps", type=int, default=None,
                      help="timed repetitions per implementation (default 9, quick 3)")
  parser.add_argument("--min-reps", type=int, default=3,
                      help="stop after this many repetitions once --max-seconds is spent")
  parser.add_argument("--max-seconds", type=float, default=20.0,
                      help="time budget per layer for the timed loop (default 20)")
  parser.add_argument("--stat", choices=sorted(STATISTICS), default="median",
                      help="statistic of the repetitions in the table and ratios (default "
                      "median; min is steadier on a busy machine)")
  parser.add_argument("--dump-hlo", metavar="DIR",
                      help="write each implementation's optimised HLO (fwd and step) here")
  parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,...]",
                      help="add a convmm variant called with these keyword arguments "
                      "(repeatable), e.g. --variant method=shift")
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="PyTorch threads (default: the cores this process may use)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random operands")
  parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
  parser.add_argument("--list", action="store_true", help="list the layers and exit")
  args = parser.parse_args(argv)
  if args.reps is None:
    args.reps = 3 if args.quick else 9
  if args.reps < 1 or args.min_reps < 1:
    parser.error("--reps and --min-reps must be >= 1")
  args.min_reps = min(args.min_reps, args.reps)
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  suite = select_layers(QUICK_SUITE if args.quick else SUITE, args.layers)
  if args.list:
    for layer in suite:
      print(f"{layer.name:16} {layer.op:9} {shape_str(layer.lhs_shape):>16} "
            f"{shape_str(layer.rhs_shape):>12}  {layer.source}")
    return 0
  if torch is not None and not args.no_torch:
    torch.set_num_threads(args.threads)
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
  variants = dict(CONVMM_VARIANTS)
  variants.update(parse_variant(text) for text in args.variant)
  jax_impls = {"lax": LAX, **{name: convmm_impl(**kw) for name, kw in variants.items()}}
  log = functools.partial(print, file=sys.stderr, flush=True)
  info = machine_info(args)
  warm_up_compiler(jax_impls)
  log(f"convmm {info['convmm']}, jax {info['jax']} on {info['cpu']} ({info['cores']} cores), "
      f"torch {info['torch'] or 'not used'}; {len(suite)} layers, {args.reps} reps")

  results = []
  start = time.perf_counter()
  for i, layer in enumerate(suite, 1):
    log(f"[{i}/{len(suite)}] {layer.name}: {layer.op} {shape_str(layer.lhs_shape)} with "
        f"{shape_str(layer.rhs_shape)} ({layer.source})")
    result = measure_layer(layer, jax_impls, args, log)
    ratios = result["ratios"].get("convmm", {})
    log(f"    {result['reps']} reps in {result['seconds']:.1f} s; convmm/lax fwd "
        f"{fmt(ratios.get('fwd_vs_lax'), 'x')}, step {fmt(ratios.get('step_vs_lax'), 'x')}")
    results.append(result)
  summary = summarize(results, list(variants))
  memory = None
  if not args.quick and not args.layers:
    log(f"memory target: compiling {MEMORY_CASE.source}")
    memory = memory_target(jax_impls, log)
  log(f"done in {time.perf_counter() - start:.0f} s")

  print(markdown_tables(results, list(variants), summary, info))
  if memory is not None:
    print("\n".join(memory_lines(memory)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=info, variants=variants, layers=results, summary=summary,
                     memory_target=memory), f,
                indent=1)
    log(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
