"""BatchNorm's textbook gradient, for the CPU kit.

Autodiff of the training normalisation makes XLA:CPU run more passes over the activations than
the textbook gradient: one reduction pass and one elementwise pass over x. Equal to autodiff's to
float rounding (tests), and a third faster per training step on CPU (docs/benchmarks.md#levers).
The same formula serves BatchNorm over groups of the batch (models/batch_norm.py), per group.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax import lax

from pyramidnet_jax.models.batch_norm import like_statistics
from pyramidnet_jax.models.batch_norm import per_channel
from pyramidnet_jax.models.batch_norm import scalar
from pyramidnet_jax.models.batch_norm import statistics_axes
from pyramidnet_jax.models.batch_norm import statistics_count


@functools.cache
def textbook_gradient(forward: Callable) -> Callable:
  """`forward(x32, scale, bias, epsilon) -> (y, mean, var)` with the textbook gradient."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def train_norm(x32, scale, bias, epsilon):
    return forward(x32, scale, bias, epsilon)

  def train_norm_fwd(x32, scale, bias, epsilon):
    y, mean, var = forward(x32.value, scale.value, bias.value, epsilon)
    return (y, mean, var), (x32.value, scale.value, mean, var)

  train_norm.defvjp(train_norm_fwd, _train_norm_bwd, symbolic_zeros=True)
  return train_norm


def _train_norm_bwd(epsilon, residuals, cotangents):
  # The batch statistics are outputs only for the running averages, so their cotangents are
  # normally symbolic zeros. In jnp terms, with sums over the axes the statistics reduce (each
  # group's, for a grouped (G, g, H, W, C) input):
  # dx = (scale * rstd / n) * (n * dy - sum(dy) - x_hat * sum(dy * x_hat)).
  x32, scale, mean, var = residuals
  dy, dmean, dvar = cotangents
  axes, n = statistics_axes(x32), statistics_count(x32)
  rstd = lax.rsqrt(lax.add(var, scalar(epsilon, var)))
  x_hat = lax.mul(lax.sub(x32, per_channel(mean, x32)), per_channel(rstd, x32))
  dbias = lax.reduce_sum(dy, axes)
  dscale = lax.reduce_sum(lax.mul(dy, x_hat), axes)
  factor = lax.div(lax.mul(like_statistics(scale, rstd), rstd), scalar(n, scale))
  inner = lax.sub(lax.sub(lax.mul(scalar(n, dy), dy), per_channel(dbias, dy)),
                  lax.mul(x_hat, per_channel(dscale, x_hat)))
  dx = lax.mul(per_channel(factor, inner), inner)
  if not isinstance(dmean, jax.custom_derivatives.SymbolicZero):
    dx = lax.add(dx, per_channel(lax.div(dmean, scalar(n, dmean)), dx))
  if not isinstance(dvar, jax.custom_derivatives.SymbolicZero):
    scaled = lax.mul(dvar, scalar(2.0 / n, dvar))
    centred = lax.sub(x32, per_channel(mean, x32))
    dx = lax.add(dx, lax.mul(per_channel(scaled, centred), centred))
  if x32.ndim == 5:  # The parameters' gradients sum the groups'.
    dscale, dbias = lax.reduce_sum(dscale, (0,)), lax.reduce_sum(dbias, (0,))
  return dx, dscale, dbias
