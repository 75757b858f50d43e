"""Channels-first convolutions: convmm on NCW input against NWC, lax and PyTorch.

PyTorch's layout and lax's default (``dimension_numbers=None``) put the channels
before the spatial axes. This benchmark times, interleaved in one process (medians),
with the machine's GEMM and convolution rates printed first:

* one depthwise 1-D layer (512 channels, k=5) on NCW input against the same layer
  on NWC input, and against lax on NCW;
* a stack of 12 such layers (``relu`` between them), forward and training step, against
  lax and PyTorch (one thread and all cores);
* the compile time of ``jax.jit(replace_convs(jax.grad(f)))`` for one such layer,
  against ``jax.jit(jax.grad(f))`` (lax's kernel gradient is a convolution whose
  window is the whole signal).

  python -m benchmarks.layouts                  # batch 4, length 1024
  python -m benchmarks.layouts --length 256 --reps 5
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import convmm
from benchmarks.chosen import conv_algorithms
from benchmarks.impls import torch
from benchmarks.machine import machine_info, measure_rates, print_rates
from benchmarks.measure import max_error, time_interleaved, training_step

LAYERS = 12


def _conv(impl: Callable, channels_first: bool, **kw) -> Callable:
  dn = ("NCH", "OIH", "NCH") if channels_first else ("NHC", "HIO", "NHC")

  def conv(x, w):
    groups = x.shape[1 if channels_first else -1]
    return impl(x, w, (1,), "SAME", dimension_numbers=dn, feature_group_count=groups, **kw)

  return conv


def _stack(conv: Callable) -> Callable:
  """``LAYERS`` depthwise layers, ``relu`` between them; ``ws`` is ``(LAYERS, *kernel)``."""

  def forward(x, ws):
    for i in range(LAYERS):
      x = conv(x, ws[i])
      if i < LAYERS - 1:
        x = jax.nn.relu(x)
    return x

  return forward


def _torch_stack(x, ws):
  for i in range(LAYERS):
    x = torch.nn.functional.conv1d(x, ws[i], padding="same", groups=x.shape[1])
    if i < LAYERS - 1:
      x = torch.relu(x)
  return x


def _torch_runners(x_ncw, ws_oih, threads: int) -> dict[str, Callable[[], object]]:
  x = torch.from_numpy(np.array(x_ncw))
  ws = torch.from_numpy(np.array(ws_oih))
  xg, wg = x.clone().requires_grad_(True), ws.clone().requires_grad_(True)

  def with_threads(fn):
    def run():
      before = torch.get_num_threads()
      torch.set_num_threads(threads)
      try:
        return fn()
      finally:
        torch.set_num_threads(before)

    return run

  def forward():
    with torch.no_grad():
      return _torch_stack(x, ws)

  def step():
    xg.grad = wg.grad = None
    loss = (_torch_stack(xg, wg) ** 2).sum()
    loss.backward()
    return loss

  return {"fwd": with_threads(forward), "step": with_threads(step)}


def _compile_seconds(fn: Callable, *args) -> float:
  jax.clear_caches()
  start = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - start


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--channels", type=int, default=512)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--kernel", type=int, default=5)
  parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (medians)")
  parser.add_argument(
    "--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out/layouts.json")
  )
  args = parser.parse_args(argv)
  info = machine_info(measure_rates(), reps=args.reps)
  print_rates(info)

  n, c, t, k = args.batch, args.channels, args.length, args.kernel
  keys = jax.random.split(jax.random.key(0), 2)
  x_ncw = jax.random.normal(keys[0], (n, c, t), jnp.float32)
  ws_oih = jax.random.normal(keys[1], (LAYERS, c, 1, k), jnp.float32) / np.sqrt(k)
  x_nwc = jnp.transpose(x_ncw, (0, 2, 1))
  ws_hio = jnp.transpose(ws_oih, (0, 3, 2, 1))
  lax_conv = lambda *a, **kw: lax.conv_general_dilated(*a, **kw, precision="highest")
  layer = {
    "convmm NCW": (_conv(convmm.conv_general_dilated, True), x_ncw, ws_oih[0]),
    "convmm NWC": (_conv(convmm.conv_general_dilated, False), x_nwc, ws_hio[0]),
    "lax NCW": (_conv(lax_conv, True), x_ncw, ws_oih[0]),
  }
  stack = {
    "convmm NCW": (_stack(_conv(convmm.conv_general_dilated, True)), x_ncw, ws_oih),
    "convmm NWC": (_stack(_conv(convmm.conv_general_dilated, False)), x_nwc, ws_hio),
    "lax NCW": (_stack(_conv(lax_conv, True)), x_ncw, ws_oih),
  }
  result: dict = dict(meta=info, shape=dict(batch=n, channels=c, length=t, kernel=k))
  for title, programs in (("one depthwise layer", layer), (f"{LAYERS}-layer stack", stack)):
    runners, algorithms = {}, {}
    reference = jax.jit(programs["lax NCW"][0])(*programs["lax NCW"][1:])
    for name, (fn, x, w) in programs.items():
      algorithms[name] = conv_algorithms(fn, x, w)
      forward, step = jax.jit(fn), jax.jit(training_step(fn))
      y = forward(x, w)
      error = max_error(y if "NCW" in name else jnp.transpose(y, (0, 2, 1)), reference)
      print(f"{title}, {name}: max error vs lax {error:.1e}; algorithms {algorithms[name]}")
      jax.block_until_ready(step(x, w))
      runners[(name, "fwd")] = lambda f=forward, x=x, w=w: jax.block_until_ready(f(x, w))
      runners[(name, "step")] = lambda f=step, x=x, w=w: jax.block_until_ready(f(x, w))
    if title.endswith("stack") and torch is not None:
      for threads in sorted({1, torch.get_num_threads()}):
        for kind, run in _torch_runners(x_ncw, ws_oih, threads).items():
          run()
          runners[(f"torch {threads} thread(s)", kind)] = run
    samples, _, done, _ = time_interleaved(runners, args.reps)
    ms = {key: statistics.median(s) * 1e3 for key, s in samples.items()}
    print(f"{title} ({done} interleaved reps, median ms):")
    base = "convmm NCW"
    for (name, kind), value in ms.items():
      ratio = ms[(base, kind)] / value
      print(f"  {name:22} {kind:4} {value:9.2f} ms   convmm NCW / this: {ratio:5.2f}x")
    result[title] = dict(
      ms={f"{name}:{kind}": value for (name, kind), value in ms.items()}, algorithms=algorithms
    )

  def loss(x, w):
    return jnp.sum(_conv(lax.conv_general_dilated, True)(x, w) ** 2)

  grad = jax.grad(loss, argnums=(0, 1))
  compile_s = {
    "lax": _compile_seconds(grad, x_ncw, ws_oih[0]),
    "replace_convs": _compile_seconds(convmm.replace_convs(grad), x_ncw, ws_oih[0]),
  }
  print(
    f"compile jax.grad of one NCW depthwise layer: lax {compile_s['lax']:.2f} s, "
    f"replace_convs {compile_s['replace_convs']:.2f} s "
    f"({compile_s['replace_convs'] / compile_s['lax']:.2f}x)"
  )
  result["compile_s"] = compile_s
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
