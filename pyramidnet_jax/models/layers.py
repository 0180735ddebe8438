"""The layers every network here is built from: the convolution, initialisers, input checks.

The convolution is a bias-free drop-in for nn.Conv(use_bias=False) whose arithmetic is the
platform's `levers.current().conv2d` (XLA's own unless the CPU kit is on). Padding is explicit
and symmetric, PyTorch's semantics, so that converted weights give the authors' logits.

Mixed precision: a float32 kernel convolved with a bfloat16 input runs in bfloat16, and its
gradient leaves the convolution as a float32 result (`low_precision_conv`). The gradient's sum
over the batch is that convolution's contraction, so under data parallelism XLA's partitioner
all-reduces it in that dtype: float32, never rounded to bfloat16, on one device as on many. (With
the kernel merely cast, autodiff's kernel gradient is a bfloat16 convolution, and the partitioner
all-reduces it in bfloat16: tests/multidevice_precision_test.py.)
"""

from __future__ import annotations

import math
import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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
  """NHWC x HWIO convolution with explicit padding, by the platform's levers; in x's dtype, a
  kernel of another dtype through low_precision_conv."""
  lever = levers.current().conv2d
  if kernel.dtype == x.dtype:
    return lever(x, kernel, stride, padding, groups)
  if kernel.dtype != jnp.float32:
    return lever(x, kernel.astype(x.dtype), stride, padding, groups)
  return low_precision_conv(lever, x, kernel, stride, padding, groups)


def kernel_gradient(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], stride: int,
                    padding: Padding, groups: int = 1) -> jax.Array:
  """The HWIO kernel's gradient of conv2d(x, kernel, stride, padding, groups) for the output
  gradient dy, as a float32 result: lax's own rule for it (the convolution of x with dy, the
  batch contracted), with preferred_element_type float32."""
  pads = []
  for axis, (low, _) in zip((1, 2), padding):
    covered = (dy.shape[axis] - 1) * stride + 1  # Input rows the strided windows start on.
    pads.append((low, covered - x.shape[axis] + kernel_shape[axis - 1] - low - 1))
  return lax.conv_general_dilated(
      x, dy, (1, 1), pads, rhs_dilation=(stride, stride),
      dimension_numbers=('CHWN', 'IHWO', 'HWNC'), batch_group_count=groups,
      preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def low_precision_conv(lever: Callable[..., jax.Array], x: jax.Array, kernel: jax.Array,
                       stride: int, padding: Padding, groups: int = 1) -> jax.Array:
  """`lever(x, kernel, stride, padding, groups)` (levers.Levers.conv2d's signature) computed in
  x's dtype, the kernel cast to it, with the kernel's gradient a float32 result (kernel_gradient)
  and x's the lever's own."""
  return lever(x, kernel.astype(x.dtype), stride, padding, groups)


def _low_precision_conv_fwd(lever, x, kernel, stride, padding, groups):
  low = kernel.astype(x.dtype)
  return lever(x, low, stride, padding, groups), (x, low)


def _low_precision_conv_bwd(lever, stride, padding, groups, residuals, dy):
  x, low = residuals
  (dx,) = jax.vjp(lambda x: lever(x, low, stride, padding, groups), x)[1](dy)
  return dx, kernel_gradient(x, dy, low.shape, stride, padding, groups)


low_precision_conv.defvjp(_low_precision_conv_fwd, _low_precision_conv_bwd)


@functools.cache
def _as_conv2d(general: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """A lax.conv_general_dilated-like lever as a conv2d one (NHWC, HWIO, undilated)."""

  def conv(x, kernel, stride, padding, groups):
    numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, levers.DIMENSION_NUMBERS)
    return general(x, kernel, (stride, stride), padding, lhs_dilation=(1, 1),
                   rhs_dilation=(1, 1), dimension_numbers=numbers, feature_group_count=groups,
                   precision=None)

  return conv


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """nn.Conv's hook for the platform's `levers.current().conv_general_dilated`, called as nn.Conv
  calls it; a float32 kernel under a lower-precision lhs (nn.Conv with keep_kernel_dtype) through
  low_precision_conv, for nn.Conv's plain case: NHWC, equal strides, explicit padding."""
  lever = levers.current().conv_general_dilated
  if lhs.dtype == rhs.dtype or rhs.dtype != jnp.float32:
    return lever(lhs, rhs.astype(lhs.dtype), window_strides, padding, lhs_dilation=lhs_dilation,
                 rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                 feature_group_count=feature_group_count, precision=precision)
  plain = (window_strides[0] == window_strides[1] and not isinstance(padding, str)
           and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
           and precision is None
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                               levers.DIMENSION_NUMBERS))
  if not plain:
    raise NotImplementedError('A kernel dtype other than the input\'s needs a plain NHWC '
                              'convolution: equal strides, explicit padding, no dilation.')
  return low_precision_conv(_as_conv2d(lever), lhs, rhs, window_strides[0],
                            tuple(tuple(p) for p in padding), feature_group_count)


def keep_kernel_dtype(inputs, kernel, bias=None, *, dtype=None):
  """nn.Conv's promote_dtype, with the kernel left in its parameter dtype for
  conv_general_dilated to cast, so that its gradient stays float32."""
  inputs, bias = (None if a is None else jnp.asarray(a, dtype) for a in (inputs, bias))
  return inputs, kernel, bias


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
    return conv2d(x.astype(self.dtype), kernel, self.stride, self.padding)


def conv_and_norm(module: nn.Module, train: bool, norm: type[nn.Module] = nn.BatchNorm):
  """The bias-free He-initialised Conv and the BatchNorm (`norm`, with nn.BatchNorm's fields, and
  with module.bn_group_size where that is not 0) that the layers of `module` use, in its
  dtypes."""
  conv = functools.partial(Conv, kernel_init=conv_init, dtype=module.dtype,
                           param_dtype=module.param_dtype)
  groups = {'group_size': module.bn_group_size} if module.bn_group_size else {}
  norm = functools.partial(norm, use_running_average=not train, momentum=BN_MOMENTUM,
                           epsilon=BN_EPSILON, dtype=module.dtype, param_dtype=module.param_dtype,
                           **groups)
  return conv, norm
