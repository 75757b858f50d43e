"""True convolution and cross-correlation of N-D signals, SciPy-style.

What deep-learning libraries call a "convolution" (``lax.conv_general_dilated``,
``torch.nn.Conv2d``) slides the kernel over the input without mirroring it: it
is a cross-correlation. The convolution of signal processing mirrors the kernel
along every axis first. Both are computed here by convmm's im2col + GEMM
convolution with one batch and one feature, and the padding that selects
SciPy's 'full', 'same' or 'valid' part of the result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from convmm._conv import conv_general_dilated
from convmm._rules.shapes import shape_of

MODES = ("full", "same", "valid")


def _operands(fn: str, in1, in2, mode) -> tuple[jax.Array, jax.Array]:
  shape1, dtype1 = shape_of(fn, "in1", in1)
  shape2, dtype2 = shape_of(fn, "in2", in2)
  if not isinstance(mode, str) or mode not in MODES:
    raise ValueError(f"{fn}: `mode` must be one of {MODES}, got {mode!r}")
  if len(shape1) != len(shape2):
    raise ValueError(
      f"{fn}: `in1` and `in2` must have the same number of dimensions, got "
      f"in1.shape={shape1} and in2.shape={shape2}"
    )
  if 0 in shape1 or 0 in shape2:
    raise ValueError(
      f"{fn}: `in1` and `in2` must be non-empty, got in1.shape={shape1} and in2.shape={shape2}"
    )
  # NumPy float64 inputs become float32 unless x64 is enabled, as in jnp.asarray.
  dtype = jnp.result_type(*(jax.dtypes.canonicalize_dtype(d) for d in (dtype1, dtype2)))
  return jnp.asarray(in1, dtype), jnp.asarray(in2, dtype)


def _conj(x: jax.Array) -> jax.Array:
  return jnp.conj(x) if jnp.iscomplexobj(x) else x


@functools.partial(jax.jit, static_argnums=(0, 3))
def _convolve(fn: str, in1: jax.Array, in2: jax.Array, mode: str) -> jax.Array:
  if in1.ndim == 0:
    return in1 * in2
  if mode == "valid":
    if all(a >= b for a, b in zip(in1.shape, in2.shape)):
      pass
    elif all(b >= a for a, b in zip(in1.shape, in2.shape)):
      in1, in2 = in2, in1  # convolution commutes; SciPy swaps the same way
    else:
      raise ValueError(
        f"{fn}: for mode='valid' one input must be at least as large as the other in "
        f"every dimension, got in1.shape={in1.shape} and in2.shape={in2.shape}"
      )
    padding = [(0, 0)] * in1.ndim
  elif mode == "full":
    if in2.size > in1.size:
      in1, in2 = in2, in1  # the smaller kernel gives the smaller patch matrix
    padding = [(k - 1, k - 1) for k in in2.shape]
  else:
    # 'same' keeps in1's shape, centred on 'full': it starts at (k - 1) // 2.
    padding = [(k - 1 - (k - 1) // 2, (k - 1) // 2) for k in in2.shape]
  # Convolution is cross-correlation with the kernel mirrored along every axis.
  kernel = jnp.flip(in2)
  out = conv_general_dilated(
    in1[None, None], kernel[None, None], (1,) * in1.ndim, padding, precision=lax.Precision.HIGHEST
  )
  return out[0, 0]


def convolve(in1: jax.typing.ArrayLike, in2: jax.typing.ArrayLike, mode: str = "full") -> jax.Array:
  """N-D convolution of two arrays, with the semantics of ``scipy.signal.convolve``.

  ``out[n] = sum_k in1[k] * in2[n - k]``: the kernel is mirrored along every
  axis, unlike a deep-learning "convolution" layer, which is a cross-correlation
  (:func:`correlate`). Computed by :func:`convmm.conv_general_dilated` (im2col +
  GEMM), whose patch matrix has ``out.size * kernel.size`` entries, where the
  kernel is the smaller input in 'full' mode and ``in2`` otherwise; for long
  kernels an FFT (``jax.scipy.signal.fftconvolve``) is cheaper.

  Args:
    in1: N-D array (no batch or channel axes).
    in2: N-D array with the same number of dimensions.
    mode: 'full' (every overlap, shape ``in1.shape + in2.shape - 1``), 'same'
      (``in1.shape``, centred on 'full') or 'valid' (complete overlaps only,
      ``|in1.shape - in2.shape| + 1``; one input must be at least as large as the
      other in every dimension, and the inputs are swapped if ``in2`` is the
      larger, as SciPy does).

  Returns:
    The convolution, with dtype ``jnp.result_type(in1, in2)``.

  Raises:
    ValueError: on an unknown ``mode``, inputs of different rank, empty inputs,
      or 'valid' inputs where neither is at least as large as the other.
    TypeError: if an input is not an array.

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x = jnp.array([0., 1., 2., 3.]); k = jnp.array([1., 0., -1.])
    >>> convmm.convolve(x, k, 'valid')  # mirrored kernel: x[n+2] - x[n]
    Array([2., 2.], dtype=float32)
    >>> convmm.correlate(x, k, 'valid')  # what a conv layer computes
    Array([-2., -2.], dtype=float32)
    >>> convmm.convolve(jnp.ones((8, 8)), jnp.ones((3, 3))).shape
    (10, 10)
  """
  fn = "convolve"
  in1, in2 = _operands(fn, in1, in2, mode)
  return _convolve(fn, in1, in2, mode)


def correlate(
  in1: jax.typing.ArrayLike, in2: jax.typing.ArrayLike, mode: str = "full"
) -> jax.Array:
  """N-D cross-correlation, with the semantics of ``scipy.signal.correlate``.

  ``out[n] = sum_k in1[n + k] * conj(in2[k])`` (offset by the mode): the
  kernel slides over the input without mirroring. This is what
  ``lax.conv_general_dilated`` and every deep-learning "convolution" layer
  compute (for real kernels); :func:`convolve` mirrors the kernel instead.
  Equal to ``convolve(in1, conj(flip(in2)), mode)``, as in SciPy.

  Args:
    in1: N-D array (no batch or channel axes).
    in2: N-D array with the same number of dimensions; conjugated if complex.
    mode: 'full', 'same' or 'valid', as for :func:`convolve` (SciPy's 'same'
      is centred on the 'full' result of the convolution with the mirrored
      kernel, and 'valid' swaps the inputs when ``in2`` is the larger).

  Returns:
    The cross-correlation, with dtype ``jnp.result_type(in1, in2)``.

  Raises:
    ValueError, TypeError: as :func:`convolve` does.

  Example:
    >>> import jax.numpy as jnp, convmm
    >>> x = jnp.arange(16.).reshape(1, 1, 4, 4); w = jnp.ones((1, 1, 2, 2))
    >>> y = convmm.correlate(x[0, 0], w[0, 0], 'valid')
    >>> y.shape
    (3, 3)
    >>> bool((y == convmm.conv_general_dilated(x, w, (1, 1), 'VALID')[0, 0]).all())
    True
  """
  fn = "correlate"
  in1, in2 = _operands(fn, in1, in2, mode)
  if in1.ndim == 0:
    return in1 * _conj(in2)
  return _convolve(fn, in1, _conj(jnp.flip(in2)), mode)
