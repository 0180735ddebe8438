"""The CPU kit's convolutions: oneDNN's through XLA FFI where it can run, XLA's otherwise.

XLA's CPU convolutions are slow at PyramidNet's odd widths, the weight gradient above all
(docs/benchmarks.md#levers). So for float32 on a single CPU device `conv2d` calls oneDNN
(onednn.py), forward and backward. Where oneDNN cannot be built (onednn.status() says why), XLA's
convolution runs with the weight gradient as a sum over taps of (shifted input)^T @ (output
gradient), dense matmuls that XLA:CPU runs faster than its own rule. On several devices XLA's
are used too: the SPMD partitioner would replicate an FFI call over the whole batch. PyConv's
grouped levels (`conv_general_dilated`) run oneDNN's grouped convolution, or else a dense
convolution with a block-diagonal kernel: XLA:CPU's grouped convolution, its kernel gradient
above all, is far slower. Every form computes the same convolution, to float rounding.
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.extend
import jax.numpy as jnp
from jax import lax

from pyramidnet_jax import levers
from pyramidnet_jax.xla_cpu import onednn

BACKENDS = ('auto', 'onednn', 'xla')
_backend = 'auto'

Padding = levers.Padding
_conv = levers.lax_conv2d


def set_backend(name: str) -> None:
  """Which convolutions the kit traces from now on (config.cpu_conv).

  'auto' (the default): oneDNN's where it can be built, else XLA's; 'onednn': oneDNN's, or a
  ValueError saying what is missing; 'xla': XLA's.
  """
  global _backend
  if name not in BACKENDS:
    raise ValueError(f'Unknown CPU convolution backend {name!r}: expected one of '
                     f'{", ".join(map(repr, BACKENDS))}.')
  if name == 'onednn':
    try:
      onednn.load()
    except onednn.OnednnUnavailableError as e:
      raise ValueError(f'config.cpu_conv=\'onednn\' but {e} Or use \'xla\'.') from e
  _backend = name


def backend() -> str:
  return _backend


@functools.cache
def _warn_unavailable(reason: str) -> None:
  logging.warning('Using XLA\'s CPU convolutions, several times slower than oneDNN\'s: %s',
                  reason)


def uses_onednn(x: jax.Array, padding: Padding) -> bool:
  """Whether a convolution traced now on `x` runs oneDNN's."""
  symmetric = padding[0][0] == padding[0][1] == padding[1][0] == padding[1][1]
  # The CPU the only platform and one device: the oneDNN call needs no other platform's branch,
  # and XLA's SPMD partitioner would replicate it over the whole batch.
  if (_backend == 'xla' or x.dtype != jnp.float32 or not symmetric
      or set(jax.extend.backend.backends()) != {'cpu'} or jax.device_count() > 1):
    return False
  reason = onednn.status()
  if reason is not None:
    _warn_unavailable(reason)
  return reason is None


def _matmul_weight_grad(x, dy, kernel_shape, stride, padding):
  kh, kw, cin, cout = kernel_shape
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  n, ho, wo, _ = dy.shape
  dy = dy.reshape(-1, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(x, (0, i, j, 0),
                      (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, cin),
                      (1, stride, stride, 1))
      taps.append(jnp.matmul(tap.reshape(-1, cin).T, dy))
  return jnp.stack(taps).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
           groups: int = 1) -> jax.Array:
  """levers.Levers.conv2d for the CPU: lax's values and gradients, to float rounding.

  Where `uses_onednn` is false, a grouped convolution is XLA's own (slow on CPU:
  `conv_general_dilated` has the faster form for that case).
  """
  return _forward(x, kernel, stride, padding, groups)


def _forward(x, kernel, stride, padding, groups):
  if not uses_onednn(x, padding):
    return _conv(x, kernel, stride, padding, groups)
  return onednn.conv_forward(x, kernel, stride, padding[0][0], groups)


def _conv2d_fwd(x, kernel, stride, padding, groups):
  return _forward(x, kernel, stride, padding, groups), (x, kernel)


def _conv2d_bwd(stride, padding, groups, residuals, dy):
  x, kernel = residuals
  if uses_onednn(x, padding):
    pad = padding[0][0]
    return (onednn.conv_backward_data(dy, kernel, x.shape, stride, pad, groups),
            onednn.conv_backward_weights(x, dy, kernel.shape, stride, pad, groups))
  if groups > 1:
    return jax.vjp(lambda x, k: _conv(x, k, stride, padding, groups), x, kernel)[1](dy)
  (dx,) = jax.vjp(lambda x: _conv(x, kernel, stride, padding), x)[1](dy)
  dw = _matmul_weight_grad(x, dy, kernel.shape, stride, padding)
  return dx, dw.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _block_diagonal(kernel: jax.Array, groups: int) -> jax.Array:
  """The dense HWIO kernel equal to a grouped one: zero between different groups."""
  kh, kw, cin_per_group, cout = kernel.shape
  kernel = kernel.reshape(kh, kw, cin_per_group, groups, cout // groups)
  dense = jnp.einsum('hwcgo,Gg->hwGcgo', kernel, jnp.eye(groups, dtype=kernel.dtype))
  return dense.reshape(kh, kw, groups * cin_per_group, cout)


def _lax_conv(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=levers.DIMENSION_NUMBERS,
                                  feature_group_count=groups)


def grouped_conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                   padding: Padding, groups: int) -> jax.Array:
  """NHWC x HWIO grouped convolution, explicit padding: lax's values (to rounding) and gradients.

  oneDNN's grouped convolution where `uses_onednn`, else a dense convolution with the
  block-diagonal kernel, differentiated as such: faster on XLA:CPU even at 64 groups, despite
  the groups-times more multiply-adds.
  """
  if strides[0] == strides[1] and uses_onednn(x, padding):
    return conv2d(x, kernel, strides[0], padding, groups)
  if groups == 1:
    return _lax_conv(x, kernel, strides, padding, 1)
  return _lax_conv(x, _block_diagonal(kernel, groups), strides, padding, 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
  """lax.conv_general_dilated for nn.Conv, through grouped_conv2d in the case PyConv uses."""
  plain = (lhs.ndim == 4 and not isinstance(padding, str)
           and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
           and precision is None
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                               levers.DIMENSION_NUMBERS))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)
  return grouped_conv2d(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding),
                        feature_group_count)
