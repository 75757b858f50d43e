"""replace_convs: a JAX transformation that computes a function's convolutions with convmm.

A custom interpreter (JAX's "Writing custom interpreters" guide): the jaxpr of
the function is evaluated equation by equation, every primitive bound as it is
except ``conv_general_dilated``, which becomes :func:`convmm.conv_general_dilated`
with the equation's parameters. Primitives carrying jaxprs (jit, scan, cond,
remat, custom_jvp/vjp, shard_map, ...) are re-bound with their jaxprs rewritten.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import numpy as np
from jax import lax

from convmm._conv import check_method, conv_general_dilated
from convmm._jax_internals import (
  ad_checkpoint,
  check,
  compute_on,
  conditionals,
  core,
  custom_batching,
  custom_derivatives,
  lax_eval_jaxpr,
  lax_internal,
  loops,
  lu,
  pe,
  pjit,
  shard_map,
  solves,
  source_info_util,
  tree_util,
)

_CONV = lax.conv_general_dilated_p
# The parameters of lax's conv primitive that `where` receives (and convmm takes).
_CONV_PARAMS = tuple(
  "window_strides padding lhs_dilation rhs_dilation dimension_numbers feature_group_count "
  "batch_group_count precision preferred_element_type".split()
)


@dataclasses.dataclass(frozen=True)
class _Config:
  method: str | None
  memory_budget: int | None
  where: Callable[[dict[str, Any]], bool] | None


def replace_convs(
  fn: Callable[..., Any],
  *,
  method: str | None = None,
  memory_budget: int | None = None,
  where: Callable[[dict[str, Any]], bool] | None = None,
) -> Callable[..., Any]:
  """Returns ``fn`` with every XLA convolution computed by convmm.

  Works on any JAX function (Flax, nnx, Equinox, Haiku, plain jax). ``fn`` is
  traced to a jaxpr and re-evaluated with each ``lax.conv_general_dilated``
  primitive replaced by :func:`convmm.conv_general_dilated` with the same
  parameters, including the convolutions inside ``jit``, ``scan``,
  ``while_loop``, ``cond``, ``checkpoint``, ``custom_jvp``/``custom_vjp``/
  ``custom_vmap`` (and their rules), ``shard_map``, ``custom_linear_solve`` and
  ``lax.composite``. The convolutions that autodiff creates are
  replaced too when ``fn`` is a gradient: ``replace_convs(jax.grad(f))``. The
  result composes with ``jit``, ``grad``, ``vjp``, ``jvp`` and ``vmap``.

  Array leaves of the arguments (``jax.Array``, NumPy arrays and scalars) are
  traced; other leaves are passed to ``fn`` as constants (as
  ``equinox.filter_jit`` does). ``fn`` is traced on each call, so call the result
  under ``jax.jit`` as you would call ``fn``. For training prefer
  ``jax.grad(replace_convs(f))``, whose gradients are convmm's own.

  Args:
    fn: the function to transform; positional and keyword arguments and
      outputs may be pytrees.
    method, memory_budget: passed to :func:`convmm.conv_general_dilated` for
      every replaced convolution (None: the defaults in force when traced). With
      'auto', some directions may stay XLA's convolution by convmm's rule table;
      'convmm' leaves none.
    where: optional predicate choosing the convolutions to replace, called once
      per convolution with a dict of its parameters (the keys of lax's
      primitive, ``window_strides`` ... ``preferred_element_type``, plus
      ``lhs_shape``, ``rhs_shape`` and ``dtype``); False keeps it XLA's.

  Returns:
    A function with ``fn``'s signature and results.

  Raises:
    TypeError: ``fn`` or ``where`` is not callable, ``where`` returns a
      non-bool, or ``method`` is not a string.
    ValueError: unknown ``method``, bad ``memory_budget``, or ``where`` raised
      (the original exception is chained).
    NotImplementedError: a primitive carrying a jaxpr with a convolution that
      replace_convs cannot rewrite (named in the message).
    ImportError: this jax lacks a JAX internal replace_convs needs (all named,
      with the tested jax), raised before ``fn`` is traced.

  Example:
    >>> import jax, jax.numpy as jnp, convmm
    >>> from jax import lax
    >>> def f(x, w):
    ...   return lax.conv_general_dilated(x, w, (1, 1), 'SAME')
    >>> x, w = jnp.ones((2, 3, 8, 8)), jnp.ones((16, 3, 3, 3))
    >>> g = convmm.replace_convs(f)
    >>> g(x, w).shape
    (2, 16, 8, 8)
    >>> 'conv_general_dilated' in str(jax.make_jaxpr(g)(x, w))
    False
  """
  name = "replace_convs"
  check(name)
  if not callable(fn):
    raise TypeError(f"{name}: `fn` must be callable, got {type(fn).__name__} {fn!r}")
  if where is not None and not callable(where):
    raise TypeError(
      f"{name}: `where` must be None or a callable taking a dict of conv parameters, "
      f"got {type(where).__name__} {where!r}"
    )
  check_method(name, method, memory_budget)  # None stays None: the default when traced
  config = _Config(method, memory_budget, where)

  @functools.wraps(fn)
  def replaced(*args, **kwargs):
    return _call_replaced(fn, args, kwargs, config)

  return replaced


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, core.Tracer))


def _call_replaced(
  fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], config: _Config
) -> Any:
  """``fn(*args, **kwargs)``, traced and evaluated by the interpreter.

  Non-array leaves in and out are constants of the trace (this also carries
  autodiff's symbolic zeros through a custom_vjp's backward rule).
  """
  leaves, in_tree = jax.tree.flatten((tuple(args), kwargs))
  is_dynamic = [_is_array(x) for x in leaves]
  dynamic = [x for x, d in zip(leaves, is_dynamic) if d]
  out_parts = {}

  def flat_fn(*dynamic_leaves):
    it = iter(dynamic_leaves)
    a, k = jax.tree.unflatten(in_tree, [next(it) if d else x for x, d in zip(leaves, is_dynamic)])
    out_leaves, out_tree = jax.tree.flatten(fn(*a, **k))
    out_dynamic = [_is_array(x) for x in out_leaves]
    out_parts.update(tree=out_tree, leaves=out_leaves, dynamic=out_dynamic)
    return [x for x, d in zip(out_leaves, out_dynamic) if d]

  closed = jax.make_jaxpr(flat_fn)(*dynamic)
  dynamic = [
    x
    if isinstance(x, (jax.Array, core.Tracer))
    else lax_internal._convert_element_type(x, aval.dtype, aval.weak_type)
    for x, aval in zip(dynamic, closed.in_avals)
  ]
  it = iter(_eval_jaxpr(closed.jaxpr, closed.consts, dynamic, config))
  outs = [next(it) if d else x for x, d in zip(out_parts["leaves"], out_parts["dynamic"])]
  return jax.tree.unflatten(out_parts["tree"], outs)


def _eval_jaxpr(
  jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], config: _Config
) -> list[Any]:
  """``core.eval_jaxpr`` with the rewrite of :func:`_eval_eqn` for each equation."""
  env: dict[core.Var, Any] = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with (
      source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
      eqn.ctx.manager,
    ):
      outs = _eval_eqn(eqn, [read(v) for v in eqn.invars], config)
    env.update(zip(eqn.outvars, list(outs) if eqn.primitive.multiple_results else [outs]))
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn: core.JaxprEqn, invals: Sequence[Any], params: dict[str, Any] | None = None) -> Any:
  params = eqn.params if params is None else params
  return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))


def _eval_eqn(eqn: core.JaxprEqn, invals: Sequence[Any], config: _Config) -> Any:
  prim = eqn.primitive
  if prim is _CONV:
    return _conv(eqn, invals, config)
  rule = _rules().get(prim)
  if rule is not None:
    return rule(eqn, invals, config)
  if any(_has_conv(j, opaque=False) for j in core.jaxprs_in_params(eqn.params)):
    raise NotImplementedError(
      f"replace_convs: primitive `{prim.name}` carries a jaxpr containing a convolution, "
      f"and replace_convs does not know how to rewrite `{prim.name}`; the convolution would "
      f"stay XLA's. Handled primitives: {sorted(p.name for p in _rules())}"
    )
  return _bind(eqn, invals)


def _has_conv(jaxpr: core.Jaxpr, opaque: bool = True) -> bool:
  """Whether ``jaxpr`` computes a convolution; with ``opaque``, also whether it may (the
  rules of custom_jvp/vjp/vmap are Python functions whose convolutions cannot be seen)."""
  return any(
    eqn.primitive is _CONV
    or (opaque and eqn.primitive in _opaque_rules())
    or any(_has_conv(j, opaque) for j in core.jaxprs_in_params(eqn.params))
    for eqn in jaxpr.eqns
  )


def _conv(eqn: core.JaxprEqn, invals: Sequence[Any], config: _Config):
  lhs, rhs = invals
  params = eqn.params
  if config.where is not None and not _where(config.where, eqn):
    return _bind(eqn, invals)
  kwargs = {k: params[k] for k in _CONV_PARAMS}
  out = conv_general_dilated(
    lhs, rhs, **kwargs, out_sharding=params.get("out_sharding"), method=config.method,
    memory_budget=config.memory_budget,
  )  # fmt: skip
  aval = _shaped(eqn.outvars[0])  # lax's output type, which convmm's must be
  assert (out.dtype, out.shape) == (aval.dtype, aval.shape), (out.dtype, out.shape, aval)
  return lax_internal._convert_element_type(out, aval.dtype, aval.weak_type)


def _shaped(v: core.Atom) -> core.ShapedArray:
  return cast(core.ShapedArray, v.aval)


def _where(where: Callable[[dict[str, Any]], bool], eqn: core.JaxprEqn) -> bool:
  lhs_aval, rhs_aval = (_shaped(v) for v in eqn.invars)
  info = {k: eqn.params[k] for k in _CONV_PARAMS}
  info.update(lhs_shape=lhs_aval.shape, rhs_shape=rhs_aval.shape, dtype=lhs_aval.dtype)
  try:
    keep = where(info)
  except Exception as e:
    raise ValueError(
      f"replace_convs: `where` raised {type(e).__name__}: {e} for the convolution with "
      f"lhs_shape={lhs_aval.shape}, rhs_shape={rhs_aval.shape}"
    ) from e
  if not isinstance(keep, (bool, np.bool_)):
    raise TypeError(
      f"replace_convs: `where` must return a bool, got {type(keep).__name__} {keep!r} for "
      f"lhs_shape={lhs_aval.shape}, rhs_shape={rhs_aval.shape}"
    )
  return bool(keep)


def _rewrite(jaxpr: core.Jaxpr, consts: Sequence[Any], config: _Config) -> core.ClosedJaxpr:
  """The jaxpr of ``_eval_jaxpr(jaxpr, consts, ...)``: same inputs and outputs."""
  fun = lu.wrap_init(
    lambda *args: _eval_jaxpr(jaxpr, consts, args, config), debug_info=jaxpr.debug_info
  )
  new_jaxpr, _, new_consts = pe.trace_to_jaxpr_dynamic(fun, [v.aval for v in jaxpr.invars])
  return core.ClosedJaxpr(new_jaxpr, new_consts)


def _rewrite_closed(closed: core.ClosedJaxpr, config: _Config) -> core.ClosedJaxpr:
  return _rewrite(closed.jaxpr, closed.consts, config)


def _rewrite_param(value: Any, config: _Config) -> Any:
  if isinstance(value, core.ClosedJaxpr):
    return _rewrite_closed(value, config) if _has_conv(value.jaxpr) else value
  if isinstance(value, tuple):  # cond's branches, custom_linear_solve's namedtuple
    new = [_rewrite_param(v, config) for v in value]
    return type(value)(*new) if hasattr(value, "_fields") else type(value)(new)
  return value


def _closed_jaxpr_params(eqn, invals, config):
  """Primitives whose jaxprs are ClosedJaxprs that may simply be swapped for rewritten ones."""
  params = {k: _rewrite_param(v, config) for k, v in eqn.params.items()}
  return _bind(eqn, invals, params)


def _remat(eqn, invals, config):
  """checkpoint carries an open jaxpr: new constants become leading operands."""
  if not _has_conv(eqn.params["jaxpr"]):
    return _bind(eqn, invals)
  new = _rewrite(eqn.params["jaxpr"], (), config)
  params = dict(eqn.params, jaxpr=pe.convert_constvars_jaxpr(new.jaxpr))
  return _bind(eqn, [*new.consts, *invals], params)


def _shard_map(eqn, invals, config):
  """shard_map is re-bound with the interpreter as its body, as JAX's own eval does."""
  params = dict(eqn.params)
  jaxpr, out_specs = params.pop("jaxpr"), params.pop("out_specs")

  def body(*args):
    return tree_util.FlatTree.flatten(_eval_jaxpr(jaxpr, (), args, config)).with_aux(out_specs)

  return eqn.primitive.bind(*invals, subfuns=(body,), debug_info=jaxpr.debug_info, **params)


def _memoized(thunk: lu.WrappedFun, rewrite: Callable[..., Any]) -> lu.WrappedFun:
  """``rewrite(thunk(*zeros))`` once per zero pattern, as a WrappedFun."""
  cache: dict[tuple[Any, ...], Any] = {}

  def wrapped(*zeros):
    if zeros not in cache:
      cache[zeros] = rewrite(*thunk.call_wrapped(*zeros))
    return cache[zeros]

  return lu.wrap_init(wrapped, debug_info=thunk.debug_info)


def _custom_jvp(eqn, invals, config):
  """The primal jaxpr and the lazily traced JVP rule are both rewritten."""

  def rewrite_jvp(jvp_jaxpr, jvp_consts, out_zeros):
    new = _rewrite(jvp_jaxpr, jvp_consts, config)
    return new.jaxpr, new.consts, out_zeros

  params = dict(
    eqn.params,
    call_jaxpr=_rewrite_closed(eqn.params["call_jaxpr"], config),
    jvp_jaxpr_fun=_memoized(eqn.params["jvp_jaxpr_fun"], rewrite_jvp),
  )
  return _bind(eqn, invals, params)


def _custom_vjp(eqn, invals, config):
  """The primal and forward jaxprs are rewritten; the backward rule is run replaced."""

  def rewrite_fwd(fwd_jaxpr, fwd_consts):
    new = _rewrite(fwd_jaxpr, fwd_consts, config)
    return new.jaxpr, new.consts

  bwd = eqn.params["bwd"]
  new_bwd = lu.wrap_init(
    lambda *args: _call_replaced(bwd.call_wrapped, args, {}, config), debug_info=bwd.debug_info
  )
  params = dict(
    eqn.params,
    call_jaxpr=_rewrite_closed(eqn.params["call_jaxpr"], config),
    fwd_jaxpr_thunk=_memoized(eqn.params["fwd_jaxpr_thunk"], rewrite_fwd),
    bwd=new_bwd,
  )
  return _bind(eqn, invals, params)


def _custom_vmap(eqn, invals, config):
  """The primal jaxpr is rewritten; the batching rule is run replaced."""
  rule = eqn.params["rule"]

  def new_rule(axis_size, in_batched, *args):
    return _call_replaced(rule, (axis_size, in_batched, *args), {}, config)

  params = dict(eqn.params, call=_rewrite_closed(eqn.params["call"], config), rule=new_rule)
  return _bind(eqn, invals, params)


@functools.cache
def _rules() -> dict[core.Primitive, Callable[..., Any]]:
  # Built on first use, after check(): on another jax these attributes may not exist.
  return {
    pjit.jit_p: _closed_jaxpr_params,
    core.closed_call_p: _closed_jaxpr_params,
    loops.scan_p: _closed_jaxpr_params,
    loops.while_p: _closed_jaxpr_params,
    conditionals.cond_p: _closed_jaxpr_params,
    solves.linear_solve_p: _closed_jaxpr_params,
    compute_on.compute_on_p: _closed_jaxpr_params,
    lax_eval_jaxpr.eval_jaxpr_p: _closed_jaxpr_params,
    lax_internal.composite_p: _closed_jaxpr_params,
    ad_checkpoint.remat_p: _remat,
    shard_map.shard_map_p: _shard_map,
    custom_derivatives.custom_jvp_call_p: _custom_jvp,
    custom_derivatives.custom_vjp_call_p: _custom_vjp,
    custom_batching.custom_vmap_p: _custom_vmap,
  }


@functools.cache
def _opaque_rules() -> tuple[core.Primitive, ...]:
  return (
    custom_derivatives.custom_jvp_call_p,
    custom_derivatives.custom_vjp_call_p,
    custom_batching.custom_vmap_p,
  )
