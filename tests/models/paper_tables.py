"""The PyramidNet facts the tests check the code against, written out from the paper's tables.

Shared by pyramidnet_test.py and pyramidnet_widths_test.py (imported as
`from tests.models import paper_tables`). Independent of the package's PRESETS: every row is
restated here as an explicit configuration.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pyramidnet_jax import PyramidNet

PARAM_COUNTS = {
    # preset name: (model kwargs, exact parameter count)
    'cifar_110_a48': (dict(depth=110, alpha=48, num_classes=10), 1_772_706),
    'cifar_110_a270': (dict(depth=110, alpha=270, num_classes=10), 28_485_477),
    'cifar_164_a270': (dict(depth=164, alpha=270, bottleneck=True, num_classes=10), 27_216_021),
    'cifar_200_a240': (dict(depth=200, alpha=240, bottleneck=True, num_classes=10), 26_752_702),
    'cifar_236_a220': (dict(depth=236, alpha=220, bottleneck=True, num_classes=10), 26_969_046),
    'cifar_272_a200': (dict(depth=272, alpha=200, bottleneck=True, num_classes=10), 26_210_842),
    'imagenet_101_a360': (dict(depth=101, alpha=360, bottleneck=True, stem='imagenet',
                               num_classes=1000), 42_455_070),
    'imagenet_200_a300': (dict(depth=200, alpha=300, bottleneck=True, stem='imagenet',
                               num_classes=1000), 62_368_168),
    'imagenet_200_a450': (dict(depth=200, alpha=450, bottleneck=True, stem='imagenet',
                               num_classes=1000), 116_775_213),
}

# Final feature dimension of every network in the paper's tables, by preset name.
NUM_FEATURES = {
    'cifar_110_a48': 64,
    'cifar_110_a84': 100,
    'cifar_110_a270': 286,
    'cifar_110_a4.75_mul': 76,
    'cifar_110_a8_mul': 128,
    'cifar_110_a27_mul': 432,
    'cifar_164_a48': 256,
    'cifar_164_a84': 400,
    'cifar_164_a270': 1144,
    'cifar_200_a240': 1024,
    'cifar_236_a220': 944,
    'cifar_272_a200': 864,
    'imagenet_101_a360': 1696,
    'imagenet_200_a300': 1456,
    'imagenet_200_a450': 2056,
}

# The same rows as explicit configurations.
TABLE_CONFIGS = {
    'cifar_110_a48': dict(depth=110, alpha=48),
    'cifar_110_a84': dict(depth=110, alpha=84),
    'cifar_110_a270': dict(depth=110, alpha=270),
    'cifar_110_a4.75_mul': dict(depth=110, alpha=4.75, widening='multiplicative'),
    'cifar_110_a8_mul': dict(depth=110, alpha=8, widening='multiplicative'),
    'cifar_110_a27_mul': dict(depth=110, alpha=27, widening='multiplicative'),
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

IMAGENET_LAYOUTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                    152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def rng(seed: int = 0) -> jax.Array:
  """An 'rbg' key: the default threefry key makes XLA:CPU compile a tiny net's init for tens of
  seconds, and the networks do not depend on the PRNG implementation."""
  return jax.random.key(seed, impl='rbg')


def leaf_items(tree):
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def count_params(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_variables(model: PyramidNet, size: int = 8, channels: int = 3):
  """Variable shapes from tracing init only (no compile, no FLOPs)."""
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  return jax.eval_shape(model.init, rng(), x)


def check_structure(model: PyramidNet, params, in_channels: int = 3) -> None:
  """Every kernel shape follows block_widths; names mirror the authors' state_dict."""
  stem_width = 16 if model.stem == 'cifar' else 64
  k = 3 if model.stem == 'cifar' else 7
  assert params['conv1']['kernel'].shape == (k, k, in_channels, stem_width)
  assert 'bias' not in params['conv1']
  assert params['bn1']['scale'].shape == (stem_width,)
  expected_keys = {'conv1', 'bn1', 'bn_final', 'fc'}
  channels = stem_width
  for s, stage in enumerate(model.widths):
    for i, w in enumerate(stage):
      name = f'layer{s + 1}_{i}'
      expected_keys.add(name)
      shapes = {key: tuple(leaf.shape) for key, leaf in leaf_items(params[name])}
      if model.bottleneck:
        out = 4 * w
        expected = {
            "['bn1']['scale']": (channels,), "['bn1']['bias']": (channels,),
            "['conv1']['kernel']": (1, 1, channels, w),
            "['bn2']['scale']": (w,), "['bn2']['bias']": (w,),
            "['conv2']['kernel']": (3, 3, w, w),
            "['bn3']['scale']": (w,), "['bn3']['bias']": (w,),
            "['conv3']['kernel']": (1, 1, w, out),
            "['bn4']['scale']": (out,), "['bn4']['bias']": (out,),
        }
      else:
        out = w
        expected = {
            "['bn1']['scale']": (channels,), "['bn1']['bias']": (channels,),
            "['conv1']['kernel']": (3, 3, channels, w),
            "['bn2']['scale']": (w,), "['bn2']['bias']": (w,),
            "['conv2']['kernel']": (3, 3, w, w),
            "['bn3']['scale']": (w,), "['bn3']['bias']": (w,),
        }
      assert shapes == expected, name
      channels = out
  assert set(params) == expected_keys
  assert params['bn_final']['scale'].shape == (channels,)
  assert channels == model.num_features
  assert params['fc']['kernel'].shape == (channels, model.num_classes)
  assert params['fc']['bias'].shape == (model.num_classes,)
