"""The kit's BatchNorm training gradient (xla_cpu/batch_norm.py): the textbook formula, equal to
autodiff of nn.BatchNorm's arithmetic to float rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.models import batch_norm as bn
from pyramidnet_jax.xla_cpu import batch_norm as textbook

EPSILON = 1e-5


def test_the_kit_trains_batch_norm_with_the_textbook_gradient():
  x, params = jnp.ones((2, 3, 3, 4)), {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}
  assert xla_cpu.LEVERS.batch_norm_gradient is textbook.textbook_gradient
  assert textbook.textbook_gradient(bn.train_forward) is textbook.textbook_gradient(
      bn.train_forward)  # One custom_vjp per forward: traces stay cached.
  with levers.using(xla_cpu.LEVERS):
    jaxpr = str(jax.make_jaxpr(
        lambda x, p: bn.batch_norm(x, p, None, True, EPSILON, jnp.float32))(x, params))
  assert 'custom_vjp_call' in jaxpr


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
