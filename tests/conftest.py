"""Shared pytest configuration: tests run on the CPU backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
