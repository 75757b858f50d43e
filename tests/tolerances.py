"""The one tolerance table of the test suite.

Values are relative-and-absolute tolerances for a single output element of a
reduction of modest length; :func:`tol` scales them by ``sqrt(reduction)`` when a
test compares long reductions (rounding error of a sum grows roughly with the
square root of its length). Gradients get ``GRAD_FACTOR`` more room because they
are sums of products of already-rounded values.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

TOLERANCE = {
  np.dtype(jnp.float64): 1e-12,
  np.dtype(jnp.float32): 1e-5,
  np.dtype(jnp.float16): 1e-3,
  np.dtype(jnp.bfloat16): 1e-2,
  np.dtype(jnp.complex128): 1e-12,
  np.dtype(jnp.complex64): 1e-5,
}
GRAD_FACTOR = 10.0


def tol(dtype, reduction: int = 1, grad: bool = False) -> float:
  """Tolerance for ``dtype`` and a reduction of ``reduction`` terms."""
  base = TOLERANCE[np.dtype(dtype)]
  return base * math.sqrt(max(1, reduction)) * (GRAD_FACTOR if grad else 1.0)


def assert_close(actual, expected, dtype=None, reduction: int = 1, grad: bool = False):
  """``|a - e| <= t * (1 + |e|)`` elementwise, with shapes and dtypes equal."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  dtype = expected.dtype if dtype is None else dtype
  t = tol(dtype, reduction, grad)
  if np.iscomplexobj(actual) or np.iscomplexobj(expected):
    a, e = actual.astype(np.complex128), expected.astype(np.complex128)
  else:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
  np.testing.assert_allclose(a, e, rtol=t, atol=t * max(1.0, float(np.max(np.abs(e), initial=0))))
