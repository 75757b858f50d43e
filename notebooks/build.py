"""Build the notebooks from their percent-format text twins and execute them.

Each ``notebooks/NN_name.py`` is a jupytext-style percent script: ``# %%`` starts a
code cell, ``# %% [markdown]`` a markdown cell whose lines are comments. This
script turns each twin into ``NN_name.ipynb`` and executes it top to bottom with
nbclient (kernel ``python3``, working directory ``notebooks/``), keeping the
outputs so the notebook reads well on a code host.

Usage:
  python notebooks/build.py                   # every twin
  python notebooks/build.py 01 03             # the twins whose name starts with 01 or 03
  python notebooks/build.py --no-execute 02   # convert only
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
CELL_MARKER = re.compile(r"^# %%( \[markdown\])?\s*$")


def _trim(lines: list[str]) -> list[str]:
  while lines and not lines[0].strip():
    lines = lines[1:]
  while lines and not lines[-1].strip():
    lines = lines[:-1]
  return lines


def parse_percent(text: str) -> list[nbformat.NotebookNode]:
  """The cells of a percent-format script, in order."""
  cells, kind, lines = [], None, []

  def flush():
    body = _trim(lines)
    if kind is None or not body:
      return
    if kind == "markdown":
      md = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in body]
      cells.append(nbformat.v4.new_markdown_cell("\n".join(md)))
    else:
      cells.append(nbformat.v4.new_code_cell("\n".join(body)))

  for line in text.splitlines():
    match = CELL_MARKER.match(line)
    if match:
      flush()
      kind, lines = ("markdown" if match.group(1) else "code"), []
    else:
      lines.append(line)
  flush()
  return cells


def build(twin: pathlib.Path, execute: bool, timeout: int) -> float:
  """Write ``twin``'s notebook (executed unless ``execute`` is false); returns seconds."""
  nb = nbformat.v4.new_notebook()
  nb.cells = parse_percent(twin.read_text())
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  start = time.perf_counter()
  if execute:
    # The inline backend renders figures as PNG outputs; an inherited Agg backend would not.
    env_backend = os.environ.pop("MPLBACKEND", None)
    try:
      NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                     resources={"metadata": {"path": str(twin.parent)}}).execute()
    finally:
      if env_backend is not None:
        os.environ["MPLBACKEND"] = env_backend
  seconds = time.perf_counter() - start
  for index, cell in enumerate(nb.cells):
    cell["id"] = f"{twin.stem[:2]}-{index:03d}"  # stable ids: rebuilding gives small diffs
  nbformat.validate(nb)
  nbformat.write(nb, twin.with_suffix(".ipynb"))
  return seconds


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("prefixes", nargs="*", help="build only twins whose name starts with these")
  parser.add_argument("--no-execute", action="store_true", help="convert without executing")
  parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
  args = parser.parse_args(argv)
  twins = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))
  if args.prefixes:
    twins = [p for p in twins if p.name.startswith(tuple(args.prefixes))]
  if not twins:
    parser.error(f"no twin in {HERE} matches {args.prefixes}")
  for twin in twins:
    seconds = build(twin, execute=not args.no_execute, timeout=args.timeout)
    print(f"{twin.with_suffix('.ipynb').name}: {seconds:.1f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
