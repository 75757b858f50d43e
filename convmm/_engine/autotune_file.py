"""The persistent store of :mod:`convmm._engine.autotune`: one JSON file, merged under a lock.

Where the file is (:func:`cache_path`), how it is read (a corrupted or foreign
file is ignored with one warning), and how an entry is written: under an
exclusive ``fcntl.flock`` on a lock file, re-read, merged, written to a
temporary file and renamed over the cache (see :mod:`convmm._engine.autotune`
for the format).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import tempfile
import threading
import warnings
from collections.abc import Iterator
from typing import Any

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None

FORMAT = "convmm-autotune"
# Bump when the key or the entry changes meaning: older files are then rewritten.
FORMAT_VERSION = 1
_FILE_NAME = "convmm-autotune.json"
_OFF_VALUES = ("0", "off", "false", "no")


_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()
_unwritable: set[str] = set()
# path -> (the file's (inode, mtime_ns, size), its entries): a reader re-parses
# the file only when it changed.
_snapshots: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}


def forget() -> None:
  """Forgets which warnings were given, unwritable paths and parsed files."""
  with _lock:
    _warned.clear()
    _unwritable.clear()
    _snapshots.clear()


def delete(path: pathlib.Path) -> None:
  """Deletes the cache file ``path`` under its lock."""
  with contextlib.suppress(FileNotFoundError, NotADirectoryError), _file_lock(path):
    path.unlink()
  with _lock:
    _snapshots.pop(str(path), None)


def cache_path() -> pathlib.Path | None:
  """The persistent cache file in force, or None when it is switched off.

  Returns:
    ``$CONVMM_CACHE_DIR/convmm-autotune.json`` if that variable is set, else
    the same name in ``$XDG_CACHE_HOME/convmm`` or ``~/.cache/convmm``; None if
    ``CONVMM_AUTOTUNE_CACHE`` is ``0``, ``off``, ``false`` or ``no``.

  Example:
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"CONVMM_CACHE_DIR": "/tmp/convmm-cache"}):
    ...   print(cache_path())
    /tmp/convmm-cache/convmm-autotune.json
    >>> with mock.patch.dict(os.environ, {"CONVMM_AUTOTUNE_CACHE": "off"}):
    ...   print(cache_path())
    None
  """
  if os.environ.get("CONVMM_AUTOTUNE_CACHE", "").strip().lower() in _OFF_VALUES:
    return None
  directory = os.environ.get("CONVMM_CACHE_DIR", "")
  if directory:
    return pathlib.Path(directory).expanduser() / _FILE_NAME
  xdg = os.environ.get("XDG_CACHE_HOME", "")
  if os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
    base = pathlib.Path(xdg)
  else:
    try:
      base = pathlib.Path.home() / ".cache"
    except RuntimeError:  # no home directory: memory only
      return None
  return base / "convmm" / _FILE_NAME


def valid_entry(entry: Any, key: dict[str, Any]) -> dict[str, Any] | None:
  """A file entry fit to answer ``key``, else None (then the problem is measured again)."""
  if not isinstance(entry, dict) or entry.get("key") != key:
    return None
  medians, failed = entry.get("medians"), entry.get("failed", {})
  if not (isinstance(medians, dict) and medians and isinstance(failed, dict)):
    return None
  names = set(key["candidates"])
  for name, seconds in medians.items():
    if name not in names or not isinstance(seconds, int | float) or not math.isfinite(seconds):
      return None
  return entry


def warn_once(path: pathlib.Path, kind: str, message: str) -> None:
  with _lock:
    if (str(path), kind) in _warned:
      return
    _warned.add((str(path), kind))
  warnings.warn(message, stacklevel=2)


def _stat_signature(stat: os.stat_result) -> tuple[int, int, int]:
  return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def read_entries(path: pathlib.Path, fresh: bool = False) -> dict[str, Any]:
  """The file's entries; {} if it is absent, unreadable, corrupted or foreign.

  Unless ``fresh``, an unchanged file is not parsed again. A writer reads fresh:
  what it merges into must not depend on file timestamps' resolution.
  """
  try:
    with open(path, "rb") as file:
      signature = _stat_signature(os.fstat(file.fileno()))
      with _lock:
        snapshot = _snapshots.get(str(path))
      if not fresh and snapshot is not None and snapshot[0] == signature:
        return snapshot[1]
      text = file.read()
  except (FileNotFoundError, NotADirectoryError):  # no file there yet
    return {}
  except OSError as error:
    warn_once(path, "read", f"convmm autotune: cannot read the cache file {path}: {error}")
    return {}
  try:
    data = json.loads(text)
  except ValueError:
    warn_once(
      path,
      "foreign",
      f"convmm autotune: ignoring the corrupted cache file {path} (not JSON); it will be rewritten",
    )
    return {}
  if not (
    isinstance(data, dict)
    and data.get("format") == FORMAT
    and data.get("version") == FORMAT_VERSION
    and isinstance(data.get("entries"), dict)
  ):
    warn_once(
      path,
      "foreign",
      f"convmm autotune: ignoring the cache file {path}: not a {FORMAT} file of "
      f"version {FORMAT_VERSION}; it will be rewritten",
    )
    return {}
  entries = data["entries"]
  with _lock:
    _snapshots[str(path)] = (signature, entries)
  return entries


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive lock on ``path``'s lock file (no-op without fcntl)."""
  if fcntl is None:
    yield
    return
  with open(path.with_name(path.name + ".lock"), "a") as lock_file:
    fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def write_entry(path: pathlib.Path, digest: str, entry: dict[str, Any]) -> None:
  with _lock:
    if str(path) in _unwritable:
      return
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
      if fcntl is not None:
        # Every writer holds the lock while its temporary file exists: one seen
        # now was left by a writer that was killed.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
          stale.unlink(missing_ok=True)
      entries = dict(read_entries(path, fresh=True))
      entries[digest] = entry
      _atomic_write(path, {"format": FORMAT, "version": FORMAT_VERSION, "entries": entries})
  except OSError as error:
    with _lock:
      _unwritable.add(str(path))
    warn_once(
      path,
      "write",
      f"convmm autotune: cannot write the cache file {path} ({error}); "
      "decisions are kept in memory only",
    )


def _atomic_write(path: pathlib.Path, data: dict[str, Any]) -> None:
  """Writes ``data`` to a temporary file beside ``path`` and renames it over ``path``."""
  descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(descriptor, "w") as file:
      json.dump(data, file, sort_keys=True, indent=1, allow_nan=False)
      file.flush()
      os.fsync(file.fileno())
      signature = _stat_signature(os.fstat(file.fileno()))
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise
  with _lock:
    # The renamed file keeps the temporary file's inode, mtime and size.
    _snapshots[str(path)] = (signature, data["entries"])
