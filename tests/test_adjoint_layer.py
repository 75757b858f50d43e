"""``ConvAdjoint``: the adjoint of Flax's Conv, and PyTorch's ConvTranspose2d.

References: the vjp (with respect to its input) of ``flax.linen.Conv`` with the
same hyperparameters and the same kernel, and ``torch.nn.ConvTranspose2d``
(skipped when torch is absent). Output sizes are checked against the rule
written out here and against Flax's Conv mapping them back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax
from layer_testing import key_init, normal
from tolerances import assert_close

from convmm import linen as cnn

HIGHEST = lax.Precision.HIGHEST
# A NumPy-drawn kernel initialiser (a function of the key, cheap for many shapes).
FAST = dict(kernel_init=key_init, precision=HIGHEST)
Y2D = (2, 4, 3, 6)  # the adjoint's input: a forward Conv's output (N, H, W, C)


def expected_spatial(n, k, s, d, padding, output_padding):
  """The output-size rule of the issue, written out independently of convmm."""
  k_eff = (k - 1) * d + 1
  if padding in ("SAME", "SAME_LOWER", "CIRCULAR", "REFLECT", "CAUSAL"):
    return n * s
  lo, hi = (0, 0) if padding == "VALID" else padding
  return (n - 1) * s + k_eff - lo - hi + output_padding


def _per_dim(value, rank):
  return tuple(value) if isinstance(value, tuple | list) else (value,) * rank


def _pairs(padding, rank):
  if isinstance(padding, str):
    return (padding,) * rank
  return tuple(p if isinstance(p, tuple) else (p, p) for p in _per_dim(padding, rank))


def _forward(kwargs, features):
  """flax.linen.Conv with the hyperparameters of ``ConvAdjoint(**kwargs)``."""
  fields = {k: v for k, v in kwargs.items() if k not in ("features", "output_padding", "use_bias")}
  return nn.Conv(features=features, use_bias=False, **fields)


def reference_adjoint(kwargs, kernel, y):
  """The vjp of flax.linen.Conv with respect to its input, at ``y``."""
  rank = kernel.ndim - 2
  size = _per_dim(kwargs["kernel_size"], rank)
  spatial = tuple(
    expected_spatial(n, k, s, d, p, op)
    for n, k, s, d, p, op in zip(
      y.shape[-rank - 1 : -1],
      size,
      _per_dim(kwargs.get("strides", 1), rank),
      _per_dim(kwargs.get("kernel_dilation", 1), rank),
      _pairs(kwargs.get("padding", "SAME"), rank),
      _per_dim(kwargs.get("output_padding", 0), rank),
    )
  )
  x_shape = (*y.shape[: -rank - 1], *spatial, kwargs["features"])
  forward = _forward(kwargs, y.shape[-1])
  params = {"params": {"kernel": kernel}}
  y_fwd, vjp = jax.vjp(lambda x: forward.apply(params, x), jnp.zeros(x_shape, y.dtype))
  assert y_fwd.shape == y.shape, "the rule must give an input the forward maps onto y"
  return vjp(y)[0], forward


# ----------------------------------------------------------------------------- vs Flax's vjp

CASES = {
  # name: (ConvAdjoint kwargs, input shape)
  "same_stride2": (dict(kernel_size=(3, 3), strides=2), Y2D),
  "same_even_kernel": (dict(kernel_size=(4, 2), strides=(2, 3)), Y2D),
  "same_lower": (dict(kernel_size=(2, 2), strides=2, padding="SAME_LOWER"), Y2D),
  "valid_output_padding": (
    dict(kernel_size=(3, 3), strides=2, padding="VALID", output_padding=(1, 0)),
    Y2D,
  ),
  "int_padding": (dict(kernel_size=(3, 3), strides=2, padding=1, output_padding=1), Y2D),
  "pairs": (
    dict(kernel_size=(3, 3), strides=(2, 1), padding=((2, 0), 1), output_padding=(1, 0)),
    Y2D,
  ),
  "dilated": (
    dict(kernel_size=(2, 3), strides=2, kernel_dilation=(3, 1), padding=1, output_padding=1),
    Y2D,
  ),
  "groups": (
    dict(kernel_size=(3, 3), strides=2, padding=1, output_padding=1, feature_group_count=2),
    Y2D,
  ),
  "depthwise": (dict(features=6, kernel_size=(3, 3), strides=2, feature_group_count=6), Y2D),
  "circular": (dict(kernel_size=(3, 2), strides=2, padding="CIRCULAR"), Y2D),
  "circular_wraps_twice": (dict(kernel_size=(5, 2), padding="CIRCULAR"), (2, 2, 3, 6)),
  "reflect": (dict(kernel_size=(3, 3), kernel_dilation=(1, 2), padding="REFLECT"), Y2D),
  "1d_causal_int_kernel": (
    dict(kernel_size=3, strides=2, kernel_dilation=2, padding="CAUSAL"),
    (2, 5, 6),
  ),
  "1d_valid": (dict(kernel_size=(4,), strides=3, padding="VALID", output_padding=2), (2, 5, 6)),
  "3d_groups": (
    dict(kernel_size=(2, 2, 2), strides=(2, 1, 2), padding=((0, 1), 1, 0), feature_group_count=2),
    (1, 3, 2, 3, 6),
  ),
  "unbatched": (dict(kernel_size=(3, 3), strides=2), Y2D[1:]),
  "two_batch_dims": (dict(kernel_size=(3, 3), strides=2), (1, 2, *Y2D[1:])),
}


@pytest.mark.parametrize("kwargs, shape", list(CASES.values()), ids=list(CASES))
def test_matches_vjp_of_flax_conv(kwargs, shape):
  kwargs = dict(dict(features=4), **kwargs, **FAST)
  layer = cnn.ConvAdjoint(**kwargs)
  y = normal(1, shape)
  variables = layer.init(jax.random.key(0), y)
  kernel = variables["params"]["kernel"]
  variables = {"params": {"kernel": kernel, "bias": normal(2, (kwargs["features"],))}}
  expected, forward = reference_adjoint(kwargs, kernel, y)
  actual = layer.apply(variables, y)
  reduction = y.shape[-1] * kernel[..., 0, 0].size
  assert_close(actual, expected + variables["params"]["bias"], reduction=reduction)
  # The dot-product test <A x, y> == <x, A^T y>, with A the Flax Conv.
  x = normal(3, expected.shape)
  lhs = jnp.vdot(forward.apply({"params": {"kernel": kernel}}, x), y)
  rhs = jnp.vdot(x, actual - variables["params"]["bias"])
  assert_close(lhs, rhs, reduction=y.size * reduction)


@pytest.mark.parametrize("name", ["same_stride2", "circular", "groups"])
def test_gradients_match_reference(name):
  kwargs, shape = CASES[name]
  kwargs = dict(dict(features=4), **kwargs, **FAST, use_bias=False)
  layer = cnn.ConvAdjoint(**kwargs)
  y = normal(1, shape)
  kernel = layer.init(jax.random.key(0), y)["params"]["kernel"]

  def loss(fn):
    return lambda kernel, y: jnp.sum(jnp.sin(fn(kernel, y)))

  grad = jax.grad(loss(lambda k, y: layer.apply({"params": {"kernel": k}}, y)), (0, 1))
  grad_ref = jax.grad(loss(lambda k, y: reference_adjoint(kwargs, k, y)[0]), (0, 1))
  (dk, dy), (dk_ref, dy_ref) = grad(kernel, y), grad_ref(kernel, y)
  reduction = y.shape[-1] * kernel[..., 0, 0].size
  assert_close(dy, dy_ref, reduction=reduction, grad=True)
  assert_close(dk, dk_ref, reduction=reduction * y.size, grad=True)


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
def test_tied_weights_with_conv(padding):
  # A Conv's parameters drive the ConvAdjoint unchanged: it computes that Conv's
  # vjp, both Flax's (the reference) and convmm's (the definition).
  x = normal(1, (2, 8, 6, 4))
  kwargs = dict(
    features=6, kernel_size=(3, 3), strides=2, padding=padding, use_bias=False, precision=HIGHEST
  )
  adjoint = cnn.ConvAdjoint(
    4, (3, 3), strides=2, padding=padding, use_bias=False, precision=HIGHEST
  )
  params = cnn.Conv(**kwargs).init(jax.random.key(0), x)
  for conv in (nn.Conv(**kwargs), cnn.Conv(**kwargs)):
    y, vjp = jax.vjp(lambda x, conv=conv: conv.apply(params, x), x)
    assert_close(adjoint.apply(params, y), vjp(y)[0], reduction=54)


def test_dtype_and_preferred_element_type():
  kwargs = dict(features=4, kernel_size=(3, 3), strides=2, precision=HIGHEST)
  y = normal(1, Y2D, jnp.bfloat16)
  variables = cnn.ConvAdjoint(**kwargs).init(jax.random.key(0), y)
  bf16 = cnn.ConvAdjoint(**kwargs, dtype=jnp.bfloat16).apply(variables, y)
  wide = cnn.ConvAdjoint(**kwargs, dtype=jnp.bfloat16, preferred_element_type=jnp.float32).apply(
    variables, y
  )
  # Reference: the bf16-rounded operands in float32 (their products are exact).
  rounded = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), variables)
  expected, _ = reference_adjoint(kwargs, rounded["params"]["kernel"], y.astype(jnp.float32))
  expected = expected + rounded["params"]["bias"]
  assert bf16.dtype == jnp.bfloat16 and wide.dtype == jnp.float32
  assert_close(wide, expected, reduction=54)
  assert_close(bf16, expected, dtype=jnp.bfloat16, reduction=54)


def test_mask():
  kwargs = dict(features=4, kernel_size=(3, 3), strides=2, precision=HIGHEST)
  mask = np.tril(np.ones((3, 3, 4, 6), np.float32))
  y = normal(1, Y2D)
  variables = cnn.ConvAdjoint(**kwargs).init(jax.random.key(0), y)
  masked = {"params": dict(variables["params"], kernel=variables["params"]["kernel"] * mask)}
  assert_close(
    cnn.ConvAdjoint(**kwargs, mask=mask).apply(variables, y),
    cnn.ConvAdjoint(**kwargs).apply(masked, y),
    reduction=54,
  )
  assert not np.allclose(
    cnn.ConvAdjoint(**kwargs).apply(variables, y), cnn.ConvAdjoint(**kwargs).apply(masked, y)
  )


# ----------------------------------------------------------------------------- vs PyTorch

TORCH_CASES = {
  # name: (in_channels, out_channels, kernel, stride, padding, output_padding, groups,
  #        dilation)
  "stride2_pad1_outpad1": (6, 4, 3, 2, 1, 1, 1, 1),
  "rect_kernel_no_pad": (6, 4, (2, 3), (2, 1), 0, (1, 0), 1, 1),
  "groups2_dilation2": (6, 4, 3, 2, 2, 1, 2, 2),
  "depthwise": (6, 6, (3, 2), 3, (1, 0), (2, 1), 6, (1, 2)),
}


@pytest.mark.parametrize("case", list(TORCH_CASES.values()), ids=list(TORCH_CASES))
def test_matches_torch_conv_transpose2d(case):
  torch = pytest.importorskip("torch")
  c_in, c_out, k, s, p, op, g, d = case
  module = torch.nn.ConvTranspose2d(
    c_in, c_out, k, stride=s, padding=p, output_padding=op, groups=g, dilation=d, bias=True
  )
  generator = np.random.default_rng(0)
  y = generator.standard_normal((2, c_in, 4, 3)).astype(np.float32)
  with torch.no_grad():
    module.weight.copy_(
      torch.from_numpy(generator.standard_normal(tuple(module.weight.shape)).astype(np.float32))
    )
    module.bias.copy_(torch.from_numpy(generator.standard_normal(c_out).astype(np.float32)))
    expected = module(torch.from_numpy(y)).numpy().transpose(0, 2, 3, 1)
  kernel = module.weight.detach().permute(2, 3, 1, 0).numpy()
  params = {
    "params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(module.bias.detach().numpy())}
  }
  layer = cnn.ConvAdjoint(
    features=c_out,
    kernel_size=_per_dim(k, 2),
    strides=s,
    padding=p,
    output_padding=op,
    feature_group_count=g,
    kernel_dilation=d,
    precision=HIGHEST,
  )
  actual = layer.apply(params, jnp.asarray(y.transpose(0, 2, 3, 1)))
  assert_close(actual, expected, reduction=kernel[..., 0, 0].size * c_in // g)


# ----------------------------------------------------------------------------- errors

ERROR_CASES = {
  # name: (kwargs, input shape, exception, message regex)
  "output_padding_ge_stride": (
    dict(kernel_size=(3, 3), strides=(2, 3), padding="VALID", output_padding=(1, 3)),
    ValueError,
    r"ConvAdjoint: `output_padding` \(=\(1, 3\)\) must be < `strides` "
    r"\(=\(2, 3\)\)",
  ),
  "output_padding_negative": (
    dict(kernel_size=(3, 3), strides=2, padding=1, output_padding=-1),
    ValueError,
    r"ConvAdjoint: `output_padding` entries must be >= 0",
  ),
  "output_padding_length": (
    dict(kernel_size=(3, 3), strides=2, padding=1, output_padding=(1, 1, 1)),
    ValueError,
    r"ConvAdjoint: `output_padding` must have one entry per spatial dimension \(2\)",
  ),
  "output_padding_with_same": (
    dict(kernel_size=(3, 3), strides=2, output_padding=1),
    ValueError,
    r"ConvAdjoint: `output_padding` \(=\(1, 1\)\) must be 0 with `padding`='SAME'",
  ),
  "groups_features": (
    dict(features=5, kernel_size=(3, 3), feature_group_count=2),
    ValueError,
    r"ConvAdjoint: `feature_group_count` \(=2\) must divide both feature counts, got 6 "
    r"input and 5 output features",
  ),
  "groups_inputs": (
    dict(features=8, kernel_size=(3, 3), feature_group_count=4),
    ValueError,
    r"ConvAdjoint: `feature_group_count` \(=4\) must divide both feature counts, got 6 "
    r"input",
  ),
  "mask": (
    dict(kernel_size=(3, 3), mask=np.ones((3, 3, 6, 4))),
    ValueError,
    r"ConvAdjoint: `mask` must have the kernel's shape \(3, 3, 4, 6\), got "
    r"mask.shape=\(3, 3, 6, 4\)",
  ),
  "padding_too_large": (
    dict(kernel_size=(3, 3), strides=1, padding=((9, 0), 0)),
    ValueError,
    r"ConvAdjoint: `padding` \(=\(\(9, 0\), \(0, 0\)\)\) is too large",
  ),
  "causal_2d": (
    dict(kernel_size=(3, 3), padding="CAUSAL"),
    ValueError,
    r"ConvAdjoint: `padding`='CAUSAL' is only defined for one spatial",
  ),
  "bad_padding": (
    dict(kernel_size=(3, 3), padding="FULL"),
    ValueError,
    r"ConvAdjoint: `padding` must be one of",
  ),
  "kernel_rank": (
    dict(kernel_size=(3, 3, 3, 3)),
    ValueError,
    r"ConvAdjoint: inputs must be \(\*batch, \*spatial, features\) with 4 "
    r"spatial",
  ),
}


@pytest.mark.parametrize("kwargs, error, match", list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_errors(kwargs, error, match):
  kwargs = dict(dict(features=4), **kwargs)
  with pytest.raises(error, match=match):
    cnn.ConvAdjoint(**kwargs).init(jax.random.key(0), jnp.ones(Y2D))
