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


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
  """A markdown (pipe) table with unpadded cells."""
  return tabulate(
    rows, headers=headers, tablefmt="pipe", stralign=None, numalign=None, disable_numparse=True
  )


def _label(result: dict[str, Any], variant: str) -> str:
  return result["name"] if variant == "convmm" else f"{result['name']} {variant[len('convmm') :]}"


TIME_HEADERS = [
  "layer", "fwd ms", "lax", "torch", "/lax", "/torch",
  "step ms", "lax", "torch", "/lax", "/torch", "GFLOP/s fwd", "GEMM frac fwd/step",
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
        rows.append([_label(r, name), f"error: {c['error'][:60]}"] + [""] * 11)
        continue
      rows.append([
        _label(r, name), fmt(c.get("fwd_ms")), fmt(lax_r.get("fwd_ms")),
        fmt(torch_r.get("fwd_ms")), fmt(ratio.get("fwd_vs_lax"), "x"),
        fmt(ratio.get("fwd_vs_torch"), "x"), fmt(c.get("step_ms")), fmt(lax_r.get("step_ms")),
        fmt(torch_r.get("step_ms")), fmt(ratio.get("step_vs_lax"), "x"),
        fmt(ratio.get("step_vs_torch"), "x"), fmt(c.get("gflops_fwd")),
        f"{fmt(c.get('gemm_fraction_fwd'))}/{fmt(c.get('gemm_fraction_step'))}",
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
    caption, "",
    markdown(TIME_HEADERS, time_rows(results, variants)), "",
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
