"""The machine a benchmark ran on: what it is, and how fast XLA's own kernels run on it.

Every benchmark command records :func:`machine_info` with its results and prints the rates
next to its tables (``report.rates_line``). The rates are the yardstick for the tables: convmm's
im2col + GEMM cannot beat the machine's GEMM rate, and lax's convolution rate says how close
XLA's native kernel comes to it. On a shared machine absolute times drift between runs (and
the rates with them); ratios measured interleaved in one process carry over better.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import convmm

# Settings that change what is measured; recorded with the results.
ENVIRONMENT = (
  "XLA_FLAGS",
  "GLIBC_TUNABLES",
  "OMP_WAIT_POLICY",
  "OMP_NUM_THREADS",
  "JAX_PLATFORMS",
  "LD_PRELOAD",
)
# The GEMM of the layer suite's resnet3x3 layer (8x28x28x128, 3x3, 128 -> 128 features), and a
# larger square one that reaches the machine's peak more nearly.
GEMM_SHAPES = ((6272, 1152, 128), (2048, 2048, 2048))
# XLA's native convolution on that same layer, float32 forward.
REFERENCE_CONV = dict(lhs_shape=(8, 28, 28, 128), rhs_shape=(3, 3, 128, 128), padding="SAME")


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of ``fn(*args)`` over ``repeats`` calls, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def measure_rates(repeats: int = 5) -> dict[str, Any]:
  """GFLOP/s of XLA's GEMM (float32, and bfloat16 operands with float32 results) on
  ``GEMM_SHAPES``, and of lax's float32 convolution on ``REFERENCE_CONV``: medians of
  ``repeats`` calls after a warm-up."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  gemm = jax.jit(
    lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  )
  gemms = []
  for dtype in (jnp.float32, jnp.bfloat16):
    for m, k, n in GEMM_SHAPES:
      a = jax.random.normal(key_a, (m, k), jnp.float32).astype(dtype)
      b = jax.random.normal(key_b, (k, n), jnp.float32).astype(dtype)
      seconds = _median_seconds(gemm, a, b, repeats=repeats)
      gemms.append(
        dict(
          shape=[m, k, n],
          operands=jnp.dtype(dtype).name,
          result="float32",
          ms=1e3 * seconds,
          gflops=2 * m * k * n / seconds / 1e9,
        )
      )
  lhs_shape, rhs_shape = REFERENCE_CONV["lhs_shape"], REFERENCE_CONV["rhs_shape"]
  x = jax.random.normal(key_a, lhs_shape, jnp.float32)
  w = jax.random.normal(key_b, rhs_shape, jnp.float32)
  conv = jax.jit(
    lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), REFERENCE_CONV["padding"], dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  seconds = _median_seconds(conv, x, w, repeats=repeats)
  out_positions = math.prod(lhs_shape[:-1])  # SAME, stride 1: one output per input position
  flops = 2 * out_positions * math.prod(rhs_shape)
  convs = [
    dict(
      lhs_shape=list(lhs_shape),
      rhs_shape=list(rhs_shape),
      padding=REFERENCE_CONV["padding"],
      dtype="float32",
      ms=1e3 * seconds,
      gflops=flops / seconds / 1e9,
    )
  ]
  return dict(repeats=repeats, statistic="median", gemm=gemms, conv=convs)


def machine_info(rates: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
  """The machine, the software and the environment, plus ``rates`` (:func:`measure_rates`)
  and the command's own ``settings`` (repetitions, seed, ...), for a result file's ``meta``."""
  from benchmarks.impls import torch  # PyTorch is optional; impls sets its threads' wait policy

  return dict(
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    argv=sys.argv,
    python=platform.python_version(),
    platform=platform.platform(),
    cpu=cpu_name(),
    cores=len(os.sched_getaffinity(0)),
    load_average=os.getloadavg(),
    backend=jax.default_backend(),
    jax=jax.__version__,
    jaxlib=_version("jaxlib"),
    convmm=convmm.__version__,
    flax=_version("flax"),
    optax=_version("optax"),
    torch=None if torch is None else torch.__version__,
    torch_threads=None if torch is None else torch.get_num_threads(),
    environment={
      key: value
      for key, value in os.environ.items()
      if key in ENVIRONMENT or key.startswith("MALLOC_")
    },
    rates=rates,
    **settings,
  )


def print_rates(info: dict[str, Any]) -> None:
  """The machine's GEMM and convolution rates of :func:`machine_info`, one line each."""
  for gemm in info["rates"]["gemm"]:
    print(f"GEMM {gemm['operands']} -> float32 {gemm['shape']}: {gemm['gflops']:.0f} GFLOP/s")
  for conv in info["rates"]["conv"]:
    print(f"lax conv {conv['lhs_shape']} x {conv['rhs_shape']}: {conv['gflops']:.0f} GFLOP/s")
