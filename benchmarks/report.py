"""Reporting: the markdown tables printed after a run.

Tables are built by ``tabulate`` (pipe format, cells unpadded so the text stays compact
and diff-friendly); this module only decides what goes in each cell.
"""

from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate

MIB = 1 / 2**20


def fmt(value: float | None, unit: str = "") -> str:
  """Three significant digits or so; ``-`` for a missing or non-finite value."""
  if value is None or not math.isfinite(value):
    return "-"
  if isinstance(value, int):
    return f"{value}{unit}"
  digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
  return f"{value:.{digits}f}{unit}"


def fmt_pair(record_a: dict, record_b: dict, key: str, scale: float = 1.0) -> str:
  """``"a/b"``: the same measurement of two implementations."""
  a, b = record_a.get(key), record_b.get(key)
  return "/".join(fmt(v * scale if v is not None and scale != 1 else v) for v in (a, b))


def shape_str(shape) -> str:
  return "x".join(map(str, shape))


def rates_line(meta: dict[str, Any]) -> str:
  """One line: the machine and XLA's GEMM and convolution rates on it (``machine.py``)."""
  head = (
    f"{meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, jax {meta.get('jax', '?')}, "
    f"{str(meta.get('date', '?'))[:10]}"
  )
  rates = meta.get("rates")
  if not rates:
    return f"{head}; XLA's GEMM and convolution rates were not recorded with this run."
  parts = []
  for operands, label in (
    ("float32", "float32 GEMM"),
    ("bfloat16", "bfloat16 x bfloat16 -> float32 GEMM"),
  ):
    cells = [
      f"{g['gflops']:.0f} ({shape_str(g['shape'])})"
      for g in rates["gemm"]
      if g["operands"] == operands
    ]
    parts.append(f"{label} {', '.join(cells)}")
  for c in rates["conv"]:
    parts.append(
      f"lax's {c['dtype']} convolution {c['gflops']:.0f} ({shape_str(c['lhs_shape'])} input, "
      f"{shape_str(c['rhs_shape'])} kernel, forward)"
    )
  return f"{head}. XLA's GFLOP/s on this machine (median of {rates['repeats']}): " + "; ".join(
    parts
  )


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
  """A markdown (pipe) table with unpadded cells."""
  return tabulate(
    rows, headers=headers, tablefmt="pipe", stralign=None, numalign=None, disable_numparse=True
  )


def _label(result: dict[str, Any], variant: str) -> str:
  return result["name"] if variant == "convmm" else f"{result['name']} {variant[len('convmm') :]}"


def algorithms_text(counts: dict[str, int] | None, reference: dict[str, int] | None = None) -> str:
  """The convolutions of a program by algorithm (``chosen.conv_algorithms``), most used first:
  ``"xla/xla/im2col"`` for one, ``"12x xla/xla/im2col, 5x im2col/im2col/im2col"`` for more.

  ``reference``: the same count for the reference program (lax's, Flax's); the convolutions
  ``counts`` has fewer of are computed without a convolution primitive (col2im, shift) and
  shown as ``none``. ``-`` if nothing was recorded (a run from before they were).
  """
  if counts is None:
    return "-"
  counts = dict(counts)
  missing = sum((reference or {}).values()) - sum(counts.values())
  if missing > 0:
    counts["none"] = missing
  if not counts:
    return "none"
  if list(counts.values()) == [1]:
    return next(iter(counts))
  ranked = sorted(counts.items(), key=lambda item: -item[1])  # stable: program order on ties
  return ", ".join(f"{n}x {key}" for key, n in ranked)


ALGORITHMS_NOTE = (
  "*algorithms*: who computed the forward pass, the input gradient and the kernel gradient of "
  "each convolution in convmm's program, read from its jaxpr: 'xla' is XLA's own convolution, "
  "'im2col' and 'depthwise' are convmm's engines. *none*: no convolution primitive (a strided "
  "transpose's col2im or the per-tap GEMMs of method='shift', differentiated by JAX's "
  "autodiff); '-': not recorded."
)

TIME_HEADERS = [
  "layer", "fwd ms", "lax", "torch", "/lax", "/torch",
  "step ms", "lax", "torch", "/lax", "/torch", "GFLOP/s fwd", "GEMM frac fwd/step",
  "algorithms fwd/dx/dw",
]  # fmt: skip

RESOURCE_HEADERS = [
  "layer", "op", "input, kernel", "GEMM (groups x) MxKxN", "compile fwd s convmm/lax",
  "compile step s", "temp MiB fwd convmm/lax", "temp MiB step", "page faults/call fwd",
  "page faults/call step", "max err vs lax",
]  # fmt: skip


def time_rows(results: list[dict[str, Any]], variants: list[str]) -> list[list[str]]:
  rows = []
  for r in results:
    lax_r, torch_r = r["impls"].get("lax", {}), r["impls"].get("torch", {})
    for name in variants:
      c = r["impls"].get(name, {})
      ratio = r["ratios"].get(name, {})
      if c.get("error"):
        rows.append([_label(r, name), f"error: {c['error'][:60]}"] + [""] * 12)
        continue
      rows.append([
        _label(r, name), fmt(c.get("fwd_ms")), fmt(lax_r.get("fwd_ms")),
        fmt(torch_r.get("fwd_ms")), fmt(ratio.get("fwd_vs_lax"), "x"),
        fmt(ratio.get("fwd_vs_torch"), "x"), fmt(c.get("step_ms")), fmt(lax_r.get("step_ms")),
        fmt(torch_r.get("step_ms")), fmt(ratio.get("step_vs_lax"), "x"),
        fmt(ratio.get("step_vs_torch"), "x"), fmt(c.get("gflops_fwd")),
        f"{fmt(c.get('gemm_fraction_fwd'))}/{fmt(c.get('gemm_fraction_step'))}",
        algorithms_text(c.get("algorithms"), lax_r.get("algorithms")),
      ])  # fmt: skip
  return rows


def resource_rows(results: list[dict[str, Any]], variants: list[str]) -> list[list[str]]:
  rows = []
  for r in results:
    g = r["gemm"]
    gemm = f"{g['m']}x{g['k']}x{g['n']}"
    if g["groups"] > 1:
      gemm = f"{g['groups']} x {gemm}"
    lax_r = r["impls"].get("lax", {})
    for name in variants:
      c = r["impls"].get(name, {})
      if c.get("error"):
        continue
      err = r["errors"].get(name)
      err = "-" if err is None else f"{max(err[k] for k in ('fwd', 'loss', 'dlhs', 'drhs')):.1e}"
      rows.append([
        _label(r, name), r["op"], f"{shape_str(r['lhs_shape'])}, {shape_str(r['rhs_shape'])}",
        gemm, fmt_pair(c, lax_r, "compile_fwd_s"), fmt_pair(c, lax_r, "compile_step_s"),
        fmt_pair(c, lax_r, "temp_fwd_bytes", MIB), fmt_pair(c, lax_r, "temp_step_bytes", MIB),
        fmt_pair(c, lax_r, "fwd_page_faults"), fmt_pair(c, lax_r, "step_page_faults"), err,
      ])  # fmt: skip
  return rows


def summary_lines(summary: dict[str, Any]) -> list[str]:
  lines = []
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
      f"{fmt(s['max_compile_vs_lax'], 'x')}."
    )
  return lines


def markdown_tables(
  results: list[dict[str, Any]], variants: list[str], summary: dict[str, Any], meta: dict[str, Any]
) -> str:
  """Time table, resource table and geometric means, as markdown."""
  caption = (
    f"Times in ms, {meta['stat']} of up to {meta['reps']} interleaved repetitions; "
    f"{meta['cpu']}, {meta['cores']} cores, jax {meta['jax']}, torch {meta['torch']}; "
    "/lax and /torch are convmm's time over theirs; GEMM frac is XLA's time for the bare "
    "GEMM of the same M, K, N (x3 for a step) over convmm's."
  )
  return "\n".join([
    caption, "", rates_line(meta), "",
    markdown(TIME_HEADERS, time_rows(results, variants)), "", ALGORITHMS_NOTE, "",
    markdown(RESOURCE_HEADERS, resource_rows(results, variants)), "",
    *summary_lines(summary),
  ])  # fmt: skip


def memory_lines(memory: dict[str, Any]) -> list[str]:
  """The memory-target table (temporary MiB of the compiled forward and step)."""
  mib = lambda v: "-" if v is None else f"{v / 2**20:.0f}"
  allowance = mib(memory["allowance_bytes"])
  rows = []
  for name, record in memory["temp_bytes"].items():
    if "error" in record:
      rows.append([name, f"error: {record['error'][:60]}", "", "", ""])
    else:
      rows.append([
        name, mib(record["fwd"]), mib(record["step"]),
        str(record.get("fwd_ok", "")), str(record.get("step_ok", "")),
      ])  # fmt: skip
  return [
    "",
    f"Memory target ({shape_str(memory['lhs_shape'])} input, "
    f"{shape_str(memory['rhs_shape'])} kernel, compiled only): temporary MiB "
    f"(fwd <= {allowance}; step <= lax + {allowance})",
    "",
    markdown(["implementation", "fwd", "step", "fwd ok", "step ok"], rows),
  ]


# ------------------------------------------------------------------ whole networks


def fmt_sig(value: float | None, digits: int = 3) -> str:
  """``value`` with ``digits`` significant digits (no exponent below 10**digits)."""
  if value is None or not math.isfinite(value):
    return "-"
  return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}" if value else "0"


MODEL_TIME_HEADERS = [
  "model dtype", "fwd ms convmm", "flax", "torch", "/flax", "/torch",
  "step ms convmm", "flax", "torch", "/flax", "/torch",
  "err fwd / grad", "grad err vs f32 convmm / flax",
]  # fmt: skip

MODEL_RESOURCE_HEADERS = [
  "model dtype", "compile fwd s convmm / flax", "/flax", "compile step s", "/flax",
  "temp MiB fwd", "/flax", "temp MiB step", "/flax",
]  # fmt: skip


def model_time_rows(results: list[dict[str, Any]]) -> list[list[str]]:
  """Forward and step times of convmm, Flax and PyTorch, and agreement, per network and dtype."""
  rows = []
  for r in results:
    label = f"{r['model']} {r['dtype']}"
    if "error" in r:
      rows.append([label, f"error: {r['error'][:80]}"] + [""] * (len(MODEL_TIME_HEADERS) - 2))
      continue
    c, f, t, q = r["impls"]["convmm"], r["impls"]["flax"], r["impls"].get("torch", {}), r["ratios"]
    vs_f32 = r["errors"].get("vs_float32")
    rows.append([
      label, fmt_sig(c["fwd_ms"]), fmt_sig(f["fwd_ms"]), fmt_sig(t.get("fwd_ms")),
      _times(q["fwd"]), _times(q.get("fwd_vs_torch")),
      fmt_sig(c["step_ms"]), fmt_sig(f["step_ms"]), fmt_sig(t.get("step_ms")),
      _times(q["step"]), _times(q.get("step_vs_torch")),
      f"{r['errors']['fwd']:.1e} / {r['errors']['grads']:.1e}",
      "-" if vs_f32 is None
      else f"{vs_f32['convmm']['grads']:.1e} / {vs_f32['flax']['grads']:.1e}",
    ])  # fmt: skip
  return rows


def model_resource_rows(results: list[dict[str, Any]]) -> list[list[str]]:
  """Compile seconds and compiled temporary memory of convmm and Flax, per network and dtype."""
  mib = lambda b: None if b is None else b / 2**20
  rows = []
  for r in results:
    if "error" in r:
      continue
    c, f, q = r["impls"]["convmm"], r["impls"]["flax"], r["ratios"]
    rows.append([
      f"{r['model']} {r['dtype']}",
      f"{fmt_sig(c['compile_fwd_s'])} / {fmt_sig(f['compile_fwd_s'])}",
      _times(q["compile_fwd"]),
      f"{fmt_sig(c['compile_step_s'])} / {fmt_sig(f['compile_step_s'])}",
      _times(q["compile_step"]),
      f"{fmt_sig(mib(c['temp_fwd_bytes']))} / {fmt_sig(mib(f['temp_fwd_bytes']))}",
      _times(q["temp_fwd"]),
      f"{fmt_sig(mib(c['temp_step_bytes']))} / {fmt_sig(mib(f['temp_step_bytes']))}",
      _times(q["temp_step"]),
    ])  # fmt: skip
  return rows


MODEL_ALGORITHM_HEADERS = ["model dtype", "convmm's convolutions by algorithm fwd/dx/dw"]


def model_algorithm_rows(results: list[dict[str, Any]]) -> list[list[str]]:
  """The convolutions of convmm's inference program by algorithm, per network and dtype
  (none for runs that did not record them)."""
  return [
    [
      f"{r['model']} {r['dtype']}",
      algorithms_text(r["impls"]["convmm"]["algorithms"], r["impls"]["flax"].get("algorithms")),
    ]
    for r in results
    if "error" not in r and "algorithms" in r["impls"]["convmm"]
  ]


def model_algorithm_lines(results: list[dict[str, Any]]) -> list[str]:
  """The table of :func:`model_algorithm_rows` and its note; nothing for runs without them."""
  rows = model_algorithm_rows(results)
  return [markdown(MODEL_ALGORITHM_HEADERS, rows), "", ALGORITHMS_NOTE, ""] if rows else []


def _times(ratio: float | None) -> str:
  return "-" if ratio is None else fmt_sig(ratio) + "x"


def models_report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  """The whole-network tables with their caption and the machine's rates, as markdown."""
  isolated = " (each network and dtype in its own process)" if meta.get("isolated") else ""
  return "\n".join([
    f"convmm / Flax layers; times are medians of {meta['repeats']} interleaved "
    f"repetitions{isolated}, compile times medians of {meta['compile_repeats']} (trace + lower "
    f"+ compile); load average {meta['load_average'][0]:.1f} at the start. /flax and /torch are "
    "convmm's time over theirs.",
    "",
    rates_line(meta),
    "",
    markdown(MODEL_TIME_HEADERS, model_time_rows(results)),
    "",
    markdown(MODEL_RESOURCE_HEADERS, model_resource_rows(results)),
    "",
    *model_algorithm_lines(results),
    "err: max |convmm - flax| / max |flax| over the output, and over all parameters' "
    "gradients; for 16-bit runs also each network's gradient error against Flax's "
    "network in float32.",
  ])  # fmt: skip
