"""A convolution as an explicit matrix acting on the flattened input.

A convolution is linear in its input, so for a fixed kernel there is a matrix
``M`` with ``conv(x).ravel() == M @ x.ravel()``. Each row belongs to one output
element and holds the kernel values of that output feature at the input
positions its receptive field covers; everything else is zero. This is the
Sobel example of the "convolution as a matrix multiplication" article, and
``M.T`` is the transposed convolution.

The structure comes from the core's im2col, run on an integer array that holds
``flat_index + 1`` of every input element: im2col only moves data, so each
patch entry tells which input element (or, as 0, which padding position) a
kernel tap reads at each output position. No matrix is densified to find it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import sparse as jsparse

from convmm._engine.im2col import patches_channels_last, to_channels_last
from convmm._engine.kernels import kernel_taps_last
from convmm._rules.canonical import positive_count
from convmm._rules.shapes import ConvSpec, operator_spec

DEFAULT_MAX_ELEMENTS = 2**26
_INDEX_LIMIT = np.iinfo(np.int32).max - 1


@functools.partial(jax.jit, static_argnums=(0, 1))
def _source_indices(spec: ConvSpec, lhs_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """im2col of ``flat_index + 1`` of the input, and the flat index of each output."""
  lhs_spec, _, out_spec = spec.geometry.dimension_numbers
  index = jnp.arange(1, math.prod(lhs_shape) + 1, dtype=jnp.int32).reshape(lhs_shape)
  # (N, *out, T, C): 1 + the flat input index each tap reads, 0 for padding.
  sources = patches_channels_last(to_channels_last(index, lhs_spec), spec.geometry)
  out_index = jnp.arange(math.prod(spec.out_shape), dtype=jnp.int32).reshape(spec.out_shape)
  return sources, to_channels_last(out_index, out_spec)  # (N, *out, O)


def structure(spec: ConvSpec, lhs_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
  """Row, column and kernel index of every structural entry of the matrix.

  Returns numpy arrays ``rows``, ``cols`` (sorted row-major, no duplicates) and
  ``taps``, the flat index into the ``(T, C // groups, O)`` kernel of
  :func:`convmm._engine.kernels.kernel_taps_last` whose value the entry holds.
  """
  geometry = spec.geometry
  o, g = spec.out_features, spec.feature_group_count
  c_g, o_g, taps = geometry.in_features // g, o // g, geometry.num_taps
  # Shapes are static, so the index arrays are concrete even under jit.
  with jax.ensure_compile_time_eval():
    sources, rows_cl = (np.asarray(a) for a in _source_indices(spec, lhs_shape))
  batch, positions = geometry.batch, math.prod(geometry.out_spatial)
  # Entry (n, p, group, o', t, c') reads input channel group * c_g + c' and
  # holds kernel[t, c', group * o_g + o'].
  sources = sources.reshape(batch, positions, taps, g, c_g).transpose(0, 1, 3, 2, 4)
  sources = sources[:, :, :, None]  # (N, P, G, 1, T, Cg)
  rows = rows_cl.reshape(batch, positions, g, o_g)[..., None, None]  # (N, P, G, Og, 1, 1)
  kernel_index = np.arange(taps * c_g * o).reshape(taps, c_g, g, o_g).transpose(2, 3, 0, 1)
  full = np.broadcast_shapes(sources.shape, rows.shape, kernel_index.shape)
  inside = np.nonzero(np.broadcast_to(sources, full))
  rows = np.broadcast_to(rows, full)[inside]
  cols = np.broadcast_to(sources, full)[inside] - 1
  taps_index = np.broadcast_to(kernel_index, full)[inside]
  order = np.lexsort((cols, rows))
  return rows[order], cols[order], taps_index[order]


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _assemble(
  rhs: jax.Array,
  rows: jax.Array,
  cols: jax.Array,
  taps_index: jax.Array,
  spec: ConvSpec,
  shape: tuple[int, int],
  sparse: bool,
):
  values = kernel_taps_last(rhs, spec).reshape(-1)[taps_index]
  if sparse:
    indices = jnp.stack([rows, cols], axis=-1)
    return jsparse.BCOO((values, indices), shape=shape, indices_sorted=True, unique_indices=True)
  return (
    jnp.zeros(shape, values.dtype)
    .at[rows, cols]
    .set(values, indices_are_sorted=True, unique_indices=True)
  )


def conv_matrix(
  rhs: jax.typing.ArrayLike,
  lhs_shape: Sequence[int],
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
  feature_group_count: int = 1,
  *,
  sparse: bool = False,
  max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> jax.Array | jsparse.BCOO:
  """The matrix of the convolution by ``rhs`` acting on inputs of ``lhs_shape``.

  Returns ``M`` of shape ``(out.size, prod(lhs_shape))`` such that
  ``M @ x.ravel() == conv_general_dilated(x, rhs, ...).ravel()``, with both
  arrays flattened row-major in their own layouts (``dimension_numbers``).
  ``M.T`` is the transposed convolution, :func:`convmm.conv_adjoint`. Row ``i``
  holds, at the input positions read by output element ``i``, the kernel values
  of its output feature; the batch makes ``M`` block diagonal.

  ``sparse=True`` returns a :class:`jax.experimental.sparse.BCOO` with only the
  structural entries, one per output element, kernel tap and input feature of
  its group whose tap lands on the input (not on padding or a dilation hole),
  with sorted, unique indices. It is built from the im2col indices directly;
  no dense matrix is formed. The dense form refuses to allocate more than
  ``max_elements`` entries. Both are differentiable in ``rhs`` and work under
  ``jit`` (the sparsity pattern depends on shapes only).

  Args:
    rhs: kernel of rank ``n + 2``, layout ``dimension_numbers[1]``.
    lhs_shape: shape of the input, layout ``dimension_numbers[0]``.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count: as for :func:`convmm.conv_general_dilated`.
    sparse: return a ``BCOO`` matrix instead of a dense array.
    max_elements: the largest dense matrix (in elements) to build.

  Returns:
    ``M`` with the dtype of ``rhs``, of shape ``(out.size, prod(lhs_shape))``.

  Raises:
    ValueError: if the dense matrix would exceed ``max_elements`` (use
      ``sparse=True``), if an index does not fit in int32, or on any invalid
      convolution argument.
    TypeError: if ``rhs`` is not an array or ``lhs_shape`` not a shape.

  Example:
    The x-Sobel kernel on a 4x4 image (VALID) is a 4x16 matrix:

    >>> import jax.numpy as jnp, convmm
    >>> sobel = jnp.array([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
    >>> M = convmm.conv_matrix(sobel[None, None], (1, 1, 4, 4), (1, 1), 'VALID')
    >>> M.shape
    (4, 16)
    >>> M[0]
    Array([ 1.,  0., -1.,  0.,  2.,  0., -2.,  0.,  1.,  0., -1.,  0.,  0.,  0.,
            0.,  0.], dtype=float32)
    >>> convmm.conv_matrix(jnp.ones((8, 3, 3, 3)), (2, 3, 32, 32), (1, 1), 'SAME',
    ...                    sparse=True).shape
    (16384, 6144)
  """
  fn = "conv_matrix"
  conv_args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
  spec, lhs_shape, rhs_shape, _ = operator_spec(
    fn, rhs, lhs_shape, *conv_args, feature_group_count, 1
  )
  max_elements = positive_count(fn, "max_elements", max_elements)
  shape = (math.prod(spec.out_shape), math.prod(lhs_shape))
  if not sparse and shape[0] * shape[1] > max_elements:
    raise ValueError(
      f"{fn}: the dense matrix would have {shape[0]}x{shape[1]}={shape[0] * shape[1]} "
      f"elements, more than `max_elements`={max_elements} (lhs_shape={lhs_shape}, "
      f"rhs.shape={rhs_shape}); pass sparse=True to store only the structural entries, "
      f"or raise max_elements"
    )
  if max(shape) > _INDEX_LIMIT:
    raise ValueError(
      f"{fn}: the matrix shape {shape} does not fit int32 indices (at most "
      f"{_INDEX_LIMIT} rows and columns); lhs_shape={lhs_shape}, rhs.shape={rhs_shape}"
    )
  rows, cols, taps_index = structure(spec, lhs_shape)
  return _assemble(
    jnp.asarray(rhs),
    rows.astype(np.int32),
    cols.astype(np.int32),
    taps_index.astype(np.int32),
    spec,
    shape,
    bool(sparse),
  )
