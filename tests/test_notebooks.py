"""Every notebook in notebooks/ runs top to bottom, and what is committed is what runs.

Each ``notebooks/*.ipynb`` is executed with nbclient (kernel ``python3``, working directory
``notebooks/``) from a copy in a temporary directory, so the committed file, with its outputs,
is never rewritten by the tests. Every computing cell of a notebook asserts its results against
``jax.lax`` or numpy, so a wrong number fails here, not only a crash. The notebooks are small
(about 20 s each on a 2-core CPU, most of it starting the kernel and importing JAX).

The cheap checks alongside: a committed notebook carries its outputs and no error, and its cells
match its percent-format text twin (``notebooks/NN_name.py``, paired by jupytext through
``notebooks/jupytext.toml``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; the slowest cell takes a few seconds


def test_there_are_notebooks():
  names = [path.name for path in NOTEBOOKS]
  assert names[:4] == [
    "01_im2col_illustrated.ipynb",
    "02_conv_as_matrix.ipynb",
    "03_why_the_matrix_view_matters.ipynb",
    "04_train_a_cnn.ipynb",
  ], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
  copy = tmp_path / path.name
  shutil.copyfile(path, copy)
  notebook = nbformat.read(copy, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  client = NotebookClient(
    notebook,
    timeout=CELL_TIMEOUT,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  try:
    client.execute()
  except CellExecutionError as error:
    pytest.fail(f"{path.name}: a cell failed\n{error}", pytrace=False)
  finally:
    nbformat.write(notebook, copy)  # the executed copy, for a look after a failure
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(cell.execution_count is not None for cell in code)
  assert not [output for cell in code for output in cell.outputs if output.output_type == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_committed_notebook_has_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  unexecuted = [i for i, cell in enumerate(code) if cell.execution_count is None]
  assert not unexecuted, f"{path.name}: code cells {unexecuted} were committed unexecuted"
  errors = [
    output.get("ename") for cell in code for output in cell.outputs if output.output_type == "error"
  ]
  assert not errors, f"{path.name}: committed with errors {errors}"
  images = sum("image/png" in output.get("data", {}) for cell in code for output in cell.outputs)
  assert images >= 1, f"{path.name}: no figure among the committed outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_matches_its_text_twin(path):
  twin = path.with_suffix(".py")
  if not twin.exists():
    pytest.skip(f"{path.name} has no text twin")
  from_twin = jupytext.read(twin, fmt="py:percent").cells
  committed = nbformat.read(path, as_version=4).cells
  assert [(c.cell_type, c.source) for c in committed] == [
    (c.cell_type, c.source) for c in from_twin
  ], f"{path.name} differs from {twin.name}: rebuild it as README.md (Notebooks) says"
