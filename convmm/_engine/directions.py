"""Who computes each direction of a convolution: by rule, by measurement, or as asked.

A convolution has three directions, the forward pass, the input gradient and
the kernel gradient, and each is computed by convmm's engine (``'convmm'``) or
by XLA's own convolution (``'xla'``, :mod:`convmm._engine.native`). The
``method`` argument decides, when the convolution is traced:

* ``'convmm'``, ``'im2col'``, ``'shift'``, ``'depthwise'``: convmm's engine in
  every direction; the program has no XLA convolution (pure paths);
* ``'xla'``: XLA's convolution in every direction;
* ``'auto'``: the rule table of :func:`convmm._engine.policy.direction_rule`;
* ``'autotune'``: both candidates of each direction timed on the exact
  convolution when first traced, the faster kept by a clear margin (else the
  rule's choice), remembered by :mod:`convmm._engine.autotune` in memory and
  in a cache file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from convmm._engine import autodiff, autotune, policy
from convmm._engine.policy import CONVMM, XLA, Directions
from convmm._engine.settings import Setting
from convmm._rules.shapes import ConvSpec

DIRECTION_NAMES = ("forward", "input_grad", "kernel_grad")
PURE_METHODS = ("convmm", *policy.ENGINES)
METHODS = ("auto", "autotune", "xla", *PURE_METHODS)

# The method of calls that pass none (``method=None``); part of jax's jit key.
METHOD = Setting("convmm_method", "auto")


def method_name(fn: str, method: Any) -> str:
  """``method`` checked, or the default in force (:func:`default_method`) for None."""
  if method is None:
    return METHOD.get()
  if not isinstance(method, str):
    raise TypeError(f"{fn}: `method` must be a string, one of {METHODS}, or None, got {method!r}")
  if method not in METHODS:
    raise ValueError(f"{fn}: `method` must be one of {METHODS} or None, got {method!r}")
  return method


def set_default_method(method: str) -> str:
  """Sets the method of every convolution that is not given one; returns the previous one.

  Args:
    method: one of ``'auto'`` (the initial default), ``'autotune'``, ``'xla'``,
      ``'convmm'``, ``'im2col'``, ``'shift'``, ``'depthwise'`` (see
      :func:`convmm.conv_general_dilated`).

  Functions, layers and :func:`convmm.replace_convs` given no ``method`` use
  it. Like :func:`convmm.set_memory_budget`, it is part of jax's jit cache key
  on jax 0.10.1 and later; on older jax a function already traced keeps the
  method it was traced with.

  Example:
    >>> import convmm
    >>> old = convmm.set_default_method('convmm')
    >>> convmm.set_default_method(old)
    'convmm'
  """
  if method is None:
    raise ValueError(f"set_default_method: `method` must be one of {METHODS}, got None")
  return METHOD.set(method_name("set_default_method", method))


@contextlib.contextmanager
def default_method(method: str) -> Iterator[None]:
  """Context manager: convolutions given no ``method`` use ``method`` inside the block.

  For this thread only; part of jax's jit cache key on jax 0.10.1 and later
  (a function jitted outside the block and called inside is traced again), as
  ``jax.default_matmul_precision`` is. An explicit ``method=`` takes precedence.

  Example:
    >>> import jax, convmm
    >>> x = jax.ShapeDtypeStruct((8, 28, 28, 128), 'float32')
    >>> w = jax.ShapeDtypeStruct((3, 3, 128, 128), 'float32')
    >>> with convmm.default_method('convmm'):
    ...   convmm.algorithms(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    {'forward': 'im2col', 'input_grad': 'im2col', 'kernel_grad': 'im2col'}
  """
  with METHOD.override(method_name("default_method", method)):
    yield


def problem(spec: ConvSpec, dtype: Any, engine: str, precision: Any, preferred: Any) -> dict:
  """A JSON-able description of ``spec`` for the autotuning store (every parameter)."""
  g = spec.geometry
  return {
    "lhs": [g.batch, *g.in_spatial, g.in_features],
    "rhs": [*g.filter_shape, g.in_features // spec.feature_group_count, spec.out_features],
    "dtype": np.dtype(dtype).name,
    "window_strides": list(g.window_strides),
    "padding": [list(p) for p in g.padding],
    "lhs_dilation": list(g.lhs_dilation),
    "rhs_dilation": list(g.rhs_dilation),
    "feature_group_count": spec.feature_group_count,
    "batch_group_count": spec.batch_group_count,
    "precision": str(precision),
    "preferred_element_type": None if preferred is None else np.dtype(preferred).name,
    "engine": engine,
    "taps": math.prod(g.filter_shape),
  }


def _candidate(direction: int, name: str, x_aval: Any, w_aval: Any, spec: ConvSpec, params):
  """A builder for :func:`convmm._engine.autotune.decide`: ``direction`` computed by ``name``."""
  directions = tuple(name if d == direction else "convmm" for d in range(3))

  def build():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_aval.shape).astype(x_aval.dtype)
    w = jax.random.normal(keys[1], w_aval.shape).astype(w_aval.dtype)
    conv = lambda x, w: autodiff.conv(x, w, spec, directions=directions, **params)
    if direction == 0:
      forward = jax.jit(conv).lower(x, w).compile()
      return lambda: forward(x, w)
    y = jax.eval_shape(conv, x, w)
    ct = jax.random.normal(keys[2], y.shape).astype(y.dtype)
    grad = lambda x, w, ct: jax.vjp(conv, x, w)[1](ct)[direction - 1]
    gradient = jax.jit(grad).lower(x, w, ct).compile()
    return lambda: gradient(x, w, ct)

  return build


def choose(
  method: str,
  spec: ConvSpec,
  x: Any,
  w: Any,
  engine: str,
  precision: Any,
  preferred: Any,
  memory_budget: int | None,
) -> Directions:
  """Who computes each direction of the convolution of ``x (N, *sp, C)`` with ``w (*k, I, O)``.

  ``method`` as given to :func:`convmm.conv_general_dilated`; ``engine`` is
  convmm's engine for it (:func:`convmm._engine.kernels.choose_method`).
  """
  if method == "xla":
    return XLA
  if method in PURE_METHODS:
    return CONVMM
  by_rule = policy.direction_rule(spec, x.dtype, engine, jax.default_backend())
  if method == "auto" or math.prod(x.shape) == 0 or math.prod(w.shape) == 0:
    return by_rule
  params = dict(
    precision=precision,
    preferred_element_type=preferred,
    method=engine,
    memory_budget=memory_budget,
  )
  description = problem(spec, x.dtype, engine, precision, preferred)
  chosen = [
    autotune.decide(
      {**description, "direction": name},
      {c: _candidate(d, c, x, w, spec, params) for c in ("convmm", "xla")},
      default=by_rule[d],
    )
    for d, name in enumerate(DIRECTION_NAMES)
  ]
  return (chosen[0], chosen[1], chosen[2])
