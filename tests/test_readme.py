"""README.md is a landing page whose claims hold: its examples print what they say, its links
resolve, its commands are the ones CI runs, and it stays within 200 lines."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

from benchmarks import performance_page

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MAIN_JOB = (
  "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[examples]' && "
  "python -m examples.cnn.main"
)
TESTS = (
  "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' torch==2.13.0 && "
  "pytest -n 2"
)


def python_blocks(text: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_readme_fits_in_200_lines_with_every_row_of_its_generated_table():
  layers = {
    "meta": {"cpu": "CPU", "cores": 2, "jax": "0.10.2", "date": "2026-12-07"},
    "layers": [
      {"name": name, "ratios": {"convmm": {"step_vs_lax": 0.5, "step_vs_torch": 2.0}}}
      for _, name in performance_page.README_LAYERS
    ],
    "summary": {"convmm": {"layers": 13, "geomean_step_vs_lax": 0.4, "geomean_step_vs_torch": 1}},
  }
  models = {
    "meta": layers["meta"],
    "results": [
      {"model": name, "dtype": dtype, "ratios": {"step": 0.8, "step_vs_torch": 1.2}}
      for _, name, dtype in performance_page.README_MODELS
    ],
  }
  table = performance_page.readme_table(layers, models)
  assert table.count("\n| ") == 1 + len(performance_page.README_LAYERS) + 1 + len(
    performance_page.README_MODELS
  )
  start = README.index(performance_page.README_START)
  end = README.index(performance_page.README_END) + len(performance_page.README_END)
  full = README[:start] + table + README[end:]
  assert len(full.splitlines()) <= 200, len(full.splitlines())


def test_examples_print_what_their_comments_say():
  """The quick start and the Functions example, run in one namespace, as a reader would."""
  namespace: dict = {}
  for block in python_blocks(README)[:2]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    expected = [
      line.split("#", 1)[1].strip() for line in block.splitlines() if line.startswith("print(")
    ]
    assert printed.getvalue().splitlines() == expected


def test_links_to_repository_files_resolve():
  targets = re.findall(r"\]\(([^)#]+)\)", README)
  local = [t for t in targets if not t.startswith(("http://", "https://"))]
  assert {"docs/performance.md", "docs/design.md", "examples/cnn/README.md"} <= set(local)
  assert [t for t in local if not (REPO / t).exists()] == []


def test_commands_are_the_ones_ci_runs():
  assert MAIN_JOB in README and TESTS in README
  ci = (REPO / ".ci" / "run").read_text()
  assert "pip install -e '.[test]' torch==2.13.0\n" in ci and "\npytest -n 2\n" in ci


def test_no_history_in_the_readme():
  """No commit hashes or first person: the history is in git and CHANGELOG.md."""
  prose = re.sub(r"```.*?```|\(https?://[^)]*\)", "", README, flags=re.DOTALL)
  assert not re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", prose)
  assert not re.findall(r"\b(I|we|We|our|Our|my)\b", prose)
