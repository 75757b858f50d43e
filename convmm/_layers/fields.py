"""Reading the fields of Flax conv layers: kernel sizes, broadcast ints, padding, mask, method.

Flax's conventions (an int for a 1-D kernel, ``maybe_broadcast`` of strides
and dilations, ``canonicalize_padding``), with ints and pairs read by the
core's rules (:mod:`convmm._rules.canonical`) and errors naming the layer.
Padding modes that lax has no name for ('CIRCULAR', 'REFLECT', 'REPLICATE',
'CAUSAL') are kept as upper-case strings; :mod:`convmm._layers.geometry`
applies them with ``jnp.pad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from convmm._engine.directions import method_name
from convmm._rules.canonical import as_int, canonical_ints, int_pair, padding_mode

CONV_PADDINGS = ("SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT", "REPLICATE", "CAUSAL")
TRANSPOSE_PADDINGS = ("SAME", "SAME_LOWER", "VALID", "CIRCULAR")
Padding = str | tuple[tuple[int, int], ...]


def kernel_size_of(layer: str, kernel_size: Any) -> tuple[int, ...]:
  if as_int(kernel_size) is not None:
    kernel_size = (kernel_size,)
  if isinstance(kernel_size, str) or not isinstance(kernel_size, Sequence | np.ndarray):
    raise TypeError(
      f"{layer}: `kernel_size` must be an int or a sequence of ints, got {kernel_size!r}"
    )
  if len(kernel_size) == 0:
    raise ValueError(
      f"{layer}: `kernel_size` must have at least one entry, got kernel_size={kernel_size!r}"
    )
  return canonical_ints(layer, "kernel_size", kernel_size, len(kernel_size))


def broadcast_ints(
  layer: str,
  name: str,
  value: Any,
  rank: int,
  default: int = 1,
  minimum: int = 1,
  dilation: bool = False,
) -> tuple[int, ...]:
  """Flax's ``maybe_broadcast``: ``None`` -> ``default``, an int -> ``rank`` copies.

  Flax hands a ``dilation`` to lax, which raises TypeError for a non-positive one.
  """
  if value is None:
    value = default
  if as_int(value) is not None:
    value = (value,) * rank
  return canonical_ints(
    layer, name, value, rank, minimum=minimum, too_small=TypeError if dilation else ValueError
  )


def layer_padding(layer: str, padding: Any, rank: int, modes: Sequence[str]) -> Padding:
  """Flax's ``canonicalize_padding`` with errors naming the layer: an upper-case mode or pairs.

  ``padding`` is a string in ``modes`` (any case), an int (both sides of every
  dim), or ``rank`` entries, each an int or a ``(low, high)`` pair. An unknown
  string or the wrong number of entries is a ``ValueError``, anything else a
  ``TypeError``.
  """
  if isinstance(padding, str):
    return padding_mode(layer, padding, modes, f"or an int, or {rank} ints or (low, high) pairs")
  if (width := as_int(padding)) is not None:
    return ((width, width),) * rank
  if not isinstance(padding, Sequence | np.ndarray):
    raise TypeError(
      f"{layer}: `padding` must be a string, an int, or {rank} ints or (low, high) pairs, "
      f"got {padding!r}"
    )
  entries = tuple(padding)
  if len(entries) != rank:
    raise ValueError(
      f"{layer}: `padding` must have one entry per spatial dimension ({rank}, the length "
      f"of `kernel_size`), got {len(entries)}: padding={padding!r}"
    )
  pairs = [(width, width) if (width := as_int(e)) is not None else int_pair(e) for e in entries]
  if any(pair is None for pair in pairs):
    raise TypeError(
      f"{layer}: `padding` entries must be ints or (low, high) pairs of ints, got "
      f"padding={padding!r}"
    )
  return tuple(pair for pair in pairs if pair is not None)


def check_mask(layer: str, mask: Any, kernel_shape: Sequence[int]) -> None:
  """Raises a ValueError if ``mask`` is given and is not shaped like the kernel."""
  if mask is not None and tuple(np.shape(mask)) != tuple(kernel_shape):
    raise ValueError(
      f"{layer}: `mask` must have the kernel's shape {tuple(kernel_shape)}, got "
      f"mask.shape={tuple(np.shape(mask))}"
    )


def check_layer_method(layer: str, method: Any) -> None:
  """The core's check of ``method`` (None or a method name); its errors name ``layer``."""
  method_name(layer, method)
