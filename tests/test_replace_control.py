"""``convmm.replace_convs`` inside primitives that carry jaxprs.

Every call asks for convmm's engine in every direction (``method="convmm"``), so that
no XLA convolution may remain at any depth.

Each function hides its convolutions in a different construct (jit, scan,
while_loop, cond, checkpoint, custom_jvp, custom_vjp, shard_map); the replaced
function must have no XLA convolution at any depth, keep the construct, and
agree with the unreplaced function in value and gradient (both ways).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from replace_testing import assert_trees_close, convs_in

import convmm

NHWC = ("NHWC", "HWIO", "NHWC")
HIGHEST = lax.Precision.HIGHEST
K = 3 * 3 * 4  # reduction length of each conv below
_RNG = np.random.default_rng(0)
X = jnp.asarray(_RNG.standard_normal((2, 5, 5, 4)), jnp.float32)
W = jnp.asarray(0.3 * _RNG.standard_normal((3, 3, 4, 4)), jnp.float32)


@pytest.fixture(autouse=True)
def _no_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, precision=HIGHEST)


def in_jit(x, w):
  return jax.jit(lambda x: jnp.tanh(conv(x, w)))(x)


def in_scan(x, w):  # fori_loop with a static trip count
  return lax.fori_loop(0, 2, lambda i, c: jnp.tanh(conv(c, w)), x)


def in_cond_of_checkpoint(x, w):
  remat = jax.checkpoint(lambda x: jnp.sin(conv(x, w)))
  return lax.cond(jnp.sum(x) > 0, remat, lambda x: conv(-x, 2 * w), x)


@jax.custom_jvp
def custom_jvp_conv(x, w):
  return conv(x, w)


@custom_jvp_conv.defjvp
def _custom_jvp_conv_rule(primals, tangents):
  # Twice the true tangent: shows that the custom rule, not autodiff, is used.
  (x, w), (dx, dw) = primals, tangents
  return conv(x, w), 2 * (conv(dx, w) + conv(x, dw))


@jax.custom_vjp
def custom_vjp_conv(x, w):
  return conv(x, w)


def _custom_vjp_fwd(x, w):
  return conv(x, w), (x, w)


def _custom_vjp_bwd(res, g):  # three times the true cotangents
  _, vjp = jax.vjp(conv, *res)
  return tuple(3 * c for c in vjp(g))


custom_vjp_conv.defvjp(_custom_vjp_fwd, _custom_vjp_bwd)


def in_custom_jvp(x, w):
  return jnp.tanh(custom_jvp_conv(x, w))


def in_custom_vjp(x, w):
  return jnp.tanh(custom_vjp_conv(x, w))


def in_linear_solve(x, w):  # conjugate gradients: a custom_linear_solve around a while loop
  return jax.scipy.sparse.linalg.cg(lambda v: v + 0.05 * conv(v, w), x, maxiter=3)[0]


def in_shard_map(x, w):
  mesh = jax.make_mesh((1,), ("d",), axis_types=(AxisType.Auto,))
  body = jax.shard_map(conv, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
  return jax.jit(body)(x, w)


CASES = {
  "jit": (in_jit, "jit"),
  "scan": (in_scan, "scan"),
  "cond_of_checkpoint": (in_cond_of_checkpoint, "remat2"),
  "custom_jvp": (in_custom_jvp, "custom_jvp_call"),
  "custom_vjp": (in_custom_vjp, "custom_vjp_call"),
  "shard_map": (in_shard_map, "shard_map"),
  "linear_solve": (in_linear_solve, "custom_linear_solve"),
}


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_both_ways(name):
  fn, primitive = CASES[name]
  loss = lambda x, w: jnp.sum(fn(x, w) ** 2)
  grad = jax.value_and_grad(loss, argnums=(0, 1))
  replaced = convmm.replace_convs(fn, method="convmm")
  assert convs_in(fn, X, W) > 0 and convs_in(replaced, X, W) == 0
  assert primitive in str(jax.make_jaxpr(replaced)(X, W))  # the construct is kept
  grad_of_replaced = jax.value_and_grad(lambda x, w: jnp.sum(replaced(x, w) ** 2), argnums=(0, 1))
  replaced_grad = convmm.replace_convs(grad, method="convmm")
  assert convs_in(grad_of_replaced, X, W) == 0
  assert convs_in(replaced_grad, X, W) == 0
  # For custom_jvp/vjp, rules off by 2x and 3x make dropping them visible.
  expected = jax.jit(grad)(X, W)
  assert_trees_close(jax.jit(grad_of_replaced)(X, W), expected, 2 * K, grad=True)
  assert_trees_close(jax.jit(replaced_grad)(X, W), expected, 2 * K, grad=True)


def test_while_loop_forward_and_jvp():
  def fn(x, w):  # a trip count that depends on the data: a while loop
    cond = lambda s: (s[0] < 3) & (jnp.max(jnp.abs(s[1])) < 1e3)
    return lax.while_loop(cond, lambda s: (s[0] + 1, conv(s[1], w)), (0, x))[1]

  replaced = convmm.replace_convs(fn, method="convmm")
  assert convs_in(replaced, X, W) == 0 and "while" in str(jax.make_jaxpr(replaced)(X, W))
  jvp = jax.jit(lambda f: jax.jvp(f, (X, W), (X, W)), static_argnums=0)
  assert_trees_close(jvp(replaced), jvp(fn), 3 * K, grad=True)


def test_nested_jit_and_closed_over_tracers():
  """Weights closed over from an outer grad reach the replaced convs as tracers."""

  def loss(w):
    inner = convmm.replace_convs(
      lambda x: jax.jit(jax.checkpoint(lambda x: conv(x, w)))(x), method="convmm"
    )
    return jnp.sum(jnp.sin(inner(X)))

  expected = jax.grad(lambda w: jnp.sum(jnp.sin(conv(X, w))))(W)
  assert convs_in(jax.grad(loss), W) == 0
  assert_trees_close(jax.jit(jax.grad(loss))(W), expected, K, grad=True)


@jax.custom_batching.custom_vmap
def custom_vmap_conv(x, w):
  return conv(x, w)


@custom_vmap_conv.def_vmap
def _custom_vmap_rule(axis_size, in_batched, x, w):
  # Batched x only: the vmapped batch folded into N; twice the true value, to show
  # that the rule, not vmap of the primal, computes the batched call.
  assert in_batched == [True, False]
  y = conv(x.reshape(-1, *x.shape[2:]), w)
  return 2 * y.reshape(x.shape[:2] + y.shape[1:]), True


def test_custom_vmap():
  xs = jnp.stack([X, -X])
  batched = jax.vmap(custom_vmap_conv, in_axes=(0, None))
  replaced = convmm.replace_convs(custom_vmap_conv, method="convmm")
  assert convs_in(replaced, X, W) == 0 and "custom_vmap_call" in str(jax.make_jaxpr(replaced)(X, W))
  assert_trees_close(jax.jit(replaced)(X, W), conv(X, W), K)
  for fn in (jax.vmap(replaced, in_axes=(0, None)), convmm.replace_convs(batched, method="convmm")):
    assert convs_in(fn, xs, W) == 0
    assert_trees_close(jax.jit(fn)(xs, W), batched(xs, W), K)
  assert_trees_close(batched(xs, W)[0], 2 * conv(X, W), K)


def test_composite():  # lax.composite has no JVP rule: forward only
  fn = lax.composite(lambda x, w: jnp.tanh(conv(x, w)), name="test.conv_tanh")
  replaced = convmm.replace_convs(fn, method="convmm")
  assert convs_in(fn, X, W) == 1 and convs_in(replaced, X, W) == 0
  assert "composite" in str(jax.make_jaxpr(replaced)(X, W))
  assert_trees_close(jax.jit(replaced)(X, W), fn(X, W), K)
