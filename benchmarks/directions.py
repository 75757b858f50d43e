"""Each direction of a convolution by each candidate: the measurements behind the rule table.

For every layer and dtype, the forward pass, the input gradient and the kernel gradient are
compiled twice, once by convmm's engine and once by XLA's own convolution (the candidates of
``method='auto'`` / ``'autotune'``, see ``convmm/_engine/policy.py``), and timed interleaved
in one process (medians); lax's whole training step and convmm's under ``method='auto'``
are timed beside them. The machine's GEMM and convolution rates are printed first.

  python -m benchmarks.directions                      # every layer, float32 and bfloat16
  python -m benchmarks.directions --layers resnet3x3 --dtypes float32 --reps 15
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import convmm
from benchmarks.machine import machine_info, measure_rates, print_rates
from convmm._engine import directions as convmm_directions

# name: (lhs NHWC / NWC, rhs HWIO / WIO, strides, padding, feature groups[, rhs dilation])
LAYERS = {
  "resnet3x3": ((8, 28, 28, 128), (3, 3, 128, 128), (1, 1), "SAME", 1),
  "unet3x3": ((4, 64, 64, 64), (3, 3, 64, 64), (1, 1), "SAME", 1),
  "stem7x7s2": ((8, 112, 112, 3), (7, 7, 3, 64), (2, 2), "SAME", 1),
  "down3x3s2": ((8, 56, 56, 64), (3, 3, 64, 128), (2, 2), "SAME", 1),
  "proj1x1": ((8, 28, 28, 256), (1, 1, 256, 64), (1, 1), "SAME", 1),
  "mnist_conv1": ((32, 28, 28, 1), (3, 3, 1, 32), (1, 1), "SAME", 1),
  "mnist_conv2": ((32, 14, 14, 32), (3, 3, 32, 64), (1, 1), "SAME", 1),
  "audio1d_k9": ((8, 4096, 64), (9, 64, 64), (1,), "SAME", 1),
  "grouped3x3": ((8, 28, 28, 128), (3, 3, 32, 128), (1, 1), "SAME", 4),
  "dilated3x3": ((8, 28, 28, 128), (3, 3, 128, 128), (1, 1), "SAME", 1, (2, 2)),
}
DIMENSION_NUMBERS = {2: ("NHWC", "HWIO", "NHWC"), 1: ("NWC", "WIO", "NWC")}
NAMES = ("forward", "input_grad", "kernel_grad")


def _programs(layer, dtype):
  """name -> a no-argument runner of one compiled program."""
  lhs_shape, rhs_shape, strides, padding, groups, *dilation = LAYERS[layer]
  x = jax.random.normal(jax.random.key(0), lhs_shape).astype(dtype)
  w = jax.random.normal(jax.random.key(1), rhs_shape).astype(dtype)
  kw = dict(
    dimension_numbers=DIMENSION_NUMBERS[len(lhs_shape) - 2],
    feature_group_count=groups,
    rhs_dilation=dilation[0] if dilation else None,
  )
  runners = {}
  for who in ("convmm", "xla"):
    for d, name in enumerate(NAMES):
      directions = tuple(who if i == d else "convmm" for i in range(3))
      conv = lambda x, w, directions=directions: _with_directions(
        directions, lambda: convmm.conv_general_dilated(x, w, strides, padding, **kw)
      )
      if d == 0:
        compiled = jax.jit(conv).lower(x, w).compile()
        runners[(who, name)] = lambda c=compiled: c(x, w)
      else:
        y = jax.eval_shape(conv, x, w)
        ct = jnp.ones(y.shape, y.dtype)
        grad = lambda x, w, ct, conv=conv, d=d: jax.vjp(conv, x, w)[1](ct)[d - 1]
        compiled = jax.jit(grad).lower(x, w, ct).compile()
        runners[(who, name)] = lambda c=compiled, ct=ct: c(x, w, ct)
  for impl, fn in (("lax", lax.conv_general_dilated), ("auto", convmm.conv_general_dilated)):
    loss = lambda x, w, fn=fn: jnp.sum(fn(x, w, strides, padding, **kw).astype(jnp.float32) ** 2)
    step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    runners[(impl, "step")] = lambda c=step: c(x, w)
  chosen = convmm.algorithms(x, w, strides, padding, **kw)
  return runners, chosen


def _with_directions(directions, thunk):
  """``thunk()`` traced with every direction's choice forced to ``directions``."""
  choose = convmm_directions.choose
  convmm_directions.choose = lambda *args: directions
  try:
    return thunk()
  finally:
    convmm_directions.choose = choose


def _medians(runners, reps):
  for run in runners.values():
    jax.block_until_ready(run())
  times = {key: [] for key in runners}
  for _ in range(reps):
    for key, run in runners.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      times[key].append(time.perf_counter() - start)
  return {key: 1e3 * float(np.median(t)) for key, t in times.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layer names")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
  parser.add_argument("--reps", type=int, default=9, help="interleaved repetitions (medians)")
  parser.add_argument(
    "--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out/directions.json")
  )
  args = parser.parse_args(argv)
  info = machine_info(measure_rates(), reps=args.reps)
  print_rates(info)
  rows = []
  header = f"{'layer':12} {'dtype':8} " + " ".join(f"{n + ' convmm/xla':>24}" for n in NAMES)
  print(header + f" {'step lax':>9} {'step auto':>9}  auto's choice")
  for layer in args.layers.split(","):
    for dtype in args.dtypes.split(","):
      runners, chosen = _programs(layer, jnp.dtype(dtype))
      ms = _medians(runners, args.reps)
      cells = " ".join(f"{ms[('convmm', n)]:9.2f} /{ms[('xla', n)]:8.2f} ms" for n in NAMES)
      print(
        f"{layer:12} {dtype:8} {cells} {ms[('lax', 'step')]:9.2f} {ms[('auto', 'step')]:9.2f}"
        f"  {'/'.join(chosen.values())}",
        flush=True,
      )
      rows.append(
        dict(
          layer=layer,
          dtype=dtype,
          ms={f"{who}:{name}": value for (who, name), value in ms.items()},
          auto=chosen,
        )
      )
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(dict(meta=info, rows=rows), indent=1))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
