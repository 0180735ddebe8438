"""BatchNorm as the networks compute it: nn.BatchNorm's variables and arithmetic, and groups.

The arithmetic is written in lax, not jnp: each jnp operator is a nested jit whose trace is cached
per shape, and every PyramidNet block has new shapes, so jnp traced the same equations with a cache
miss each, a large share of a deep network's trace. The jaxprs are those jnp produces, equation for
equation (tests compare them). The training gradient is the platform's
(`levers.current().batch_norm_gradient`): autodiff of these equations unless the CPU kit is on.

Groups (`group_size`, config.model.bn_group_size): 0, or the whole batch, computes the statistics
over the whole (global) batch, nn.BatchNorm's arithmetic bit for bit. A size g that divides the
batch computes them over each group of g consecutive examples, and normalises each group with its
own: with g equal to one device's share of a data-parallel batch, these are per-device statistics,
as PyTorch's DataParallel (and each process of DistributedDataParallel without SyncBatchNorm)
computes them. The running averages are then updated with the mean over the groups of the group
means and variances; DataParallel keeps device 0's instead, which is the same in expectation.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from pyramidnet_jax import levers
from pyramidnet_jax.models import layers


def declare_variables(module: nn.Module, features: int, param_dtype) -> tuple:
  """nn.BatchNorm's variables in module's scope: ({'scale', 'bias'}, {'mean', 'var': Variable})."""
  shape = (features,)
  scale = layers.declare_param(module, 'scale', nn.initializers.ones, shape, param_dtype)
  bias = layers.declare_param(module, 'bias', nn.initializers.zeros, shape, param_dtype)
  mean = module.variable('batch_stats', 'mean', lambda: jnp.zeros(shape, jnp.float32))
  var = module.variable('batch_stats', 'var', lambda: jnp.ones(shape, jnp.float32))
  return {'scale': scale, 'bias': bias}, {'mean': mean, 'var': var}


def scalar(value, like: jax.Array):
  """A Python number as a scalar of like's dtype, as jnp's weak typing converts it."""
  return like.dtype.type(value)


def per_channel(v: jax.Array, like: jax.Array) -> jax.Array:
  """A (C,) vector broadcast against an NHWC array, as jnp's broadcasting does; or a (G, C) one,
  per group, against a grouped (G, g, H, W, C) array."""
  if v.ndim == 2:
    return lax.broadcast_in_dim(v, (v.shape[0],) + (1,) * (like.ndim - 2) + v.shape[1:],
                                (0, like.ndim - 1))
  return lax.broadcast_in_dim(v, (1,) * (like.ndim - 1) + v.shape, (like.ndim - 1,))


def like_statistics(v: jax.Array, statistic: jax.Array) -> jax.Array:
  """A (C,) parameter against per-group (G, C) statistics as (1, C); unchanged against (C,)."""
  return lax.broadcast_in_dim(v, (1, *v.shape), (1,)) if statistic.ndim == 2 else v


def statistics_axes(x: jax.Array) -> tuple[int, ...]:
  """The axes statistics reduce: N, H, W of an NHWC array, g, H, W of a grouped one."""
  return (1, 2, 3) if x.ndim == 5 else (0, 1, 2)


def statistics_count(x: jax.Array) -> int:
  """How many values each statistic averages."""
  return math.prod(x.shape[a] for a in statistics_axes(x))


def normalise(x, mean, var, scale, bias, epsilon):
  # (x - mean) * (rsqrt(var + epsilon) * scale) + bias, promoted as jnp would (eval: bf16 x).
  dtype = jnp.result_type(x, mean, var, scale, bias)
  x, mean, var, scale, bias = (lax.convert_element_type(a, dtype) if a.dtype != dtype else a
                               for a in (x, mean, var, scale, bias))
  centred = lax.sub(x, per_channel(mean, x))
  factor = lax.mul(lax.rsqrt(lax.add(var, scalar(epsilon, var))), like_statistics(scale, var))
  return lax.add(lax.mul(centred, per_channel(factor, x)), per_channel(bias, x))


def _mean_over_nhw(x):
  return lax.div(lax.reduce_sum(x, statistics_axes(x)), scalar(statistics_count(x), x))


def train_forward(x32, scale, bias, epsilon):
  """Training normalisation with the batch's statistics: (y, batch mean, batch var); on a grouped
  (G, g, H, W, C) array, each group's, (G, C)."""
  mean = _mean_over_nhw(x32)
  var = lax.max(scalar(0.0, x32),
                lax.sub(_mean_over_nhw(lax.square(x32)), lax.square(mean)))
  return normalise(x32, mean, var, scale, bias, epsilon), mean, var


def check_group_size(group_size: int) -> None:
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
    raise ValueError(f'bn_group_size must be an int >= 0 (0: the whole batch), got '
                     f'{group_size!r}.')


def num_groups(group_size: int, batch: int) -> int:
  """How many groups of `group_size` examples a batch of `batch` makes (1 for 0: the whole)."""
  check_group_size(group_size)
  if group_size and batch % group_size:
    raise ValueError(f'bn_group_size {group_size} does not divide the batch of {batch} examples '
                     '(BatchNorm statistics are computed over groups of that many consecutive '
                     'examples; 0: the whole batch).')
  return batch // group_size if group_size else 1


def _mean_over_groups(v):
  return lax.div(lax.reduce_sum(v, (0,)), scalar(v.shape[0], v))


def batch_norm(x: jax.Array, params, stats, train: bool, epsilon: float, dtype,
               group_size: int = 0):
  """nn.BatchNorm's arithmetic, operation for operation: (output, (batch mean, batch var)).

  `stats` (running mean and var) are read in evaluation only; in training the batch's are used
  and returned for the running averages, or with `group_size` (see the module docstring) each
  group's, and their mean over the groups returned.
  """
  if train:
    x32 = x.astype(jnp.promote_types(dtype, jnp.float32))
    forward = levers.current().batch_norm_gradient(train_forward)
    groups = num_groups(group_size, x.shape[0])
    if groups == 1:
      y, mean, var = forward(x32, params['scale'], params['bias'], epsilon)
      return jnp.asarray(y, dtype), (mean, var)
    grouped = lax.reshape(x32, (groups, x.shape[0] // groups, *x.shape[1:]))
    y, mean, var = forward(grouped, params['scale'], params['bias'], epsilon)
    y = lax.reshape(y, x.shape)
    return jnp.asarray(y, dtype), (_mean_over_groups(mean), _mean_over_groups(var))
  y = normalise(x, stats['mean'], stats['var'], params['scale'], params['bias'], epsilon)
  return jnp.asarray(y, dtype), None


def update_running_stats(stats, batch, momentum: float) -> None:
  """nn.BatchNorm's update, on the exact channels: ra = momentum * ra + (1 - momentum) * batch."""
  for layer, variables in stats.items():
    mean, var = batch[layer]
    for name, batch_value in (('mean', mean), ('var', var)):
      running = variables[name].value
      n = running.shape[0]
      kept = lax.mul(scalar(momentum, running), running)
      if batch_value.shape[0] != n:
        batch_value = lax.slice(batch_value, (0,), (n,))
      variables[name].value = lax.add(kept, lax.mul(scalar(1 - momentum, running), batch_value))


class BatchNormVariables(nn.Module):
  """nn.BatchNorm's variables (params scale/bias, batch_stats mean/var), without its compute."""
  features: int
  param_dtype: Any = jnp.float32

  # `create`, not `__call__`, so that capture_intermediates (which records `__call__` outputs)
  # does not try to record flax Variables.
  @nn.compact
  def create(self):
    return declare_variables(self, self.features, self.param_dtype)


class BatchNorm(nn.Module):
  """nn.BatchNorm's fields, variables, initial values, arithmetic and running averages, with
  `group_size` (0: nn.BatchNorm's whole batch). The PyConv networks' BatchNorm, and PyramidNet's
  stem and final one under groups (nn.BatchNorm's otherwise); PyramidNet's blocks call batch_norm
  on their padded variables."""
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  group_size: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    params, stats = declare_variables(self, x.shape[-1], self.param_dtype)
    train = not self.use_running_average
    y, batch = batch_norm(x, params, {k: v.value for k, v in stats.items()}, train, self.epsilon,
                          self.dtype, self.group_size)
    if train and not self.is_initializing():  # As nn.BatchNorm: init leaves the averages be.
      update_running_stats({'bn': stats}, {'bn': batch}, self.momentum)
    return y
