"""The plain levers' initial variables (jitted model.init, what GPUs, TPUs and library users get)
follow the authors' laws (init_laws.py). The CPU kit's host-side draw: xla_cpu/host_init_test.py."""

from __future__ import annotations

import functools

import chex
import jax
import numpy as np
import pytest

from pyramidnet_jax import PyramidNet
from pyramidnet_jax import levers
from tests.models import init_laws
from tests.models.paper_tables import rng


@functools.lru_cache(maxsize=None)
def initialised():
  model = init_laws.wide_net()
  return model, levers.PLAIN.init_variables(model, rng(), init_laws.INPUT_SHAPE)


def test_plain_init_is_model_init():
  model, variables = initialised()
  chex.assert_trees_all_equal_shapes_and_dtypes(
      variables, jax.eval_shape(model.init, rng(), np.zeros((1, *init_laws.INPUT_SHAPE))))


def test_conv_initialisation_is_he_fan_out_normal():
  init_laws.check_conv_kernels(initialised()[1])


def test_batchnorm_initialisation():
  init_laws.check_batch_norms(initialised()[1], 1 + 3 * 4 + 1)


def test_classifier_initialisation():
  model, variables = initialised()
  assert model.num_features == 544
  init_laws.check_classifier(variables, 544, 100)


@pytest.mark.parametrize('seeds, same', [((0, 0), True), ((0, 1), False)])
def test_the_key_decides_the_values(seeds, same):
  model = PyramidNet(depth=8, alpha=8, num_classes=10)
  a, b = (levers.PLAIN.init_variables(model, rng(seed), (8, 8, 3)) for seed in seeds)
  if same:
    chex.assert_trees_all_equal(a, b)
  else:
    assert not np.array_equal(a['params']['conv1']['kernel'], b['params']['conv1']['kernel'])
