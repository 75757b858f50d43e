"""Channels-first convolutions computed in their own layout (no transposes around them).

A depthwise convolution on ``(N, C, *spatial)`` operands runs convmm's
multiply-accumulate as laid out, and a convolution whose every direction is
XLA's is lax's call on the caller's layouts. Both against lax at HIGHEST in
every direction, under ``vmap`` and in a stack (the fusion guard).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import convmm
from benchmarks.chosen import conv_algorithms
from tests.tolerances import assert_close

HIGHEST = lax.Precision.HIGHEST

CASES = {
  # name: lhs (N, C, *sp), channel multiplier, kwargs
  "1d-same": ((2, 6, 17), 1, dict(window_strides=(1,), padding="SAME")),
  "1d-strided-dilated-cropped": (
    (2, 4, 19),
    2,
    dict(window_strides=(2,), padding=[(-1, 3)], rhs_dilation=(2,)),
  ),
  "2d-mult2": ((1, 3, 7, 6), 2, dict(window_strides=(2, 1), padding=[(1, 2), (0, 1)])),
  "3d-valid": ((1, 2, 4, 5, 3), 1, dict(window_strides=(1, 1, 1), padding="VALID")),
}


def _operands(name, dtype=jnp.float32):
  lhs_shape, mult, kw = CASES[name]
  n, c, *sp = lhs_shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=lhs_shape), dtype)
  w = jnp.asarray(rng.normal(size=(c * mult, 1, *(3,) * len(sp))), dtype)
  return x, w, dict(kw, feature_group_count=c)


def _pair(kw, **extra):
  ours = lambda x, w: convmm.conv_general_dilated(x, w, **kw, **extra)
  ref = lambda x, w: lax.conv_general_dilated(x, w, **kw, precision=HIGHEST)
  return ours, ref


def _no_input_transpose(fn, x, w):
  """No transpose in the program has the input's or the output's shape."""
  y_shape = jax.eval_shape(fn, x, w).shape
  jaxpr = jax.make_jaxpr(fn)(x, w)

  def eqns(j):
    for eqn in j.eqns:
      yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from eqns(sub)

  for eqn in eqns(jaxpr.jaxpr):
    if eqn.primitive.name == "transpose":
      assert eqn.outvars[0].aval.shape not in (x.shape, y_shape), eqn


@pytest.mark.parametrize("name", list(CASES))
def test_depthwise_in_layout_matches_lax_in_every_direction(name):
  x, w, kw = _operands(name)
  ours, ref = _pair(kw)
  assert conv_algorithms(ours, x, w) == {"depthwise/depthwise/depthwise": 1}
  _no_input_transpose(ours, x, w)
  y, vjp = jax.vjp(ours, x, w)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  assert_close(y, y_ref)
  ct = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), y.dtype)
  for a, b in zip(vjp(ct), vjp_ref(ct)):
    assert_close(a, b)
  tangents = (jnp.ones_like(x), jnp.full_like(w, 0.5))
  assert_close(jax.jvp(ours, (x, w), tangents)[1], jax.jvp(ref, (x, w), tangents)[1])
  in_x = lambda conv: lambda x: conv(x, w)
  in_w = lambda conv: lambda w: conv(x, w)
  for operand, linear in ((x, in_x), (w, in_w)):
    (a,) = jax.linear_transpose(linear(ours), operand)(ct)
    (b,) = jax.linear_transpose(linear(ref), operand)(ct)
    assert_close(a, b)


def test_depthwise_in_layout_16_bit_and_preferred_type():
  x, w, kw = _operands("1d-strided-dilated-cropped", jnp.bfloat16)
  ours, ref = _pair(kw, preferred_element_type=jnp.float32)
  ref32 = lambda x, w: ref(x.astype(jnp.float32), w.astype(jnp.float32))
  assert ours(x, w).dtype == jnp.float32
  assert_close(ours(x, w), ref32(x, w))
  ours16, _ = _pair(kw)
  assert ours16(x, w).dtype == jnp.bfloat16
  assert_close(ours16(x, w), ref32(x, w).astype(jnp.bfloat16), dtype=jnp.bfloat16)


def test_depthwise_in_layout_under_vmap_and_in_a_stack():
  x, w, kw = _operands("1d-same")
  ours, ref = _pair(kw)
  xs, ws = jnp.stack([x, -x]), jnp.stack([w, 2 * w])
  assert_close(jax.vmap(ours, (0, None))(xs, w), jax.vmap(ref, (0, None))(xs, w))
  assert_close(jax.vmap(ours)(xs, ws), jax.vmap(ref)(xs, ws))  # a batched predicate

  def stack(conv):
    def f(x, w):
      for scale in (1.0, -0.5, 2.0):
        x = jax.nn.relu(conv(x, scale * w))
      return jnp.sum(x**2)

    return f

  assert_close(stack(ours)(x, w), stack(ref)(x, w))
  for a, b in zip(jax.jit(jax.grad(stack(ours), (0, 1)))(x, w), jax.grad(stack(ref), (0, 1))(x, w)):
    assert_close(a, b)
  small = x[:1, :2, :5], w[:2]
  kw_small = dict(kw, feature_group_count=2)
  ours_s, ref_s = _pair(kw_small)
  hess = lambda conv: jax.hessian(lambda x, w: jnp.sum(jnp.sin(conv(x, w))))(*small)
  assert_close(hess(ours_s), hess(ref_s))


def test_all_xla_directions_keep_the_callers_layout():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 9, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 3, 3, 3)), jnp.float32)
  kw = dict(window_strides=(2, 1), padding=[(1, -1), (2, 0)])  # negative: cropped by lax.pad
  ours, ref = _pair(kw, method="xla")
  assert conv_algorithms(ours, x, w) == {"xla/xla/xla": 1}
  _no_input_transpose(ours, x, w)
  y, vjp = jax.vjp(ours, x, w)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  assert_close(y, y_ref)
  for a, b in zip(vjp(y), vjp_ref(y)):
    assert_close(a, b)
