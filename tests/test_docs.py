"""The documentation tools: the link check over the built site, and the griffe extension that
turns the docstrings' Sphinx roles into cross-references and hides private base classes."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def load(name: str):
  spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_check_links_finds_broken_links_anchors_and_remote_loads(tmp_path):
  check_links = load("check_links")
  (tmp_path / "api").mkdir()
  (tmp_path / "api" / "a.html").write_text('<h2 id="x">x</h2><a name="y"></a>')
  (tmp_path / "index.html").write_text(
    '<a href="api/a.html#x">ok</a> <a href="api/a.html#y">ok</a> <a href="#top" id="top">ok</a>'
    '<a href="/api/a.html">ok</a> <a href="https://example.com/z.js">a link, not loaded</a>'
    '<a href="api/a.html#nope">1</a> <a href="gone.html">2</a>'
    '<script src="https://cdn.example/m.js"></script>'
    '<link rel="stylesheet" href="https://fonts.example/css">'
  )
  assert check_links.problems(tmp_path) == [
    "index.html: api/a.html#nope (no anchor #nope in a.html)",
    "index.html: gone.html (no such file)",
    "index.html: https://cdn.example/m.js (loaded from another host)",
    "index.html: https://fonts.example/css (loaded from another host)",
  ]
  assert check_links.main([str(tmp_path)]) == 1
  (tmp_path / "index.html").write_text('<a href="api/a.html#x">ok</a>')
  assert check_links.main([str(tmp_path)]) == 0


def test_griffe_extension_links_roles_and_hides_private_bases():
  griffe = pytest.importorskip("griffe")
  extension = load("griffe_docstrings")
  package = griffe.load(
    "convmm",
    search_paths=[str(DOCS.parent)],
    extensions=griffe.load_extensions(extension.ConvmmDocstrings),
  )
  assert [str(b.canonical_path) for b in package["linen"]["Conv"].bases] == ["flax.linen.Module"]
  assert [str(b.canonical_path) for b in package["nnx"]["Conv"].bases] == ["flax.nnx.Module"]
  collection = package.modules_collection
  paths = extension.rendered_paths(collection, ["convmm", "convmm.linen", "convmm.nnx"])
  assert paths["convmm._engine.im2col.im2col"] == paths["convmm.im2col"] == "convmm.im2col"
  assert "convmm._engine.blocks.spatial_blocks" not in paths
  scope = collection["convmm._signal.convolve"]
  text = (
    ":func:`correlate`, :func:`convmm.conv_general_dilated`, :mod:`convmm._engine.blocks`, "
    ":meth:`x`"
  )
  assert extension.link_roles(text, scope, paths) == (
    "[`correlate`][convmm.correlate], "
    "[`convmm.conv_general_dilated`][convmm.conv_general_dilated], `convmm._engine.blocks`, `x`"
  )
  in_nnx = collection["convmm.nnx.ConvLocal"]
  assert extension.link_roles(":class:`Conv`", in_nnx, paths) == "[`Conv`][convmm.nnx.Conv]"
  in_linen = collection["convmm.linen.ConvLocal"]
  assert extension.link_roles(":class:`~convmm.nnx.Conv`", in_linen, paths) == (
    "[`Conv`][convmm.nnx.Conv]"
  )
