"""Measuring: compile, check and time each layer for every implementation.

The helpers at the top (:func:`compile_timed`, :func:`time_interleaved`,
:func:`training_step`, :func:`max_error`, :func:`geomean`) know nothing about
convolutions and are shared with the whole-network benchmark (``models.py``);
:func:`measure_layer` and :func:`memory_target` are the layer suite's measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.chosen import conv_algorithms
from benchmarks.impls import LAX, JaxImpl, torch, torch_ops
from benchmarks.suite import MEMORY_ALLOWANCE, MEMORY_CASE, Layer, conv_layer, gemm_of


def compile_timed(
  fn: Callable, *args, donate_argnums: tuple[int, ...] = (), fresh: bool = False
) -> tuple[Any, dict[str, Any]]:
  """``jax.jit(fn)`` compiled for ``args``, with lower/compile seconds and temporary bytes.

  ``fresh``: clear JAX's caches first, so that tracing, lowering and compiling all happen
  again (a repeated compile time measurement).
  """
  if fresh:
    jax.clear_caches()
  start = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  memory = compiled.memory_analysis()
  return compiled, dict(
    compile_s=end - start,
    lower_s=lowered_at - start,
    xla_compile_s=end - lowered_at,
    temp_bytes=None if memory is None else int(memory.temp_size_in_bytes),
  )


def warm_up_compiler(jax_impls: dict[str, JaxImpl]) -> None:
  """Pays one-time tracing and XLA start-up costs before any compile time is measured."""
  layer = conv_layer("warm_up", "", (1, 4, 4, 2), (2, 2, 2, 2), 1, 0)
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
  return float(
    np.max(np.abs(actual - expected), initial=0.0)
    / max(1.0, float(np.max(np.abs(expected), initial=0.0)))
  )


def random_operands(layer: Layer, seed: int) -> tuple[jax.Array, jax.Array]:
  """Input ~ N(0, 1) and kernel ~ N(0, 1/fan_in), so outputs are O(1)."""
  key_x, key_w = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(key_x, layer.lhs_shape, jnp.float32)
  fan_in = math.prod(layer.rhs_shape) / max(layer.rhs_shape)  # all but the widest axis
  w = jax.random.normal(key_w, layer.rhs_shape, jnp.float32) / math.sqrt(fan_in)
  return x, w


def time_interleaved(
  runners: dict[Any, Callable[[], Any]], reps: int, min_reps: int = 1, max_seconds: float = math.inf
) -> tuple[dict[Any, list[float]], dict[Any, list[int]], int, float]:
  """Times every runner ``reps`` times, interleaved, rotating the order each repetition.

  Interleaving spreads the machine's load changes over all runners alike. Stops early
  once ``min_reps`` repetitions are done and ``max_seconds`` are spent. Returns the
  seconds per call and the minor page faults per call of each runner, the repetitions
  made and the seconds the loop took.
  """
  samples: dict[Any, list[float]] = {key: [] for key in runners}
  # Minor page faults per call: XLA allocates its temporary buffer afresh for every call,
  # and above glibc's mmap threshold (32 MiB) each page of it faults again every time.
  faults: dict[Any, list[int]] = {key: [] for key in runners}
  order = list(runners)
  start = time.perf_counter()
  done = 0
  for rep in range(reps):
    for key in order[rep % len(order) :] + order[: rep % len(order)]:
      faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      runners[key]()
      samples[key].append(time.perf_counter() - t0)
      faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    done += 1
    if done >= min_reps and time.perf_counter() - start > max_seconds:
      break
  return samples, faults, done, time.perf_counter() - start


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
      record["algorithms"] = conv_algorithms(forward, x, w)
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

      torch_errors["fwd"] = max_error(
        torch_fwd().numpy(), to_torch_layout(outputs["lax"]["fwd"]) if "lax" in outputs else np.nan
      )
      torch_step()
      runners["torch", "fwd"], runners["torch", "step"] = torch_fwd, torch_step
    except Exception as e:  # noqa: BLE001
      record["error"] = f"{type(e).__name__}: {e}"[:500]
      log(f"    torch failed: {record['error']}")

  samples, faults, reps, seconds = time_interleaved(
    runners, args.reps, min_reps=args.min_reps, max_seconds=args.max_seconds
  )

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
      errors[name] = {
        key: max_error(outputs[name][key], outputs["lax"][key])
        for key in ("fwd", "loss", "dlhs", "drhs")
      }
      errors[name]["reduction"] = reduction
    if impls[name]["error"] is None:
      ratios[name] = layer_ratios(impls, name)
  if torch_errors:
    errors["torch"] = torch_errors

  return dict(
    name=layer.name,
    source=layer.source,
    op=layer.op,
    lhs_shape=list(layer.lhs_shape),
    rhs_shape=list(layer.rhs_shape),
    out_shape=list(out_shape),
    kwargs=layer.kwargs,
    gemm=dict(dataclasses.asdict(gemm), flops=gemm.flops, ms=gemm_ms),
    flops=dict(fwd=gemm.flops, step=3 * gemm.flops),
    reps=reps,
    seconds=seconds,
    impls=impls,
    ratios=ratios,
    errors=errors,
  )


def layer_ratios(impls: dict[str, dict[str, Any]], name: str) -> dict[str, float | None]:
  """convmm variant ``name`` over lax and torch: time, compile time, temporary memory."""

  def ratio(key, other):
    a, b = impls.get(name, {}).get(key), impls.get(other, {}).get(key)
    return a / b if a is not None and b else None

  return dict(
    fwd_vs_lax=ratio("fwd_ms", "lax"),
    step_vs_lax=ratio("step_ms", "lax"),
    fwd_vs_torch=ratio("fwd_ms", "torch"),
    step_vs_torch=ratio("step_ms", "torch"),
    compile_fwd_vs_lax=ratio("compile_fwd_s", "lax"),
    compile_step_vs_lax=ratio("compile_step_s", "lax"),
    temp_fwd_vs_lax=ratio("temp_fwd_bytes", "lax"),
    temp_step_vs_lax=ratio("temp_step_bytes", "lax"),
  )


def memory_target(jax_impls: dict[str, JaxImpl], log) -> dict[str, Any]:
  """Temporary bytes of the forward and step of ``MEMORY_CASE`` for each implementation."""
  x = jax.ShapeDtypeStruct(MEMORY_CASE.lhs_shape, jnp.float32)
  w = jax.ShapeDtypeStruct(MEMORY_CASE.rhs_shape, jnp.float32)
  temps = {}
  for name, impl in jax_impls.items():
    forward = functools.partial(impl.apply, MEMORY_CASE)
    try:
      temps[name] = {
        mode: compile_timed(fn, x, w)[1]["temp_bytes"]
        for mode, fn in (("fwd", forward), ("step", training_step(forward)))
      }
    except Exception as e:  # noqa: BLE001
      temps[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
      log(f"    memory target: {name} failed: {temps[name]['error'][:200]}")
  lax_step = temps.get("lax", {}).get("step")
  for name, record in temps.items():
    if name != "lax" and "error" not in record and record["fwd"] is not None:
      record["fwd_ok"] = record["fwd"] <= MEMORY_ALLOWANCE
      record["step_ok"] = (
        None if lax_step is None else (record["step"] <= lax_step + MEMORY_ALLOWANCE)
      )
  return dict(
    lhs_shape=list(MEMORY_CASE.lhs_shape),
    rhs_shape=list(MEMORY_CASE.rhs_shape),
    allowance_bytes=MEMORY_ALLOWANCE,
    temp_bytes=temps,
  )


def geomean(values: list[float | None]) -> float | None:
  """Geometric mean of the positive finite values (``None`` if there are none)."""
  values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
  return statistics.geometric_mean(values) if values else None


def summarize(results: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
  summary = {}
  for name in variants:
    per_layer = [r["ratios"][name] for r in results if name in r["ratios"]]
    column = lambda key, per_layer=per_layer: [ratios[key] for ratios in per_layer]
    summary[name] = {
      f"geomean_{key}": geomean(column(key))
      for key in ("step_vs_lax", "fwd_vs_lax", "step_vs_torch", "fwd_vs_torch")
    }
    valid = lambda values: [v for v in values if v is not None]
    summary[name]["max_step_vs_lax"] = max(valid(column("step_vs_lax")), default=None)
    summary[name]["max_compile_vs_lax"] = max(
      valid(column("compile_fwd_vs_lax") + column("compile_step_vs_lax")), default=None
    )
    summary[name]["layers"] = len(per_layer)
  return summary
