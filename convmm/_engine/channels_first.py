"""Depthwise convolutions of channels-first operands, computed as they lie.

The engine works channels-last, ``(N, *spatial, C)``. A depthwise convolution's
products are elementwise, so on ``(N, C, *spatial)`` operands (NCW, NCHW: PyTorch's
layout and ``dimension_numbers=None``) the multiply-accumulate runs as laid out, with
no transpose to and from channels-last around it (they had cost several times the
convolution; ``python -m benchmarks.layouts``).

Derivatives: the tangent in the input is the same multiply-accumulate, whose
transpose (the input gradient) pads and sums the cotangent's products. The
tangent in the kernel goes through the channels-last primitive of
:mod:`convmm._engine.autodiff` on a transposed copy of the input, so that the
kernel gradient is its loop over the taps (channels minor, vectorised):
computed as laid out, XLA's CPU reductions over batch and length of a (4, 512,
1024) input's five taps took 20-27 ms, against 4 ms for the loop.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from convmm._engine import autodiff
from convmm._engine.im2col import from_channels_last, to_channels_last
from convmm._engine.kernels import depthwise_multiply_accumulate, kernel_taps_last, unfused
from convmm._engine.policy import CONVMM
from convmm._rules.shapes import ConvSpec


def depthwise_in_layout(
  lhs: jax.Array, rhs: jax.Array, spec: ConvSpec, preferred_element_type: Any, memory_budget: Any
) -> jax.Array | None:
  """The depthwise convolution of ``(N, C, *spatial)`` operands as laid out; None for others."""
  g = spec.geometry
  lhs_spec, _, out_spec = g.dimension_numbers
  first = tuple(range(g.num_spatial + 2))
  if tuple(lhs_spec) != first or tuple(out_spec) != first or g.num_spatial == 0:
    return None
  if any(d > 1 for d in g.lhs_dilation) or spec.batch_group_count != 1:
    return None
  return depthwise_channels_first(lhs, rhs, spec, preferred_element_type, memory_budget)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def depthwise_channels_first(lhs, rhs, spec, preferred_element_type, memory_budget):
  """:func:`depthwise_in_layout`'s computation, one named call (``benchmarks.chosen``)."""
  w_tio = kernel_taps_last(rhs, spec)
  return _conv(lhs, w_tio, spec, preferred_element_type, memory_budget)


def _mac(x, w_tio, spec, preferred_element_type):
  return unfused(
    lambda x, w: depthwise_multiply_accumulate(x, w, spec, preferred_element_type, True), x, w_tio
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x, w_tio, spec, preferred_element_type, memory_budget):
  del memory_budget  # the multiply-accumulate builds no patches
  return _mac(x, w_tio, spec, preferred_element_type)


@functools.partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(spec, preferred_element_type, memory_budget, primals, tangents):
  x, w_tio = primals
  x_dot, w_dot = tangents
  y = _conv(x, w_tio, spec, preferred_element_type, memory_budget)
  y_dot = jnp.zeros(y.shape, y.dtype)
  if not isinstance(x_dot, SymbolicZero):
    y_dot = y_dot + _mac(x_dot, w_tio, spec, preferred_element_type)
  if not isinstance(w_dot, SymbolicZero):
    y_dot = y_dot + _kernel_tangent(x, w_dot, spec, preferred_element_type, memory_budget)
  return y, y_dot.astype(y.dtype)


def _kernel_tangent(x, w_dot, spec, preferred_element_type, memory_budget):
  """``x (*)`` ``w_dot``: the primitive on a channels-last copy of ``x``, the result back."""
  g = spec.geometry
  lhs_spec, _, out_spec = g.dimension_numbers
  x_cl = unfused(lambda x: to_channels_last(x, lhs_spec), x)  # one copy, not one per tap
  y_cl = autodiff.conv(
    x_cl,
    w_dot.reshape(*g.filter_shape, 1, spec.out_features),
    spec,
    precision=None,
    preferred_element_type=preferred_element_type,
    method="depthwise",
    memory_budget=memory_budget,
    directions=CONVMM,
  )
  return unfused(lambda y: from_channels_last(y, out_spec), y_cl)
