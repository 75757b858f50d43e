"""Shared forward-convolution cases for the differential tests.

Cases are canonical (lhs ``(N, C, *spatial)``, rhs ``(O, I, *k)``) plus the
keyword arguments given to both convmm and lax; ``dimension_numbers`` lays the
operands out. References are computed by ``jax.lax`` at ``Precision.HIGHEST``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import convmm
from convmm._rules.shapes import layout_shape as layout

HIGHEST = lax.Precision.HIGHEST

# ----------------------------------------------------------------------------- helpers


def lax_specs(ndim, dimension_numbers):
  """lax's own reading of ``dimension_numbers`` (the layouts of lhs, rhs, out)."""
  return lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)


def make_operands(case, dtype=np.float32, seed=0):
  """Random lhs and rhs for a case given canonically (lhs NC..., rhs OI...)."""
  ndim = len(case["lhs"])
  dn = lax_specs(ndim, case.get("dimension_numbers"))
  rng = np.random.default_rng(seed)
  lhs = rng.standard_normal(layout(dn.lhs_spec, case["lhs"]))
  rhs = rng.standard_normal(layout(dn.rhs_spec, case["rhs"]))
  if np.issubdtype(dtype, np.integer):
    lhs, rhs = np.round(3 * lhs), np.round(3 * rhs)
  return jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)


def conv_kwargs(case):
  """The keyword arguments a case passes to both implementations."""
  return {k: v for k, v in case.items() if k not in ("lhs", "rhs")}


def reduction(case):
  """Terms summed per output element: ``I * prod(k)``."""
  return math.prod(case["rhs"][1:])


def ours(lhs, rhs, **kw):
  return convmm.conv_general_dilated(lhs, rhs, precision=HIGHEST, **kw)


def ref(lhs, rhs, **kw):
  return lax.conv_general_dilated(lhs, rhs, precision=HIGHEST, **kw)


def jitted(fn, **kw):
  """``fn`` with its static arguments bound, compiled as one program.

  One XLA compilation per configuration is much cheaper than dispatching
  im2col's many small ops one by one, which keeps the suite fast.
  """
  return jax.jit(functools.partial(fn, **kw))


def case(lhs, rhs, strides, padding, **kw):
  return dict(lhs=lhs, rhs=rhs, window_strides=strides, padding=padding, **kw)


NHWC = ("NHWC", "HWIO", "NHWC")
ODD = ("CNWH", "IHOW", "HWCN")


def channels_last(num_spatial):
  """Channels-last dimension numbers for 1-3 spatial dims: ``NWC``, ``NHWC``, ``NDHWC``."""
  sp = "DHW"[3 - num_spatial :]
  return (f"N{sp}C", f"{sp}IO", f"N{sp}C")


# lhs (N, C, *spatial) and rhs (O, I, *k) are canonical; dimension_numbers lay them out.
CASES = {
  "0d_no_spatial_dims": case((2, 3), (4, 3), (), "VALID"),
  "1d_valid": case((2, 3, 9), (4, 3, 3), (1,), "VALID"),
  "1d_same_stride2": case((2, 3, 9), (4, 3, 3), (2,), "SAME"),
  "1d_nwc_same_lower_even_k": case(
    (1, 2, 8), (3, 2, 4), (1,), "SAME_LOWER", dimension_numbers=("NWC", "WIO", "NWC")
  ),
  "2d_valid": case((2, 3, 6, 5), (4, 3, 3, 2), (1, 1), "VALID"),
  "2d_same_stride2": case((2, 3, 7, 6), (4, 3, 3, 3), (2, 2), "SAME"),
  "2d_same_lower_stride2": case((2, 3, 7, 6), (4, 3, 2, 2), (2, 1), "SAME_LOWER"),
  "2d_lowercase_same": case((1, 2, 5, 5), (2, 2, 3, 3), (1, 1), "same"),
  "2d_pairs": case((1, 2, 5, 6), (3, 2, 3, 2), (1, 2), ((1, 2), (0, 3))),
  "2d_negative_pairs": case((1, 2, 7, 6), (3, 2, 2, 2), (1, 1), ((-1, 2), (1, -2))),
  "2d_stride_gt_kernel": case((1, 2, 9, 8), (2, 2, 2, 2), (3, 4), "VALID"),
  "2d_lhs_dilation": case(
    (1, 2, 4, 5), (3, 2, 3, 3), (1, 1), ((2, 2), (1, 0)), lhs_dilation=(2, 3)
  ),
  "2d_lhs_dilation_stride": case(
    (2, 2, 4, 4), (3, 2, 3, 2), (2, 3), ((1, 1), (0, 2)), lhs_dilation=(2, 2)
  ),
  "2d_rhs_dilation_same": case((1, 2, 8, 7), (3, 2, 3, 3), (1, 1), "SAME", rhs_dilation=(2, 3)),
  "2d_both_dilations": case(
    (1, 2, 5, 4), (2, 2, 2, 3), (2, 1), ((1, 1), (2, 0)), lhs_dilation=(2, 1), rhs_dilation=(1, 2)
  ),
  "2d_nhwc": case((2, 3, 6, 5), (4, 3, 3, 3), (1, 2), "SAME", dimension_numbers=NHWC),
  "2d_odd_layout": case((2, 3, 6, 5), (4, 3, 3, 2), (2, 1), "SAME", dimension_numbers=ODD),
  "2d_dimension_numbers_object": case(
    (2, 3, 6, 5),
    (4, 3, 2, 3),
    (1, 1),
    ((1, 0), (0, 1)),
    dimension_numbers=lax.ConvDimensionNumbers((3, 0, 2, 1), (1, 3, 0, 2), (2, 1, 3, 0)),
  ),
  "2d_feature_groups": case((2, 4, 5, 5), (6, 2, 3, 3), (1, 1), "SAME", feature_group_count=2),
  "2d_depthwise": case((2, 3, 6, 6), (3, 1, 3, 3), (1, 1), "SAME", feature_group_count=3),
  "2d_depthwise_multiplier_nhwc": case(
    (1, 4, 5, 5), (8, 1, 3, 3), (2, 2), "VALID", feature_group_count=4, dimension_numbers=NHWC
  ),
  "2d_batch_groups": case((4, 3, 5, 5), (4, 3, 3, 3), (1, 1), "VALID", batch_group_count=2),
  "2d_batch_groups_odd_layout": case(
    (6, 2, 5, 4), (6, 2, 2, 2), (1, 2), "SAME", batch_group_count=3, dimension_numbers=ODD
  ),
  "3d_ndhwc_strides": case(
    (1, 2, 5, 4, 6),
    (3, 2, 2, 3, 2),
    (2, 1, 2),
    "SAME",
    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
  ),
  "3d_pairs_rhs_dilation_groups": case(
    (2, 4, 5, 4, 4),
    (4, 2, 2, 2, 2),
    (1, 1, 1),
    ((1, 0), (0, 1), (-1, 1)),
    rhs_dilation=(2, 1, 2),
    feature_group_count=2,
  ),
  "4d_valid": case((1, 2, 3, 4, 3, 3), (2, 2, 2, 2, 1, 2), (1, 2, 1, 1), "VALID"),
  "kernel_larger_than_input": case((2, 3, 3, 4), (2, 3, 5, 2), (1, 1), "VALID"),
  "dilated_kernel_larger_than_input": case(
    (1, 2, 4, 4), (2, 2, 3, 1), (1, 1), "VALID", rhs_dilation=(2, 1)
  ),
  "kernel_larger_same": case((1, 2, 2, 3), (2, 2, 4, 5), (1, 2), "SAME"),
  "zero_spatial": case((2, 3, 0, 4), (2, 3, 1, 2), (1, 1), "VALID"),
  "zero_spatial_same": case((1, 2, 0, 3), (2, 2, 2, 2), (1, 1), "SAME"),
  "zero_batch": case((0, 2, 4, 4), (3, 2, 2, 2), (1, 1), "SAME"),
  "zero_kernel_features": case((2, 2, 4, 4), (0, 2, 2, 2), (1, 1), "VALID"),
  "cropped_to_empty": case((1, 2, 3, 3), (2, 2, 1, 1), (1, 1), ((-3, 0), (0, 0))),
}


# -------------------------------------------------------------- randomized sweep (seeded)


def random_case(rng):
  """One random configuration covering every feature of the forward conv."""
  nsp = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
  max_size = {1: 9, 2: 7, 3: 5}[nsp]
  in_spatial = tuple(int(s) for s in rng.integers(1, max_size + 1, nsp))
  filter_shape = tuple(int(k) for k in rng.integers(1, 4, nsp))
  strides = tuple(int(s) for s in rng.integers(1, 4, nsp))
  rhs_dilation = tuple(int(d) for d in rng.integers(1, 3, nsp))
  groups = str(rng.choice(["none", "feature", "depthwise", "batch"]))
  n, c, o, fgc, bgc = int(rng.integers(1, 3)), int(rng.integers(1, 4)), 2, 1, 1
  if groups == "feature":
    fgc = int(rng.integers(2, 4))
    c, o = fgc * int(rng.integers(1, 3)), fgc * int(rng.integers(1, 3))
  elif groups == "depthwise":
    fgc = c = int(rng.integers(2, 5))
    o = c * int(rng.integers(1, 3))
  elif groups == "batch":
    bgc = int(rng.integers(2, 4))
    n, o = bgc * int(rng.integers(1, 3)), bgc * int(rng.integers(1, 3))
  else:
    o = int(rng.integers(1, 4))
  kw = {}
  pad_kind = str(rng.choice(["SAME", "SAME_LOWER", "VALID", "pairs", "dilated_pairs"]))
  if pad_kind in ("pairs", "dilated_pairs"):
    lhs_dilation = (
      tuple(int(d) for d in rng.integers(1, 4, nsp)) if pad_kind == "dilated_pairs" else (1,) * nsp
    )
    padding = []
    for size, d in zip(in_spatial, lhs_dilation):
      dilated = (size - 1) * d + 1
      lo, hi = (int(p) for p in rng.integers(-2, 3, 2))
      # Crop at most the whole (dilated) input, as lax requires.
      lo = max(lo, -dilated)
      hi = max(hi, -(dilated + lo))
      padding.append((lo, hi))
    padding = tuple(padding)
    if pad_kind == "dilated_pairs":
      kw["lhs_dilation"] = lhs_dilation
  else:
    padding = pad_kind
  if rng.random() < 0.5:
    kw["rhs_dilation"] = rhs_dilation
  letters = "HWD"[:nsp]
  layout_kind = str(rng.choice(["default", "strings", "object"]))
  if layout_kind != "default":
    lhs_spec = "".join(rng.permutation(list("NC" + letters)))
    rhs_spec = "".join(rng.permutation(list("OI" + letters)))
    out_spec = "".join(rng.permutation(list("NC" + letters)))
    dn = (lhs_spec, rhs_spec, out_spec)
    if layout_kind == "object":
      dn = lax.conv_dimension_numbers((1,) * (nsp + 2), (1,) * (nsp + 2), dn)
    kw["dimension_numbers"] = dn
  if fgc > 1:
    kw["feature_group_count"] = fgc
  if bgc > 1:
    kw["batch_group_count"] = bgc
  return case((n, c, *in_spatial), (o, c // fgc, *filter_shape), strides, padding, **kw)


SWEEP = [random_case(np.random.default_rng(1000 + i)) for i in range(40)]
