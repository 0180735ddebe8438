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
