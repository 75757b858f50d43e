"""convmm substituted for ``jax.lax`` in JAX's own convolution tests.

The vendored tests call ``cm.conv_general_dilated`` etc. where upstream calls
``lax.conv_general_dilated``. Each shim counts its calls, and
:class:`ConvmmTestCase` makes binding XLA's convolution primitive
(``conv_general_dilated_p``) raise for the whole test, so a test passes only if
every convolution it computes (forward, JVP, transpose, batching) went through
convmm. Reference computations that upstream builds from lax (the vjp of lax's
conv in the ``conv_transpose`` tests, lax's locally connected conv) run inside
:func:`xla_conv_allowed`, which is the only way to bind the primitive.

``conv`` and ``conv_with_general_padding`` are written as lax defines them
(``jax/_src/lax/convolution.py`` of jax 0.10.2): thin wrappers over
``conv_general_dilated``.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
from jax._src import test_util as jtu
from jax._src.lax import convolution as lax_convolution

import convmm
from convmm._engine import sharding as convmm_sharding

XLA_CONV = lax_convolution.conv_general_dilated_p

calls: dict[str, int] = {}

# convmm's own engine in every direction: the default 'auto' may pick XLA's
# convolution for some directions, which these tests forbid.
PURE = "convmm"


def _counted(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
    return fn(*args, **kwargs)

  return wrapper


@_counted
def conv_general_dilated(*args, **kwargs):
  return convmm.conv_general_dilated(*args, **{"method": PURE, **kwargs})


@_counted
def conv_transpose(*args, **kwargs):
  return convmm.conv_transpose(*args, **{"method": PURE, **kwargs})


@_counted
def conv_general_dilated_patches(*args, **kwargs):
  return convmm.conv_general_dilated_patches(*args, **kwargs)


@_counted
def conv(lhs, rhs, window_strides, padding, precision=None, preferred_element_type=None):
  return convmm.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    precision=precision,
    preferred_element_type=preferred_element_type,
    method=PURE,
  )


@_counted
def conv_with_general_padding(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation,
  rhs_dilation,
  precision=None,
  preferred_element_type=None,
):
  return convmm.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    precision=precision,
    preferred_element_type=preferred_element_type,
    method=PURE,
  )


def generated_cases(default: int) -> int:
  """Sets how many cases ``jtu.sample_product`` draws for the tests defined next.

  Upstream draws ``JAX_NUM_GENERATED_CASES`` (default 10) per test; the vendored files
  whose tests evaluate convmm op by op (gradient checks, batching) draw ``default``
  instead, to keep CI fast. Setting the variable restores upstream's behaviour. The
  draw is a prefix of upstream's: ``np.random.RandomState(42).choice`` without
  replacement permutes, then truncates.
  """
  n = int(os.environ.get("JAX_NUM_GENERATED_CASES", default))
  jax.config.update("jax_num_generated_cases", n)
  return n


class XlaConvBound(AssertionError):
  """XLA's convolution primitive was bound where convmm should compute."""


_allowed = [0]


def _guarded_bind(*args, **params):
  if not _allowed[0]:
    raise XlaConvBound(
      "conv_general_dilated_p was bound outside a reference computation: "
      "this convolution did not go through convmm"
    )
  return type(XLA_CONV).bind(XLA_CONV, *args, **params)


@contextlib.contextmanager
def xla_conv_forbidden():
  """Any binding of XLA's conv primitive raises :class:`XlaConvBound`."""
  XLA_CONV.bind = _guarded_bind
  # The one permitted binding: on explicit meshes convmm asks lax's shape rule for lax's
  # output sharding (jax.eval_shape, nothing is computed or lowered; the lowering checks in
  # test_convmm_called.py show no stablehlo.convolution).
  sharding_rule = convmm_sharding.lax_out_sharding
  convmm_sharding.lax_out_sharding = allow_xla_conv(sharding_rule)
  try:
    yield
  finally:
    del XLA_CONV.bind
    convmm_sharding.lax_out_sharding = sharding_rule


@contextlib.contextmanager
def xla_conv_allowed():
  """Lets an upstream reference computation use lax's convolution."""
  _allowed[0] += 1
  try:
    yield
  finally:
    _allowed[0] -= 1


def allow_xla_conv(fn):
  """Decorator form of :func:`xla_conv_allowed` for reference helpers."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with xla_conv_allowed():
      return fn(*args, **kwargs)

  return wrapper


def primitive_names(jaxpr) -> set[str]:
  """Every primitive in a (closed) jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          names |= primitive_names(sub)
  return names


class ConvmmTestCase(jtu.JaxTestCase):
  """JAX's test base class, with XLA's conv forbidden and convmm required.

  ``jtu.JaxTestCase`` turns on ``jax_numpy_rank_promotion='raise'``,
  ``jax_numpy_dtype_promotion='strict'`` and ``jax_enable_checks``. That a
  passing test called a shim at all is checked in ``conftest.py``.
  """

  def setUp(self):
    super().setUp()
    calls.clear()
    self.enterContext(xla_conv_forbidden())
