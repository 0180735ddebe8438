"""The networks' 2-D convolution: oneDNN's on CPU where it is available, XLA's elsewhere.

XLA's CPU convolutions are slow at PyramidNet's odd widths (batch 64, 32x32, 24 channels, 3x3,
on a 2-core AVX-512 CPU: forward 5.3 ms, input gradient 6.1 ms, weight gradient 49 ms, against
oneDNN's 2.7, 2.6 and 2.8 ms; docs/benchmarks.md). So on CPU, for float32 on a single device,
`conv2d` calls oneDNN through XLA FFI (pyramidnet_jax/onednn.py), forward and backward. Where
oneDNN cannot be built (no compiler or library: onednn.status() says why), XLA's convolutions
run, with the weight gradient as a sum over taps of (shifted input)^T @ (output gradient),
dense matmuls that XLA runs faster than its own rule. On several devices XLA's are used too:
the SPMD partitioner would replicate an FFI call over the whole batch. Other platforms always
use XLA's own rules. All backends compute the same convolution, to float rounding.
Parameters keep nn.Conv's name and layout.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
from jax import lax

from pyramidnet_jax import onednn

CPU_BACKENDS = ('auto', 'onednn', 'xla')
_cpu_backend = 'auto'

Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
          groups: int = 1) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=_DIMENSION_NUMBERS,
                                  feature_group_count=groups)


def _matmul_weight_grad(x, dy, kernel_shape, stride, padding):
  kh, kw, cin, cout = kernel_shape
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  n, ho, wo, _ = dy.shape
  dy = dy.reshape(-1, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(x, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, cin),
                      (1, stride, stride, 1))
      taps.append(jnp.matmul(tap.reshape(-1, cin).T, dy))
  return jnp.stack(taps).reshape(kernel_shape)


def symmetric_padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Explicit symmetric padding (PyTorch semantics); Flax 'SAME' pads (0, 1) for even inputs at
  # stride 2, which would silently break parity with the authors' weights.
  p = kernel // 2
  return ((p, p), (p, p))


def set_cpu_backend(name: str) -> None:
  """Which convolutions CPU computations traced from now on use (config.cpu_conv).

  'auto' (the default): oneDNN's where it can be built, else XLA's; 'onednn': oneDNN's, or a
  ValueError saying what is missing; 'xla': XLA's.
  """
  global _cpu_backend
  if name not in CPU_BACKENDS:
    raise ValueError(f'Unknown CPU convolution backend {name!r}: expected one of '
                     f'{", ".join(map(repr, CPU_BACKENDS))}.')
  if name == 'onednn':
    try:
      onednn.load()
    except onednn.OnednnUnavailableError as e:
      raise ValueError(f'config.cpu_conv=\'onednn\' but {e} Or use \'xla\'.') from e
  _cpu_backend = name


def cpu_backend() -> str:
  return _cpu_backend


@functools.cache
def _warn_unavailable(reason: str) -> None:
  logging.warning('Using XLA\'s CPU convolutions, several times slower than oneDNN\'s: %s',
                  reason)


def uses_onednn(x: jax.Array, padding: Padding) -> bool:
  """Whether conv2d, traced now on `x`, runs oneDNN's convolution on CPU."""
  symmetric = padding[0][0] == padding[0][1] == padding[1][0] == padding[1][1]
  # CPU the only platform and one device: the oneDNN call needs no other platform's branch, and
  # XLA's SPMD partitioner would replicate it over the whole batch.
  if (_cpu_backend == 'xla' or x.dtype != jnp.float32 or not symmetric
      or set(jax.extend.backend.backends()) != {'cpu'} or jax.device_count() > 1):
    return False
  reason = onednn.status()
  if reason is not None:
    _warn_unavailable(reason)
  return reason is None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
           groups: int = 1) -> jax.Array:
  """NHWC x HWIO convolution with explicit padding and XLA's feature groups.

  Same values and gradients as lax's, to float rounding. Where `uses_onednn` is false, a grouped
  convolution is XLA's own (slow on CPU: pyconv.grouped_conv2d has a faster form for that case).
  """
  return _forward(x, kernel, stride, padding, groups)


def _forward(x, kernel, stride, padding, groups):
  if not uses_onednn(x, padding):
    return _conv(x, kernel, stride, padding, groups)
  # uses_onednn holds only where the CPU is JAX's only platform, so no other platform's branch is
  # traced (lax.platform_dependent would trace both: 3 s of 272 a200's 20 s trace and lowering).
  return onednn.conv_forward(x, kernel, stride, padding[0][0], groups)


def _conv2d_fwd(x, kernel, stride, padding, groups):
  return _forward(x, kernel, stride, padding, groups), (x, kernel)


def _conv2d_bwd(stride, padding, groups, residuals, dy):
  x, kernel = residuals

  def native(x, dy):
    return jax.vjp(lambda x, k: _conv(x, k, stride, padding, groups), x, kernel)[1](dy)

  if uses_onednn(x, padding):
    pad = padding[0][0]
    return (onednn.conv_backward_data(dy, kernel, x.shape, stride, pad, groups),
            onednn.conv_backward_weights(x, dy, kernel.shape, stride, pad, groups))
  if groups > 1:
    return native(x, dy)

  def matmul(x, dy):
    (dx,) = jax.vjp(lambda x: _conv(x, kernel, stride, padding), x)[1](dy)
    dw = _matmul_weight_grad(x, dy, kernel.shape, stride, padding)
    return dx, dw.astype(kernel.dtype)

  return lax.platform_dependent(x, dy, cpu=matmul, default=native)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def declare_param(module: nn.Module, name: str, init_fn: Callable[..., Any],
                  shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """module.param(name, init_fn, shape, dtype), a given value checked against `shape` alone.

  Given a value (in apply), nn.Module.param checks its shape by tracing init_fn with
  jax.eval_shape, for every parameter at every trace: 0.45 s of PyramidNet-272 a200's 3.4 s
  training-step trace. This declares the same variable (name, collection, random stream, so
  the same initial values) and raises the same error as flax on a shape mismatch.
  """
  shape = tuple(shape)
  value = module.variable('params', name,
                          lambda: init_fn(module.make_rng('params'), shape, dtype)).value
  if jnp.shape(value) != shape:
    raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, jnp.shape(value), shape)
  return value


class Conv(nn.Module):
  """Bias-free 2-D convolution, a drop-in for nn.Conv(use_bias=False) with the CPU-fast gradient."""
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
