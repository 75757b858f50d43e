"""Griffe extension: read two docstring habits of convmm as Google style.

convmm's docstrings (run as doctests) use two forms that Napoleon accepts and griffe's
Google parser does not:

- ``Example:`` (singular) before the ``>>>`` lines: griffe only knows ``Examples:`` and
  would render the doctest as prose;
- one ``Args:`` entry for several parameters that share a description,
  ``strides, padding: as for f.``: griffe would warn and drop them; here each name
  gets its own entry with the shared description, so the parameter table is complete
  and griffe's check that every documented name is a parameter still applies.

Sphinx roles (``:func:`im2col```) become plain code spans.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(\w[\w ]*):\s*$")
_NAMES = re.compile(r"^\s*(\w+(?:\s*,\s*\w+)+)\s*:(\s.*)?$", re.DOTALL)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`~?([^`]+)`")
_ARGS_SECTIONS = ("args", "arguments", "parameters", "params", "attributes")


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
  """The docstring ``text`` with both habits rewritten as griffe's Google style."""
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    header = _SECTION.match(lines[i])
    if header and header.group(2) == "Example":
      lines[i] = f"{header.group(1)}Examples:"
    elif header and header.group(2).lower() in _ARGS_SECTIONS:
      lines[i + 1:] = _expand_args(lines, i + 1, len(header.group(1)))
    i += 1
  return _ROLE.sub(r"`\1`", "\n".join(lines))


class ConvmmDocstrings(griffe.Extension):
  """Applies :func:`normalize` to every docstring griffe loads."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      obj.docstring.value = normalize(obj.docstring.value)
