"""config_checks.validate: every field of a training config, checked before anything runs.

The command-line side (one `error:` line through `python -m pyramidnet_jax.main`) is in
tests/cli_errors_test.py for a representative subset; here every rule is checked directly.
"""

import ml_collections
import pytest

from configs import default
from pyramidnet_jax.training import config_checks
from pyramidnet_jax.training import runtime
from tests import configs_test

pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')


def config_with(fields):
  """configs/default.py with `fields` ({dotted name: value}) set, types unchecked: a config
  built in code may hold any type, which only validate then catches."""
  config = ml_collections.ConfigDict(default.get_config().to_dict(), type_safe=False)
  for name, value in fields.items():
    target = config
    *parents, leaf = name.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def test_the_rules_cover_exactly_the_fields_of_the_default_config():
  fields = set(configs_test.key_types(default.get_config()))
  assert {rule.field for rule in config_checks.RULES} == fields


@pytest.mark.parametrize('name', configs_test.RUNNABLE)
def test_every_shipped_config_is_valid(name):
  config_checks.validate(configs_test.load(name))


# (field, bad value, words the message must hold). The first rows are the issue's: each was
# accepted before and then divided by zero, raised a TypeError or trained something else.
BAD_FIELDS = [
    ('checkpoint_every_steps', 0, 'a whole number >= 1'),
    ('log_every_steps', 0, 'a whole number >= 1'),
    ('checkpoints_to_keep', 0, 'a whole number >= 1'),
    ('lr_boundaries', ('abc',), 'non-negative, strictly increasing numbers'),
    ('num_epochs', 0, 'must be >= 1 unless config.num_train_steps > 0'),
    ('learning_rate', -0.1, 'a number > 0'),
    ('momentum', 2.0, 'a number in [0, 1)'),
    ('label_smoothing', 5.0, 'a number in [0, 1)'),
    ('weight_decay', -1e-4, 'a number >= 0'),
    ('lr_boundaries', (225, 150), 'strictly increasing'),
    ('lr_boundaries', (-1,), 'non-negative'),
    ('lr_decay', 0.0, 'a number > 0'),
    ('warmup_epochs', -1.0, 'a number >= 0'),
    ('batch_size', 0, 'a whole number >= 1'),
    ('eval_batch_size', -4, 'a whole number >= 1'),
    ('num_epochs', 2.5, 'a whole number'),
    ('validation_fraction', 1.0, 'a number in [0, 1)'),
    ('early_stopping_patience', -1, 'a whole number >= 0'),
    ('early_stopping_min_delta', -0.1, 'a number >= 0'),
    ('learning_rate', float('nan'), 'a number > 0'),
    ('lr_schedule', 'linear', "one of 'piecewise', 'cosine'"),
    ('model.name', 'resnet', "one of 'pyramidnet', 'pyconvresnet', 'pyconvhgresnet'"),
    ('model.dtype', 'float16', "one of 'auto', 'bfloat16', 'float32'"),
    ('model.widening', 'linear', "one of 'additive', 'multiplicative'"),
    ('model.alpha', 0.0, 'a number > 0'),
    ('model.dropout_rate', 1.0, 'a number in [0, 1)'),
    ('model.channel_multiple', 0, "'auto' or a whole number >= 1"),
    ('model.channel_multiple', 8.0, "'auto' or a whole number >= 1"),  # PyramidNet needs an int.
    ('model.channel_multiple', 'fast', "'auto' or a whole number >= 1"),
    ('model.bn_group_size', -1, 'a whole number >= 0'),
    ('model.bn_group_size', 2.5, 'a whole number >= 0'),
    ('bad_images', 'ignore', "one of 'skip', 'error'"),
    ('cpu_conv', 'mkl', "one of 'auto', 'onednn', 'xla'"),
    ('augment', 'yes', 'True or False'),
    ('nesterov', 1, 'True or False'),
    ('color_jitter', 1.5, 'a number in [0, 1]'),
    ('dataset', 'mnist', "'fashion_mnist'"),
    ('dataset', 'folder:', 'folder:/path/to/root'),
]


@pytest.mark.parametrize('name,value,allowed', BAD_FIELDS,
                         ids=[f'{n}={v}' for n, v, _ in BAD_FIELDS])
def test_a_bad_field_is_refused_naming_it_its_value_and_the_range(name, value, allowed):
  with pytest.raises(ValueError) as error:
    config_checks.validate(config_with({name: value}))
  message = str(error.value)
  assert f'config.{name} = {value!r}' in message
  assert allowed in message
  assert '\n' not in message


def test_every_bad_field_is_named_at_once():
  config = config_with(dict(learning_rate=-1.0, momentum=2.0, log_every_steps=0))
  with pytest.raises(ValueError, match='bad config fields') as error:
    config_checks.validate(config)
  for name in ('learning_rate', 'momentum', 'log_every_steps'):
    assert f'config.{name} =' in str(error.value)


@pytest.mark.parametrize('fields', [
    dict(num_epochs=0, num_train_steps=5),  # Steps instead of epochs.
    dict(lr_boundaries=()), dict(lr_boundaries=(0, 0.5, 2)), dict(momentum=0.0),
    dict(label_smoothing=0.0), dict(weight_decay=0.0), dict(dataset='folder:/data/x'),
    dict(dataset='imagenet2012', image_size=160, color_jitter=0.4, pca_lighting=0.1),
    dict(early_stopping_patience=3, validation_fraction=0.1),
    {'model.dtype': 'bfloat16', 'model.channel_multiple': 8, 'model.bn_group_size': 16},
    {'model.dtype': 'float32', 'model.channel_multiple': 1, 'model.bn_group_size': 128},
    {'model.dtype': 'auto', 'model.channel_multiple': 'auto', 'model.bn_group_size': 0},
], ids=str)
def test_edge_values_that_train_are_accepted(fields):
  config_checks.validate(config_with(fields))


@pytest.mark.parametrize('fields,words', [
    (dict(early_stopping_patience=3), 'needs a validation split'),
    (dict(image_size=160), 'apply to imagenet2012'),
    ({'model.bn_group_size': 48}, 'bn_group_size = 48: must divide config.batch_size = 128'),
])
def test_fields_that_need_another_one_are_refused(fields, words):
  with pytest.raises(ValueError, match=words):
    config_checks.validate(config_with(fields))


def test_an_unknown_or_missing_field_is_refused():
  config = default.get_config()
  config.learning_rte = 0.2  # A typo in a config file would otherwise be ignored.
  del config['momentum']
  with pytest.raises(ValueError) as error:
    config_checks.validate(config)
  assert 'config.learning_rte is not a config field' in str(error.value)
  assert 'config.momentum is missing' in str(error.value)


@pytest.mark.parametrize('group_size,num_devices', [(16, 8), (4, 8), (32, 8), (128, 8), (0, 3)])
def test_bn_groups_within_one_device_or_over_whole_devices_are_accepted(group_size, num_devices):
  runtime.check_bn_groups(group_size, 128, num_devices)


def test_bn_groups_that_straddle_devices_partly_are_refused():
  # 12 examples per device: groups of 8 would take 8 from device 0, then 4 from device 0 and 4
  # from device 1.
  with pytest.raises(ValueError, match=r'bn_group_size=8 straddles devices: each of the 8 '
                     r'devices holds 12 examples .* divides 12'):
    runtime.check_bn_groups(8, 96, 8)
