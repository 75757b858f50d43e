# Copyright 2020 The JAX Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     https://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Vendored by convmm from jax-ml/jax, tests/lax_vmap_test.py at tag jax-v0.10.2
# (commit 990e6a0b84138346e6a38785412f36356e0e5dc3): the convolution batching
# test of LaxVmapTest and its helper _CheckBatching, with convmm's
# conv_general_dilated substituted for lax's through ``convmm_shims`` (``cm.``).
# Every other change from upstream is marked "convmm:".
"""JAX 0.10.2's convolution test from ``lax_vmap_test.py``, run on convmm."""

from __future__ import annotations

import itertools
from functools import partial
from typing import Union, cast

import convmm_shims as cm
import jax
import numpy as np
from absl.testing import absltest
from jax import dtypes, lax
from jax._src import test_util as jtu
from jax._src.internal_test_util import lax_test_util
from jax._src.util import safe_map, safe_zip

jax.config.parse_flags_with_absl()
# convmm: 3 generated cases per test instead of upstream's 10 (a prefix of upstream's
# draw), to keep CI fast; JAX_NUM_GENERATED_CASES=10 runs upstream's sweep.
cm.generated_cases(3)

map, unsafe_map = safe_map, map
zip, unsafe_zip = safe_zip, zip


class LaxVmapConvTest(cm.ConvmmTestCase):

  def _CheckBatching(self, op, bdim_size, bdims, shapes, dtypes, rng,
                     rtol=None, atol=None, multiple_results=False):
    batched_shapes = map(partial(lax_test_util.add_bdim, bdim_size), bdims, shapes)
    args = [rng(shape, dtype) for shape, dtype in zip(batched_shapes, dtypes)]
    args_slice = lax_test_util.args_slicer(args, bdims)
    ans = jax.vmap(op, bdims)(*args)
    if bdim_size == 0:
      args = [rng(shape, dtype) for shape, dtype in zip(shapes, dtypes)]
      out = op(*args)
      if not multiple_results:
        expected = np.zeros((0,) + out.shape, out.dtype)
      else:
        expected = [np.zeros((0,) + o.shape, o.dtype) for o in out]
    else:
      outs = [op(*args_slice(i)) for i in range(bdim_size)]
      if not multiple_results:
        expected = np.stack(outs)
      else:
        expected = [np.stack(xs) for xs in zip(*outs)]
    self.assertAllClose(ans, expected, rtol=rtol, atol=atol)

  @jtu.sample_product(
    [dict(lhs_shape=lhs_shape, rhs_shape=rhs_shape,
          batch_group_count=batch_group_count,
          feature_group_count=feature_group_count)
     for batch_group_count, feature_group_count in [(1, 1), (2, 1), (1, 2)]
     for b, i, j in itertools.product([1, 2], repeat=3)
     for lhs_shape in [(b * batch_group_count, i * feature_group_count, 6, 7)]
     for rhs_shape in [(j * batch_group_count * feature_group_count, i, 1, 2)]],
    [dict(lhs_bdim=lhs_bdim, rhs_bdim=rhs_bdim)
        for lhs_bdim in itertools.chain([cast(Union[int, None], None)], range(5))
        for rhs_bdim in itertools.chain([cast(Union[int, None], None)], range(5))
        if (lhs_bdim, rhs_bdim) != (None, None)
    ],
    [dict(dimension_numbers=dim_nums, perms=perms)
     for dim_nums, perms in [
       (("NCHW", "OIHW", "NCHW"), ([0, 1, 2, 3], [0, 1, 2, 3])),
       (("NHWC", "HWIO", "NHWC"), ([0, 2, 3, 1], [2, 3, 1, 0])),
       (("NHWC", "OIHW", "NCHW"), ([0, 2, 3, 1], [0, 1, 2, 3])),
       (("HWCN", "HWIO", "HWCN"), ([2, 3, 1, 0], [2, 3, 1, 0])),
    ]],
    strides=[(1, 1), (1, 2), (2, 1)],
    padding=[((0, 0), (0, 0)), ((1, 0), (0, 1)), ((0, -1), (0, 0))],
    lhs_dil=[(1, 1), (2, 1)],
    rhs_dil=[(1, 1), (2, 2)],
    bdim_size=list(range(5)),
    dtype=[np.float32],
  )
  def testConvGeneralDilatedBatching(
      self, lhs_shape, rhs_shape, dtype, strides, padding, lhs_dil, rhs_dil,
      dimension_numbers, perms, feature_group_count, batch_group_count,
      lhs_bdim, rhs_bdim, bdim_size):
    rng = jtu.rand_default(self.rng())
    tol = 1e-1 if dtypes.finfo(dtype).bits <= 32 else 1e-3

    # permute shapes to match dim_spec, scale by feature_group_count
    lhs_perm, rhs_perm = perms
    lhs_shape = list(np.take(lhs_shape, lhs_perm))
    rhs_shape = list(np.take(rhs_shape, rhs_perm))

    conv = partial(cm.conv_general_dilated, window_strides=strides,
                   padding=padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                   dimension_numbers=dimension_numbers,
                   feature_group_count=feature_group_count,
                   batch_group_count=batch_group_count,
                   precision=lax.Precision.HIGHEST)
    self._CheckBatching(conv, bdim_size, (lhs_bdim, rhs_bdim),
                        (lhs_shape, rhs_shape), (dtype, dtype), rng, rtol=tol,
                        atol=tol)


if __name__ == '__main__':
  absltest.main(testLoader=jtu.JaxTestLoader())
