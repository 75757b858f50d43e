"""The implementations compared: convmm (and its variants), lax, and PyTorch on CPU.

Every JAX implementation exposes the three entry points a :class:`~suite.Layer` can call,
with lax's argument names, so one layer runs unchanged on each. PyTorch computes the same
function in its own ``(N, C, *spatial)`` layout (:func:`torch_ops`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax

import convmm
from benchmarks.suite import Layer
from convmm._rules.canonical import conv_transpose_padding, dilate_dim

# PyTorch's OpenMP threads otherwise busy-wait after each call: in the interleaved loop they
# steal the cores from the next (JAX) call, and on a shared machine every barrier stalls
# (measured here: a 2x16x16x8 conv took 50 ms with 2 spinning threads, 0.05 ms passive).
# Set OMP_WAIT_POLICY yourself to override; it must be set before PyTorch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
  import torch
  import torch.nn.functional as torch_functional
except ImportError:  # PyTorch is an optional reference.
  torch = None

# Named convmm variants: keyword arguments added to every convmm call. The baseline is
# "convmm" with no extra arguments; add e.g. {"convmm[shift]": {"method": "shift"}}.
CONVMM_VARIANTS: dict[str, dict[str, Any]] = {"convmm": {}}


# ------------------------------------------------------------------------------- JAX


@dataclasses.dataclass(frozen=True)
class JaxImpl:
  """The three public entry points of one JAX implementation."""

  conv_general_dilated: Callable[..., jax.Array]
  conv_transpose: Callable[..., jax.Array]
  conv_adjoint: Callable[..., jax.Array]

  def apply(self, layer: Layer, x: jax.Array, w: jax.Array) -> jax.Array:
    op = {
      "conv": self.conv_general_dilated,
      "transpose": self.conv_transpose,
      "adjoint": self.conv_adjoint,
    }[layer.op]
    return op(x, w, **layer.kwargs)


def lax_conv_adjoint(
  cotangent, rhs, lhs_shape, window_strides, padding, rhs_dilation=None, dimension_numbers=None
):
  """The adjoint of a forward conv, the way lax computes it: ``lax.conv_transpose``
  with ``transpose_kernel=True`` and the padding that reproduces ``lhs_shape``."""
  dn = lax.conv_dimension_numbers(lhs_shape, rhs.shape, dimension_numbers)
  nsp = len(lhs_shape) - 2
  rhs_dilation = rhs_dilation or (1,) * nsp
  pads = []
  for i in range(nsp):
    size = lhs_shape[dn.lhs_spec[2 + i]]
    k_eff = dilate_dim(rhs.shape[dn.rhs_spec[2 + i]], rhs_dilation[i])
    lo, hi = padding[i]
    # The forward conv drops `rest` trailing input rows; the adjoint must give them back.
    rest = (size + lo + hi - k_eff) % window_strides[i]
    pads.append((k_eff - 1 - lo, k_eff - 1 - hi + rest))
  return lax.conv_transpose(
    cotangent, rhs, window_strides, pads, rhs_dilation, dimension_numbers, transpose_kernel=True
  )


LAX = JaxImpl(lax.conv_general_dilated, lax.conv_transpose, lax_conv_adjoint)


def convmm_impl(**kwargs) -> JaxImpl:
  if not kwargs:
    return JaxImpl(convmm.conv_general_dilated, convmm.conv_transpose, convmm.conv_adjoint)
  return JaxImpl(
    functools.partial(convmm.conv_general_dilated, **kwargs),
    functools.partial(convmm.conv_transpose, **kwargs),
    functools.partial(convmm.conv_adjoint, **kwargs),
  )


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
  """``"method=shift,budget=1e6"`` -> ``("convmm[method=shift,budget=1e6]", {...})``."""
  kwargs = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise argparse.ArgumentTypeError(f"--variant: expected key=value, got {item!r}")
    try:
      kwargs[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      kwargs[key.strip()] = value.strip()
  return f"convmm[{text}]", kwargs


# ------------------------------------------------------------------------ PyTorch


def torch_ops(layer: Layer, x: np.ndarray, w: np.ndarray):
  """PyTorch tensors and a forward function computing the layer in PyTorch's layout.

  PyTorch runs in its default contiguous ``(N, C, *spatial)`` layout, as users call it.
  Returns ``(x_t, w_t, forward, to_torch_layout)``; ``to_torch_layout`` maps a lax
  output to PyTorch's layout for the agreement check.
  """
  kw = layer.kwargs
  dn = lax.conv_dimension_numbers(x.shape, w.shape, kw["dimension_numbers"])
  nsp = x.ndim - 2
  x_t = torch.from_numpy(np.array(np.transpose(x, dn.lhs_spec), order="C"))
  to_torch_layout = lambda y: np.transpose(np.asarray(y), dn.out_spec)
  k = [w.shape[d] for d in dn.rhs_spec[2:]]
  in_sp = [x.shape[d] for d in dn.lhs_spec[2:]]
  if layer.op == "conv":
    w_t = np.transpose(w, dn.rhs_spec)
    if any(lo != hi for lo, hi in kw["padding"]):
      raise ValueError(f"{layer.name}: PyTorch needs symmetric padding, got {kw['padding']}")
    forward = functools.partial(
      getattr(torch_functional, f"conv{nsp}d"),
      stride=kw["window_strides"],
      padding=[lo for lo, _ in kw["padding"]],
      dilation=kw["rhs_dilation"] or 1,
      groups=kw["feature_group_count"],
    )
  elif layer.op == "transpose":
    # lax correlates the dilated, (lo, hi)-padded input with w; PyTorch pads with
    # (k-1-p, k-1-p+output_padding) and correlates with the flipped (I, O, ...) kernel.
    w_t = np.flip(
      np.transpose(w, (dn.rhs_spec[1], dn.rhs_spec[0], *dn.rhs_spec[2:])),
      axis=tuple(range(2, 2 + nsp)),
    )
    pads = [
      conv_transpose_padding(k_, s, kw["padding"]) if isinstance(kw["padding"], str) else p
      for k_, s, p in zip(k, kw["strides"], kw["padding"])
    ]
    forward = functools.partial(
      getattr(torch_functional, f"conv_transpose{nsp}d"),
      stride=kw["strides"],
      padding=[k_ - 1 - lo for k_, (lo, _) in zip(k, pads)],
      output_padding=[hi - lo for lo, hi in pads],
    )
  else:
    # PyTorch's transposed conv is the adjoint of its conv with the same (O, I, ...) weight.
    w_t = np.transpose(w, dn.rhs_spec)
    fwd_dn = lax.conv_dimension_numbers(kw["lhs_shape"], w.shape, kw["dimension_numbers"])
    out_sp = [kw["lhs_shape"][d] for d in fwd_dn.lhs_spec[2:]]
    pads = [lo for lo, _ in kw["padding"]]
    strides = kw["window_strides"]
    forward = functools.partial(
      getattr(torch_functional, f"conv_transpose{nsp}d"),
      stride=strides,
      padding=pads,
      output_padding=[
        o - ((i - 1) * s - 2 * p + k_) for o, i, s, p, k_ in zip(out_sp, in_sp, strides, pads, k)
      ],
    )
  return x_t, torch.from_numpy(np.array(w_t, order="C")), forward, to_torch_layout
