# Copyright 2021 The JAX Authors.
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
# Vendored by convmm from jax-ml/jax, tests/pjit_test.py at tag jax-v0.10.2
# (commit 990e6a0b84138346e6a38785412f36356e0e5dc3): the convolution tests of
# ShardingInTypesTest (test_conv_general_dilated, test_grad_conv_general_dilated,
# test_vmap_conv_general_dilated) and its helper check_wsc_in_lowered, with
# convmm's conv_general_dilated substituted for lax's through ``convmm_shims``
# (``cm.``). Every other change from upstream is marked "convmm:".
#
# Like upstream, this needs 8 CPU devices (``jtu.request_cpu_devices(8)`` before
# the backend starts), so ``test_pjit_conv.py`` runs each test in a fresh
# subprocess: ``python pjit_conv_cases.py ShardingInTypesConvTest.<name>``.
"""JAX 0.10.2's convolution tests from ``pjit_test.py``, run on convmm."""

import convmm_shims as cm
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from jax import lax
from jax._src import config, core
from jax._src import test_util as jtu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

config.parse_flags_with_absl()

jtu.request_cpu_devices(8)


class ShardingInTypesConvTest(cm.ConvmmTestCase):

  def check_wsc_in_lowered(self, text):
    if config.use_shardy_partitioner.value:
      self.assertIn('sdy.sharding_constraint', text)
    else:
      self.assertIn('@Sharding', text)

  def tearDown(self):
    # convmm: the pytest fixture that checks this runs in the parent process.
    made = sum(cm.calls.values())
    super().tearDown()
    self.assertGreater(made, 0, "the test made no call to convmm")

  @jtu.with_explicit_mesh((4, 2), ('x', 'y'))
  def test_conv_general_dilated(self, mesh):
    arr = jax.device_put(np.zeros((16, 128, 8)), P('x', 'y'))

    @jax.jit
    def f(x):
      # Conv1D across sharded y-axis:
      out = cm.conv_general_dilated(
          x, np.zeros((5, 8, 10)),
          window_strides=(1,), padding='SAME', feature_group_count=1,
          lhs_dilation=(1,), rhs_dilation=(1,),
          dimension_numbers=('NWC', 'WIO', 'NWC'))
      self.assertEqual(out.aval.sharding.spec, P('x', 'y', None))
      # Max pooling along sharded y-axis.
      out2 = jax.lax.reduce_window(
          out, -np.inf, jax.lax.max, (1,2,1), (1,2,1), 'SAME')
      self.assertEqual(out2.aval.sharding.spec, P('x', 'y', None))
      return out2

    out = f(arr)
    self.assertEqual(out.sharding, NamedSharding(mesh, P('x', 'y', None)))
    self.check_wsc_in_lowered(f.lower(arr).as_text())

    jax.jit(jax.grad(lambda x: f(x).sum()))(arr)  # doesn't crash

    with self.assertRaises(core.ShardingTypeError):
      arr2 = jax.device_put(np.zeros((16, 128, 8)), P('x', None, 'y'))
      f(arr2)


  @jtu.with_explicit_mesh((2,), 'x')
  def test_grad_conv_general_dilated(self, mesh):
    @jax.jit
    def model(kernel, inputs):
      padded_inputs = jnp.pad(inputs, ((0, 0), (2, 0), (0, 0)))
      return cm.conv_general_dilated(
          padded_inputs,
          kernel,
          window_strides=(1,),
          padding="VALID",
          dimension_numbers=lax.ConvDimensionNumbers(
              (0, 2, 1), (2, 1, 0), (0, 2, 1)))

    batch_size = 64
    seq_length = 32
    kernel = jax.random.normal(jax.random.key(0), (3, 1, 16))
    inputs = jax.random.normal(jax.random.key(1), (batch_size, seq_length, 1))
    inputs = jax.device_put(inputs, P('x', None, None))

    out1, out2 = jax.jit(jax.grad(lambda x, y: model(x, y).sum(), argnums=(0, 1))
                         )(kernel, inputs)
    self.assertEqual(out1.sharding, kernel.sharding)
    self.assertEqual(out2.sharding, inputs.sharding)

  @jtu.with_explicit_mesh((2, 2,), ('x', 'y'))
  def test_vmap_conv_general_dilated(self, mesh):
    @jax.jit
    def model(kernel, inputs):
      padded_inputs = jnp.pad(inputs, ((0, 0), (2, 0), (0, 0)))
      return cm.conv_general_dilated(
          padded_inputs,
          kernel,
          window_strides=(1,),
          padding="VALID",
          dimension_numbers=lax.ConvDimensionNumbers(
              (0, 2, 1), (2, 1, 0), (0, 2, 1)),
          out_sharding=P(None, None, None))

    batch_size = 64
    seq_length = 32
    vmap_size = 16
    kernel = jax.random.normal(
        jax.random.key(0), (3, 1, 16))
    inputs = jax.random.normal(
        jax.random.key(1), (batch_size, vmap_size, seq_length, 1))
    inputs = jax.device_put(inputs, P('x', None, None, None))
    kernel = jax.device_put(kernel, P(None, None, None))

    out = jax.jit(
        jax.vmap(model, in_axes=(None, 0), out_axes=1))(kernel, inputs)

    self.assertEqual(
        out.sharding, NamedSharding(mesh, P(None, 'x', None, None)))


if __name__ == '__main__':
  absltest.main(testLoader=jtu.JaxTestLoader())
