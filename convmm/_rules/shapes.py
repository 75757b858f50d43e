"""Shape rules and operand checks shared by every convolution entry point.

Plain Python on shapes (no tracing), so errors surface before compilation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convmm._rules.canonical import ConvGeometry, canonical_shape, conv_geometry, positive_count
from convmm._rules.dimension_numbers import channels_last_dimension_numbers


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
      (self.out_batch, self.out_features, *self.geometry.out_spatial),
    )


def layout_shape(spec: Sequence[int], canonical_shape: Sequence[int]) -> tuple[int, ...]:
  """Places a canonical ``(N, C, *spatial)`` shape into the layout ``spec``."""
  shape = [0] * len(spec)
  for canonical_axis, axis in enumerate(spec):
    shape[axis] = int(canonical_shape[canonical_axis])
  return tuple(shape)


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
  # As lax does: NumPy float64/int64 operands become float32/int32 when x64 is off.
  return shape, jax.dtypes.canonicalize_dtype(dtype)


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
    fn,
    lhs_shape,
    len(rhs_shape),
    None,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    rhs_shape=rhs_shape,
  )
  groups = positive_count(fn, "feature_group_count", feature_group_count, bool_ok=True)
  batch_groups = positive_count(fn, "batch_group_count", batch_group_count, bool_ok=True)
  _, rhs_spec, _ = geometry.dimension_numbers
  out_features = rhs_shape[rhs_spec[0]]
  kernel_in = rhs_shape[rhs_spec[1]]
  c = geometry.in_features
  if groups > 1 and batch_groups > 1:
    raise ValueError(
      f"{fn}: at most one of `feature_group_count` (={groups}) and "
      f"`batch_group_count` (={batch_groups}) may exceed 1"
    )
  if c % groups:
    raise ValueError(
      f"{fn}: `feature_group_count` (={groups}) must divide the lhs feature size "
      f"{c}; lhs.shape={lhs_shape}"
    )
  if c // groups != kernel_in:
    raise ValueError(
      f"{fn}: lhs feature size {c} divided by `feature_group_count` (={groups}) "
      f"must equal the rhs input-feature size {kernel_in}; lhs.shape={lhs_shape}, "
      f"rhs.shape={rhs_shape}"
    )
  if out_features % groups:
    raise ValueError(
      f"{fn}: `feature_group_count` (={groups}) must divide the rhs output-feature "
      f"size {out_features}; rhs.shape={rhs_shape}"
    )
  if geometry.batch % batch_groups:
    raise ValueError(
      f"{fn}: `batch_group_count` (={batch_groups}) must divide the lhs batch size "
      f"{geometry.batch}; lhs.shape={lhs_shape}"
    )
  if out_features % batch_groups:
    raise ValueError(
      f"{fn}: `batch_group_count` (={batch_groups}) must divide the rhs "
      f"output-feature size {out_features}; rhs.shape={rhs_shape}"
    )
  return ConvSpec(geometry, out_features, groups, batch_groups)


def operator_spec(
  fn: str, rhs: Any, lhs_shape: Any, *conv_args: Any
) -> tuple[ConvSpec, tuple[int, ...], tuple[int, ...], Any]:
  """The convolution by ``rhs`` as a linear map on inputs of ``lhs_shape``.

  ``conv_args`` are lax's arguments after the operands, from ``window_strides``
  to ``batch_group_count``. Returns the spec, the checked ``lhs_shape``, and
  the shape and dtype of ``rhs``.
  """
  rhs_shape, rhs_dtype = shape_of(fn, "rhs", rhs)
  lhs_shape = canonical_shape(fn, "lhs_shape", lhs_shape)
  return conv_spec(fn, lhs_shape, rhs_shape, *conv_args), lhs_shape, rhs_shape, rhs_dtype


def check_dtypes(
  fn: str,
  lhs_dtype: Any,
  rhs_dtype: Any,
  preferred_element_type: Any = None,
) -> np.dtype | None:
  """lax's dtype rule: equal operand dtypes; returns the checked preferred dtype."""
  if np.dtype(lhs_dtype) != np.dtype(rhs_dtype):
    raise TypeError(
      f"{fn}: `lhs` and `rhs` must have the same dtype (as in lax), got "
      f"lhs.dtype={np.dtype(lhs_dtype)} and rhs.dtype={np.dtype(rhs_dtype)}"
    )
  return preferred_dtype(fn, lhs_dtype, preferred_element_type)


def preferred_dtype(fn: str, input_dtype: Any, preferred_element_type: Any) -> np.dtype | None:
  """Canonical ``preferred_element_type``, checked against the input dtype as lax does.

  lax accepts (integral, integral) of the same signedness, (integral, floating),
  (floating, floating), (complex, complex) and anything from bool, never
  narrower than the input; every other pair is a ``TypeError``.
  """
  if preferred_element_type is None:
    return None
  try:
    preferred = jax.dtypes.canonicalize_dtype(np.dtype(preferred_element_type))
  except TypeError as e:
    raise TypeError(
      f"{fn}: `preferred_element_type` must be a dtype, got {preferred_element_type!r}"
    ) from e
  inp = np.dtype(input_dtype)
  kinds = (jnp.integer, jnp.floating, jnp.complexfloating)
  int_to_float = jnp.issubdtype(inp, jnp.integer) and jnp.issubdtype(preferred, jnp.floating)
  if (
    not int_to_float
    and (
      any(jnp.issubdtype(inp, t) and not jnp.issubdtype(preferred, t) for t in kinds)
      or jnp.issubdtype(inp, jnp.signedinteger)
      and not jnp.issubdtype(preferred, jnp.signedinteger)
    )
    or (preferred.itemsize < inp.itemsize)
  ):
    raise TypeError(
      f"{fn}: `preferred_element_type`={preferred} is not allowed for {inp} operands "
      f"(as in lax: same kind and signedness, or integer to floating, or from bool, "
      f"never narrower)"
    )
  return preferred


def accumulator_dtype(dtype: Any) -> np.dtype | None:
  """float32 for 16-bit floats (a GEMM accumulates them in float32), else ``None``."""
  dtype = np.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return np.dtype(np.float32)
  return None


def channels_last_spec(spec: ConvSpec) -> ConvSpec:
  """``spec`` with canonical (channels-last) dimension numbers."""
  dnums = channels_last_dimension_numbers(spec.geometry.num_spatial)
  return dataclasses.replace(
    spec, geometry=dataclasses.replace(spec.geometry, dimension_numbers=dnums)
  )
