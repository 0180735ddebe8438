"""The kit's initial variables, drawn on the host with numpy (xla_cpu/host_init.py): the plain
levers' structure, shapes and dtypes (jitted model.init), and the authors' laws (init_laws.py)."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyramidnet_jax import PyConvHGResNet
from pyramidnet_jax import PyConvResNet
from pyramidnet_jax import PyramidNet
from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.xla_cpu import host_init
from tests import helpers
from tests.models import init_laws

NETWORKS = {
    # name: (model, input shape)
    'pyramidnet_cifar': (PyramidNet(depth=20, alpha=24, num_classes=10), (32, 32, 3)),
    'pyramidnet_cifar_bottleneck_1_channel': (
        PyramidNet(depth=11, alpha=12, bottleneck=True, num_classes=10, channel_multiple=8),
        (28, 28, 1)),
    'pyramidnet_imagenet': (
        PyramidNet(depth=50, alpha=48, bottleneck=True, stem='imagenet', num_classes=1000),
        (64, 64, 3)),
    'pyramidnet_bfloat16_params': (
        PyramidNet(depth=8, alpha=8, num_classes=10, param_dtype=jnp.bfloat16), (8, 8, 3)),
    'pyconvresnet_cifar': (PyConvResNet(depth=18, num_classes=10, stem='cifar'), (32, 32, 3)),
    'pyconvresnet_50': (PyConvResNet(depth=50, num_classes=1000), (64, 64, 3)),
    'pyconvhgresnet_50': (PyConvHGResNet(depth=50, num_classes=100), (64, 64, 3)),
}


def test_the_kit_initialises_on_the_host():
  assert xla_cpu.LEVERS.init_variables is host_init.init_variables
  assert levers.PLAIN.init_variables is levers.jitted_init


@pytest.mark.parametrize('name', list(NETWORKS))
def test_structure_shapes_and_dtypes_are_the_plain_levers(name):
  model, shape = NETWORKS[name]
  key = jax.random.key(0)
  plain = jax.eval_shape(lambda key: levers.PLAIN.init_variables(model, key, shape), key)
  got = host_init.init_variables(model, key, shape)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, plain)
  assert set(got) == {'params', 'batch_stats'}
  chex.assert_tree_all_finite(got)


def test_is_deterministic_per_key():
  model = PyramidNet(depth=8, alpha=8, num_classes=10)
  a, b, c = (host_init.init_variables(model, jax.random.key(seed), (8, 8, 3))
             for seed in (0, 0, 1))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a['params']['conv1']['kernel'], c['params']['conv1']['kernel'])
  # Each kernel has its own stream: same shapes, different values.
  assert not np.array_equal(a['params']['layer1_0']['conv2']['kernel'][..., :8, :8],
                            a['params']['layer2_0']['conv1']['kernel'][..., :8, :8])


@functools.lru_cache(maxsize=None)
def initialised():
  model = init_laws.wide_net()
  return model, host_init.init_variables(model, jax.random.key(0), init_laws.INPUT_SHAPE)


def test_conv_initialisation_is_he_fan_out_normal():
  init_laws.check_conv_kernels(initialised()[1])


def test_batchnorm_initialisation():
  init_laws.check_batch_norms(initialised()[1], 1 + 3 * 4 + 1)


def test_classifier_initialisation():
  init_laws.check_classifier(initialised()[1], 544, 100)


def test_pyconv_laws():
  model, shape = NETWORKS['pyconvhgresnet_50']
  variables = host_init.init_variables(model, jax.random.key(0), shape)
  params = helpers.flat_leaves(variables['params'])
  batch_norms = {name.rsplit('/', 1)[0] for name in params if name.endswith('/scale')}
  assert {'bn1', 'layer1_0/bn2', 'layer1_0/downsample_bn'} <= batch_norms
  init_laws.check_batch_norms(variables, len(batch_norms))
  # He fan-out normal on every conv, grouped levels included: std sqrt(2 / (k * k * out)).
  kernels = {k: v for k, v in params.items() if v.ndim == 4}
  assert 'layer3_0/conv2/conv2_2/kernel' in kernels  # (5, 5, 4, 256): 64 groups.
  for name, kernel in kernels.items():
    init_laws.check_he_fan_out_normal(name, kernel)
  init_laws.check_classifier(variables, 2048, 100)


def test_a_parameter_without_a_rule_is_an_error():
  class Head(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3, name='head')(x.reshape(x.shape[0], -1))

  with pytest.raises(ValueError, match='no rule for parameter params/head/'):
    host_init.init_variables(Head(), jax.random.key(0), (2, 2, 1))
