"""The memory budget: bytes a tile of a convolution may hold (see :mod:`convmm._engine.tiling`)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from convmm._engine.policy import DEFAULT_MEMORY_BUDGET
from convmm._rules.canonical import positive_count

_DEFAULT_MEMORY_BUDGET = DEFAULT_MEMORY_BUDGET  # 16 MiB, measured (see policy); settable
_budget_override: contextvars.ContextVar[int | None] = contextvars.ContextVar(
  "convmm_memory_budget", default=None
)


def current_memory_budget() -> int:
  """The budget in force: the innermost :func:`memory_budget`, else the default."""
  override = _budget_override.get()
  return _DEFAULT_MEMORY_BUDGET if override is None else override


def budget_or_current(nbytes: int | None) -> int:
  """An explicit (validated) budget, or the one in force at trace time for None."""
  return current_memory_budget() if nbytes is None else nbytes


def set_memory_budget(nbytes: int) -> int:
  """Sets the default tile working-set budget in bytes; returns the previous value.

  The budget bounds the temporaries of one tile of a convolution (see
  :func:`memory_budget`). It is read when a convolution is traced: functions
  already compiled keep the tiling they were traced with.

  Example:
    >>> import convmm
    >>> old = convmm.set_memory_budget(64 * 2**20)
    >>> _ = convmm.set_memory_budget(old)
  """
  global _DEFAULT_MEMORY_BUDGET
  nbytes = positive_count("set_memory_budget", "nbytes", nbytes, unit="bytes")
  old, _DEFAULT_MEMORY_BUDGET = _DEFAULT_MEMORY_BUDGET, nbytes
  return old


@contextlib.contextmanager
def memory_budget(nbytes: int) -> Iterator[None]:
  """Context manager: convolutions traced inside use a tile budget of ``nbytes``.

  The budget bounds a tile's whole working set: its input window, its patch
  matrix counted three times in a forward convolution (smaller tiles ran
  faster) and twice in a kernel gradient (the patches and their GEMM operand
  copy), the first unfolding stage and the tile's output. Work beyond it is computed
  tile by tile (output rows, then columns, then batch chunks). The whole
  padded input and the output are held besides. Like
  ``jax.default_matmul_precision``, it applies to what is traced inside the
  block; an explicit ``memory_budget=`` argument takes precedence.

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x, w = jnp.ones((1, 64, 64, 8)), jnp.ones((3, 3, 8, 8))
    >>> with convmm.memory_budget(2**20):
    ...   y = convmm.conv_general_dilated(x, w, (1, 1), 'SAME',
    ...       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> y.shape
    (1, 64, 64, 8)
  """
  token = _budget_override.set(positive_count("memory_budget", "nbytes", nbytes, unit="bytes"))
  try:
    yield
  finally:
    _budget_override.reset(token)
