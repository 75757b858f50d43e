"""``dimension_numbers``: lax's three forms read into one ``lax.ConvDimensionNumbers``.

``None`` (``NC...``, ``OI...``, ``NC...``), a ``ConvDimensionNumbers`` of
permutations, or three spec strings such as ``('NHWC', 'HWIO', 'NHWC')``;
malformed ones raise the class lax raises for the same mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax import lax

ConvDimensionNumbers = lax.ConvDimensionNumbers


def canonical_dimension_numbers(
  fn: str, lhs_ndim: int, rhs_ndim: int, dimension_numbers: Any
) -> ConvDimensionNumbers:
  """Validates ``dimension_numbers`` and returns ``lax.ConvDimensionNumbers``.

  Accepts ``None`` (``NC...``, ``OI...``, ``NC...``), a ``ConvDimensionNumbers``
  or a 3-tuple of spec strings such as ``('NHWC', 'HWIO', 'NHWC')``.
  """
  if lhs_ndim != rhs_ndim:
    # lax's classes: ValueError from its shape rule when given ConvDimensionNumbers,
    # TypeError from conv_dimension_numbers otherwise.
    exc = ValueError if isinstance(dimension_numbers, ConvDimensionNumbers) else TypeError
    raise exc(
      f"{fn}: `lhs` and `rhs` must have the same rank, got lhs.ndim={lhs_ndim} "
      f"and rhs.ndim={rhs_ndim}"
    )
  if lhs_ndim < 2:
    raise ValueError(
      f"{fn}: `lhs` must have rank >= 2 (batch, feature, *spatial), got ndim={lhs_ndim}"
    )
  ndim = lhs_ndim
  if dimension_numbers is None:
    spec = tuple(range(ndim))
    return ConvDimensionNumbers(spec, spec, spec)
  if isinstance(dimension_numbers, ConvDimensionNumbers):
    for name, spec in zip(("lhs_spec", "rhs_spec", "out_spec"), dimension_numbers):
      if sorted(int(s) for s in spec) != list(range(ndim)):
        raise ValueError(
          f"{fn}: `dimension_numbers.{name}` must be a permutation of "
          f"range({ndim}), got {tuple(spec)!r}"
        )
    return ConvDimensionNumbers(*(tuple(int(s) for s in spec) for spec in dimension_numbers))
  if (
    not isinstance(dimension_numbers, Sequence)
    or isinstance(dimension_numbers, str)
    or len(dimension_numbers) != 3
    or not all(isinstance(s, str) for s in dimension_numbers)
  ):
    raise TypeError(
      f"{fn}: `dimension_numbers` must be None, a lax.ConvDimensionNumbers or a "
      f"tuple of three spec strings like ('NHWC', 'HWIO', 'NHWC'), got "
      f"{dimension_numbers!r}"
    )
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  for name, spec, (a, b) in (
    ("lhs_spec", lhs_spec, "NC"),
    ("rhs_spec", rhs_spec, "OI"),
    ("out_spec", out_spec, "NC"),
  ):
    # Malformed spec strings are TypeErrors, as in lax's conv_dimension_numbers.
    if len(spec) != ndim:
      raise TypeError(
        f"{fn}: `dimension_numbers` {name} {spec!r} must have one letter per "
        f"array dimension ({ndim})"
      )
    if len(set(spec)) != ndim or spec.count(a) != 1 or spec.count(b) != 1:
      raise TypeError(
        f"{fn}: `dimension_numbers` {name} {spec!r} must contain '{a}' and '{b}' "
        f"once each and distinct spatial letters"
      )
  spatial = [set(s) - set(ab) for s, ab in ((lhs_spec, "NC"), (rhs_spec, "OI"), (out_spec, "NC"))]
  if not spatial[0] == spatial[1] == spatial[2]:
    raise TypeError(
      f"{fn}: `dimension_numbers` must use the same spatial letters in all three "
      f"specs, got {tuple(dimension_numbers)!r}"
    )
  return lax.conv_dimension_numbers((0,) * ndim, (0,) * ndim, tuple(dimension_numbers))


def channels_last_dimension_numbers(num_spatial: int) -> ConvDimensionNumbers:
  """``(N, *spatial, C)``, ``(*window, I, O)``, ``(N, *spatial, C)`` as lax specs."""
  spatial = tuple(range(1, num_spatial + 1))
  channels_last = (0, num_spatial + 1, *spatial)
  return ConvDimensionNumbers(
    channels_last, (num_spatial + 1, num_spatial, *range(num_spatial)), channels_last
  )
