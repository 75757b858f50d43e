"""convmm's benchmarks, run from the repository root (they are not installed with convmm).

- ``python -m benchmarks.bench``: the layer suite, convmm against ``jax.lax`` and PyTorch on
  convolution layers from real networks (``suite.py``, ``impls.py``, ``measure.py``).
- ``python -m benchmarks.models``: whole networks with convmm's Flax layers against Flax's own,
  and PyTorch's ResNet-18 and MobileNetV2 (``networks.py``, ``torch_networks.py``,
  ``agreement.py``).
- ``python -m benchmarks.performance_page``: ``docs/performance.md`` from their JSON.

Both benchmarks record the machine and XLA's GEMM and convolution rates on it (``machine.py``)
and which algorithm computed each direction of convmm's convolutions (``chosen.py``), and write
their JSON to ``benchmarks/out/``, which git ignores; ``report.py`` makes the tables.
"""
