"""Tests for the Fashion-MNIST source (pyramidnet_jax.data.fashion_mnist): the real files, the
IDX reader and damaged files, and load_dataset's hold-out, augment and process options on it."""

import gzip
import os
import shutil
import types

import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.data import fashion_mnist

from tests.helpers import FASHION_DIR, HAVE_FASHION, needs_fashion


def make_config(**overrides):
  fields = dict(dataset='fashion_mnist', data_dir='', validation_fraction=0.0, validation_seed=0,
                augment=True)
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


@pytest.fixture(scope='module')
def fashion():
  if not HAVE_FASHION:
    pytest.skip('needs `apt-get install dataset-fashion-mnist`')
  return data.load_dataset(make_config())


@needs_fashion
def test_fashion_mnist_loads_real_files(fashion):
  assert fashion.train.images.shape == (60000, 28, 28, 1)
  assert fashion.test.images.shape == (10000, 28, 28, 1)
  assert fashion.train.images.dtype == np.uint8 and fashion.train.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(fashion.train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(fashion.test.labels), [1000] * 10)
  assert fashion.num_classes == 10 and len(fashion.class_names) == 10
  assert fashion.class_names[0] == 'T-shirt/top' and fashion.class_names[9] == 'Ankle boot'
  assert fashion.validation is None
  assert fashion.preprocessing.augmentation == 'fashion_mnist'
  assert fashion.preprocessing == data.preprocessing_of('fashion_mnist')
  assert (fashion.train.process_index, fashion.train.process_count) == (0, 1)
  # Real images, not blank: the mean pixel of the training set is about 0.286.
  assert 0.2 < fashion.train.images.mean() / 255 < 0.4


@needs_fashion
def test_fashion_mnist_mean_std_match_training_set(fashion):
  pixels = fashion.train.images.astype(np.float64) / 255.0
  assert abs(pixels.mean() - fashion.mean[0]) < 5e-4
  assert abs(pixels.std() - fashion.std[0]) < 5e-4


@needs_fashion
def test_fashion_mnist_validation_from_config_and_augment_off():
  dataset = data.load_dataset(make_config(validation_fraction=0.1, validation_seed=3,
                                          augment=False))
  assert len(dataset.train) == 54000 and len(dataset.validation) == 6000
  np.testing.assert_array_equal(np.bincount(dataset.validation.labels), [600] * 10)
  for split in (dataset, dataset.train, dataset.validation, dataset.test):
    assert split.preprocessing.augmentation == 'none'
  assert len(dataset.test) == 10000


@needs_fashion
def test_load_dataset_gives_in_memory_splits_the_process():
  dataset = data.load_dataset(make_config(validation_fraction=0.1), process_index=1,
                              process_count=2)
  for split in dataset.splits().values():
    assert (split.process_index, split.process_count) == (1, 2)
  assert len(dataset.train) == 54000  # Every process holds the whole split...
  batch = next(dataset.train.train_batches(64, seed=0, epoch=0))
  assert batch['image'].shape == (32, 28, 28, 1)  # ...and gets its half of each batch.


def test_missing_fashion_mnist_dir_mentions_apt_get(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist') as error:
    data.load_dataset(make_config(data_dir=str(tmp_path)))
  assert '--config.data_dir' in str(error.value)


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_damaged_files(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  good = str(tmp_path / 'good-idx3-ubyte.gz')
  write_idx(good, array)
  np.testing.assert_array_equal(fashion_mnist.read_idx(good), array)

  short_payload = str(tmp_path / 'short-idx3-ubyte.gz')
  with gzip.open(short_payload, 'wb') as f:
    f.write(bytes([0, 0, 8, 3]) + np.asarray([2, 3, 4], '>u4').tobytes() + b'\x00' * 5)
  cut_gzip = str(tmp_path / 'cut-idx3-ubyte.gz')
  with open(good, 'rb') as f:
    compressed = f.read()
  with open(cut_gzip, 'wb') as f:
    f.write(compressed[:len(compressed) // 2])
  bad_magic = str(tmp_path / 'magic-idx3-ubyte.gz')
  with gzip.open(bad_magic, 'wb') as f:
    f.write(b'\x1f\x8bnot an idx file')
  for path in (short_payload, cut_gzip, bad_magic):
    with pytest.raises(ValueError, match=os.path.basename(path)):
      fashion_mnist.read_idx(path)


@needs_fashion
def test_corrupt_fashion_mnist_file_is_named(tmp_path):
  for pair in fashion_mnist.FILES.values():
    for name in pair:
      shutil.copy(os.path.join(FASHION_DIR, name), tmp_path / name)
  with gzip.open(tmp_path / 't10k-labels-idx1-ubyte.gz', 'wb') as f:
    f.write(bytes([0, 0, 8, 1]) + np.asarray([10000], '>u4').tobytes() + b'\x01' * 100)
  with pytest.raises(ValueError, match='t10k-labels-idx1-ubyte.gz'):
    data.load_dataset(make_config(data_dir=str(tmp_path)))
