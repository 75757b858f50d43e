"""The memory budget: bytes a tile of a convolution may hold (see :mod:`convmm._engine.tiling`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from convmm._engine.policy import DEFAULT_MEMORY_BUDGET
from convmm._engine.settings import Setting
from convmm._rules.canonical import positive_count

MEMORY_BUDGET = Setting("convmm_memory_budget", DEFAULT_MEMORY_BUDGET)  # 16 MiB, see policy


def current_memory_budget() -> int:
  """The budget in force: the innermost :func:`memory_budget`, else the default."""
  return MEMORY_BUDGET.get()


def budget_or_current(nbytes: int | None) -> int:
  """An explicit (validated) budget, or the one in force at trace time for None."""
  return current_memory_budget() if nbytes is None else nbytes


def set_memory_budget(nbytes: int) -> int:
  """Sets the default tile working-set budget in bytes; returns the previous value.

  The budget bounds the temporaries of one tile of a convolution (see
  :func:`memory_budget`, which overrides it inside a block). Jitted functions
  follow a new default as they follow :func:`memory_budget`: on jax 0.10.1 and
  later they are traced again for it, on older jax those already traced keep
  the tiling they were traced with.

  Example:
    >>> import convmm
    >>> old = convmm.set_memory_budget(64 * 2**20)
    >>> _ = convmm.set_memory_budget(old)
  """
  return MEMORY_BUDGET.set(positive_count("set_memory_budget", "nbytes", nbytes, unit="bytes"))


@contextlib.contextmanager
def memory_budget(nbytes: int) -> Iterator[None]:
  """Context manager: convolutions run inside use a tile budget of ``nbytes``.

  The budget bounds a tile's whole working set: its input window, its patch
  matrix counted three times in a forward convolution (smaller tiles ran
  faster) and twice in a kernel gradient (the patches and their GEMM operand
  copy), the first unfolding stage and the tile's output. Work beyond it is computed
  tile by tile (output rows, then columns, then batch chunks). The whole
  padded input and the output are held besides. An explicit
  ``memory_budget=`` argument takes precedence. The block sets the budget for
  the current thread only.

  On jax 0.10.1 and later the budget is part of the key of jax's jit caches, as
  ``jax.default_matmul_precision`` is: a function jitted outside the block and
  called inside it is traced and compiled again for the block's budget, and
  called after the block it runs the program compiled for the budget outside.
  On older jax (from 0.7.0) the budget is read only when a convolution is
  traced: a jitted function keeps the budget of its first trace, inside the
  block or out (``jax.clear_caches()`` or a new ``jax.jit`` traces it again).

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x, w = jnp.ones((1, 64, 64, 8)), jnp.ones((3, 3, 8, 8))
    >>> with convmm.memory_budget(2**20):
    ...   y = convmm.conv_general_dilated(x, w, (1, 1), 'SAME',
    ...       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> y.shape
    (1, 64, 64, 8)
  """
  with MEMORY_BUDGET.override(positive_count("memory_budget", "nbytes", nbytes, unit="bytes")):
    yield
