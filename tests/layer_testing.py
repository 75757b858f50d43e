"""Cheap, seeded data for the Flax layer tests (test_linen, test_nnx, test_adjoint_layer).

Drawing with ``jax.random`` compiles threefry afresh for every new shape (about
a second of CPU each on the test machine), which dominated the layer tests.
These helpers draw with NumPy instead, still deterministically from a seed or
from the JAX key the layer hands to its initialiser, so that parameter-parity
tests still fail when a layer uses another key or parameter name than Flax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
  """Standard normal values of ``shape`` from ``seed``, cast to ``dtype``."""
  values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return jnp.asarray(values).astype(dtype)


def key_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """A kernel initialiser like lecun_normal, drawn with NumPy from the key's bits.

  Different keys give different values, so a layer that folds in another name
  or draws in another order than Flax gets different parameters.
  """
  if isinstance(key, jax.core.Tracer):
    # linen evaluates initialisers abstractly (eval_shape) to check shapes at apply.
    return jnp.zeros(shape, dtype)
  seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
  fan_in = math.prod(shape[:-1]) or 1
  values = np.random.default_rng(seed).standard_normal(shape) / math.sqrt(fan_in)
  return jnp.asarray(values.astype(np.float32)).astype(dtype)


def torch_conv(x, kernel, bias, *, strides, padding, dilation, groups, padding_mode):
  """PyTorch's ``nn.Conv{1,2,3}d`` on a channels-last input and a Flax-layout kernel.

  ``x`` is ``(N, *spatial, C)``, ``kernel`` ``(*k, C // groups, O)``; returns the
  channels-last output as a NumPy array (float64 arithmetic).
  """
  import torch  # only the parity tests need it

  rank = x.ndim - 2
  conv = getattr(torch.nn, f"Conv{rank}d")(
    x.shape[-1],
    kernel.shape[-1],
    kernel.shape[:rank],
    stride=strides,
    padding=padding,
    dilation=dilation,
    groups=groups,
    bias=bias is not None,
    padding_mode=padding_mode,
    dtype=torch.float64,
  )
  with torch.no_grad():
    conv.weight.copy_(
      torch.from_numpy(np.moveaxis(np.asarray(kernel, np.float64), (-1, -2), (0, 1)))
    )
    if bias is not None:
      conv.bias.copy_(torch.from_numpy(np.asarray(bias, np.float64)))
    y = conv(torch.from_numpy(np.moveaxis(np.asarray(x, np.float64), -1, 1)))
  return np.moveaxis(y.numpy(), 1, -1)
