"""Tests for pyramidnet_jax.models against the facts in shared/SPEC.md section 1.

Big networks are only traced (jax.eval_shape: parameter shapes, no compile); everything that
runs uses tiny depths on small images. Real initialisation uses an 'rbg' key: the default
threefry key makes XLA:CPU spend tens of seconds compiling even a tiny net's init, and the
model does not depend on the PRNG implementation.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import types
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pyramidnet_jax import PRESETS, PyramidNet, block_widths, blocks_per_stage, create_model
from pyramidnet_jax import blocks, conv, models, onednn
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


jit = helpers.jit


def rng(seed: int = 0) -> jax.Array:
  return jax.random.key(seed, impl='rbg')


def count_params(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_variables(model: PyramidNet, size: int = 8, channels: int = 3):
  """Variable shapes from tracing init only (no compile, no FLOPs)."""
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  return jax.eval_shape(model.init, rng(), x)


def leaf_items(tree):
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


# --------------------------------------------------------------------------------------------
# Reference values written out from SPEC section 1 (the paper's tables).

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

# The same rows as explicit configurations (independent of PRESETS).
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


def half_up(value: float) -> int:
  return math.floor(value + 0.5)


def half_even(value: float) -> int:
  return round(value)  # Python 3: ties to even.


def reference_accumulator(layout, start, alpha, widening='additive'):
  """The widening accumulator before rounding, one float per block, grouped by stage."""
  total = sum(layout)
  acc = float(start)
  stages = []
  for stage_blocks in layout:
    stage = []
    for _ in range(stage_blocks):
      if widening == 'additive':
        acc += alpha / total
      else:
        acc *= alpha ** (1.0 / total)
      stage.append(acc)
    stages.append(stage)
  return stages


def reference_widths(layout, start, alpha, widening='additive', rule=half_up):
  return tuple(tuple(rule(a) for a in stage)
               for stage in reference_accumulator(layout, start, alpha, widening))


# --------------------------------------------------------------------------------------------
# 1. Exact parameter counts, and the parameter tree's layout.


def check_structure(model: PyramidNet, params, in_channels: int = 3) -> None:
  """Every kernel shape follows block_widths; names mirror the authors' state_dict."""
  widths = model.widths
  stem_width = 16 if model.stem == 'cifar' else 64
  k = 3 if model.stem == 'cifar' else 7
  assert params['conv1']['kernel'].shape == (k, k, in_channels, stem_width)
  assert 'bias' not in params['conv1']
  assert params['bn1']['scale'].shape == (stem_width,)
  expected_keys = {'conv1', 'bn1', 'bn_final', 'fc'}
  channels = stem_width
  for s, stage in enumerate(widths):
    for i, w in enumerate(stage):
      name = f'layer{s + 1}_{i}'
      expected_keys.add(name)
      block = params[name]
      shapes = {key: tuple(leaf.shape) for key, leaf in leaf_items(block)}
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


@pytest.mark.parametrize('name', list(PARAM_COUNTS))
def test_parameter_count(name):
  kwargs, expected = PARAM_COUNTS[name]
  model = PyramidNet(**kwargs)
  variables = abstract_variables(model)
  assert set(variables) == {'params', 'batch_stats'}
  assert count_params(variables['params']) == expected
  check_structure(model, variables['params'])
  # Every BatchNorm has running statistics of its own width, and nothing else is stateful.
  stats = {k: v.shape for k, v in leaf_items(variables['batch_stats'])}
  scales = {k.replace("['scale']", ''): v.shape for k, v in leaf_items(variables['params'])
            if k.endswith("['scale']")}
  assert {k.replace("['mean']", ''): v for k, v in stats.items() if k.endswith("['mean']")} \
      == scales
  assert {k.replace("['var']", ''): v for k, v in stats.items() if k.endswith("['var']")} \
      == scales
  assert len(stats) == 2 * len(scales)


# --------------------------------------------------------------------------------------------
# 2. Block widths and final feature dimensions.


@pytest.mark.parametrize('kwargs, stage_ranges, features', [
    (dict(depth=110, alpha=48), [(17, 32), (33, 48), (49, 64)], 64),
    (dict(depth=272, alpha=200, bottleneck=True), [(18, 83), (85, 149), (152, 216)], 864),
    (dict(depth=200, alpha=300, bottleneck=True, stem='imagenet'),
     [(69, 78), (82, 187), (191, 350), (355, 364)], 1456),
])
def test_block_widths_stage_ranges(kwargs, stage_ranges, features):
  widths = block_widths(**kwargs)
  assert [(stage[0], stage[-1]) for stage in widths] == stage_ranges
  assert all(b >= a for stage in widths for a, b in zip(stage, stage[1:]))
  assert PyramidNet(num_classes=10, **kwargs).num_features == features


@pytest.mark.parametrize('name', list(TABLE_CONFIGS))
def test_num_features_and_widths_of_paper_tables(name):
  kwargs = TABLE_CONFIGS[name]
  model = PyramidNet(num_classes=10, **kwargs)
  assert model.num_features == NUM_FEATURES[name]
  stem = kwargs.get('stem', 'cifar')
  bottleneck = kwargs.get('bottleneck', False)
  if stem == 'cifar':
    layout = ((kwargs['depth'] - 2) // (9 if bottleneck else 6),) * 3
  else:
    layout = IMAGENET_LAYOUTS[kwargs['depth']]
  assert blocks_per_stage(kwargs['depth'], bottleneck, stem) == layout
  expected = reference_widths(layout, 16 if stem == 'cifar' else 64, kwargs['alpha'],
                              kwargs.get('widening', 'additive'))
  assert block_widths(kwargs['depth'], kwargs['alpha'], bottleneck,
                      kwargs.get('widening', 'additive'), stem) == expected
  assert model.widths == expected


@pytest.mark.parametrize('name', list(PRESETS))
def test_presets(name):
  assert set(PRESETS) == set(NUM_FEATURES)
  model = create_model(name, 100)
  assert isinstance(model, PyramidNet)
  assert model.num_classes == 100
  for key, value in TABLE_CONFIGS[name].items():
    assert getattr(model, key) == value, key
  assert model.num_features == NUM_FEATURES[name]
  if name in PARAM_COUNTS:
    # Same configuration as test_parameter_count, which already traced it in full.
    kwargs, _ = PARAM_COUNTS[name]
    assert all(getattr(model, k) == v for k, v in kwargs.items() if k != 'num_classes')
  else:
    check_structure(model, abstract_variables(model)['params'])
  # Overrides reach the module.
  assert create_model(name, 10, dtype=jnp.bfloat16, remat=True).remat


def test_blocks_per_stage():
  for depth, layout in IMAGENET_LAYOUTS.items():
    assert blocks_per_stage(depth, depth >= 50, 'imagenet') == layout
  assert blocks_per_stage(110, False) == (18, 18, 18)
  assert blocks_per_stage(110, True) == (12, 12, 12)
  assert blocks_per_stage(272, True) == (30, 30, 30)
  assert blocks_per_stage(8, False) == (1, 1, 1)
  assert blocks_per_stage(11, True) == (1, 1, 1)


# --------------------------------------------------------------------------------------------
# 3. Rounding at exact ties.


@pytest.mark.parametrize('depth, alpha, stem, ties', [
    (110, 270, 'cifar', None),
    (50, 300, 'imagenet', [101.5, 176.5, 251.5, 326.5]),
])
def test_rounding_rules_on_ties(depth, alpha, stem, ties):
  layout = blocks_per_stage(depth, True, stem)
  start = 16 if stem == 'cifar' else 64
  acc = [a for stage in reference_accumulator(layout, start, alpha) for a in stage]
  found_ties = [a for a in acc if a - math.floor(a) == 0.5]
  if ties is not None:
    assert found_ties == ties
  else:
    assert found_ties[:2] == [23.5, 38.5]
  up = reference_widths(layout, start, alpha, rule=half_up)
  even = reference_widths(layout, start, alpha, rule=half_even)
  assert up != even
  got_up = block_widths(depth, alpha, True, stem=stem, rounding='half_up')
  got_even = block_widths(depth, alpha, True, stem=stem, rounding='half_even')
  assert got_up == up
  assert got_even == even
  assert block_widths(depth, alpha, True, stem=stem) == up  # The default is half up.
  # The rules agree everywhere except at ties that round to an odd number under half up.
  flat_up = [w for s in got_up for w in s]
  flat_even = [w for s in got_even for w in s]
  for a, u, e in zip(acc, flat_up, flat_even):
    if a in found_ties and half_up(a) % 2:
      assert (u, e) == (half_up(a), half_up(a) - 1)
    else:
      assert u == e


def test_rounding_rules_hand_checked():
  up = block_widths(110, 270, True, rounding='half_up')
  even = block_widths(110, 270, True, rounding='half_even')
  # Accumulator 16 + 7.5 = 23.5: both give 24 (24 is even). 16 + 3 * 7.5 = 38.5: 39 vs 38.
  assert up[0][0] == 24 and even[0][0] == 24
  assert up[0][2] == 39 and even[0][2] == 38
  assert up[0][:4] == (24, 31, 39, 46) and even[0][:4] == (24, 31, 38, 46)
  up = block_widths(50, 300, True, stem='imagenet', rounding='half_up')
  even = block_widths(50, 300, True, stem='imagenet', rounding='half_even')
  assert up[0][1] == even[0][1] == 102  # 101.5
  assert (up[1][2], even[1][2]) == (177, 176)  # 176.5
  assert up[2][2] == even[2][2] == 252  # 251.5
  assert (up[3][0], even[3][0]) == (327, 326)  # 326.5


def test_rounding_reaches_the_parameters():
  # CIFAR depth 11 bottleneck, alpha 4.5: accumulator 17.5, 19, 20.5.
  up = PyramidNet(depth=11, alpha=4.5, bottleneck=True, num_classes=10)
  even = PyramidNet(depth=11, alpha=4.5, bottleneck=True, num_classes=10, rounding='half_even')
  assert up.widths == ((18,), (19,), (21,))
  assert even.widths == ((18,), (19,), (20,))
  assert abstract_variables(up)['params']['layer3_0']['conv2']['kernel'].shape == (3, 3, 21, 21)
  assert abstract_variables(even)['params']['layer3_0']['conv2']['kernel'].shape == (3, 3, 20, 20)
  assert up.num_features == 84 and even.num_features == 80


# --------------------------------------------------------------------------------------------
# 4. Validation errors.


@pytest.mark.parametrize('kwargs, match', [
    (dict(depth=111), r'6n \+ 2.*8, 14, 20'),
    (dict(depth=5), r'6n \+ 2'),
    (dict(depth=2), r'6n \+ 2'),
    (dict(depth=32, bottleneck=True), r'9n \+ 2.*11, 20, 29'),  # 30 = 5 * 6, not 9n.
    (dict(depth=111, bottleneck=True), r'9n \+ 2'),
    (dict(depth=77, stem='imagenet', bottleneck=True), r'18, 34, 50, 101, 152, 200'),
    (dict(depth=50, stem='imagenet', bottleneck=False), r'bottleneck=True'),
    (dict(depth=200, stem='imagenet', bottleneck=False), r'bottleneck=True'),
    (dict(depth=18, stem='imagenet', bottleneck=True), r'bottleneck=False'),
    (dict(depth=110, alpha=0), r'alpha must be > 0'),
    (dict(depth=110, alpha=-48), r'alpha must be > 0'),
    (dict(depth=110, alpha=float('nan')), r'alpha must be a finite number'),
    (dict(depth=110, alpha=1.0, widening='multiplicative'), r'alpha > 1'),
    (dict(depth=110, alpha=0.5, widening='multiplicative'), r'alpha > 1'),
    (dict(depth=110, stem='resnet'), r"stem 'resnet'.*'cifar', 'imagenet'"),
    (dict(depth=110, widening='linear'), r"widening 'linear'.*'additive', 'multiplicative'"),
    (dict(depth=110, rounding='nearest'), r"rounding 'nearest'.*'half_up', 'half_even'"),
])
def test_invalid_configuration(kwargs, match):
  kwargs = {'alpha': 48, **kwargs}
  with pytest.raises(ValueError, match=match):
    block_widths(**kwargs)
  model = PyramidNet(num_classes=10, **kwargs)
  with pytest.raises(ValueError, match=match):
    abstract_variables(model)


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_classes=0), r'num_classes must be a positive int'),
    (dict(num_classes=True), r'num_classes must be a positive int'),
    (dict(num_classes=10, dropout_rate=1.0), r'dropout_rate must be in \[0, 1\)'),
])
def test_invalid_module_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    abstract_variables(PyramidNet(depth=8, alpha=12, **kwargs))


@pytest.mark.parametrize('shape', [(1, 3, 32, 32), (32, 32, 3), (1, 32, 32, 4), (1, 32, 32, 2),
                                   (2, 1, 32, 32, 3)])
def test_input_must_be_nhwc_with_1_or_3_channels(shape):
  model = PyramidNet(depth=8, alpha=12, num_classes=10)
  with pytest.raises(ValueError, match=r'NHWC.*1 or 3 channels') as info:
    jax.eval_shape(model.init, rng(), jax.ShapeDtypeStruct(shape, jnp.float32))
  assert str(tuple(shape)) in str(info.value)


def test_create_model_unknown_preset():
  with pytest.raises(ValueError, match=r"Unknown preset 'cifar_110_a49'.*cifar_110_a48"):
    create_model('cifar_110_a49', 10)


# --------------------------------------------------------------------------------------------
# 6. The parameter-free shortcut, by hand.


def numpy_avg_pool_ceil(x: np.ndarray) -> np.ndarray:
  """PyTorch AvgPool2d(2, 2, ceil_mode=True): partial windows average the pixels they cover."""
  n, h, w, c = x.shape
  out = np.zeros((n, -(-h // 2), -(-w // 2), c), x.dtype)
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      out[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize('size', [4, 5])
def test_shortcut_stride_2_by_hand(size):
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  got = np.asarray(blocks.shortcut(jnp.asarray(x), 5, 2))
  half = -(-size // 2)
  assert got.shape == (2, half, half, 5)
  pooled = numpy_avg_pool_ceil(x)
  if size == 5:
    # Worked corners: a full 2x2 window, an edge window of 2 pixels, the lone corner pixel.
    np.testing.assert_allclose(pooled[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 2, 0], (x[:, 4, 0] + x[:, 4, 1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 0, 2], (x[:, 0, 4] + x[:, 1, 4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 2, 2], x[:, 4, 4], rtol=1e-6)
  expected = np.concatenate([pooled, np.zeros((2, half, half, 2), np.float32)], axis=-1)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  assert np.all(got[..., 3:] == 0)


def test_shortcut_stride_1_only_pads():
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
  got = np.asarray(blocks.shortcut(jnp.asarray(x), 5, 1))
  assert got.shape == (2, 5, 5, 5)
  np.testing.assert_array_equal(got[..., :3], x)
  np.testing.assert_array_equal(got[..., 3:], 0)
  np.testing.assert_array_equal(np.asarray(blocks.shortcut(jnp.asarray(x), 3, 1)), x)


def test_shortcut_rejects_bad_arguments():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match='stride must be 1 or 2'):
    blocks.shortcut(x, 5, 3)
  with pytest.raises(ValueError, match='cannot shrink 3 channels to 2'):
    blocks.shortcut(x, 2, 1)


# --------------------------------------------------------------------------------------------
# 5. Forward and backward passes on tiny networks, against a reference written here.
#
# Compiling dominates the cost on CPU, so each test compiles at most a couple of programs and
# the nets use variables made from the traced shapes (no init compile): He fan-out conv kernels
# and non-trivial BN parameters / running statistics, so every BN shows in the outputs. Inputs
# mix an even and an odd side, so one compile checks symmetric padding (even side) and the
# ceil(n / 2) shortcut (odd side); the bottleneck net takes a 1-channel input.

SMALL_NETS = {
    # name: (model kwargs, input shape)
    'cifar_basic': (dict(depth=8, alpha=12), (4, 32, 33, 3)),
    'cifar_bottleneck': (dict(depth=11, alpha=12, bottleneck=True), (4, 31, 32, 1)),
    'imagenet_basic': (dict(depth=18, alpha=16, stem='imagenet'), (4, 64, 65, 3)),
}

# Feature shapes (without the batch) of SMALL_NETS.
FEATURE_SHAPES = {
    'cifar_basic': {'stem': (32, 33, 16), 'stage1': (32, 33, 20), 'stage2': (16, 17, 24),
                    'stage3': (8, 9, 28), 'pooled': (28,)},
    'cifar_bottleneck': {'stem': (31, 32, 16), 'stage1': (31, 32, 80), 'stage2': (16, 16, 96),
                         'stage3': (8, 8, 112), 'pooled': (112,)},
    'imagenet_basic': {'stem': (16, 17, 64), 'stage1': (16, 17, 68), 'stage2': (8, 9, 72),
                       'stage3': (4, 5, 76), 'stage4': (2, 3, 80), 'pooled': (80,)},
}


def synthetic_variables(model: PyramidNet, shape, seed: int = 0):
  abstract = jax.eval_shape(model.init, rng(), jax.ShapeDtypeStruct(shape, jnp.float32))
  r = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path)
    if "['fc']" in name:
      bound = 1 / math.sqrt(model.num_features)
      value = r.uniform(-bound, bound, leaf.shape)
    elif name.endswith("['kernel']"):
      kh, kw, _, out = leaf.shape
      value = r.normal(0.0, math.sqrt(2 / (kh * kw * out)), leaf.shape)
    elif name.endswith("['scale']"):
      value = r.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['var']"):
      value = r.uniform(0.5, 2.0, leaf.shape)
    else:  # BN bias and running mean.
      value = r.normal(0.0, 0.3, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, abstract)


@functools.lru_cache(maxsize=None)
def small_net(name: str, **overrides):
  kwargs, shape = SMALL_NETS[name]
  model = PyramidNet(**{'num_classes': 10, **kwargs, **overrides})
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  return model, synthetic_variables(model, shape), x


@functools.partial(jit, static_argnames=('model',))
def eval_probe(model, variables, x):
  """Eval-mode logits, `features` and every submodule's output, in one compiled program."""
  logits, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  features = model.apply(variables, x, method='features')
  return logits, features, state['intermediates']


@functools.lru_cache(maxsize=None)
def eval_run(name: str):
  model, variables, x = small_net(name)
  return eval_probe(model, variables, x)


def ref_conv(x, kernel, stride, pad):
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)


def same_conv(x, kernel, stride):
  return lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)


def ref_bn(x, params, stats):
  return (x - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5) * params['scale'] + params['bias']


def ref_avg_pool_ceil(x):
  # Replicating the last row / column, then plain 2x2 means, equals averaging only the covered
  # pixels of PyTorch's ceil_mode windows.
  x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)), mode='edge')
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def reference_block(h, bp, bs, stride, bottleneck, conv=None):
  """One block from SPEC section 1; `conv(x, kernel, stride, pad)`, symmetric ref_conv default."""
  conv = conv or ref_conv
  r = ref_bn(h, bp['bn1'], bs['bn1'])
  if bottleneck:
    r = conv(r, bp['conv1']['kernel'], 1, 0)
    r = jax.nn.relu(ref_bn(r, bp['bn2'], bs['bn2']))
    r = conv(r, bp['conv2']['kernel'], stride, 1)
    r = jax.nn.relu(ref_bn(r, bp['bn3'], bs['bn3']))
    r = conv(r, bp['conv3']['kernel'], 1, 0)
    r = ref_bn(r, bp['bn4'], bs['bn4'])
  else:
    r = conv(r, bp['conv1']['kernel'], stride, 1)
    r = jax.nn.relu(ref_bn(r, bp['bn2'], bs['bn2']))
    r = conv(r, bp['conv2']['kernel'], 1, 1)
    r = ref_bn(r, bp['bn3'], bs['bn3'])
  short = ref_avg_pool_ceil(h) if stride == 2 else h
  short = jnp.pad(short, ((0, 0), (0, 0), (0, 0), (0, r.shape[-1] - short.shape[-1])))
  return r + short  # No ReLU after the addition.


def reference_forward_fn(variables, x, stem, bottleneck):
  """Eval-mode PyramidNet written straight from SPEC section 1 (authors' PyTorch semantics)."""
  p, s = variables['params'], variables['batch_stats']
  out = {}
  if stem == 'cifar':
    h = ref_bn(ref_conv(x, p['conv1']['kernel'], 1, 1), p['bn1'], s['bn1'])  # No ReLU.
  else:
    h = jax.nn.relu(ref_bn(ref_conv(x, p['conv1']['kernel'], 2, 3), p['bn1'], s['bn1']))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                          ((0, 0), (1, 1), (1, 1), (0, 0)))
  out['stem'] = h
  stage = 1
  while f'layer{stage}_0' in p:
    i = 0
    while f'layer{stage}_{i}' in p:
      bp, bs = p[f'layer{stage}_{i}'], s[f'layer{stage}_{i}']
      stride = 2 if stage > 1 and i == 0 else 1
      h = reference_block(h, bp, bs, stride, bottleneck)
      i += 1
    out[f'stage{stage}'] = h
    stage += 1
  h = jax.nn.relu(ref_bn(h, p['bn_final'], s['bn_final']))
  out['pooled'] = pooled = h.mean(axis=(1, 2))
  out['logits'] = jnp.dot(pooled, p['fc']['kernel'], precision=lax.Precision.HIGHEST) \
      + p['fc']['bias']
  return out


reference_forward = jit(reference_forward_fn, static_argnames=('stem', 'bottleneck'))


def assert_close_scaled(got, want, rtol):
  """Elementwise closeness relative to the tensor's overall scale."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  scale = max(float(np.abs(want).max()), 1e-6)
  err = float(np.abs(got - want).max())
  assert err <= rtol * scale, f'max error {err} vs scale {scale}'


@pytest.mark.parametrize('name', list(SMALL_NETS))
def test_forward_matches_reference(name):
  model, variables, x = small_net(name)
  logits, feats, _ = eval_run(name)
  batch = x.shape[0]
  assert logits.shape == (batch, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  expected_shapes = FEATURE_SHAPES[name]
  assert set(feats) == set(expected_shapes)  # stem, stage1..stageK, pooled.
  for key, feat_shape in expected_shapes.items():
    assert feats[key].shape == (batch,) + feat_shape, key
  assert feats['pooled'].shape == (batch, model.num_features)
  ref = reference_forward(variables, x, model.stem, model.bottleneck)
  for key in expected_shapes:
    assert_close_scaled(feats[key], ref[key], 1e-4)
  assert_close_scaled(logits, ref['logits'], 1e-4)
  # The logits are the classifier applied to the pooled features.
  p = variables['params']['fc']
  assert_close_scaled(logits, feats['pooled'] @ p['kernel'] + p['bias'], 1e-5)
  # Same program again: same answer.
  np.testing.assert_array_equal(eval_probe(model, variables, x)[0], logits)


def test_single_channel_input_shapes():
  for name in ('cifar_basic', 'imagenet_basic'):
    model, _, _ = small_net(name)
    x = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
    variables = jax.eval_shape(model.init, rng(), x)
    expected = (3, 3, 1, 16) if model.stem == 'cifar' else (7, 7, 1, 64)
    assert variables['params']['conv1']['kernel'].shape == expected
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)
  # cifar_bottleneck runs on a 1-channel input in test_forward_matches_reference.
  assert SMALL_NETS['cifar_bottleneck'][1][-1] == 1


def model_block(name: str, layer: str, channel_multiple: int = 1):
  """(our block's eval output, its input, its variables) for one block of a SMALL_NETS net."""
  model, variables, _ = small_net(name)
  spec = {s.name: s for s in blocks.block_specs(model.widths, models.STEM_WIDTH[model.stem],
                                                model.bottleneck, channel_multiple)}[layer]
  stage = int(layer[5:].split('_')[0])
  block_in = eval_run(name)[1]['stem' if stage == 1 else f'stage{stage - 1}']
  bp, bs = variables['params'][layer], variables['batch_stats'][layer]
  out = _padded_block(spec, bp, bs, block_in)
  return out[..., :spec.out_channels], block_in, bp, bs


@functools.partial(jit, static_argnames=('spec',))
def _padded_block(spec, bp, bs, x):
  class Holder:  # The .value interface of the flax Variables a model passes.
    def __init__(self, value):
      self.value = value
  stats = {layer: {n: Holder(v) for n, v in layer_stats.items()} for layer, layer_stats in bs.items()}
  params, stats = blocks.padded_block_variables(spec, bp, stats)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, spec.padded_in - x.shape[-1])))
  y, _ = blocks.block(params, stats, x, spec=spec, train=False, epsilon=models.BN_EPSILON,
                      dtype=jnp.float32)
  return y


@pytest.mark.parametrize('channel_multiple', [1, 16])
def test_strided_convs_pad_symmetrically(channel_multiple):
  # CIFAR basic block at stride 2 on a 32 x 33 input: pad (1, 1) on both axes; 'SAME' would pad
  # the even axis (0, 1).
  got, block_in, bp, bs = model_block('cifar_basic', 'layer2_0', channel_multiple)
  assert block_in.shape == (4, 32, 33, 20) and got.shape == (4, 16, 17, 24)
  assert_close_scaled(got, reference_block(block_in, bp, bs, 2, False), 1e-5)
  same = reference_block(block_in, bp, bs, 2, False, lambda x, k, s, _: same_conv(x, k, s))
  assert not np.allclose(got, same, atol=1e-2)
  # ImageNet stem: 7x7 stride 2 on 64 x 65 pads (3, 3); 'SAME' would pad the even axis (2, 3).
  _, variables, x = small_net('imagenet_basic')
  _, _, inter = eval_run('imagenet_basic')
  got = inter['conv1']['__call__'][0]
  kernel = variables['params']['conv1']['kernel']
  assert got.shape == (4, 32, 33, 64)
  assert_close_scaled(got, ref_conv(x, kernel, 2, 3), 1e-5)
  assert not np.allclose(got, same_conv(x, kernel, 2), atol=1e-2)


@pytest.mark.parametrize('channel_multiple', [1, 16])
def test_bottleneck_strides_on_the_3x3_conv(channel_multiple):
  got, block_in, bp, bs = model_block('cifar_bottleneck', 'layer2_0', channel_multiple)
  assert block_in.shape == (4, 31, 32, 80) and got.shape == (4, 16, 16, 96)
  assert_close_scaled(got, reference_block(block_in, bp, bs, 2, True), 1e-5)

  def conv_striding_the_first_1x1(x, kernel, stride, pad):
    if kernel.shape[0] == 3:
      stride = 1
    elif x.shape[-1] == 80:  # conv1, the block's first 1x1.
      stride = 2
    return ref_conv(x, kernel, stride, pad)

  wrong = reference_block(block_in, bp, bs, 2, True, conv_striding_the_first_1x1)
  assert wrong.shape == got.shape and not np.allclose(got, wrong, atol=1e-2)


@functools.partial(jit, static_argnames=('model',))
def train_and_eval(model, variables, x):
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  features, _ = model.apply(variables, x, train=True, return_features=True,
                            mutable=['batch_stats'])
  eval_logits = model.apply(variables, x)  # No mutable collection needed.
  updated_logits = model.apply({'params': variables['params'], **updates}, x)
  return logits, updates, features, eval_logits, updated_logits


def test_train_mode_updates_batch_stats_and_eval_is_deterministic():
  model, variables, x = small_net('cifar_basic')
  logits, updates, feats, eval_logits, updated_logits = train_and_eval(model, variables, x)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  new_stats = dict(leaf_items(updates['batch_stats']))
  old_stats = dict(leaf_items(variables['batch_stats']))
  assert new_stats.keys() == old_stats.keys()
  for key, value in new_stats.items():
    assert value.dtype == jnp.float32
    assert not np.allclose(np.asarray(value), np.asarray(old_stats[key])), key
  # Momentum 0.9 (PyTorch 0.1) on the stem BN: the running statistics move 10% of the way to
  # the batch statistics of the stem conv's output.
  conv = np.asarray(ref_conv(x, variables['params']['conv1']['kernel'], 1, 1), np.float64)
  old = variables['batch_stats']['bn1']
  np.testing.assert_allclose(updates['batch_stats']['bn1']['mean'],
                             0.9 * old['mean'] + 0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['bn1']['var'],
                             0.9 * old['var'] + 0.1 * conv.var((0, 1, 2)), rtol=1e-3)
  # Train mode normalises with the batch statistics (epsilon 1e-5): the stem output has the BN
  # bias as its mean and scale^2 (slightly less, by epsilon) as its variance.
  stem = np.asarray(feats['stem'], np.float64)
  bn = variables['params']['bn1']
  np.testing.assert_allclose(stem.mean((0, 1, 2)), bn['bias'], atol=1e-4)
  var = conv.var((0, 1, 2))
  np.testing.assert_allclose(stem.var((0, 1, 2)), np.square(bn['scale']) * var / (var + 1e-5),
                             rtol=1e-4)
  # Eval mode: deterministic, and different from train mode (running vs batch statistics).
  _, _, _, eval_again, _ = train_and_eval(model, variables, x)
  np.testing.assert_array_equal(eval_again, eval_logits)
  np.testing.assert_allclose(eval_logits, eval_run('cifar_basic')[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(eval_logits, logits, atol=1e-3)
  assert not np.allclose(updated_logits, eval_logits, atol=1e-3)


def cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


@functools.partial(jit, static_argnames=('model', 'train'))
def model_grads(model, params, batch_stats, x, labels, train):
  def loss(params):
    variables = {'params': params, 'batch_stats': batch_stats}
    if train:
      logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    else:
      logits = model.apply(variables, x)
    return cross_entropy(logits, labels), logits
  return jax.value_and_grad(loss, has_aux=True)(params)


@functools.partial(jit, static_argnames=('stem', 'bottleneck'))
def reference_grads(params, batch_stats, x, labels, stem, bottleneck):
  def loss(params):
    out = reference_forward_fn({'params': params, 'batch_stats': batch_stats}, x, stem,
                               bottleneck)
    return cross_entropy(out['logits'], labels)
  return jax.value_and_grad(loss)(params)


def labels_for(x):
  return jnp.arange(x.shape[0]) % 10


@pytest.mark.parametrize('name', ['cifar_basic', 'cifar_bottleneck'])
def test_gradients_match_reference(name):
  # Eval mode (running statistics, as when fine-tuning with frozen BN): every leaf is live, and
  # the gradients are those of the reference network (this covers the custom conv VJP, at
  # stride 2 on odd sizes too).
  model, variables, x = small_net(name)
  (loss, _), grads = model_grads(model, variables['params'], variables['batch_stats'], x,
                                 labels_for(x), False)
  sums = {k: float(jnp.abs(g).sum()) for k, g in leaf_items(grads)}
  assert sums.keys() == dict(leaf_items(variables['params'])).keys()
  floor = 1e-4 * float(np.median(list(sums.values())))
  assert all(total > floor for total in sums.values()), sums
  ref_loss, ref = reference_grads(variables['params'], variables['batch_stats'], x,
                                  labels_for(x), model.stem, model.bottleneck)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for (key, g), (_, r) in zip(leaf_items(grads), leaf_items(ref)):
    assert g.dtype == jnp.float32
    assert_close_scaled(g, r, 1e-4)


def train_mode_dead_biases(params, cifar_stem: bool) -> set[str]:
  """BN biases whose gradient is exactly zero in train mode, by construction.

  A per-channel constant added after the last BN of a block (or after the CIFAR stem's BN,
  which has no ReLU) travels unchanged along the shortcuts (the ceil-mode average of a constant
  is that constant; appended channels are zero) and is removed by the next train-mode BN (the
  next block's bn1, and bn_final). In a bottleneck, bn1's bias passes a 1x1 conv and is removed
  by bn2. The basic block's bn1 bias is NOT dead: the 3x3 conv's zero padding breaks the
  constant at the borders. A ReLU added after the addition or in the CIFAR stem would revive
  these, so the set pins the architecture down.
  """
  dead = {"['bn1']['bias']"} if cifar_stem else set()
  for block in params:
    if block.startswith('layer'):
      if 'bn4' in params[block]:
        dead |= {f"['{block}']['bn4']['bias']", f"['{block}']['bn1']['bias']"}
      else:
        dead.add(f"['{block}']['bn3']['bias']")
  return dead


@pytest.mark.parametrize('name', ['cifar_basic', 'cifar_bottleneck'])
def test_every_parameter_gets_a_gradient_in_train_mode(name):
  model, variables, x = small_net(name)
  _, grads = model_grads(model, variables['params'], variables['batch_stats'], x, labels_for(x),
                         True)
  sums = {k: float(jnp.abs(g).sum()) for k, g in leaf_items(grads)}
  assert sums.keys() == dict(leaf_items(variables['params'])).keys()
  assert all(np.isfinite(v) for v in sums.values())
  dead = train_mode_dead_biases(variables['params'], model.stem == 'cifar')
  assert dead <= sums.keys()
  median = float(np.median([v for k, v in sums.items() if k not in dead]))
  for key, total in sums.items():
    if key in dead:
      assert total < 1e-4 * median, (key, total, median)  # Float rounding only (~1e-6).
    else:
      assert total > 1e-3 * median, (key, total, median)


@pytest.mark.parametrize('use_statistics', [False, True])
def test_train_batch_norm_gradient_equals_autodiff_of_its_formula(use_statistics):
  """blocks.batch_norm's hand-written training gradient against jax.grad of nn.BatchNorm's
  arithmetic; use_statistics also differentiates through the batch mean and variance."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], (4, 5, 6, 7))  # Off-centre, so the mean matters.
  params = {'scale': jax.random.normal(keys[1], (7,)), 'bias': jax.random.normal(keys[2], (7,))}
  weights = jax.random.normal(keys[3], x.shape)

  def formula(x, params):
    mean = x.mean((0, 1, 2))
    var = jnp.maximum(0.0, jnp.square(x).mean((0, 1, 2)) - jnp.square(mean))
    return (x - mean) * (lax.rsqrt(var + 1e-5) * params['scale']) + params['bias'], (mean, var)

  def ours(x, params):
    return blocks.batch_norm(x, params, None, True, 1e-5, jnp.float32)

  def loss(norm, x, params):
    y, (mean, var) = norm(x, params)
    total = jnp.sum(jnp.tanh(y) * weights)
    return total + (jnp.sum(mean * var) if use_statistics else 0.0)

  for a, b in zip(jax.tree.leaves((ours(x, params), jax.grad(loss, (1, 2))(ours, x, params))),
                  jax.tree.leaves((formula(x, params), jax.grad(loss, (1, 2))(formula, x, params)))):
    assert_close_scaled(a, b, 1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_module_is_nn_batch_norm_with_the_textbook_gradient(train, dtype):
  """blocks.BatchNorm (PyConv's BatchNorm): nn.BatchNorm's variables, outputs and running
  averages bit for bit; in training its gradient equals autodiff of nn.BatchNorm's."""
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 5, 6, 7))
  kwargs = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
  ours, reference = blocks.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
  initial = ours.init(jax.random.key(1), x)
  assert jax.tree.map(np.shape, initial) == jax.tree.map(np.shape, reference.init(
      jax.random.key(1), x))
  for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(reference.init(jax.random.key(1), x))):
    np.testing.assert_array_equal(a, b)
  variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
                           initial)
  weights = jax.random.normal(jax.random.key(3), x.shape)

  def loss(module, params, x):
    y, stats = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * weights), (y, stats)

  (_, (y, stats)), grads = jax.value_and_grad(loss, (1, 2), has_aux=True)(
      ours, variables['params'], x)
  (_, (y_ref, stats_ref)), grads_ref = jax.value_and_grad(loss, (1, 2), has_aux=True)(
      reference, variables['params'], x)
  assert y.dtype == y_ref.dtype == dtype
  for a, b in zip(jax.tree.leaves((y, stats)), jax.tree.leaves((y_ref, stats_ref))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert_close_scaled(a, b, 1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize('padded', [False, True])
def test_batch_norm_in_lax_traces_to_the_equations_of_its_jnp_formulas(padded):
  """blocks writes BatchNorm in lax to trace faster; its jaxprs must be those of the jnp formulas
  (nn.BatchNorm's arithmetic and the textbook gradient), so that XLA compiles the same program."""
  eps, momentum = 1e-5, 0.9
  x, channels = jnp.zeros((4, 5, 6, 9 if padded else 7)), jnp.zeros(9 if padded else 7)

  def forward(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = jnp.maximum(0.0, jnp.square(x).mean((0, 1, 2)) - jnp.square(mean))
    return (x - mean) * (lax.rsqrt(var + eps) * scale) + bias, mean, var

  def backward(x, scale, mean, var, dy, dmean, dvar):
    n = x.shape[0] * x.shape[1] * x.shape[2]
    rstd = lax.rsqrt(var + eps)
    x_hat = (x - mean) * rstd
    dbias = dy.sum((0, 1, 2))
    dscale = (dy * x_hat).sum((0, 1, 2))
    dx = (scale * rstd / n) * (n * dy - dbias - x_hat * dscale)
    dx = dx + dmean / n
    dx = dx + dvar * (2.0 / n) * (x - mean)
    return dx, dscale, dbias

  def evaluation(x, mean, var, scale, bias):
    return (x - mean) * (lax.rsqrt(var + eps) * scale) + bias

  def running(mean, var, batch_mean, batch_var):
    n = mean.shape[0]
    return (momentum * mean + (1 - momentum) * batch_mean[:n],
            momentum * var + (1 - momentum) * batch_var[:n])

  def ours_running(mean, var, batch_mean, batch_var):
    stats = {'bn': {'mean': types.SimpleNamespace(value=mean),
                    'var': types.SimpleNamespace(value=var)}}
    blocks.update_running_stats(stats, {'bn': (batch_mean, batch_var)}, momentum)
    return stats['bn']['mean'].value, stats['bn']['var'].value

  def assert_same_jaxpr(ours, reference, *args):
    assert str(jax.make_jaxpr(ours)(*args)) == str(jax.make_jaxpr(reference)(*args))

  assert_same_jaxpr(lambda x, s, b: blocks._train_norm.fun(x, s, b, eps), forward,
                    x, channels, channels)
  assert_same_jaxpr(lambda x, s, m, v, dy, dm, dv: blocks._train_norm_bwd(
      eps, (x, s, m, v), (dy, dm, dv)), backward, x, *[channels] * 3, x, channels, channels)
  assert_same_jaxpr(lambda *a: blocks._normalise(*a, eps), evaluation,
                    x.astype(jnp.bfloat16), *[channels] * 4)  # Eval in bf16 promotes as jnp.
  assert_same_jaxpr(ours_running, running, jnp.zeros(7), jnp.ones(7), channels, channels)


@pytest.mark.parametrize('name', ['cifar_basic', 'cifar_bottleneck'])
def test_remat_is_exact(name):
  model, variables, x = small_net(name)
  remat_model, _, _ = small_net(name, remat=True)
  abstract = jax.eval_shape(remat_model.init, rng(), jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert jax.tree.structure(abstract) == jax.tree.structure(variables)  # Same names.
  args = (variables['params'], variables['batch_stats'], x, labels_for(x), True)
  (loss, logits), grads = model_grads(model, *args)
  (remat_loss, remat_logits), remat_grads = model_grads(remat_model, *args)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(remat_logits, logits, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()) + 1e-12)
  _, stats = model.apply(variables, x, train=True, mutable=['batch_stats'])
  _, remat_stats = remat_model.apply(variables, x, train=True, mutable=['batch_stats'])
  for a, b in zip(jax.tree.leaves(remat_stats), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_remat_cuts_the_compiled_training_memory():
  """XLA's temporary buffer for the gradient, with and without remat, on this (CPU) backend.

  jax.checkpoint alone saved nothing here: XLA:CPU drops its optimization barriers and merges
  the recomputation back into the forward pass (docs/benchmarks.md, "Memory").
  """
  x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)

  def temp_bytes(remat):
    return helpers.gradient_temp_bytes(
        PyramidNet(depth=20, alpha=24, num_classes=10, remat=remat), x)

  # With XLA's convolutions and with oneDNN's (2.75x and 1.94x less here; oneDNN's need far
  # less temp memory to begin with: 6.4 MB against 18.2 MB without remat).
  backends = ['xla'] + (['onednn'] if onednn.status() is None else [])
  previous = conv.cpu_backend()
  try:
    for backend in backends:
      conv.set_cpu_backend(backend)
      assert temp_bytes(remat=True) < 0.6 * temp_bytes(remat=False), backend
  finally:
    conv.set_cpu_backend(previous)


@pytest.mark.parametrize('name', list(SMALL_NETS))
@pytest.mark.parametrize('channel_multiple', [8, 32])
def test_channel_padding_is_inert(name, channel_multiple):
  """Padded widths: the same variables, and the same outputs, gradients and statistics."""
  model, variables, x = small_net(name)
  padded, _, _ = small_net(name, channel_multiple=channel_multiple)
  abstract = jax.eval_shape(padded.init, rng(), jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(jnp.shape, variables)
  # Padding must really happen here for the test to mean anything.
  specs = blocks.block_specs(padded.widths, models.STEM_WIDTH[padded.stem], padded.bottleneck,
                             channel_multiple)
  assert any(s.padded_width > s.width for s in specs)
  assert all(s.padded_width % channel_multiple == 0 for s in specs)

  def run(m):
    logits, updates, features, eval_logits, _ = train_and_eval(m, variables, x)
    args = (variables['params'], variables['batch_stats'], x, labels_for(x), True)
    (loss, _), grads = model_grads(m, *args)
    return logits, updates, features, eval_logits, loss, grads

  want, got = run(model), run(padded)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (key, a), (_, b) in zip(leaf_items(got), leaf_items(want)):
    assert a.shape == b.shape, key
    # Scaled to each leaf; the floor covers the biases whose gradient is rounding noise (~1e-8).
    scale = max(float(np.abs(b).max()), 1e-2)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale, err_msg=key)


@pytest.mark.parametrize('bad', [0, -16, 1.5, True, '16'])
def test_channel_multiple_is_checked(bad):
  model, _, x = small_net('cifar_basic')
  with pytest.raises(ValueError, match='channel_multiple must be an int >= 1'):
    PyramidNet(depth=8, alpha=12, num_classes=10, channel_multiple=bad).init(rng(), x[:1])


def test_padded_blocks_share_shapes():
  # PyramidNet-110 a48: 54 blocks, 48 different widths, and at exact widths no two blocks share
  # their shapes; at widths rounded up to multiples of 16 they have 5 shapes between them, which
  # is what shortens the compile (docs/benchmarks.md).
  widths = block_widths(110, 48)
  def shapes(multiple):
    return {(s.stride, s.padded_in, s.padded_width)
            for s in blocks.block_specs(widths, 16, False, multiple)}
  assert len({w for stage in widths for w in stage}) == 48
  assert len(shapes(1)) == 54 and len(shapes(16)) == 5
  # channel_multiple 1 pads nothing: the exact network's computation.
  assert all((s.padded_in, s.padded_width) == (s.in_channels, s.width)
             for s in blocks.block_specs(widths, 16, False, 1))


def test_bfloat16():
  model32, variables, x = small_net('cifar_basic')
  model16, _, _ = small_net('cifar_basic', dtype=jnp.bfloat16)
  abstract = jax.eval_shape(model16.init, rng(), jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))  # Params, stats.
  logits32 = eval_run('cifar_basic')[0]
  logits16, updates, feats, eval16, _ = train_and_eval(model16, variables, x)
  assert logits16.dtype == eval16.dtype == jnp.float32
  assert_close_scaled(eval16, logits32, 0.05)
  assert not np.array_equal(np.asarray(eval16), np.asarray(logits32))  # Really bf16 inside.
  assert feats['stage1'].dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates['batch_stats']))


@functools.partial(jit, static_argnames=('model',))
def dropout_probe(model, variables, x, key):
  def both(module, x, train):
    return module(x, train), module(x, train, return_features=True)['pooled']
  eval_logits, eval_pooled = model.apply(variables, x, False, method=both)
  (logits, pooled), _ = model.apply(variables, x, True, method=both, mutable=['batch_stats'],
                                    rngs={'dropout': key})
  return eval_logits, eval_pooled, logits, pooled


def test_dropout():
  # 40 classes > 28 features, so the dropout mask can be solved for from the logits.
  model, variables, x = small_net('cifar_basic', num_classes=40, dropout_rate=0.5)
  kernel = np.asarray(variables['params']['fc']['kernel'], np.float64)
  bias = np.asarray(variables['params']['fc']['bias'], np.float64)
  eval_logits, eval_pooled, a, pooled = dropout_probe(model, variables, x, rng(1))
  # Eval: no dropout rng needed, deterministic, and no dropout applied.
  np.testing.assert_allclose(eval_logits, np.asarray(eval_pooled) @ kernel + bias, rtol=1e-5,
                             atol=1e-6)
  eval_again, _, a_again, _ = dropout_probe(model, variables, x, rng(1))
  np.testing.assert_array_equal(eval_again, eval_logits)
  # Train: same rng, same output; another rng, another output.
  np.testing.assert_array_equal(a, a_again)
  _, _, b, _ = dropout_probe(model, variables, x, rng(2))
  assert not np.allclose(a, b)
  # Dropout acts on the pooled features, before the classifier, with inverted scaling:
  # logits = (mask * pooled / 0.5) @ kernel + bias with a 0/1 mask, about half of it ones.
  pooled = np.asarray(pooled, np.float64)
  assert not np.allclose(a, pooled @ kernel + bias, atol=1e-4)
  masks = []
  for row in range(x.shape[0]):
    design = (kernel * (2.0 * pooled[row])[:, None]).T  # (classes, features)
    mask, *_ = np.linalg.lstsq(design, np.asarray(a[row], np.float64) - bias, rcond=None)
    np.testing.assert_allclose(mask, np.round(mask), atol=1e-3)
    masks.append(np.round(mask))
  masks = np.concatenate(masks)
  assert set(np.unique(masks)) <= {0.0, 1.0}
  assert 0.3 < masks.mean() < 0.7


# --------------------------------------------------------------------------------------------
# 7. Initialisation (the one real init compile of this file).


INIT_PATHS = ('model.init', 'init_variables')


@functools.lru_cache(maxsize=None)
def initialised(how: str = 'model.init'):
  # Wide enough for tight statistics: widths 56, 96, 136 (outputs 224, 384, 544).
  model = PyramidNet(depth=11, alpha=120, bottleneck=True, num_classes=100)
  if how == 'init_variables':  # The training system's host-side initialiser.
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
    abstract = jax.eval_shape(model.init, rng(), jnp.zeros((2, 8, 8, 3)))
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(abstract)):
      assert (got.shape, got.dtype) == (want.shape, want.dtype)
    return model, variables
  return model, jit(model.init)(rng(), jnp.zeros((2, 8, 8, 3)))


def test_init_variables_is_deterministic_per_key():
  model = PyramidNet(depth=8, alpha=8, num_classes=10)
  a, b, c = (models.init_variables(model, jax.random.key(seed), (8, 8, 3)) for seed in (0, 0, 1))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not np.array_equal(a['params']['conv1']['kernel'], c['params']['conv1']['kernel'])
  # Each kernel has its own stream: same shapes, different values.
  assert not np.array_equal(a['params']['layer1_0']['conv2']['kernel'][..., :8, :8],
                            a['params']['layer2_0']['conv1']['kernel'][..., :8, :8])


@pytest.mark.parametrize('how', INIT_PATHS)
def test_conv_initialisation_is_he_fan_out_normal(how):
  _, variables = initialised(how)
  kernels = {k: np.asarray(v, np.float64) for k, v in leaf_items(variables['params'])
             if k.endswith("['kernel']") and "['fc']" not in k}
  assert len(kernels) == 10
  for key, kernel in kernels.items():
    kh, kw, cin, out = kernel.shape
    std = math.sqrt(2.0 / (kh * kw * out))
    flat = kernel.ravel()
    assert abs(flat.mean()) < 5 * std / math.sqrt(flat.size), key
    assert abs(flat.std() / std - 1) < 5 / math.sqrt(2 * flat.size), (key, flat.std(), std)
    if flat.size >= 20000:  # Not truncated: 4.55% of a normal lies beyond 2 sigma.
      assert 0.038 < np.mean(np.abs(flat) > 2 * std) < 0.053, key
  # Fan-out, not fan-in, where they differ by 2x or more.
  for key in ("['layer2_0']['conv1']['kernel']", "['layer3_0']['conv3']['kernel']",
              "['conv1']['kernel']"):
    kh, kw, cin, out = kernels[key].shape
    fan_in_std = math.sqrt(2.0 / (kh * kw * cin))
    fan_out_std = math.sqrt(2.0 / (kh * kw * out))
    assert max(fan_in_std, fan_out_std) > 1.5 * min(fan_in_std, fan_out_std)
    assert abs(kernels[key].std() - fan_out_std) < abs(kernels[key].std() - fan_in_std) / 10


@pytest.mark.parametrize('how', INIT_PATHS)
def test_batchnorm_initialisation(how):
  _, variables = initialised(how)
  count = 0
  for key, leaf in leaf_items(variables['params']):
    if key.endswith("['scale']"):
      np.testing.assert_array_equal(leaf, 1)
      count += 1
    elif key.endswith("['bias']") and "['fc']" not in key:
      np.testing.assert_array_equal(leaf, 0)
  assert count == 1 + 3 * 4 + 1
  for key, leaf in leaf_items(variables['batch_stats']):
    np.testing.assert_array_equal(leaf, 1 if key.endswith("['var']") else 0)


@pytest.mark.parametrize('how', INIT_PATHS)
def test_classifier_initialisation(how):
  model, variables = initialised(how)
  kernel = np.asarray(variables['params']['fc']['kernel'], np.float64)
  bias = np.asarray(variables['params']['fc']['bias'], np.float64)
  assert kernel.shape == (544, 100) and model.num_features == 544
  bound = 1 / math.sqrt(544)  # PyTorch nn.Linear default: U(+-1/sqrt(fan_in)), bias included.
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  assert np.abs(kernel).max() > 0.999 * bound and np.abs(bias).max() > 0.9 * bound
  assert abs(kernel.std() / (bound / math.sqrt(3)) - 1) < 0.02  # Uniform, not normal.
  assert abs(kernel.mean()) < 0.02 * bound
  assert abs(bias.std() / (bound / math.sqrt(3)) - 1) < 0.25


# --------------------------------------------------------------------------------------------
# 8. Importing the package loads jax and flax only.


def test_import_does_not_load_tensorflow_or_torch():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [ROOT, env.get('PYTHONPATH')]))
  result = subprocess.run(
      [sys.executable, '-c',
       "import pyramidnet_jax, sys; print('tensorflow' in sys.modules or 'torch' in sys.modules)"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.strip() == 'False'


class _DeclaresWithFlax(nn.Module):
  @nn.compact
  def __call__(self):
    return self.param('kernel', nn.initializers.he_normal(), (3, 3, 4, 5), jnp.float32)


class _DeclaresWithDeclareParam(nn.Module):
  init_fn: Any = nn.initializers.he_normal()

  @nn.compact
  def __call__(self):
    return conv.declare_param(self, 'kernel', self.init_fn, (3, 3, 4, 5), jnp.float32)


def test_declare_param_initialises_exactly_as_flax_param():
  # Same name, collection and random stream as nn.Module.param: the same initial values.
  want = _DeclaresWithFlax().init(rng(3))
  got = _DeclaresWithDeclareParam().init(rng(3))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  np.testing.assert_array_equal(got['params']['kernel'], want['params']['kernel'])
  np.testing.assert_array_equal(_DeclaresWithDeclareParam().apply(got), want['params']['kernel'])


def test_declare_param_does_not_trace_the_initialiser_when_given_a_value():
  calls = []

  def init_fn(key, shape, dtype):
    calls.append(shape)
    return jnp.zeros(shape, dtype)

  module = _DeclaresWithDeclareParam(init_fn=init_fn)
  variables = module.init(rng())
  assert calls == [(3, 3, 4, 5)]
  jax.jit(module.apply)(variables)  # flax's own param would eval_shape init_fn here.
  assert calls == [(3, 3, 4, 5)]


def test_declare_param_rejects_a_value_of_another_shape_as_flax_does():
  variables = {'params': {'kernel': jnp.zeros((3, 3, 4, 6))}}
  with pytest.raises(flax.errors.ScopeParamShapeError,
                     match=r'shape \(3, 3, 4, 5\).*has shape \(3, 3, 4, 6\)'):
    _DeclaresWithDeclareParam().apply(variables)
  with pytest.raises(flax.errors.ScopeParamShapeError):
    _DeclaresWithFlax().apply(variables)


def test_a_network_rejects_variables_of_another_width():
  # E.g. a checkpoint converted for another alpha: a clear error, not a silent broadcast.
  variables = PyramidNet(depth=8, alpha=8, num_classes=10).init(rng(), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(flax.errors.ScopeParamShapeError, match='layer1_0'):
    PyramidNet(depth=8, alpha=12, num_classes=10).apply(variables, jnp.zeros((1, 8, 8, 3)))
