"""convmm's examples (``python -m examples.cnn.main`` from the repository root)."""
