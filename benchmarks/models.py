"""Whole-network benchmark: convmm's Flax layers against Flax's own, on real architectures.

The networks are in ``networks.py`` (each takes its conv classes as fields, so the convmm model
is the Flax model with ``conv=convmm.linen.Conv`` and nothing else changed). Parameters are
initialised once, by the Flax model, and both models are applied to them (their parameter trees
are identical by design; this is checked). ResNet-18 and MobileNetV2 also run as PyTorch
networks (``torch_networks.py``: torchvision's definitions, same sizes, batch and dtype), timed
in the same process as an outside anchor.

Each network and dtype runs in its own process (a fresh Python, JAX and allocator, as a
training run has; ``--no-isolate`` runs them all in one): in one process, convmm's bfloat16
ResNet-18 step measured 1.38x the time it took in a fresh process when the float32 networks had
run before it. For each network, dtype and implementation it measures, in that process:

* forward (inference: ``train=False``) and training-step medians, interleaved after a warm-up.
  The step is ``jax.value_and_grad`` of a cross-entropy loss (MSE for the U-Net, which predicts
  noise) with BatchNorm statistics updated, plus an optax adam update, jitted with the state
  donated (PyTorch: forward, ``backward`` and ``torch.optim.Adam``; in bfloat16 under
  ``torch.autocast``, parameters float32, as Flax's ``dtype=bfloat16`` keeps them);
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

Examples (from the repository root; the JSON goes to benchmarks/out/, which git ignores):
  python -m benchmarks.models                     # every network, both dtypes (tens of minutes)
  python -m benchmarks.models --models resnet18 --dtypes bfloat16 --repeats 5
  python -m benchmarks.models --quick             # smoke test: the MNIST CNN, float32 only
  python -m benchmarks.models --table benchmarks/out/models.json   # print a saved run's tables

Timings on a shared machine move by 20-40% between runs; compare the ratios, which are measured
interleaved in one process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from benchmarks.agreement import agreement, check_same_parameters, copy_tree, unit_zero_scales
from benchmarks.chosen import conv_algorithms
from benchmarks.impls import torch
from benchmarks.machine import machine_info, measure_rates
from benchmarks.measure import compile_timed, time_interleaved
from benchmarks.networks import (
  DEFAULT_MODELS,
  DTYPES,
  MODELS,
  QUICK_MODELS,
  ModelSpec,
  convmm_model,
  loss_of,
  make_batch,
)
from benchmarks.report import fmt_sig, models_report

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks" / "out"
IMPLS = ("convmm", "flax")  # the JAX implementations; "torch" joins them where a twin exists
QUICK_DEFAULTS = dict(models=["mnist_cnn"], dtypes=["float32"])


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


# ------------------------------------------------------------------------------ PyTorch


def torch_runners(spec: ModelSpec, flax_model, dtype_name: str, seed: int):
  """``(forward, step, parameter count)`` of the PyTorch twin of ``spec`` (None if it has
  none): callables that run one inference forward and one training step on a fixed batch."""
  if torch is None:
    return None
  from benchmarks import torch_networks

  model = torch_networks.twin_of(spec.name, flax_model)
  if model is None:
    return None
  torch.manual_seed(seed)
  batch, height, width, channels = spec.image_shape
  images = torch.randn(batch, channels, height, width)
  labels = torch.randint(0, spec.num_classes, (batch,))
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  autocast = functools.partial(
    torch.autocast, "cpu", dtype=torch.bfloat16, enabled=dtype_name == "bfloat16"
  )

  def forward():
    model.eval()
    with torch.no_grad(), autocast():
      return model(images)

  def step():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    return loss

  return forward, step, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- measuring


def run_model(spec: ModelSpec, dtype_name: str, args, log) -> dict[str, Any]:
  """Every measurement of one network in one dtype: convmm, Flax (and PyTorch) interleaved."""
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
        compiled[name][mode], record = compile_timed(
          fn, *fn_args, donate_argnums=donate, fresh=True
        )
        compile_records[name][mode].append(record)
    log(
      f"    compile repetition {rep + 1}/{args.compile_repeats}: "
      + ", ".join(
        f"{name} fwd {compile_records[name]['fwd'][-1]['compile_s']:.1f} s step "
        f"{compile_records[name]['step'][-1]['compile_s']:.1f} s"
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

  # Timing: interleaved repetitions, rotating which implementation goes first.
  runners: dict[tuple[str, str], Callable[[], Any]] = {}
  for name in IMPLS:

    def run_step(name=name):
      states[name], loss = compiled[name]["step"](states[name], inputs, target)
      jax.block_until_ready(loss)

    runners[name, "fwd"] = lambda name=name: jax.block_until_ready(
      compiled[name]["fwd"](variables, *inputs)
    )
    runners[name, "step"] = run_step
  twin = None if args.no_torch else torch_runners(spec, flax_model, dtype_name, args.seed)
  if twin is not None:
    torch_forward, torch_step, torch_params = twin
    torch_forward(), torch_step()  # warm-up
    runners["torch", "fwd"], runners["torch", "step"] = torch_forward, torch_step
  samples, _, _, _ = time_interleaved(runners, args.repeats)

  impls = {}
  for name in IMPLS:
    rec = compile_records[name]
    impls[name] = dict(
      compile_fwd_s=statistics.median(r["compile_s"] for r in rec["fwd"]),
      compile_step_s=statistics.median(r["compile_s"] for r in rec["step"]),
      lower_fwd_s=statistics.median(r["lower_s"] for r in rec["fwd"]),
      lower_step_s=statistics.median(r["lower_s"] for r in rec["step"]),
      compile_fwd_samples_s=[r["compile_s"] for r in rec["fwd"]],
      compile_step_samples_s=[r["compile_s"] for r in rec["step"]],
      temp_fwd_bytes=rec["fwd"][-1]["temp_bytes"],
      temp_step_bytes=rec["step"][-1]["temp_bytes"],
      algorithms=conv_algorithms(fns[name][0], variables, *inputs),  # the inference program's
    )
  if twin is not None:
    impls["torch"] = dict(params=torch_params)
  for name, record in impls.items():
    for mode in ("fwd", "step"):
      record[f"{mode}_ms"] = 1e3 * statistics.median(samples[name, mode])
      record[f"{mode}_min_ms"] = 1e3 * min(samples[name, mode])
      record[f"{mode}_samples_ms"] = [1e3 * s for s in samples[name, mode]]

  def ratio(key, other="flax"):
    a, b = impls["convmm"].get(key), impls.get(other, {}).get(key)
    return a / b if a is not None and b else None

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
  if twin is not None:
    ratios.update(fwd_vs_torch=ratio("fwd_ms", "torch"), step_vs_torch=ratio("step_ms", "torch"))
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


# --------------------------------------------------------------------------- the command


def write_json(path: str, info: dict[str, Any], results: list[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(meta=info, results=results), f, indent=1)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.models",
    description="Whole networks with convmm's Flax layers against Flax's own (and PyTorch's "
    "ResNet-18 and MobileNetV2): forward and training-step medians, compile time, temporary "
    "memory, agreement.",
    epilog="models: " + ", ".join(f"{s.name} ({s.description})" for s in MODELS.values()),
  )
  parser.add_argument(
    "--models",
    help=f"comma-separated (default {','.join(DEFAULT_MODELS)}; with --quick "
    f"{','.join(QUICK_DEFAULTS['models'])})",
  )
  parser.add_argument(
    "--dtypes",
    help="comma-separated: float32, bfloat16 (default both; with --quick float32)",
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
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch networks")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # of run_isolated
  parser.add_argument(
    "--json",
    metavar="PATH",
    help="write every number to this JSON file (default benchmarks/out/models.json, "
    "benchmarks/out/models-quick.json with --quick)",
  )
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
    help="a smoke test: one repetition and one compile of the small versions of the networks, "
    "by default only the MNIST CNN in float32 (20-60 s on 2 cores, most of it compiling; each "
    "further network or dtype adds about as much)",
  )
  args = parser.parse_args(argv)
  if args.table:
    return args
  split = lambda text: [item.strip() for item in text.split(",") if item.strip()]
  args.models = (
    split(args.models)
    if args.models
    else (QUICK_DEFAULTS["models"] if args.quick else list(DEFAULT_MODELS))
  )
  args.dtypes = (
    split(args.dtypes)
    if args.dtypes
    else (QUICK_DEFAULTS["dtypes"] if args.quick else list(DTYPES))
  )
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
  if args.json is None and not args.child:
    args.json = str(OUT_DIR / ("models-quick.json" if args.quick else "models.json"))
  return args


def run_isolated(name: str, dtype_name: str, args) -> dict[str, Any]:
  """:func:`run_model` in a fresh process (``python -m benchmarks.models --child``)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    command = [sys.executable, "-m", "benchmarks.models", "--child", "--no-isolate"]
    command += ["--json", path, "--models", name, "--dtypes", dtype_name, "--seed", str(args.seed)]
    command += ["--repeats", str(args.repeats), "--compile-repeats", str(args.compile_repeats)]
    command += ["--quick"] if args.quick else []
    command += ["--no-torch"] if args.no_torch else []
    # The child logs its progress to stderr as it runs; the tables are printed here at the end.
    done = subprocess.run(command, check=False, cwd=REPO)
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
    print(models_report(saved["results"], saved["meta"]))
    return 0
  suite = QUICK_MODELS if args.quick else MODELS
  log = functools.partial(print, file=sys.stderr, flush=True)
  quiet = (lambda *a, **k: None) if args.child else log  # the parent logs these
  if torch is not None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  info = machine_info(
    # A child's rates would be thrown away: its parent records them.
    rates=None if args.child else measure_rates(repeats=3 if args.quick else 5),
    torch_used=torch is not None and not args.no_torch,
    quick=args.quick,
    isolated=args.isolate,
    repeats=args.repeats,
    compile_repeats=args.compile_repeats,
    seed=args.seed,
  )
  quiet(
    f"convmm {info['convmm']}, jax {info['jax']}, flax {info['flax']}, torch "
    f"{info['torch'] if info['torch_used'] else 'not used'} on {info['cpu']} "
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
          + f"; convmm/flax fwd {fmt_sig(q['fwd'])}x, step {fmt_sig(q['step'])}x, compile "
          f"step {fmt_sig(q['compile_step'])}x; rel. err fwd {err['fwd']:.1e}, grads "
          f"{err['grads']:.1e}"
        )
      results.append(result)
      if args.json:  # after every network, so that an interrupted run keeps what it measured
        write_json(args.json, info, results)
  quiet(f"done in {time.perf_counter() - start:.0f} s")
  if not args.child:
    print(models_report(results, info))
  if args.json:
    quiet(f"wrote {args.json}")
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
