"""The forward kernels: a convolution of canonical channels-last operands, by method.

'im2col' (patches, then one batched GEMM, tiled beyond the memory budget), 'shift'
(one GEMM per kernel tap, summed) and 'depthwise' (a multiply-accumulate), and the
choice among them (:func:`choose_method`; ``'auto'`` is the policy's,
:func:`convmm._engine.policy.forward_method`). The primitive of
:mod:`convmm._engine.autodiff` computes its forward pass here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from convmm._engine import policy
from convmm._engine.im2col import (
  feature_groups_first,
  kernel_channels_last,
  pad_input,
  patches_channels_last,
  tap_offsets,
  tap_slice,
)
from convmm._engine.phases import phase_conv
from convmm._engine.tiling import tile_conv
from convmm._rules.shapes import ConvSpec, accumulator_dtype


def kernel_taps_last(rhs: jax.Array, spec: ConvSpec) -> jax.Array:
  """Kernel in any layout -> ``(T, I, O)`` with taps in row-major order."""
  w = kernel_channels_last(rhs, spec.geometry.dimension_numbers[1])
  return w.reshape(spec.geometry.num_taps, w.shape[-2], w.shape[-1])


def choose_method(spec: ConvSpec, method: str, fn: str = "conv_general_dilated") -> str:
  """``method``, checked against ``spec``, with ``"auto"`` resolved by the policy.

  'depthwise' computes only convolutions whose groups have a single input feature
  each; for the methods that leave the engine to convmm ('auto', 'autotune',
  'xla', 'convmm') it is :func:`convmm._engine.policy.forward_method`'s choice.
  (Which directions the engine computes, and which XLA's convolution does, is
  :func:`convmm._engine.directions.choose`'s decision.)
  """
  geometry = spec.geometry
  cg = geometry.in_features // spec.feature_group_count
  depthwise_ok = cg == 1 and spec.batch_group_count == 1
  if method == "depthwise" and not depthwise_ok:
    raise ValueError(
      f"{fn}: `method`='depthwise' needs one input feature per group "
      f"(feature_group_count == lhs features); got feature_group_count="
      f"{spec.feature_group_count} for {geometry.in_features} features"
    )
  return method if method in policy.ENGINES else policy.forward_method(spec)


def _group_gemm(
  lhs: jax.Array,
  w: jax.Array,
  spec: ConvSpec,
  precision: Any,
  preferred_element_type: Any,
  groups_first: bool = False,
) -> jax.Array:
  """``(N, *out, K, C) x (K, C // g, O) -> (N // gb, *out, O)`` as a batched GEMM.

  Contracts the trailing (K, C) axes of ``lhs`` with the leading (K, C//g) axes of
  ``w``. Both kinds of groups are a batch axis of the GEMM: feature groups split C
  (and O), batch groups split N (and O); lax orders both group-major. With
  ``groups_first``, ``lhs`` is ``(g, N, *out, K, C // g)``, its feature groups
  already major (patches of :func:`feature_groups_first`'s input), so the
  GEMM's operand is ``lhs`` itself, not a transposed copy.
  """
  o = spec.out_features
  g, gb = spec.feature_group_count, spec.batch_group_count
  if groups_first:
    _, n, *out, k, cg = lhs.shape
    c = cg * g
  else:
    n, *out, k, c = lhs.shape
  out_dtype = None
  if preferred_element_type is None and accumulator_dtype(lhs.dtype) is not None:
    # 16-bit floats accumulate in float32 and round once: more accurate, and on
    # CPU bfloat16 x bfloat16 -> float32 is XLA's fast GEMM (2-3x float32's).
    preferred_element_type, out_dtype = jnp.float32, lhs.dtype
  if g == 1 and gb == 1:
    y = lax.dot_general(
      lhs,
      w,
      (((lhs.ndim - 2, lhs.ndim - 1), (0, 1)), ((), ())),
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    return y if out_dtype is None else y.astype(out_dtype)
  groups, og, cg = g * gb, o // (g * gb), c // g
  m = (n // gb) * math.prod(out)
  if groups_first:
    lhs = lhs.reshape(groups, m, k * cg)  # a reshape, not a copy
  else:
    lhs = lhs.reshape(gb, n // gb, *out, k, g, cg)
    lhs = jnp.moveaxis(lhs, -2, 0).reshape(groups, m, k * cg)  # (groups, M, K)
  w = jnp.moveaxis(w.reshape(k, cg, groups, og), 2, 0).reshape(groups, k * cg, og)
  y = lax.dot_general(
    lhs,
    w,
    (((2,), (1,)), ((0,), (0,))),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )  # (groups, M, Og)
  y = jnp.moveaxis(y.reshape(groups, n // gb, *out, og), 0, -2)
  y = y.reshape(n // gb, *out, o)
  return y if out_dtype is None else y.astype(out_dtype)


def _im2col_gemm(x, w_tio, spec, precision, preferred_element_type):
  """Patches (padding included), then one (batched) GEMM.

  With feature groups, each group's slice of the input gets its own patch
  matrix (:func:`feature_groups_first`), so the patches never move for the
  batched GEMM (faster than transposed patches: see :mod:`convmm._engine.policy`).
  """
  g = spec.feature_group_count
  if g == 1:
    patches = patches_channels_last(x, spec.geometry)
    return _group_gemm(patches, w_tio, spec, precision, preferred_element_type)
  geometry = dataclasses.replace(spec.geometry, in_features=spec.geometry.in_features // g)
  patches = jax.vmap(lambda xg: patches_channels_last(xg, geometry))(feature_groups_first(x, g))
  return _group_gemm(patches, w_tio, spec, precision, preferred_element_type, groups_first=True)


def _accumulator_dtype(out_dtype: Any) -> Any:
  """float32 for 16-bit floats (as a GEMM accumulates), else the output dtype."""
  acc_dtype = accumulator_dtype(out_dtype)
  return jnp.dtype(out_dtype) if acc_dtype is None else acc_dtype


def _shift_gemm(x, w_tio, spec, precision, preferred_element_type):
  """Shift-and-accumulate: a sum over taps of slice @ kernel tap; no patch matrix.

  Each tap's GEMM and the running sum are in float32 for 16-bit floats (one
  rounding at the end, like one GEMM over all taps), so float16 does not
  overflow in partial sums where a single accumulation would not.
  """
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x.dtype, w_tio.dtype))
  acc_dtype = _accumulator_dtype(out_dtype)
  x_padded = pad_input(x, spec.geometry)
  y = None
  for t, offset in enumerate(tap_offsets(spec.geometry)):
    tap = tap_slice(x_padded, spec.geometry, offset)[..., None, :]  # (N, *out, 1, C)
    term = _group_gemm(tap, w_tio[t : t + 1], spec, precision, acc_dtype)
    y = term if y is None else y + term
  assert y is not None  # every kernel has at least one tap
  return y.astype(out_dtype)


def _depthwise(x, w_tio, spec, precision, preferred_element_type, channels_first=False):
  """One input feature per group: multiply-accumulate over taps (no GEMM needed).

  ``x`` is channels-last ``(N, *spatial, C)``, or ``(N, C, *spatial)`` with
  ``channels_first`` (the output then too): the products are elementwise, so
  either layout is computed as it lies, without transposes.
  """
  del precision  # elementwise products are exact; the sum is in the accumulator
  geometry = spec.geometry
  c, nsp = geometry.in_features, geometry.num_spatial
  mult = spec.out_features // c
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x.dtype, w_tio.dtype))
  acc_dtype = _accumulator_dtype(out_dtype)  # as the GEMM would
  x_padded = pad_input(x.astype(acc_dtype), geometry, channels_first)
  # o = c * mult + j; unit axes broadcast each tap's (C, mult) weights over the
  # batch and the output positions without relying on implicit rank promotion.
  w_shape = (1, c, mult, *(1,) * nsp) if channels_first else (*(1,) * (1 + nsp), c, mult)
  w = w_tio.reshape(geometry.num_taps, *w_shape).astype(acc_dtype)
  y = None
  for t, offset in enumerate(tap_offsets(geometry)):
    x_t = tap_slice(x_padded, geometry, offset, channels_first)
    term = (x_t[:, :, None] if channels_first else x_t[..., None]) * w[t]
    y = term if y is None else y + term
  assert y is not None  # every kernel has at least one tap
  if channels_first:  # (N, C, mult, *out)
    return y.reshape(y.shape[0], c * mult, *y.shape[3:]).astype(out_dtype)
  return y.reshape(*y.shape[:-2], c * mult).astype(out_dtype)


def unfused(fn, *args):
  """``fn(*args)`` as both branches of a ``lax.cond``: a computation XLA fuses with nothing.

  XLA's CPU fusion otherwise merges an elementwise multiply-accumulate into its
  consumers, which recompute it once per element they read (the next depthwise
  convolution's taps: a stack of 12 depthwise convolutions of a (4, 512, 1024)
  input ran 230-250 ms forward, 9-16 ms guarded), or a transpose into a loop
  that reads it once per step. ``lax.optimization_barrier`` does not help: XLA
  removes it before fusion. The branches are identical, so the predicate never
  changes the result: one word of ``lax.rng_bit_generator`` on a constant key,
  which XLA does not fold and which depends on no operand (``vmap`` keeps one
  branch, ``linear_transpose`` sees nothing nonlinear).
  """
  if any(getattr(a, "size", 1) == 0 for a in args):
    return fn(*args)
  _, bits = lax.rng_bit_generator(jnp.zeros((4,), jnp.uint32), (1,), dtype=jnp.uint32)
  return lax.cond(bits[0] % 2 == 0, fn, fn, *args)


def depthwise_multiply_accumulate(x, w_tio, spec, preferred_element_type, channels_first=False):
  """The depthwise kernel, channels-last or on ``(N, C, *spatial)`` operands."""
  return _depthwise(x, w_tio, spec, None, preferred_element_type, channels_first)


_COMPUTE = {"im2col": _im2col_gemm, "shift": _shift_gemm, "depthwise": _depthwise}


def conv_channels_last(
  x_cl: jax.Array,
  w_tio: jax.Array,
  spec: ConvSpec,
  precision: Any,
  preferred_element_type: Any,
  method: str = "auto",
  memory_budget: int | None = None,
) -> jax.Array:
  """The convolution on canonical channels-last operands.

  Args:
    x_cl: input ``(N, *spatial, C)``.
    w_tio: kernel ``(T, C // feature_group_count, O)``, taps in row-major order.
    spec: the validated convolution.
    method: 'im2col' (patches + one GEMM), 'shift' (sum of per-tap GEMMs),
      'depthwise' (multiply-accumulate) or 'auto'. im2col is tiled over the
      batch, then output rows, beyond the memory budget; shift and depthwise
      build no patches and are not tiled.

  Returns:
    ``(N // batch_group_count, *out_spatial, O)``.
  """
  out_dtype = preferred_element_type or jnp.result_type(x_cl.dtype, w_tio.dtype)
  if any(d > 1 for d in spec.geometry.lhs_dilation):  # never multiply the dilation's holes
    return phase_conv(
      lambda x, w, s: conv_channels_last(
        x, w, s, precision, preferred_element_type, method, memory_budget
      ),
      x_cl,
      w_tio,
      spec,
      out_dtype,
    )
  method = choose_method(spec, method)
  compute = functools.partial(
    _COMPUTE[method],
    w_tio=w_tio,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if method != "im2col":  # builds no patches: nothing to tile
    return compute(x_cl, spec=spec)
  return tile_conv(lambda x, s: compute(x, spec=s), x_cl, spec, out_dtype, memory_budget)
