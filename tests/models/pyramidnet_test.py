"""PyramidNet's configuration against the paper's tables: parameter counts, the parameter tree,
the presets and the errors for a configuration or input the paper has no network for.

Every network here is only traced (jax.eval_shape: shapes, no compile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pyramidnet_jax import PRESETS, PyramidNet, block_widths, create_model
from tests.models import paper_tables
from tests.models.paper_tables import abstract_variables, check_structure, leaf_items, rng

PARAM_COUNTS = paper_tables.PARAM_COUNTS


@pytest.mark.parametrize('name', list(PARAM_COUNTS))
def test_parameter_count(name):
  kwargs, expected = PARAM_COUNTS[name]
  model = PyramidNet(**kwargs)
  variables = abstract_variables(model)
  assert set(variables) == {'params', 'batch_stats'}
  assert paper_tables.count_params(variables['params']) == expected
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
  # Float32 parameters and statistics by default.
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('name', list(PRESETS))
def test_presets(name):
  assert set(PRESETS) == set(paper_tables.NUM_FEATURES)
  model = create_model(name, 100)
  assert isinstance(model, PyramidNet)
  assert model.num_classes == 100
  for key, value in paper_tables.TABLE_CONFIGS[name].items():
    assert getattr(model, key) == value, key
  assert model.num_features == paper_tables.NUM_FEATURES[name]
  if name in PARAM_COUNTS:
    # Same configuration as test_parameter_count, which already traced it in full.
    kwargs, _ = PARAM_COUNTS[name]
    assert all(getattr(model, k) == v for k, v in kwargs.items() if k != 'num_classes')
  else:
    check_structure(model, abstract_variables(model)['params'])
  # Overrides reach the module.
  overridden = create_model(name, 10, dtype=jnp.bfloat16, remat=True)
  assert overridden.remat and overridden.dtype == jnp.bfloat16 and overridden.num_classes == 10


def test_create_model_unknown_preset():
  with pytest.raises(ValueError, match=r"Unknown preset 'cifar_110_a49'.*cifar_110_a48"):
    create_model('cifar_110_a49', 10)


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
    (dict(depth=110.0), r'depth must be an int'),
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
    (dict(num_classes=10, dropout_rate=-0.1), r'dropout_rate must be in \[0, 1\)'),
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


@pytest.mark.parametrize('bad', [0, -16, 1.5, True, '16'])
def test_channel_multiple_is_checked(bad):
  model = PyramidNet(depth=8, alpha=12, num_classes=10, channel_multiple=bad)
  with pytest.raises(ValueError, match='channel_multiple must be an int >= 1'):
    abstract_variables(model)


@pytest.mark.parametrize('stem, expected', [('cifar', (3, 3, 1, 16)), ('imagenet', (7, 7, 1, 64))])
def test_single_channel_input_shapes(stem, expected):
  model = PyramidNet(depth=8 if stem == 'cifar' else 18, alpha=12, num_classes=10, stem=stem)
  x = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
  variables = jax.eval_shape(model.init, rng(), x)
  assert variables['params']['conv1']['kernel'].shape == expected
  check_structure(model, variables['params'], in_channels=1)
  logits = jax.eval_shape(model.apply, variables, x)
  assert (logits.shape, logits.dtype) == ((2, 10), jnp.float32)
