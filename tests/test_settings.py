"""Settings read while tracing (convmm/_settings.py): in jax's jit cache key where jax allows.

On a jax that keys them (``jax.make_user_context`` with a settable global: 0.10.1 and later),
one jitted function called inside and outside a ``convmm.memory_budget`` block runs two
programs, one per budget; on older jax (the floor job) it keeps its first trace, as documented.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convmm
from convmm._engine.budget import MEMORY_BUDGET
from convmm._engine.directions import METHOD
from convmm._engine.settings import Setting, unkeyed_values

# A setting of the tests' own, registered at import as settings must be.
FACTOR = Setting("convmm_test_factor", 2)

KEYED = MEMORY_BUDGET.keyed
DN = ("NHWC", "HWIO", "NHWC")
SMALL_BUDGET = 64 * 1024  # tiles the convolution below; the default does not


def _operands():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  return x, w


def _jitted_conv(**kw):
  # convmm's engine, which the budget tiles ('auto' gives this dense float32
  # forward to XLA's convolution, which no budget changes).
  kw = {"method": "convmm", **kw}
  return jax.jit(
    lambda x, w: convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, **kw)
  )


def _temp_bytes(g, *args) -> int:
  """The temporaries of the program ``g`` compiles for ``args`` under the settings in force."""
  return g.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_keyed_from_jax_0_10_1():
  # jax 0.10.1 is the first release whose user contexts have a global value (0.10.0's have none).
  release = tuple(int(part) for part in jax.__version__.split(".")[:3])
  assert KEYED == (release >= (0, 10, 1)) == FACTOR.keyed
  unkeyed = (MEMORY_BUDGET.get(), METHOD.get(), FACTOR.get())
  assert unkeyed_values() == (() if KEYED else unkeyed)


def test_memory_budget_block_retraces_a_jitted_function():
  x, w = _operands()
  g = _jitted_conv()
  outside = _temp_bytes(g, x, w)
  y_outside = g(x, w)
  with convmm.memory_budget(SMALL_BUDGET):
    inside = _temp_bytes(g, x, w)
    y_inside = g(x, w)
  assert _temp_bytes(g, x, w) == outside
  np.testing.assert_allclose(y_inside, y_outside, rtol=1e-5, atol=1e-5)
  if KEYED:
    assert inside < outside  # the block's budget tiled the program
    assert g._cache_size() == 2
    g(x, w)  # after the block: the first program again, no third trace
    assert g._cache_size() == 2
  else:  # older jax: the budget of the first trace stays (documented)
    assert inside == outside
    assert g._cache_size() == 1


def test_budget_of_a_trace_inside_the_block_does_not_leak_out():
  x, w = _operands()
  reference = _temp_bytes(_jitted_conv(), x, w)
  g = _jitted_conv()
  with convmm.memory_budget(SMALL_BUDGET):
    inside = _temp_bytes(g, x, w)
    g(x, w)
  after = _temp_bytes(g, x, w)
  assert inside < reference
  assert after == (reference if KEYED else inside)


def test_set_memory_budget_retraces_a_jitted_function():
  x, w = _operands()
  g = _jitted_conv()
  outside = _temp_bytes(g, x, w)
  g(x, w)
  old = convmm.set_memory_budget(SMALL_BUDGET)
  try:
    small = _temp_bytes(g, x, w)
    g(x, w)
  finally:
    convmm.set_memory_budget(old)
  assert _temp_bytes(g, x, w) == outside
  assert (small < outside) if KEYED else (small == outside)
  assert g._cache_size() == (2 if KEYED else 1)


@convmm.default_method("convmm")  # the engine the budget tiles
def test_layers_follow_the_budget_under_a_users_jit():
  linen = pytest.importorskip("convmm.linen")
  x, _ = _operands()
  layer = linen.Conv(features=16, kernel_size=(3, 3))
  variables = layer.init(jax.random.key(2), x)
  step = jax.jit(lambda v, x: jnp.sum(layer.apply(v, x) ** 2))
  outside = _temp_bytes(step, variables, x)
  step(variables, x)
  with convmm.memory_budget(SMALL_BUDGET):
    inside = _temp_bytes(step, variables, x)
    step(variables, x)
  assert (inside < outside) if KEYED else (inside == outside)
  assert step._cache_size() == (2 if KEYED else 1)


# ------------------------------------------------------------------ the Setting itself


def _scaled(x):
  return x * FACTOR.get()


def test_setting_override_nests_and_restores():
  assert FACTOR.get() == 2
  with FACTOR.override(3):
    assert FACTOR.get() == 3
    with FACTOR.override(5):
      assert FACTOR.get() == 5
    assert FACTOR.get() == 3
  with pytest.raises(ZeroDivisionError), FACTOR.override(7):
    1 / 0  # noqa: B018
  assert FACTOR.get() == 2


def test_setting_set_returns_the_previous_default_and_yields_to_an_override():
  old = FACTOR.set(4)
  try:
    assert old == 2 and FACTOR.get() == 4
    with FACTOR.override(6):
      assert FACTOR.set(8) == 4
      assert FACTOR.get() == 6  # the override wins inside its block
    assert FACTOR.get() == 8
  finally:
    FACTOR.set(old)
  assert FACTOR.get() == 2


def test_setting_override_is_per_thread():
  seen = []
  with FACTOR.override(9):
    thread = threading.Thread(target=lambda: seen.append(FACTOR.get()))
    thread.start()
    thread.join()
  assert seen == [2]


def test_setting_is_part_of_the_jit_key():
  g = jax.jit(_scaled)
  x = jnp.float32(1)
  assert g(x) == 2
  with FACTOR.override(3):
    inside = g(x)
  assert g(x) == 2
  assert inside == (3 if KEYED else 2)
  assert g._cache_size() == (2 if KEYED else 1)


def test_default_method_block_retraces_a_jitted_function():
  x, w = _operands()
  conv = lambda x, w: convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  # The default method in force when traced; 'auto' gives this input gradient to XLA.
  input_grad = lambda x, w: jax.vjp(conv, x, w)[1](jnp.ones((2, 32, 32, 16)))[0]
  g = jax.jit(input_grad)
  has_xla_conv = lambda g: "convolution(" in g.lower(x, w).compile().as_text()
  outside = has_xla_conv(g)
  y_outside = g(x, w)
  with convmm.default_method("convmm"):
    inside = has_xla_conv(g)
    y_inside = g(x, w)
  np.testing.assert_allclose(y_inside, y_outside, rtol=1e-4, atol=1e-4)
  if KEYED:
    assert outside and not inside and g._cache_size() == 2
  else:  # older jax: the method of the first trace stays (documented)
    assert inside == outside and g._cache_size() == 1
  old = convmm.set_default_method("convmm")
  try:
    assert not has_xla_conv(jax.jit(lambda x, w: input_grad(x, w)))  # a new function
  finally:
    assert convmm.set_default_method(old) == "convmm"


def test_default_method_errors():
  with pytest.raises(ValueError, match=r"default_method: `method` must be one of"):
    with convmm.default_method("fft"):
      pass
  with pytest.raises(ValueError, match=r"set_default_method: `method` must be one of"):
    convmm.set_default_method(None)
