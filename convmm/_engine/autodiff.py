"""The im2col and depthwise convolutions as a JAX primitive with hand-written derivatives.

Autodiff through im2col works, but what it produces is not what a convolution
wants: the backward pass keeps the patch matrix alive from the forward pass,
scatters the input gradient back with one pad per kernel tap (col2im), and
computes the kernel gradient as ``patches^T @ cotangent``, which XLA's CPU
backend can only hand to its fast GEMM after transposing the whole patch matrix.

``conv_p`` is bilinear, like ``lax.conv_general_dilated_p``: its JVP is the same
convolution of the tangents (so forward mode, ``jacfwd`` and ``hessian`` work),
and its two transposes are

* the input gradient: for unit strides, the convolution of the cotangent with
  the flipped, I/O-swapped kernel (lax's ``_conv_general_dilated_transpose_lhs``,
  itself an im2col + GEMM through ``conv_p``, or the same product with the
  patches' taps reversed and the kernel read unflipped, :func:`input_grad_gemm`);
  for strided convolutions, where that would multiply the zeros inserted between
  cotangent entries, ``cotangent @ kernel^T`` summed back into place (col2im);
* the kernel gradient: one GEMM ``patches^T @ cotangent`` with the patches of the
  input or, for unit strides without groups, ``x^T @`` the input gradient's own
  patches of the cotangent (:func:`kernel_grad_from_cotangent_patches`).

Where several of these are correct, :mod:`convmm._engine.policy` chooses (and
whether a direction is XLA's convolution instead, :mod:`convmm._engine.native`),
with the measurements; the rules here say what each form is.

The depthwise multiply-accumulate (``method='depthwise'``) has its own: the
input gradient of a unit-stride one without a channel multiplier is again the
flipped kernel's depthwise convolution, otherwise the multiply-accumulate's
linear transpose; the kernel gradient is a loop of per-tap sums
(:func:`depthwise_kernel_grad`).

All are linear in the cotangent and differentiable in the other operand, so
derivatives of any order compose. Operands are canonical: input ``(N, *spatial,
C)``, kernel ``(*window, C // groups, O)``, output ``(N // batch_groups, *out, O)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from convmm._engine import blocks as _blocks
from convmm._engine import native, policy
from convmm._engine.budget import budget_or_current
from convmm._engine.chunks import map_batch_chunks
from convmm._engine.gradients import (
  depthwise_kernel_grad,
  grad_batch_chunk,
  input_grad_col2im,
  input_grad_gemm,
  input_grad_spec,
  kernel_grad,
  kernel_grad_from_cotangent_patches,
  split_axis,
)
from convmm._engine.kernels import conv_channels_last
from convmm._engine.plans import TilePlan, plan_for, tile_cost
from convmm._engine.policy import CONVMM
from convmm._engine.sharding import conv_out_sharding, unknown_split
from convmm._engine.tiling import tile_conv, tiled_sum
from convmm._rules.shapes import ConvSpec, accumulator_dtype, channels_last_spec, conv_spec


def _forward(x, w, *, spec, precision, preferred_element_type, method, memory_budget, directions):
  if directions[0] == "xla":
    return native.forward(x, w, spec, precision, preferred_element_type)
  w_tio = w.reshape(spec.geometry.num_taps, *w.shape[-2:])
  return conv_channels_last(
    x, w_tio, spec, precision, preferred_element_type, method, memory_budget
  )


conv_p = Primitive("convmm_conv")
conv_p.def_impl(
  jax.jit(
    _forward,
    static_argnames=(
      "spec",
      "precision",
      "preferred_element_type",
      "method",
      "memory_budget",
      "directions",
    ),
  )
)
mlir.register_lowering(conv_p, mlir.lower_fun(_forward, multiple_results=False))


def _out_shape_dtype(spec: ConvSpec, dtype: Any, preferred_element_type: Any) -> tuple[Any, Any]:
  """The output's shape and dtype for an input of ``dtype`` (one rule for every caller)."""
  shape = (spec.out_batch, *spec.geometry.out_spatial, spec.out_features)
  return shape, dtype if preferred_element_type is None else preferred_element_type


def _abstract_eval(x, w, *, spec, preferred_element_type, **_):
  shape, dtype = _out_shape_dtype(spec, x.dtype, preferred_element_type)
  sharding = conv_out_sharding(x, w, shape)
  return x.update(shape=shape, dtype=dtype, weak_type=False, sharding=sharding)


conv_p.def_abstract_eval(_abstract_eval)


def conv(x: jax.Array, w: jax.Array, spec: ConvSpec, **params: Any) -> jax.Array:
  """The convolution of canonical operands as one ``conv_p`` call.

  Args:
    x: input ``(N, *spatial, C)``.
    w: kernel ``(*window, C // feature_group_count, O)``.
    spec: the validated convolution (any dimension numbers; made canonical).
    **params: ``precision`` and ``preferred_element_type`` (passed to the GEMM),
      ``method`` (the forward method, see :func:`convmm.conv_general_dilated`) and
      ``memory_budget`` (the tile budget in bytes; None: the default at trace time),
      ``directions`` ('convmm' or 'xla' for each direction, see ``directions.py``).

  Returns:
    ``(N // batch_group_count, *out_spatial, O)``.
  """
  precision, preferred_element_type = params["precision"], params["preferred_element_type"]
  if preferred_element_type is not None:
    preferred_element_type = np.dtype(preferred_element_type)
  if isinstance(precision, list):
    precision = tuple(precision)
  return conv_p.bind(
    x,
    w,
    spec=channels_last_spec(spec),
    precision=precision,
    preferred_element_type=preferred_element_type,
    method=params["method"],
    memory_budget=params["memory_budget"],
    directions=tuple(params["directions"]),
  )


def _rebind(x, w, spec, params):
  return conv_p.bind(x, w, **{**params, "spec": spec})


# ------------------------------------------------------------------ transposes


def _input_grad_dtype(spec: ConvSpec, ct_dtype: Any) -> Any:
  """The dtype a unit-stride input gradient's GEMM (and its tiling) produces."""
  acc_dtype = accumulator_dtype(ct_dtype) if policy.input_grad_reverses_taps(spec) else None
  return acc_dtype or ct_dtype


def _input_grad_conv(ct, w, spec, params):
  """Input gradient as lax computes it: conv(ct, flip(w)^T, lhs_dilation=strides)."""
  nsp = spec.geometry.num_spatial
  groups = spec.feature_group_count * spec.batch_group_count
  t_spec = input_grad_spec(spec, ct.shape, w.shape)
  if policy.input_grad_reverses_taps(spec):
    w_cto = jnp.moveaxis(w.reshape(-1, *w.shape[-2:]), 1, 0).reshape(w.shape[-2], -1)
    acc_dtype = accumulator_dtype(ct.dtype)
    return tile_conv(
      lambda c, s: input_grad_gemm(c, w_cto, s, params["precision"], acc_dtype),
      ct,
      t_spec,
      _input_grad_dtype(spec, ct.dtype),
      params["memory_budget"],
    )
  # (*k, cg, O) with O group-major -> (*k, og, groups * cg): the groups move from
  # the kernel's output features into its (new) output features.
  w = split_axis(w, nsp + 1, groups)  # (*k, cg, G, og)
  w = jnp.moveaxis(w, nsp + 1, nsp)  # (*k, G, cg, og)
  w = w.reshape(*w.shape[:nsp], -1, w.shape[-1])
  w = jnp.swapaxes(jnp.flip(w, tuple(range(nsp))), nsp, nsp + 1)  # (*k, og, G*cg)
  dx = _rebind(ct, w, t_spec, params)  # (N', *in, G*cg)
  if spec.batch_group_count > 1:  # the groups go back into the batch, group-major
    dx = split_axis(dx, nsp + 1, spec.batch_group_count)
    dx = jnp.moveaxis(dx, nsp + 1, 0)
    dx = dx.reshape(-1, *dx.shape[2:])
  return dx


def _cotangent_patches_plan(
  spec: ConvSpec, ct: jax.Array, x_plan: TilePlan | None, params
) -> tuple[ConvSpec, TilePlan] | None:
  """The input gradient's spec and tiling when the kernel gradient uses its cotangent patches.

  For a unit-stride convolution without groups or input dilation, the kernel
  gradient is also ``x^T @`` the input gradient's own patches of the cotangent
  (:func:`kernel_grad_from_cotangent_patches`). Tiled, it walks the input
  gradient's tiles (the same plan, so both loops unfold the same tiles of the
  cotangent), each tile's ``x`` against that tile's cotangent patches. Whether it
  does is the policy's choice
  (:func:`convmm._engine.policy.kernel_grad_uses_cotangent_patches`, given whether
  the input gradient's plan and the kernel gradient's own ``x_plan`` are tiled);
  None where it does not, and for the convolutions this form does not compute.
  """
  g = spec.geometry
  if (
    params["method"] != "im2col"
    or spec.feature_group_count * spec.batch_group_count > 1
    or any(s > 1 for s in g.window_strides)
    or any(d > 1 for d in g.lhs_dilation)
  ):
    return None
  t_spec = input_grad_spec(spec, ct.shape, (*g.filter_shape, g.in_features, spec.out_features))
  itemsize = jnp.dtype(_input_grad_dtype(spec, ct.dtype)).itemsize
  t_plan = plan_for(t_spec, ct, params["memory_budget"], policy.FORWARD_PATCH_COPIES, itemsize)
  kernel_grad_tiled = x_plan is not None and not x_plan.is_whole(g.batch)
  if policy.kernel_grad_uses_cotangent_patches(spec, t_plan.is_whole(len(ct)), kernel_grad_tiled):
    return t_spec, t_plan
  return None


def _wider_grad_blocks(spec: ConvSpec, ct: jax.Array, w: jax.Array, params) -> tuple[int, ...]:
  """Blocks of the forward when its input gradient would be tiled but cannot be blocked.

  A unit-stride conv padded by less than ``k_eff - 1`` (e.g. ``VALID``) has an
  input gradient with more outputs than inputs, which :mod:`convmm._engine.blocks` does
  not cut into blocks; with several devices (an Auto mesh) it is computed per
  block of the forward instead (:func:`convmm._engine.blocks.input_grad`). () otherwise,
  and for a depthwise conv, whose input gradient is never tiled.
  """
  devices = unknown_split(ct)
  if devices < 2 or params["method"] != "im2col":
    return ()
  forward = _blocks.spatial_blocks(spec, devices)
  t_spec = input_grad_spec(spec, ct.shape, w.shape)
  if not any(f > 1 and t == 1 for f, t in zip(forward, _blocks.spatial_blocks(t_spec, devices))):
    return ()
  size = ct.dtype.itemsize
  whole = tile_cost(
    t_spec, size, ct.shape[0], t_spec.geometry.out_spatial, policy.FORWARD_PATCH_COPIES, size
  )
  return forward if whole > budget_or_current(params["memory_budget"]) else ()


def _lhs_rule(ct, x, w, **params):
  spec, precision = params["spec"], params["precision"]
  x_aval = x.aval
  if params["directions"][1] == "xla":
    return native.input_grad(ct, x_aval, w, spec, precision, params["preferred_element_type"])
  # convmm's input gradient: the convolutions it binds (the cotangent's) are convmm's too.
  params = {**params, "directions": CONVMM}
  unit_strides = all(s == 1 for s in spec.geometry.window_strides)
  multiplier = spec.out_features != spec.geometry.in_features
  if params["method"] == "depthwise" and (multiplier or not unit_strides):
    # Strides or a channel multiplier: the multiply-accumulate's own transpose,
    # one (interior-)padded product of the cotangent per tap, summed.
    primal = jax.ShapeDtypeStruct(x_aval.shape, x_aval.dtype, sharding=x_aval.sharding)
    (dx,) = jax.linear_transpose(lambda x: _forward(x, w, **params), primal)(ct)
    return dx
  if ct.dtype != w.dtype:
    w = w.astype(ct.dtype)
  if ct.size == 0 or math.prod(x_aval.shape) == 0:
    return jnp.zeros(x_aval.shape, x_aval.dtype)
  acc_dtype = accumulator_dtype(ct.dtype)
  if unit_strides:
    # (A depthwise conv gets here without a channel multiplier: the flipped
    # kernel's convolution is depthwise too, one fused multiply-accumulate.)
    unit = {**params, "preferred_element_type": None}
    if blocks := _wider_grad_blocks(spec, ct, w, params):
      grad = lambda c, s: _input_grad_conv(c, w, s, unit)  # noqa: E731
      dx = _blocks.input_grad(ct, spec, blocks, grad)
    else:
      dx = _input_grad_conv(ct, w, spec, unit)
  elif (
    spec.batch_group_count > 1
    or (chunk := grad_batch_chunk(spec, ct, ct.dtype.itemsize, params["memory_budget"]))
    >= spec.geometry.batch
  ):
    dx = input_grad_col2im(ct, w, spec, precision, acc_dtype)
  else:
    dx = map_batch_chunks(
      lambda c, s: input_grad_col2im(c, w, s, precision, acc_dtype),
      [ct],
      chunk,
      reduce=False,
      spec=spec,
    )
  return dx.astype(x_aval.dtype)


def _rhs_rule(ct, x, w, **params):
  spec, precision = params["spec"], params["precision"]
  w_aval = w.aval
  if params["directions"][2] == "xla":
    return native.kernel_grad(ct, x, w_aval, spec, precision, params["preferred_element_type"])
  if ct.dtype != x.dtype:
    x = x.astype(ct.dtype)
  if ct.size == 0 or x.size == 0:
    return jnp.zeros(w_aval.shape, w_aval.dtype)
  acc_dtype = accumulator_dtype(ct.dtype)
  if params["method"] == "depthwise":
    return depthwise_kernel_grad(x, ct, spec, acc_dtype).astype(w_aval.dtype)
  budget = params["memory_budget"]
  unit_dilation = all(d == 1 for d in spec.geometry.lhs_dilation)
  # Tiles like the forward's (output rows, then batch chunks), summed.
  copies = policy.KERNEL_GRAD_PATCH_COPIES
  plan = plan_for(spec, x, budget, copies, ct.dtype.itemsize) if unit_dilation else None
  if (ct_patches := _cotangent_patches_plan(spec, ct, plan, params)) is not None:
    t_spec, t_plan = ct_patches
    grad_ct = functools.partial(
      kernel_grad_from_cotangent_patches,
      spec=spec,
      reverse_taps=policy.input_grad_reverses_taps(spec),
      precision=precision,
      acc_dtype=acc_dtype,
    )
    # The input gradient's tiles: ct is their input, x has their output's shape.
    dw = tiled_sum(lambda c, xt, s: grad_ct(xt, c, t_spec=s), ct, x, t_spec, t_plan)
    return dw.astype(w_aval.dtype)
  # Where neither this gradient nor the forward is tiled, both build the same
  # channels-last patches (which XLA computes once).
  shared = (
    plan is not None
    and plan.is_whole(len(x))
    and plan_for(spec, x, budget, policy.FORWARD_PATCH_COPIES, ct.dtype.itemsize).is_whole(len(x))
  )
  taps_first = policy.kernel_grad_taps_first(shared)
  grad_w = lambda xc, cc, s: kernel_grad(xc, cc, s, precision, acc_dtype, taps_first)  # noqa: E731
  if spec.batch_group_count > 1:
    dw = grad_w(x, ct, spec)
  elif plan is not None:
    dw = tiled_sum(grad_w, x, ct, spec, plan)
  elif (chunk := grad_batch_chunk(spec, x, ct.dtype.itemsize, budget)) < len(x):
    dw = map_batch_chunks(grad_w, [x, ct], chunk, reduce=True, spec=spec)
  else:
    dw = grad_w(x, ct, spec)
  return dw.astype(w_aval.dtype)


ad.defbilinear(conv_p, _lhs_rule, _rhs_rule)


# -------------------------------------------------------------------- batching


def _batch_rule(args, dims, **params):
  x, w = args
  xd, wd = dims
  spec: ConvSpec = params["spec"]
  g = spec.geometry
  nsp = g.num_spatial
  fg, bg = spec.feature_group_count, spec.batch_group_count
  if (x.shape[xd] if xd is not None else w.shape[wd]) == 0:  # an empty map: no groups of 0
    shape, dtype = _out_shape_dtype(spec, x.dtype, params["preferred_element_type"])
    return jnp.zeros((0, *shape), dtype), 0
  if xd is not None and wd is None:
    x = jnp.moveaxis(x, xd, 0)  # (B, N, *sp, C)
    b = x.shape[0]
    if bg > 1:  # keep the batch groups major: (B, G, n) -> (G, B, n)
      x = jnp.swapaxes(split_axis(x, 1, bg), 0, 1)
    x = x.reshape(-1, *x.shape[2 if bg == 1 else 3 :])
    y = _rebind(x, w, _respec(spec, x.shape, w.shape, fg, bg), params)
    return y.reshape(b, -1, *y.shape[1:]), 0
  if xd is None:
    w = jnp.moveaxis(w, wd, nsp + 1)  # (*k, I, B, O)
    b = w.shape[nsp + 1]
    w = split_axis(w, nsp + 2, fg * bg)  # (*k, I, B, G, og)
    w = jnp.swapaxes(w, nsp + 1, nsp + 2)  # (*k, I, G, B, og)
    w = w.reshape(*w.shape[: nsp + 1], -1)
    y = _rebind(x, w, _respec(spec, x.shape, w.shape, fg, bg), params)
    y = y.reshape(*y.shape[:-1], fg * bg, b, -1)  # (..., G, B, og)
    y = jnp.moveaxis(y, -2, 0)
    return y.reshape(*y.shape[:-2], -1), 0
  if bg > 1:
    return jax.vmap(functools.partial(_forward, **params), (xd, wd))(x, w), 0
  # Both mapped: the map becomes the outermost feature group.
  x = jnp.moveaxis(jnp.moveaxis(x, xd, 0), 0, -2)  # (N, *sp, B, C)
  b = x.shape[-2]
  x = x.reshape(*x.shape[:-2], -1)
  w = jnp.moveaxis(w, wd, nsp + 1)  # (*k, I, B, O)
  w = w.reshape(*w.shape[: nsp + 1], -1)
  y = _rebind(x, w, _respec(spec, x.shape, w.shape, fg * b, 1), params)
  y = y.reshape(*y.shape[:-1], b, -1)
  return jnp.moveaxis(y, -2, 0), 0


def _respec(spec, x_shape, w_shape, fg, bg):
  g = spec.geometry
  return conv_spec(
    "conv_general_dilated",
    x_shape,
    w_shape,
    g.window_strides,
    g.padding,
    g.lhs_dilation,
    g.rhs_dilation,
    g.dimension_numbers,
    fg,
    bg,
  )


batching.primitive_batchers[conv_p] = _batch_rule
