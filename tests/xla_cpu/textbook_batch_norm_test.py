"""The kit's BatchNorm training gradient (xla_cpu/batch_norm.py): the textbook formula, equal to
autodiff of nn.BatchNorm's arithmetic to float rounding."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.models import batch_norm as bn
from pyramidnet_jax.xla_cpu import batch_norm as textbook

EPSILON = 1e-5


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


def test_the_kit_trains_batch_norm_with_the_textbook_gradient():
  x, params, _ = inputs()
  assert xla_cpu.LEVERS.batch_norm_gradient is textbook.textbook_gradient
  assert textbook.textbook_gradient(bn.train_forward) is textbook.textbook_gradient(
      bn.train_forward)  # One custom_vjp per forward: traces stay cached.
  with levers.using(xla_cpu.LEVERS):
    jaxpr = str(jax.make_jaxpr(ours)(x, params))
  assert 'custom_vjp_call' in jaxpr


@pytest.mark.parametrize('use_statistics', [False, True])
def test_textbook_gradient_equals_autodiff_of_its_formula(use_statistics):
  """use_statistics also differentiates through the batch mean and variance (their cotangents
  are then not symbolic zeros)."""
  x, params, weights = inputs()

  def loss(norm, x, params):
    y, (mean, var) = norm(x, params)
    total = jnp.sum(jnp.tanh(y) * weights)
    return total + (jnp.sum(mean * var) if use_statistics else 0.0)

  with levers.using(xla_cpu.LEVERS):
    got = ours(x, params), jax.grad(loss, (1, 2))(ours, x, params)
  want = formula(x, params), jax.grad(loss, (1, 2))(formula, x, params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('padded', [False, True])
def test_textbook_backward_traces_to_the_equations_of_its_jnp_formula(padded):
  """The backward pass is written in lax to trace faster; its jaxpr must be that of the jnp
  formula, so that XLA compiles the same program."""
  x, channels = jnp.zeros((4, 5, 6, 9 if padded else 7)), jnp.zeros(9 if padded else 7)

  def backward(x, scale, mean, var, dy, dmean, dvar):
    n = x.shape[0] * x.shape[1] * x.shape[2]
    rstd = lax.rsqrt(var + EPSILON)
    x_hat = (x - mean) * rstd
    dbias = dy.sum((0, 1, 2))
    dscale = (dy * x_hat).sum((0, 1, 2))
    dx = (scale * rstd / n) * (n * dy - dbias - x_hat * dscale)
    dx = dx + dmean / n
    dx = dx + dvar * (2.0 / n) * (x - mean)
    return dx, dscale, dbias

  def ours_backward(x, s, m, v, dy, dm, dv):
    return textbook._train_norm_bwd(EPSILON, (x, s, m, v), (dy, dm, dv))

  args = (x, *[channels] * 3, x, channels, channels)
  assert str(jax.make_jaxpr(ours_backward)(*args)) == str(jax.make_jaxpr(backward)(*args))
