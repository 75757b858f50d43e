"""Reading programs: how many XLA convolutions they contain.

A convolution computed by convmm's engine is slices, pads and dot_generals;
one left to XLA is a ``convolution`` instruction, ``convolution(...)`` in the
compiled HLO text and ``stablehlo.convolution(...)`` in the lowered program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compiled(f, *args) -> jax.stages.Compiled:
  """``f`` jitted and compiled for ``args``: call it, or read it with ``.as_text()``."""
  return jax.jit(f).lower(*args).compile()


def xla_convolutions(program: jax.stages.Lowered | jax.stages.Compiled) -> int:
  """The number of convolution instructions in a lowered or compiled program."""
  return program.as_text().count("convolution(")


def training_step(f, *args):
  """The gradient of ``sum(tanh(f(*args)))`` with respect to every argument."""
  loss = lambda *a: jnp.sum(jnp.tanh(f(*a)))
  return jax.grad(loss, argnums=tuple(range(len(args))))(*args)
