"""The layers every network here is built from: the convolution, initialisers, input checks.

The convolution is a bias-free drop-in for nn.Conv(use_bias=False) whose arithmetic is the
platform's `levers.current().conv2d` (XLA's own unless the CPU kit is on). Padding is explicit
and symmetric, PyTorch's semantics, so that converted weights give the authors' logits.
"""

from __future__ import annotations

import math
import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from pyramidnet_jax import levers

Padding = levers.Padding

# PyTorch defaults that the authors kept: BatchNorm momentum 0.1 (Flax 0.9), epsilon 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He fan-out normal, not truncated: the authors' normal_(0, sqrt(2 / (k * k * out))).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def symmetric_padding(kernel: int) -> Padding:
  # Flax 'SAME' pads (0, 1) for even inputs at stride 2, which would silently break parity with
  # the authors' weights.
  p = kernel // 2
  return ((p, p), (p, p))


def torch_linear_init(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default nn.Linear init, uniform(+-1/sqrt(fan_in)), for kernel and bias alike."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def check_choice(name: str, value: str, valid: Sequence[str]) -> None:
  if value not in valid:
    raise ValueError(f'Unknown {name} {value!r}: expected one of {", ".join(map(repr, valid))}.')


def validate_call(model: nn.Module, x: jax.Array) -> None:
  """The checks every network here makes on its num_classes, dropout_rate and input."""
  if isinstance(model.num_classes, bool) or not isinstance(model.num_classes, int) \
      or model.num_classes < 1:
    raise ValueError(f'num_classes must be a positive int, got {model.num_classes!r}.')
  if not 0.0 <= model.dropout_rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {model.dropout_rate}.')
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(
        f'{type(model).__name__} expects NHWC images with 1 or 3 channels, shape (batch, '
        f'height, width, channels); got shape {tuple(x.shape)}. Transpose NCHW input with '
        'x.transpose(0, 2, 3, 1).')


def declare_param(module: nn.Module, name: str, init_fn: Callable[..., Any],
                  shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """module.param(name, init_fn, shape, dtype), a given value checked against `shape` alone.

  Given a value (in apply), nn.Module.param checks its shape by tracing init_fn with
  jax.eval_shape, for every parameter at every trace, a noticeable share of a deep network's
  trace. This declares the same variable (name, collection, random stream, so the same initial
  values) and raises the same error as flax on a shape mismatch.
  """
  shape = tuple(shape)
  value = module.variable('params', name,
                          lambda: init_fn(module.make_rng('params'), shape, dtype)).value
  if jnp.shape(value) != shape:
    raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, jnp.shape(value), shape)
  return value


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
           groups: int = 1) -> jax.Array:
  """NHWC x HWIO convolution with explicit padding, by the platform's levers."""
  return levers.current().conv2d(x, kernel, stride, padding, groups)


class Conv(nn.Module):
  """Bias-free 2-D convolution with explicit padding; parameters as nn.Conv names them."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: Padding = ((0, 0), (0, 0))
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = declare_param(self, 'kernel', self.kernel_init,
                           (k, k, x.shape[-1], self.features), self.param_dtype)
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)


def conv_and_norm(module: nn.Module, train: bool, norm: type[nn.Module] = nn.BatchNorm):
  """The bias-free He-initialised Conv and the BatchNorm (`norm`, with nn.BatchNorm's fields)
  that the layers of `module` use, in its dtypes."""
  conv = functools.partial(Conv, kernel_init=conv_init, dtype=module.dtype,
                           param_dtype=module.param_dtype)
  norm = functools.partial(norm, use_running_average=not train, momentum=BN_MOMENTUM,
                           epsilon=BN_EPSILON, dtype=module.dtype, param_dtype=module.param_dtype)
  return conv, norm
