"""Runs the vendored pjit convolution tests (``pjit_conv_cases.py``) on 8 CPU devices.

JAX's ``pjit_test.py`` asks for 8 CPU devices before the backend starts, which a
pytest worker that already ran other tests cannot do, so each test runs in a
fresh interpreter, as upstream's ``absltest`` would run it.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent

CASES = {
  "test_conv_general_dilated": (),
  "test_grad_conv_general_dilated": (),
  "test_vmap_conv_general_dilated": (),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=marks) for name, marks in CASES.items()])
def test_pjit_conv_case(name):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
    [sys.executable, "pjit_conv_cases.py", f"ShardingInTypesConvTest.{name}"],
    cwd=HERE,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-4000:]
  # absltest reports "OK" only if the test ran: a skip (too few devices) says "OK (skipped=1)".
  assert "Ran 1 test" in output and "skipped" not in output, output[-4000:]
