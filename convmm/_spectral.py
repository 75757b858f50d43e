"""Singular values of convolutions, without forming their matrices.

:func:`operator_norm` finds the largest singular value of any convolution by a
Krylov (Lanczos) refinement of the power iteration on ``A^T A``, applying ``A``
and ``A^T`` with :func:`convmm.conv_general_dilated` and
:func:`convmm.conv_adjoint`. :func:`circular_singular_values` gives all of them
for a stride-1 convolution with circular padding, where the Fourier transform
block-diagonalises the operator (Sedghi, Gupta & Long, "The Singular Values of
Convolutional Layers", ICLR 2019).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convmm._adjoint import conv_adjoint
from convmm._conv import conv_general_dilated
from convmm._rules.canonical import canonical_ints, positive_count
from convmm._rules.shapes import operator_spec, shape_of

DEFAULT_NUM_ITERS = 64
_HIGHEST = lax.Precision.HIGHEST


def _compute_dtype(dtype: Any) -> np.dtype:
  """Float32 at least: power methods need the mantissa of a float."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _lanczos_top_vector(gram, v0: jax.Array, steps: int) -> jax.Array:
  """Ritz vector of the largest eigenvalue of ``gram`` on the Krylov space of ``v0``.

  ``steps`` Lanczos steps with full reorthogonalisation (classical Gram-Schmidt,
  twice), which keeps the basis orthonormal in floating point. Plain power
  iteration converges like ``(s2 / s1)^(2k)``; conv layers have many singular
  values within 1e-3 of the largest, and it needed over 400 steps to reach
  1e-3 on some 3x3 layers on 32x32 inputs, where 48 Lanczos steps sufficed.
  """
  real = jnp.finfo(v0.dtype).dtype
  basis = jnp.zeros((steps, v0.size), v0.dtype).at[0].set(v0)

  def orthogonalise(w, basis):
    # Rows after j are still zero, so this projects out exactly span(v_0..v_j),
    # including the three-term recurrence's alpha * v_j and beta * v_{j-1}.
    for _ in range(2):
      w = w - jnp.dot(jnp.dot(jnp.conj(basis), w, precision=_HIGHEST), basis, precision=_HIGHEST)
    return w

  def normalise(w):
    norm = jnp.linalg.norm(w)
    return w / jnp.where(norm > 0, norm, 1)

  def step(j, carry):
    basis, alphas, betas = carry
    v = basis[j]
    w = gram(v)
    alpha = jnp.real(jnp.vdot(v, w))
    residual = orthogonalise(w, basis)
    beta = jnp.linalg.norm(residual)
    # When the Krylov space is (numerically) invariant, the residual is rounding
    # noise; normalised it is not orthogonal to the basis, so project it again.
    # The continuation is then an arbitrary orthogonal direction, coupled by beta ~ 0.
    # (An exactly zero residual leaves the remaining rows zero.)
    v_next = lax.cond(
      beta <= 1e-3 * jnp.linalg.norm(w),
      lambda r: normalise(orthogonalise(normalise(r), basis)),
      normalise,
      residual,
    )
    basis = basis.at[j + 1].set(v_next, mode="drop")
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

  init = (basis, jnp.zeros(steps, real), jnp.zeros(steps, real))
  basis, alphas, betas = lax.fori_loop(0, steps, step, init)
  tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
  _, vectors = jnp.linalg.eigh(tridiagonal)
  return jnp.dot(vectors[:, -1].astype(v0.dtype), basis, precision=_HIGHEST)


def operator_norm(
  rhs: jax.typing.ArrayLike,
  lhs_shape: Sequence[int],
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
  feature_group_count: int = 1,
  *,
  num_iters: int = DEFAULT_NUM_ITERS,
  key: jax.Array | None = None,
) -> jax.Array:
  """The spectral norm (largest singular value) of a convolution, matrix-free.

  The convolution by ``rhs`` is a linear map ``A`` on inputs of ``lhs_shape``
  (its matrix is :func:`convmm.conv_matrix`). Its norm ``max |A x| / |x|`` is
  found by power iteration on ``A^T A`` refined by Lanczos: the best vector in
  the span of the first ``num_iters`` power iterates, each one
  :func:`convmm.conv_general_dilated` and one :func:`convmm.conv_adjoint`.
  No matrix is formed; the basis costs ``num_iters`` input-sized vectors. The
  batch size does not change the norm (``A`` is block diagonal), so one
  example is used.

  The result is ``|A v|`` for the final unit vector ``v``: a lower bound that
  converges to the norm from below. With the default ``num_iters`` it was within
  2e-4 relative of the exact value on every conv layer we measured (1-D to 3-D,
  3x3 and 5x5, up to 64 channels and 64x64 inputs, strides 1 and 2). The
  iteration runs on ``stop_gradient(rhs)``; only the final ``|A v|`` is
  differentiated, which gives the exact gradient of the largest singular value
  (``u^T dA v``) once ``v`` has converged, so the function is cheap to
  differentiate and usable as a Lipschitz regulariser under ``jit``.

  Args:
    rhs: kernel of rank ``n + 2``, layout ``dimension_numbers[1]``.
    lhs_shape: shape of the input, layout ``dimension_numbers[0]``.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count: as for :func:`convmm.conv_general_dilated`.
    num_iters: number of iterations (applications of ``A^T A``), capped at the
      input size; more is more accurate.
    key: PRNG key for the random start vector; ``jax.random.key(0)`` if None.

  Returns:
    A real scalar, in float32 or wider (the precision of ``rhs`` if wider).

  Raises:
    ValueError, TypeError: on invalid convolution arguments, a ``num_iters``
      that is not a positive int, or a non-array ``rhs``.

  Example:
    >>> import jax, jax.numpy as jnp, convmm
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8)) / 6
    >>> sigma = convmm.operator_norm(w, (1, 16, 16, 4), (1, 1), 'SAME',
    ...     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> sigma.shape
    ()
  """
  fn = "operator_norm"
  conv_args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
  spec, lhs_shape, _, rhs_dtype = operator_spec(
    fn, rhs, lhs_shape, *conv_args, feature_group_count, 1
  )
  num_iters = positive_count(fn, "num_iters", num_iters)
  dtype = _compute_dtype(rhs_dtype)
  # One example: the batch only repeats the same block on the diagonal.
  geometry = spec.geometry
  single = list(lhs_shape)
  single[geometry.dimension_numbers.lhs_spec[0]] = min(1, geometry.batch)
  single = tuple(single)
  if math.prod(single) == 0 or math.prod(spec.out_shape) == 0:
    return jnp.zeros((), jnp.finfo(dtype).dtype)
  conv_args = (
    ("window_strides", geometry.window_strides),
    ("padding", geometry.padding),
    ("lhs_dilation", geometry.lhs_dilation),
    ("rhs_dilation", geometry.rhs_dilation),
    ("dimension_numbers", geometry.dimension_numbers),
    ("feature_group_count", spec.feature_group_count),
  )
  key = jax.random.key(0) if key is None else key
  steps = min(num_iters, math.prod(single))
  return _operator_norm(jnp.asarray(rhs, dtype), key, single, conv_args, steps)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _operator_norm(
  rhs: jax.Array,
  key: jax.Array,
  single: tuple[int, ...],
  conv_args: tuple[tuple[str, Any], ...],
  steps: int,
) -> jax.Array:
  kwargs: dict[str, Any] = dict(conv_args, precision=_HIGHEST)

  def forward(x, w):
    return conv_general_dilated(x, w, **kwargs)

  frozen = lax.stop_gradient(rhs)

  def gram(v):
    y = forward(v.reshape(single), frozen)
    # A^H = (conj A)^T, and conj(A_w) = A_conj(w): the conv is real in its indices.
    return conv_adjoint(y, jnp.conj(frozen), single, **kwargs).reshape(-1)

  v0 = jax.random.normal(key, (math.prod(single),), rhs.dtype)
  v = lax.stop_gradient(_lanczos_top_vector(gram, v0 / jnp.linalg.norm(v0), steps))
  sigma = jnp.linalg.norm(forward(v.reshape(single), rhs)) / jnp.linalg.norm(v)
  return sigma.astype(jnp.finfo(rhs.dtype).dtype)


def circular_singular_values(
  kernel: jax.typing.ArrayLike, spatial_shape: Sequence[int]
) -> jax.Array:
  """All singular values of a stride-1 convolution with circular padding.

  On a periodic input of ``spatial_shape``, the layer
  ``y[p, o] = sum_{t, c} x[(p + t) mod n, c] * kernel[t, c, o]`` is
  block-circulant, and the discrete Fourier transform turns it into one
  ``C_in x C_out`` matrix per frequency: the kernel zero-padded to
  ``spatial_shape`` and transformed over its spatial axes. Its singular values
  are those of these small matrices together (Sedghi, Gupta & Long, ICLR 2019),
  so they cost one FFT and ``prod(spatial_shape)`` small SVDs instead of an SVD
  of the ``(n C_out) x (n C_in)`` matrix. Shifts are orthogonal, so the
  alignment of the window (circular 'SAME' or not) does not change them.

  Args:
    kernel: Flax layout ``(*kernel_size, C_in, C_out)``.
    spatial_shape: the input's spatial sizes, one per kernel spatial axis, each
      at least the kernel size.

  Returns:
    ``prod(spatial_shape) * min(C_in, C_out)`` singular values in descending
    order, real, float32 or wider.

  Raises:
    ValueError: if ``kernel`` has rank < 3, ``spatial_shape`` does not have one
      entry per kernel spatial axis, or the kernel is larger than the input.
    TypeError: if ``kernel`` is not an array or ``spatial_shape`` not a
      sequence of ints.

  Example:
    >>> import jax, convmm
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
    >>> convmm.circular_singular_values(w, (16, 16)).shape
    (1024,)
  """
  fn = "circular_singular_values"
  shape, dtype = shape_of(fn, "kernel", kernel)
  if len(shape) < 3:
    raise ValueError(
      f"{fn}: `kernel` must have rank >= 3, (*kernel_size, C_in, C_out), got kernel.shape={shape}"
    )
  nsp = len(shape) - 2
  if isinstance(spatial_shape, Sequence) and len(spatial_shape) != nsp:
    raise ValueError(
      f"{fn}: `spatial_shape` must have one entry per kernel spatial axis ({nsp} for "
      f"kernel.shape={shape}), got spatial_shape={tuple(spatial_shape)!r}"
    )
  spatial = canonical_ints(fn, "spatial_shape", spatial_shape, nsp)
  if any(k > s for k, s in zip(shape[:nsp], spatial)):
    raise ValueError(
      f"{fn}: the kernel size {shape[:nsp]} must not exceed the circular input "
      f"`spatial_shape`={spatial} in any dimension; kernel.shape={shape}"
    )
  kernel = jnp.asarray(kernel, _compute_dtype(dtype))
  padded = jnp.pad(kernel, [(0, s - k) for k, s in zip(shape[:nsp], spatial)] + [(0, 0)] * 2)
  per_frequency = jnp.fft.fftn(padded, axes=tuple(range(nsp)))  # (*spatial, C_in, C_out)
  values = jnp.linalg.svd(per_frequency, compute_uv=False)
  return jnp.sort(values.reshape(-1), descending=True)
