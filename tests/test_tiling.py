"""Tiling: bounded tracing, the memory budget, and how it is set (issue 13)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tolerances import assert_close

import convmm
import convmm._engine.autodiff
import convmm._engine.plans
import convmm._engine.tiling
from convmm._engine.blocks import spatial_blocks
from convmm._engine.budget import current_memory_budget
from convmm._engine.plans import tile_cost, tile_plan
from convmm._rules.shapes import conv_spec

HIGHEST = lax.Precision.HIGHEST
DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def _convmm_engine():
  # Tiling is convmm's engine's: 'auto' would give dense float32 convolutions to XLA.
  with convmm.default_method("convmm"):
    yield


def _eqn_count(f, *shapes):
  jaxpr = jax.make_jaxpr(f)(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))

  def count(jaxpr):
    return sum(
      1
      + sum(
        count(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params)
      )
      for eqn in jaxpr.eqns
    )

  return count(jaxpr.jaxpr)


def test_tracing_does_not_grow_with_the_number_of_tiles():
  # 10^4 and 10^5 samples under a 4 KiB budget: ~100 and ~1000 tiles, one map body.
  conv = lambda x, w: convmm.conv_general_dilated(x, w, (1,), "SAME", memory_budget=4096)  # noqa: E731
  small, large = (
    _eqn_count(conv, (1, 1, 10**4), (1, 1, 9)),
    _eqn_count(conv, (1, 1, 10**5), (1, 1, 9)),
  )
  assert small == large < 200, (small, large)


def test_long_signal_matches_lax():
  # 10^7 samples, k=9: dozens of tiles at the default budget, padded remainder.
  n = 10**7
  x = jax.random.normal(jax.random.key(0), (1, 1, n))
  w = jax.random.normal(jax.random.key(1), (1, 1, 9))
  spec = conv_spec("t", x.shape, w.shape, (1,), "SAME", None, None, None, 1, 1)
  plan = tile_plan(spec, 4, current_memory_budget())
  assert plan.num_tiles > 1 and n % plan.tile_out[0], plan  # tiled, last tile partial
  f = jax.jit(lambda x, w: convmm.conv_general_dilated(x, w, (1,), "SAME", precision=HIGHEST))
  ref = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1,), "SAME", precision=HIGHEST))
  y, y_ref = f(x, w), ref(x, w)
  t = plan.tile_out[0]
  for start in [0, t - 5, 2 * t - 5, n - 1000]:  # the ends and two tile boundaries
    assert_close(y[..., start : start + 1000], y_ref[..., start : start + 1000], reduction=9)
  assert_close(jnp.sum(y, dtype=jnp.float32), jnp.sum(y_ref, dtype=jnp.float32), reduction=9 * n)


@pytest.mark.parametrize("rows", [1021, 2039], ids=["1021", "2039"])
def test_prime_output_rows_get_big_tiles(rows):
  x = jax.random.normal(jax.random.key(2), (1, rows, 5, 2))
  w = jax.random.normal(jax.random.key(3), (3, 3, 2, 3))
  budget = 64 * 1024
  spec = conv_spec("t", x.shape, w.shape, (1, 1), "SAME", None, None, DN, 1, 1)
  plan = tile_plan(spec, 4, budget)
  assert plan.num_tiles > 1 and plan.tile_out[0] >= 32, plan  # big tiles, not one-row tiles
  assert tile_cost(spec, 4, plan.batch, plan.tile_out, 3, 4) <= budget
  kw = dict(dimension_numbers=DN, precision=HIGHEST)
  y = jax.jit(
    lambda x, w: convmm.conv_general_dilated(x, w, (1, 1), "SAME", memory_budget=budget, **kw)
  )(x, w)
  assert_close(y, lax.conv_general_dilated(x, w, (1, 1), "SAME", **kw), reduction=18)


def test_tile_plan_fits_the_budget_and_covers_the_output():
  spec = conv_spec("t", (6, 10, 7, 4), (3, 3, 4, 5), (1, 1), "SAME", None, None, DN, 1, 1)
  whole = tile_cost(spec, 4, 6, (10, 7), 3, 4)
  assert tile_plan(spec, 4, whole).num_tiles == 1  # fits whole
  for budget in [whole - 1, whole // 3, whole // 20, 4096, 2000]:
    plan = tile_plan(spec, 4, budget)
    assert tile_cost(spec, 4, plan.batch, plan.tile_out, 3, 4) <= budget, (budget, plan)
    assert all(c * t >= o for c, t, o in zip(plan.counts, plan.tile_out, (10, 7)))
    assert 6 % plan.batch == 0
  assert tile_plan(spec, 4, whole - 1).batch == 6  # rows split before the batch
  assert tile_plan(spec, 4, 1).tile_out == (1, 1)  # nothing fits: the finest tiles


@pytest.mark.parametrize(
  "x_shape, w_shape",
  [((1, 512, 512, 8), (31, 31, 8, 8)), ((1, 2048, 2048, 16), (3, 3, 16, 16))],
  ids=["512x512-k31", "2048x2048-k3"],
)
def test_compiled_temporaries_within_budget_plus_input_and_output(x_shape, w_shape):
  # Issue 13: these compiled to 525 and 641 MiB of temporaries. Compiled only.
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
  f = jax.jit(lambda x, w: convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN))
  memory = f.lower(x, w).compile().memory_analysis()
  budget = current_memory_budget()
  limit = budget + memory.argument_size_in_bytes + memory.output_size_in_bytes
  assert memory.temp_size_in_bytes <= limit, (memory.temp_size_in_bytes / 2**20, limit / 2**20)


def _is_tiled(f, *args):
  # A fresh function each time: on jax older than 0.10.1 traces are cached per function,
  # not per budget (tests/test_settings.py checks one function across budgets). The
  # im2col conv is one primitive in a jaxpr (its budget is a parameter fixed at trace
  # time), so the tile loop is looked for in the lowered program.
  return "stablehlo.while" in jax.jit(lambda *a: f(*a)).lower(*args).as_text()


def test_memory_budget_context_manager():
  x, w = jnp.ones((2, 16, 16, 4)), jnp.ones((3, 3, 4, 4))
  conv = lambda x, w: convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
  assert not _is_tiled(conv, x, w)
  with convmm.memory_budget(np.int64(4096)):
    assert _is_tiled(conv, x, w)
    with convmm.memory_budget(2**30):  # nested: the innermost wins
      assert not _is_tiled(conv, x, w)
    assert not _is_tiled(
      lambda x, w: convmm.conv_general_dilated(  # explicit argument wins
        x, w, (1, 1), "SAME", dimension_numbers=DN, memory_budget=2**30
      ),
      x,
      w,
    )
  assert not _is_tiled(conv, x, w)  # restored on exit
  y = convmm.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=DN, memory_budget=np.int64(4096)
  )
  assert_close(
    y,
    lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, precision=HIGHEST),
    reduction=36,
  )


@pytest.mark.parametrize(
  "bad, error",
  # A wrong value (fractional, a bool) is a ValueError, as for every count (test_errors).
  [(0, ValueError), (-5, ValueError), (1.5, ValueError), ("1", TypeError), (True, ValueError)],
  ids=["zero", "negative", "float", "str", "bool"],
)
def test_memory_budget_errors(bad, error):
  with pytest.raises(error, match=r"memory_budget: `nbytes`"):
    with convmm.memory_budget(bad):
      pass
  with pytest.raises(error, match=r"conv_general_dilated: `memory_budget`"):
    convmm.conv_general_dilated(
      jnp.ones((1, 4, 4, 1)),
      jnp.ones((3, 3, 1, 1)),
      (1, 1),
      "SAME",
      dimension_numbers=DN,
      memory_budget=bad,
    )


def test_layers_pick_up_a_new_budget():
  # The layers' inner jit is keyed on the budget: a configuration traced once must
  # be re-traced (and tiled) under a smaller budget.
  from flax import linen as nn  # noqa: F401  (the layers need flax)

  import convmm.linen

  layer = convmm.linen.Conv(features=4, kernel_size=(3, 3))
  x = jnp.ones((2, 16, 16, 4))
  params = layer.init(jax.random.key(0), x)
  y = layer.apply(params, x)
  assert not _is_tiled(layer.apply, params, x)
  with convmm.memory_budget(4096):
    assert _is_tiled(layer.apply, params, x)
    assert_close(jax.jit(lambda p, x: layer.apply(p, x))(params, x), y, reduction=36)


@pytest.mark.parametrize(
  "x_shape, w_shape, strides, padding, budget",
  [
    ((2, 16, 12, 3), (3, 3, 3, 4), (1, 1), "SAME", 48000),  # row blocks
    ((2, 16, 12, 3), (3, 3, 3, 4), (1, 1), "SAME", 24000),  # row and column blocks
    ((2, 16, 12, 3), (5, 4, 3, 4), (2, 1), ((3, 1), (1, 2)), 48000),
    ((1, 64, 3), (9, 3, 4), (1,), "SAME", 4000),
    ((2, 16, 12, 3), (3, 3, 3, 4), (1, 1), "VALID", 24000),  # wider input gradient
    ((2, 9, 8, 4), (3, 3, 4, 8), (1, 1), ((1, 0), (0, 0)), 8000),  # odd rows: columns only
  ],
  ids=["rows", "rows-columns", "strided-asymmetric", "1d", "valid", "columns"],
)
def test_spatial_blocks_match_lax(monkeypatch, x_shape, w_shape, strides, padding, budget):
  # The blocked tile layout used on Auto meshes with several devices (convmm._engine.blocks),
  # forced here on one device with 4 blocks per tiled dimension.
  monkeypatch.setattr(convmm._engine.plans, "unknown_split", lambda x: 4)
  monkeypatch.setattr(convmm._engine.tiling, "unknown_split", lambda x: 4)
  monkeypatch.setattr(convmm._engine.autodiff, "unknown_split", lambda x: 4)
  nsp = len(x_shape) - 2
  dn = DN if nsp == 2 else ("NWC", "WIO", "NWC")
  spec = conv_spec("t", x_shape, w_shape, strides, padding, None, None, dn, 1, 1)
  plan = tile_plan(spec, 4, budget, devices=4)
  assert max(plan.blocks) == 4 and plan.num_tiles > 1, plan
  assert tile_cost(spec, 4, plan.samples, plan.tile_out, 3, 4) <= budget, plan
  x = jax.random.normal(jax.random.key(5), x_shape)
  w = jax.random.normal(jax.random.key(6), w_shape)
  kw = dict(dimension_numbers=dn, precision=HIGHEST)
  tiled = lambda x, w: convmm.conv_general_dilated(  # noqa: E731
    x, w, strides, padding, memory_budget=budget, **kw
  )
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, **kw)  # noqa: E731
  assert "stablehlo.while" in jax.jit(tiled).lower(x, w).as_text()
  reduction = int(np.prod(w_shape[:-1]))
  assert_close(jax.jit(tiled)(x, w), ref(x, w), reduction=reduction)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  got, want = jax.jit(jax.grad(loss(tiled), (0, 1)))(x, w), jax.grad(loss(ref), (0, 1))(x, w)
  for a, b in zip(got, want):
    assert_close(a, b, reduction=reduction * int(np.prod(x_shape[1:-1])), grad=True)


def test_spatial_blocks_fall_back_where_blocks_do_not_fit():
  def blocks(x_shape, w_shape, strides, padding, devices=2):
    spec = conv_spec("t", x_shape, w_shape, strides, padding, None, None, DN, 1, 1)
    return spatial_blocks(spec, devices)

  assert blocks((1, 12, 10, 3), (3, 3, 3, 4), (1, 1), "SAME", devices=1) == (1, 1)
  assert blocks((1, 12, 10, 3), (3, 3, 3, 4), (1, 1), "SAME") == (2, 2)
  assert blocks((1, 12, 10, 3), (3, 3, 3, 4), (1, 1), "SAME", devices=8) == (4, 2)
  assert blocks((1, 13, 10, 3), (3, 3, 3, 4), (1, 1), "SAME") == (1, 2)  # odd rows
  assert blocks((1, 12, 10, 3), (3, 3, 3, 4), (4, 1), "SAME") == (1, 2)  # 6 rows a block, stride 4
  more_outputs = ((2, 2), (1, 1))  # 14 output rows from 12
  assert blocks((1, 12, 10, 3), (3, 3, 3, 4), (1, 1), more_outputs) == (1, 2)
  assert blocks((1, 12, 10, 3), (15, 3, 3, 4), (1, 1), "SAME") == (1, 2)  # halo over a block


@pytest.mark.parametrize("first", [np.nan, np.inf])
@pytest.mark.parametrize(
  "x_shape, w_shape, strides, padding, budget",
  [
    ((3, 13, 11, 4), (3, 3, 4, 5), (1, 1), "SAME", 20_000),  # row tiles, last one moved back
    ((4, 9, 7, 2), (2, 3, 2, 3), (2, 1), ((0, 1), (1, 1)), 600),  # batch chunks
  ],
  ids=["rows", "batch-chunks"],
)
def test_tile_loop_writes_every_output(x_shape, w_shape, strides, padding, budget, first):
  # The tile loop's output buffer starts from the input's first value (not zeros,
  # which XLA would share between loops and copy): a NaN or infinity there must
  # reach exactly the outputs whose windows read it, as in lax.
  spec = conv_spec("t", x_shape, w_shape, strides, padding, None, None, DN, 1, 1)
  plan = tile_plan(spec, 4, budget)
  assert plan.num_tiles * (x_shape[0] // plan.batch) > 1, plan
  x = np.random.default_rng(11).standard_normal(x_shape).astype(np.float32)
  x[0, 0, 0, 0] = first
  w = np.random.default_rng(12).standard_normal(w_shape).astype(np.float32)
  kw = dict(dimension_numbers=DN, precision=HIGHEST)
  got = jax.jit(
    lambda x, w: convmm.conv_general_dilated(x, w, strides, padding, memory_budget=budget, **kw)
  )(x, w)
  want = lax.conv_general_dilated(x, w, strides, padding, **kw)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  finite = np.isfinite(want)
  assert finite.sum() > 0.9 * finite.size
  assert_close(got[finite], want[finite], reduction=int(np.prod(w_shape[:-1])))
