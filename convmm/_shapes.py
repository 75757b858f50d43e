"""Shape rules and operand checks shared by every convolution entry point.

Plain Python on shapes (no tracing), so errors surface before compilation.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convmm._canonical import ConvGeometry, conv_geometry


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A validated convolution: geometry plus kernel features and groups."""

  geometry: ConvGeometry
  out_features: int
  feature_group_count: int
  batch_group_count: int

  @property
  def out_batch(self) -> int:
    return self.geometry.batch // self.batch_group_count

  @property
  def out_shape(self) -> tuple[int, ...]:
    """Output shape in the layout of ``dimension_numbers.out_spec``."""
    return layout_shape(
        self.geometry.dimension_numbers.out_spec,
        (self.out_batch, self.out_features, *self.geometry.out_spatial))


def layout_shape(spec: Sequence[int], canonical_shape: Sequence[int]) -> tuple[int, ...]:
  """Places a canonical ``(N, C, *spatial)`` shape into the layout ``spec``."""
  shape = [0] * len(spec)
  for canonical_axis, axis in enumerate(spec):
    shape[axis] = int(canonical_shape[canonical_axis])
  return tuple(shape)


def _check_count(fn: str, name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise TypeError(f"{fn}: `{name}` must be a positive int, got {value!r}")
  value = operator.index(value)
  if value < 1:
    raise ValueError(f"{fn}: `{name}` must be >= 1, got {name}={value}")
  return value


def shape_of(fn: str, name: str, x: Any) -> tuple[tuple[int, ...], Any]:
  """Shape and dtype of a numeric array-like; a TypeError naming ``name`` otherwise."""
  if isinstance(x, jax.ShapeDtypeStruct) or hasattr(x, "shape") and hasattr(x, "dtype"):
    shape, dtype = tuple(x.shape), x.dtype
  elif isinstance(x, int | float | complex | list | tuple) and not isinstance(x, bool):
    arr = np.asarray(x)
    shape, dtype = arr.shape, arr.dtype
    if dtype.kind == "O":
      raise TypeError(f"{fn}: `{name}` must be an array, got {type(x).__name__}: {x!r:.80}")
  else:
    raise TypeError(f"{fn}: `{name}` must be an array, got {type(x).__name__}: {x!r:.80}")
  if not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
    raise TypeError(f"{fn}: `{name}` must be a numeric array, got dtype={np.dtype(dtype)}")
  if not hasattr(x, "dtype"):
    dtype = jax.dtypes.canonicalize_dtype(dtype)
  return shape, dtype


def conv_spec(
    fn: str,
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any,
    rhs_dilation: Any,
    dimension_numbers: Any,
    feature_group_count: Any,
    batch_group_count: Any,
) -> ConvSpec:
  """Validates a convolution of ``lhs_shape`` by ``rhs_shape``."""
  lhs_shape = tuple(int(s) for s in lhs_shape)
  rhs_shape = tuple(int(s) for s in rhs_shape)
  geometry = conv_geometry(
      fn, lhs_shape, len(rhs_shape), None, window_strides, padding, lhs_dilation,
      rhs_dilation, dimension_numbers, rhs_shape=rhs_shape)
  groups = _check_count(fn, "feature_group_count", feature_group_count)
  batch_groups = _check_count(fn, "batch_group_count", batch_group_count)
  _, rhs_spec, _ = geometry.dimension_numbers
  out_features = rhs_shape[rhs_spec[0]]
  kernel_in = rhs_shape[rhs_spec[1]]
  c = geometry.in_features
  if groups > 1 and batch_groups > 1:
    raise ValueError(
        f"{fn}: at most one of `feature_group_count` (={groups}) and "
        f"`batch_group_count` (={batch_groups}) may exceed 1")
  if c % groups:
    raise ValueError(
        f"{fn}: `feature_group_count` (={groups}) must divide the lhs feature size "
        f"{c}; lhs.shape={lhs_shape}")
  if c // groups != kernel_in:
    raise ValueError(
        f"{fn}: lhs feature size {c} divided by `feature_group_count` (={groups}) "
        f"must equal the rhs input-feature size {kernel_in}; lhs.shape={lhs_shape}, "
        f"rhs.shape={rhs_shape}")
  if out_features % groups:
    raise ValueError(
        f"{fn}: `feature_group_count` (={groups}) must divide the rhs output-feature "
        f"size {out_features}; rhs.shape={rhs_shape}")
  if geometry.batch % batch_groups:
    raise ValueError(
        f"{fn}: `batch_group_count` (={batch_groups}) must divide the lhs batch size "
        f"{geometry.batch}; lhs.shape={lhs_shape}")
  if out_features % batch_groups:
    raise ValueError(
        f"{fn}: `batch_group_count` (={batch_groups}) must divide the rhs "
        f"output-feature size {out_features}; rhs.shape={rhs_shape}")
  return ConvSpec(geometry, out_features, groups, batch_groups)


def check_same_dtype(fn: str, lhs_dtype: Any, rhs_dtype: Any) -> None:
  if np.dtype(lhs_dtype) != np.dtype(rhs_dtype):
    raise TypeError(
        f"{fn}: `lhs` and `rhs` must have the same dtype (as in lax), got "
        f"lhs.dtype={np.dtype(lhs_dtype)} and rhs.dtype={np.dtype(rhs_dtype)}")
