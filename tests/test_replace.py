"""``convmm.replace_convs`` on plain JAX functions: values, gradients both ways, arguments.

The reference is the unreplaced function (lax's convolutions at
``precision=HIGHEST``, and lax's own transpose rules for the gradients);
``count_convs`` checks independently that no XLA convolution is left.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import CASES, HIGHEST, conv_kwargs, make_operands, reduction
from jax import lax
from jax.extend import core as jex_core
from replace_testing import assert_trees_close, convs_in
from tolerances import assert_close

import convmm

NHWC = ("NHWC", "HWIO", "NHWC")
# Geometries whose gradients are the hard convolutions (lhs dilation and
# negative padding in the input gradient, batch groups in the kernel gradient).
GRAD_CASES = [
  "2d_lhs_dilation_stride",
  "2d_depthwise_multiplier_nhwc",
  "2d_batch_groups_odd_layout",
  "3d_pairs_rhs_dilation_groups",
]


@pytest.fixture(autouse=True)
def _no_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def _loss_of(case):
  kw = conv_kwargs(case)

  def loss(lhs, rhs):
    return jnp.sum(jnp.sin(lax.conv_general_dilated(lhs, rhs, precision=HIGHEST, **kw)))

  return loss


@pytest.mark.parametrize("name", GRAD_CASES)
def test_values_and_gradients_both_ways(name):
  case = CASES[name]
  lhs, rhs = make_operands(case)
  loss = _loss_of(case)
  grad = jax.value_and_grad(loss, argnums=(0, 1))
  replaced_grad = convmm.replace_convs(grad)  # lax's backward convolutions replaced
  grad_of_replaced = jax.value_and_grad(convmm.replace_convs(loss), argnums=(0, 1))
  assert convs_in(grad, lhs, rhs) == 3
  assert convs_in(replaced_grad, lhs, rhs) == 0
  assert convs_in(grad_of_replaced, lhs, rhs) == 0
  expected = jax.jit(grad)(lhs, rhs)
  k = reduction(case)
  assert_trees_close(jax.jit(replaced_grad)(lhs, rhs), expected, k, grad=True)
  assert_trees_close(jax.jit(grad_of_replaced)(lhs, rhs), expected, k, grad=True)


def test_transposed_conv_jvp_and_vmap():
  """lax.conv_transpose (a conv with lhs dilation) under jvp and vmap."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 2, 5, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)

  def f(x, w):
    return lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=NHWC, precision=HIGHEST)

  g = convmm.replace_convs(f)
  assert convs_in(g, x[0], w) == 0
  batched = jax.vmap(g, in_axes=(0, None))
  assert convs_in(batched, x, w) == 0
  assert_trees_close(jax.jit(batched)(x, w), jax.vmap(f, in_axes=(0, None))(x, w), 36)
  jvp = jax.jit(lambda x, w: jax.jvp(g, (x, w), (jnp.cos(x), jnp.sin(w))))
  assert_trees_close(
    jvp(x[0], w), jax.jvp(f, (x[0], w), (jnp.cos(x[0]), jnp.sin(w))), 36, grad=True
  )


def test_pytrees_kwargs_static_arguments_and_numpy_inputs():
  w = np.random.default_rng(1).standard_normal((3, 3, 2, 4))
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.arange(4.0)}
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 2))  # float64 NumPy, x64 off

  def f(params, x, *, scale, mode, activation=None):
    y = lax.conv_general_dilated(
      x, params["w"], (1, 1), mode, dimension_numbers=NHWC, precision=HIGHEST
    ) + params["b"].reshape(1, 1, 1, 4)
    y = activation(y) if activation is not None else y
    return {"y": y * scale, "stats": (jnp.mean(y), mode)}

  g = convmm.replace_convs(functools.partial(f, activation=jax.nn.relu))
  out = g(params, x, scale=2.0, mode="SAME")  # eager; strings and Python floats are constants
  expected = f(params, x, scale=2.0, mode="SAME", activation=jax.nn.relu)
  assert out["stats"][1] == "SAME"
  assert_trees_close(out["y"], expected["y"], 18)
  assert_trees_close(out["stats"][0], expected["stats"][0], 18)
  assert out["y"].dtype == jnp.float32
  assert convs_in(lambda p, x: g(p, x, scale=2.0, mode="VALID")["y"], params, x) == 0
  closure = convmm.replace_convs(lambda x: f(params, x, scale=1.0, mode="VALID")["y"])
  assert_trees_close(jax.jit(closure)(x), f(params, x, scale=1.0, mode="VALID")["y"], 18)


def test_where_selects_convolutions():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  w_dense = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
  w_grouped = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)

  def f(x):
    y = lax.conv_general_dilated(
      x, w_dense, (1, 1), "SAME", dimension_numbers=NHWC, precision=HIGHEST
    )
    return lax.conv_general_dilated(
      y,
      w_grouped,
      (2, 2),
      ((1, 0), (0, 1)),
      dimension_numbers=NHWC,
      feature_group_count=2,
      precision=HIGHEST,
    )

  seen = []

  def grouped_only(conv):
    seen.append(conv)
    return conv["feature_group_count"] > 1

  g = convmm.replace_convs(f, where=grouped_only)
  assert convs_in(g, x) == 1
  assert len(seen) == 2  # once per convolution
  dense, grouped = seen
  assert set(grouped) == {
    "window_strides",
    "padding",
    "lhs_dilation",
    "rhs_dilation",
    "dimension_numbers",
    "feature_group_count",
    "batch_group_count",
    "precision",
    "preferred_element_type",
    "lhs_shape",
    "rhs_shape",
    "dtype",
  }
  assert dense["lhs_shape"] == (2, 6, 6, 4) and dense["rhs_shape"] == (3, 3, 4, 4)
  assert grouped["window_strides"] == (2, 2) and grouped["padding"] == ((1, 0), (0, 1))
  assert grouped["dimension_numbers"] == lax.conv_dimension_numbers(
    (2, 6, 6, 4), (3, 3, 2, 4), NHWC
  )
  assert grouped["dtype"] == jnp.float32 and grouped["batch_group_count"] == 1
  assert_trees_close(jax.jit(g)(x), f(x), 36)
  assert convs_in(convmm.replace_convs(f, where=lambda conv: False), x) == 2
  assert convs_in(convmm.replace_convs(f, where=lambda conv: True), x) == 0


@pytest.mark.parametrize(
  "dtype, preferred",
  [(jnp.bfloat16, None), (jnp.float16, jnp.float32)],
  ids=["bf16", "f16_preferred_f32"],
)
def test_low_precision_dtypes(dtype, preferred):
  """Output dtypes are lax's, values close at the dtype's tolerance, gradients too."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), dtype)
  w = jnp.asarray(0.3 * rng.standard_normal((3, 3, 2, 4)), dtype)

  def f(x, w):
    y = lax.conv_general_dilated(
      x,
      w,
      (2, 1),
      "SAME",
      dimension_numbers=NHWC,
      feature_group_count=2,
      preferred_element_type=preferred,
    )
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  grad = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  expected = jax.jit(grad)(x, w)
  assert expected[0][1].dtype == (preferred or dtype)
  for fn in (
    convmm.replace_convs(grad),
    jax.value_and_grad(convmm.replace_convs(f), (0, 1), has_aux=True),
  ):
    (loss, y), grads = jax.jit(fn)(x, w)
    assert y.dtype == expected[0][1].dtype and grads[1].dtype == dtype
    assert_close(y, expected[0][1], dtype=dtype, reduction=18)
    for g, e in zip(grads, expected[1]):
      assert_close(g, e, dtype=dtype, reduction=2 * 6 * 6, grad=True)


@pytest.mark.parametrize("method", ["im2col", "shift"])
def test_method_and_memory_budget_are_passed_on(method, monkeypatch):
  from convmm import _replace  # the module that calls convmm.conv_general_dilated

  calls = []
  original = convmm.conv_general_dilated

  def spy(*args, **kwargs):
    calls.append((kwargs["method"], kwargs["memory_budget"]))
    return original(*args, **kwargs)

  monkeypatch.setattr(_replace, "conv_general_dilated", spy)
  x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3))
  f = lambda x: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  y = convmm.replace_convs(f, method=method, memory_budget=4096)(x)
  assert calls == [(method, 4096)]
  assert_trees_close(y, f(x), 18)


# ------------------------------------------------------------------------ bad input


def test_fn_not_callable():
  with pytest.raises(TypeError, match=r"replace_convs: `fn` must be callable, got int 3"):
    convmm.replace_convs(3)


def test_where_not_callable():
  with pytest.raises(TypeError, match=r"replace_convs: `where` must be None or a callable"):
    convmm.replace_convs(jnp.sin, where="grouped")


def test_unknown_method():
  with pytest.raises(ValueError, match=r"replace_convs: `method` must be one of .* 'gemm'"):
    convmm.replace_convs(jnp.sin, method="gemm")


def test_bad_memory_budget():
  with pytest.raises(ValueError, match=r"replace_convs: `memory_budget` must be a positive"):
    convmm.replace_convs(jnp.sin, memory_budget=-1)


def _one_conv(x):
  return lax.conv_general_dilated(
    x, jnp.ones((2, 2, 1, 1)), (1, 1), "VALID", dimension_numbers=NHWC
  )


def test_where_raises():
  def broken(conv):
    raise KeyError("oops")

  with pytest.raises(
    ValueError,
    match=r"replace_convs: `where` raised KeyError: 'oops' for "
    r"the convolution with lhs_shape=\(1, 3, 3, 1\)",
  ):
    convmm.replace_convs(_one_conv, where=broken)(jnp.ones((1, 3, 3, 1)))


def test_where_returns_non_bool():
  with pytest.raises(TypeError, match=r"replace_convs: `where` must return a bool, got str"):
    convmm.replace_convs(_one_conv, where=lambda conv: "yes")(jnp.ones((1, 3, 3, 1)))


# A primitive of our own that carries a jaxpr, which replace_convs cannot know.
my_call_p = jex_core.Primitive("my_call")
my_call_p.multiple_results = True
my_call_p.def_impl(lambda *args, jaxpr: jex_core.jaxpr_as_fun(jaxpr)(*args))
my_call_p.def_abstract_eval(lambda *avals, jaxpr: jaxpr.out_avals)


def _my_call(fn, *args):
  return my_call_p.bind(*args, jaxpr=jax.make_jaxpr(fn)(*args))


def test_unknown_primitive_with_a_conv_is_an_error():
  x = jnp.ones((1, 3, 3, 1))
  f = lambda x: _my_call(_one_conv, x)[0]
  assert convs_in(f, x) == 1
  with pytest.raises(
    NotImplementedError,
    match=r"replace_convs: primitive `my_call` carries a "
    r"jaxpr containing a convolution",
  ):
    convmm.replace_convs(f)(x)


def test_unknown_primitive_without_conv_is_kept():
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  # jax.nn.relu is a custom_jvp: its rule is opaque, but it is no convolution.
  f = lambda x: _one_conv(_my_call(lambda x: jax.nn.relu(jnp.sin(x)), x)[0])
  g = convmm.replace_convs(f)
  assert "my_call" in str(jax.make_jaxpr(g)(x)) and convs_in(g, x) == 0
  assert_trees_close(g(x), f(x), 4)
