"""PyramidNet's residual blocks as pure functions, computed at padded channel widths.

Every PyramidNet block has its own width, so a plain Flax network is a hundred blocks of different
shapes for XLA to compile. Here the parameters keep their exact shapes and names
(`layer1_0/bn1/scale`, ...), but a block may compute at its widths rounded up to
`channel_multiple`, so that runs of blocks share their shapes (docs/benchmarks.md#levers). A
lax.scan over such runs would compile faster still, but XLA's CPU backend runs convolutions inside
a loop far slower, so blocks stay unrolled.

The padding is inert. Padded kernel rows and columns and padded BatchNorm scales and biases are
zero, so padded channels hold exact zeros forward (BN of an all-zero channel is 0 * scale 0 + bias
0) and carry zero gradient backward; parameters and running statistics are sliced back to their
exact shapes, so gradients, updates and parameter counts are those of the exact network. Only
the summation order inside a convolution may change, at float rounding level.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyramidnet_jax import levers
from pyramidnet_jax.models import batch_norm as bn
from pyramidnet_jax.models import layers

BOTTLENECK_EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One residual block: its exact channel counts, and the padded ones it computes at."""
  stage: int  # 1-based, as in the authors' key prefix 'layer{stage}_{index}'.
  index: int
  last_in_stage: bool
  stride: int
  in_channels: int
  width: int
  bottleneck: bool
  padded_in: int
  padded_width: int

  @property
  def name(self) -> str:
    return f'layer{self.stage}_{self.index}'

  @property
  def out_channels(self) -> int:
    return self.width * BOTTLENECK_EXPANSION if self.bottleneck else self.width

  @property
  def padded_out(self) -> int:
    return self.padded_width * BOTTLENECK_EXPANSION if self.bottleneck else self.padded_width

  def variable_shapes(self, padded: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """{layer: shape}: HWIO for each conv, (channels,) for each BN of the block."""
    cin, w, out = ((self.padded_in, self.padded_width, self.padded_out) if padded
                   else (self.in_channels, self.width, self.out_channels))
    if self.bottleneck:
      return {'bn1': (cin,), 'conv1': (1, 1, cin, w), 'bn2': (w,), 'conv2': (3, 3, w, w),
              'bn3': (w,), 'conv3': (1, 1, w, out), 'bn4': (out,)}
    return {'bn1': (cin,), 'conv1': (3, 3, cin, w), 'bn2': (w,), 'conv2': (3, 3, w, w),
            'bn3': (w,)}


def round_up(value: int, multiple: int) -> int:
  return int(math.ceil(value / multiple)) * multiple


def block_specs(widths: tuple[tuple[int, ...], ...], stem_width: int, bottleneck: bool,
                channel_multiple: int) -> list[BlockSpec]:
  """The blocks of a network, stage by stage; stride 2 opens every stage but the first.

  With padding on, a stride-1 block takes its input padded to its own output width (the
  shortcut appends zero channels there anyway), so that it has the very shapes of the blocks
  before it of equal padded width. With channel_multiple 1 nothing is padded.
  """
  if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) \
      or channel_multiple < 1:
    raise ValueError(f'channel_multiple must be an int >= 1 (1: no padding), got '
                     f'{channel_multiple!r}.')
  specs = []
  channels, padded = stem_width, stem_width
  for stage, stage_widths in enumerate(widths):
    for i, width in enumerate(stage_widths):
      stride = 2 if stage > 0 and i == 0 else 1
      padded_width = round_up(width, channel_multiple)
      spec = BlockSpec(stage + 1, i, i == len(stage_widths) - 1, stride, channels, width,
                       bottleneck, padded_in=padded, padded_width=padded_width)
      if stride == 1 and channel_multiple > 1:
        spec = dataclasses.replace(spec, padded_in=spec.padded_out)
      specs.append(spec)
      channels, padded = spec.out_channels, spec.padded_out
  return specs


# ------------------------------------------------------------------------------------------------
# Variables: exact shapes, the authors' names, nn.Conv / nn.BatchNorm's collections and inits.
# ------------------------------------------------------------------------------------------------


# Their compact method is `create`, not `__call__`, so that capture_intermediates (which records
# `__call__` outputs) does not try to record flax Variables.


class ConvVariables(nn.Module):
  """A bias-free conv's HWIO kernel, as nn.Conv and layers.Conv name it."""
  shape: tuple[int, ...]
  kernel_init: Callable[..., Any]
  param_dtype: Any = jnp.float32

  @nn.compact
  def create(self):
    return {'kernel': layers.declare_param(self, 'kernel', self.kernel_init, self.shape,
                                           self.param_dtype)}


class BlockVariables(nn.Module):
  """A block's variables: ({layer: params}, {bn layer: {'mean': Variable, 'var': Variable}})."""
  spec: BlockSpec
  kernel_init: Callable[..., Any]
  param_dtype: Any = jnp.float32

  @nn.compact
  def create(self):
    params, stats = {}, {}
    for layer, shape in self.spec.variable_shapes(padded=False).items():
      if layer.startswith('bn'):
        params[layer], stats[layer] = bn.BatchNormVariables(shape[0], self.param_dtype,
                                                            name=layer).create()
      else:
        params[layer] = ConvVariables(shape, self.kernel_init, self.param_dtype,
                                       name=layer).create()
    return params, stats


# ------------------------------------------------------------------------------------------------
# Compute
# ------------------------------------------------------------------------------------------------


def shortcut(x: jax.Array, out_channels: int, stride: int) -> jax.Array:
  """The parameter-free shortcut: 2x2 average pool when strided, then zero channels appended.

  The pool is PyTorch's AvgPool2d(2, 2, ceil_mode=True): on an odd size the last window is
  partial and averages only the pixels it covers, matching the ceil(n / 2) of the strided conv.
  """
  if stride == 2:
    pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
    x = nn.avg_pool(x, (2, 2), (2, 2), padding=pad, count_include_pad=False)
  elif stride != 1:
    raise ValueError(f'stride must be 1 or 2, got {stride}.')
  extra = out_channels - x.shape[-1]
  if extra < 0:
    raise ValueError(f'shortcut cannot shrink {x.shape[-1]} channels to {out_channels}.')
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
  return x


def _pad_to(a: jax.Array, shape: tuple[int, ...], value: float = 0.0) -> jax.Array:
  if a.shape == shape:
    return a
  return jnp.pad(a, [(0, target - size) for size, target in zip(a.shape, shape)],
                 constant_values=value)


def padded_block_variables(spec: BlockSpec, params, stats) -> tuple[dict, dict]:
  """Zero-padded params and running stats (as arrays) at the widths the block computes at."""
  shapes = spec.variable_shapes(padded=True)
  padded_params = {layer: {name: _pad_to(value, shapes[layer]) for name, value in p.items()}
                   for layer, p in params.items()}
  # Padded running variances are 1, not 0: their channels are scaled by 0 either way, and 1
  # keeps rsqrt(var + eps) small.
  padded_stats = {layer: {'mean': _pad_to(v['mean'].value, shapes[layer]),
                          'var': _pad_to(v['var'].value, shapes[layer], 1.0)}
                  for layer, v in stats.items()}
  return padded_params, padded_stats


def block(params, stats, x, *, spec: BlockSpec, train: bool, epsilon: float, dtype,
          group_size: int = 0):
  """One block on padded arrays: (output, {bn layer: (batch mean, batch var)} or None)."""
  batch = {}

  def norm(y, layer):
    y, batch[layer] = bn.batch_norm(y, params[layer], stats[layer], train, epsilon, dtype,
                                    group_size)
    return y

  def convolve(y, layer, stride=1):
    kernel = params[layer]['kernel']  # Cast to dtype by the convolution (layers.conv2d).
    return layers.conv2d(y.astype(dtype), kernel, stride,
                         layers.symmetric_padding(kernel.shape[0]))

  y = norm(x, 'bn1')
  if spec.bottleneck:
    y = jax.nn.relu(norm(convolve(y, 'conv1'), 'bn2'))
    y = jax.nn.relu(norm(convolve(y, 'conv2', spec.stride), 'bn3'))
    y = norm(convolve(y, 'conv3'), 'bn4')
  else:
    y = jax.nn.relu(norm(convolve(y, 'conv1', spec.stride), 'bn2'))
    y = norm(convolve(y, 'conv2'), 'bn3')
  y = y + shortcut(x, spec.padded_out, spec.stride).astype(y.dtype)
  return y, (batch if train else None)


def run_block(spec: BlockSpec, variables: tuple[dict, dict], x: jax.Array, *, train: bool,
              remat: bool, epsilon: float, dtype, group_size: int = 0):
  """A block on its exact variables and a padded input: (padded output, batch stats or None)."""
  body = functools.partial(block, spec=spec, train=train, epsilon=epsilon, dtype=dtype,
                           group_size=group_size)
  if remat:
    body = levers.current().remat(body)
  params, stats = padded_block_variables(spec, *variables)
  return body(params, stats, _pad_to(x, (*x.shape[:-1], spec.padded_in)))
