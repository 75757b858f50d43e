"""Prints the lowered StableHLO of a fixed set of convmm functions, to diff across commits.

A refactoring that claims "behaviour unchanged" should leave every program convmm traces
identical. Run this on both commits and compare (only public names are used, so it runs on
any commit)::

  git worktree add /tmp/base <commit>
  PYTHONPATH=/tmp/base python tools/hlo_snapshot.py > /tmp/before.txt
  PYTHONPATH=$PWD python tools/hlo_snapshot.py > /tmp/after.txt
  diff /tmp/before.txt /tmp/after.txt && echo identical

``--devices 4`` runs the same set on 4 CPU devices (the spatial blocks of an Auto mesh's
tiles, whose plans depend on the device count) and adds sharded cases on Auto and
Explicit meshes. Each case prints a header line and ``jax.jit(f).lower(*args).as_text()``.
"""

from __future__ import annotations

import argparse
import sys

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--devices", type=int, default=1, help="CPU devices (default 1)")
parser.add_argument("--only", default="", help="run the cases whose name contains this")
args = parser.parse_args()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", args.devices)

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import convmm  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
CASES: list[tuple[str, object, tuple]] = []


def sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def dn(nsp):
  s = "DHW"[3 - nsp :] if nsp else ""
  return (f"N{s}C", f"{s}IO", f"N{s}C")


def conv_case(name, x_shape, w_shape, dtype=jnp.float32, directions="fgvj", **kw):
  """Forward, grad (of a sum of squares, both operands), vjp and jvp of one convolution."""
  kw.setdefault("window_strides", (1,) * (len(x_shape) - 2))
  kw.setdefault("padding", "SAME")
  kw.setdefault("dimension_numbers", dn(len(x_shape) - 2))
  f = lambda x, w: convmm.conv_general_dilated(x, w, **kw)  # noqa: E731
  x, w = sds(x_shape, dtype), sds(w_shape, dtype)
  y = jax.eval_shape(f, x, w)
  if "f" in directions:
    CASES.append((f"{name}/forward", f, (x, w)))
  if "g" in directions:
    loss = lambda x, w: jnp.sum(jnp.square(f(x, w).astype(jnp.float32)))  # noqa: E731
    CASES.append((f"{name}/grad", jax.grad(loss, (0, 1)), (x, w)))
  if "v" in directions:
    CASES.append((f"{name}/vjp", lambda x, w, ct: jax.vjp(f, x, w)[1](ct), (x, w, y)))
  if "j" in directions:
    CASES.append((f"{name}/jvp", lambda x, w, tx, tw: jax.jvp(f, (x, w), (tx, tw)), (x, w, x, w)))


def conv_cases():
  f16, bf16 = jnp.float16, jnp.bfloat16
  conv_case("dense", (2, 9, 8, 6), (3, 3, 6, 8))
  conv_case(
    "dense-nchw", (2, 6, 9, 8), (8, 6, 3, 3), padding=((1, 2), (0, 1)), dimension_numbers=None
  )
  conv_case("dense-bf16", (2, 9, 8, 6), (3, 3, 6, 8), bf16)
  conv_case("dense-f16-pet", (2, 9, 8, 6), (3, 3, 6, 8), f16, preferred_element_type=jnp.float32)
  conv_case("more-in-than-out", (2, 9, 8, 8), (3, 3, 8, 4))
  conv_case("valid", (2, 9, 8, 8), (3, 3, 8, 4), padding="VALID")
  conv_case("1x1", (2, 9, 8, 6), (1, 1, 6, 8))
  conv_case("deep-reversed-taps", (2, 4, 4, 64), (3, 3, 64, 64))
  conv_case("deep-reversed-taps-bf16", (1, 2, 2, 16), (3, 3, 16, 16), bf16)
  conv_case("grouped", (2, 9, 8, 6), (3, 3, 3, 8), feature_group_count=2)
  conv_case("grouped-bf16", (2, 9, 8, 6), (3, 3, 3, 8), bf16, feature_group_count=2)
  conv_case("batch-groups", (4, 9, 8, 6), (3, 3, 6, 8), batch_group_count=2)
  conv_case("depthwise", (2, 9, 8, 6), (3, 3, 1, 6), feature_group_count=6)
  conv_case("depthwise-mult", (2, 9, 8, 6), (3, 3, 1, 12), feature_group_count=6)
  conv_case(
    "depthwise-strided", (2, 9, 8, 6), (3, 3, 1, 6), window_strides=(2, 2), feature_group_count=6
  )
  conv_case("depthwise-bf16", (2, 9, 8, 6), (3, 3, 1, 6), bf16, feature_group_count=6)
  conv_case("strided", (2, 9, 8, 6), (3, 3, 6, 8), window_strides=(2, 2))
  conv_case("rhs-dilated", (2, 9, 8, 6), (3, 3, 6, 8), rhs_dilation=(2, 2))
  conv_case(
    "lhs-dilated", (2, 5, 4, 6), (3, 3, 6, 8), lhs_dilation=(2, 1), padding=((2, 2), (1, 1))
  )
  conv_case("1d", (2, 11, 5), (4, 5, 3), padding=((3, 1),))
  conv_case("1d-k9", (2, 40, 4), (9, 4, 4))
  conv_case("3d", (1, 4, 5, 3, 4), (2, 3, 2, 4, 4), padding=((1, 0), (1, 1), (0, 1)))
  conv_case("0d", (3, 5), (5, 4), padding=())
  conv_case("9x9-two-stage", (1, 12, 12, 2), (9, 9, 2, 3))
  conv_case("shift", (2, 9, 8, 6), (3, 3, 6, 8), method="shift")
  conv_case("im2col-depthwise", (2, 9, 8, 6), (3, 3, 1, 6), feature_group_count=6, method="im2col")
  conv_case("empty-batch", (0, 5, 5, 2), (3, 3, 2, 3), directions="fg")
  # Tiled under small budgets: rows, columns, batch chunks, the kernel gradient's
  # tiles (its own transposed patches, or the input gradient's cotangent patches).
  conv_case("tiled-rows", (4, 12, 10, 6), (3, 3, 6, 8), memory_budget=20_000)
  conv_case("tiled-rows-bf16", (4, 12, 10, 6), (3, 3, 6, 8), bf16, memory_budget=20_000)
  conv_case(
    "tiled-two-stage-strided",
    (2, 15, 9, 3),
    (10, 3, 3, 5),
    window_strides=(2, 1),
    padding=((4, 3), (1, 1)),
    memory_budget=40_000,
  )
  conv_case(
    "tiled-3d", (3, 6, 5, 4, 3), (2, 3, 2, 3, 4), window_strides=(1, 2, 1), memory_budget=30_000
  )
  conv_case("tiled-ct-rows", (2, 7, 5, 128), (3, 3, 128, 96), memory_budget=200_000)
  conv_case(
    "tiled-ct-dilated",
    (2, 9, 6, 128),
    (3, 2, 128, 64),
    padding=((2, 2), (0, 1)),
    rhs_dilation=(2, 2),
    memory_budget=150_000,
  )
  conv_case(
    "tiled-ct-batch-chunks",
    (3, 4, 3, 128),
    (3, 3, 128, 128),
    padding=((1, 1), (2, 0)),
    memory_budget=30_000,
  )
  conv_case("tiled-ct-1d", (2, 24, 128), (9, 128, 64), memory_budget=120_000)
  conv_case("tiled-ct-3d", (2, 3, 4, 3, 128), (3, 3, 2, 128, 64), memory_budget=300_000)
  conv_case("tiled-64-features", (2, 7, 5, 64), (3, 3, 64, 64), memory_budget=100_000)
  conv_case("tiled-columns", (1, 3, 40, 4), (3, 9, 4, 4), memory_budget=4_000)
  conv_case(
    "tiled-grouped", (4, 12, 10, 6), (3, 3, 3, 8), feature_group_count=2, memory_budget=20_000
  )
  conv_case(
    "tiled-batch-groups", (4, 12, 10, 6), (3, 3, 6, 8), batch_group_count=2, memory_budget=20_000
  )
  conv_case(
    "tiled-strided-chunks", (6, 12, 10, 6), (3, 3, 6, 8), window_strides=(2, 2), memory_budget=8_000
  )
  conv_case(
    "tiled-lhs-dilated",
    (4, 6, 5, 6),
    (3, 3, 6, 8),
    lhs_dilation=(2, 2),
    padding=((2, 2), (1, 2)),
    memory_budget=8_000,
  )
  conv_case("tiled-valid", (2, 12, 10, 6), (3, 3, 6, 8), padding="VALID", memory_budget=10_000)
  conv_case("budget-1", (2, 6, 5, 3), (3, 3, 3, 4), memory_budget=1)
  conv_case("budget-1-strided", (2, 6, 5, 3), (3, 3, 3, 4), window_strides=(2, 2), memory_budget=1)
  conv_case(
    "depthwise-tiny-budget", (2, 9, 8, 6), (3, 3, 1, 6), feature_group_count=6, memory_budget=1_000
  )

  def under_context_budget(x, w):
    with convmm.memory_budget(20_000):
      return convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

  x, w = sds((4, 12, 10, 6)), sds((3, 3, 6, 8))
  CASES.append(("context-budget/forward", under_context_budget, (x, w)))
  CASES.append(
    ("context-budget/grad", jax.grad(lambda x, w: under_context_budget(x, w).sum(), (0, 1)), (x, w))
  )


def transform_cases():
  f = lambda x, w: convmm.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
  x, w = sds((2, 7, 6, 4)), sds((3, 3, 4, 5))
  xs, ws = sds((3, 2, 7, 6, 4)), sds((3, 3, 3, 4, 5))
  CASES.append(("vmap-x", jax.vmap(f, (0, None)), (xs, w)))
  CASES.append(("vmap-w", jax.vmap(f, (None, 0)), (x, ws)))
  CASES.append(("vmap-both", jax.vmap(f, (0, 0)), (xs, ws)))
  g = lambda x, w: convmm.conv_general_dilated(
    x,
    w,
    (1, 1),
    "SAME",
    dimension_numbers=NHWC,  # noqa: E731
    batch_group_count=2,
  )
  CASES.append(
    ("vmap-both-batch-groups", jax.vmap(g, (0, 0)), (sds((3, 4, 7, 6, 4)), sds((3, 3, 3, 4, 6))))
  )
  CASES.append(("vmap-grad", jax.vmap(jax.grad(lambda x, w: f(x, w).sum(), (0, 1))), (xs, ws)))
  CASES.append(
    (
      "hessian-x",
      jax.hessian(lambda x, w: f(x, w).sum() ** 2),
      (sds((1, 3, 3, 2)), sds((2, 2, 2, 2))),
    )
  )
  CASES.append(("jacfwd", jax.jacfwd(f), (sds((1, 3, 3, 2)), sds((2, 2, 2, 2)))))
  CASES.append(
    (
      "grad-of-grad",
      jax.grad(lambda x, w: jax.grad(lambda x: jnp.sum(f(x, w) ** 2))(x).sum(), (0, 1)),
      (x, w),
    )
  )


def other_function_cases():
  x, w = sds((2, 7, 6, 4)), sds((3, 3, 4, 5))
  y = sds((2, 7, 6, 5))
  kw = dict(dimension_numbers=NHWC)
  CASES.append(
    (
      "conv_transpose",
      lambda y, w: convmm.conv_transpose(y, jnp.swapaxes(w, 2, 3), (2, 2), "SAME", **kw),
      (y, w),
    )
  )
  CASES.append(
    (
      "conv_transpose/grad",
      jax.grad(
        lambda y, w: convmm.conv_transpose(y, jnp.swapaxes(w, 2, 3), (2, 2), "SAME", **kw).sum(),
        (0, 1),
      ),
      (y, w),
    )
  )
  adjoint = lambda y, w: convmm.conv_adjoint(y, w, (2, 7, 6, 4), (2, 2), "SAME", **kw)  # noqa: E731
  CASES.append(("conv_adjoint", adjoint, (sds((2, 4, 3, 5)), w)))
  CASES.append(
    (
      "conv_adjoint/grad",
      jax.grad(lambda y, w: adjoint(y, w).sum(), (0, 1)),
      (sds((2, 4, 3, 5)), w),
    )
  )
  local = lambda x, w: convmm.conv_general_dilated_local(  # noqa: E731
    x, w, (1, 1), "VALID", (3, 3), dimension_numbers=("NHWC", "OIHW", "NHWC")
  )
  wl = sds((5, 4 * 9, 5, 4))
  CASES.append(("local", local, (x, wl)))
  CASES.append(("local/grad", jax.grad(lambda x, w: local(x, w).sum(), (0, 1)), (x, wl)))
  CASES.append(("im2col", lambda x: convmm.im2col(x, (3, 3), (1, 1), "SAME", **kw), (x,)))
  CASES.append(
    (
      "col2im",
      lambda p: convmm.col2im(p, (2, 7, 6, 4), (3, 3), (1, 1), "SAME", **kw),
      (sds((2, 7, 6, 36)),),
    )
  )
  CASES.append(("convolve", lambda a, b: convmm.convolve(a, b, "same"), (sds((9, 8)), sds((3, 2)))))
  CASES.append(("correlate", lambda a, b: convmm.correlate(a, b, "full"), (sds((9,)), sds((4,)))))
  CASES.append(
    ("operator_norm", lambda w: convmm.operator_norm(w, (1, 8, 8, 4), (1, 1), "SAME", **kw), (w,))
  )
  CASES.append(
    ("circular_singular_values", lambda w: convmm.circular_singular_values(w, (8, 8)), (w,))
  )
  lax_f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
  CASES.append(("replace_convs", convmm.replace_convs(lax_f), (x, w)))
  CASES.append(
    (
      "replace_convs/grad",
      jax.grad(convmm.replace_convs(lambda x, w: lax_f(x, w).sum()), (0, 1)),
      (x, w),
    )
  )
  CASES.append(
    (
      "grad/replace_convs",
      convmm.replace_convs(jax.grad(lambda x, w: lax_f(x, w).sum(), (0, 1))),
      (x, w),
    )
  )


def layer_cases():
  import flax.linen as nn
  from flax import nnx

  import convmm.linen
  import convmm.nnx

  x = sds((2, 8, 7, 3))
  for name, layer in [
    ("linen-Conv-circular", convmm.linen.Conv(4, (3, 3), strides=2, padding="CIRCULAR")),
    ("linen-Conv-grouped", convmm.linen.Conv(6, (3, 3), feature_group_count=3)),
    ("linen-ConvTranspose", convmm.linen.ConvTranspose(4, (3, 3), strides=(2, 2))),
    ("linen-ConvLocal", convmm.linen.ConvLocal(4, (3, 3))),
    ("linen-ConvAdjoint", convmm.linen.ConvAdjoint(4, (3, 3), strides=2)),
  ]:
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    apply = lambda p, x, layer=layer: layer.apply(p, x)  # noqa: E731
    CASES.append(
      (f"{name}/init", lambda k, x, layer=layer: layer.init(k, x), (jax.random.key(0), x))
    )
    CASES.append((f"{name}/apply", apply, (params, x)))
    CASES.append(
      (f"{name}/grad", jax.grad(lambda p, x, apply=apply: jnp.sum(apply(p, x) ** 2)), (params, x))
    )
  del nn
  for name, make in [
    ("nnx-Conv", lambda: convmm.nnx.Conv(3, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))),
    ("nnx-ConvTranspose", lambda: convmm.nnx.ConvTranspose(3, 4, (3, 3), rngs=nnx.Rngs(0))),
    (
      "nnx-ConvLocal",
      lambda: convmm.nnx.ConvLocal(3, 4, (3, 3), input_spatial_shape=(8, 7), rngs=nnx.Rngs(0)),
    ),
    (
      "nnx-ConvAdjoint",
      lambda: convmm.nnx.ConvAdjoint(3, 4, (3, 3), strides=2, rngs=nnx.Rngs(0)),
    ),
  ]:
    graphdef, state = nnx.split(make())
    state_sds = jax.tree.map(lambda a: sds(a.shape, a.dtype), state)
    call = lambda s, x, graphdef=graphdef: nnx.merge(graphdef, s)(x)  # noqa: E731
    CASES.append((f"{name}/call", call, (state_sds, x)))
    CASES.append(
      (f"{name}/grad", jax.grad(lambda s, x, call=call: jnp.sum(call(s, x) ** 2)), (state_sds, x))
    )


def sharded_cases():
  for axis_type in ["Auto", "Explicit"]:
    mesh = jax.make_mesh((args.devices,), ("x",), axis_types=(getattr(AxisType, axis_type),))
    for spec in [P("x"), P(None, "x"), P(None, None, "x")]:
      for padding in ["SAME", "VALID"]:
        x = jax.ShapeDtypeStruct((4, 16, 12, 3), jnp.float32, sharding=NamedSharding(mesh, spec))
        w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32, sharding=NamedSharding(mesh, P()))
        f = lambda x, w, padding=padding: convmm.conv_general_dilated(  # noqa: E731
          x, w, (1, 1), padding, dimension_numbers=NHWC, memory_budget=4096
        )
        loss = lambda x, w, f=f: jnp.sum(f(x, w) ** 2)  # noqa: E731
        name = f"mesh-{axis_type}-{spec}-{padding}"
        CASES.append((f"{name}/forward", (mesh, f), (x, w)))
        CASES.append((f"{name}/grad", (mesh, jax.grad(loss, (0, 1))), (x, w)))
    if axis_type == "Explicit":  # features sharded alike: a sum over shards
      x = jax.ShapeDtypeStruct(
        (2, 6, 6, 4), jnp.float32, sharding=NamedSharding(mesh, P(None, None, None, "x"))
      )  # noqa: E501
      w = jax.ShapeDtypeStruct(
        (3, 3, 4, 5), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "x"))
      )  # noqa: E501
      f = lambda x, w: convmm.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=NHWC, out_sharding=P()
      )
      CASES.append(("mesh-Explicit-contracted/forward", (mesh, f), (x, w)))


def main():
  conv_cases()
  transform_cases()
  other_function_cases()
  layer_cases()
  if args.devices > 1:
    sharded_cases()
  for name, fn, fn_args in CASES:
    if args.only not in name:
      continue
    mesh = None
    if isinstance(fn, tuple):
      mesh, fn = fn
    print(f"==== {name}", flush=True)
    try:
      if mesh is None:
        text = jax.jit(fn).lower(*fn_args).as_text()
      else:
        with jax.set_mesh(mesh):
          text = jax.jit(fn).lower(*fn_args).as_text()
    except Exception as error:  # noqa: BLE001 (a failure is part of the behaviour)
      text = f"error: {type(error).__name__}: {error}"
    print(text)
  print(f"{len(CASES)} cases", file=sys.stderr)


if __name__ == "__main__":
  main()
