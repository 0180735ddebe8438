"""The layers the networks are built from (models/layers.py): declare_param, the convolution and
its dispatch to the levers, and what importing the package loads."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pyramidnet_jax import PyramidNet
from pyramidnet_jax import levers
from pyramidnet_jax.models import layers
from tests import helpers
from tests.models.paper_tables import abstract_variables, rng


class _DeclaresWithFlax(nn.Module):
  @nn.compact
  def __call__(self):
    return self.param('kernel', nn.initializers.he_normal(), (3, 3, 4, 5), jnp.float32)


class _DeclaresWithDeclareParam(nn.Module):
  init_fn: Any = nn.initializers.he_normal()

  @nn.compact
  def __call__(self):
    return layers.declare_param(self, 'kernel', self.init_fn, (3, 3, 4, 5), jnp.float32)


def test_declare_param_initialises_exactly_as_flax_param():
  # Same name, collection and random stream as nn.Module.param: the same initial values.
  want = _DeclaresWithFlax().init(rng(3))
  got = _DeclaresWithDeclareParam().init(rng(3))
  chex.assert_trees_all_equal(got, want)
  chex.assert_trees_all_equal(_DeclaresWithDeclareParam().apply(got), want['params']['kernel'])


def test_declare_param_does_not_trace_the_initialiser_when_given_a_value():
  calls = []

  def init_fn(key, shape, dtype):
    calls.append(shape)
    return jnp.zeros(shape, dtype)

  module = _DeclaresWithDeclareParam(init_fn=init_fn)
  variables = module.init(rng())
  assert calls == [(3, 3, 4, 5)]
  jax.jit(module.apply)(variables)  # flax's own param would eval_shape init_fn here.
  assert calls == [(3, 3, 4, 5)]


def test_declare_param_rejects_a_value_of_another_shape_as_flax_does():
  variables = {'params': {'kernel': jnp.zeros((3, 3, 4, 6))}}
  with pytest.raises(flax.errors.ScopeParamShapeError,
                     match=r'shape \(3, 3, 4, 5\).*has shape \(3, 3, 4, 6\)'):
    _DeclaresWithDeclareParam().apply(variables)
  with pytest.raises(flax.errors.ScopeParamShapeError):
    _DeclaresWithFlax().apply(variables)


def test_a_network_rejects_variables_of_another_width():
  # E.g. a checkpoint converted for another alpha: a clear error, not a silent broadcast.
  variables = abstract_variables(PyramidNet(depth=8, alpha=8, num_classes=10))
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  with pytest.raises(flax.errors.ScopeParamShapeError, match='layer1_0'):
    jax.eval_shape(PyramidNet(depth=8, alpha=12, num_classes=10).apply, variables, x)


def test_symmetric_padding_pads_k_over_2_on_both_sides():
  # Flax 'SAME' would pad (0, 1) at stride 2 on an even input; PyTorch pads k // 2 both sides.
  assert layers.symmetric_padding(1) == ((0, 0), (0, 0))
  assert layers.symmetric_padding(3) == ((1, 1), (1, 1))
  assert layers.symmetric_padding(7) == ((3, 3), (3, 3))


def test_torch_linear_init_is_uniform_within_one_over_sqrt_fan_in():
  values = np.asarray(layers.torch_linear_init(25)(rng(), (4000,)))
  assert values.dtype == np.float32
  assert np.abs(values).max() <= 0.2 and np.abs(values).max() > 0.199
  assert abs(values.std() / (0.2 / np.sqrt(3)) - 1) < 0.05


def test_conv_is_the_levers_conv2d():
  """Conv calls whatever conv2d the current levers hold, with its explicit padding."""
  calls = []

  def spy(x, kernel, stride, padding, groups=1):
    calls.append((x.shape, kernel.shape, stride, padding, groups))
    return levers.lax_conv2d(x, kernel, stride, padding, groups)

  conv = layers.Conv(5, 3, stride=2, padding=layers.symmetric_padding(3))
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  with levers.using(dataclasses.replace(levers.PLAIN, name='spy', conv2d=spy)):
    variables = jax.eval_shape(conv.init, rng(), x)
    y = jax.eval_shape(conv.apply, variables, x)
  assert calls == [((2, 8, 8, 4), (3, 3, 4, 5), 2, ((1, 1), (1, 1)), 1)] * 2
  assert y.shape == (2, 4, 4, 5)
  assert jax.tree.map(lambda a: a.shape, variables) == {'params': {'kernel': (3, 3, 4, 5)}}


def test_plain_conv_is_lax_conv_general_dilated():
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 4))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  padding = layers.symmetric_padding(3)
  with levers.using(levers.PLAIN):
    got = layers.conv2d(x, kernel, 2, padding)
    jaxpr = str(jax.make_jaxpr(lambda x, k: layers.conv2d(x, k, 2, padding))(x, kernel))
  assert 'conv_general_dilated' in jaxpr and 'custom' not in jaxpr
  want = lax.conv_general_dilated(x, kernel, (2, 2), padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  chex.assert_trees_all_equal(got, want)


# (stride, kernel size, groups, input height and width): odd sizes leave rows a strided window
# never reaches, which the kernel gradient's padding must account for.
KERNEL_GRADIENT_CASES = [(1, 3, 1, (8, 8)), (2, 3, 1, (9, 8)), (2, 1, 1, (7, 7)),
                         (1, 3, 2, (6, 7)), (2, 5, 4, (9, 10))]


@pytest.mark.parametrize('stride,size,groups,hw', KERNEL_GRADIENT_CASES, ids=str)
def test_kernel_gradient_is_autodiffs(stride, size, groups, hw):
  x = jax.random.normal(jax.random.key(0), (3, *hw, 8))
  kernel = jax.random.normal(jax.random.key(1), (size, size, 8 // groups, 4))
  padding = layers.symmetric_padding(size)
  y, vjp = jax.vjp(lambda k: levers.lax_conv2d(x, k, stride, padding, groups), kernel)
  dy = jax.random.normal(jax.random.key(2), y.shape)
  got = layers.kernel_gradient(x, dy, kernel.shape, stride, padding, groups)
  assert got.dtype == jnp.float32
  chex.assert_trees_all_close(got, vjp(dy)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('groups', [1, 2])
def test_a_float32_kernel_under_bfloat16_is_convolved_in_bfloat16_with_a_float32_gradient(groups):
  """The forward and the input gradient are the bfloat16 convolution's, bit for bit; the kernel
  gradient is the same contraction returned in float32, not rounded to bfloat16."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 8)).astype(jnp.bfloat16)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 8 // groups, 6))
  padding = layers.symmetric_padding(3)
  dy = jax.random.normal(jax.random.key(2), (4, 4, 4, 6)).astype(jnp.bfloat16)

  def cast(x, k):  # What conv2d did before: the kernel cast, its gradient bfloat16.
    return levers.lax_conv2d(x, k.astype(jnp.bfloat16), 2, padding, groups)

  with levers.using(levers.PLAIN):
    y, vjp = jax.vjp(lambda x, k: layers.conv2d(x, k, 2, padding, groups), x, kernel)
  y_cast, vjp_cast = jax.vjp(cast, x, kernel)
  (dx, dk), (dx_cast, dk_cast) = vjp(dy), vjp_cast(dy)
  assert y.dtype == dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
  chex.assert_trees_all_equal((y, dx), (y_cast, dx_cast))
  # In float32 from the same bfloat16 operands: the exact sums, which bfloat16 rounds.
  exact = jax.vjp(lambda k: levers.lax_conv2d(x.astype(jnp.float32), k, 2, padding, groups),
                  kernel.astype(jnp.bfloat16).astype(jnp.float32))[1](dy.astype(jnp.float32))[0]
  chex.assert_trees_all_close(dk, exact, rtol=1e-5, atol=1e-5)
  assert not jnp.allclose(dk_cast, exact, rtol=1e-5, atol=1e-5)


def test_nn_conv_hook_keeps_a_float32_kernel_gradient_under_bfloat16():
  """PyConv's grouped nn.Conv levels (layers.conv_general_dilated, keep_kernel_dtype)."""
  conv = nn.Conv(6, (3, 3), 1, layers.symmetric_padding(3), feature_group_count=2,
                 use_bias=False, dtype=jnp.bfloat16, conv_general_dilated=layers.conv_general_dilated,
                 promote_dtype=layers.keep_kernel_dtype)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  variables = conv.init(rng(), x)
  reference = nn.Conv(6, (3, 3), 1, layers.symmetric_padding(3), feature_group_count=2,
                      use_bias=False, dtype=jnp.bfloat16)

  def loss(module, params):
    return jnp.sum(module.apply({'params': params}, x).astype(jnp.float32) ** 2)

  with levers.using(levers.PLAIN):
    y = conv.apply(variables, x)
    grads = jax.grad(loss, 1)(conv, variables['params'])
  y_ref = reference.apply(variables, x)
  grads_ref = jax.grad(loss, 1)(reference, variables['params'])
  assert y.dtype == jnp.bfloat16 and grads['kernel'].dtype == jnp.float32
  chex.assert_trees_all_equal(y, y_ref)
  chex.assert_trees_all_close(grads, grads_ref, rtol=2e-2, atol=2e-2)


def test_import_does_not_load_tensorflow_or_torch():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [helpers.ROOT, env.get('PYTHONPATH')]))
  result = subprocess.run(
      [sys.executable, '-c',
       'import pyramidnet_jax, pyramidnet_jax.models, sys; '
       "print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))"],
      cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.strip() == '[]'
