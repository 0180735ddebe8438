"""The networks in PyTorch, for the benchmark (same network, both frameworks) and parity tests.

Written from the paper's facts (docs/architecture.md#fidelity), independently of models/,
with the authors' state_dict key layouts, so their checkpoints load into these modules:
* PyramidNet: dyhan0920/PyramidNet-PyTorch (PyramidNet.py), NCHW, pre-activation blocks.
* PyConvResNet / PyConvHGResNet: iduta/pyconv (models/pyconvresnet.py, pyconvhgresnet.py),
  including the two-conv block of PyConvResNet-18/34 (the authors' `PyConvBasicBlock2`).
Imports torch at the top: import this module only where PyTorch is wanted (`.[torch]` extra).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    'PyramidNet', 'PyConvResNet', 'PyConvHGResNet', 'pyramid_widths', 'randomize_batchnorm',
    'count_params',
]

# --------------------------------------------------------------------------------------------------
# PyramidNet
# --------------------------------------------------------------------------------------------------

# ImageNet stem: depth -> (blocks per stage, bottleneck).
_IMAGENET_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}
_STEM_WIDTH = {'cifar': 16, 'imagenet': 64}


def _round_width(acc: float, rounding: str) -> int:
  if rounding == 'half_up':
    return int(math.floor(acc + 0.5))  # Authors' Torch code (and Python 2 round()).
  if rounding == 'half_even':
    return int(round(acc))  # Python 3 round(): the authors' PyTorch code as it runs today.
  raise ValueError(f"rounding must be 'half_up' or 'half_even', got {rounding!r}")


def _stage_layout(depth: int, bottleneck: bool | None, stem: str) -> tuple[tuple[int, ...], bool]:
  """(blocks per stage, bottleneck) for a PyramidNet, or ValueError."""
  if stem == 'cifar':
    bottleneck = bool(bottleneck)
    per_block = 9 if bottleneck else 6
    if depth < 2 + per_block or (depth - 2) % per_block:
      raise ValueError(f'CIFAR PyramidNet depth must be {per_block}n+2 (n >= 1) for '
                       f"{'bottleneck' if bottleneck else 'basic'} blocks, got {depth}")
    n = (depth - 2) // per_block
    return (n, n, n), bottleneck
  if stem == 'imagenet':
    if depth not in _IMAGENET_DEPTHS:
      raise ValueError(f'ImageNet PyramidNet depth must be one of {sorted(_IMAGENET_DEPTHS)}, '
                       f'got {depth}')
    layout, needs = _IMAGENET_DEPTHS[depth]
    if bottleneck is not None and bool(bottleneck) != needs:
      raise ValueError(f'ImageNet PyramidNet-{depth} uses '
                       f"{'bottleneck' if needs else 'basic'} blocks; got bottleneck={bottleneck}")
    return layout, needs
  raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")


def pyramid_widths(depth: int, alpha: float, bottleneck: bool | None = None, stem: str = 'cifar',
                   widening: str = 'additive', rounding: str = 'half_up'
                   ) -> tuple[tuple[int, ...], ...]:
  """Per-stage block widths (the 3x3-conv width; a bottleneck's output is 4x this).

  A float accumulator starts at the stem width and is widened before every block, the first
  included: ``acc += alpha / N`` (additive) or ``acc *= alpha ** (1 / N)`` (multiplicative).
  """
  layout, _ = _stage_layout(depth, bottleneck, stem)
  total = sum(layout)
  if widening == 'additive':
    step = alpha / total
    grow = lambda a: a + step
  elif widening == 'multiplicative':
    factor = alpha ** (1.0 / total)
    grow = lambda a: a * factor
  else:
    raise ValueError(f"widening must be 'additive' or 'multiplicative', got {widening!r}")
  _round_width(0.0, rounding)  # Validate the rule even for zero blocks.
  acc = float(_STEM_WIDTH[stem])
  stages = []
  for count in layout:
    widths = []
    for _ in range(count):
      acc = grow(acc)
      widths.append(_round_width(acc, rounding))
    stages.append(tuple(widths))
  return tuple(stages)


def _zero_pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
  missing = channels - x.shape[1]
  if missing < 0:
    raise ValueError(f'shortcut has {x.shape[1]} channels, more than the block output {channels}')
  if missing == 0:
    return x
  # F.pad pads from the last dimension backwards: (W_l, W_r, H_l, H_r, C_front, C_back).
  return F.pad(x, (0, 0, 0, 0, 0, missing))


class _PyramidShortcut(nn.Module):
  """Parameter-free shortcut: 2x2/2 average pool (ceil_mode) if strided, then zero channels."""

  def __init__(self, stride: int):
    super().__init__()
    self.stride = stride

  def forward(self, x: torch.Tensor, channels: int) -> torch.Tensor:
    if self.stride != 1:
      x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    return _zero_pad_channels(x, channels)


class PyramidBasicBlock(nn.Module):
  """BN -> conv3x3(s) -> BN -> ReLU -> conv3x3 -> BN, + shortcut (no ReLU after the add)."""

  expansion = 1

  def __init__(self, in_channels: int, width: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
    self.bn3 = nn.BatchNorm2d(width)
    self.out_channels = width
    self.shortcut = _PyramidShortcut(stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv1(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(y)))
    y = self.bn3(y)
    return y + self.shortcut(x, self.out_channels)


class PyramidBottleneckBlock(nn.Module):
  """BN -> 1x1 -> BN -> ReLU -> 3x3(s) -> BN -> ReLU -> 1x1(4w) -> BN, + shortcut."""

  expansion = 4

  def __init__(self, in_channels: int, width: int, stride: int):
    super().__init__()
    out = width * self.expansion
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn3 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn4 = nn.BatchNorm2d(out)
    self.out_channels = out
    self.shortcut = _PyramidShortcut(stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv1(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(y)))
    y = self.conv3(F.relu(self.bn3(y)))
    y = self.bn4(y)
    return y + self.shortcut(x, self.out_channels)


def _init_conv_bn(module: nn.Module) -> None:
  """Conv: normal(0, sqrt(2 / (k*k*out))); BN: scale 1, bias 0; Linear keeps torch's default."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
      nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


class PyramidNet(nn.Module):
  """PyramidNet (Han et al. 2017) with the authors' PyTorch state_dict layout, NCHW input.

  ``bottleneck``: CIFAR stem, None means basic blocks; ImageNet stem, the depth decides
  (18/34 basic, 50/101/152/200 bottleneck) and an explicit value must agree with it.
  Attributes: ``widths`` (per-stage block widths), ``num_features`` (input width of ``fc``).
  """

  def __init__(self, depth: int, alpha: float, num_classes: int, bottleneck: bool | None = None,
               stem: str = 'cifar', widening: str = 'additive', rounding: str = 'half_up'):
    super().__init__()
    layout, use_bottleneck = _stage_layout(depth, bottleneck, stem)
    self.stem = stem
    self.bottleneck = use_bottleneck
    self.widths = pyramid_widths(depth, alpha, use_bottleneck, stem, widening, rounding)
    block_cls = PyramidBottleneckBlock if use_bottleneck else PyramidBasicBlock

    channels = _STEM_WIDTH[stem]
    if stem == 'cifar':
      self.conv1 = nn.Conv2d(3, channels, 3, stride=1, padding=1, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)

    for stage, stage_widths in enumerate(self.widths):
      blocks = []
      for i, width in enumerate(stage_widths):
        stride = 2 if (stage > 0 and i == 0) else 1
        block = block_cls(channels, width, stride)
        channels = block.out_channels
        blocks.append(block)
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.num_stages = len(self.widths)
    self.num_features = channels
    self.bn_final = nn.BatchNorm2d(channels)
    self.fc = nn.Linear(channels, num_classes)
    _init_conv_bn(self)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.bn1(self.conv1(x))
    if self.stem == 'imagenet':
      x = F.max_pool2d(F.relu(x), kernel_size=3, stride=2, padding=1)
    for stage in range(self.num_stages):
      x = getattr(self, f'layer{stage + 1}')(x)
    x = F.relu(self.bn_final(x))
    x = x.mean(dim=(2, 3))
    return self.fc(x)


# --------------------------------------------------------------------------------------------------
# PyConvResNet / PyConvHGResNet
# --------------------------------------------------------------------------------------------------

# Per stage: (kernels, output fractions as (numerator, denominator)).
_PYCONV_KERNELS = ((3, 5, 7, 9), (3, 5, 7), (3, 5), (3,))
_PYCONV_SPLITS = (((1, 4), (1, 4), (1, 4), (1, 4)),
                  ((1, 4), (1, 4), (1, 2)),
                  ((1, 2), (1, 2)),
                  ((1, 1),))
_PYCONV_GROUPS = ((1, 4, 8, 16), (1, 4, 8), (1, 4), (1,))
_PYCONV_HG_GROUPS = ((32, 32, 32, 32), (32, 64, 64), (32, 64), (32,))

_PYCONV_DEPTHS = {
    18: ((2, 2, 2, 2), 'basic'),
    34: ((3, 4, 6, 3), 'basic'),
    50: ((3, 4, 6, 3), 'bottleneck'),
    101: ((3, 4, 23, 3), 'bottleneck'),
    152: ((3, 8, 36, 3), 'bottleneck'),
}


class PyConv(nn.Module):
  """Multi-level pyramidal conv: grouped convs of growing kernel, outputs concatenated in order.

  Levels are children ``conv2_1 .. conv2_L`` (the authors' names). A one-level PyConv is a plain
  nn.Conv2d instead (see ``make_pyconv``).
  """

  def __init__(self, in_channels: int, out_channels: int, kernels, groups, splits, stride: int):
    super().__init__()
    self.num_levels = len(kernels)
    for level, (k, g, (num, den)) in enumerate(zip(kernels, groups, splits)):
      conv = nn.Conv2d(in_channels, out_channels * num // den, k, stride=stride, padding=k // 2,
                       groups=g, bias=False)
      setattr(self, f'conv2_{level + 1}', conv)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([getattr(self, f'conv2_{i + 1}')(x) for i in range(self.num_levels)], dim=1)


def make_pyconv(in_channels: int, out_channels: int, kernels, groups, splits,
                stride: int) -> nn.Module:
  if len(kernels) == 1:
    k = kernels[0]
    return nn.Conv2d(in_channels, out_channels, k, stride=stride, padding=k // 2,
                     groups=groups[0], bias=False)
  return PyConv(in_channels, out_channels, kernels, groups, splits, stride)


def _pyconv_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
  """Max-pool 3x3/s pad 1 if strided, then conv1x1 -> BN if the width changes."""
  pool = nn.MaxPool2d(kernel_size=3, stride=stride, padding=1)
  project = [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
  if stride != 1 and in_channels != out_channels:
    return nn.Sequential(pool, *project)  # keys downsample.1 (conv), downsample.2 (bn)
  if in_channels != out_channels:
    return nn.Sequential(*project)  # keys downsample.0 (conv), downsample.1 (bn)
  if stride != 1:
    return pool  # no parameters
  return None


class PyConvBasicBlock(nn.Module):
  """PyConvResNet-18/34 block: PyConv(s) -> BN -> ReLU -> conv1x1 -> BN, + shortcut, ReLU."""

  expansion = 1

  def __init__(self, in_channels: int, planes: int, stride: int, kernels, groups, splits):
    super().__init__()
    self.conv1 = make_pyconv(in_channels, planes, kernels, groups, splits, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes * self.expansion)
    self.downsample = _pyconv_shortcut(in_channels, planes * self.expansion, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(y + identity)


class PyConvBottleneck(nn.Module):
  """conv1x1 -> BN -> ReLU -> PyConv(s) -> BN -> ReLU -> conv1x1(e*planes) -> BN, + sc, ReLU."""

  def __init__(self, in_channels: int, planes: int, stride: int, kernels, groups, splits,
               expansion: int):
    super().__init__()
    out = planes * expansion
    self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = make_pyconv(planes, planes, kernels, groups, splits, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = _pyconv_shortcut(in_channels, out, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(y + identity)


class _PyConvNet(nn.Module):
  """Stem conv7x7/2 -> BN -> ReLU (no max-pool), 4 stages each striding 2 on its first PyConv."""

  def __init__(self, layout, block_kind: str, planes, groups, expansion: int, num_classes: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    channels = 64
    for stage, (count, width) in enumerate(zip(layout, planes)):
      kernels, grp, splits = _PYCONV_KERNELS[stage], groups[stage], _PYCONV_SPLITS[stage]
      blocks = []
      for i in range(count):
        stride = 2 if i == 0 else 1
        if block_kind == 'basic':
          block = PyConvBasicBlock(channels, width, stride, kernels, grp, splits)
          channels = width * PyConvBasicBlock.expansion
        else:
          block = PyConvBottleneck(channels, width, stride, kernels, grp, splits, expansion)
          channels = width * expansion
        blocks.append(block)
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.num_features = channels
    self.fc = nn.Linear(channels, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(x)))
    for stage in range(4):
      x = getattr(self, f'layer{stage + 1}')(x)
    return self.fc(x.mean(dim=(2, 3)))


class PyConvResNet(_PyConvNet):
  """PyConvResNet-18/34 (two-conv block, expansion 1) and -50/101/152 (bottleneck, expansion 4)."""

  def __init__(self, depth: int, num_classes: int = 1000):
    if depth not in _PYCONV_DEPTHS:
      raise ValueError(f'PyConvResNet depth must be one of {sorted(_PYCONV_DEPTHS)}, got {depth}')
    layout, kind = _PYCONV_DEPTHS[depth]
    super().__init__(layout, kind, (64, 128, 256, 512), _PYCONV_GROUPS, 4, num_classes)


class PyConvHGResNet(_PyConvNet):
  """PyConvHGResNet-50/101/152: planes 128..1024, grouped levels (32/64), expansion 2."""

  def __init__(self, depth: int, num_classes: int = 1000):
    if depth not in _PYCONV_DEPTHS or _PYCONV_DEPTHS[depth][1] != 'bottleneck':
      raise ValueError(f'PyConvHGResNet depth must be one of 50, 101, 152, got {depth}')
    layout, _ = _PYCONV_DEPTHS[depth]
    super().__init__(layout, 'bottleneck', (128, 256, 512, 1024), _PYCONV_HG_GROUPS, 2,
                     num_classes)


# --------------------------------------------------------------------------------------------------
# Utilities
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
  """Give every BatchNorm non-trivial values so parity tests exercise the BN statistics.

  weight ~ U(0.5, 1.5), bias ~ U(-0.5, 0.5), running_mean ~ U(-0.5, 0.5), running_var ~ U(0.5, 2).
  Deterministic for a given seed and model (modules visited in ``named_modules`` order).
  Returns the model.
  """
  gen = torch.Generator().manual_seed(seed)

  def uniform(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
    values = torch.rand(like.shape, generator=gen, dtype=torch.float64) * (high - low) + low
    return values.to(dtype=like.dtype, device=like.device)

  for _, m in model.named_modules():
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
      if m.affine:
        m.weight.copy_(uniform(m.weight, 0.5, 1.5))
        m.bias.copy_(uniform(m.bias, -0.5, 0.5))
      if m.track_running_stats:
        m.running_mean.copy_(uniform(m.running_mean, -0.5, 0.5))
        m.running_var.copy_(uniform(m.running_var, 0.5, 2.0))
  return model


def count_params(model: nn.Module) -> int:
  """Number of trainable parameters (conv + BN scale/bias + fc); works on the meta device."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)
