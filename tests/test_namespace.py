"""The package namespace on every supported jax: star import, ``dir``, the layers' extra.

.ci/run runs this file on the newest jax and on the floor in pyproject.toml (without Flax).
"""

from __future__ import annotations

import importlib
import sys

import jax
import pytest

import convmm
from convmm import _jax_internals


def test_star_import_binds_every_public_name():
  namespace: dict[str, object] = {}
  exec("from convmm import *", namespace)
  assert sorted(set(namespace) - {"__builtins__"}) == sorted(convmm.__all__)


def test_dir_lists_every_public_name():
  assert set(convmm.__all__) <= set(dir(convmm))
  assert "replace_convs" in dir(convmm)


def test_replace_convs_works_or_names_what_this_jax_lacks():
  missing = _jax_internals.missing()
  if not missing:
    assert convmm.replace_convs(jax.numpy.sin)(jax.numpy.zeros(2)).tolist() == [0.0, 0.0]
    return
  low, high = _jax_internals.TESTED_JAX
  with pytest.raises(ImportError, match=rf"replace_convs: .*{jax.__version__} lacks") as info:
    convmm.replace_convs(jax.numpy.sin)
  assert all(name in str(info.value) for name in missing)
  assert f"jax {low}" in str(info.value) and high in str(info.value)


@pytest.mark.parametrize("module", ["convmm.linen", "convmm.nnx"])
def test_layers_without_flax_name_the_extra(module, monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)  # as if Flax were not installed
  monkeypatch.delitem(sys.modules, module, raising=False)
  pattern = (
    rf"{module}: needs the `flax` extra \(.*flax.*\); install it with `pip install -e '\.\[flax\]'`"
  )
  with pytest.raises(ModuleNotFoundError, match=pattern) as info:
    importlib.import_module(module)
  assert info.value.name == "flax"
