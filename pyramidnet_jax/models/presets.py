"""Named networks and the one factory from a config.

`PRESETS` names every PyramidNet of the paper's tables; `create_model` builds one by name.
`from_config` builds the network a training config's `config.model` describes (PyramidNet,
PyConvResNet or PyConvHGResNet); training, evaluation, loading, conversion and the benchmark all
build their networks through it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from pyramidnet_jax.models import platforms
from pyramidnet_jax.models.pyconv import PyConvHGResNet
from pyramidnet_jax.models.pyconv import PyConvResNet
from pyramidnet_jax.models.pyramidnet import PyramidNet

MODEL_NAMES = ('pyramidnet', 'pyconvresnet', 'pyconvhgresnet')
DTYPES = platforms.DTYPES

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


def from_config(model_config: Any, num_classes: int, platform: str | None = None) -> nn.Module:
  """The network `model_config` (a training config's `config.model`, or a dict of its fields)
  names: PyramidNet, PyConvResNet or PyConvHGResNet.

  dtype and channel_multiple 'auto' are resolved for `platform` ('cpu', 'cuda' or 'gpu', 'rocm',
  'tpu', ...; None: JAX's default backend now) by models/platforms.py. The PyConv networks read
  depth, stem, dropout_rate, remat, bn_group_size and dtype; alpha, bottleneck, widening,
  rounding and channel_multiple are PyramidNet's only and ignored for them.
  """
  get = model_config.__getitem__
  name = get('name')
  if name not in MODEL_NAMES:
    raise ValueError(f'Unknown config.model.name {name!r}: expected one of '
                     f'{", ".join(map(repr, MODEL_NAMES))}.')
  dtype = platforms.dtype(get('dtype'), platform)
  # Configs recorded before the field existed (older workdirs, converted models) trained on the
  # whole batch.
  bn_group_size = model_config.get('bn_group_size', 0)
  if name != 'pyramidnet':
    cls = PyConvResNet if name == 'pyconvresnet' else PyConvHGResNet
    return cls(depth=get('depth'), num_classes=num_classes, stem=get('stem'),
               dropout_rate=get('dropout_rate'), remat=get('remat'),
               bn_group_size=bn_group_size, dtype=dtype)
  return PyramidNet(
      depth=get('depth'), alpha=get('alpha'), num_classes=num_classes,
      bottleneck=get('bottleneck'), widening=get('widening'), stem=get('stem'),
      rounding=get('rounding'), dropout_rate=get('dropout_rate'), remat=get('remat'),
      channel_multiple=platforms.channel_multiple(get('channel_multiple'), platform),
      bn_group_size=bn_group_size, dtype=dtype)
