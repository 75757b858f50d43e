"""Argument rules: user arguments read into canonical tuples, the output-shape rule, every check.

Plain Python on shapes, nothing traced, so errors surface before compilation. The
bottom layer: it imports nothing else from convmm.
"""
