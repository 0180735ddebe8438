"""The kit's convolutions without oneDNN's: XLA's with the matmul weight gradient, and PyConv's
grouped levels as a dense convolution with a block-diagonal kernel; and how PyConv's levels reach
them. oneDNN's own: onednn_test.py."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pyramidnet_jax import PyConv
from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.xla_cpu import convolution
from pyramidnet_jax.xla_cpu import onednn

DN = ('NHWC', 'HWIO', 'NHWC')
BACKENDS = ['xla'] + (['onednn'] if onednn.status() is None else [])


@pytest.fixture
def backend():
  """Sets the kit's convolution backend for one test and restores the previous one."""
  previous = convolution.backend()
  yield convolution.set_backend
  convolution.set_backend(previous)


def values_and_grads(fn, x, kernel, seed=2):
  """fn(x, kernel) and its vjp of a fixed random cotangent, jitted afresh."""
  y, vjp = jax.vjp(jax.jit(lambda x, k: fn(x, k)), x, kernel)
  cotangent = np.random.default_rng(seed).standard_normal(y.shape).astype(np.float32)
  return (y, *vjp(cotangent))


@pytest.mark.parametrize('size, cin, cout, kernel, stride', [
    (9, 5, 7, 3, 1),   # Odd widths.
    (9, 5, 7, 3, 2),   # Stride 2 on an odd size.
    (8, 4, 6, 7, 2),   # Stride 2 on an even size, a kernel wider than half the input.
    (6, 8, 12, 1, 1),  # A 1x1.
])
def test_xla_conv2d_with_the_matmul_weight_gradient_equals_lax(backend, size, cin, cout, kernel,
                                                                stride):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, size, size + 1, cin), np.float32)
  w = rng.standard_normal((kernel, kernel, cin, cout), np.float32) / kernel
  padding = ((kernel // 2, kernel // 2),) * 2
  backend('xla')
  ours = values_and_grads(lambda x, k: convolution.conv2d(x, k, stride, padding), x, w)
  assert onednn.TARGETS['forward'] not in jax.jit(
      lambda x, k: convolution.conv2d(x, k, stride, padding)).lower(x, w).as_text()
  theirs = values_and_grads(lambda x, k: levers.lax_conv2d(x, k, stride, padding), x, w)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', BACKENDS)
@pytest.mark.parametrize('stride', [1, 2])
def test_grouped_conv_values_and_gradients_match_lax(backend, name, stride):
  # oneDNN's grouped convolution, or (XLA) a dense convolution with the block-diagonal kernel.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 10, 10, 8), np.float32)
  kernel = rng.standard_normal((5, 5, 2, 12), np.float32) / 5
  padding = ((2, 2), (2, 2))
  backend(name)
  ours = values_and_grads(
      lambda x, k: convolution.grouped_conv2d(x, k, (stride, stride), padding, 4), x, kernel)
  theirs = values_and_grads(
      lambda x, k: lax.conv_general_dilated(x, k, (stride, stride), padding,
                                            dimension_numbers=DN, feature_group_count=4),
      x, kernel)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_block_diagonal_kernel():
  kernel = jnp.arange(3 * 3 * 2 * 6, dtype=jnp.float32).reshape(3, 3, 2, 6) + 1
  dense = np.asarray(convolution._block_diagonal(kernel, 3))
  chex.assert_shape(dense, (3, 3, 6, 6))
  for g in range(3):  # Group g: inputs 2g, 2g + 1 to outputs 2g, 2g + 1 only.
    block = dense[:, :, 2 * g:2 * g + 2]
    np.testing.assert_array_equal(block[..., 2 * g:2 * g + 2], kernel[..., 2 * g:2 * g + 2])
    np.testing.assert_array_equal(np.delete(block, [2 * g, 2 * g + 1], axis=-1), 0)


def test_conv_general_dilated_hands_other_cases_to_lax():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 8, 4)), jnp.float32)
  kernel = jnp.ones((3, 3, 4, 5))
  dn = lax.conv_dimension_numbers(x.shape, kernel.shape, DN)
  for args in [dict(padding='SAME'), dict(padding=((1, 1), (1, 1)), rhs_dilation=(2, 2))]:
    padding = args.pop('padding')
    want = lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=dn, **args)
    got = convolution.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=dn,
                                           **args)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-5)


def _pyconv_shapes_with_spy(monkeypatch):
  calls = []

  def spy(x, kernel, strides, padding, groups):
    calls.append((kernel.shape, strides, padding, groups))
    return jnp.zeros((x.shape[0], 5, 5, kernel.shape[-1]), x.dtype)

  monkeypatch.setattr(convolution, 'grouped_conv2d', spy)
  layer = PyConv(features=(8, 16), kernel_sizes=(3, 5), groups=(1, 4), strides=2)
  x = jax.ShapeDtypeStruct((2, 10, 10, 8), jnp.float32)
  return calls, layer, x


def test_grouped_levels_go_through_the_kits_grouped_conv2d(monkeypatch):
  calls, layer, x = _pyconv_shapes_with_spy(monkeypatch)
  assert levers.current() is xla_cpu.LEVERS  # The tests' default, as the command lines on a CPU.
  jax.eval_shape(layer.init, jax.random.key(0), x)
  assert calls == [((3, 3, 8, 8), (2, 2), ((1, 1), (1, 1)), 1),
                   ((5, 5, 2, 16), (2, 2), ((2, 2), (2, 2)), 4)]


def test_plain_grouped_levels_are_laxs_grouped_convolution(monkeypatch):
  calls, layer, x = _pyconv_shapes_with_spy(monkeypatch)
  with levers.using(levers.PLAIN):
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: layer.apply(v, x))(variables, x)
  assert not calls
  convs = [e.params for e in jaxpr.eqns if e.primitive.name == 'conv_general_dilated']
  assert [(p['feature_group_count'], p['padding']) for p in convs] == [
      (1, ((1, 1), (1, 1))), (4, ((2, 2), (2, 2)))]
  assert not [e for e in jaxpr.eqns if e.primitive.name == 'ffi_call']


def test_the_levers_conv_general_dilated_reaches_nn_conv_alone():
  """PyConv passes the levers' conv_general_dilated to nn.Conv; a user's nn.Conv is untouched."""
  calls = []

  def spy(*args, **kwargs):
    calls.append(args[1].shape)
    return lax.conv_general_dilated(*args, **kwargs)

  spying = dataclasses.replace(levers.PLAIN, name='spy', conv_general_dilated=spy)
  x = jax.ShapeDtypeStruct((1, 6, 6, 4), jnp.float32)
  with levers.using(spying):
    jax.eval_shape(nn.Conv(4, (3, 3)).init, jax.random.key(0), x)
    assert not calls
    jax.eval_shape(PyConv((4, 4), (3, 5), (1, 2)).init, jax.random.key(0), x)
  assert calls == [(3, 3, 4, 4), (5, 5, 2, 4)]
