"""Griffe extension: convmm's docstrings as the API pages should show them.

convmm's docstrings (run as doctests) use forms that Napoleon and Sphinx accept and griffe's
Google parser does not:

- ``Example:`` (singular) before the ``>>>`` lines: griffe only knows ``Examples:`` and
  would render the doctest as prose;
- one ``Args:`` entry for several parameters that share a description,
  ``strides, padding: as for f.``: griffe would warn and drop them; here each name
  gets its own entry with the shared description, so the parameter table is complete
  and griffe's check that every documented name is a parameter still applies;
- Sphinx roles (``:func:`im2col```, ``:class:`convmm.linen.Conv```): a role naming an object
  that the site shows becomes a cross-reference to its heading (mkdocstrings' ``[text][path]``
  syntax, resolved as Python resolves the name where the docstring is); any other role becomes
  a plain code span.

It also hides private names: a class whose bases are private (``_ConvFields``,
``convmm._nnx_layer.Layer``) shows their public bases instead (``flax.linen.Module``).

The objects the site shows are the members of the modules that the pages under ``docs/api/``
render with ``::: module`` (``convmm``'s ``__all__``; the public classes and functions of the
others).
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(\w[\w ]*):\s*$")
_NAMES = re.compile(r"^\s*(\w+(?:\s*,\s*\w+)+)\s*:(\s.*)?$", re.DOTALL)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`(?P<target>~?[^`]+)`")
_ARGS_SECTIONS = ("args", "arguments", "parameters", "params", "attributes")
_API_PAGES = pathlib.Path(__file__).resolve().parent / "api"
_RENDERED = re.compile(r"^:::\s+(\S+)", re.MULTILINE)


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _expand_args(lines: list[str], start: int, section_indent: int) -> list[str]:
  """Rewrites the entries of the Args section whose header is ``lines[start - 1]``."""
  out, i = [], start
  while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > section_indent):
    if not lines[i].strip():
      out.append(lines[i])
      i += 1
      continue
    item_indent = _indent(lines[i])
    j = i + 1
    while j < len(lines) and lines[j].strip() and _indent(lines[j]) > item_indent:
      j += 1
    entry = lines[i:j]
    match = _NAMES.match(" ".join(line.strip() for line in entry))
    if match is None:
      out.extend(entry)
    else:
      description = (match.group(2) or "").strip()
      for name in re.split(r"\s*,\s*", match.group(1)):
        out.append(f"{' ' * item_indent}{name}: {description}")
    i = j
  return out + lines[i:]


def normalize(text: str) -> str:
  """The docstring ``text`` with ``Example:`` and shared Args entries in griffe's Google style."""
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    header = _SECTION.match(lines[i])
    if header and header.group(2) == "Example":
      lines[i] = f"{header.group(1)}Examples:"
    elif header and header.group(2).lower() in _ARGS_SECTIONS:
      lines[i + 1 :] = _expand_args(lines, i + 1, len(header.group(1)))
    i += 1
  return "\n".join(lines)


def _lookup(collection: griffe.ModulesCollection, path: str) -> griffe.Object | None:
  """The object at ``path``, aliases followed to their target; None if there is none."""
  try:
    found = collection[path]
    return found.final_target if found.is_alias else found
  except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
    return None


def rendered_paths(collection: griffe.ModulesCollection, modules: list[str]) -> dict[str, str]:
  """``{path: path of its heading}`` for every function and class the API pages show, under
  both the name the page shows (``convmm.im2col``) and where it is defined
  (``convmm._engine.im2col.im2col``)."""
  paths = {}
  for module_path in modules:
    module = _lookup(collection, module_path)
    if module is None:
      continue
    names = module.exports
    if names is None:
      names = [n for n, m in module.members.items() if not n.startswith("_") and not m.is_alias]
    for name in map(str, names):
      target = _lookup(collection, f"{module_path}.{name}")
      if target is not None and target.kind in (griffe.Kind.FUNCTION, griffe.Kind.CLASS):
        shown = f"{module_path}.{name}"
        paths[shown] = paths[target.path] = shown
  return paths


def _scopes(obj: griffe.Object) -> list[str]:
  """Where a name in ``obj``'s docstring may live: ``obj`` itself, its parents, the package."""
  scopes, current = [], obj
  while current is not None:
    scopes.append(current.path)
    current = current.parent
  return scopes


def link_roles(text: str, obj: griffe.Object, paths: dict[str, str]) -> str:
  """``text`` with each Sphinx role a cross-reference (if the site shows its target) or code."""
  collection = obj.modules_collection

  def replace(match: re.Match) -> str:
    target = match.group("target")
    shown = target.lstrip("~").rsplit(".", 1)[-1] if target.startswith("~") else target
    target = target.lstrip("~")
    for scope in ["", *_scopes(obj)]:
      found = _lookup(collection, f"{scope}.{target}" if scope else target)
      if found is not None and found.path in paths:
        return f"[`{shown}`][{paths[found.path]}]"
    return f"`{shown}`"

  return _ROLE.sub(replace, text)


def _is_private(path: str) -> bool:
  return any(part.startswith("_") for part in path.split("."))


def public_bases(cls: griffe.Class) -> list[Any]:
  """``cls``'s bases, each private one replaced by its own public bases (recursively)."""
  bases, seen = [], set()
  for base in cls.bases:
    path = getattr(base, "canonical_path", str(base))
    if _is_private(path):
      resolved = _lookup(cls.modules_collection, path)
      inherited = public_bases(resolved) if isinstance(resolved, griffe.Class) else []
    else:
      inherited = [base]
    for expression in inherited:
      key = getattr(expression, "canonical_path", str(expression))
      if key not in seen:
        seen.add(key)
        bases.append(expression)
  return bases


def _objects(obj: griffe.Object):
  """``obj`` and every object defined in it (aliases, which are imports, left out)."""
  yield obj
  for member in obj.members.values():
    if not member.is_alias:
      yield from _objects(member)


class ConvmmDocstrings(griffe.Extension):
  """Rewrites every docstring of the package (see the module docstring) once it is loaded."""

  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
    modules = [
      m for page in sorted(_API_PAGES.glob("*.md")) for m in _RENDERED.findall(page.read_text())
    ]
    paths = rendered_paths(pkg.modules_collection, modules)
    for obj in _objects(pkg):
      if obj.docstring is not None:
        obj.docstring.value = link_roles(normalize(obj.docstring.value), obj, paths)
      if isinstance(obj, griffe.Class):
        obj.bases = public_bases(obj)
