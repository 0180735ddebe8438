"""PyramidNet (Han, Kim & Kim, CVPR 2017) as Flax Linen modules.

The network follows the authors' PyTorch code (dyhan0920/PyramidNet-PyTorch) layer for layer,
so converted weights give the same logits; submodule names mirror its state_dict keys
(`conv1`, `bn1`, `layer1_0/bn1`, ..., `bn_final`, `fc`). Architecture facts: ../shared/SPEC.md.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pyramidnet_jax import blocks
from pyramidnet_jax.conv import Conv
from pyramidnet_jax.conv import symmetric_padding as _pad

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

# PyTorch defaults that the authors kept: BN momentum 0.1 (Flax 0.9), epsilon 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He fan-out normal, not truncated: the authors' normal_(0, sqrt(2 / (k * k * out))).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
  if value not in valid:
    raise ValueError(f'Unknown {name} {value!r}: expected one of {", ".join(map(repr, valid))}.')


def blocks_per_stage(depth: int, bottleneck: bool, stem: str = 'cifar') -> tuple[int, ...]:
  """Number of residual blocks in each stage, or a ValueError saying which depths are valid."""
  _check_choice('stem', stem, STEMS)
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
  _check_choice('widening', widening, WIDENINGS)
  _check_choice('rounding', rounding, ROUNDINGS)
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


def _conv_and_norm(module: nn.Module, train: bool, norm: type[nn.Module] = nn.BatchNorm):
  """The bias-free He-initialised conv and the BatchNorm (`norm`, with nn.BatchNorm's fields)
  every layer of a PyramidNet uses."""
  conv = functools.partial(Conv, kernel_init=conv_init, dtype=module.dtype,
                           param_dtype=module.param_dtype)
  norm = functools.partial(norm, use_running_average=not train, momentum=BN_MOMENTUM,
                           epsilon=BN_EPSILON, dtype=module.dtype, param_dtype=module.param_dtype)
  return conv, norm


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


def _torch_linear_init(fan_in: int):
  """PyTorch's default nn.Linear init, uniform(+-1/sqrt(fan_in)), for kernel and bias alike."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class PyramidNet(nn.Module):
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
    remat: rematerialise each block in the backward pass (pyramidnet_jax/remat.py): a 10x
      smaller XLA temp buffer for 8% less training speed (110 a48, CPU; docs/benchmarks.md).
    channel_multiple: compute each block at its widths rounded up to this multiple (1: exact
      widths); parameters keep their exact shapes and the padding is inert (blocks.py). Blocks
      that then share shapes compile faster.
    dtype: computation dtype (e.g. jnp.bfloat16); BN statistics and logits stay float32.
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

  def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Backbone: {'stem', 'stage1', ..., 'stageK', 'pooled'}; 'pooled' is (batch, num_features).

    Call it with `model.apply(variables, x, method='features')`.
    """
    return self(x, train, return_features=True)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    """Float32 logits (batch, num_classes), or the `features` dict if return_features."""
    validate_call(self, x)
    widths = self.widths
    conv, norm = _conv_and_norm(self, train)
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
      variables = blocks.BlockVariables(spec, conv_init, self.param_dtype, name=spec.name).create()
      x, batch = blocks.run_block(spec, variables, x, train=train, remat=self.remat,
                                  epsilon=BN_EPSILON, dtype=self.dtype)
      if updating:
        blocks.update_running_stats(variables[1], batch, BN_MOMENTUM)
      if spec.last_in_stage:
        out[f'stage{spec.stage}'] = x[..., :spec.out_channels]
    x = x[..., :specs[-1].out_channels]
    x = nn.relu(norm(name='bn_final')(x))
    out['pooled'] = pooled = jnp.mean(x, axis=(1, 2))
    if return_features:
      return out
    pooled = nn.Dropout(self.dropout_rate, name='dropout')(pooled, deterministic=not train)
    fan_in = self.num_features
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=_torch_linear_init(fan_in), bias_init=_torch_linear_init(fan_in),
                      name='fc')(pooled)
    return logits.astype(jnp.float32)


def init_variables(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
  """Variables with model.init's structure and distributions, drawn on the host in seconds.

  `jax.jit(model.init)` compiles the whole network plus one RNG kernel per parameter: 11 minutes
  for ImageNet 200 a300 on a 2-core CPU. Here the structure comes from jax.eval_shape (tracing
  only) and each leaf is drawn with numpy from a stream keyed on (key, its path), with the same
  law as the module's initialiser: He fan-out normal conv kernels, BN scale 1 / bias 0, running
  mean 0 / var 1, PyTorch's uniform(+-1/sqrt(fan_in)) for the classifier.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape[-3:]), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), key, x)
  seed = np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist()

  def draw(path, leaf):
    names = [str(getattr(p, 'key', p)) for p in path]
    collection, module, name = names[0], names[-2], names[-1]
    shape, dtype = leaf.shape, leaf.dtype
    if collection == 'batch_stats':
      value = np.zeros(shape) if name == 'mean' else np.ones(shape)
    elif module.startswith('bn') or module.endswith('_bn'):  # bn1, bn_final, downsample_bn.
      value = np.ones(shape) if name == 'scale' else np.zeros(shape)
    else:
      rng = np.random.default_rng([*seed, zlib.crc32('/'.join(names).encode())])
      if name == 'kernel' and len(shape) == 4:  # Conv, HWIO.
        value = rng.standard_normal(shape, np.float32) * math.sqrt(
            2.0 / (shape[0] * shape[1] * shape[3]))
      elif module == 'fc':
        bound = 1.0 / math.sqrt(shapes['params']['fc']['kernel'].shape[0])
        value = rng.uniform(-bound, bound, shape)
      else:
        raise ValueError(f'init_variables has no rule for parameter {"/".join(names)}.')
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# The networks of the paper's tables. CIFAR depths >= 164 use bottleneck blocks, as in the paper.
PRESETS: dict[str, dict[str, Any]] = {
    'cifar_110_a48': dict(depth=110, alpha=48, bottleneck=False),
    'cifar_110_a84': dict(depth=110, alpha=84, bottleneck=False),
    'cifar_110_a270': dict(depth=110, alpha=270, bottleneck=False),
    'cifar_110_a4.75_mul': dict(depth=110, alpha=4.75, bottleneck=False, widening='multiplicative'),
    'cifar_110_a8_mul': dict(depth=110, alpha=8, bottleneck=False, widening='multiplicative'),
    'cifar_110_a27_mul': dict(depth=110, alpha=27, bottleneck=False, widening='multiplicative'),
    'cifar_164_a48': dict(depth=164, alpha=48, bottleneck=True),
    'cifar_164_a84': dict(depth=164, alpha=84, bottleneck=True),
    'cifar_164_a270': dict(depth=164, alpha=270, bottleneck=True),
    'cifar_200_a240': dict(depth=200, alpha=240, bottleneck=True),
    'cifar_236_a220': dict(depth=236, alpha=220, bottleneck=True),
    'cifar_272_a200': dict(depth=272, alpha=200, bottleneck=True),
    'imagenet_101_a360': dict(depth=101, alpha=360, bottleneck=True, stem='imagenet'),
    'imagenet_200_a300': dict(depth=200, alpha=300, bottleneck=True, stem='imagenet'),
    'imagenet_200_a450': dict(depth=200, alpha=450, bottleneck=True, stem='imagenet',
                              dropout_rate=0.5),
}


def create_model(name: str, num_classes: int, **overrides) -> PyramidNet:
  """A preset network by name, e.g. create_model('cifar_272_a200', 100, dtype=jnp.bfloat16)."""
  if name not in PRESETS:
    raise ValueError(f'Unknown preset {name!r}: expected one of {", ".join(PRESETS)}.')
  return PyramidNet(**{**PRESETS[name], 'num_classes': num_classes, **overrides})
