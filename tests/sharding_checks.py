"""Sharding checks on 2 CPU devices, run by test_sharding.py in a fresh process.

``jax_num_cpu_devices`` must be set before JAX initialises its backends, so this
runs as its own program and prints one JSON line per check.
"""

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
        specs = {}
        for name, conv, kw in [
          ("lax", lax.conv_general_dilated, {}),
          ("convmm", convmm.conv_general_dilated, {"memory_budget": budget}),
        ]:
          f = jax.jit(
            lambda x, w, conv=conv, kw=kw: conv(
              x, w, (1, 1), "SAME", dimension_numbers=DN, precision=HIGHEST, **kw
            )
          )
          with jax.set_mesh(mesh):
            y = f(x, w)
            tiled = "while" in f.lower(x, w).as_text()
          specs[name] = str(y.sharding.spec)
          error = float(np.max(np.abs(np.asarray(y) - ref)))
        report(
          "output_sharding",
          axis_type=axis_type,
          spec=str(spec),
          budget=budget,
          lax=specs["lax"],
          convmm=specs["convmm"],
          tiled=tiled,
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
    ("convmm", convmm.conv_general_dilated, {"memory_budget": 64 * 1024}),
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


if __name__ == "__main__":
  output_shardings()
  data_parallel_grad()
  out_sharding_auto_mesh()
  pjit_conv_1d_same()
