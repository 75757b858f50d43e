"""The training example as a package, in the layout of Flax's examples.

- ``input_pipeline``: the digits / MNIST data and the batch order (NumPy only)
- ``models``: the CNN (linen and NNX), on convmm's or Flax's own convolutions
- ``parallel``: the device mesh, data parallelism and cross-process broadcasts
- ``checkpoints``: saving and choosing the checkpoint to resume from (Orbax)
- ``train``: the jitted steps, the epoch loop and the outputs
- ``errors``: the errors a user can fix, printed by the command line as one line
- ``main``: the flags; ``python -m examples.cnn.main`` from the repository root
"""
