"""Shared pytest configuration: the CPU backend, the ``x64`` fixture, the ``slow`` marker."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after JAX_PLATFORMS is set)
import pytest  # noqa: E402

# A script run in its own 2-device subprocess (it sets jax_num_cpu_devices at import),
# not a test module: importing it here, as --doctest-modules would, fails.
collect_ignore = ["sharding_checks.py"]

# Tests that start subprocesses or kernels (notebooks, the benchmark, the training
# example, a fresh interpreter): skip them in a quick local loop with `-m "not slow"`.
# CI runs everything.
SLOW_FILES = ("test_notebooks.py", "test_bench.py", "test_train_cnn.py")
SLOW_TESTS = ("test_core_does_not_import_flax",)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.path.name in SLOW_FILES or item.name in SLOW_TESTS:
      item.add_marker(pytest.mark.slow)


@pytest.fixture
def x64():
  """float64 for one test only: other test files share the process."""
  # jax.enable_x64 is jax >= 0.8; the floor job runs older releases that only have
  # the experimental spelling of the same context manager.
  enable_x64 = getattr(jax, "enable_x64", None)
  if enable_x64 is None:
    from jax.experimental import enable_x64
  with enable_x64(True):
    yield
