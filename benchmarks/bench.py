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

Examples (from the repository root; the JSON goes to benchmarks/out/, which git ignores):
  python -m benchmarks.bench                          # full suite (a few minutes)
  python -m benchmarks.bench --quick                  # smoke test (seconds)
  python -m benchmarks.bench --layers 'depthwise*,unet*' --reps 11
  python -m benchmarks.bench --variant method=shift   # add a convmm variant to compare

Extra convmm variants (keyword arguments passed to every convmm call) go in
``CONVMM_VARIANTS`` (``impls.py``) or on the command line with ``--variant``, e.g.
``--variant method=im2col --variant memory_budget=16777216``.

Reading the numbers: XLA:CPU allocates a program's temporary buffer on every call, and glibc
serves allocations above its mmap threshold (at most 32 MiB) with fresh pages, so a program
whose ``temp`` exceeds ~32 MiB page-faults through all of it on every call (the "page
faults/call" column; roughly 0.75 us per 4 KiB page here). That cost is real for users and
is measured as such; to see a run without it, start the process with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483648``.
On a busy machine prefer ``--stat min``.

The code: ``suite.py`` (the layers and their FLOP model), ``impls.py`` (convmm, lax and
the PyTorch translation), ``measure.py`` (compiling, timing, agreement), ``report.py``
(the tables), ``machine.py`` (the machine and its GEMM rates); this file is the command line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

from benchmarks.impls import CONVMM_VARIANTS, LAX, convmm_impl, parse_variant, torch
from benchmarks.machine import machine_info, measure_rates
from benchmarks.measure import STATISTICS, measure_layer, memory_target, summarize, warm_up_compiler
from benchmarks.report import (
  algorithms_text,
  fmt,
  markdown_tables,
  memory_lines,
  rates_line,
  shape_str,
)
from benchmarks.suite import MEMORY_CASE, QUICK_SUITE, SUITE, select_layers

OUT_DIR = pathlib.Path(__file__).resolve().parent / "out"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Time convmm against jax.lax (and PyTorch CPU) on convolution layers from "
    "real networks: forward and training step medians, ratios, GFLOP/s, fraction of "
    "XLA's GEMM throughput, compile time, temporary memory, agreement with lax.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="layers: " + ", ".join(layer.name for layer in SUITE),
  )
  parser.add_argument(
    "--quick", action="store_true", help="two small layers, few repetitions: a smoke test (seconds)"
  )
  parser.add_argument(
    "--layers",
    metavar="PATTERNS",
    help="comma-separated layer names or globs, e.g. 'resnet*,unet_adjoint'",
  )
  parser.add_argument(
    "--reps",
    type=int,
    default=None,
    help="timed repetitions per implementation (default 9, quick 3)",
  )
  parser.add_argument(
    "--min-reps",
    type=int,
    default=3,
    help="stop after this many repetitions once --max-seconds is spent",
  )
  parser.add_argument(
    "--max-seconds",
    type=float,
    default=20.0,
    help="time budget per layer for the timed loop (default 20)",
  )
  parser.add_argument(
    "--stat",
    choices=sorted(STATISTICS),
    default="median",
    help="statistic of the repetitions in the table and ratios (default "
    "median; min is steadier on a busy machine)",
  )
  parser.add_argument(
    "--dump-hlo",
    metavar="DIR",
    help="write each implementation's optimised HLO (fwd and step) here",
  )
  parser.add_argument(
    "--variant",
    action="append",
    default=[],
    metavar="KEY=VALUE[,...]",
    help="add a convmm variant called with these keyword arguments "
    "(repeatable), e.g. --variant method=shift",
  )
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
  parser.add_argument(
    "--threads",
    type=int,
    default=len(os.sched_getaffinity(0)),
    help="PyTorch threads (default: the cores this process may use)",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the random operands")
  parser.add_argument(
    "--json",
    metavar="PATH",
    help=f"write every number to this JSON file (default {OUT_DIR.name}/layers.json in "
    f"benchmarks/, {OUT_DIR.name}/layers-quick.json with --quick)",
  )
  parser.add_argument("--list", action="store_true", help="list the layers and exit")
  args = parser.parse_args(argv)
  if args.reps is None:
    args.reps = 3 if args.quick else 9
  if args.reps < 1 or args.min_reps < 1:
    parser.error("--reps and --min-reps must be >= 1")
  for text in args.variant:
    try:
      parse_variant(text)
    except argparse.ArgumentTypeError as error:
      parser.error(str(error))
  args.min_reps = min(args.min_reps, args.reps)
  if args.json is None:
    args.json = str(OUT_DIR / ("layers-quick.json" if args.quick else "layers.json"))
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  suite = select_layers(QUICK_SUITE if args.quick else SUITE, args.layers)
  if args.list:
    for layer in suite:
      print(
        f"{layer.name:16} {layer.op:9} {shape_str(layer.lhs_shape):>16} "
        f"{shape_str(layer.rhs_shape):>12}  {layer.source}"
      )
    return 0
  if torch is not None and not args.no_torch:
    torch.set_num_threads(args.threads)
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
  variants = dict(CONVMM_VARIANTS)
  variants.update(parse_variant(text) for text in args.variant)
  jax_impls = {"lax": LAX, **{name: convmm_impl(**kw) for name, kw in variants.items()}}
  log = functools.partial(print, file=sys.stderr, flush=True)
  use_torch = torch is not None and not args.no_torch
  info = machine_info(
    rates=measure_rates(repeats=3 if args.quick else 5),
    torch_used=use_torch,
    torch_layout="NC* contiguous (PyTorch's default)" if use_torch else None,
    reps=args.reps,
    min_reps=args.min_reps,
    max_seconds=args.max_seconds,
    stat=args.stat,
    seed=args.seed,
    quick=args.quick,
  )
  warm_up_compiler(jax_impls)
  log(
    f"convmm {info['convmm']}, jax {info['jax']} on {info['cpu']} ({info['cores']} cores), "
    f"torch {info['torch'] if use_torch else 'not used'}; {len(suite)} layers, {args.reps} reps"
  )
  log(rates_line(info))

  results = []
  start = time.perf_counter()
  for i, layer in enumerate(suite, 1):
    log(
      f"[{i}/{len(suite)}] {layer.name}: {layer.op} {shape_str(layer.lhs_shape)} with "
      f"{shape_str(layer.rhs_shape)} ({layer.source})"
    )
    result = measure_layer(layer, jax_impls, args, log)
    ratios = result["ratios"].get("convmm", {})
    algorithms = algorithms_text(
      result["impls"].get("convmm", {}).get("algorithms"),
      result["impls"].get("lax", {}).get("algorithms"),
    )
    log(
      f"    {result['reps']} reps in {result['seconds']:.1f} s; convmm/lax fwd "
      f"{fmt(ratios.get('fwd_vs_lax'), 'x')}, step {fmt(ratios.get('step_vs_lax'), 'x')}; "
      f"convmm's fwd/dx/dw {algorithms}"
    )
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
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(
      dict(meta=info, variants=variants, layers=results, summary=summary, memory_target=memory),
      f,
      indent=1,
    )
  log(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
