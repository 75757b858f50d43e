"""The vendored JAX tests exercise convmm, not XLA's convolution.

Three independent proofs: the jaxprs of the substituted functions (forward, JVP,
VJP, batching) contain no ``conv_general_dilated`` primitive while lax's do, their
lowered programs contain no ``stablehlo.convolution``, and the guard that the
vendored tests run under rejects XLA's conv.
"""

from __future__ import annotations

import convmm_shims as cm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

LHS = np.linspace(-1.0, 1.0, 2 * 4 * 7 * 6, dtype=np.float32).reshape(2, 4, 7, 6)
RHS = np.linspace(-1.0, 1.0, 4 * 2 * 3 * 2, dtype=np.float32).reshape(4, 2, 3, 2)
CONV_KW = dict(
  window_strides=(2, 1),
  padding=((1, 0), (0, 2)),
  lhs_dilation=(1, 2),
  rhs_dilation=(2, 1),
  feature_group_count=2,
)


def forward(conv):
  return lambda x, w: conv(x, w, **CONV_KW)


def transforms(conv):
  f = forward(conv)
  loss = lambda x, w: jnp.sum(f(x, w) ** 2)
  return {
    "forward": (f, (LHS, RHS)),
    "vjp": (jax.grad(loss, argnums=(0, 1)), (LHS, RHS)),
    "jvp": (lambda x, w: jax.jvp(f, (x, w), (x, w)), (LHS, RHS)),
    "vmap": (jax.vmap(f, in_axes=(0, None)), (np.stack([LHS, LHS]), RHS)),
    "hessian_vp": (jax.grad(lambda x, w: jnp.sum(jax.grad(loss)(x, w) ** 2)), (LHS, RHS)),
  }


@pytest.mark.parametrize("transform", list(transforms(lax.conv_general_dilated)))
def test_conv_general_dilated_jaxpr_has_no_xla_conv(transform):
  fn, args = transforms(cm.conv_general_dilated)[transform]
  assert "conv_general_dilated" not in cm.primitive_names(jax.make_jaxpr(fn)(*args))
  # The same transform of lax binds the primitive, so the check above can fail.
  lax_fn, _ = transforms(lax.conv_general_dilated)[transform]
  assert "conv_general_dilated" in cm.primitive_names(jax.make_jaxpr(lax_fn)(*args))


@pytest.mark.parametrize("transform", ["forward", "vjp"])
def test_conv_general_dilated_lowers_to_no_xla_convolution(transform):
  # convmm's own primitives are opaque in a jaxpr: the compiled program is the proof.
  fn, args = transforms(cm.conv_general_dilated)[transform]
  assert "stablehlo.convolution" not in jax.jit(fn).lower(*args).as_text()
  lax_fn, _ = transforms(lax.conv_general_dilated)[transform]
  assert "stablehlo.convolution" in jax.jit(lax_fn).lower(*args).as_text()


@pytest.mark.parametrize(
  "name, fn",
  [
    (
      "conv_transpose",
      lambda x, w: cm.conv_transpose(
        x, w.transpose(1, 0, 2, 3), (2, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
      ),
    ),
    ("conv", lambda x, w: cm.conv(x, w[:, :2].repeat(2, 1), (1, 2), "SAME")),
    (
      "conv_with_general_padding",
      lambda x, w: cm.conv_with_general_padding(
        x, w.repeat(2, 1), (1, 1), ((1, 1), (0, 1)), (2, 1), (1, 2)
      ),
    ),
    ("patches", lambda x, w: cm.conv_general_dilated_patches(x, (3, 2), (1, 2), "VALID")),
  ],
)
def test_other_shims_jaxpr_has_no_xla_conv(name, fn):
  loss = lambda x, w: jnp.sum(fn(x, w) ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=0))(LHS, RHS)
  assert "conv_general_dilated" not in cm.primitive_names(jaxpr)
  assert cm.calls.get(name if name != "patches" else "conv_general_dilated_patches", 0) > 0


def test_guard_rejects_xla_conv_and_admits_references():
  with cm.xla_conv_forbidden():
    cm.conv_general_dilated(LHS, RHS, **CONV_KW)
    with pytest.raises(cm.XlaConvBound):
      lax.conv_general_dilated(LHS, RHS, **CONV_KW)
    with pytest.raises(cm.XlaConvBound):
      jax.jit(forward(lax.conv_general_dilated))(LHS + 1, RHS)
    with cm.xla_conv_allowed():
      expected = lax.conv_general_dilated(LHS, RHS, **CONV_KW, precision="highest")
  np.testing.assert_allclose(
    cm.conv_general_dilated(LHS, RHS, **CONV_KW, precision="highest"),
    expected,
    rtol=1e-5,
    atol=1e-5,
  )
  # Leaving the guard restores lax.
  assert lax.conv_general_dilated(LHS, RHS, **CONV_KW).shape == expected.shape
