"""The JAX internals :func:`convmm.replace_convs` is built on, all in this module.

replace_convs interprets jaxprs, which jax's public API does not cover: it reads
private modules (``jax._src``) that change between releases. They are imported
here without failing on any jax, so that ``import convmm`` and
``from convmm import *`` work on every jax convmm supports, and :func:`check`
raises one error naming every missing internal and the jax replace_convs is
tested with when replace_convs is called. ``convmm/_replace.py`` reads these
modules only through the names imported below, and only the attributes listed
in :data:`INTERNALS` (tests/test_jax_internals.py checks both).
"""

from __future__ import annotations

import importlib
from typing import Any

import jax

# The jax releases replace_convs is tested with, lowest and highest.
TESTED_JAX = ("0.10.2", "0.10.2")

# Every internal replace_convs reads, by its full name.
INTERNALS = (
  "jax._src.ad_checkpoint.remat_p",
  "jax._src.compute_on.compute_on_p",
  "jax._src.core.Atom",
  "jax._src.core.ClosedJaxpr",
  "jax._src.core.Jaxpr",
  "jax._src.core.JaxprEqn",
  "jax._src.core.Literal",
  "jax._src.core.Primitive",
  "jax._src.core.ShapedArray",
  "jax._src.core.Tracer",
  "jax._src.core.Var",
  "jax._src.core.closed_call_p",
  "jax._src.core.jaxprs_in_params",
  "jax._src.custom_batching.custom_vmap_p",
  "jax._src.custom_derivatives.custom_jvp_call_p",
  "jax._src.custom_derivatives.custom_vjp_call_p",
  "jax._src.interpreters.partial_eval.convert_constvars_jaxpr",
  "jax._src.interpreters.partial_eval.trace_to_jaxpr_dynamic",
  "jax._src.lax.control_flow.conditionals.cond_p",
  "jax._src.lax.control_flow.loops.scan_p",
  "jax._src.lax.control_flow.loops.while_p",
  "jax._src.lax.control_flow.solves.linear_solve_p",
  "jax._src.lax.eval_jaxpr.eval_jaxpr_p",
  "jax._src.lax.lax._convert_element_type",
  "jax._src.lax.lax.composite_p",
  "jax._src.linear_util.WrappedFun",
  "jax._src.linear_util.wrap_init",
  "jax._src.pjit.jit_p",
  "jax._src.shard_map.shard_map_p",
  "jax._src.source_info_util.current_name_stack",
  "jax._src.source_info_util.user_context",
  "jax._src.tree_util.FlatTree.flatten",
)

# The modules convmm/_replace.py reads the internals from (on
# another jax, the ones that failed to import are None: check() raises before they are read).
__all__ = [
  "ad_checkpoint",
  "compute_on",
  "conditionals",
  "core",
  "custom_batching",
  "custom_derivatives",
  "lax_eval_jaxpr",
  "lax_internal",
  "loops",
  "lu",
  "pe",
  "pjit",
  "shard_map",
  "solves",
  "source_info_util",
  "tree_util",
]

try:
  from jax._src import (
    ad_checkpoint,
    compute_on,
    core,
    custom_batching,
    custom_derivatives,
    pjit,
    shard_map,
    source_info_util,
    tree_util,
  )
  from jax._src import linear_util as lu
  from jax._src.interpreters import partial_eval as pe
  from jax._src.lax import eval_jaxpr as lax_eval_jaxpr
  from jax._src.lax import lax as lax_internal
  from jax._src.lax.control_flow import conditionals, loops, solves
except ImportError:  # an older or newer jax: check() names what is missing
  for _name in __all__:
    globals().setdefault(_name, None)


def _resolve(path: str) -> Any:
  """The object named ``path`` (a module, then attributes), or raises LookupError."""
  parts = path.split(".")
  obj: Any = None
  for end in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:end]))
    except ImportError:
      continue
    for attribute in parts[end:]:
      if not hasattr(obj, attribute):
        raise LookupError(path)
      obj = getattr(obj, attribute)
    return obj
  raise LookupError(path)


def missing() -> list[str]:
  """The entries of :data:`INTERNALS` that the installed jax lacks.

  Example:
    >>> from convmm import _jax_internals
    >>> isinstance(_jax_internals.missing(), list)
    True
  """
  absent = []
  for path in INTERNALS:
    try:
      _resolve(path)
    except LookupError:
      absent.append(path)
  return absent


def check(fn: str) -> None:
  """Raises one ``ImportError`` naming every internal jax lacks, and the tested jax.

  Args:
    fn: the public function, named in the message.

  Raises:
    ImportError: the installed jax lacks an entry of :data:`INTERNALS`.

  Example:
    >>> from convmm import _jax_internals
    >>> _jax_internals.check("replace_convs")  # on a tested jax: no error
  """
  absent = missing()
  if absent:
    low, high = TESTED_JAX
    tested = f"jax {low}" if low == high else f"jax {low} to {high}"
    raise ImportError(
      f"{fn}: needs JAX internals that jax {jax.__version__} lacks: {', '.join(absent)}; "
      f"{fn} is built on jax's private API and tested with {tested} "
      f"(pip install 'jax=={high}'); the rest of convmm works on this jax"
    )
