"""The layers' ``method``: it reaches the core, beats the default in force, and is checked.

For each layer with a ``method`` (Conv, ConvTranspose, ConvAdjoint, in linen and
NNX): a training step has no XLA convolution with ``'im2col'`` and one per
direction with ``'xla'``, whatever the default method; ``None`` follows
:func:`convmm.default_method`; a bad name raises the core's ValueError naming
the layer. The linen steps are compiled and their values and gradients compared
with Flax's own layer (for ConvAdjoint, the vjp of Flax's Conv) at HIGHEST; NNX
runs the same ops, so its plumbing is read from the lowered program (compiling
costs a fraction of a second per case). ConvLocal has no method: convmm alone
computes it. Tiny shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx
from hlo_testing import compiled, xla_convolutions
from jax import lax
from layer_testing import key_init, normal
from tolerances import assert_close

import convmm
import convmm.nnx as cnnx
from convmm import linen as cnn

X = (1, 5, 4, 3)  # (N, H, W, C); every layer maps 3 features to 2
FIELDS = dict(kernel_size=(2, 3), strides=2, precision=lax.Precision.HIGHEST)
KERNEL = {"Conv": (2, 3, 3, 2), "ConvTranspose": (2, 3, 3, 2), "ConvAdjoint": (2, 3, 2, 3)}
REDUCTION = 18  # 2 * 3 taps of 3 features
CASES = [
  # (method, the default in force, XLA convolutions in the compiled training step)
  ("im2col", "xla", 0),
  ("xla", "im2col", 3),  # the forward, the input gradient and the kernel gradient
]


def _variables(name):
  return {"params": {"kernel": normal(0, KERNEL[name]), "bias": normal(1, (2,))}}


def _apply(framework, name, method):
  """``apply(variables, x)`` of the layer ``name`` with ``method``."""
  if framework == "linen":
    return getattr(cnn, name)(features=2, **FIELDS, method=method).apply
  layer = getattr(cnnx, name)(3, 2, **FIELDS, method=method, kernel_init=key_init, rngs=nnx.Rngs(0))
  graphdef, _, rest = nnx.split(layer, nnx.Param, ...)
  return lambda variables, x: nnx.merge(graphdef, nnx.State(variables["params"]), rest)(x)


def _reference(name):
  """Flax's layer (lax), or for ConvAdjoint the vjp of Flax's Conv plus the bias."""
  if name != "ConvAdjoint":
    return getattr(nn, name)(features=2, **FIELDS).apply
  forward = nn.Conv(features=3, use_bias=False, **FIELDS)

  def apply(variables, y):
    params = variables["params"]
    conv = lambda x: forward.apply({"params": {"kernel": params["kernel"]}}, x)
    _, vjp = jax.vjp(conv, jnp.zeros((1, 10, 8, 2)))
    return vjp(y)[0] + params["bias"]

  return apply


def _step(apply):
  """The output, and the gradients of a fixed nonlinear read-out of it."""

  def loss(variables, x):
    y = apply(variables, x)
    return jnp.sum(jnp.sin(y)), y

  def step(variables, x):
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
    return y, grads

  return step


@functools.cache
def _expected(name):
  return jax.jit(_step(_reference(name)))(_variables(name), normal(2, X))


@pytest.mark.parametrize("method, default, convolutions", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", list(KERNEL))
def test_linen_method_decides_and_keeps_the_values(name, method, default, convolutions):
  variables, x = _variables(name), normal(2, X)
  with convmm.default_method(default):
    program = compiled(_step(_apply("linen", name, method)), variables, x)
  assert xla_convolutions(program) == convolutions
  y, (dv, dx) = program(variables, x)
  y_ref, (dv_ref, dx_ref) = _expected(name)
  assert_close(y, y_ref, reduction=REDUCTION)
  assert_close(dx, dx_ref, reduction=REDUCTION, grad=True)
  for d, d_ref in zip(jax.tree.leaves(dv), jax.tree.leaves(dv_ref)):
    assert_close(d, d_ref, reduction=REDUCTION * y.size // y.shape[-1], grad=True)


def _lowered_step(framework, name, method):
  return jax.jit(_step(_apply(framework, name, method))).lower(_variables(name), normal(2, X))


@pytest.mark.parametrize("method, default, convolutions", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", list(KERNEL))
def test_nnx_method_decides(name, method, default, convolutions):
  # The same ops as linen's (compiled and compared above): only the plumbing is
  # new, and the program jax hands to XLA (not compiled, to keep the suite fast) shows it.
  with convmm.default_method(default):
    assert xla_convolutions(_lowered_step("nnx", name, method)) == convolutions


@pytest.mark.parametrize("name", list(KERNEL))
@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_no_method_follows_the_default(framework, name):
  for default, convolutions in [("xla", 3), ("im2col", 0)]:
    with convmm.default_method(default):
      assert xla_convolutions(_lowered_step(framework, name, None)) == convolutions, default


def test_nnx_method_is_static():
  layer = cnnx.Conv(3, 2, **FIELDS, method="im2col", kernel_init=key_init, rngs=nnx.Rngs(0))
  nnx.update(layer, nnx.State(_variables("Conv")["params"]))
  assert set(nnx.to_pure_dict(nnx.state(layer))) == {"kernel", "bias"}
  forward, x = nnx.jit(lambda module, x: module(x)), normal(2, X)
  assert xla_convolutions(forward.lower(layer, x)) == 0
  assert_close(forward(layer, x), _expected("Conv")[0], reduction=REDUCTION)
  layer.method = "xla"  # another graph: traced again
  assert xla_convolutions(forward.lower(layer, x)) == 1


@pytest.mark.parametrize("name", list(KERNEL))
def test_bad_method_names_the_layer(name):
  match = rf"{name}: `method` must be one of \('auto', .*\) or None, got 'fft'"
  with pytest.raises(ValueError, match=match):
    getattr(cnnx, name)(3, 2, (3, 3), method="fft", rngs=nnx.Rngs(0))
  layer = getattr(cnn, name)(features=2, kernel_size=(3, 3), method="fft", kernel_init=key_init)
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), jnp.ones(X))
  module = getattr(cnnx, name)(3, 2, (3, 3), kernel_init=key_init, rngs=nnx.Rngs(0))
  module.method = "fft"  # set after construction: checked when called
  with pytest.raises(ValueError, match=match):
    module(jnp.ones(X))
