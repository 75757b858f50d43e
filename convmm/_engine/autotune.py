"""Measured algorithm selection: time the candidates once, remember the fastest.

``method="autotune"`` asks this module which algorithm to use for one direction
(forward, input gradient, kernel gradient) of one convolution. :func:`decide`
answers from an in-process memory, else from a persistent cache file, else by
timing the candidates on the exact problem and keeping the fastest by a clear
margin. It runs in Python at trace time and never touches the caller's tracers.

Public functions:
  ``decide(problem, candidates, *, default, margin=0.05) -> str``: the choice.
  ``report() -> list[dict]``: the decisions made or loaded in this process.
  ``clear(memory=True, file=False) -> None``: forget decisions.
  ``cache_path() -> pathlib.Path | None``: the cache file in force, None if off.

Each decision is also logged on the ``convmm.autotune`` logger: INFO when it is
measured or read from the file, DEBUG when it is answered from memory.

Key. A decision is keyed by the canonical JSON (sorted keys) of the ``problem``
as given, the sorted candidate names and the environment: ``jax.default_backend()``,
the first device's ``device_kind`` and platform version, the jax, jaxlib and
convmm versions and the format version below. The file stores the key in full
under its SHA-256. ``default`` and ``margin`` are not part of the key: the
stored medians are re-judged with the caller's values, so changing them never
needs a new measurement.

Cache file. ``convmm-autotune.json`` in ``$CONVMM_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/convmm``, else ``~/.cache/convmm``. ``CONVMM_AUTOTUNE_CACHE``
set to ``0``, ``off``, ``false`` or ``no`` keeps decisions in memory only. Both
variables are read at every call. The file is::

  {"format": "convmm-autotune", "version": 1,
   "entries": {"<sha256 of the key>": {
     "key": {"problem": {...}, "candidates": [...], "environment": {...}},
     "choice": "im2col", "default": "im2col", "margin": 0.05,
     "medians": {"im2col": 0.0012, "shift": 0.0015},   # seconds per call
     "failed": {"depthwise": "ValueError: ..."},
     "build_seconds": {"im2col": 0.31, "shift": 0.28, "depthwise": 0.01},
     "cost_seconds": 0.84, "measured_at": 1767225600.0}}}

A writer takes an exclusive ``fcntl.flock`` on ``convmm-autotune.json.lock``,
re-reads the file, merges its entry, writes a temporary file in the same
directory and ``os.replace``-s it over the cache: readers (who take no lock)
see the old or the new file, never a partial one, and concurrent writers lose
no entry. Temporary files left by a killed writer are removed by the next one.
A corrupted or foreign file (not JSON, not this format or version) is ignored
with one warning per process and path and rewritten by the next write; an
unwritable directory gives one warning and memory-only operation. Without
``fcntl`` (Windows) writes are still atomic but not merged under a lock.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from convmm._engine import autotune_file
from convmm._engine.autotune_file import (
  FORMAT_VERSION as _FORMAT_VERSION,
)
from convmm._engine.autotune_file import cache_path as cache_path
from convmm._engine.autotune_file import read_entries, valid_entry, write_entry

# Timing: after one warm-up call, up to _ROUNDS round-robin rounds, fewer once a
# candidate's timed calls reach _TIME_CAP seconds. One sample repeats a call
# until it lasts about _MIN_SAMPLE seconds (at most _MAX_REPEATS calls), so
# microsecond calls are not timed at the clock's resolution.
_ROUNDS = 5
_TIME_CAP = 0.5
_MIN_SAMPLE = 1e-3
_MAX_REPEATS = 100

logger = logging.getLogger("convmm.autotune")

# Module state, guarded by _lock. Measurements run outside the lock: a candidate
# is compiled by jax, which may trace code that calls decide again.
_lock = threading.Lock()
_memory: dict[str, dict[str, Any]] = {}
_report: list[dict[str, Any]] = []


def decide(
  problem: Mapping[str, Any],
  candidates: Mapping[str, Callable[[], Callable[[], Any]]],
  *,
  default: str,
  margin: float = 0.05,
) -> str:
  """The fastest candidate for ``problem``: remembered, else measured once.

  Memory is consulted first, then the cache file; a decision found there calls
  no builder. Otherwise every builder is called (its time counts as compile
  cost), its runner is called once to warm up, and the runners are timed
  round-robin with ``jax.block_until_ready``. A candidate that raises while
  building or running is recorded as failed and never chosen. The decision is
  logged, added to :func:`report`, kept in memory and written to the cache file.
  Safe to call while jax traces the caller: measuring runs under
  ``jax.ensure_compile_time_eval()`` on the builders' own concrete arrays.

  Args:
    problem: a JSON-able description of one direction of one convolution (its
      direction, shapes, dtypes and every parameter). Tuples and numpy scalars
      are accepted; tuples and lists key alike.
    candidates: name -> builder. A builder takes no argument and returns a
      runner: a no-argument callable that runs the candidate once and returns
      its jax value(s).
    default: the candidate kept unless another is faster by more than
      ``margin``; also the answer when every candidate fails.
    margin: the relative speed-up, in [0, 1), another candidate's median time
      must exceed: it wins if ``median < (1 - margin) * median(default)``.

  Returns:
    The chosen candidate's name.

  Raises:
    ValueError: if ``candidates`` is empty, ``default`` is not one of them or
      ``margin`` is outside [0, 1).
    TypeError: if ``problem`` is not JSON-able.

  Example:
    >>> import os, time
    >>> from unittest import mock
    >>> candidates = {
    ...   "slow": lambda: (lambda: time.sleep(0.02)),
    ...   "fast": lambda: (lambda: None),
    ... }
    >>> with mock.patch.dict(os.environ, {"CONVMM_AUTOTUNE_CACHE": "off"}):  # memory only
    ...   decide({"direction": "doctest", "lhs_shape": (8, 8)}, candidates, default="slow")
    'fast'
  """
  names = list(candidates)
  if not names:
    raise ValueError("decide: `candidates` must name at least one candidate; got none")
  if default not in candidates:
    raise ValueError(f"decide: `default` ({default!r}) must be one of the candidates {names}")
  if not 0.0 <= margin < 1.0:
    raise ValueError(f"decide: `margin` must be in [0, 1); got {margin!r}")
  key = {
    "problem": _json_value("decide", "problem", problem),
    "candidates": sorted(names),
    "environment": _environment(),
  }
  digest = hashlib.sha256(_canonical_json(key).encode()).hexdigest()
  path = cache_path()

  with _lock:
    entry = _memory.get(digest)
  if entry is not None:
    return _record(entry, "memory", default, margin, cost=0.0)

  if path is not None:
    entry = valid_entry(read_entries(path).get(digest), key)
    if entry is not None:
      with _lock:
        entry = _memory.setdefault(digest, entry)
      return _record(entry, "file", default, margin, cost=0.0)

  measured = _measure(key, candidates, default, margin)
  with _lock:
    # Another thread may have measured the same problem meanwhile: the first
    # decision stands, so that this process makes one choice per problem.
    entry = _memory.setdefault(digest, measured)
  if path is not None and entry["medians"]:
    write_entry(path, digest, entry)
  return _record(entry, "measured", default, margin, cost=measured["cost_seconds"])


def report() -> list[dict[str, Any]]:
  """The decisions made or loaded in this process, oldest first, one per call.

  Returns:
    A list of dicts, one per :func:`decide` call since the last
    :func:`clear`, with keys ``problem`` (as keyed), ``choice``, ``default``,
    ``medians`` (candidate -> median seconds per call), ``failed`` (candidate
    -> error), ``build_seconds`` (candidate -> seconds to build, the compile
    cost), ``measured_cost_seconds`` (builds and timing, when measured),
    ``cost_seconds`` (what this call spent measuring: 0.0 unless measured),
    and ``source``: ``"measured"``, ``"memory"`` or ``"file"``.

  Example:
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"CONVMM_AUTOTUNE_CACHE": "off"}):
    ...   clear()
    ...   choice = decide({"direction": "doctest-report"}, {"a": lambda: (lambda: None)},
    ...                   default="a")
    ...   choice = decide({"direction": "doctest-report"}, {"a": lambda: (lambda: None)},
    ...                   default="a")
    >>> [(row["choice"], row["source"]) for row in report()]
    [('a', 'measured'), ('a', 'memory')]
  """
  with _lock:
    return copy.deepcopy(_report)


def clear(memory: bool = True, file: bool = False) -> None:
  """Forgets decisions, so that the next :func:`decide` looks further.

  Args:
    memory: forget the in-process decisions, the :func:`report` rows and which
      warnings were given.
    file: delete the cache file in force (:func:`cache_path`), under its lock.

  Example:
    >>> clear()
    >>> report()
    []
  """
  if memory:
    with _lock:
      _memory.clear()
      _report.clear()
    autotune_file.forget()
  path = cache_path()
  if file and path is not None:
    autotune_file.delete(path)


def _environment() -> dict[str, Any]:
  import jaxlib.version

  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    # The driver or runtime (e.g. the CUDA version) changes which algorithm is fastest.
    "platform_version": str(getattr(device.client, "platform_version", "")),
    "jax": jax.__version__,
    "jaxlib": jaxlib.version.__version__,
    "convmm": _convmm_version(),
    "format_version": _FORMAT_VERSION,
  }


def _convmm_version() -> str:
  # The installed distribution's version (convmm.__version__ by pyproject.toml), read
  # without importing the package root, which imports this module.
  import importlib.metadata

  try:
    return importlib.metadata.version("convmm")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _canonical_json(value: Any) -> str:
  return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_value(function: str, argument: str, value: Any) -> Any:
  """``value`` as plain JSON data (tuples become lists, numpy scalars Python numbers)."""

  def convert(item: Any) -> Any:
    if hasattr(item, "item") and getattr(item, "shape", None) == ():
      return item.item()  # numpy and jax scalars
    if hasattr(item, "name") and hasattr(item, "itemsize"):
      return str(item)  # numpy dtypes
    raise TypeError(f"{type(item).__name__} is not JSON-able")

  try:
    return json.loads(json.dumps(value, default=convert, allow_nan=False))
  except (TypeError, ValueError) as error:
    raise TypeError(
      f"{function}: `{argument}` must be JSON-able (lists, numbers, strings, dicts); "
      f"{error}; got {value!r}"
    ) from None


def _measure(
  key: dict[str, Any],
  candidates: Mapping[str, Callable[[], Callable[[], Any]]],
  default: str,
  margin: float,
) -> dict[str, Any]:
  start = time.perf_counter()
  runners: dict[str, Callable[[], Any]] = {}
  repeats: dict[str, int] = {}
  failed: dict[str, str] = {}
  build_seconds: dict[str, float] = {}
  samples: dict[str, list[float]] = {}
  # The caller may be under a jax trace: the builders' arrays and the runners'
  # calls must run eagerly, not be staged into the caller's program.
  with jax.ensure_compile_time_eval():
    for name, builder in candidates.items():
      try:
        built = time.perf_counter()
        runner = builder()
        build_seconds[name] = time.perf_counter() - built
        warm = time.perf_counter()
        jax.block_until_ready(runner())
        warm_seconds = time.perf_counter() - warm
      except Exception as error:
        failed[name] = _describe(error)
        continue
      runners[name] = runner
      repeats[name] = min(_MAX_REPEATS, max(1, math.ceil(_MIN_SAMPLE / max(warm_seconds, 1e-9))))
      samples[name] = []
    spent = dict.fromkeys(runners, 0.0)
    for _ in range(_ROUNDS):
      # Round-robin: a drift in the machine's speed touches every candidate alike.
      for name in list(runners):
        try:
          sample = _time_calls(runners[name], repeats[name])
        except Exception as error:
          failed[name] = _describe(error)
          del runners[name]
          continue
        spent[name] += sample
        samples[name].append(sample / repeats[name])
      if not runners or max(spent[name] for name in runners) >= _TIME_CAP:
        break
  medians = {name: statistics.median(samples[name]) for name in runners}
  if not medians:
    logger.warning(
      "convmm autotune: every candidate failed, using %r for %s: %s",
      default,
      _canonical_json(key["problem"]),
      failed,
    )
  return {
    "key": key,
    "choice": _choose(medians, default, margin),
    "default": default,
    "margin": margin,
    "medians": medians,
    "failed": failed,
    "build_seconds": build_seconds,
    "cost_seconds": time.perf_counter() - start,
    "measured_at": time.time(),
  }


def _time_calls(runner: Callable[[], Any], repeats: int) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(runner())
  return time.perf_counter() - start


def _describe(error: Exception) -> str:
  return f"{type(error).__name__}: {error}"[:500]


def _choose(medians: Mapping[str, float], default: str, margin: float) -> str:
  if not medians:
    return default
  best = min(medians, key=lambda name: (medians[name], name))
  if default not in medians:  # the default failed
    return best
  return best if medians[best] < (1.0 - margin) * medians[default] else default


def _record(entry: dict[str, Any], source: str, default: str, margin: float, cost: float) -> str:
  choice = _choose(entry["medians"], default, margin)
  row = {
    "problem": entry["key"]["problem"],
    "choice": choice,
    "default": default,
    "medians": dict(entry["medians"]),
    "failed": dict(entry["failed"]),
    "build_seconds": dict(entry.get("build_seconds", {})),
    "measured_cost_seconds": entry.get("cost_seconds", 0.0),
    "cost_seconds": cost,
    "source": source,
  }
  with _lock:
    _report.append(row)
  level = logging.DEBUG if source == "memory" else logging.INFO
  if logger.isEnabledFor(level):
    times = ", ".join(f"{name} {seconds * 1e3:.3g} ms" for name, seconds in row["medians"].items())
    failures = f"; failed: {', '.join(row['failed'])}" if row["failed"] else ""
    logger.log(
      level,
      "convmm autotune: %s -> %r (%s; %s%s; measuring cost %.3g s)",
      _canonical_json(row["problem"]),
      choice,
      source,
      times or "no timings",
      failures,
      row["measured_cost_seconds"],
    )
  return choice
