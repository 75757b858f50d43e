"""Sharding checks on 2 CPU devices, run by test_sharding.py in a fresh process.

``jax_num_cpu_devices`` must be set before JAX initialises its backends, so this
runs as its own program and prints one JSON line per check.
"""

import functools
import json

import jax

jax.config.update("jax_num_cpu_devices", 2)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import convmm  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
HIGHEST = lax.Precision.HIGHEST
rng = np.random.default_rng(0)


def report(name, **fields):
  print(json.dumps({"check": name, **fields}), flush=True)


def output_shardings():
  # Output sharding of convmm vs lax: batch-, row- and column-sharded inputs, Auto
  # and Explicit meshes, untiled and tiled (a 4 KiB budget forces row tiles).
  x_np = rng.standard_normal((4, 12, 10, 3)).astype(np.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)).astype(np.float32))
  ref = np.asarray(
    lax.conv_general_dilated(x_np, w, (1, 1), "SAME", dimension_numbers=DN, precision=HIGHEST)
  )
  for axis_type in ["Auto", "Explicit"]:
    mesh = jax.make_mesh((2,), ("x",), axis_types=(getattr(AxisType, axis_type),))
    for spec in [P("x"), P(None, "x"), P(None, None, "x")]:
      x = jax.device_put(x_np, NamedSharding(mesh, spec))
      for budget in [None, 4096]:
        specs, gathers = {}, {}
        for name, conv, kw in [
          ("lax", lax.conv_general_dilated, {}),
          ("convmm", convmm.conv_general_dilated, {"memory_budget": budget, "method": "convmm"}),
        ]:
          f = jax.jit(
            lambda x, w, conv=conv, kw=kw: conv(
              x, w, (1, 1), "SAME", dimension_numbers=DN, precision=HIGHEST, **kw
            )
          )
          with jax.set_mesh(mesh):
            y = f(x, w)
            hlo = f.lower(x, w).compile().as_text()
          specs[name] = str(y.sharding.spec)
          gathers[name] = hlo.count("all-gather(")
          error = float(np.max(np.abs(np.asarray(y) - ref)))
        report(
          "output_sharding",
          axis_type=axis_type,
          spec=str(spec),
          budget=budget,
          lax=specs["lax"],
          convmm=specs["convmm"],
          lax_all_gathers=gathers["lax"],
          all_gathers=gathers["convmm"],
          tiled="while" in hlo,
          error=error,
        )


def data_parallel_grad():
  # A tiled conv and its gradient under data-parallel jit: lax compiles no all-gather.
  mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,))
  x = jax.device_put(
    rng.standard_normal((8, 16, 16, 4)).astype(np.float32), NamedSharding(mesh, P("x"))
  )
  w = jax.device_put(rng.standard_normal((3, 3, 4, 8)).astype(np.float32), NamedSharding(mesh, P()))
  for name, conv, kw in [
    ("lax", lax.conv_general_dilated, {}),
    ("convmm", convmm.conv_general_dilated, {"memory_budget": 64 * 1024, "method": "convmm"}),
  ]:
    step = jax.jit(
      jax.value_and_grad(
        lambda w, x, conv=conv, kw=kw: jnp.sum(
          conv(x, w, (1, 1), "SAME", dimension_numbers=DN, **kw) ** 2
        )
      )
    )
    hlo = step.lower(w, x).compile().as_text()
    report(
      "data_parallel_grad", impl=name, all_gathers=hlo.count("all-gather("), tiled="while" in hlo
    )


def blocked_tiles():
  # Auto mesh, rows or columns sharded, tiled into spatial blocks (convmm._engine.blocks):
  # values and gradients equal lax's at HIGHEST for paddings, strides, dilations,
  # groups and 1-3 spatial dims, and neither the forward nor the gradient gathers.
  from convmm._engine.plans import tile_plan
  from convmm._rules.shapes import conv_spec

  mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,))
  cases = [
    # x shape, kernel shape, strides, padding, rhs dilation, groups, budget
    ((2, 12, 10, 4), (3, 3, 4, 6), (1, 1), "SAME", (1, 1), 1, 3000),
    ((2, 12, 12, 3), (5, 5, 3, 4), (1, 1), ((3, 1), (0, 2)), (1, 1), 1, 3000),
    ((2, 12, 12, 3), (3, 3, 3, 4), (2, 2), "VALID", (1, 1), 1, 2000),
    ((2, 12, 12, 3), (3, 3, 3, 4), (1, 1), "VALID", (1, 1), 1, 3000),
    ((2, 12, 12, 3), (3, 3, 3, 4), (1, 1), "SAME", (2, 2), 1, 3000),
    ((2, 12, 12, 3), (3, 2, 3, 4), (1, 1), ((-1, 2), (1, -1)), (1, 1), 1, 3000),
    ((2, 12, 12, 3), (2, 2, 3, 4), (3, 2), "VALID", (1, 1), 1, 1500),
    ((2, 12, 10, 4), (3, 3, 2, 4), (1, 1), "SAME", (1, 1), 2, 3000),
    ((2, 64, 3), (9, 3, 4), (1,), "SAME", (1,), 1, 2000),
    ((2, 8, 6, 6, 2), (3, 3, 3, 2, 3), (1, 1, 1), "SAME", (1, 1, 1), 1, 6000),
  ]
  for shape, kshape, strides, padding, dilation, groups, budget in cases:
    nsp = len(shape) - 2
    dn = ("N" + "DHW"[3 - nsp :] + "C", "DHW"[3 - nsp :] + "IO", "N" + "DHW"[3 - nsp :] + "C")
    spec = conv_spec("t", shape, kshape, strides, padding, None, dilation, dn, groups, 1)
    plan = tile_plan(spec, 4, budget, devices=2)
    x_np = rng.standard_normal(shape).astype(np.float32)
    w = jnp.asarray(rng.standard_normal(kshape).astype(np.float32))
    for axis in range(1, min(nsp, 2) + 1):
      x = jax.device_put(x_np, NamedSharding(mesh, P(*(None,) * axis, "x")))
      values, gathers = {}, {}
      args = dict(
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=dn,
        feature_group_count=groups,
        precision=HIGHEST,
      )
      for name, conv, kw in [
        ("lax", lax.conv_general_dilated, {}),
        ("convmm", convmm.conv_general_dilated, {"memory_budget": budget, "method": "convmm"}),
      ]:
        fwd = functools.partial(conv, **args, **kw)
        grad = jax.grad(lambda x, w, fwd=fwd: jnp.sum(jnp.sin(fwd(x, w))), (0, 1))
        with jax.set_mesh(mesh):
          values[name] = [jax.jit(fwd)(x, w), *jax.jit(grad)(x, w)]
          gathers[name] = [
            jax.jit(f).lower(x, w).compile().as_text().count("all-gather(") for f in (fwd, grad)
          ]
      (lo, hi), k_eff = spec.geometry.padding[axis - 1], spec.geometry.effective_filter_shape
      report(
        "blocked_tiles",
        # A unit-stride conv padded by less than k_eff - 1 has an input gradient (a
        # conv) with more outputs than inputs: computed through the forward's blocks.
        wider_input_grad=all(s == 1 for s in strides) and lo + hi < k_eff[axis - 1] - 1,
        shape=shape,
        kernel=kshape,
        padding=str(padding),
        sharded_axis=axis,
        blocks=plan.blocks,
        tiles=plan.num_tiles,
        lax_all_gathers=gathers["lax"],
        all_gathers=gathers["convmm"],
        lax_sharding=str(values["lax"][0].sharding.spec),
        sharding=str(values["convmm"][0].sharding.spec),
        errors=[
          float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (1 + np.max(np.abs(np.asarray(b)))))
          for a, b in zip(values["convmm"], values["lax"])
        ],
      )


def out_sharding_auto_mesh():
  # out_sharding=NamedSharding on an ordinary (Auto) mesh. lax 0.10.2 rejects it
  # (ValueError from dot_general); convmm deliberately accepts it as a constraint.
  mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,))
  x = jnp.ones((4, 8, 8, 2))
  w = jnp.ones((3, 3, 2, 2))
  for sharding in [NamedSharding(mesh, P("x")), NamedSharding(mesh, P(None, "x"))]:
    f = jax.jit(
      lambda x, w, sharding=sharding: convmm.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DN, out_sharding=sharding
      )
    )
    y = f(x, w)
    ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
    report(
      "out_sharding_auto",
      want=str(sharding.spec),
      convmm=str(y.sharding.spec),
      error=float(jnp.max(jnp.abs(y - ref))),
    )


def pjit_conv_1d_same():
  # JAX's pjit_test::test_conv_general_dilated: a 1-D 'SAME' conv of an input sharded
  # over batch and width on an Explicit mesh keeps both shardings.
  for shape in [(2, 1), (1, 2)]:
    mesh = jax.make_mesh(shape, ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    arr = jax.device_put(
      rng.standard_normal((16, 128, 8)).astype(np.float32), NamedSharding(mesh, P("x", "y"))
    )
    kernel = rng.standard_normal((5, 8, 10)).astype(np.float32)
    specs = {}
    for name, conv in [("lax", lax.conv_general_dilated), ("convmm", convmm.conv_general_dilated)]:
      f = jax.jit(
        lambda x, conv=conv, kernel=kernel: conv(
          x,
          kernel,
          window_strides=(1,),
          padding="SAME",
          feature_group_count=1,
          lhs_dilation=(1,),
          rhs_dilation=(1,),
          dimension_numbers=("NWC", "WIO", "NWC"),
        )
      )
      with jax.set_mesh(mesh):
        specs[name] = str(jax.typeof(f(arr)).sharding.spec)
    report("pjit_conv_1d_same", mesh=str(shape), **specs)


def depthwise_training():
  # A batch-sharded depthwise conv's value and gradients (unit strides: the flipped
  # kernel's multiply-accumulate; strided: its linear transpose; the kernel
  # gradient's loop over taps) on Auto and Explicit meshes, against lax.
  x_np = rng.standard_normal((4, 9, 8, 4)).astype(np.float32)
  w_np = rng.standard_normal((3, 3, 1, 4)).astype(np.float32)
  # Also column-sharded on an Explicit mesh, unit strides (its kernel gradient
  # cannot flatten the positions there; strided, both convmm and this test's
  # SAME padding of 8 columns to 9 hit lax's "padding on sharded dims" limit).
  cases = [("Auto", P("x")), ("Explicit", P("x")), ("Explicit", P(None, None, "x"))]
  for axis_type, x_spec in cases:
    mesh = jax.make_mesh((2,), ("x",), axis_types=(getattr(AxisType, axis_type),))
    x = jax.device_put(x_np, NamedSharding(mesh, x_spec))
    w = jax.device_put(w_np, NamedSharding(mesh, P()))
    for strides in [(1, 1), (2, 2)] if x_spec == P("x") else [(1, 1)]:
      out = {}
      for name, conv in [
        ("lax", lax.conv_general_dilated),
        ("convmm", convmm.conv_general_dilated),
      ]:
        step = jax.jit(
          jax.value_and_grad(
            lambda x, w, conv=conv, strides=strides: jnp.sum(
              jnp.sin(
                conv(
                  x,
                  w,
                  strides,
                  "SAME",
                  dimension_numbers=DN,
                  feature_group_count=4,
                  precision=HIGHEST,
                )
              )
            ),
            (0, 1),
          )
        )
        with jax.set_mesh(mesh):
          value, (gx, gw) = step(x, w)
          hlo = step.lower(x, w).compile().as_text()
        out[name] = (value, gx, gw, str(gx.sharding.spec), hlo.count("all-gather("))
      report(
        "depthwise_training",
        axis_type=axis_type,
        x_spec=str(x_spec),
        strides=str(strides),
        error=max(
          float(jnp.max(jnp.abs(a - b))) for a, b in zip(out["convmm"][:3], out["lax"][:3])
        ),
        lax=out["lax"][3],
        convmm=out["convmm"][3],
        lax_all_gathers=out["lax"][4],
        all_gathers=out["convmm"][4],
      )


def mixed_directions_training():
  # method='auto' on CPU: XLA's convolution for the forward and input gradient of
  # a dense float32 conv, convmm's kernel gradient; batch- and row-sharded inputs
  # on Auto and Explicit meshes: lax's values, output shardings and no more
  # all-gathers than lax.
  x_np = rng.standard_normal((4, 12, 10, 3)).astype(np.float32)
  w_np = rng.standard_normal((3, 3, 3, 5)).astype(np.float32)
  for axis_type in ["Auto", "Explicit"]:
    mesh = jax.make_mesh((2,), ("x",), axis_types=(getattr(AxisType, axis_type),))
    for x_spec in [P("x"), P(None, "x")]:
      x = jax.device_put(x_np, NamedSharding(mesh, x_spec))
      w = jax.device_put(w_np, NamedSharding(mesh, P()))
      out = {}
      for name, conv in [
        ("lax", lax.conv_general_dilated),
        ("convmm", convmm.conv_general_dilated),
      ]:
        step = jax.jit(
          jax.value_and_grad(
            lambda x, w, conv=conv: jnp.sum(
              jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=DN, precision=HIGHEST))
            ),
            argnums=(0, 1),
          )
        )
        with jax.set_mesh(mesh):
          value, (dx, dw) = step(x, w)
          hlo = step.lower(x, w).compile().as_text()
        out[name] = (value, dx, dw, str(dx.sharding.spec), hlo.count("all-gather("))
      report(
        "mixed_directions",
        axis_type=axis_type,
        x_spec=str(x_spec),
        algorithms=convmm.algorithms(x, w, (1, 1), "SAME", dimension_numbers=DN),
        error=max(
          float(jnp.max(jnp.abs(a - b))) for a, b in zip(out["convmm"][:3], out["lax"][:3])
        ),
        lax=out["lax"][3],
        convmm=out["convmm"][3],
        lax_all_gathers=out["lax"][4],
        all_gathers=out["convmm"][4],
      )


if __name__ == "__main__":
  depthwise_training()
  mixed_directions_training()
  output_shardings()
  data_parallel_grad()
  blocked_tiles()
  out_sharding_auto_mesh()
  pjit_conv_1d_same()
