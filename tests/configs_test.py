"""Every experiment config loads the way main.py loads it and describes the paper's network.

Fast: no compilation (num_features only walks the channel schedule / checks the depth).
"""

import math
import os
import re

from absl import flags
from ml_collections import config_flags
import pytest

from configs import default
from pyramidnet_jax import models

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# The paper's final feature dimensions (its tables; jhkim89/PyramidNet README), by file name.
CIFAR_FEATURES = {
    '110_a48': 64, '110_a84': 100, '110_a270': 286,
    '110_a4.75_mul': 76, '110_a8_mul': 128, '110_a27_mul': 432,
    '164_a48': 256, '164_a84': 400, '164_a270': 1144,
    '200_a240': 1024, '236_a220': 944, '272_a200': 864,
}
IMAGENET_FEATURES = {'imagenet_101_a360': 1696, 'imagenet_200_a300': 1456,
                     'imagenet_200_a450': 2056}
PAPER_FEATURES = {
    **{f'{dataset}_{row}': dims for dataset in ('cifar10', 'cifar100')
       for row, dims in CIFAR_FEATURES.items()},
    **IMAGENET_FEATURES,
}
# PyConv (SPEC section 5) ImageNet configs: (config.model.name, depth, README top-1 %).
PYCONV_IMAGENET = {
    'imagenet_pyconvresnet50': ('pyconvresnet', 50, '77.88'),
    'imagenet_pyconvresnet101': ('pyconvresnet', 101, '79.01'),
    'imagenet_pyconvresnet152': ('pyconvresnet', 152, '79.52'),
    'imagenet_pyconvhgresnet50': ('pyconvhgresnet', 50, '78.48'),
}
DEMOS = ['fashion_mnist_demo', 'fashion_mnist_pyconv']
OTHER_FILES = {'__init__', 'default', 'cifar_common', 'imagenet_common', 'pyconv_common',
               *DEMOS}
RUNNABLE = sorted(PAPER_FEATURES) + sorted(PYCONV_IMAGENET) + DEMOS
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000, 'fashion_mnist': 10}
# ml_collections loads config files with the deprecated load_module(); not ours to fix.
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

NAME_RE = re.compile(r'^(cifar10|cifar100|imagenet)_(\d+)_a(\d+(?:\.\d+)?)(_mul)?$')


def load(name):
  """The config as main.py gets it: through ml_collections' config-file flag, by path."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', os.path.join(CONFIG_DIR, f'{name}.py'),
                                  flag_values=flag_values, lock_config=True)
  flag_values(['configs_test'])
  return flag_values.config


def docstring(name):
  with open(os.path.join(CONFIG_DIR, f'{name}.py')) as f:
    source = f.read()
  match = re.match(r'\s*"""(.*?)"""', source, re.S)
  assert match, f'{name}.py has no module docstring'
  return match.group(1)


def key_types(config, prefix=''):
  """{dotted field: type} over the whole nested config."""
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(key_types(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = type(value)
  return out


def test_file_set_is_exactly_the_papers_rows_plus_demo_and_helpers():
  names = {f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py')}
  assert names == set(PAPER_FEATURES) | set(PYCONV_IMAGENET) | OTHER_FILES
  assert len(PAPER_FEATURES) == 27


@pytest.mark.parametrize('name', RUNNABLE)
def test_same_fields_and_types_as_default(name):
  assert key_types(load(name)) == key_types(default.get_config())


@pytest.mark.parametrize('name', RUNNABLE)
def test_docstring_has_the_command(name):
  text = docstring(name)
  # Lines may continue with a backslash; the command must still name this very file.
  command = text.replace('\\\n', ' ')
  assert (f'python -m pyramidnet_jax.main --config=configs/{name}.py' in command), name
  assert '--workdir=runs/' in command, name


@pytest.mark.parametrize('name', sorted(PAPER_FEATURES))
def test_paper_config(name):
  config = load(name)
  model_config = config.model
  dataset, depth, alpha, mul = NAME_RE.match(name).groups()

  # The name says what is inside.
  assert config.dataset == {'imagenet': 'imagenet2012'}.get(dataset, dataset)
  assert model_config.depth == int(depth)
  assert math.isclose(model_config.alpha, float(alpha))
  assert model_config.widening == ('multiplicative' if mul else 'additive')
  assert model_config.stem == ('imagenet' if dataset == 'imagenet' else 'cifar')
  assert model_config.bottleneck == (dataset == 'imagenet' or int(depth) >= 164)
  assert model_config.rounding == 'half_up'
  assert model_config.dtype == 'auto' and model_config.channel_multiple == 'auto'
  # BatchNorm over the authors' per-GPU share (DataParallel): CIFAR-10 on one GPU, CIFAR-100 on
  # 4, ImageNet on 8, each with batch 128.
  assert model_config.bn_group_size == {'cifar10': 0, 'cifar100': 32, 'imagenet': 16}[dataset]

  # It is the network of models.PRESETS of the same name.
  preset = models.PRESETS[name.replace('cifar100_', 'cifar_').replace('cifar10_', 'cifar_')]
  for key, value in preset.items():
    assert model_config[key] == value, (name, key)

  # It builds, with the paper's final feature dimension.
  model = models.from_config(model_config, NUM_CLASSES[config.dataset])
  assert model.num_features == PAPER_FEATURES[name]
  assert model.num_classes == NUM_CLASSES[config.dataset]

  # The recipe.
  assert config.momentum == 0.9 and config.nesterov and config.weight_decay == 1e-4
  assert config.lr_schedule == 'piecewise' and config.lr_decay == 0.1
  assert config.warmup_epochs == 0.0 and config.label_smoothing == 0.0
  assert config.num_train_steps == -1 and config.augment
  assert config.batch_size == 128
  assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0
  if dataset == 'imagenet':
    assert config.learning_rate == 0.05
    assert config.num_epochs == 100 and tuple(config.lr_boundaries) == (30, 60, 90)
    assert model_config.dropout_rate == (0.5 if name == 'imagenet_200_a450' else 0.0)
  else:
    assert config.learning_rate == {'cifar10': 0.1, 'cifar100': 0.5}[dataset]
    assert config.num_epochs == 300 and tuple(config.lr_boundaries) == (150, 225)
    assert model_config.dropout_rate == 0.0 and not model_config.remat


@pytest.mark.parametrize('name', sorted(PYCONV_IMAGENET))
def test_pyconv_imagenet_config(name):
  config = load(name)
  model_name, depth, top1 = PYCONV_IMAGENET[name]
  model_config = config.model
  assert model_config.name == model_name and model_config.depth == depth
  assert model_config.stem == 'imagenet' and model_config.dtype == 'auto'
  assert model_config.bn_group_size == 0  # Their GPU count is not stated: the whole batch.
  assert model_config.dropout_rate == 0.0 and not model_config.remat
  assert config.dataset == 'imagenet2012'
  model = models.from_config(model_config, NUM_CLASSES[config.dataset])
  cls = models.PyConvResNet if model_name == 'pyconvresnet' else models.PyConvHGResNet
  assert type(model) is cls and model.depth == depth and model.stem == 'imagenet'
  assert model.num_features == 2048 and model.num_classes == 1000
  # The authors' recipe (iduta/pyconv args_file.py): plain momentum, no Nesterov.
  assert config.batch_size == 256 and config.learning_rate == 0.1
  assert config.num_epochs == 90 and tuple(config.lr_boundaries) == (30, 60, 80)
  assert config.lr_schedule == 'piecewise' and config.lr_decay == 0.1
  assert config.momentum == 0.9 and not config.nesterov and config.weight_decay == 1e-4
  assert config.warmup_epochs == 0.0 and config.label_smoothing == 0.0
  assert config.num_train_steps == -1 and config.augment
  assert config.eval_batch_size % 8 == 0 and 50_000 % config.eval_batch_size == 0
  assert f'{top1}% top-1' in docstring(name)


def test_fashion_mnist_pyconv_config():
  config = load('fashion_mnist_pyconv')
  assert config.dataset == 'fashion_mnist'
  model = models.from_config(config.model, NUM_CLASSES[config.dataset])
  assert type(model) is models.PyConvResNet
  assert model.depth == 18 and model.stem == 'cifar' and model.num_features == 512
  text = ' '.join(docstring('fashion_mnist_pyconv').split())
  assert 'ours, not the paper' in text and 'accuracy: not measured' in text


def test_dotted_file_name_loads_through_main_flag():
  # A '.' in a module file name is fine because main.py loads configs by path.
  assert load('cifar10_110_a4.75_mul').model.alpha == 4.75


def test_helpers_reject_unknown_dataset():
  from configs import cifar_common
  with pytest.raises(ValueError, match='dataset'):
    cifar_common.get_config(110, 48, dataset='imagenet2012', bottleneck=False)
