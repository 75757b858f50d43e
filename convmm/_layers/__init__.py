"""The Flax-layer machinery shared by :mod:`convmm.linen` and :mod:`convmm.nnx`.

Layer fields read into a validated geometry once, and the layers' computation on it
(padding modes lax has no name for, a call of the public functions, the bias).
"""
