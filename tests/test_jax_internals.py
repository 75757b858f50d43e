"""The JAX internals replace_convs uses (convmm/_jax_internals.py): listed, present, checked."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import pytest

import convmm
from convmm import _jax_internals

PACKAGE = pathlib.Path(convmm.__file__).parent


def _release(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split(".")[:3])


def _internals_read_by_replace() -> set[str]:
  """``module.attribute`` for every attribute convmm/_replace.py reads from the internals."""
  tree = ast.parse((PACKAGE / "_replace.py").read_text())
  modules = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "convmm._jax_internals":
      for alias in node.names:
        if alias.name in _jax_internals.__all__:
          modules[alias.asname or alias.name] = getattr(_jax_internals, alias.name).__name__
  chains = set()
  for node in ast.walk(tree):
    attributes = []
    while isinstance(node, ast.Attribute):
      attributes.insert(0, node.attr)
      node = node.value
    if attributes and isinstance(node, ast.Name) and node.id in modules:
      chains.add(".".join([modules[node.id], *attributes]))
  # `tree_util.FlatTree.flatten` is one internal, not two.
  return {c for c in chains if not any(other.startswith(f"{c}.") for other in chains)}


@pytest.mark.skipif(
  _jax_internals.missing() != [], reason="this jax lacks internals (test_namespace.py)"
)
def test_the_list_is_what_replace_reads():
  # One place: replace reads jax._src only through _jax_internals, and INTERNALS lists all it reads.
  source = (PACKAGE / "_replace.py").read_text()
  assert "jax._src" not in source
  assert _internals_read_by_replace() == set(_jax_internals.INTERNALS)


def test_the_list_is_sorted_and_unique():
  assert list(_jax_internals.INTERNALS) == sorted(set(_jax_internals.INTERNALS))


def test_the_tested_jax_has_every_internal():
  low, high = (_release(v) for v in _jax_internals.TESTED_JAX)
  if not low <= _release(jax.__version__) <= high:
    pytest.skip(f"jax {jax.__version__} is outside the tested range {_jax_internals.TESTED_JAX}")
  assert _jax_internals.missing() == []


def test_a_hidden_internal_is_named_when_replace_convs_is_called(monkeypatch):
  from jax._src import core

  monkeypatch.delattr(core, "jaxprs_in_params")
  low, _ = _jax_internals.TESTED_JAX
  pattern = (
    rf"replace_convs: needs JAX internals that jax {jax.__version__} lacks: "
    rf".*jax\._src\.core\.jaxprs_in_params.*tested with jax {low}"
  )
  with pytest.raises(ImportError, match=pattern):
    convmm.replace_convs(jnp.sin)
  monkeypatch.undo()
  if _jax_internals.missing() == []:
    assert convmm.replace_convs(jnp.sin)(jnp.zeros(2)).tolist() == [0.0, 0.0]
