"""PyramidNet's forward pass on tiny networks against the reference written from the authors'
code (pyramidnet_reference.py): the shortcut, symmetric padding, where a bottleneck strides,
BatchNorm in training and evaluation, bfloat16 and dropout.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyramidnet_jax.models import layers
from pyramidnet_jax.models import pyramidnet
from pyramidnet_jax.models import pyramidnet_blocks as blocks
from tests.models.paper_tables import leaf_items, rng
from tests.models.pyramidnet_reference import (
    SMALL_NETS, assert_close_scaled, eval_probe, eval_run, jit_per_levers, ref_conv,
    reference_block, reference_forward, same_conv, small_net, train_and_eval)

# Feature shapes (without the batch) of SMALL_NETS.
FEATURE_SHAPES = {
    'cifar_basic': {'stem': (32, 33, 16), 'stage1': (32, 33, 20), 'stage2': (16, 17, 24),
                    'stage3': (8, 9, 28), 'pooled': (28,)},
    'cifar_bottleneck': {'stem': (31, 32, 16), 'stage1': (31, 32, 80), 'stage2': (16, 16, 96),
                         'stage3': (8, 8, 112), 'pooled': (112,)},
    'imagenet_basic': {'stem': (16, 17, 64), 'stage1': (16, 17, 68), 'stage2': (8, 9, 72),
                       'stage3': (4, 5, 76), 'stage4': (2, 3, 80), 'pooled': (80,)},
}


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
  chex.assert_shape(got, (2, half, half, 5))
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
  chex.assert_shape(got, (2, 5, 5, 5))
  np.testing.assert_array_equal(got[..., :3], x)
  np.testing.assert_array_equal(got[..., 3:], 0)
  np.testing.assert_array_equal(np.asarray(blocks.shortcut(jnp.asarray(x), 3, 1)), x)


def test_shortcut_rejects_bad_arguments():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match='stride must be 1 or 2'):
    blocks.shortcut(x, 5, 3)
  with pytest.raises(ValueError, match='cannot shrink 3 channels to 2'):
    blocks.shortcut(x, 2, 1)


@pytest.mark.parametrize('name', list(SMALL_NETS))
def test_forward_matches_reference(name):
  model, variables, x = small_net(name)
  logits, feats, _ = eval_run(name)
  batch = x.shape[0]
  chex.assert_shape(logits, (batch, 10))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  expected_shapes = FEATURE_SHAPES[name]
  assert set(feats) == set(expected_shapes)  # stem, stage1..stageK, pooled.
  for key, feat_shape in expected_shapes.items():
    chex.assert_shape(feats[key], (batch,) + feat_shape)
  chex.assert_shape(feats['pooled'], (batch, model.num_features))
  ref = reference_forward(variables, x, model.stem, model.bottleneck)
  for key in expected_shapes:
    assert_close_scaled(feats[key], ref[key], 1e-4)
  assert_close_scaled(logits, ref['logits'], 1e-4)
  # The logits are the classifier applied to the pooled features.
  p = variables['params']['fc']
  assert_close_scaled(logits, feats['pooled'] @ p['kernel'] + p['bias'], 1e-5)
  # Same program again: same answer.
  chex.assert_trees_all_equal(eval_probe(model, variables, x)[0], logits)


@jit_per_levers(static_argnames=('spec',))
def _padded_block(spec, bp, bs, x):
  class Holder:  # The .value interface of the flax Variables a model passes.
    def __init__(self, value):
      self.value = value
  stats = {layer: {n: Holder(v) for n, v in layer_stats.items()}
           for layer, layer_stats in bs.items()}
  params, stats = blocks.padded_block_variables(spec, bp, stats)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, spec.padded_in - x.shape[-1])))
  y, _ = blocks.block(params, stats, x, spec=spec, train=False, epsilon=layers.BN_EPSILON,
                      dtype=jnp.float32)
  return y


def model_block(name: str, layer: str, channel_multiple: int = 1):
  """(our block's eval output, its input, its variables) for one block of a SMALL_NETS net."""
  model, variables, _ = small_net(name)
  spec = {s.name: s for s in blocks.block_specs(
      model.widths, pyramidnet.STEM_WIDTH[model.stem], model.bottleneck, channel_multiple)}[layer]
  stage = int(layer[5:].split('_')[0])
  block_in = eval_run(name)[1]['stem' if stage == 1 else f'stage{stage - 1}']
  bp, bs = variables['params'][layer], variables['batch_stats'][layer]
  out = _padded_block(spec, bp, bs, block_in)
  return out[..., :spec.out_channels], block_in, bp, bs


@pytest.mark.parametrize('channel_multiple', [1, 16])
def test_strided_convs_pad_symmetrically(channel_multiple):
  # CIFAR basic block at stride 2 on a 32 x 33 input: pad (1, 1) on both axes; 'SAME' would pad
  # the even axis (0, 1).
  got, block_in, bp, bs = model_block('cifar_basic', 'layer2_0', channel_multiple)
  chex.assert_shape([block_in, got], [(4, 32, 33, 20), (4, 16, 17, 24)])
  assert_close_scaled(got, reference_block(block_in, bp, bs, 2, False), 1e-5)
  same = reference_block(block_in, bp, bs, 2, False, lambda x, k, s, _: same_conv(x, k, s))
  assert not np.allclose(got, same, atol=1e-2)
  # ImageNet stem: 7x7 stride 2 on 64 x 65 pads (3, 3); 'SAME' would pad the even axis (2, 3).
  _, variables, x = small_net('imagenet_basic')
  _, _, inter = eval_run('imagenet_basic')
  got = inter['conv1']['__call__'][0]
  kernel = variables['params']['conv1']['kernel']
  chex.assert_shape(got, (4, 32, 33, 64))
  assert_close_scaled(got, ref_conv(x, kernel, 2, 3), 1e-5)
  assert not np.allclose(got, same_conv(x, kernel, 2), atol=1e-2)


@pytest.mark.parametrize('channel_multiple', [1, 16])
def test_bottleneck_strides_on_the_3x3_conv(channel_multiple):
  got, block_in, bp, bs = model_block('cifar_bottleneck', 'layer2_0', channel_multiple)
  chex.assert_shape([block_in, got], [(4, 31, 32, 80), (4, 16, 16, 96)])
  assert_close_scaled(got, reference_block(block_in, bp, bs, 2, True), 1e-5)

  def conv_striding_the_first_1x1(x, kernel, stride, pad):
    if kernel.shape[0] == 3:
      stride = 1
    elif x.shape[-1] == 80:  # conv1, the block's first 1x1.
      stride = 2
    return ref_conv(x, kernel, stride, pad)

  wrong = reference_block(block_in, bp, bs, 2, True, conv_striding_the_first_1x1)
  assert wrong.shape == got.shape and not np.allclose(got, wrong, atol=1e-2)


def test_train_mode_updates_batch_stats_and_eval_is_deterministic():
  model, variables, x = small_net('cifar_basic')
  logits, updates, feats, eval_logits, updated_logits = train_and_eval(model, variables, x)
  chex.assert_shape(logits, (4, 10))
  assert logits.dtype == jnp.float32
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
  chex.assert_trees_all_equal(eval_again, eval_logits)
  chex.assert_trees_all_close(eval_logits, eval_run('cifar_basic')[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(eval_logits, logits, atol=1e-3)
  assert not np.allclose(updated_logits, eval_logits, atol=1e-3)


def test_bfloat16():
  _, variables, x = small_net('cifar_basic')
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


@jit_per_levers(static_argnames=('model',))
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
  chex.assert_trees_all_equal(eval_again, eval_logits)
  # Train: same rng, same output; another rng, another output.
  chex.assert_trees_all_equal(a, a_again)
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
