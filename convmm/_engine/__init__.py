"""The traced engine: im2col, the GEMMs, the derivatives, the tiling, on canonical operands.

Channels-last operands and a validated ``ConvSpec`` in, arrays out; it imports only
:mod:`convmm._rules`. The public functions above it validate their arguments first.
"""
