"""Which algorithm computed each direction of a program's convolutions, read from its jaxpr.

A convolution convmm traces is one ``convmm_conv`` primitive whose parameters say who computes
its forward pass, input gradient and kernel gradient (``directions``: 'convmm' or 'xla' each)
and which engine convmm's directions use (``method``: 'im2col' or 'depthwise'); a convolution
of lax is XLA's in all three. :func:`conv_algorithms` traces a function and counts these
primitives wherever they sit (inside jit, checkpoint, scan, cond, custom_jvp/vjp, ...), so it
reports what the program runs, convolutions made indirectly included, rather than what
``convmm.algorithms`` predicts for one call. A conv inside a loop body counts once.

Computed without a convolution primitive, and so not counted: ``method='shift'`` (a sum of
per-tap GEMMs) and convmm's strided input gradient (col2im), which is how ``conv_transpose``
and ``conv_adjoint`` of a strided convolution run when that direction is convmm's. The
benchmarks compare the count with the reference implementation's (``report.algorithms_text``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, jaxprs_in_params

from convmm._engine.autodiff import conv_p
from convmm._engine.channels_first import depthwise_channels_first


def conv_algorithms(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
  """The convolutions ``fn(*args)`` traces to, counted by their algorithms.

  Args:
    fn: a JAX-traceable function.
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    ``{"forward/input_grad/kernel_grad": count}`` in the order the program first uses
    each, e.g. ``{"xla/xla/im2col": 12, "depthwise/depthwise/depthwise": 5}``; each name is
    'xla' (XLA's convolution) or convmm's engine ('im2col', 'depthwise').

  Example:
    >>> import jax, convmm
    >>> x = jax.ShapeDtypeStruct((1, 8, 8, 4), 'float32')
    >>> w = jax.ShapeDtypeStruct((3, 3, 4, 8), 'float32')
    >>> conv = lambda x, w: convmm.conv_general_dilated(
    ...     x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), method='im2col')
    >>> conv_algorithms(conv, x, w)
    {'im2col/im2col/im2col': 1}
  """
  return jaxpr_algorithms(jax.make_jaxpr(fn)(*args))


def jaxpr_algorithms(jaxpr: Jaxpr | ClosedJaxpr) -> dict[str, int]:
  """:func:`conv_algorithms` of an already traced program."""
  counts: dict[str, int] = {}
  for triple in _convolutions(jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr):
    key = "/".join(triple)
    counts[key] = counts.get(key, 0) + 1
  return counts


def _convolutions(jaxpr: Jaxpr) -> Iterator[tuple[str, ...]]:
  for eqn in jaxpr.eqns:
    if eqn.primitive is conv_p:
      method = eqn.params["method"]
      yield tuple(method if who == "convmm" else who for who in eqn.params["directions"])
    elif eqn.primitive is lax.conv_general_dilated_p:
      yield ("xla", "xla", "xla")
    elif eqn.params.get("name") == depthwise_channels_first.__name__:
      yield ("depthwise", "depthwise", "depthwise")  # channels-first, in its own layout
      continue
    for sub in jaxprs_in_params(eqn.params):
      yield from _convolutions(sub)
