"""The package layout of docs/design.md: layers import downward only, no circles, short modules.

Read from the source with ``ast`` (nothing is imported), every import statement counted,
function-local ones included.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "convmm"
MAX_LINES = 400
# Known exceptions, to be removed as they are fixed (none now).
TOO_LONG: set[str] = set()
IMPORTS_ROOT: set[str] = set()


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def level(module: str) -> int:
  """0 argument rules, 1 engine, 2 public functions, 3 layer machinery, 4 layers, 5 root."""
  parts = module.split(".")
  if module == "convmm":
    return 5
  return {"_rules": 0, "_engine": 1, "_layers": 3, "linen": 4, "nnx": 4}.get(parts[1], 2)


def imports(module: str) -> set[str]:
  """The convmm modules that ``module`` imports (``from convmm import x``: x, else the root)."""
  found = set()
  for node in ast.walk(ast.parse(MODULES[module].read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.split(".")[0] == "convmm"}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module.split(".")[0] != "convmm":
        continue
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in MODULES else node.module)
  return found - {module}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
  for target in imports(module):
    assert target in MODULES, (module, target)
    if module not in {"convmm", *IMPORTS_ROOT}:
      assert target != "convmm", f"{module} imports the package root"
    if target != "convmm" or module not in IMPORTS_ROOT:
      assert level(target) <= level(module), f"{module} (level {level(module)}) imports {target}"


def test_no_import_circles():
  graph = {m: imports(m) for m in MODULES}
  done, path = set(), []

  def visit(m):
    assert m not in path, "import circle: " + " -> ".join([*path[path.index(m) :], m])
    if m in done:
      return
    path.append(m)
    for target in sorted(graph[m]):
      visit(target)
    path.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_short(module):
  lines = len(MODULES[module].read_text().splitlines())
  assert (lines <= MAX_LINES) != (module in TOO_LONG), (module, lines)  # an exception says so
