"""PyConvResNet / PyConvHGResNet (Duta et al. 2020): parameter counts and names as the authors'
code, the pyramid levels, shapes, validation, the config factory, and a training step.

Cheap by design (2-core CPU): the big networks are only traced (jax.eval_shape, no compilation);
the compiled network is PyConvResNet-18 with our small-image stem, compiled at XLA optimisation
level 0. The CPU kit's grouped convolutions and rematerialisation: tests/xla_cpu/.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pyramidnet_jax import PyConv
from pyramidnet_jax import PyConvHGResNet
from pyramidnet_jax import PyConvResNet
from pyramidnet_jax import levers
from pyramidnet_jax import models
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.training import optimizer
from pyramidnet_jax.training import runtime as runtime_lib
from tests import helpers
from tests.models import pyramidnet_reference

DN = ('NHWC', 'HWIO', 'NHWC')

# Trainable parameters of the authors' code, 1000 classes.
PARAM_COUNTS = {
    (PyConvResNet, 18): 5_911_976,
    (PyConvResNet, 34): 11_091_048,
    (PyConvResNet, 50): 24_847_720,
    (PyConvResNet, 101): 42_307_944,
    (PyConvResNet, 152): 56_640_872,
    (PyConvHGResNet, 50): 25_234_728,
    (PyConvHGResNet, 101): 44_627_240,
    (PyConvHGResNet, 152): 60_657_960,
}


def shapes(model, size=64, channels=3):
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def flat(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator='/'): leaf for p, leaf in leaves}


@pytest.mark.parametrize('cls, depth', list(PARAM_COUNTS), ids=lambda v: getattr(v, '__name__', v))
def test_parameter_count(cls, depth):
  model = cls(depth=depth, num_classes=1000)
  params = shapes(model)['params']
  assert sum(x.size for x in jax.tree.leaves(params)) == PARAM_COUNTS[cls, depth]
  assert model.num_features == (512 if depth < 50 else 2048)
  assert params['fc']['kernel'].shape == (model.num_features, 1000)


def test_names_mirror_the_authors_state_dict():
  names = set(flat(shapes(PyConvResNet(depth=50, num_classes=10))['params']))
  for name in ['conv1/kernel', 'bn1/scale', 'fc/kernel', 'fc/bias',
               'layer1_0/conv1/kernel', 'layer1_0/conv3/kernel', 'layer1_0/bn3/bias',
               'layer1_0/downsample_conv/kernel', 'layer1_0/downsample_bn/scale',
               'layer2_0/downsample_conv/kernel', 'layer4_2/conv2/kernel']:
    assert f'{name}' in names, name
  for stage, levels in enumerate((4, 3, 2), start=1):
    got = sorted(n for n in names if n.startswith(f'layer{stage}_1/conv2/'))
    assert got == [f'layer{stage}_1/conv2/conv2_{j}/kernel' for j in range(1, levels + 1)]
  # Only the first block of each stage changes shape; no max-pool or BN elsewhere.
  assert not [n for n in names if 'downsample' in n and '_0/' not in n]
  basic = set(flat(shapes(PyConvResNet(depth=18, num_classes=10))['params']))
  assert 'layer1_0/conv1/conv2_4/kernel' in basic and 'layer1_0/conv2/kernel' in basic
  assert 'layer4_0/conv1/kernel' in basic
  # Stage 1 of the basic net strides without widening: max-pool alone, no parameters.
  assert not [n for n in basic if n.startswith('layer1_0/downsample')]
  assert 'layer2_0/downsample_bn/bias' in basic


def test_level_kernels_groups_and_splits():
  params = shapes(PyConvHGResNet(depth=50, num_classes=10))['params']
  # HG stage 2: planes 256, kernels 3, 5, 7, groups 32, 64, 64, outputs 1/4, 1/4, 1/2.
  level = params['layer2_1']['conv2']
  assert level['conv2_1']['kernel'].shape == (3, 3, 256 // 32, 64)
  assert level['conv2_2']['kernel'].shape == (5, 5, 256 // 64, 64)
  assert level['conv2_3']['kernel'].shape == (7, 7, 256 // 64, 128)
  assert params['layer4_1']['conv2']['kernel'].shape == (3, 3, 1024 // 32, 1024)
  assert params['layer4_1']['conv3']['kernel'].shape == (1, 1, 1024, 2048)
  params = shapes(PyConvResNet(depth=50, num_classes=10))['params']
  level = params['layer1_1']['conv2']
  assert [level[f'conv2_{j}']['kernel'].shape for j in (1, 2, 3, 4)] == [
      (3, 3, 64, 16), (5, 5, 16, 16), (7, 7, 8, 16), (9, 9, 4, 16)]


@pytest.mark.parametrize('chosen', [levers.PLAIN, xla_cpu.LEVERS], ids=lambda lv: lv.name)
@pytest.mark.parametrize('stride', [1, 2])
def test_two_level_pyconv_equals_its_grouped_convs(stride, chosen):
  layer = PyConv(features=(8, 16), kernel_sizes=(3, 5), groups=(1, 4), strides=stride)
  # Numpy draws: XLA's CPU compiler takes seconds per random-number op.
  rng = np.random.default_rng(0)
  # Even size: at stride 2 'SAME' would pad (0, 1), where PyTorch pads k // 2 on both sides.
  x = rng.standard_normal((2, 10, 10, 8), np.float32)
  structure = jax.eval_shape(layer.init, jax.random.key(1), x)
  assert jax.tree.map(lambda s: s.shape, structure) == {'params': {
      'conv2_1': {'kernel': (3, 3, 8, 8)}, 'conv2_2': {'kernel': (5, 5, 2, 16)}}}
  k1 = rng.standard_normal((3, 3, 8, 8), np.float32) / 5
  k2 = rng.standard_normal((5, 5, 2, 16), np.float32) / 5
  variables = {'params': {'conv2_1': {'kernel': k1}, 'conv2_2': {'kernel': k2}}}
  y1 = lax.conv_general_dilated(x, k1, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=DN)
  y2 = lax.conv_general_dilated(x, k2, (stride, stride), ((2, 2), (2, 2)), dimension_numbers=DN,
                                feature_group_count=4)
  expected = jnp.concatenate([y1, y2], axis=-1)
  with levers.using(chosen):
    y = jax.jit(lambda v, x: layer.apply(v, x))(variables, x)  # A trace per set of levers.
  chex.assert_shape([y, expected], (2, 10 // stride, 10 // stride, 24))
  chex.assert_trees_all_close(y, expected, rtol=1e-5, atol=1e-5)


def test_pyconv_rejects_bad_levels():
  x = jnp.zeros((1, 8, 8, 8))
  with pytest.raises(ValueError, match='as many features'):
    PyConv(features=(8, 8), kernel_sizes=(3,), groups=(1, 4)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='must divide'):
    PyConv(features=(8, 8), kernel_sizes=(3, 5), groups=(1, 3)).init(jax.random.key(0), x)


@pytest.mark.parametrize('cls, depth, valid', [
    (PyConvResNet, 20, r'\[18, 34, 50, 101, 152\]'),
    (PyConvResNet, 200, r'\[18, 34, 50, 101, 152\]'),
    (PyConvHGResNet, 18, r'\[50, 101, 152\]'),
])
def test_bad_depth(cls, depth, valid):
  model = cls(depth=depth, num_classes=10)
  with pytest.raises(ValueError, match=f'no depth {depth}: valid depths are {valid}'):
    model.num_features  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match='valid depths'):
    shapes(model)


@pytest.mark.parametrize('kwargs, match', [
    (dict(depth=50.0), 'depth must be an int'),
    (dict(stem='resnet'), "Unknown stem 'resnet'"),
    (dict(num_classes=0), 'num_classes must be a positive int'),
    (dict(dropout_rate=1.0), 'dropout_rate'),
])
def test_invalid_fields(kwargs, match):
  model = PyConvResNet(**{'depth': 18, 'num_classes': 10, **kwargs})
  with pytest.raises(ValueError, match=match):
    shapes(model, 32)


@pytest.mark.parametrize('shape', [(2, 32, 32), (2, 3, 32, 32), (2, 32, 32, 4)])
def test_input_must_be_nhwc_with_1_or_3_channels(shape):
  model = PyConvResNet(depth=18, num_classes=10, stem='cifar')
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  with pytest.raises(ValueError, match='PyConvResNet expects NHWC images'):
    jax.eval_shape(model.init, jax.random.key(0), x)


@pytest.mark.parametrize('cls, depth, stem, size, spatial', [
    # Ours: no stride in the stem or stage 1.
    (PyConvResNet, 18, 'cifar', 32, (32, 32, 16, 8, 4)),
    (PyConvResNet, 18, 'cifar', 28, (28, 28, 14, 7, 4)),
    # The paper's: conv7x7/2 and no max-pool, then every stage halves.
    (PyConvResNet, 18, 'imagenet', 64, (32, 16, 8, 4, 2)),
    (PyConvResNet, 50, 'imagenet', 65, (33, 17, 9, 5, 3)),  # Odd: pool and PyConv agree (ceil).
    (PyConvHGResNet, 50, 'imagenet', 64, (32, 16, 8, 4, 2)),
])
def test_features(cls, depth, stem, size, spatial):
  model = cls(depth=depth, num_classes=10, stem=stem)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = shapes(model, size)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, method='features'), variables, x)
  assert set(out) == {'stem', 'stage1', 'stage2', 'stage3', 'stage4', 'pooled'}
  expansion = 1 if depth < 50 else (4 if cls is PyConvResNet else 2)
  widths = [64] + [p * expansion for p in cls.PLANES]
  for key, s, w in zip(['stem', 'stage1', 'stage2', 'stage3', 'stage4'], spatial, widths):
    assert out[key].shape == (2, s, s, w), key
  assert out['pooled'].shape == (2, model.num_features) == (2, widths[-1])
  logits = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_bfloat16_and_remat_keep_the_parameters_and_float32_logits():
  x = jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)
  base = PyConvResNet(depth=18, num_classes=10, stem='cifar')
  reference = jax.tree.map(lambda s: (s.shape, s.dtype), shapes(base, 32, 1))
  for model in (base.clone(dtype=jnp.bfloat16), base.clone(remat=True)):
    variables = shapes(model, 32, 1)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), variables) == reference
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                     rngs={'dropout': jax.random.key(0)}),
                            variables, x)[0]
    assert logits.dtype == jnp.float32


def test_plain_remat_is_exact():
  """nn.checkpoint (the plain levers' remat_call): the same loss, logits, gradients and running
  statistics as without remat."""
  _, variables, x = pyramidnet_reference.tiny_pyconv()
  labels = pyramidnet_reference.labels_for(x)
  results = []
  with levers.using(levers.PLAIN):
    for remat in (False, True):
      model, _, _ = pyramidnet_reference.tiny_pyconv(remat)
      results.append(pyramidnet_reference.training_results(model, variables, x, labels))
  chex.assert_trees_all_equal_structs(*results)
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_from_config_dispatches_on_the_name():
  config = helpers.tiny_config(**{'model.name': 'pyconvhgresnet', 'model.depth': 101,
                                  'model.stem': 'imagenet', 'model.dropout_rate': 0.2,
                                  'model.dtype': 'bfloat16'})
  model = models.from_config(config.model, 1000)
  assert type(model) is PyConvHGResNet
  assert (model.depth, model.num_classes, model.stem, model.dropout_rate, model.dtype) == (
      101, 1000, 'imagenet', 0.2, jnp.bfloat16)
  config.model.name = 'pyconvresnet'
  config.model.depth = 34
  assert type(models.from_config(config.model, 10)) is PyConvResNet
  config.model.name = 'pyramidnet'
  config.model.depth = 8
  assert type(models.from_config(config.model, 10)) is models.PyramidNet
  config.model.name = 'resnet'
  with pytest.raises(ValueError, match="'pyramidnet', 'pyconvresnet', 'pyconvhgresnet'"):
    models.from_config(config.model, 10)
  config.model.name = 'pyconvhgresnet'
  config.model.depth = 34
  with pytest.raises(ValueError, match='valid depths'):
    models.from_config(config.model, 1).num_features  # pylint: disable=expression-not-assigned


def test_one_training_step():
  config = helpers.tiny_config(**{'model.name': 'pyconvresnet', 'model.depth': 18,
                                  'model.stem': 'cifar', 'batch_size': 8, 'eval_batch_size': 8})
  model = models.from_config(config.model, 10)
  learning_rate_fn = optimizer.create_learning_rate_fn(config, steps_per_epoch=1, total_steps=1)
  tx = optimizer.create_optimizer(config, learning_rate_fn)
  runtime = runtime_lib.create_runtime(config, learning_rate_fn)
  state = runtime_lib.create_train_state(config, model, (28, 28, 1), tx, runtime)
  rng = np.random.default_rng(0)
  batch = runtime.put_batch({'image': rng.standard_normal((8, 28, 28, 1), np.float32),
                             'label': rng.integers(0, 10, 8).astype(np.int32)})
  before = {k: np.array(v, copy=True) for k, v in helpers.flat_leaves(
      {'params': state.params, 'batch_stats': state.batch_stats}).items()}  # State is donated.
  # The runtime's own jitted step (shardings, donation), compiled at optimisation level 0.
  step = runtime.train_step.lower(state, batch).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  new_state, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and metrics['loss'] > 0
  assert int(new_state.step) == 1
  after = helpers.flat_leaves({'params': new_state.params, 'batch_stats': new_state.batch_stats})
  assert sorted(after) == sorted(before)
  unchanged = [k for k in before if np.array_equal(before[k], after[k])]
  assert not unchanged, unchanged  # Every level of every PyConv got a gradient.
