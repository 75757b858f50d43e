"""Agreement of two networks' results: relative errors over pytrees, and the checks around them.

``models.py`` compares convmm's networks with Flax's from the same parameters; these helpers
know nothing about convolutions.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def leaf_errors(actual, expected) -> tuple[dict[str, float], float]:
  """``max |actual - expected|`` per leaf, and ``max |expected|`` over the whole tree."""
  errors, scale = {}, 0.0
  for (path, a), e in zip(
    jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
  ):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    errors[jax.tree_util.keystr(path)] = float(np.max(np.abs(a - e), initial=0.0))
    scale = max(scale, float(np.max(np.abs(e), initial=0.0)))
  return errors, scale


def relative_error(actual, expected) -> float:
  """``max |actual - expected| / max |expected|`` over the whole tree (absolute if all 0).

  One scale for the tree, not one per leaf: in a BatchNorm network some gradients and
  statistics are zero in exact arithmetic (a per-channel shift that the next train-mode
  BatchNorm removes), and per leaf both sides' rounding noise would be compared with itself.
  """
  errors, scale = leaf_errors(actual, expected)
  return max(errors.values(), default=0.0) / (scale or 1.0)


def worst_leaf(actual, expected) -> str:
  """The leaf with the largest error relative to its own scale (a diagnostic)."""
  errors, _ = leaf_errors(actual, expected)
  leaf_scales, _ = leaf_errors(jax.tree.map(jnp.zeros_like, expected), expected)
  relative = {k: v / (leaf_scales[k] or 1.0) for k, v in errors.items()}
  return max(relative, key=relative.get) if relative else ""


def agreement(output, loss, state, ref_output, ref_loss, ref_state) -> dict[str, Any]:
  """Relative errors of a forward output and a training step's results against a reference.

  The gradients come from adam's first moment after one step from a zero state,
  ``(1 - b1) * grad``; ``model_state`` are the updated BatchNorm statistics.
  """
  (_, model_state, opt_state), (_, ref_model_state, ref_opt_state) = state, ref_state
  grads, ref_grads = opt_state[0].mu, ref_opt_state[0].mu
  return dict(
    fwd=relative_error(output, ref_output),
    loss=relative_error(loss, ref_loss),
    grads=relative_error(grads, ref_grads),
    grads_worst_leaf=worst_leaf(grads, ref_grads),
    model_state=relative_error(model_state, ref_model_state) if ref_model_state else 0.0,
  )


def unit_zero_scales(params):
  """Sets all-zero normalisation scales to one.

  Flax's ImageNet ResNet zero-initialises the last BatchNorm scale of each residual branch,
  which silences the branch at initialisation: its convolutions would get exactly zero
  gradients and the agreement check would not see them. The timings do not depend on it.
  """

  def fix(path, leaf):
    named_scale = getattr(path[-1], "key", None) == "scale"
    return jnp.ones_like(leaf) if named_scale and not np.any(np.asarray(leaf)) else leaf

  return jax.tree_util.tree_map_with_path(fix, params)


def check_same_parameters(flax_model, other_model, init_args) -> int:
  """Raises unless both models create the same variable tree; returns the parameter count."""
  shapes = [
    jax.eval_shape(functools.partial(m.init, train=False), jax.random.key(0), *init_args)
    for m in (flax_model, other_model)
  ]
  described = [jax.tree.map(lambda s: (s.shape, str(s.dtype)), tree) for tree in shapes]
  if described[0] != described[1]:
    raise ValueError(
      f"benchmarks.models: convmm's variable tree differs from Flax's: {described[1]} vs "
      f"{described[0]}"
    )
  return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes[0]["params"]))


def copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)
