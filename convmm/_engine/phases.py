"""Input dilation without multiplying its holes: a sum of phase convolutions.

With ``lhs_dilation`` ``D``, the input is spread out with ``D - 1`` zeros between
elements. lax never multiplies those holes by the kernel (an Inf or NaN in the
kernel stays out of outputs that only see holes there), and neither should a
patch matrix. Along each spatial dimension the outputs fall into
``P = D / gcd(stride, D)`` phases: the outputs ``o = o0 + m * P`` of one phase
see real input elements only through the kernel taps ``t = t0 + j * Q``
(``Q = D / gcd(rhs_dilation, D)``), and they form an ordinary convolution of
the undilated input with that sub-kernel, stride ``stride / gcd(stride, D)``
and kernel dilation ``rhs_dilation / gcd(rhs_dilation, D)``. The phases'
outputs are interleaved back. Besides the semantics, this skips the
``1 - 1 / D`` of the multiply-adds that would only meet holes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._rules.shapes import ConvSpec


@dataclasses.dataclass(frozen=True)
class _Phase:
  """One output phase along one dimension, as an undilated 1-D convolution."""

  taps: slice  # sub-kernel taps t0::Q (empty if no tap ever meets an input element)
  num_taps: int
  stride: int
  rhs_dilation: int
  padding: tuple[int, int]
  out: int  # outputs in this phase: o0, o0 + P, ...


def _phases(
  size: int, out: int, k: int, stride: int, rhs_dilation: int, lhs_dilation: int, lo: int
) -> list[_Phase]:
  period = lhs_dilation // math.gcd(stride, lhs_dilation)
  tap_period = lhs_dilation // math.gcd(rhs_dilation, lhs_dilation)
  sub_stride = stride // math.gcd(stride, lhs_dilation)
  sub_dilation = rhs_dilation // math.gcd(rhs_dilation, lhs_dilation)
  phases = []
  for o0 in range(period):
    count = -(-(out - o0) // period) if o0 < out else 0
    # Taps t with o0 * stride + t * rhs_dilation - lo divisible by lhs_dilation.
    t0 = next(
      (
        t
        for t in range(min(k, tap_period))
        if (o0 * stride + t * rhs_dilation - lo) % lhs_dilation == 0
      ),
      None,
    )
    if t0 is None or count == 0:
      phases.append(_Phase(slice(0, 0), 0, sub_stride, sub_dilation, (0, 0), count))
      continue
    num_taps = -(-(k - t0) // tap_period)
    base = (o0 * stride + t0 * rhs_dilation - lo) // lhs_dilation  # input index of (o0, t0)
    extent = (count - 1) * sub_stride + (num_taps - 1) * sub_dilation + 1
    phases.append(
      _Phase(
        slice(t0, None, tap_period),
        num_taps,
        sub_stride,
        sub_dilation,
        (-base, base + extent - size),
        count,
      )
    )
  return phases


def phase_conv(
  conv: Callable[[jax.Array, jax.Array, ConvSpec], jax.Array],
  x_cl: jax.Array,
  w_tio: jax.Array,
  spec: ConvSpec,
  out_dtype: Any,
) -> jax.Array:
  """``conv`` of an input-dilated convolution as interleaved undilated phase convolutions."""
  g = spec.geometry
  per_dim = [
    _phases(*args)
    for args in zip(
      g.in_spatial,
      g.out_spatial,
      g.filter_shape,
      g.window_strides,
      g.rhs_dilation,
      g.lhs_dilation,
      (lo for lo, _ in g.padding),
    )
  ]
  periods = [len(p) for p in per_dim]
  blocks = [-(-o // p) for o, p in zip(g.out_spatial, periods)]
  w = w_tio.reshape(*g.filter_shape, *w_tio.shape[1:])
  n_out, o = spec.out_batch, spec.out_features
  ys = []
  for combo in itertools.product(*per_dim):
    outs = tuple(p.out for p in combo)
    if any(p.num_taps == 0 for p in combo) or 0 in outs:
      y = jnp.zeros((n_out, *outs, o), out_dtype)
    else:
      sub = dataclasses.replace(
        g,
        filter_shape=tuple(p.num_taps for p in combo),
        window_strides=tuple(p.stride for p in combo),
        rhs_dilation=tuple(p.rhs_dilation for p in combo),
        padding=tuple(p.padding for p in combo),
        lhs_dilation=(1,) * len(combo),
        out_spatial=outs,
      )
      w_sub = w[tuple(p.taps for p in combo)]
      w_sub = w_sub.reshape(math.prod(sub.filter_shape), *w_tio.shape[1:])
      y = conv(x_cl, w_sub, dataclasses.replace(spec, geometry=sub)).astype(out_dtype)
    # Pad every phase to the same number of blocks so that they interleave.
    y = lax.pad(
      y,
      jnp.zeros((), y.dtype),
      [(0, 0, 0), *((0, b - s, 0) for b, s in zip(blocks, outs)), (0, 0, 0)],
    )
    ys.append(y)
  nsp = g.num_spatial
  y = jnp.stack(ys).reshape(*periods, n_out, *blocks, o)
  perm = [nsp, *(a for d in range(nsp) for a in (nsp + 1 + d, d)), 2 * nsp + 1]
  y = jnp.transpose(y, perm).reshape(n_out, *(b * p for b, p in zip(blocks, periods)), o)
  return lax.slice(y, (0,) * y.ndim, (n_out, *g.out_spatial, o))
