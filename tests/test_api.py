"""The public API: every public name is exported in ``__all__`` and documented.

The API reference site (docs/, ``mkdocs build --strict``) renders ``convmm.__all__``, so a
public function missing from it would be missing from the site.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import pathlib
import tomllib

import pytest

import convmm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_lists_every_public_name():
  public = {
    name
    for name, value in vars(convmm).items()
    if not name.startswith("_") and not inspect.ismodule(value)
  }
  assert sorted(public) == sorted(convmm.__all__)
  assert len(set(convmm.__all__)) == len(convmm.__all__), "a name is listed twice"


@pytest.mark.parametrize("name", convmm.__all__)
def test_public_function_is_documented_with_an_example(name):
  doc = inspect.getdoc(getattr(convmm, name))
  assert doc, f"convmm.{name} has no docstring"
  assert ">>>" in doc, f"convmm.{name}: the docstring has no example"


def test_version_has_one_source():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert "version" not in project and "version" in project["dynamic"]
  try:
    installed = importlib.metadata.version("convmm")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("convmm is not installed (imported from the source tree)")
  assert installed == convmm.__version__
