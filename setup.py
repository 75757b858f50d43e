"""The packages: ``convmm`` in every build, the training example in editable installs only.

``examples.cnn`` is run from a clone (``python -m examples.cnn.main``) and imported by the
notebooks and the tests; an editable install maps it so that it imports from anywhere, while a
wheel (``pip install convmm``) does not install a top-level ``examples`` package.
"""

import sys

from setuptools import find_packages, setup

packages = find_packages(include=["convmm", "convmm.*"])
if "editable_wheel" in sys.argv:  # the PEP 660 hook's command
  packages += find_packages(include=["examples", "examples.*"])
setup(packages=packages)
