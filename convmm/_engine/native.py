"""XLA's own convolution for one direction of a convolution on canonical operands.

The candidate that :mod:`convmm._engine.directions` may pick for the forward pass, the
input gradient or the kernel gradient: ``lax.conv_general_dilated`` (its
function from its own module, so that code which replaces ``jax.lax``'s
attributes by convmm's cannot send it back here) and lax's own transposes of it.

Negative padding is applied by ``lax.pad`` before the convolution, never by
XLA's convolution: XLA's CPU convolution returns values nobody computed for
some strided convolutions with negative low padding (a length-13 input, k=3,
stride 3, padding (-2, 3): outputs up to 1e28, found by the tiling fuzz of
``tests/test_tiling_fuzz.py``; jaxlib 0.10.2).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.lax import convolution as _lax_convolution

from convmm._rules.dimension_numbers import channels_last_dimension_numbers
from convmm._rules.shapes import ConvSpec

_lax_conv = _lax_convolution.conv_general_dilated  # not lax's attribute, which may be patched


def forward(
  x: jax.Array,
  w: jax.Array,
  spec: ConvSpec,
  precision: Any,
  preferred: Any,
  dimension_numbers: lax.ConvDimensionNumbers | None = None,
) -> jax.Array:
  """``x (N, *spatial, C)`` convolved with ``w (*window, I, O)`` by XLA, channels-last out.

  With ``dimension_numbers``, the operands and the result are in those layouts
  instead (the caller's own: no transposes).
  """
  g = spec.geometry
  nsp = g.num_spatial
  dn = dimension_numbers or channels_last_dimension_numbers(nsp)
  padding, lhs_dilation = g.padding, g.lhs_dilation
  if any(p < 0 for pair in padding for p in pair):
    # Crop (and dilate) with lax.pad; XLA's convolution then pads only.
    config = [(0, 0, 0)] * x.ndim
    for d, ((lo, hi), r) in enumerate(zip(padding, lhs_dilation)):
      config[dn.lhs_spec[d + 2]] = (min(lo, 0), min(hi, 0), r - 1)
    x = lax.pad(x, jnp.zeros((), x.dtype), config)
    padding = tuple((max(lo, 0), max(hi, 0)) for lo, hi in padding)
    lhs_dilation = (1,) * nsp
  return _lax_conv(
    x,
    w,
    tuple(g.window_strides),
    tuple(padding),
    lhs_dilation=tuple(lhs_dilation),
    rhs_dilation=tuple(g.rhs_dilation),
    dimension_numbers=dn,
    feature_group_count=spec.feature_group_count,
    batch_group_count=spec.batch_group_count,
    precision=precision,
    preferred_element_type=preferred,
  )


def _aval(a: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))


def input_grad(ct: jax.Array, x_aval: Any, w: jax.Array, spec, precision, preferred) -> jax.Array:
  """lax's input gradient: the transpose of :func:`forward` in ``x``."""
  (dx,) = jax.linear_transpose(lambda x: forward(x, w, spec, precision, preferred), _aval(x_aval))(
    ct
  )
  return dx


def kernel_grad(ct: jax.Array, x: jax.Array, w_aval: Any, spec, precision, preferred) -> jax.Array:
  """lax's kernel gradient: the transpose of :func:`forward` in ``w``."""
  (dw,) = jax.linear_transpose(lambda w: forward(x, w, spec, precision, preferred), _aval(w_aval))(
    ct
  )
  return dw
