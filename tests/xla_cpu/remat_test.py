"""The kit's rematerialisation (xla_cpu/remat.py): exact, and it really cuts XLA:CPU's memory,
where jax.checkpoint's barriers are dropped and the recomputation merged back into the forward
pass (docs/benchmarks.md#levers)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest

from pyramidnet_jax import PyConvResNet
from pyramidnet_jax import PyramidNet
from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.xla_cpu import convolution
from pyramidnet_jax.xla_cpu import onednn
from tests import helpers
from tests.models import pyramidnet_reference as reference


@pytest.mark.parametrize('name', ['cifar_basic', 'cifar_bottleneck', 'pyconv'])
def test_kit_remat_is_exact(name):
  """The same loss, logits, gradients and running statistics as without remat."""
  def net(remat):
    if name == 'pyconv':
      return reference.tiny_pyconv(remat)
    return reference.small_net(name, remat=remat)

  _, variables, x = net(False)
  results = []
  with levers.using(xla_cpu.LEVERS):
    for remat in (False, True):
      results.append(reference.training_results(net(remat)[0], variables, x,
                                                reference.labels_for(x)))
  chex.assert_trees_all_equal_structs(*results)
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-6, atol=1e-7)


@pytest.fixture
def backend():
  previous = convolution.backend()
  yield convolution.set_backend
  convolution.set_backend(previous)


@pytest.mark.parametrize('name', ['xla'] + (['onednn'] if onednn.status() is None else []))
def test_pyramidnet_remat_cuts_the_compiled_training_memory(backend, name):
  """XLA's temporary buffer for the gradient, with and without remat, with XLA's convolutions and
  with oneDNN's (which need far less temp memory to begin with)."""
  x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
  backend(name)
  with levers.using(xla_cpu.LEVERS):
    temp_bytes = {remat: helpers.gradient_temp_bytes(
        PyramidNet(depth=20, alpha=24, num_classes=10, remat=remat), x) for remat in (False, True)}
  assert temp_bytes[True] < 0.6 * temp_bytes[False], temp_bytes


def test_pyconv_remat_cuts_the_compiled_training_memory():
  x = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)
  with levers.using(xla_cpu.LEVERS):
    temp_bytes = {remat: helpers.gradient_temp_bytes(
        PyConvResNet(depth=18, num_classes=10, stem='cifar', remat=remat), x)
        for remat in (False, True)}
  assert temp_bytes[True] < 0.8 * temp_bytes[False], temp_bytes
