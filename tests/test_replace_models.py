"""``convmm.replace_convs`` on a small CNN from each library, unchanged.

Each CNN has a strided conv, a grouped conv and a transposed conv, written with
the library's own layers (Flax linen and nnx, Equinox, Haiku) or with ``lax``.
The replaced model must have no XLA convolution at any depth, and its output
and parameter/input gradients (through convmm, and lax's backward convolutions
replaced) must equal the unreplaced model's.
"""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from replace_testing import assert_trees_close, convs_in

import convmm

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
REDUCTION = 2 * 8 * 8  # the longest sum: a kernel gradient over batch and positions


def drawn(abstract):
  """The library's own parameter tree (from its init under eval_shape), with values
  drawn by NumPy: no random-number program to compile for each model."""
  rng = np.random.default_rng(1)
  return jax.tree.map(
    lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
    abstract,
    is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
  )


@pytest.fixture(autouse=True)
def _no_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2)(x))
    return nn.ConvTranspose(3, (3, 3), strides=(2, 2))(x)


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.down = nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs)
    self.grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
    self.up = nnx.ConvTranspose(4, 3, (3, 3), strides=(2, 2), rngs=rngs)

  def __call__(self, x):
    return self.up(nnx.relu(self.grouped(nnx.relu(self.down(x)))))


class EqxCNN(eqx.Module):
  layers: tuple

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.layers = (
      eqx.nn.Conv2d(3, 4, 3, stride=2, padding=1, key=k1),
      eqx.nn.Conv2d(4, 4, 3, padding=1, groups=2, key=k2),
      eqx.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, key=k3),
    )

  def __call__(self, x):  # NHWC batch -> NHWC batch; Equinox layers are unbatched CHW
    def one(x):
      down, grouped, up = self.layers
      return up(jax.nn.relu(grouped(jax.nn.relu(down(x)))))

    return jnp.moveaxis(jax.vmap(one)(jnp.moveaxis(x, -1, 1)), 1, -1)


def _haiku_cnn(x):
  x = jax.nn.relu(hk.Conv2D(4, 3, stride=2)(x))
  x = jax.nn.relu(hk.Conv2D(4, 3, feature_group_count=2)(x))
  return hk.Conv2DTranspose(3, 3, stride=2)(x)


def _lax_cnn(params, x):
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.nn.relu(lax.conv_general_dilated(x, params["down"], (2, 2), "SAME", dimension_numbers=dn))
  x = jax.nn.relu(
    lax.conv_general_dilated(
      x, params["grouped"], (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2
    )
  )
  return lax.conv_transpose(x, params["up"], (2, 2), "SAME", dimension_numbers=dn)


def linen_model():
  model = LinenCNN()
  return model.apply, drawn(jax.eval_shape(model.init, jax.random.key(0), X))


def nnx_modules():
  graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxCNN(nnx.Rngs(0))))
  return graphdef, drawn(state)


def nnx_model():
  graphdef, state = nnx_modules()
  return (lambda state, x: nnx.merge(graphdef, state)(x)), state


def nnx_jit_model():
  graphdef, state = nnx_modules()

  @nnx.jit
  def forward(model, x):
    return model(x)

  return (lambda state, x: forward(nnx.merge(graphdef, state), x)), state


def eqx_modules():
  return drawn(eqx.filter_eval_shape(EqxCNN, jax.random.key(0)))


def eqx_model():
  params, static = eqx.partition(eqx_modules(), eqx.is_array)
  return (lambda params, x: eqx.combine(params, static)(x)), params


def haiku_model():
  model = hk.without_apply_rng(hk.transform(_haiku_cnn))
  return model.apply, drawn(jax.eval_shape(model.init, jax.random.key(0), X))


def lax_model():
  shapes = {"down": (3, 3, 3, 4), "grouped": (3, 3, 2, 4), "up": (3, 3, 4, 3)}
  return _lax_cnn, drawn({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})


MODELS = {
  "linen": linen_model,
  "nnx": nnx_model,
  "equinox": eqx_model,
  "haiku": haiku_model,
  "lax": lax_model,
}


@pytest.mark.parametrize("name", MODELS)
def test_model(name):
  apply, params = MODELS[name]()

  def loss(params, x):
    y = apply(params, x)
    return jnp.sum(jnp.sin(y)), y

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  grad_of_replaced = jax.value_and_grad(convmm.replace_convs(loss), argnums=(0, 1), has_aux=True)
  replaced_grad = convmm.replace_convs(grad)
  assert convs_in(apply, params, X) == 3
  assert convs_in(convmm.replace_convs(apply), params, X) == 0
  assert convs_in(grad_of_replaced, params, X) == 0
  assert convs_in(replaced_grad, params, X) == 0
  expected = jax.jit(grad)(params, X)
  assert expected[0][1].shape == (2, 8, 8, 3)
  assert_trees_close(jax.jit(grad_of_replaced)(params, X), expected, REDUCTION, grad=True)
  assert_trees_close(jax.jit(replaced_grad)(params, X), expected, REDUCTION, grad=True)


def test_nnx_jit_inside():
  """An nnx.jit function called inside: its jit is rewritten, the model's output is unchanged."""
  apply, state = nnx_jit_model()
  replaced = convmm.replace_convs(apply)
  assert convs_in(apply, state, X) == 3 and convs_in(replaced, state, X) == 0
  assert "jit" in str(jax.make_jaxpr(replaced)(state, X))
  assert_trees_close(jax.jit(replaced)(state, X), apply(state, X), 36)


def test_modules_as_arguments():
  """Equinox and nnx modules passed whole: their non-array leaves are constants."""
  eqx_cnn, nnx_cnn = eqx_modules(), nnx.merge(*nnx_modules())
  for module in (eqx_cnn, nnx_cnn):
    call = lambda m, x: m(x)
    replaced = convmm.replace_convs(call)
    assert convs_in(replaced, module, X) == 0
    assert_trees_close(jax.jit(replaced)(module, X), module(X), 36)


def test_readme_where_example():
  """The README's predicate keeps XLA for the dense strided conv, replaces the others."""
  apply, params = linen_model()
  seen = []

  def grouped_or_transposed(c):
    seen.append(c)
    return c["feature_group_count"] > 1 or any(d > 1 for d in c["lhs_dilation"])

  fast = convmm.replace_convs(apply, where=grouped_or_transposed)
  assert convs_in(fast, params, X) == 1 and len(seen) == 3
  assert [c["window_strides"] for c in seen] == [(2, 2), (1, 1), (1, 1)]
  assert_trees_close(jax.jit(fast)(params, X), apply(params, X), 36)
