"""Shardings: how an operand is split over a mesh, and the output sharding lax would give.

convmm follows lax's sharding rule for convolutions (batch and spatial
dimensions keep the input's sharding where it divides them; features and the
kernel are replicated) and applies ``out_sharding`` as lax does. The tiling
reads an operand's split so that a sharded batch stays sharded in every tile.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax import lax
from jax._src.core import ShardingTypeError  # lax's exception for sharding conflicts


def sharding_of(x: jax.Array) -> tuple[int, frozenset[int]]:
  """Devices the batch axis is split over, and the split spatial axes (explicit meshes)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if not spec or mesh is None or not getattr(mesh, "shape", None):
    return 1, frozenset()

  def shards(entry: Any) -> int:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[name] for name in names)

  sizes = [shards(entry) for entry in spec] + [1] * (x.ndim - len(spec))
  return sizes[0], frozenset(d for d in range(x.ndim - 2) if sizes[1 + d] > 1)


def unknown_split(x: jax.Array) -> int:
  """Devices ``x``'s spatial axes may be split over without its type saying so.

  On explicit axes the type tells (:func:`sharding_of`): 1. Otherwise (an Auto
  mesh, or jit with sharded arguments and no mesh set), the size of the current
  mesh, else the number of devices.
  """
  mesh = jax.sharding.get_abstract_mesh()
  meshes = (getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None), mesh)
  if any(jax.sharding.AxisType.Explicit in getattr(m, "axis_types", ()) for m in meshes):
    return 1
  return mesh.size if not mesh.empty else jax.device_count()


def explicit_spec(x: jax.Array) -> tuple | None:
  """``x``'s partition spec, one entry per axis, when it is sharded over explicit axes."""
  batch_shards, sharded_spatial = sharding_of(x)
  if batch_shards == 1 and not sharded_spatial:
    return None
  spec = tuple(jax.typeof(x).sharding.spec)
  return (*spec, *(None,) * (x.ndim - len(spec)))


def conv_out_sharding(x: Any, w: Any, out_shape: tuple[int, ...]) -> Any:
  """lax's output sharding for channels-last abstract operands ``x``, ``w``.

  Batch and spatial dimensions keep the input's sharding where it still divides
  them; sharded features or kernels need an ``out_sharding``.
  """
  sharding = x.sharding
  if sharding.mesh.empty:
    return sharding
  if sharding.spec[-1:] not in ((), (None,)) or not (
    w.sharding.mesh.empty or w.sharding.is_fully_replicated
  ):
    raise ShardingTypeError(
      "conv_general_dilated: the input's feature dimension and the kernel must not be "
      f"sharded; got input {x.str_short(True)} and kernel {w.str_short(True)}; pass "
      "`out_sharding`"
    )
  sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
  parts = [*sharding.spec, *[None] * (x.ndim - len(sharding.spec))]
  parts[-1] = None
  parts = [
    p
    if p is None or size % math.prod(sizes[a] for a in (p if isinstance(p, tuple) else (p,))) == 0
    else None
    for p, size in zip(parts, out_shape)
  ]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*parts))


def lax_out_sharding(lhs: jax.Array, rhs: jax.Array, *args: Any) -> Any:
  """lax's output sharding when an operand is sharded over explicit mesh axes, else None."""

  def sharded(a):
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
    return bool(spec) and any(entry is not None for entry in spec)

  if not (sharded(lhs) or sharded(rhs)):
    return None
  *conv_args, preferred = args
  return jax.eval_shape(
    lambda a, b: lax.conv_general_dilated(a, b, *conv_args, preferred_element_type=preferred),
    lhs,
    rhs,
  ).sharding


def constrain(y: jax.Array, sharding: Any) -> jax.Array:
  """``out_sharding`` as lax applies it: a reshard on explicit axes, a constraint on auto ones."""
  mesh = getattr(sharding, "mesh", None) or jax.sharding.get_abstract_mesh()
  if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    return jax.sharding.reshard(y, sharding)
  # On auto axes an unnamed dimension is left to the partitioner, as lax leaves it.
  P = jax.sharding.PartitionSpec
  spec = tuple(getattr(sharding, "spec", sharding))
  if all(entry is None for entry in spec):
    return y
  spec = P(
    *(P.UNCONSTRAINED if e is None else e for e in spec), *(P.UNCONSTRAINED,) * (y.ndim - len(spec))
  )
  if isinstance(sharding, jax.sharding.NamedSharding):
    return lax.with_sharding_constraint(y, jax.sharding.NamedSharding(sharding.mesh, spec))
  return lax.with_sharding_constraint(y, spec)


def contracted_axes(lhs: jax.Array, rhs: jax.Array, spec: Any) -> tuple[str, ...]:
  """Explicit mesh axes that shard the contraction (lhs features, rhs input features) alike.

  Only without feature groups (which split the features) and with every other
  dimension unsharded (lax's kernel-gradient convolution of a batch-sharded input
  has this form, with batch groups for a grouped convolution); else ().
  """
  if spec.feature_group_count != 1:
    return ()
  lhs_spec, rhs_spec, _ = spec.geometry.dimension_numbers
  parts = []
  for a, feature in ((lhs, lhs_spec[1]), (rhs, rhs_spec[1])):
    sharding = getattr(jax.typeof(a), "sharding", None)
    if sharding is None or jax.sharding.AxisType.Explicit not in sharding.mesh.axis_types:
      return ()
    entries = [*sharding.spec, *(None,) * (a.ndim - len(sharding.spec))]
    if any(e is not None for i, e in enumerate(entries) if i != feature):
      return ()
    parts.append(entries[feature])
  axes = parts[0] if isinstance(parts[0], tuple) else (parts[0],)
  return axes if parts[0] is not None and parts[0] == parts[1] else ()


def sum_over_shards(
  compute: Any, lhs: jax.Array, rhs: jax.Array, spec: Any, axes: tuple[str, ...]
) -> jax.Array:
  """``compute(lhs_shard, rhs_shard)`` on every device, summed over ``axes`` (replicated).

  A convolution whose contraction is sharded over explicit ``axes``
  (:func:`contracted_axes`): each device convolves its slice of the features,
  then one all-reduce of the output, as lax's partitioner does.
  """
  lhs_spec, rhs_spec, _ = spec.geometry.dimension_numbers
  entry = axes[0] if len(axes) == 1 else axes
  in_specs = tuple(
    jax.sharding.PartitionSpec(*(entry if i == f else None for i in range(a.ndim)))
    for a, f in ((lhs, lhs_spec[1]), (rhs, rhs_spec[1]))
  )
  mesh = jax.typeof(lhs).sharding.mesh
  return jax.shard_map(
    lambda a, b: lax.psum(compute(a, b), axes),
    mesh=mesh,
    in_specs=in_specs,
    out_specs=jax.sharding.PartitionSpec(),
  )(lhs, rhs)
