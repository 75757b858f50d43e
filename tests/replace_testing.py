"""Helpers for the replace_convs tests: an independent jaxpr walk and comparisons.

``count_convs`` walks a jaxpr's equations and every jaxpr found in their
parameters (directly, in tuples, namedtuples, lists and dicts), at any depth,
using only the public ``jax.extend.core`` types, so it does not share code with
the transformation it checks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from tolerances import assert_close

CONV = "conv_general_dilated"


def _jaxprs_in(value: Any):
  if isinstance(value, jex.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _jaxprs_in(v)
  elif isinstance(value, dict):
    for v in value.values():
      yield from _jaxprs_in(v)


def count_convs(jaxpr: Any) -> int:
  """Number of ``conv_general_dilated`` equations in ``jaxpr`` at any depth."""
  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jex.core.ClosedJaxpr) else jaxpr
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == CONV
    for sub in _jaxprs_in(eqn.params):
      count += count_convs(sub)
  return count


def convs_in(fn, *args, **kwargs) -> int:
  """Convolutions in the jaxpr of ``fn(*args, **kwargs)``."""
  return count_convs(jax.make_jaxpr(fn)(*args, **kwargs))


def assert_trees_close(actual, expected, reduction: int = 1, grad: bool = False):
  """Equal tree structure and leaves close at the dtype's tolerance."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.shape(a) == np.shape(e) and jnp.result_type(a) == jnp.result_type(e), (
      np.shape(a),
      np.shape(e),
      jnp.result_type(a),
      jnp.result_type(e),
    )
    assert_close(a, e, reduction=reduction, grad=grad)
