"""Tests for load_dataset's dispatch on dataset names (pyramidnet_jax.data.registry): CIFAR
under mocked TFDS, the errors for missing or unknown data and misplaced options, the per-name
preprocessing, and that importing the package loads no TensorFlow."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.data import fashion_mnist
from pyramidnet_jax.data import tfds_sources
from pyramidnet_jax.data import transforms


def make_config(**overrides):
  fields = dict(dataset='fashion_mnist', data_dir='', validation_fraction=0.0, validation_seed=0,
                augment=True)
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_loads_under_tfds_mock(name, num_classes, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=40):
    dataset = data.load_dataset(make_config(dataset=name, data_dir=str(tmp_path),
                                            validation_fraction=0.25))
  assert dataset.name == name and dataset.num_classes == num_classes
  assert len(dataset.class_names) == num_classes
  assert all(isinstance(n, str) for n in dataset.class_names)
  assert dataset.test.images.shape == (40, 32, 32, 3)
  assert len(dataset.train) + len(dataset.validation) == 40 and len(dataset.validation) > 0
  for split in (dataset.train, dataset.validation, dataset.test):
    assert isinstance(split, data.ArraySplit)
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)
    assert split.labels.dtype == np.int32
    assert 0 <= split.labels.min() and split.labels.max() < num_classes
  assert dataset.mean == tfds_sources.CIFAR_MEAN and dataset.std == tfds_sources.CIFAR_STD
  assert dataset.preprocessing.augmentation == 'cifar'
  batch = dataset.train.train_batch(8, seed=0, epoch=0, index=0)
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8


def test_missing_cifar_says_tfds_build(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(FileNotFoundError, match='tfds build cifar10') as error:
    data.load_dataset(make_config(dataset='cifar10', data_dir=str(tmp_path)))
  assert '--config.data_dir' in str(error.value)


def test_imagenet_and_unknown_datasets_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='manual download'):
    data.load_dataset(make_config(dataset='imagenet2012', data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match='Unknown dataset'):
    data.load_dataset(make_config(dataset='mnist'))


def test_streaming_only_options_are_refused_for_in_memory_datasets():
  for field, value in (('color_jitter', 0.4), ('pca_lighting', 0.1), ('image_size', 64)):
    with pytest.raises(ValueError, match='imagenet2012 and folder:ROOT datasets only'):
      data.load_dataset(make_config(dataset='cifar10', **{field: value}))
  with pytest.raises(ValueError, match='bad_images'):
    data.load_dataset(make_config(bad_images='maybe'))


def test_preprocessing_of_names_without_loading():
  assert data.preprocessing_of('fashion_mnist') == data.Preprocessing(
      fashion_mnist.MEAN, fashion_mnist.STD, 'fashion_mnist')
  for name in ('cifar10', 'cifar100'):
    assert data.preprocessing_of(name) == data.Preprocessing(
        tfds_sources.CIFAR_MEAN, tfds_sources.CIFAR_STD, 'cifar')
  for name in ('imagenet2012', 'folder:/any/where'):
    streamed = data.preprocessing_of(name, 160)
    assert (streamed.mean, streamed.std) == (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    assert (streamed.image_size, streamed.resize_size) == (160, 183)
    assert (streamed.color_jitter, streamed.pca_lighting) == (0.0, 0.0)
  assert data.preprocessing_of('imagenet2012').resize_size == 256
  for name in (None, 'mnist'):
    with pytest.raises(ValueError, match='Unknown dataset'):
      data.preprocessing_of(name)
  with pytest.raises(ValueError, match='1 channel'):
    data.eval_transform('fashion_mnist', channels=3)
  with pytest.raises(ValueError, match='Unknown dataset'):
    data.eval_transform(None)


def test_importing_the_package_does_not_import_tensorflow_or_pil():
  code = ('import sys, pyramidnet_jax, pyramidnet_jax.data; '
          'loaded = {m.split(".")[0] for m in sys.modules}; '
          'assert not loaded & {"tensorflow", "tensorflow_datasets", "PIL"}, loaded')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=repo)
