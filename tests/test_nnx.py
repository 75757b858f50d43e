"""Parity of ``convmm.nnx`` with ``flax.nnx``, and of ``convmm.nnx`` with ``convmm.linen``.

References are Flax's own layers: ``flax.nnx.Conv``/``ConvTranspose`` for the
layers Flax has in NNX, ``flax.linen.ConvLocal`` for ``ConvLocal`` and
``flax.nnx.Conv`` for the parameters ``ConvAdjoint`` draws. Shapes follow
tests/test_linen.py, so that the eagerly compiled ops are shared.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from layer_testing import key_init, normal, torch_conv
from tolerances import assert_close

import convmm
import convmm.nnx as cnnx
from convmm import linen as cnn

HIGHEST = lax.Precision.HIGHEST
X2D = (2, 7, 6, 4)
# A NumPy-drawn kernel initialiser (a function of the key, cheap for many shapes);
# test_signature_matches_flax and the ConvAdjoint/ConvLocal draws cover the defaults.
FAST = dict(kernel_init=key_init, precision=HIGHEST)


def _assert_states_equal(actual, expected):
  actual, expected = nnx.state(actual, nnx.Param), nnx.state(expected, nnx.Param)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(e, np.float64))


def _value_and_grads(module, x):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, x):
    y = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, grads


def check_parity(ours, ref, x, reduction, grads=True):
  """Same parameters; close outputs and (if ``grads``) gradients."""
  _assert_states_equal(ours, ref)
  if not grads:
    y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, reduction=reduction)
    return
  y, (dp, dx) = _value_and_grads(ours, x)
  y_ref, (dp_ref, dx_ref) = _value_and_grads(ref, x)
  assert y.dtype == y_ref.dtype
  assert_close(y, y_ref, reduction=reduction)
  assert_close(dx, dx_ref, dtype=y.dtype, reduction=reduction, grad=True)
  for d, d_ref in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
    assert_close(d, d_ref, dtype=y.dtype, reduction=reduction * y.size // y.shape[-1], grad=True)


# ----------------------------------------------------------------------------- signatures


def _init_parameters(cls):
  parameters = dict(inspect.signature(cls.__init__).parameters)
  del parameters["self"]
  return parameters


@pytest.mark.parametrize("name", ["Conv", "ConvTranspose"])
def test_signature_matches_flax(name):
  ours = _init_parameters(getattr(cnnx, name))
  theirs = _init_parameters(getattr(nnx, name))
  # Flax's arguments in Flax's order, then convmm's (keyword-only).
  assert list(ours) == [*theirs, "method"] and "padding" in theirs
  assert ours.pop("method").default is None
  for arg, param in theirs.items():
    assert ours[arg].kind == param.kind, arg
    default = ours[arg].default
    if arg in ("kernel_init", "bias_init"):
      shape = (3, 3, 4, 5)
      np.testing.assert_array_equal(
        default(jax.random.key(0), shape), param.default(jax.random.key(0), shape)
      )
    elif arg == "conv_general_dilated":
      assert default is convmm.conv_general_dilated
    else:
      assert default == param.default, (arg, default, param.default)


def test_conv_local_and_adjoint_mirror_the_linen_fields():
  local = _init_parameters(cnnx.ConvLocal)
  conv = _init_parameters(cnnx.Conv)
  # No `method`: convmm alone computes a locally connected layer.
  assert set(local) == set(conv) - {"conv_general_dilated", "method"} | {"input_spatial_shape"}
  adjoint = _init_parameters(cnnx.ConvAdjoint)
  linen_fields = set(cnn.ConvAdjoint.__dataclass_fields__) - {"features", "parent", "name"}
  assert set(adjoint) == linen_fields | {
    "in_features",
    "out_features",
    "rngs",
    "kernel_metadata",
    "bias_metadata",
  }


# ----------------------------------------------------------------------------- Conv

CONV_CASES = {
  "same": (dict(kernel_size=(3, 3)), X2D),
  "circular_even_dilated": (
    dict(kernel_size=(2, 3), strides=2, kernel_dilation=(1, 2), padding="CIRCULAR"),
    X2D,
  ),
  "reflect_dilated": (dict(kernel_size=(3, 3), kernel_dilation=2, padding="REFLECT"), X2D),
  "pair_and_int": (dict(kernel_size=(3, 3), padding=((2, 0), 1)), X2D),
  "mask_no_bias": (
    dict(kernel_size=(3, 3), use_bias=False, mask=np.tril(np.ones((3, 3, 4, 5), np.float32))),
    X2D,
  ),
  "1d_causal_int_kernel": (
    dict(kernel_size=3, strides=2, kernel_dilation=2, padding="CAUSAL"),
    (2, 9, 4),
  ),
  "two_batch_dims": (dict(kernel_size=(3, 3), strides=2), (2, 3, *X2D[1:])),
}


@pytest.mark.parametrize("kwargs, shape", list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv_parity(kwargs, shape):
  kwargs = dict(FAST, **kwargs)
  ours = cnnx.Conv(shape[-1], 5, **kwargs, rngs=nnx.Rngs(0))
  ref = nnx.Conv(shape[-1], 5, **kwargs, rngs=nnx.Rngs(0))
  check_parity(ours, ref, normal(1, shape), 9 * shape[-1], grads=len(shape) < 5)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(feature_group_count=2, out_features=6),
    dict(dtype=jnp.bfloat16),
    dict(param_dtype=jnp.bfloat16),
    dict(dtype=jnp.bfloat16, preferred_element_type=jnp.float32),
  ],
  ids=["groups", "dtype_bf16", "param_dtype_bf16", "preferred_element_type"],
)
def test_conv_parity_forward(kwargs):
  kwargs = dict(dict(out_features=5, kernel_size=(3, 3), **FAST), **kwargs)
  ours, ref = cnnx.Conv(4, **kwargs, rngs=nnx.Rngs(0)), nnx.Conv(4, **kwargs, rngs=nnx.Rngs(0))
  check_parity(ours, ref, normal(1, X2D), 36, grads=False)


def test_conv_param_metadata():
  kwargs = dict(
    kernel_metadata=dict(out_sharding=(None, None, None, "x")),
    bias_metadata=dict(out_sharding=("x",)),
  )
  with jax.set_mesh(jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,))):
    ours = cnnx.Conv(4, 5, (3, 3), **kwargs, rngs=nnx.Rngs(0))
    ref = nnx.Conv(4, 5, (3, 3), **kwargs, rngs=nnx.Rngs(0))
  assert ours.kernel.get_metadata() == ref.kernel.get_metadata()
  assert ours.bias.get_metadata() == ref.bias.get_metadata()
  assert ours.kernel.get_metadata()["out_sharding"] == (None, None, None, "x")


def test_conv_out_sharding():
  ours = cnnx.Conv(4, 5, (3, 3), rngs=nnx.Rngs(0))
  ref = nnx.Conv(4, 5, (3, 3), rngs=nnx.Rngs(0))
  with jax.set_mesh(jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,))):
    x = jax.device_put(normal(1, X2D), P("x"))
    for spec in (P("x"), P(None, "x"), P(None, None, None, "x")):
      y, y_ref = ours(x, out_sharding=spec), ref(x, out_sharding=spec)
      assert y.sharding.spec == y_ref.sharding.spec
      assert y.sharding.spec == P(*spec, *(None,) * (4 - len(spec)))
      assert_close(y, y_ref, reduction=36)


def test_conv_under_nnx_jit_and_grad():
  ours = cnnx.Conv(4, 5, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
  ref = nnx.Conv(4, 5, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
  x = normal(1, X2D)

  @nnx.jit
  def grads(model, x):
    return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)

  g, g_ref = grads(ours, x), grads(ref, x)
  assert_close(g["kernel"][...], g_ref["kernel"][...], reduction=36 * 84, grad=True)


# ----------------------------------------------------------------------------- ConvTranspose

TRANSPOSE_CASES = {
  "same_stride2": (dict(kernel_size=(3, 3), strides=2), X2D),
  "circular_even_transpose_kernel": (
    dict(kernel_size=(4, 2), strides=(2, 1), padding="CIRCULAR", transpose_kernel=True),
    X2D,
  ),
  "pair_and_int": (dict(kernel_size=(3, 3), strides=2, padding=((2, 1), 1)), X2D),
  "mask_no_bias": (
    dict(
      kernel_size=(3, 3), strides=2, use_bias=False, mask=np.triu(np.ones((3, 3, 4, 5), np.float32))
    ),
    X2D,
  ),
  "unbatched": (dict(kernel_size=(3, 3), strides=2), X2D[1:]),
  # Padding that leaves one output dimension empty: Flax returns an empty array.
  "dilated_pairs_empty_output": (
    dict(kernel_size=(2, 3), kernel_dilation=(2, 1), padding=((-2, 0), (1, 1))),
    (2, 2, 5, 4),
  ),
  "dilated_pairs": (
    dict(kernel_size=(3, 2), strides=(2, 1), kernel_dilation=(2, 3), padding=((-1, 2), (0, -1))),
    X2D,
  ),
}


@pytest.mark.parametrize("kwargs, shape", list(TRANSPOSE_CASES.values()), ids=list(TRANSPOSE_CASES))
def test_conv_transpose_parity(kwargs, shape):
  kwargs = dict(FAST, **kwargs)
  ours = cnnx.ConvTranspose(shape[-1], 5, **kwargs, rngs=nnx.Rngs(0))
  ref = nnx.ConvTranspose(shape[-1], 5, **kwargs, rngs=nnx.Rngs(0))
  check_parity(ours, ref, normal(1, shape), 9 * shape[-1], grads=len(shape) == 4)


def test_conv_transpose_preferred_element_type():
  kwargs = dict(strides=2, dtype=jnp.bfloat16, preferred_element_type=jnp.float32, **FAST)
  ours = cnnx.ConvTranspose(4, 5, (3, 3), **kwargs, rngs=nnx.Rngs(0))
  ref = nnx.ConvTranspose(4, 5, (3, 3), **kwargs, rngs=nnx.Rngs(0))
  x = normal(1, X2D, jnp.bfloat16)
  check_parity(ours, ref, x, 36, grads=False)
  assert ours(x).dtype == jnp.float32


# ----------------------------------------------------------------------------- ConvLocal


def test_conv_local_parameters_follow_nnx():
  # Kernel then bias from rngs.params(), with Flax's default initialisers.
  layer = cnnx.ConvLocal(4, 5, (3, 3), strides=2, input_spatial_shape=X2D[1:3], rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(0)
  kernel = nnx.initializers.lecun_normal()(rngs.params(), (4, 3, 36, 5))
  np.testing.assert_array_equal(layer.kernel[...], kernel)
  np.testing.assert_array_equal(layer.bias[...], np.zeros((4, 3, 5), np.float32))


@pytest.mark.parametrize(
  "kwargs, shape",
  [
    (dict(kernel_size=(3, 3), strides=2, padding="CIRCULAR"), X2D),
    (dict(kernel_size=3, padding="CAUSAL", use_bias=False), (2, 3, 9, 4)),
  ],
  ids=["circular", "1d_causal_two_batch_dims"],
)
def test_conv_local_matches_flax_linen(kwargs, shape):
  rank = 1 if isinstance(kwargs["kernel_size"], int) else len(kwargs["kernel_size"])
  layer = cnnx.ConvLocal(
    shape[-1], 5, **kwargs, input_spatial_shape=shape[-rank - 1 : -1], **FAST, rngs=nnx.Rngs(0)
  )
  ref = nn.ConvLocal(5, **kwargs, **FAST)
  params = {"params": {k: v[...] for k, v in nnx.state(layer, nnx.Param).items()}}
  x = normal(1, shape)
  jax.tree.map(
    lambda a, b: np.testing.assert_equal(a.shape, b.shape), params, ref.init(jax.random.key(0), x)
  )
  assert_close(layer(x), ref.apply(params, x), reduction=9 * shape[-1])


# ----------------------------------------------------------------------------- ConvAdjoint


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_adjoint_draws_the_forward_conv_kernel(groups):
  # ConvAdjoint(in, out) draws exactly the kernel of flax.nnx.Conv(out, in).
  kwargs = dict(feature_group_count=groups, use_bias=False)
  adjoint = cnnx.ConvAdjoint(6, 4, (3, 2), **kwargs, rngs=nnx.Rngs(3))
  forward = nnx.Conv(4, 6, (3, 2), **kwargs, rngs=nnx.Rngs(3))
  _assert_states_equal(adjoint, forward)
  assert adjoint.kernel.shape == (3, 2, 4 // groups, 6)


def test_conv_adjoint_tied_to_a_conv_is_its_vjp():
  forward = nnx.Conv(
    4, 6, (3, 3), strides=2, padding="CIRCULAR", use_bias=False, precision=HIGHEST, rngs=nnx.Rngs(0)
  )
  adjoint = cnnx.ConvAdjoint(
    6, 4, (3, 3), strides=2, padding="CIRCULAR", use_bias=False, precision=HIGHEST, rngs=nnx.Rngs(1)
  )
  adjoint.kernel = forward.kernel  # the same nnx.Param
  x = normal(1, (2, 8, 6, 4))
  y, vjp = jax.vjp(forward, x)
  assert_close(adjoint(y), vjp(y)[0], reduction=54)


# ----------------------------------------------------------------------------- linen == nnx

LINEN_NNX_CASES = {
  "Conv": (dict(kernel_size=(3, 3), strides=2, padding="REFLECT", feature_group_count=2), X2D),
  "ConvLocal": (dict(kernel_size=(3, 3), strides=2, padding=((1, 0), 2)), X2D),
  "ConvTranspose": (
    dict(kernel_size=(3, 3), strides=2, padding="CIRCULAR", transpose_kernel=True),
    X2D,
  ),
  "ConvAdjoint": (
    dict(kernel_size=(3, 3), strides=2, padding=1, output_padding=1, feature_group_count=2),
    (2, 4, 3, 6),
  ),
}


@pytest.mark.parametrize("name", list(LINEN_NNX_CASES))
def test_linen_equals_nnx(name):
  kwargs, shape = LINEN_NNX_CASES[name]
  x = normal(1, shape)
  linen_layer = getattr(cnn, name)(features=4, **kwargs)
  variables = linen_layer.init(jax.random.key(0), x)
  extra = dict(input_spatial_shape=shape[1:3]) if name == "ConvLocal" else {}
  nnx_layer = getattr(cnnx, name)(shape[-1], 4, **kwargs, **extra, rngs=nnx.Rngs(0))
  nnx.update(nnx_layer, nnx.State(variables["params"]))
  np.testing.assert_array_equal(nnx_layer(x), linen_layer.apply(variables, x))


# ----------------------------------------------------------------------------- errors

ERROR_CASES = {
  # name: (layer, args, kwargs, exception, message regex)
  "conv_groups": (
    cnnx.Conv,
    (4, 6, (3, 3)),
    dict(feature_group_count=3),
    ValueError,
    r"Conv: `feature_group_count` \(=3\) must divide both feature counts, "
    r"got 4 input and 6 output",
  ),
  "conv_mask": (
    cnnx.Conv,
    (4, 5, (3, 3)),
    dict(mask=np.ones((3, 3, 5, 4))),
    ValueError,
    r"Conv: `mask` must have the kernel's shape \(3, 3, 4, 5\)",
  ),
  "conv_causal_2d": (
    cnnx.Conv,
    (4, 5, (3, 3)),
    dict(padding="CAUSAL"),
    ValueError,
    r"Conv: `padding`='CAUSAL' is only defined for one spatial",
  ),
  "conv_padding": (
    cnnx.Conv,
    (4, 5, (3, 3)),
    dict(padding="FULL"),
    ValueError,
    r"Conv: `padding` must be one of",
  ),
  "conv_strides": (
    cnnx.Conv,
    (4, 5, (3, 3), (1, 2, 3)),
    {},
    ValueError,
    r"Conv: `strides` must have one entry per spatial dimension \(2\)",
  ),
  "transpose_same_lower": (
    cnnx.ConvTranspose,
    (4, 5, (3, 3), 2),
    dict(padding="SAME_LOWER"),
    ValueError,
    r"ConvTranspose: `padding`='SAME_LOWER' requires `strides` of 1",
  ),
  "transpose_mask": (
    cnnx.ConvTranspose,
    (4, 5, (3, 3)),
    dict(mask=np.ones((3, 3, 4))),
    ValueError,
    r"ConvTranspose: `mask` must have the kernel's shape",
  ),
  "local_groups": (
    cnnx.ConvLocal,
    (4, 6, (3, 3)),
    dict(feature_group_count=2, input_spatial_shape=(7, 6)),
    ValueError,
    r"ConvLocal: `feature_group_count` must be 1",
  ),
  "local_spatial_rank": (
    cnnx.ConvLocal,
    (4, 6, (3, 3)),
    dict(input_spatial_shape=(7,)),
    ValueError,
    r"ConvLocal: the input spatial shape \(7,\) must "
    r"have one size per `kernel_size` dimension",
  ),
  "adjoint_output_padding": (
    cnnx.ConvAdjoint,
    (4, 6, (3, 3), 2),
    dict(padding="VALID", output_padding=2),
    ValueError,
    r"ConvAdjoint: `output_padding` \(=\(2, 2\)\) must be < "
    r"`strides` \(=\(2, 2\)\)",
  ),
  "adjoint_groups": (
    cnnx.ConvAdjoint,
    (4, 6, (3, 3)),
    dict(feature_group_count=4),
    ValueError,
    r"ConvAdjoint: `feature_group_count` \(=4\) must divide",
  ),
  "adjoint_mask": (
    cnnx.ConvAdjoint,
    (4, 6, (3, 3)),
    dict(mask=np.ones((3, 3, 4, 6))),
    ValueError,
    r"ConvAdjoint: `mask` must have the kernel's shape "
    r"\(3, 3, 6, 4\)",
  ),
}


@pytest.mark.parametrize(
  "layer, args, kwargs, error, match", list(ERROR_CASES.values()), ids=list(ERROR_CASES)
)
def test_construction_errors(layer, args, kwargs, error, match):
  with pytest.raises(error, match=match):
    layer(*args, **kwargs, rngs=nnx.Rngs(0))


CALL_ERROR_CASES = {
  "conv_in_features": (
    cnnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0)),
    X2D,
    r"Conv: the last dimension of the inputs must be `in_features` "
    r"\(=3\), got inputs.shape=\(2, 7, 6, 4\)",
  ),
  "conv_rank": (
    cnnx.Conv(4, 5, (3, 3, 3), rngs=nnx.Rngs(0)),
    X2D[1:],
    r"Conv: inputs must be \(\*batch, \*spatial, features\) with 3 spatial",
  ),
  "local_spatial": (
    cnnx.ConvLocal(4, 5, (3, 3), input_spatial_shape=(8, 6), rngs=nnx.Rngs(0)),
    X2D,
    r"ConvLocal: the inputs' spatial shape must be `input_spatial_shape` "
    r"\(=\(8, 6\)\)",
  ),
  "transpose_in_features": (
    cnnx.ConvTranspose(3, 5, (3, 3), rngs=nnx.Rngs(0)),
    X2D,
    r"ConvTranspose: the last dimension of the inputs must be "
    r"`in_features` \(=3\)",
  ),
  "adjoint_in_features": (
    cnnx.ConvAdjoint(3, 5, (3, 3), rngs=nnx.Rngs(0)),
    X2D,
    r"ConvAdjoint: the last dimension of the inputs must be "
    r"`in_features` \(=3\)",
  ),
}


@pytest.mark.parametrize(
  "layer, shape, match", list(CALL_ERROR_CASES.values()), ids=list(CALL_ERROR_CASES)
)
def test_call_errors(layer, shape, match):
  with pytest.raises(ValueError, match=match):
    layer(jnp.ones(shape))


def test_mask_replaced_after_construction_is_checked():
  layer = cnnx.Conv(4, 5, (3, 3), mask=jnp.ones((3, 3, 4, 5)), rngs=nnx.Rngs(0))
  layer.mask = jnp.ones((3, 3, 4))
  with pytest.raises(ValueError, match=r"Conv: `mask` must have the kernel's shape"):
    layer(jnp.ones(X2D))


def test_conv_replicate_padding_matches_torch():
  # k_eff = (3, 3): one edge value on each side, torch's padding=1 with
  # padding_mode='replicate'.
  layer = cnnx.Conv(
    4,
    6,
    kernel_size=(3, 2),
    strides=(2, 1),
    padding="REPLICATE",
    kernel_dilation=(1, 2),
    feature_group_count=2,
    **FAST,
    rngs=nnx.Rngs(0),
  )
  x = normal(1, X2D)
  expected = torch_conv(
    x,
    layer.kernel[...],
    layer.bias[...],
    strides=(2, 1),
    padding=1,
    dilation=(1, 2),
    groups=2,
    padding_mode="replicate",
  )
  assert_close(layer(x), expected.astype(np.float32), dtype=jnp.float32, reduction=12)


@pytest.mark.parametrize("name", ["Conv", "ConvLocal", "ConvTranspose", "ConvAdjoint"])
def test_layers_validate_once_at_construction(name, monkeypatch):
  # Equinox style: __init__ validates and keeps the canonical geometry; __call__ only
  # computes, so no geometry builder runs again.
  from convmm._layers import geometry as _layer_geometry

  extra = dict(input_spatial_shape=X2D[1:3]) if name == "ConvLocal" else {}
  layer = getattr(cnnx, name)(4, 5, (3, 3), padding="VALID", **extra, rngs=nnx.Rngs(0))
  assert isinstance(layer.geometry, _layer_geometry.LayerGeometry)
  assert layer.geometry.kernel_size == (3, 3) and layer.geometry.padding == "VALID"

  def fail(*args, **kwargs):
    raise AssertionError("validated again")

  for builder in ("conv_layer_geometry", "transpose_layer_geometry", "adjoint_layer_geometry"):
    monkeypatch.setattr(_layer_geometry, builder, fail)
  assert layer(normal(1, X2D)).shape[-1] == 5
