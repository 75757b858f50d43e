"""The one place that turns user arguments into canonical tuples.

(``dimension_numbers`` are read by :mod:`convmm._rules.dimension_numbers`.)

Every public function of convmm calls :func:`conv_geometry` first. It validates
the arguments (raising ``ValueError``/``TypeError`` that name the function, the
argument and the values, at trace time) and returns a :class:`ConvGeometry`
holding plain Python tuples in *canonical order*: batch, feature, then the
spatial dimensions in the order in which they appear in the kernel spec (the
convention of ``jax.lax``, so ``window_strides[i]``, ``padding[i]`` and
``filter_shape[i]`` all refer to the same spatial dimension).

Nothing here is traced: shapes are Python ints and the output-shape rule is
plain arithmetic, as in ``jax/_src/lax/convolution.py``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax import lax

from convmm._rules.dimension_numbers import ConvDimensionNumbers, canonical_dimension_numbers

PADDING_STRINGS = ("SAME", "SAME_LOWER", "VALID")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """Canonical description of a convolution's data movement.

  All spatial tuples are in canonical order (the kernel spec's spatial order).

  Attributes:
    dimension_numbers: the ``lax.ConvDimensionNumbers`` of the operation.
    batch: lhs batch size.
    in_features: lhs feature size.
    in_spatial: lhs spatial sizes.
    filter_shape: kernel spatial sizes.
    window_strides: strides between windows.
    padding: ``(lo, hi)`` pair per spatial dim (negative values crop).
    lhs_dilation: input dilation (transposed-convolution stride).
    rhs_dilation: kernel dilation (atrous rate).
    out_spatial: output spatial sizes.
  """

  dimension_numbers: ConvDimensionNumbers
  batch: int
  in_features: int
  in_spatial: tuple[int, ...]
  filter_shape: tuple[int, ...]
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  out_spatial: tuple[int, ...]

  @property
  def num_spatial(self) -> int:
    return len(self.in_spatial)

  @property
  def num_taps(self) -> int:
    """Number of kernel positions, ``prod(filter_shape)``."""
    return math.prod(self.filter_shape)

  @property
  def padded_spatial(self) -> tuple[int, ...]:
    """Spatial sizes of the input after dilation and padding."""
    return tuple(
      dilate_dim(i, d) + lo + hi
      for i, d, (lo, hi) in zip(self.in_spatial, self.lhs_dilation, self.padding)
    )

  @property
  def effective_filter_shape(self) -> tuple[int, ...]:
    """Kernel spatial sizes after dilation: ``(k - 1) * d + 1``."""
    return tuple(dilate_dim(k, d) for k, d in zip(self.filter_shape, self.rhs_dilation))


def dilate_dim(size: int, dilation: int) -> int:
  """The one dilation rule: ``size`` elements ``dilation`` apart span ``(size - 1) * d + 1``.

  The effective size of a dilated kernel, and of a dilated input (0 stays 0).
  """
  return 0 if size == 0 else (size - 1) * dilation + 1


def conv_transpose_padding(
  k_eff: int, stride: int, padding: str | Sequence[int]
) -> tuple[int, int]:
  """lax's transposed-convolution padding of one spatial dimension.

  The ``(low, high)`` padding of the stride-1 convolution over the input dilated
  by ``stride`` that makes it the gradient of a forward convolution with kernel
  size ``k_eff`` and the given padding ('SAME', 'VALID' or a ``(low, high)``
  pair), as ``jax/_src/lax/convolution.py::_conv_transpose_padding`` computes it.

  Example:
    >>> from convmm._rules.canonical import conv_transpose_padding
    >>> conv_transpose_padding(3, 2, 'SAME'), conv_transpose_padding(3, 2, (1, 1))
    ((2, 1), (1, 1))
  """
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):  # as in lax
      raise ValueError(f"conv_transpose: invalid padding mode {padding!r}")
    pad_len = k_eff + stride - 2
    if padding == "VALID":
      pad_len, pad_lo = pad_len + max(k_eff - stride, 0), k_eff - 1
    else:
      pad_lo = k_eff - 1 if stride > k_eff - 1 else math.ceil(pad_len / 2)
  else:
    lo, hi = padding
    pad_lo, pad_len = k_eff - lo - 1, 2 * k_eff - lo - hi - 2
  return pad_lo, pad_len - pad_lo


def as_int(value: Any, *, integral_float: bool = False) -> int | None:
  """The one int predicate: ``value`` as an int, or ``None`` if it is not int-like.

  Ints, NumPy integers and bools are int-like (lax reads them with
  ``operator.index``, which accepts ``True``). With ``integral_float``, so are
  floats with an integral value (used for counts only).
  """
  if isinstance(value, np.bool_):
    return int(value)
  try:
    return operator.index(value)
  except TypeError:
    pass
  if integral_float and isinstance(value, float | np.floating) and float(value).is_integer():
    return int(value)
  return None


def int_pair(value: Any) -> tuple[int, int] | None:
  """``value`` as a ``(low, high)`` pair of ints (read by :func:`as_int`), else ``None``."""
  if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray) or len(value) != 2:
    return None
  low, high = as_int(value[0]), as_int(value[1])
  return None if low is None or high is None else (low, high)


def positive_count(
  fn: str, name: str, value: Any, *, bool_ok: bool = False, unit: str | None = None
) -> int:
  """The one positive-count check (group counts, iteration counts, sizes, bytes).

  A count is an int, a NumPy integer or an integral float (more than lax, which
  takes ``feature_group_count=1.0`` only when its compile cache already holds
  the same call with ``1``); a bool only with ``bool_ok`` (lax reads
  ``feature_group_count=True`` as 1). Not a number: ``TypeError``; a number that
  is not a positive integer (``0``, ``-1``, ``1.5``, a bool): ``ValueError``,
  the class lax raises for a non-integral or non-positive group count. A
  ``unit`` (``"bytes"``) is named in the messages.
  """
  kind = "a positive int" if unit is None else f"a positive int number of {unit}"
  count = as_int(value, integral_float=True)
  if count is None and not isinstance(value, numbers.Real | np.number):
    raise TypeError(f"{fn}: `{name}` must be {kind}, got {value!r}")
  if count is None or isinstance(value, bool | np.bool_) and not bool_ok:
    raise ValueError(f"{fn}: `{name}` must be {kind}, got {name}={value!r}")
  if count < 1:
    rule = ">= 1" if unit is None else kind
    raise ValueError(f"{fn}: `{name}` must be {rule}, got {name}={value!r}")
  return count


def canonical_ints(
  fn: str,
  name: str,
  value: Any,
  length: int,
  *,
  default: int | None = None,
  minimum: int = 1,
  too_small: type[Exception] = ValueError,
) -> tuple[int, ...]:
  """Validates a sequence of ``length`` ints, each ``>= minimum``.

  ``None`` becomes ``(default,) * length`` when a default is given. Entries are
  read by :func:`as_int`. ``too_small`` is the class raised for an entry below
  ``minimum`` (lax raises ``TypeError`` for a non-positive dilation).
  """
  if value is None and default is not None:
    return (default,) * length
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
    raise TypeError(f"{fn}: `{name}` must be a sequence of {length} ints, got {value!r}")
  values = tuple(value)
  if len(values) != length:
    raise ValueError(
      f"{fn}: `{name}` must have one entry per spatial dimension ({length}), "
      f"got {len(values)}: {name}={values!r}"
    )
  ints = tuple(as_int(v) for v in values)
  if any(v is None for v in ints):
    raise TypeError(f"{fn}: `{name}` must contain ints, got {name}={values!r}")
  values = tuple(v for v in ints if v is not None)
  if any(v < minimum for v in values):
    raise too_small(f"{fn}: `{name}` entries must be >= {minimum}, got {name}={values!r}")
  return values


def canonical_shape(fn: str, name: str, value: Any) -> tuple[int, ...]:
  """Validates an array shape given as a sequence of non-negative ints."""
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
    raise TypeError(f"{fn}: `{name}` must be a sequence of ints, got {value!r}")
  ints = tuple(as_int(v) for v in value)
  if any(v is None for v in ints) or any(isinstance(v, bool | np.bool_) for v in value):
    raise TypeError(f"{fn}: `{name}` must contain ints, got {name}={tuple(value)!r}")
  shape = tuple(v for v in ints if v is not None)
  if any(v < 0 for v in shape):
    raise ValueError(f"{fn}: `{name}` entries must be >= 0, got {name}={shape!r}")
  return shape


def padding_mode(fn: str, padding: str, modes: Sequence[str], otherwise: str) -> str:
  """``padding`` in upper case if it is one of ``modes``, else a ``ValueError``.

  ``otherwise`` names the non-string forms the caller also accepts.
  """
  mode = padding.upper()
  if mode not in modes:
    raise ValueError(
      f"{fn}: `padding` must be one of {tuple(modes)} {otherwise}, got padding={padding!r}"
    )
  return mode


def canonical_padding(
  fn: str,
  padding: Any,
  in_spatial: Sequence[int],
  effective_filter_shape: Sequence[int],
  window_strides: Sequence[int],
  lhs_dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
  """Turns 'SAME', 'SAME_LOWER', 'VALID' or (lo, hi) pairs into pairs.

  lax's classes: anything but a string or a sequence of pairs of ints (bools
  count as ints, floats do not) is a ``ValueError``, the wrong number of pairs a
  ``TypeError``.
  """
  nsp = len(in_spatial)
  if isinstance(padding, str):
    mode = padding_mode(fn, padding, PADDING_STRINGS, "or a sequence of (low, high) pairs")
    if any(d != 1 for d in lhs_dilation):
      raise ValueError(
        f"{fn}: string `padding` ({padding!r}) cannot be combined with "
        f"`lhs_dilation`={tuple(lhs_dilation)!r}; give explicit (low, high) pairs "
        f"or use conv_transpose / conv_adjoint"
      )
    return tuple(
      (int(lo), int(hi))
      for lo, hi in lax.padtype_to_pads(
        tuple(in_spatial), tuple(effective_filter_shape), tuple(window_strides), mode
      )
    )
  if not isinstance(padding, Sequence | np.ndarray):
    raise ValueError(
      f"{fn}: `padding` must be a string or a sequence of (low, high) pairs, got {padding!r}"
    )
  pairs = tuple(padding)
  out = [int_pair(pair) for pair in pairs]
  if any(pair is None for pair in out):
    raise ValueError(
      f"{fn}: `padding` entries must be (low, high) pairs of ints, got padding={padding!r}"
    )
  if len(pairs) != nsp:
    raise TypeError(
      f"{fn}: `padding` must have one (low, high) pair per spatial dimension "
      f"({nsp}), got {len(pairs)}: padding={padding!r}"
    )
  return tuple(pair for pair in out if pair is not None)


def output_spatial(
  padded_spatial: Sequence[int],
  effective_filter_shape: Sequence[int],
  window_strides: Sequence[int],
) -> tuple[int, ...]:
  """The output-size rule: ``floor((padded - k_eff) / stride) + 1``, or 0."""
  return tuple(
    (p - k) // s + 1 if p >= k else 0
    for p, k, s in zip(padded_spatial, effective_filter_shape, window_strides)
  )


def conv_geometry(
  fn: str,
  lhs_shape: Sequence[int],
  rhs_ndim: int,
  filter_shape: Sequence[int] | None,
  window_strides: Any,
  padding: Any,
  lhs_dilation: Any,
  rhs_dilation: Any,
  dimension_numbers: Any,
  rhs_shape: Sequence[int] | None = None,
) -> ConvGeometry:
  """Validates convolution arguments and returns their canonical form.

  Either ``rhs_shape`` (a kernel) or ``filter_shape`` (spatial sizes only, in
  the kernel spec's spatial order, as for ``conv_general_dilated_patches``) is
  given.
  """
  lhs_shape = tuple(int(s) for s in lhs_shape)
  dnums = canonical_dimension_numbers(fn, len(lhs_shape), rhs_ndim, dimension_numbers)
  lhs_spec, rhs_spec, _ = dnums
  nsp = len(lhs_shape) - 2
  if rhs_shape is not None:
    filter_shape = tuple(int(rhs_shape[d]) for d in rhs_spec[2:])
    if any(k < 1 for k in filter_shape):
      raise ValueError(
        f"{fn}: `rhs` spatial sizes must be >= 1 (lax cannot lower an empty window), "
        f"got rhs.shape={tuple(rhs_shape)}"
      )
  else:
    filter_shape = canonical_ints(fn, "filter_shape", filter_shape, nsp)
  strides = canonical_ints(fn, "window_strides", window_strides, nsp)
  lhs_dil = canonical_ints(fn, "lhs_dilation", lhs_dilation, nsp, default=1, too_small=TypeError)
  rhs_dil = canonical_ints(fn, "rhs_dilation", rhs_dilation, nsp, default=1, too_small=TypeError)
  in_spatial = tuple(lhs_shape[d] for d in lhs_spec[2:])
  eff_filter = tuple(dilate_dim(k, d) for k, d in zip(filter_shape, rhs_dil))
  pads = canonical_padding(fn, padding, in_spatial, eff_filter, strides, lhs_dil)
  padded = tuple(dilate_dim(i, d) + lo + hi for i, d, (lo, hi) in zip(in_spatial, lhs_dil, pads))
  if any(p < 0 for p in padded):
    raise ValueError(
      f"{fn}: negative `padding` {pads!r} crops more than the (dilated) input "
      f"spatial size {tuple(dilate_dim(i, d) for i, d in zip(in_spatial, lhs_dil))!r}"
    )
  return ConvGeometry(
    dimension_numbers=dnums,
    batch=lhs_shape[lhs_spec[0]],
    in_features=lhs_shape[lhs_spec[1]],
    in_spatial=in_spatial,
    filter_shape=tuple(filter_shape),
    window_strides=strides,
    padding=pads,
    lhs_dilation=lhs_dil,
    rhs_dilation=rhs_dil,
    out_spatial=output_spatial(padded, eff_filter, strides),
  )
