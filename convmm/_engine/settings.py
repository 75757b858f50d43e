"""Settings that change what convmm traces, kept in jax's jit cache key.

A :class:`Setting` has a global default (:meth:`Setting.set`) and a per-thread
override (:meth:`Setting.override`, a context manager), and is read while a
convolution is traced. A function jitted before the value changed must be traced
again under the new value, as it is under ``jax.default_matmul_precision``. So
where jax allows (a ``jax.make_user_context`` with a settable global: jax 0.10.1
and later), the value lives in a jax user context, which jax puts in the key of
its tracing, lowering and compilation caches: a jitted function gets one cache
entry per value it is called under.

On older jax (down to the floor in pyproject.toml) a setting is a Python global
and a context variable, read at trace time but not keyed: a function already
traced keeps the value it was traced with. convmm's own jitted helpers add
:func:`unkeyed_values` to their static arguments, so that they at least follow.

A new setting is one line, ``_SETTING = Setting("convmm_name", default)``; its
public functions validate values and call the methods.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Hashable, Iterator
from typing import Any, Generic, TypeVar

import jax

T = TypeVar("T", bound=Hashable)

_UNSET: Any = object()


def _user_context(default: Any) -> Any:
  """A jax user context holding ``default``, or None where jax cannot key a setting.

  jax 0.10.0's user contexts have no ``set_global``, so a global default set
  there would be read but not keyed: such jax is treated as older jax.
  """
  make_user_context = getattr(jax, "make_user_context", None)
  context = None if make_user_context is None else make_user_context(default)
  return context if hasattr(context, "set_global") else None


class Setting(Generic[T]):
  """A value read while tracing: a global default and a per-thread override.

  Values must be hashable (jax compares them to find a cached trace). Create
  settings at import time: jax's registration of a user context is not
  thread-safe.

  Args:
    name: the setting's name, ``convmm_`` and the public function's name.
    default: the value when neither :meth:`set` nor :meth:`override` changed it.

  Example:
    >>> from convmm._engine.budget import MEMORY_BUDGET
    >>> with MEMORY_BUDGET.override(4096):
    ...   MEMORY_BUDGET.get()
    4096
  """

  def __init__(self, name: str, default: T):
    self.name = name
    self._context = _user_context(default)
    # Older jax only (no user context): the global default and the per-thread override.
    self._default = default
    self._override: contextvars.ContextVar[T] = contextvars.ContextVar(name, default=_UNSET)
    if self._context is None:
      _UNKEYED.append(self)

  @property
  def keyed(self) -> bool:
    """Whether jax keys its caches on this setting (else see :func:`unkeyed_values`)."""
    return self._context is not None

  def get(self) -> T:
    """The value in force: the innermost :meth:`override`, else the global default."""
    if self._context is not None:
      return self._context.value
    value = self._override.get()
    return self._default if value is _UNSET else value

  def set(self, value: T) -> T:
    """Sets the global default; returns the previous one."""
    if self._context is not None:
      old = self._context.get_global()
      self._context.set_global(value)
      return old
    old, self._default = self._default, value
    return old

  @contextlib.contextmanager
  def override(self, value: T) -> Iterator[None]:
    """Context manager: ``value`` is in force in this thread inside the block."""
    if self._context is not None:
      with self._context(value):
        yield
      return
    token = self._override.set(value)
    try:
      yield
    finally:
      self._override.reset(token)

  def __repr__(self) -> str:
    return f"Setting({self.name!r}, value={self.get()!r}, keyed={self.keyed})"


_UNKEYED: list[Setting[Any]] = []


def unkeyed_values() -> tuple[Any, ...]:
  """The values of the settings jax does not key on: empty where it keys them all.

  A static argument of convmm's own jitted helpers, so that on older jax they are
  traced again when a setting changes (a user's ``jax.jit`` is not).

  Example:
    >>> from convmm._engine.settings import unkeyed_values
    >>> isinstance(unkeyed_values(), tuple)
    True
  """
  return tuple(setting.get() for setting in _UNKEYED)
