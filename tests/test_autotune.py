"""The autotune store: selection by measurement, memory, the persistent cache file, the report.

Timings are never asserted. The candidates are fakes whose runners sleep known
amounts (0 against 20 ms), so which one is faster is not in doubt; equal
candidates test that the default is kept within the margin.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convmm._engine import autotune as _autotune
from convmm._engine import autotune_file
from convmm._engine.autotune import cache_path, clear, decide, report

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBLEM = {
  "direction": "forward",
  "lhs_shape": [2, 8, 8, 3],
  "rhs_shape": [3, 3, 3, 4],
  "dtype": "float32",
  "window_strides": [1, 1],
  "padding": [[1, 1], [1, 1]],
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
  """Each test gets an empty memory and its own cache directory."""
  directory = tmp_path / "cache"
  monkeypatch.setenv("CONVMM_CACHE_DIR", str(directory))
  monkeypatch.delenv("CONVMM_AUTOTUNE_CACHE", raising=False)
  clear()
  yield directory
  clear()


def sleeper(seconds):
  """A builder whose runner sleeps ``seconds``."""
  return lambda: lambda: time.sleep(seconds)


def counted(calls, name, seconds=0.0):
  """A builder that counts its builds in ``calls[name]``."""

  def build():
    calls[name] = calls.get(name, 0) + 1
    return lambda: time.sleep(seconds)

  return build


def raising_builder():
  raise AssertionError("a remembered decision must not build any candidate")


REMEMBERED = {"slow": raising_builder, "fast": raising_builder}


def file_data(directory):
  return json.loads((directory / "convmm-autotune.json").read_text())


def test_the_fastest_candidate_wins_by_a_clear_margin():
  choice = decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow")
  assert choice == "fast"
  (row,) = report()
  assert row["source"] == "measured" and row["choice"] == "fast" and row["default"] == "slow"
  assert row["problem"] == PROBLEM
  assert sorted(row["medians"]) == ["fast", "slow"] and row["failed"] == {}
  assert sorted(row["build_seconds"]) == ["fast", "slow"]
  assert row["cost_seconds"] > 0 and row["cost_seconds"] == row["measured_cost_seconds"]


def test_equal_candidates_keep_the_default():
  # Two runners of the same 5 ms: neither is faster by a margin of a half.
  for default in ("a", "b"):
    problem = dict(PROBLEM, default_under_test=default)
    choice = decide(
      problem, {"a": sleeper(0.005), "b": sleeper(0.005)}, default=default, margin=0.5
    )
    assert choice == default


@pytest.mark.parametrize(
  "medians, default, margin, expected",
  [
    ({"a": 1.0, "b": 0.96}, "a", 0.05, "a"),
    ({"a": 1.0, "b": 0.94}, "a", 0.05, "b"),
    ({"a": 1.0, "b": 0.94, "c": 0.5}, "a", 0.05, "c"),
    ({"a": 1.0, "b": 0.5}, "a", 0.6, "a"),
    ({"a": 1.0, "b": 1.0}, "b", 0.0, "b"),
    ({"b": 2.0, "c": 1.0}, "a", 0.05, "c"),
    ({}, "a", 0.05, "a"),
  ],
  ids=[
    "within-margin",
    "beyond-margin",
    "fastest-of-several",
    "large-margin",
    "tie",
    "default-failed",
    "all-failed",
  ],
)
def test_choice_rule(medians, default, margin, expected):
  assert _autotune._choose(medians, default, margin) == expected


def test_a_remembered_decision_is_rejudged_with_the_callers_default_and_margin():
  assert decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow") == "fast"
  # The stored medians are judged again: a margin no candidate can beat keeps the default.
  assert decide(PROBLEM, REMEMBERED, default="slow", margin=0.999) == "slow"
  assert decide(PROBLEM, REMEMBERED, default="fast") == "fast"


def failing_runner_after(calls):
  count = [0]

  def run():
    count[0] += 1
    if count[0] > calls:
      raise RuntimeError("out of memory")

  return lambda: run


def test_failing_candidates_are_recorded_and_never_chosen():
  candidates = {
    "slow": sleeper(0.02),
    "build-fails": lambda: (_ for _ in ()).throw(ValueError("cannot build")),
    "warmup-fails": lambda: lambda: 1 / 0,
    "timing-fails": failing_runner_after(2),
  }
  assert decide(PROBLEM, candidates, default="slow") == "slow"
  (row,) = report()
  assert sorted(row["medians"]) == ["slow"]
  assert row["failed"] == {
    "build-fails": "ValueError: cannot build",
    "warmup-fails": "ZeroDivisionError: division by zero",
    "timing-fails": "RuntimeError: out of memory",
  }


def test_a_failing_default_gives_way_to_the_fastest_candidate():
  candidates = {"default": lambda: lambda: 1 / 0, "b": sleeper(0.02), "c": sleeper(0.0)}
  assert decide(PROBLEM, candidates, default="default") == "c"


def test_when_every_candidate_fails_the_default_is_kept_in_memory_only(cache_dir):
  calls = {}

  def build():
    calls["n"] = calls.get("n", 0) + 1
    raise ValueError("no")

  assert decide(PROBLEM, {"a": build, "b": build}, default="b") == "b"
  assert not (cache_dir / "convmm-autotune.json").exists()
  assert decide(PROBLEM, {"a": build, "b": build}, default="b") == "b"
  assert calls["n"] == 2  # measured once; the second call was answered from memory


def test_memory_answers_without_building(cache_dir):
  assert decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow") == "fast"
  (cache_dir / "convmm-autotune.json").unlink()  # memory is consulted before the file
  assert decide(PROBLEM, REMEMBERED, default="slow") == "fast"
  assert [row["source"] for row in report()] == ["measured", "memory"]
  assert report()[1]["cost_seconds"] == 0.0


def test_a_warm_cache_file_answers_without_building(cache_dir):
  assert decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow") == "fast"
  measured = report()[0]
  clear()  # a new process: the memory is empty, the file is warm
  assert decide(PROBLEM, REMEMBERED, default="slow") == "fast"
  (row,) = report()
  assert row["source"] == "file" and row["cost_seconds"] == 0.0
  assert row["medians"] == measured["medians"]
  assert row["measured_cost_seconds"] == measured["measured_cost_seconds"]


def test_the_file_format_and_its_key(cache_dir):
  decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow")
  data = file_data(cache_dir)
  assert data["format"] == "convmm-autotune" and data["version"] == _autotune._FORMAT_VERSION
  (entry,) = data["entries"].values()
  assert entry["key"]["problem"] == PROBLEM
  assert entry["key"]["candidates"] == ["fast", "slow"]
  environment = entry["key"]["environment"]
  import jaxlib.version

  import convmm

  assert environment["backend"] == jax.default_backend()
  assert environment["device_kind"] == jax.devices()[0].device_kind
  assert environment["jax"] == jax.__version__
  assert environment["jaxlib"] == jaxlib.version.__version__
  assert environment["convmm"] == convmm.__version__
  assert environment["format_version"] == _autotune._FORMAT_VERSION
  assert entry["choice"] == "fast" and entry["default"] == "slow" and entry["margin"] == 0.05
  assert sorted(entry["medians"]) == ["fast", "slow"] and entry["failed"] == {}
  assert entry["cost_seconds"] > 0 and sorted(entry["build_seconds"]) == ["fast", "slow"]
  assert not [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
  "change",
  [
    dict(problem=dict(PROBLEM, window_strides=[2, 1])),
    dict(problem=dict(PROBLEM, dtype="bfloat16")),
    dict(problem=dict(PROBLEM, direction="input_gradient")),
    dict(candidates=("a", "b", "c")),
    dict(environment={"jax": "0.0.0"}),
    dict(environment={"device_kind": "another device"}),
    dict(environment={"convmm": "9.9.9"}),
  ],
  ids=["strides", "dtype", "direction", "candidate-set", "jax", "device-kind", "convmm"],
)
def test_a_different_key_is_measured_again(change, monkeypatch):
  calls = {}
  decide(PROBLEM, {name: counted(calls, name) for name in ("a", "b")}, default="a")
  if "environment" in change:
    environment = dict(_autotune._environment(), **change["environment"])
    monkeypatch.setattr(_autotune, "_environment", lambda: environment)
  names = change.get("candidates", ("a", "b"))
  decide(
    change.get("problem", PROBLEM), {name: counted(calls, name) for name in names}, default="a"
  )
  assert calls["a"] == 2


def test_problems_key_by_value_not_by_python_type():
  decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow")
  alike = dict(
    PROBLEM,
    lhs_shape=(np.int64(2), 8, 8, 3),
    rhs_shape=tuple(PROBLEM["rhs_shape"]),
    dtype=np.dtype("float32"),
    padding=((1, 1), (1, 1)),
  )
  assert decide(alike, REMEMBERED, default="slow") == "fast"
  assert report()[1]["source"] == "memory"


def test_the_cache_follows_convmm_cache_dir(cache_dir, tmp_path, monkeypatch):
  assert cache_path() == cache_dir / "convmm-autotune.json"
  decide(PROBLEM, {"a": sleeper(0.0)}, default="a")
  assert (cache_dir / "convmm-autotune.json").exists()
  moved = tmp_path / "moved"
  monkeypatch.setenv("CONVMM_CACHE_DIR", str(moved))
  clear()
  calls = {}
  decide(PROBLEM, {"a": counted(calls, "a")}, default="a")
  assert calls == {"a": 1}  # the old directory's decision is not seen
  assert len(file_data(moved)["entries"]) == 1


def test_the_default_directory_is_xdg_cache_home_then_home(tmp_path, monkeypatch):
  monkeypatch.delenv("CONVMM_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache_path() == tmp_path / "xdg" / "convmm" / "convmm-autotune.json"
  decide(PROBLEM, {"a": sleeper(0.0)}, default="a")
  assert (tmp_path / "xdg" / "convmm" / "convmm-autotune.json").exists()
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cache_path() == tmp_path / "home" / ".cache" / "convmm" / "convmm-autotune.json"


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false", "no"])
def test_the_cache_file_can_be_switched_off(value, cache_dir, monkeypatch):
  monkeypatch.setenv("CONVMM_AUTOTUNE_CACHE", value)
  assert cache_path() is None
  assert decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow") == "fast"
  assert not cache_dir.exists()
  assert decide(PROBLEM, REMEMBERED, default="slow") == "fast"  # memory still works


def test_a_switched_off_cache_ignores_a_warm_file(monkeypatch):
  decide(PROBLEM, {"a": sleeper(0.0)}, default="a")
  clear()
  monkeypatch.setenv("CONVMM_AUTOTUNE_CACHE", "0")
  calls = {}
  decide(PROBLEM, {"a": counted(calls, "a")}, default="a")
  assert calls == {"a": 1}


FOREIGN = {
  "corrupted": "{not json",
  "truncated": '{"format": "convmm-autotune", "version": 1, "entries": {',
  "a-list": "[1, 2]",
  "another-format": '{"format": "something-else", "version": 1, "entries": {}}',
  "another-version": '{"format": "convmm-autotune", "version": 999, "entries": {}}',
  "entries-not-a-dict": '{"format": "convmm-autotune", "version": 1, "entries": []}',
}


@pytest.mark.parametrize("text", FOREIGN.values(), ids=FOREIGN.keys())
def test_a_corrupted_or_foreign_file_is_ignored_with_one_warning_and_rewritten(text, cache_dir):
  path = cache_dir / "convmm-autotune.json"
  cache_dir.mkdir()
  path.write_text(text)
  with pytest.warns(UserWarning, match=f"ignoring the .*cache file {path}") as caught:
    assert decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow") == "fast"
  assert len(caught) == 1
  assert len(file_data(cache_dir)["entries"]) == 1  # rewritten
  path.write_text(text)  # broken again: no second warning in this process, rewritten again
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    decide(dict(PROBLEM, dtype="float16"), {"a": sleeper(0.0)}, default="a")
  assert caught == []
  assert len(file_data(cache_dir)["entries"]) == 1


def test_a_malformed_entry_is_measured_again_and_replaced(cache_dir):
  decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow")
  data = file_data(cache_dir)
  (digest,) = data["entries"]
  data["entries"][digest]["medians"] = {"slow": "quick"}
  (cache_dir / "convmm-autotune.json").write_text(json.dumps(data))
  clear()
  calls = {}
  candidates = {"slow": counted(calls, "slow", 0.02), "fast": counted(calls, "fast")}
  assert decide(PROBLEM, candidates, default="slow") == "fast"
  assert calls == {"slow": 1, "fast": 1} and report()[0]["source"] == "measured"
  assert file_data(cache_dir)["entries"][digest]["medians"]["slow"] != "quick"  # replaced


def test_an_entry_stored_under_another_key_is_not_used(cache_dir):
  decide(PROBLEM, {"a": sleeper(0.0)}, default="a")
  other = dict(PROBLEM, dtype="float16")
  decide(other, {"a": sleeper(0.0)}, default="a")
  data = file_data(cache_dir)
  first, second = data["entries"]
  data["entries"][first], data["entries"][second] = data["entries"][second], data["entries"][first]
  (cache_dir / "convmm-autotune.json").write_text(json.dumps(data))
  clear()
  calls = {}
  decide(PROBLEM, {"a": counted(calls, "a")}, default="a")
  assert calls == {"a": 1}


def test_an_unwritable_directory_warns_once_and_keeps_decisions_in_memory(tmp_path, monkeypatch):
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  monkeypatch.setenv("CONVMM_CACHE_DIR", str(blocker / "cache"))  # under a file: never creatable
  with pytest.warns(UserWarning, match="cannot write the cache file .*memory only") as caught:
    assert decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow") == "fast"
  assert len(caught) == 1
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert decide(PROBLEM, REMEMBERED, default="slow") == "fast"
    decide(dict(PROBLEM, dtype="float16"), {"a": sleeper(0.0)}, default="a")
  assert caught == []


def test_writes_merge_with_what_another_process_wrote_meanwhile(cache_dir):
  decide(PROBLEM, {"a": sleeper(0.0)}, default="a")
  path = cache_dir / "convmm-autotune.json"
  data = json.loads(path.read_text())
  data["entries"]["written-by-another-process"] = {"key": {}, "choice": "x"}
  path.write_text(json.dumps(data))
  decide(dict(PROBLEM, dtype="float16"), {"a": sleeper(0.0)}, default="a")
  assert len(file_data(cache_dir)["entries"]) == 3


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(cache_dir, monkeypatch):
  decide(PROBLEM, {"a": sleeper(0.0)}, default="a")
  path = cache_dir / "convmm-autotune.json"
  before = path.read_text()

  def interrupted(source, destination):
    assert pathlib.Path(source).exists() and json.loads(pathlib.Path(source).read_text())
    raise KeyboardInterrupt  # as if the process stopped between writing and renaming

  monkeypatch.setattr(autotune_file.os, "replace", interrupted)
  with pytest.raises(KeyboardInterrupt):
    decide(dict(PROBLEM, dtype="float16"), {"a": sleeper(0.0)}, default="a")
  monkeypatch.undo()
  assert path.read_text() == before
  assert sorted(p.name for p in cache_dir.iterdir()) == [
    "convmm-autotune.json",
    "convmm-autotune.json.lock",
  ]


def test_clear_file_deletes_the_cache_file(cache_dir):
  decide(PROBLEM, {"a": sleeper(0.0)}, default="a")
  clear(memory=False, file=True)
  assert not (cache_dir / "convmm-autotune.json").exists()
  assert len(report()) == 1  # memory kept
  clear(memory=False, file=True)  # no file: nothing to do


def test_decide_runs_while_jax_traces_the_caller():
  def builder(scale, seconds):
    def build():
      x = jnp.arange(4.0)  # concrete, though the caller is being traced
      compiled = jax.jit(lambda a: a * scale).lower(x).compile()

      def run():
        time.sleep(seconds)
        return compiled(x)

      return run

    return build

  choices = []

  def f(y):
    choices.append(
      decide(PROBLEM, {"slow": builder(2.0, 0.02), "fast": builder(3.0, 0.0)}, default="slow")
    )
    return y * 2

  jaxpr = jax.make_jaxpr(f)(1.0)
  assert [eqn.primitive.name for eqn in jaxpr.eqns] == ["mul"]  # nothing staged into f
  assert jax.jit(f)(jnp.float32(1.5)) == 3.0
  assert jax.grad(f)(1.0) == 2.0
  assert choices == ["fast"] * 3
  assert report()[0]["failed"] == {} and report()[0]["source"] == "measured"


def test_threads_deciding_one_problem_agree():
  # Equal candidates and no margin: which one wins is noise, but every thread gets the same.
  results = []

  def work():
    results.append(
      decide(PROBLEM, {"a": sleeper(0.001), "b": sleeper(0.001)}, default="a", margin=0.0)
    )

  threads = [threading.Thread(target=work) for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(results) == 4 and len(set(results)) == 1


def test_each_decision_is_logged(caplog):
  with caplog.at_level(logging.DEBUG, logger="convmm.autotune"):
    decide(PROBLEM, {"slow": sleeper(0.02), "fast": sleeper(0.0)}, default="slow")
    decide(PROBLEM, REMEMBERED, default="slow")
  measured, remembered = caplog.records
  assert measured.name == "convmm.autotune" and measured.levelno == logging.INFO
  assert "-> 'fast' (measured; slow" in measured.getMessage()
  assert (
    "measuring cost" in measured.getMessage() and '"lhs_shape":[2,8,8,3]' in measured.getMessage()
  )
  assert remembered.levelno == logging.DEBUG and "(memory;" in remembered.getMessage()


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(candidates={}, default="a"), ValueError, "decide: `candidates` must name at least one"),
    (
      dict(default="c"),
      ValueError,
      r"decide: `default` \('c'\) must be one of the candidates \['a', 'b'\]",
    ),
    (dict(default="a", margin=1.0), ValueError, r"decide: `margin` must be in \[0, 1\); got 1.0"),
    (dict(default="a", margin=-0.1), ValueError, r"decide: `margin` must be in \[0, 1\); got -0.1"),
    (dict(problem={"x": object()}, default="a"), TypeError, "decide: `problem` must be JSON-able"),
    (
      dict(problem={"x": float("nan")}, default="a"),
      TypeError,
      "decide: `problem` must be JSON-able",
    ),
  ],
  ids=["no-candidates", "unknown-default", "margin-one", "negative-margin", "object", "nan"],
)
def test_argument_errors(kwargs, error, match):
  arguments = dict(problem=PROBLEM, candidates={"a": raising_builder, "b": raising_builder})
  arguments.update(kwargs)
  problem, candidates = arguments.pop("problem"), arguments.pop("candidates")
  with pytest.raises(error, match=match):
    decide(problem, candidates, **arguments)


def run_script(script: str, *args: str, cache: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, CONVMM_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("CONVMM_AUTOTUNE_CACHE", None)
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env)


def wait_for(condition, timeout=120.0):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


WRITER = """
  import pathlib, sys
  from convmm._engine import autotune as _autotune
  name, count = sys.argv[1], int(sys.argv[2])
  ready, go = pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4])
  _autotune._environment()  # jax is initialised before the race starts
  ready.touch()
  while not go.exists():
    pass
  candidates = {"a": lambda: (lambda: None), "b": lambda: (lambda: None)}
  i = 0
  while count < 0 or i < count:
    _autotune.decide({"writer": name, "i": i}, candidates, default="a")
    i += 1
"""


@pytest.mark.slow
def test_two_processes_writing_at_once_lose_nothing(cache_dir, tmp_path):
  go = tmp_path / "go"
  writers = [
    run_script(WRITER, name, "20", str(tmp_path / f"ready-{name}"), str(go), cache=cache_dir)
    for name in ("first", "second")
  ]
  wait_for(lambda: all((tmp_path / f"ready-{name}").exists() for name in ("first", "second")))
  go.touch()
  assert [writer.wait(timeout=300) for writer in writers] == [0, 0]
  entries = file_data(cache_dir)["entries"].values()
  written = sorted(
    (entry["key"]["problem"]["writer"], entry["key"]["problem"]["i"]) for entry in entries
  )
  assert written == sorted((name, i) for name in ("first", "second") for i in range(20))
  assert not list(cache_dir.glob("*.tmp")) and not list(cache_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_a_writer_killed_at_any_moment_leaves_a_valid_file(cache_dir, tmp_path):
  path = cache_dir / "convmm-autotune.json"
  for attempt, entries_before_kill in enumerate((3, 10)):  # in the file, in total
    go = tmp_path / f"go-{attempt}"
    writer = run_script(
      WRITER, f"w{attempt}", "-1", str(tmp_path / f"r{attempt}"), str(go), cache=cache_dir
    )
    wait_for(lambda: (tmp_path / f"r{attempt}").exists())  # noqa: B023
    go.touch()
    wait_for(lambda: path.exists() and len(file_data(cache_dir)["entries"]) >= entries_before_kill)  # noqa: B023
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    data = file_data(cache_dir)  # valid JSON of the format, whenever the kill came
    assert data["format"] == "convmm-autotune" and len(data["entries"]) >= entries_before_kill
  # A temporary file a killed writer left is removed by the next write.
  stale = cache_dir / ".convmm-autotune.json.stale.tmp"
  stale.write_text("{")
  decide(PROBLEM, {"a": sleeper(0.0)}, default="a")
  assert not stale.exists() and not list(cache_dir.glob(".*.tmp"))
  assert len(file_data(cache_dir)["entries"]) >= 11
