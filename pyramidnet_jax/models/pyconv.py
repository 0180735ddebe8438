"""Pyramidal Convolution networks (Duta et al. 2020): PyConvResNet and PyConvHGResNet, Flax Linen.

The networks follow the authors' PyTorch code (iduta/pyconv, models/pyconvresnet.py and
models/pyconvhgresnet.py) layer for layer; submodule names mirror its state_dict keys with '.'
turned into '/' and '_' (`layer1.0.conv2.conv2_1.weight` -> `layer1_0/conv2/conv2_1/kernel`;
the shortcut's conv and BN, `downsample.1` and `.2` after its max-pool or `.0` and `.1` without
one, -> `downsample_conv` and `downsample_bn`), so a converter maps their weights one to one.
Fidelity notes: docs/architecture.md.

A PyConv is a set of parallel grouped convolutions of growing kernel size over the same input,
each padded by k // 2 on both sides, whose outputs are concatenated in kernel order. Blocks are
post-activation (conv -> BN -> ReLU, ReLU after the residual add, as in torchvision's ResNet).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyramidnet_jax import levers
from pyramidnet_jax.models import head
from pyramidnet_jax.models import layers
from pyramidnet_jax.models.batch_norm import BatchNorm
from pyramidnet_jax.models.batch_norm import check_group_size
from pyramidnet_jax.models.layers import conv_init
from pyramidnet_jax.models.layers import symmetric_padding as _pad

STEMS = ('imagenet', 'cifar')
STEM_WIDTH = 64

# Depth -> (blocks per stage, bottleneck).
LAYOUTS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}

# Per stage: the kernel size of each pyramid level and the divisor giving its share of the
# stage's planes (planes // divisor output channels); the shares add up to the planes.
STAGE_KERNELS = ((3, 5, 7, 9), (3, 5, 7), (3, 5), (3,))
STAGE_DIVISORS = ((4, 4, 4, 4), (4, 4, 2), (2, 2), (1,))


def _grouped_conv(features: int, kernel: int, stride: int, groups: int, dtype: Any,
                  param_dtype: Any, kernel_init: Callable[..., Any], name: str) -> nn.Conv:
  # The platform's convolution (levers.current().conv_general_dilated), the kernel cast to dtype
  # there, so that its gradient stays float32 under a lower-precision dtype.
  return nn.Conv(features, (kernel, kernel), stride, _pad(kernel), feature_group_count=groups,
                 use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                 conv_general_dilated=layers.conv_general_dilated,
                 promote_dtype=layers.keep_kernel_dtype, name=name)


class PyConv(nn.Module):
  """Pyramidal convolution: grouped convs of growing kernel size, outputs concatenated.

  Level j (named `conv2_{j+1}`, as in the authors' code whatever the parent is called) is a
  bias-free convolution with kernel `kernel_sizes[j]`, `feature_group_count=groups[j]`,
  `features[j]` outputs, the shared stride and explicit symmetric padding k // 2 (PyTorch
  semantics, never 'SAME'). Parameters: 'kernel', HWIO (k, k, in / groups, out) per level.

  Attributes:
    features: output channels of each level.
    kernel_sizes: odd spatial kernel size of each level.
    groups: feature groups of each level (must divide the input and the level's output channels).
    strides: stride of every level.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    kernel_init: kernel initialiser (default: He fan-out normal, the authors' kaiming_normal_).
  """
  features: Sequence[int]
  kernel_sizes: Sequence[int]
  groups: Sequence[int]
  strides: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Any] = conv_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not len(self.features) == len(self.kernel_sizes) == len(self.groups) >= 1:
      raise ValueError(
          f'PyConv needs as many features as kernel_sizes and groups (at least one level); got '
          f'{len(self.features)}, {len(self.kernel_sizes)} and {len(self.groups)}.')
    for features, kernel, groups in zip(self.features, self.kernel_sizes, self.groups):
      if x.shape[-1] % groups or features % groups:
        raise ValueError(
            f'PyConv level with kernel {kernel} has {groups} groups, which must divide its '
            f'{x.shape[-1]} input and {features} output channels.')
    outs = [
        _grouped_conv(features, kernel, self.strides, groups, self.dtype, self.param_dtype,
                      self.kernel_init, f'conv2_{j + 1}')(x)
        for j, (features, kernel, groups) in enumerate(
            zip(self.features, self.kernel_sizes, self.groups))
    ]
    return jnp.concatenate(outs, axis=-1)


# PyramidNet's conv, and nn.BatchNorm's arithmetic with the platform's gradient.
_conv_and_norm = functools.partial(layers.conv_and_norm, norm=BatchNorm)


def _pyramid(module: nn.Module, planes: int, kernels: Sequence[int], divisors: Sequence[int],
             groups: Sequence[int], stride: int, name: str) -> nn.Module:
  """The authors' get_pyconv: a plain conv for one level, else a PyConv named `name`."""
  if len(kernels) == 1:
    if groups[0] == 1:
      conv, _ = _conv_and_norm(module, False)
      return conv(planes, kernels[0], stride, _pad(kernels[0]), name=name)
    return _grouped_conv(planes, kernels[0], stride, groups[0], module.dtype, module.param_dtype,
                         conv_init, name)
  return PyConv(tuple(planes // d for d in divisors), tuple(kernels), tuple(groups), stride,
                dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _max_pool(x: jax.Array) -> jax.Array:
  # PyTorch MaxPool2d(3, 2, padding=1): padded with -inf, so padding never wins the max.
  return nn.max_pool(x, (3, 3), (2, 2), padding=_pad(3))


def _identity(module: nn.Module, x: jax.Array, out_channels: int, stride: int,
              train: bool) -> jax.Array:
  """The authors' downsample: [max-pool 3x3/2] -> [conv1x1 -> BN] as the shape needs, or x."""
  if stride == 2:
    x = _max_pool(x)
  elif stride != 1:
    raise ValueError(f'stride must be 1 or 2, got {stride}.')
  if x.shape[-1] != out_channels:
    conv, norm = _conv_and_norm(module, train)
    x = conv(out_channels, 1, name='downsample_conv')(x)
    x = norm(name='downsample_bn')(x)
  return x


class PyConvBottleneck(nn.Module):
  """conv1x1 -> BN -> ReLU -> PyConv(stride) -> BN -> ReLU -> conv1x1 -> BN, + shortcut, ReLU."""
  planes: int
  expansion: int
  kernels: Sequence[int]
  divisors: Sequence[int]
  groups: Sequence[int]
  stride: int = 1
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _conv_and_norm(self, train)
    out_channels = self.planes * self.expansion
    y = conv(self.planes, 1, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = _pyramid(self, self.planes, self.kernels, self.divisors, self.groups, self.stride,
                 'conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = conv(out_channels, 1, name='conv3')(y)
    y = norm(name='bn3')(y)
    return nn.relu(y + _identity(self, x, out_channels, self.stride, train).astype(y.dtype))


class PyConvBasicBlock(nn.Module):
  """PyConv(stride) -> BN -> ReLU -> conv1x1 -> BN, + shortcut, ReLU (their PyConvBasicBlock2)."""
  planes: int
  kernels: Sequence[int]
  divisors: Sequence[int]
  groups: Sequence[int]
  stride: int = 1
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _conv_and_norm(self, train)
    y = _pyramid(self, self.planes, self.kernels, self.divisors, self.groups, self.stride,
                 'conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.planes, 1, name='conv2')(y)
    y = norm(name='bn2')(y)
    return nn.relu(y + _identity(self, x, self.planes, self.stride, train).astype(y.dtype))


class _PyConvNet(head.ImageClassifier):
  """Shared body of PyConvResNet and PyConvHGResNet; see their docstrings."""
  depth: int
  num_classes: int
  stem: str = 'imagenet'
  dropout_rate: float = 0.0
  remat: bool = False
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  # Set by the subclasses (class constants, not module fields).
  DEPTHS = ()
  PLANES = ()
  GROUPS = ()
  EXPANSION = 0

  @property
  def layout(self) -> tuple[tuple[int, ...], bool]:
    """(blocks per stage, bottleneck); validates depth and stem."""
    layers.check_choice('stem', self.stem, STEMS)
    name = type(self).__name__
    if isinstance(self.depth, bool) or not isinstance(self.depth, int):
      raise ValueError(f'{name} depth must be an int, got {self.depth!r}.')
    if self.depth not in self.DEPTHS:
      raise ValueError(f'{name} has no depth {self.depth}: valid depths are {list(self.DEPTHS)}.')
    return LAYOUTS[self.depth]

  @property
  def expansion(self) -> int:
    return self.EXPANSION if self.layout[1] else 1

  @property
  def num_features(self) -> int:
    """Width of the pooled feature vector fed to the classifier; validates the configuration."""
    return self.PLANES[-1] * self.expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    """Float32 logits (batch, num_classes), or the `features` dict if return_features."""
    layout, bottleneck = self.layout
    layers.validate_call(self, x)
    check_group_size(self.bn_group_size)
    conv, norm = _conv_and_norm(self, train)
    out = {}
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':
      x = conv(STEM_WIDTH, 7, 2, _pad(7), name='conv1')(x)
    else:
      x = conv(STEM_WIDTH, 3, 1, _pad(3), name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    out['stem'] = x
    block_cls = PyConvBottleneck if bottleneck else PyConvBasicBlock
    extra = {'expansion': self.EXPANSION} if bottleneck else {}
    for stage, blocks in enumerate(layout):
      for i in range(blocks):
        # The ImageNet stem has no max-pool: every stage strides, the first included.
        stride = 2 if i == 0 and (stage > 0 or self.stem == 'imagenet') else 1
        block = block_cls(planes=self.PLANES[stage], kernels=STAGE_KERNELS[stage],
                          divisors=STAGE_DIVISORS[stage], groups=self.GROUPS[stage],
                          stride=stride, bn_group_size=self.bn_group_size, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f'layer{stage + 1}_{i}', **extra)
        if self.remat:
          x = levers.current().remat_call(block, x, train)
        else:
          x = block(x, train)
      out[f'stage{stage + 1}'] = x
    out['pooled'] = pooled = jnp.mean(x, axis=(1, 2))
    if return_features:
      return out
    return self.classify(pooled, train)


class PyConvResNet(_PyConvNet):
  """PyConvResNet (Duta et al. 2020): a ResNet whose 3x3 convs are pyramidal convolutions.

  Stage s has 64, 128, 256, 512 planes and PyConv levels of kernels 3,5,7,9 / 3,5,7 / 3,5 / 3
  with groups 1,4,8,16 / 1,4,8 / 1,4 / 1. Depths 50, 101, 152 use bottleneck blocks (expansion 4,
  2048 features); 18 and 34 the authors' two-conv basic block PyConvBasicBlock2 (PyConv -> BN ->
  ReLU -> conv1x1 -> BN, expansion 1, 512 features).

  Attributes:
    depth: 18, 34, 50, 101 or 152 (blocks per stage 2222, 3463, 3463, 3 4 23 3, 3 8 36 3).
    num_classes: classifier outputs.
    stem: 'imagenet' (the paper's: conv7x7/2 -> BN -> ReLU, no max-pool, and every stage strides
      2 on the PyConv of its first block) or 'cifar' (ours, for small images, not the paper's:
      conv3x3/1 -> BN -> ReLU and stage 1 at stride 1, so 32x32 ends at 4x4).
    dropout_rate: dropout before the classifier (the authors' dropout_prob0; 0 by default).
    remat: recompute each block in the backward pass instead of keeping its activations
      (`levers.current().remat_call`; docs/benchmarks.md#levers).
    bn_group_size: BatchNorm statistics over groups of this many consecutive examples of the
      batch in training, e.g. one device's share; 0: the whole batch (models/batch_norm.py).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters, BN statistics, parameter gradients
      and logits stay float32.
    param_dtype: parameter dtype.
  """
  DEPTHS = (18, 34, 50, 101, 152)
  PLANES = (64, 128, 256, 512)
  GROUPS = ((1, 4, 8, 16), (1, 4, 8), (1, 4), (1,))
  EXPANSION = 4


class PyConvHGResNet(_PyConvNet):
  """PyConvHGResNet (Duta et al. 2020): PyConvResNet with high grouping and doubled planes.

  Stages have 128, 256, 512, 1024 planes, the same kernels as PyConvResNet and groups
  32,32,32,32 / 32,64,64 / 32,64 / 32; bottleneck expansion 2 (2048 features).

  Attributes:
    depth: 50, 101 or 152.
    Others: as PyConvResNet.
  """
  DEPTHS = (50, 101, 152)
  PLANES = (128, 256, 512, 1024)
  GROUPS = ((32, 32, 32, 32), (32, 64, 64), (32, 64), (32,))
  EXPANSION = 2
