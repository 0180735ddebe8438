"""The kit computes what the plain levers compute: the same loss, logits, gradients and BatchNorm
updates of a training step, to float rounding, with and without remat.

The two differ only in summation order: oneDNN's convolutions against XLA's own, the textbook
BatchNorm gradient against autodiff's. Each leaf is compared relative to its largest element
(floored at a hundredth of the largest leaf of its kind, for the BatchNorm biases whose gradient
is rounding noise by construction): to TOLERANCE = 5e-5, where the largest differences seen are
about 5e-6 of the leaf.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from tests.models import pyramidnet_reference as reference

TOLERANCE = 5e-5


def net(name: str, remat: bool):
  if name == 'pyconvresnet':
    return reference.tiny_pyconv(remat)
  return reference.small_net(name, remat=remat)


def relative_to_each_leaf(tree, like):
  """tree / (the largest magnitude of like's matching leaf), per top-level entry."""
  def scaled(tree, like):
    largest = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(like))
    return jax.tree.map(
        lambda a, b: np.asarray(a) / max(float(np.abs(b).max()), 1e-2 * largest), tree, like)
  return {key: scaled(tree[key], like[key]) for key in like}


@pytest.mark.parametrize('remat', [False, True], ids=['no_remat', 'remat'])
@pytest.mark.parametrize('name', ['cifar_basic', 'cifar_bottleneck', 'pyconvresnet'])
def test_plain_and_kit_training_steps_agree(name, remat):
  model, variables, x = net(name, remat)
  results = {}
  for chosen in (levers.PLAIN, xla_cpu.LEVERS):
    with levers.using(chosen):  # training_results traces afresh under each set of levers.
      results[chosen.name] = reference.training_results(model, variables, x,
                                                        reference.labels_for(x))
  plain, kit = results['plain'], results['xla_cpu']
  assert set(plain) == {'loss', 'logits', 'grads', 'batch_stats'}
  chex.assert_trees_all_equal_structs(plain['grads'], variables['params'])
  chex.assert_trees_all_equal_structs(plain['batch_stats'], variables['batch_stats'])
  chex.assert_trees_all_equal_shapes_and_dtypes(kit, plain)
  chex.assert_tree_all_finite(plain)
  chex.assert_trees_all_close(relative_to_each_leaf(kit, plain),
                              relative_to_each_leaf(plain, plain), rtol=0, atol=TOLERANCE)
