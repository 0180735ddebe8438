"""BatchNorm as the networks compute it (models/batch_norm.py): nn.BatchNorm's variables and
arithmetic written in lax, with the plain levers' gradient, autodiff of those equations."""

from __future__ import annotations

import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.models import batch_norm as bn
from tests import helpers

EPSILON, MOMENTUM = 1e-5, 0.9


def inputs():
  keys = jax.random.split(jax.random.key(0), 4)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], (4, 5, 6, 7))  # Off-centre, so the mean matters.
  params = {'scale': jax.random.normal(keys[1], (7,)), 'bias': jax.random.normal(keys[2], (7,))}
  return x, params, jax.random.normal(keys[3], x.shape)


def formula(x, params):
  """nn.BatchNorm's training arithmetic in jnp: (y, (batch mean, batch var))."""
  mean = x.mean((0, 1, 2))
  var = jnp.maximum(0.0, jnp.square(x).mean((0, 1, 2)) - jnp.square(mean))
  return (x - mean) * (lax.rsqrt(var + EPSILON) * params['scale']) + params['bias'], (mean, var)


def ours(x, params):
  return bn.batch_norm(x, params, None, True, EPSILON, jnp.float32)


@pytest.mark.parametrize('chosen', [levers.PLAIN, xla_cpu.LEVERS], ids=lambda lv: lv.name)
@pytest.mark.parametrize('use_statistics', [False, True])
def test_training_gradient_equals_autodiff_of_nn_batch_norms_formula(use_statistics, chosen):
  """Plain: autodiff itself (no custom_vjp); the kit: its textbook gradient, to rounding.
  use_statistics also differentiates through the batch mean and variance (their cotangents are
  then not symbolic zeros)."""
  x, params, weights = inputs()

  def loss(norm, x, params):
    y, (mean, var) = norm(x, params)
    total = jnp.sum(jnp.tanh(y) * weights)
    return total + (jnp.sum(mean * var) if use_statistics else 0.0)

  with levers.using(chosen):
    # A fresh function: jax caches a trace per Python function, across lever switches.
    jaxpr = jax.make_jaxpr(lambda x, params: ours(x, params))(x, params)
    custom = 'custom_vjp_call' in helpers.primitive_names(jaxpr)
    got = ours(x, params), jax.grad(loss, (1, 2))(ours, x, params)
  assert custom == (chosen is xla_cpu.LEVERS)
  want = formula(x, params), jax.grad(loss, (1, 2))(formula, x, params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('chosen', [levers.PLAIN, xla_cpu.LEVERS], ids=lambda lv: lv.name)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_module_is_nn_batch_norm(train, dtype, chosen):
  """bn.BatchNorm (PyConv's BatchNorm) under either lever set: nn.BatchNorm's variables, outputs
  and running averages bit for bit, and its gradients (the kit's textbook one to rounding)."""
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 5, 6, 7))
  kwargs = dict(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON, dtype=dtype)
  module, reference = bn.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
  initial = module.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(initial, reference.init(jax.random.key(1), x))
  variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
                           initial)
  weights = jax.random.normal(jax.random.key(3), x.shape)

  def loss(module, params, x):
    y, stats = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * weights), (y, stats)

  with levers.using(chosen):
    (_, (y, stats)), grads = jax.value_and_grad(loss, (1, 2), has_aux=True)(
        module, variables['params'], x)
  (_, (y_ref, stats_ref)), grads_ref = jax.value_and_grad(loss, (1, 2), has_aux=True)(
      reference, variables['params'], x)
  assert y.dtype == y_ref.dtype == dtype
  chex.assert_trees_all_equal((y, stats), (y_ref, stats_ref))
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  chex.assert_trees_all_close(grads, grads_ref, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('padded', [False, True])
def test_batch_norm_in_lax_traces_to_the_equations_of_its_jnp_formulas(padded):
  """batch_norm.py writes BatchNorm in lax to trace faster; its jaxprs must be those of the jnp
  formulas (nn.BatchNorm's arithmetic), so that XLA compiles the same program."""
  x, channels = jnp.zeros((4, 5, 6, 9 if padded else 7)), jnp.zeros(9 if padded else 7)

  def forward(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = jnp.maximum(0.0, jnp.square(x).mean((0, 1, 2)) - jnp.square(mean))
    return (x - mean) * (lax.rsqrt(var + EPSILON) * scale) + bias, mean, var

  def evaluation(x, mean, var, scale, bias):
    return (x - mean) * (lax.rsqrt(var + EPSILON) * scale) + bias

  def running(mean, var, batch_mean, batch_var):
    n = mean.shape[0]
    return (MOMENTUM * mean + (1 - MOMENTUM) * batch_mean[:n],
            MOMENTUM * var + (1 - MOMENTUM) * batch_var[:n])

  def ours_running(mean, var, batch_mean, batch_var):
    stats = {'bn': {'mean': types.SimpleNamespace(value=mean),
                    'var': types.SimpleNamespace(value=var)}}
    bn.update_running_stats(stats, {'bn': (batch_mean, batch_var)}, MOMENTUM)
    return stats['bn']['mean'].value, stats['bn']['var'].value

  def assert_same_jaxpr(ours, reference, *args):
    assert str(jax.make_jaxpr(ours)(*args)) == str(jax.make_jaxpr(reference)(*args))

  assert_same_jaxpr(lambda x, s, b: bn.train_forward(x, s, b, EPSILON), forward,
                    x, channels, channels)
  assert_same_jaxpr(lambda *a: bn.normalise(*a, EPSILON), evaluation,
                    x.astype(jnp.bfloat16), *[channels] * 4)  # Eval in bf16 promotes as jnp.
  assert_same_jaxpr(ours_running, running, jnp.zeros(7), jnp.ones(7), channels, channels)


@pytest.mark.parametrize('chosen', [levers.PLAIN, xla_cpu.LEVERS], ids=lambda lv: lv.name)
@pytest.mark.parametrize('group_size', [1, 2])
def test_groups_are_normalised_each_with_its_own_statistics(group_size, chosen):
  """group_size g: each run of g consecutive examples is nn.BatchNorm's formula on its own, the
  batch statistics returned (for the running averages) are the mean of the groups', and the
  gradients are autodiff's of that (the kit: its textbook gradient per group, to rounding)."""
  x, params, weights = inputs()
  groups = x.shape[0] // group_size

  def reference(x, params):
    parts = [formula(x[i * group_size:(i + 1) * group_size], params) for i in range(groups)]
    y = jnp.concatenate([y for y, _ in parts])
    return y, tuple(jnp.mean(jnp.stack([stats[k] for _, stats in parts]), 0) for k in (0, 1))

  def grouped(x, params):
    return bn.batch_norm(x, params, None, True, EPSILON, jnp.float32, group_size)

  def loss(norm, x, params):
    y, _ = norm(x, params)
    return jnp.sum(jnp.tanh(y) * weights)

  with levers.using(chosen):
    got = grouped(x, params), jax.grad(loss, (1, 2))(grouped, x, params)
  want = reference(x, params), jax.grad(loss, (1, 2))(reference, x, params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  # Not the whole batch's statistics: the test can tell groups from none.
  assert not jnp.allclose(got[0][1][1], formula(x, params)[1][1], rtol=1e-3)


def test_a_group_of_the_whole_batch_is_the_whole_batch_bit_for_bit():
  x, params, _ = inputs()
  whole = bn.batch_norm(x, params, None, True, EPSILON, jnp.float32)
  chex.assert_trees_all_equal(bn.batch_norm(x, params, None, True, EPSILON, jnp.float32,
                                            x.shape[0]), whole)


def test_groups_that_do_not_divide_the_batch_are_refused():
  x, params, _ = inputs()
  with pytest.raises(ValueError, match='bn_group_size 3 does not divide the batch of 4'):
    bn.batch_norm(x, params, None, True, EPSILON, jnp.float32, 3)


def test_groups_in_pyramidnet_at_padded_widths_and_with_remat_under_either_levers():
  """PyramidNet's blocks normalise padded (G, C) statistics: padded widths, remat and the kit
  give exact widths' plain outputs, running averages and gradients, to rounding."""
  from pyramidnet_jax import models  # pylint: disable=g-import-not-at-top
  x = 1.0 + jax.random.normal(jax.random.key(0), (8, 16, 16, 1))
  results = {}
  for chosen in (levers.PLAIN, xla_cpu.LEVERS):
    for multiple in (1, 8):
      model = models.from_config({**helpers.tiny_config().model, 'channel_multiple': multiple,
                                  'bn_group_size': 2, 'remat': True}, 10)
      variables = model.init(jax.random.key(0), x[:1])

      def loss(params, model=model, variables=variables):
        y, updates = model.apply({**variables, 'params': params}, x, train=True,
                                 mutable=['batch_stats'])
        return jnp.sum(y ** 2), (y, updates)

      with levers.using(chosen):
        results[chosen.name, multiple] = jax.grad(loss, has_aux=True)(variables['params'])
  for key, result in results.items():
    chex.assert_trees_all_close(result, results['plain', 1], rtol=1e-4, atol=1e-4)
