"""Shared pytest configuration: tests run on the CPU backend; the ``x64`` fixture."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after JAX_PLATFORMS is set)
import pytest  # noqa: E402

# A script run in its own 2-device subprocess (it sets jax_num_cpu_devices at import),
# not a test module: importing it here, as --doctest-modules would, fails.
collect_ignore = ["sharding_checks.py"]


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
