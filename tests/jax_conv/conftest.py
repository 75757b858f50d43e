"""Configuration of the vendored JAX tests.

* A passing vendored test must have called convmm (see ``convmm_shims``).
* Known failures, matched on the test's parameters (``KNOWN_FAILURES``), are marked
  ``xfail(strict=True)``: they fail the run as soon as convmm is fixed, so the marker
  is removed with the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import convmm_shims
import jax
import pytest

# The vendored files are jax 0.10's tests and use its private test utilities
# (jax._src.test_util, internal_test_util); another jax release has its own tests.
if jax.__version_info__[:2] != (0, 10):
  collect_ignore_glob = ["test_*.py"]


@dataclasses.dataclass(frozen=True)
class KnownFailure:
  test: str  # the upstream test method's name
  reason: str
  raises: type[BaseException] | tuple[type[BaseException], ...]
  applies: Callable[[dict[str, Any]], bool] = lambda params: True


KNOWN_FAILURES: list[KnownFailure] = []


def case_params(item) -> dict[str, Any]:
  """The parameters absl's ``parameterized`` bound to this generated test method."""
  fn = getattr(item.cls, item.name, None)
  for cell in getattr(fn, "__closure__", None) or ():
    if isinstance(cell.cell_contents, dict):
      return cell.cell_contents
  return {}


def pytest_collection_modifyitems(config, items):
  for item in items:
    cls = getattr(item, "cls", None)  # doctest items (convmm/) have no class
    if cls is None or not issubclass(cls, convmm_shims.ConvmmTestCase):
      continue
    fn = getattr(item.cls, item.name, None)
    test = getattr(getattr(fn, "__wrapped__", fn), "__name__", item.name)
    params = case_params(item)
    for known in KNOWN_FAILURES:
      if known.test == test and known.applies(params):
        item.add_marker(pytest.mark.xfail(strict=True, raises=known.raises, reason=known.reason))
        break


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
  report = yield
  if call.when == "call":
    item.convmm_call_report = report
  return report


@pytest.fixture(autouse=True)
def _convmm_was_called(request):
  yield
  report = getattr(request.node, "convmm_call_report", None)
  if isinstance(request.instance, convmm_shims.ConvmmTestCase) and report and report.passed:
    # Without this a vendored test could pass by computing nothing with convmm.
    assert sum(convmm_shims.calls.values()) > 0, f"{request.node.nodeid} made no call to convmm"
