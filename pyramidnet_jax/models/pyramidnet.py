"""PyramidNet (Han, Kim & Kim, CVPR 2017) as Flax Linen modules.

The network follows the authors' PyTorch code (dyhan0920/PyramidNet-PyTorch) layer for layer,
so converted weights give the same logits; submodule names mirror its state_dict keys
(`conv1`, `bn1`, `layer1_0/bn1`, ..., `bn_final`, `fc`). Fidelity notes: docs/architecture.md.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyramidnet_jax.models import batch_norm
from pyramidnet_jax.models import head
from pyramidnet_jax.models import layers
from pyramidnet_jax.models import pyramidnet_blocks as blocks
from pyramidnet_jax.models.layers import check_choice
from pyramidnet_jax.models.layers import symmetric_padding as _pad

STEMS = ('cifar', 'imagenet')
WIDENINGS = ('additive', 'multiplicative')
ROUNDINGS = ('half_up', 'half_even')

# ImageNet depth -> (blocks per stage, bottleneck).
IMAGENET_LAYOUTS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}
STEM_WIDTH = {'cifar': 16, 'imagenet': 64}
BOTTLENECK_EXPANSION = blocks.BOTTLENECK_EXPANSION

def blocks_per_stage(depth: int, bottleneck: bool, stem: str = 'cifar') -> tuple[int, ...]:
  """Number of residual blocks in each stage, or a ValueError saying which depths are valid."""
  check_choice('stem', stem, STEMS)
  if isinstance(depth, bool) or not isinstance(depth, int):
    raise ValueError(f'depth must be an int, got {depth!r}.')
  if stem == 'imagenet':
    if depth not in IMAGENET_LAYOUTS:
      raise ValueError(
          f'ImageNet-stem PyramidNet has no depth {depth}: valid depths are '
          f'{sorted(IMAGENET_LAYOUTS)} (18 and 34 with bottleneck=False, the rest with '
          'bottleneck=True).')
    layout, needs_bottleneck = IMAGENET_LAYOUTS[depth]
    if bottleneck != needs_bottleneck:
      kind = 'bottleneck' if needs_bottleneck else 'basic'
      raise ValueError(
          f'ImageNet-stem depth {depth} uses {kind} blocks: pass bottleneck={needs_bottleneck}.')
    return layout
  layers_per_block = 9 if bottleneck else 6
  if depth < 2 + layers_per_block or (depth - 2) % layers_per_block:
    kind = 'bottleneck' if bottleneck else 'basic'
    first = 2 + layers_per_block
    raise ValueError(
        f'CIFAR-stem PyramidNet with {kind} blocks needs depth = {layers_per_block}n + 2 '
        f'(n >= 1: {first}, {first + layers_per_block}, {first + 2 * layers_per_block}, ...), '
        f'got {depth}.')
  return (((depth - 2) // layers_per_block),) * 3


def _round(value: float, rounding: str) -> int:
  if rounding == 'half_up':
    return int(math.floor(value + 0.5))  # The authors' Torch code.
  return int(round(value))  # Python 3's round(): half to even.


def block_widths(depth: int, alpha: float, bottleneck: bool = False, widening: str = 'additive',
                 stem: str = 'cifar', rounding: str = 'half_up') -> tuple[tuple[int, ...], ...]:
  """Per-stage tuples of block widths (the 3x3 conv width; bottleneck outputs are 4x this).

  The float accumulator is widened before every block, the first included, in exactly the
  authors' order of float operations, because exact ties (k + 0.5) do occur.
  """
  check_choice('widening', widening, WIDENINGS)
  check_choice('rounding', rounding, ROUNDINGS)
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
    raise ValueError(f'alpha must be a finite number, got {alpha!r}.')
  if alpha <= 0:
    raise ValueError(f'alpha must be > 0, got {alpha}.')
  if widening == 'multiplicative' and alpha <= 1:
    raise ValueError(
        f'multiplicative widening needs alpha > 1 (the ratio of final to initial width, e.g. '
        f'4.75, 8, 27), got {alpha}.')
  layout = blocks_per_stage(depth, bottleneck, stem)
  num_blocks = sum(layout)
  acc = float(STEM_WIDTH[stem])
  step = alpha / num_blocks
  ratio = alpha ** (1.0 / num_blocks)
  widths = []
  for stage_blocks in layout:
    stage = []
    for _ in range(stage_blocks):
      acc = acc + step if widening == 'additive' else acc * ratio
      stage.append(_round(acc, rounding))
    widths.append(tuple(stage))
  return tuple(widths)


class PyramidNet(head.ImageClassifier):
  """Deep Pyramidal Residual Network.

  Attributes:
    depth: number of weighted layers: 6n + 2 (basic) or 9n + 2 (bottleneck) with the CIFAR
      stem; 18, 34 (basic), 50, 101, 152, 200 (bottleneck) with the ImageNet stem.
    alpha: widening factor: total width added (additive) or final/initial width ratio
      (multiplicative).
    num_classes: classifier outputs.
    bottleneck: bottleneck blocks (output 4x the block width) instead of basic blocks.
    widening: 'additive' (the paper) or 'multiplicative' (the authors' Torch code).
    stem: 'cifar' (3x3 conv, 3 stages) or 'imagenet' (7x7/2 conv + max pool, 4 stages).
    rounding: 'half_up' (floor(w + 0.5), as the authors ran it) or 'half_even' (Python 3 round()).
    dropout_rate: dropout before the classifier (the paper's ImageNet a450 row uses 0.5).
    remat: recompute each block in the backward pass instead of keeping its activations
      (`levers.current().remat`: jax.checkpoint, or the CPU kit's form); much less memory for a
      little speed (docs/benchmarks.md#levers).
    channel_multiple: compute each block at its widths rounded up to this multiple (1: exact
      widths); parameters keep their exact shapes and the padding is inert
      (pyramidnet_blocks.py). Blocks that then share shapes compile faster. from_config resolves
      the config's 'auto' per platform (models/platforms.py).
    bn_group_size: BatchNorm statistics over groups of this many consecutive examples of the
      batch in training, e.g. one device's share; 0: the whole batch (models/batch_norm.py).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters, BN statistics, parameter gradients
      and logits stay float32.
    param_dtype: parameter dtype.
  """
  depth: int
  alpha: float
  num_classes: int
  bottleneck: bool = False
  widening: str = 'additive'
  stem: str = 'cifar'
  rounding: str = 'half_up'
  dropout_rate: float = 0.0
  remat: bool = False
  channel_multiple: int = 1
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def widths(self) -> tuple[tuple[int, ...], ...]:
    """Per-stage block widths; validates the configuration."""
    return block_widths(self.depth, self.alpha, self.bottleneck, self.widening, self.stem,
                        self.rounding)

  @property
  def num_features(self) -> int:
    """Width of the pooled feature vector fed to the classifier."""
    last = self.widths[-1][-1]
    return last * BOTTLENECK_EXPANSION if self.bottleneck else last

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    """Float32 logits (batch, num_classes), or the `features` dict if return_features."""
    layers.validate_call(self, x)
    batch_norm.check_group_size(self.bn_group_size)
    widths = self.widths
    # nn.BatchNorm, as ever, unless groups need ours (whose training gradient is the levers').
    conv, norm = layers.conv_and_norm(
        self, train, batch_norm.BatchNorm if self.bn_group_size else nn.BatchNorm)
    out = {}
    x = x.astype(self.dtype)
    if self.stem == 'cifar':
      x = conv(STEM_WIDTH['cifar'], 3, padding=_pad(3), name='conv1')(x)
      x = norm(name='bn1')(x)
    else:
      x = conv(STEM_WIDTH['imagenet'], 7, 2, _pad(7), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(3))
    out['stem'] = x
    specs = blocks.block_specs(widths, x.shape[-1], self.bottleneck, self.channel_multiple)
    updating = train and not self.is_initializing()
    for spec in specs:
      variables = blocks.BlockVariables(spec, layers.conv_init, self.param_dtype,
                                        name=spec.name).create()
      x, batch = blocks.run_block(spec, variables, x, train=train, remat=self.remat,
                                  epsilon=layers.BN_EPSILON, dtype=self.dtype,
                                  group_size=self.bn_group_size)
      if updating:
        batch_norm.update_running_stats(variables[1], batch, layers.BN_MOMENTUM)
      if spec.last_in_stage:
        out[f'stage{spec.stage}'] = x[..., :spec.out_channels]
    x = x[..., :specs[-1].out_channels]
    x = nn.relu(norm(name='bn_final')(x))
    out['pooled'] = pooled = jnp.mean(x, axis=(1, 2))
    if return_features:
      return out
    return self.classify(pooled, train)
