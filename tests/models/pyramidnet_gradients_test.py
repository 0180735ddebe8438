"""PyramidNet's gradients on tiny networks: against the reference network's, in training, with
rematerialisation (the plain jax.checkpoint) and with channels padded for faster compiles."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyramidnet_jax import levers
from pyramidnet_jax.models import pyramidnet
from pyramidnet_jax.models import pyramidnet_blocks as blocks
from tests.models.paper_tables import leaf_items, rng
from tests.models.pyramidnet_reference import (
    SMALL_NETS, assert_close_scaled, labels_for, model_grads, reference_grads, small_net,
    train_and_eval, train_mode_dead_biases, training_results)


@pytest.mark.parametrize('name', ['cifar_basic', 'cifar_bottleneck'])
def test_gradients_match_reference(name):
  # Eval mode (running statistics, as when fine-tuning with frozen BN): every leaf is live, and
  # the gradients are those of the reference network (at stride 2 on odd sizes too).
  model, variables, x = small_net(name)
  (loss, _), grads = model_grads(model, variables['params'], variables['batch_stats'], x,
                                 labels_for(x), False)
  sums = {k: float(jnp.abs(g).sum()) for k, g in leaf_items(grads)}
  assert sums.keys() == dict(leaf_items(variables['params'])).keys()
  floor = 1e-4 * float(np.median(list(sums.values())))
  assert all(total > floor for total in sums.values()), sums
  ref_loss, ref = reference_grads(variables['params'], variables['batch_stats'], x,
                                  labels_for(x), model.stem, model.bottleneck)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  chex.assert_trees_all_equal_structs(grads, ref)
  for (key, g), (_, r) in zip(leaf_items(grads), leaf_items(ref)):
    assert g.dtype == jnp.float32, key
    assert_close_scaled(g, r, 1e-4)


@pytest.mark.parametrize('name', ['cifar_basic', 'cifar_bottleneck'])
def test_every_parameter_gets_a_gradient_in_train_mode(name):
  model, variables, x = small_net(name)
  _, grads = model_grads(model, variables['params'], variables['batch_stats'], x, labels_for(x),
                         True)
  chex.assert_tree_all_finite(grads)
  sums = {k: float(jnp.abs(g).sum()) for k, g in leaf_items(grads)}
  assert sums.keys() == dict(leaf_items(variables['params'])).keys()
  dead = train_mode_dead_biases(variables['params'], model.stem == 'cifar')
  assert dead <= sums.keys()
  median = float(np.median([v for k, v in sums.items() if k not in dead]))
  for key, total in sums.items():
    if key in dead:
      assert total < 1e-4 * median, (key, total, median)  # Float rounding only (~1e-6).
    else:
      assert total > 1e-3 * median, (key, total, median)


@pytest.mark.parametrize('name', ['cifar_basic', 'cifar_bottleneck'])
def test_plain_remat_is_exact(name):
  """jax.checkpoint (the plain levers' remat): the same names, loss, logits, gradients and
  running statistics as without remat."""
  _, variables, x = small_net(name)
  results = {}
  with levers.using(levers.PLAIN):
    for remat in (False, True):
      model, _, _ = small_net(name, remat=remat)
      abstract = jax.eval_shape(model.init, rng(), jax.ShapeDtypeStruct(x.shape, x.dtype))
      chex.assert_trees_all_equal_shapes_and_dtypes(abstract, variables)  # Same names too.
      results[remat] = training_results(model, variables, x, labels_for(x))
  # Bit for bit on XLA:CPU, which merges the recomputation back into the forward pass.
  chex.assert_trees_all_close(results[True], results[False], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('name', list(SMALL_NETS))
@pytest.mark.parametrize('channel_multiple', [8, 32])
def test_channel_padding_is_inert(name, channel_multiple):
  """Padded widths: the same variables, and the same outputs, gradients and statistics."""
  model, variables, x = small_net(name)
  padded, _, _ = small_net(name, channel_multiple=channel_multiple)
  abstract = jax.eval_shape(padded.init, rng(), jax.ShapeDtypeStruct(x.shape, x.dtype))
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, variables)
  # Padding must really happen here for the test to mean anything.
  specs = blocks.block_specs(padded.widths, pyramidnet.STEM_WIDTH[padded.stem],
                             padded.bottleneck, channel_multiple)
  assert any(s.padded_width > s.width for s in specs)
  assert all(s.padded_width % channel_multiple == 0 for s in specs)

  def run(m):
    logits, updates, features, eval_logits, _ = train_and_eval(m, variables, x)
    args = (variables['params'], variables['batch_stats'], x, labels_for(x), True)
    (loss, _), grads = model_grads(m, *args)
    return logits, updates, features, eval_logits, loss, grads

  want, got = run(model), run(padded)
  chex.assert_trees_all_equal_shapes(got, want)
  for (key, a), (_, b) in zip(leaf_items(got), leaf_items(want)):
    # Scaled to each leaf; the floor covers the biases whose gradient is rounding noise (~1e-8).
    scale = max(float(np.abs(b).max()), 1e-2)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale, err_msg=key)
