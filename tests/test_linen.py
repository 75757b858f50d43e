"""Parity of ``convmm.linen`` with ``flax.linen``: fields, parameters, outputs, gradients.

The reference is always Flax's own layer (which calls ``jax.lax``), built with
the same fields and initialised with the same key. Parameters must be equal,
outputs and gradients close (tests/tolerances.py). Everything runs eagerly on
small, mostly shared shapes, so compiled ops are reused across cases.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax
from layer_testing import key_init, normal, torch_conv
from tolerances import assert_close

import convmm
from convmm import linen as cnn

HIGHEST = lax.Precision.HIGHEST
X2D = (2, 7, 6, 4)  # (N, H, W, C), shared by most cases
# Case tables use a NumPy-drawn kernel initialiser (still a function of the key),
# which is much cheaper to run for many kernel shapes than lecun_normal;
# test_default_initialisers covers Flax's defaults.
FAST = dict(kernel_init=key_init, precision=HIGHEST)


def _assert_params_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(e, np.float64))


def _loss(module, variables, x):
  y = module.apply(variables, x)
  # A fixed nonlinear read-out, so the gradient depends on every output element.
  return jnp.sum(jnp.sin(y.astype(jnp.float32))), y


def check_parity(ours, ref, x, reduction, grads=True):
  """Same parameters from the same key; close outputs and (if ``grads``) gradients.

  Tolerances are those of the output dtype (the computation dtype), also for
  the gradients with respect to float32 inputs and parameters. Cases that only
  exercise shape plumbing or dtypes skip the (costly to compile) gradients.
  """
  variables = ref.init(jax.random.key(0), x)
  _assert_params_equal(ours.init(jax.random.key(0), x), variables)
  if not grads:
    y, y_ref = ours.apply(variables, x), ref.apply(variables, x)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, reduction=reduction)
    return
  grad = jax.value_and_grad(_loss, argnums=(1, 2), has_aux=True)
  (_, y), (dv, dx) = grad(ours, variables, x)
  (_, y_ref), (dv_ref, dx_ref) = grad(ref, variables, x)
  assert y.dtype == y_ref.dtype
  assert_close(y, y_ref, reduction=reduction)
  assert_close(dx, dx_ref, dtype=y.dtype, reduction=reduction, grad=True)
  for d, d_ref in zip(jax.tree.leaves(dv), jax.tree.leaves(dv_ref)):
    # Kernel/bias gradients sum over the batch and the output positions too.
    assert_close(d, d_ref, dtype=y.dtype, reduction=reduction * y.size // y.shape[-1], grad=True)


# ----------------------------------------------------------------------------- packaging


def test_core_does_not_import_flax():
  # flax is an optional extra: `import convmm` must work without it.
  code = (
    "import sys; sys.modules['flax'] = None; import convmm; "
    "print(convmm.conv_general_dilated.__name__)"
  )
  result = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "conv_general_dilated"


# ----------------------------------------------------------------------------- fields


@pytest.mark.parametrize("name", ["Conv", "ConvLocal", "ConvTranspose"])
def test_fields_match_flax(name):
  ours = {f.name: f for f in dataclasses.fields(getattr(cnn, name))}
  for field in dataclasses.fields(getattr(nn, name)):
    assert field.name in ours, field.name
    default = ours[field.name].default
    if field.name in ("kernel_init", "bias_init"):
      shape = (3, 3, 4, 5)
      np.testing.assert_array_equal(
        default(jax.random.key(0), shape), field.default(jax.random.key(0), shape)
      )
    elif field.name not in ("parent", "name"):
      assert default == field.default, (field.name, default, field.default)
  flax_order = [f.name for f in dataclasses.fields(getattr(nn, name))]
  assert [n for n in ours if n in flax_order] == flax_order


def test_adjoint_fields():
  fields = {f.name: f.default for f in dataclasses.fields(cnn.ConvAdjoint)}
  assert fields["strides"] == 1 and fields["padding"] == "SAME"
  assert fields["output_padding"] == 0 and fields["feature_group_count"] == 1
  assert fields["preferred_element_type"] is None and fields["use_bias"] is True


@pytest.mark.parametrize(
  "name, kwargs",
  [
    ("Conv", dict(strides=2, feature_group_count=2, features=6)),
    ("ConvLocal", dict(strides=2)),
    ("ConvTranspose", dict(strides=2)),
    ("ConvTranspose", dict(transpose_kernel=True)),
  ],
  ids=["Conv", "ConvLocal", "ConvTranspose", "ConvTranspose_transpose_kernel"],
)
def test_default_initialisers(name, kwargs):
  kwargs = dict(dict(features=5, kernel_size=(3, 3)), **kwargs)
  x = normal(1, X2D)
  variables = getattr(nn, name)(**kwargs).init(jax.random.key(0), x)
  _assert_params_equal(getattr(cnn, name)(**kwargs).init(jax.random.key(0), x), variables)
  assert float(jnp.std(variables["params"]["kernel"])) > 0.01  # not the zeros init


# ----------------------------------------------------------------------------- Conv

MASK = np.tril(np.ones((3, 3, 4, 5), np.float32))

# Most cases share the kernel (3, 3) and 5 features, so that the ops compiled
# for one case are reused by the next (the tests run eagerly).
CONV_CASES = {
  "same": dict(features=5, kernel_size=(3, 3)),
  "same_lower_even": dict(features=5, kernel_size=(2, 2), padding="SAME_LOWER"),
  "valid_stride2": dict(features=5, kernel_size=(3, 3), strides=2, padding="VALID"),
  "lowercase_valid": dict(features=5, kernel_size=(3, 3), strides=2, padding="valid"),
  "circular_even_dilated": dict(
    features=5, kernel_size=(2, 3), strides=2, kernel_dilation=(1, 2), padding="CIRCULAR"
  ),
  "reflect_dilated": dict(features=5, kernel_size=(3, 3), kernel_dilation=2, padding="REFLECT"),
  "int_padding": dict(features=5, kernel_size=(3, 3), strides=(2, 1), padding=1),
  "pair_and_int": dict(features=5, kernel_size=(3, 3), padding=((2, 0), 1)),
  "input_dilation": dict(
    features=5, kernel_size=(3, 3), input_dilation=(2, 1), padding=((1, 1), (0, 1))
  ),
  "groups": dict(features=6, kernel_size=(3, 3), feature_group_count=2),
  "mask_no_bias": dict(features=5, kernel_size=(3, 3), mask=MASK, use_bias=False),
  "none_strides": dict(
    features=5, kernel_size=(3, 3), strides=None, kernel_dilation=None, input_dilation=None
  ),
  "param_dtype_bf16": dict(features=5, kernel_size=(3, 3), param_dtype=jnp.bfloat16),
  "dtype_bf16": dict(features=5, kernel_size=(3, 3), dtype=jnp.bfloat16),
}


def _conv_reduction(kwargs, in_features):
  size = kwargs["kernel_size"]
  size = (size,) if isinstance(size, int) else size
  return math.prod(size) * in_features // kwargs.get("feature_group_count", 1)


@pytest.mark.parametrize("kwargs", list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv_parity(kwargs):
  kwargs = dict(FAST, **kwargs)
  ref_kwargs = kwargs
  if kwargs.get("padding") == "valid":
    ref_kwargs = dict(kwargs, padding="VALID")  # padding strings are case-insensitive
  check_parity(
    cnn.Conv(**kwargs),
    nn.Conv(**ref_kwargs),
    normal(1, X2D),
    _conv_reduction(kwargs, X2D[-1]),
    grads=kwargs.get("dtype") is None,
  )


CONV_SHAPE_CASES = {
  # name: (kwargs, input shape)
  "1d_causal_int_kernel": (
    dict(features=5, kernel_size=3, strides=2, kernel_dilation=2, padding="CAUSAL"),
    (2, 9, 4),
  ),
  "3d_depthwise": (
    dict(features=4, kernel_size=(2, 2, 2), strides=(1, 2, 1), feature_group_count=4),
    (1, 4, 3, 3, 4),
  ),
}


@pytest.mark.parametrize(
  "kwargs, shape", list(CONV_SHAPE_CASES.values()), ids=list(CONV_SHAPE_CASES)
)
def test_conv_parity_shapes(kwargs, shape):
  kwargs = dict(FAST, **kwargs)
  # N-D and groups are core features with their own gradient tests.
  check_parity(
    cnn.Conv(**kwargs),
    nn.Conv(**kwargs),
    normal(1, shape),
    _conv_reduction(kwargs, shape[-1]),
    grads=len(shape) == 3,
  )


def test_conv_negative_padding():
  # lax on CPU returns garbage for a (negative, positive) padding pair (an XLA
  # bug), so the reference is Flax on the input cropped by hand, which is what
  # padding (-1, 1) means.
  x = normal(1, X2D)
  ours = cnn.Conv(5, (2, 2), padding=((-1, 1), (0, 0)), precision=HIGHEST)
  ref = nn.Conv(5, (2, 2), padding=((0, 1), (0, 0)), precision=HIGHEST)
  variables = ref.init(jax.random.key(0), x)
  _assert_params_equal(ours.init(jax.random.key(0), x), variables)
  assert_close(ours.apply(variables, x), ref.apply(variables, x[:, 1:]), reduction=16)


def test_conv_parity_bf16_inputs():
  # bf16 inputs with f32 parameters promote to f32, as in Flax.
  kwargs = dict(features=5, kernel_size=(3, 3), strides=2, precision=HIGHEST)
  check_parity(cnn.Conv(**kwargs), nn.Conv(**kwargs), normal(1, X2D, jnp.bfloat16), 36, grads=False)


def test_conv_preferred_element_type():
  # flax.linen.Conv has no such field; its conv_general_dilated hook gives the reference.
  x = normal(1, X2D, jnp.bfloat16)
  kwargs = dict(features=5, kernel_size=(3, 3), dtype=jnp.bfloat16, precision=HIGHEST)
  ref_conv = functools.partial(lax.conv_general_dilated, preferred_element_type=jnp.float32)
  ours = cnn.Conv(**kwargs, preferred_element_type=jnp.float32)
  ref = nn.Conv(**kwargs, conv_general_dilated=ref_conv)
  variables = ref.init(jax.random.key(0), x)
  y, y_ref = ours.apply(variables, x), ref.apply(variables, x)
  assert y.dtype == y_ref.dtype == jnp.float32
  assert_close(y, y_ref, reduction=36)


def test_conv_uses_convmm_and_honours_the_hook():
  x = normal(1, X2D)
  calls = []

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return convmm.conv_general_dilated(*args, **kwargs)

  kwargs = dict(features=5, kernel_size=(3, 3), padding="CIRCULAR")
  variables = nn.Conv(**kwargs).init(jax.random.key(0), x)
  y_ref = nn.Conv(**kwargs, conv_general_dilated=lax.conv_general_dilated).apply(variables, x)
  y = cnn.Conv(**kwargs, conv_general_dilated=spy).apply(variables, x)
  assert len(calls) == 1
  # convmm's extras reach a user's convolution only when set (lax's has no `method`).
  assert "method" not in calls[0]
  jax.eval_shape(cnn.Conv(**kwargs, conv_general_dilated=spy, method="xla").apply, variables, x)
  assert calls[-1]["method"] == "xla"
  assert_close(y, y_ref, reduction=36)

  class SpyCls:
    def __call__(self, *args, **kwargs):
      calls.append("cls")
      return convmm.conv_general_dilated(*args, **kwargs)

  cnn.Conv(**kwargs, conv_general_dilated_cls=SpyCls).apply(variables, x)
  assert calls[-1] == "cls"


def test_conv_default_is_convmm(monkeypatch):
  # The default path must not fall back to lax: make lax's conv unusable.
  x = normal(1, X2D)
  variables = nn.Conv(5, (3, 3)).init(jax.random.key(0), x)
  y_ref = nn.Conv(5, (3, 3)).apply(variables, x)

  def boom(*args, **kwargs):
    raise AssertionError("lax.conv_general_dilated called")

  monkeypatch.setattr(lax, "conv_general_dilated", boom)
  assert_close(cnn.Conv(5, (3, 3)).apply(variables, x), y_ref, reduction=36)


def test_conv_promote_dtype_hook():
  seen = []

  def promote(*args, dtype=None):
    seen.append(dtype)
    return [None if a is None else jnp.asarray(a, jnp.float16) for a in args]

  x = normal(1, X2D)
  kwargs = dict(features=5, kernel_size=(3, 3), promote_dtype=promote)
  variables = nn.Conv(**kwargs).init(jax.random.key(0), x)
  y = cnn.Conv(**kwargs).apply(variables, x)
  y_ref = nn.Conv(**kwargs).apply(variables, x)
  assert y.dtype == y_ref.dtype == jnp.float16 and seen
  assert_close(y, y_ref, reduction=36)


def test_conv_under_jit_and_vmap():
  x = normal(1, X2D)
  layer, ref = cnn.Conv(5, (3, 3), strides=2), nn.Conv(5, (3, 3), strides=2)
  variables = ref.init(jax.random.key(0), x)
  y_ref = ref.apply(variables, x)
  assert_close(jax.jit(layer.apply)(variables, x), y_ref, reduction=36)
  y_vmap = jax.vmap(layer.apply, in_axes=(None, 0))(variables, x[:, None])
  assert_close(y_vmap[:, 0], y_ref, reduction=36)


# ----------------------------------------------------------------------------- ConvLocal

LOCAL_CASES = {
  "same_stride2": (dict(features=5, kernel_size=(3, 3), strides=2), X2D),
  "circular": (dict(features=5, kernel_size=(3, 3), strides=2, padding="CIRCULAR"), X2D),
  "pairs_dilated": (
    dict(
      features=5,
      kernel_size=(3, 3),
      padding=((2, 0), 1),
      kernel_dilation=(2, 1),
      input_dilation=(1, 2),
    ),
    X2D,
  ),
  "mask_no_bias_valid": (
    dict(
      features=5,
      kernel_size=(3,),
      padding="VALID",
      use_bias=False,
      mask=np.tril(np.ones((7, 12, 5), np.float32)),
    ),
    (2, 9, 4),
  ),
  "1d_causal_int_kernel": (dict(features=5, kernel_size=3, padding="CAUSAL"), (2, 9, 4)),
}


@pytest.mark.parametrize("kwargs, shape", list(LOCAL_CASES.values()), ids=list(LOCAL_CASES))
def test_conv_local_parity(kwargs, shape):
  kwargs = dict(FAST, **kwargs)
  check_parity(
    cnn.ConvLocal(**kwargs),
    nn.ConvLocal(**kwargs),
    normal(1, shape),
    _conv_reduction(kwargs, shape[-1]),
  )


def test_conv_local_default_precision_and_bf16():
  kwargs = dict(features=5, kernel_size=(3, 3), strides=2, dtype=jnp.bfloat16)
  check_parity(cnn.ConvLocal(**kwargs), nn.ConvLocal(**kwargs), normal(1, X2D), 36, grads=False)


def test_conv_local_preferred_element_type():
  x = normal(1, X2D, jnp.bfloat16)
  kwargs = dict(features=5, kernel_size=(3, 3), strides=2, dtype=jnp.bfloat16)
  ref = nn.ConvLocal(**kwargs)
  variables = ref.init(jax.random.key(0), x)
  y = cnn.ConvLocal(**kwargs, preferred_element_type=jnp.float32).apply(variables, x)
  # Reference: the same bf16 operands, widened (bf16 products are exact in f32).
  f32 = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), variables)
  y_ref = nn.ConvLocal(5, (3, 3), strides=2, precision=HIGHEST).apply(f32, x.astype(jnp.float32))
  assert y.dtype == jnp.float32
  assert_close(y, y_ref, reduction=36)


# ----------------------------------------------------------------------------- ConvTranspose

TRANSPOSE_CASES = {
  "same_stride2": (dict(features=5, kernel_size=(3, 3), strides=2), X2D),
  "same_even_kernel": (dict(features=5, kernel_size=(4, 2), strides=(2, 3)), X2D),
  "valid_dilated": (
    dict(features=5, kernel_size=(3, 3), strides=2, kernel_dilation=(2, 1), padding="VALID"),
    X2D,
  ),
  "transpose_kernel": (dict(features=5, kernel_size=(3, 3), strides=2, transpose_kernel=True), X2D),
  "circular": (dict(features=5, kernel_size=(3, 3), strides=2, padding="CIRCULAR"), X2D),
  "circular_even_transpose_kernel": (
    dict(features=5, kernel_size=(4, 2), strides=(2, 1), padding="CIRCULAR", transpose_kernel=True),
    X2D,
  ),
  "circular_kernel_beyond_period": (dict(features=5, kernel_size=5, padding="CIRCULAR"), (2, 2, 4)),
  "pair_and_int": (dict(features=5, kernel_size=(3, 3), strides=2, padding=((2, 1), 1)), X2D),
  "int": (dict(features=5, kernel_size=(3, 3), strides=2, padding=1), X2D),
  "same_lower_stride1": (dict(features=5, kernel_size=(2, 3), padding="SAME_LOWER"), X2D),
  "3d": (dict(features=2, kernel_size=(2, 2, 2), strides=(2, 1, 1)), (1, 3, 4, 3, 2)),
  "mask_no_bias": (
    dict(
      features=5,
      kernel_size=(3, 3),
      strides=2,
      use_bias=False,
      mask=np.triu(np.ones((3, 3, 4, 5), np.float32)),
    ),
    X2D,
  ),
  "dtype_bf16": (dict(features=5, kernel_size=(3, 3), strides=2, dtype=jnp.bfloat16), X2D),
  # Padding that leaves one output dimension empty: Flax returns an empty array.
  "dilated_pairs_empty_output": (
    dict(features=5, kernel_size=(2, 3), kernel_dilation=(2, 1), padding=((-2, 0), (1, 1))),
    (2, 2, 5, 4),
  ),
}


@pytest.mark.parametrize("kwargs, shape", list(TRANSPOSE_CASES.values()), ids=list(TRANSPOSE_CASES))
def test_conv_transpose_parity(kwargs, shape):
  kwargs = dict(FAST, **kwargs)
  check_parity(
    cnn.ConvTranspose(**kwargs),
    nn.ConvTranspose(**kwargs),
    normal(1, shape),
    _conv_reduction(kwargs, shape[-1]),
    grads=kwargs.get("dtype") is None and len(shape) == 4,
  )


def test_conv_transpose_preferred_element_type():
  kwargs = dict(
    features=5,
    kernel_size=(3, 3),
    strides=2,
    dtype=jnp.bfloat16,
    preferred_element_type=jnp.float32,
  )
  x = normal(1, X2D, jnp.bfloat16)
  ref = nn.ConvTranspose(**kwargs)
  variables = ref.init(jax.random.key(0), x)
  y, y_ref = cnn.ConvTranspose(**kwargs).apply(variables, x), ref.apply(variables, x)
  assert y.dtype == y_ref.dtype == jnp.float32
  assert_close(y, y_ref, reduction=36)


# ----------------------------------------------------------------------------- batch dims


@pytest.mark.parametrize(
  "shape",
  [X2D[1:], (2, 3, *X2D[1:]), (3, 0, *X2D[1:])],
  ids=["unbatched", "two_batch_dims", "empty_batch_dim"],
)
@pytest.mark.parametrize("name", ["Conv", "ConvLocal", "ConvTranspose"])
def test_batch_dims(name, shape):
  kwargs = dict(features=5, kernel_size=(3, 3), strides=2, precision=HIGHEST)
  ours, ref = getattr(cnn, name)(**kwargs), getattr(nn, name)(**kwargs)
  x = normal(1, shape)
  variables = ref.init(jax.random.key(0), normal(1, X2D))
  y = ours.apply(variables, x)
  if x.size:
    assert_close(y, ref.apply(variables, x), reduction=36)
  else:  # Flax's reshape(-1, ...) cannot infer the size of an empty batch
    out_shape = ref.apply(variables, normal(1, X2D)).shape[1:]
    assert y.shape == (*shape[:2], *out_shape)


# ----------------------------------------------------------------------------- errors

ERROR_CASES = {
  # name: (layer, kwargs, input shape, exception, message regex)
  "bad_padding_string": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), padding="FULL"),
    X2D,
    ValueError,
    r"Conv: `padding` must be one of .*'FULL'",
  ),
  "padding_length": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), padding=(1, 1, 1)),
    X2D,
    ValueError,
    r"Conv: `padding` must have one entry per spatial",
  ),
  "padding_entry": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), padding=((1, 2, 3), 1)),
    X2D,
    TypeError,
    r"Conv: `padding` entries must be ints or",
  ),
  "padding_type": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), padding=1.5),
    X2D,
    TypeError,
    r"Conv: `padding` must be a string, an int",
  ),
  "causal_2d": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), padding="CAUSAL"),
    X2D,
    ValueError,
    r"Conv: `padding`='CAUSAL' is only defined for one",
  ),
  "strides_length": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), strides=(1, 1, 1)),
    X2D,
    ValueError,
    r"Conv: `strides` must have one entry per spatial",
  ),
  "zero_stride": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), strides=0),
    X2D,
    ValueError,
    r"Conv: `strides` entries must be >= 1",
  ),
  "dilation_type": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), kernel_dilation="2"),
    X2D,
    TypeError,
    r"Conv: `kernel_dilation` must be a sequence",
  ),
  "kernel_size_type": (
    cnn.Conv,
    dict(features=2, kernel_size=3.0),
    X2D,
    TypeError,
    r"Conv: `kernel_size` must be an int or a sequence",
  ),
  "kernel_size_zero": (
    cnn.Conv,
    dict(features=2, kernel_size=(0, 3)),
    X2D,
    ValueError,
    r"Conv: `kernel_size` entries must be >= 1",
  ),
  "kernel_size_empty": (
    cnn.Conv,
    dict(features=2, kernel_size=()),
    X2D,
    ValueError,
    r"Conv: `kernel_size` must have at least one entry",
  ),
  "string_padding_input_dilation": (
    cnn.Conv,
    dict(features=2, kernel_size=(3, 3), input_dilation=2, padding="CIRCULAR"),
    X2D,
    ValueError,
    r"Conv: `padding`='CIRCULAR' cannot be combined with "
    r"`input_dilation`=\(2, 2\)",
  ),
  "groups_in": (
    cnn.Conv,
    dict(features=6, kernel_size=(3, 3), feature_group_count=3),
    X2D,
    ValueError,
    r"Conv: `feature_group_count` \(=3\) must divide both "
    r"feature counts, got 4 input and 6 output",
  ),
  "groups_out": (
    cnn.Conv,
    dict(features=5, kernel_size=(3, 3), feature_group_count=2),
    X2D,
    ValueError,
    r"`feature_group_count` \(=2\) must divide both",
  ),
  "groups_zero": (
    cnn.Conv,
    dict(features=5, kernel_size=(3, 3), feature_group_count=0),
    X2D,
    ValueError,
    r"Conv: `feature_group_count` must be >= 1",
  ),
  "groups_type": (
    cnn.Conv,
    dict(features=5, kernel_size=(3, 3), feature_group_count="2"),
    X2D,
    TypeError,
    r"Conv: `feature_group_count` must be a positive int",
  ),
  "groups_fractional": (
    cnn.Conv,
    dict(features=5, kernel_size=(3, 3), feature_group_count=1.5),
    X2D,
    ValueError,
    r"Conv: `feature_group_count` must be a positive int",
  ),
  "mask_shape": (
    cnn.Conv,
    dict(features=5, kernel_size=(3, 3), mask=np.ones((3, 3, 4))),
    X2D,
    ValueError,
    r"Conv: `mask` must have the kernel's shape "
    r"\(3, 3, 4, 5\), got mask.shape=\(3, 3, 4\)",
  ),
  "input_rank": (
    cnn.Conv,
    dict(features=5, kernel_size=(3, 3, 3)),
    X2D[1:],
    ValueError,
    r"Conv: inputs must be \(\*batch, \*spatial, features\) with 3 spatial",
  ),
  "local_groups": (
    cnn.ConvLocal,
    dict(features=4, kernel_size=(3, 3), feature_group_count=2),
    X2D,
    ValueError,
    r"ConvLocal: `feature_group_count` must be 1",
  ),
  "local_mask": (
    cnn.ConvLocal,
    dict(features=4, kernel_size=(3, 3), padding="VALID", mask=np.ones((5, 4, 36, 3))),
    X2D,
    ValueError,
    r"ConvLocal: `mask` must have the kernel's shape \(5, 4, 36, 4\)",
  ),
  "transpose_reflect": (
    cnn.ConvTranspose,
    dict(features=2, kernel_size=(3, 3), padding="REFLECT"),
    X2D,
    ValueError,
    r"ConvTranspose: `padding` must be one of \('SAME', 'SAME_LOWER', "
    r"'VALID', 'CIRCULAR'\)",
  ),
  "transpose_causal": (
    cnn.ConvTranspose,
    dict(features=2, kernel_size=3, padding="CAUSAL"),
    (2, 9, 4),
    ValueError,
    r"ConvTranspose: `padding` must be one of",
  ),
  "transpose_same_lower_stride": (
    cnn.ConvTranspose,
    dict(features=2, kernel_size=(3, 3), strides=2, padding="SAME_LOWER"),
    X2D,
    ValueError,
    r"ConvTranspose: `padding`='SAME_LOWER' requires `strides` of 1",
  ),
  "transpose_mask": (
    cnn.ConvTranspose,
    dict(features=2, kernel_size=(3, 3), transpose_kernel=True, mask=np.ones((3, 3, 4, 2))),
    X2D,
    ValueError,
    r"ConvTranspose: `mask` must have the kernel's shape \(3, 3, 2, 4\)",
  ),
  "transpose_input_rank": (
    cnn.ConvTranspose,
    dict(features=2, kernel_size=(3, 3)),
    (7, 4),
    ValueError,
    r"ConvTranspose: inputs must be .* with 2 spatial",
  ),
}


@pytest.mark.parametrize(
  "layer, kwargs, shape, error, match", list(ERROR_CASES.values()), ids=list(ERROR_CASES)
)
def test_errors(layer, kwargs, shape, error, match):
  with pytest.raises(error, match=match):
    layer(**kwargs).init(jax.random.key(0), jnp.ones(shape))


# ----------------------------------------------------------------------------- REPLICATE

# (kernel_size, strides, kernel_dilation, groups, input shape, torch padding): torch's
# padding_mode='replicate' pads `padding` edge values on both sides; 'same' (stride 1)
# puts (k_eff - 1) // 2 before and k_eff // 2 after, as convmm does for even kernels.
REPLICATE_CASES = {
  "2d_stride2": ((3, 3), 2, 1, 1, X2D, 1),
  "2d_even_kernel_dilated_groups": ((2, 3), 1, (2, 1), 2, X2D, "same"),
  "1d_even": ((4,), 1, 1, 1, (2, 9, 3), "same"),
  "3d": ((3, 1, 3), 1, 1, 1, (1, 4, 3, 5, 2), (1, 0, 1)),
}


@pytest.mark.parametrize("case", list(REPLICATE_CASES.values()), ids=list(REPLICATE_CASES))
def test_conv_replicate_padding_matches_torch(case):
  kernel_size, strides, dilation, groups, shape, torch_padding = case
  layer = cnn.Conv(
    features=4,
    kernel_size=kernel_size,
    strides=strides,
    padding="REPLICATE",
    kernel_dilation=dilation,
    feature_group_count=groups,
    **FAST,
  )
  x = normal(1, shape)
  y, variables = layer.init_with_output(jax.random.key(0), x)
  params = variables["params"]
  expected = torch_conv(
    x,
    params["kernel"],
    params["bias"] + 0.5,
    strides=strides,
    padding=torch_padding,
    dilation=dilation,
    groups=groups,
    padding_mode="replicate",
  )
  y = layer.apply({"params": dict(params, bias=params["bias"] + 0.5)}, x)
  assert_close(
    y, expected.astype(np.float32), dtype=jnp.float32, reduction=math.prod(kernel_size) * shape[-1]
  )


def test_conv_adjoint_replicate_is_the_transpose_of_conv():
  # <Conv(x), y> == <x, ConvAdjoint(y)> with the same kernel: the adjoint of the
  # edge padding adds each halo back onto the edge value it copied.
  kwargs = dict(kernel_size=(3, 2), strides=2, padding="REPLICATE", use_bias=False, **FAST)
  x = normal(1, (2, 8, 6, 4))  # SAME-like modes: the adjoint's output is n * stride
  conv = cnn.Conv(features=5, **kwargs)
  variables = conv.init(jax.random.key(0), x)
  y = conv.apply(variables, x)
  c = normal(2, y.shape)
  x_bar = cnn.ConvAdjoint(features=x.shape[-1], **kwargs).apply(variables, c)
  assert x_bar.shape == x.shape
  np.testing.assert_allclose(float(jnp.vdot(y, c)), float(jnp.vdot(x, x_bar)), rtol=1e-5)
