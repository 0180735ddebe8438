"""Tests for pyramidnet_jax.input_pipeline on real Fashion-MNIST, mocked TFDS CIFAR and small
hand-made datasets."""

import dataclasses
import gzip
import itertools
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from pyramidnet_jax import input_pipeline as ip

from tests.helpers import FASHION_DIR, HAVE_FASHION, needs_fashion


def make_config(**overrides):
  fields = dict(dataset='fashion_mnist', data_dir='', validation_fraction=0.0, validation_seed=0,
                augment=True)
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def id_dataset(num_examples, height=4, width=4, channels=1, augmentation='none'):
  """A Dataset whose label is the example's id and whose pixels all equal id % 256."""
  ids = np.arange(num_examples, dtype=np.int32)
  images = np.broadcast_to((ids % 256).astype(np.uint8)[:, None, None, None],
                           (num_examples, height, width, channels)).copy()
  split = ip.Split(images=images, labels=ids)
  return ip.Dataset(name='ids', train=split, test=split, validation=None, num_classes=num_examples,
                    class_names=tuple(map(str, ids)), mean=(0.5,) * channels,
                    std=(0.25,) * channels, augmentation=augmentation)


def denormalize(images, mean, std):
  """Back to uint8 pixel values (exact for values that came from uint8)."""
  pixels = (images * np.asarray(std) + np.asarray(mean)) * 255.0
  return np.rint(pixels).astype(np.uint8)


def crop_candidates(image, padding):
  """Every crop (and its mirror) of the zero-padded image, shape (K, H, W, C)."""
  height, width = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  crops = []
  for top, left in itertools.product(range(2 * padding + 1), repeat=2):
    crop = padded[top:top + height, left:left + width]
    crops += [crop, crop[:, ::-1]]
  return np.stack(crops)


def matching_candidates(image, candidates):
  return np.flatnonzero((candidates == image[None]).all(axis=(1, 2, 3)))


# --- Fashion-MNIST (real files) ---------------------------------------------------------------


@pytest.fixture(scope='module')
def fashion():
  if not HAVE_FASHION:
    pytest.skip('needs `apt-get install dataset-fashion-mnist`')
  return ip.load_dataset(make_config())


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
  assert fashion.augmentation == 'fashion_mnist'
  # Real images, not blank: the mean pixel of the training set is about 0.286.
  assert 0.2 < fashion.train.images.mean() / 255 < 0.4


@needs_fashion
def test_fashion_mnist_mean_std_match_training_set(fashion):
  pixels = fashion.train.images.astype(np.float64) / 255.0
  assert abs(pixels.mean() - fashion.mean[0]) < 5e-4
  assert abs(pixels.std() - fashion.std[0]) < 5e-4


@needs_fashion
def test_fashion_mnist_validation_from_config_and_augment_off():
  dataset = ip.load_dataset(make_config(validation_fraction=0.1, validation_seed=3, augment=False))
  assert len(dataset.train) == 54000 and len(dataset.validation) == 6000
  np.testing.assert_array_equal(np.bincount(dataset.validation.labels), [600] * 10)
  assert dataset.augmentation == 'none'
  assert len(dataset.test) == 10000


def test_missing_fashion_mnist_dir_mentions_apt_get(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist') as error:
    ip.load_dataset(make_config(data_dir=str(tmp_path)))
  assert '--config.data_dir' in str(error.value)


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_damaged_files(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  good = str(tmp_path / 'good-idx3-ubyte.gz')
  write_idx(good, array)
  np.testing.assert_array_equal(ip.read_idx(good), array)

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
      ip.read_idx(path)


@needs_fashion
def test_corrupt_fashion_mnist_file_is_named(tmp_path):
  for pair in ip.FASHION_MNIST_FILES.values():
    for name in pair:
      shutil.copy(os.path.join(FASHION_DIR, name), tmp_path / name)
  with gzip.open(tmp_path / 't10k-labels-idx1-ubyte.gz', 'wb') as f:
    f.write(bytes([0, 0, 8, 1]) + np.asarray([10000], '>u4').tobytes() + b'\x01' * 100)
  with pytest.raises(ValueError, match='t10k-labels-idx1-ubyte.gz'):
    ip.load_dataset(make_config(data_dir=str(tmp_path)))


# --- Training batches ----------------------------------------------------------------------


def test_steps_per_epoch_drops_remainder():
  assert ip.steps_per_epoch(id_dataset(103), 10) == 10
  with pytest.raises(ValueError, match='fewer than one batch'):
    ip.steps_per_epoch(id_dataset(5), 10)


def test_train_batch_is_pure_function_of_seed_epoch_index():
  dataset = id_dataset(200, augmentation='cifar')
  first = ip.train_batch(dataset, 16, seed=7, epoch=3, index=2, augment=True)
  again = ip.train_batch(dataset, 16, seed=7, epoch=3, index=2, augment=True)
  assert first['image'].dtype == np.float32 and first['image'].shape == (16, 4, 4, 1)
  assert first['label'].dtype == np.int32 and first['label'].shape == (16,)
  np.testing.assert_array_equal(first['image'], again['image'])
  np.testing.assert_array_equal(first['label'], again['label'])
  other_epoch = ip.train_batch(dataset, 16, seed=7, epoch=4, index=2, augment=True)
  other_seed = ip.train_batch(dataset, 16, seed=8, epoch=3, index=2, augment=True)
  other_index = ip.train_batch(dataset, 16, seed=7, epoch=3, index=3, augment=True)
  for other in (other_epoch, other_seed, other_index):
    assert not np.array_equal(first['label'], other['label'])


def test_augmentation_randomness_differs_per_batch_and_epoch():
  # All examples share one image, so batches differ only through their augmentation.
  image = np.arange(1, 65, dtype=np.uint8).reshape(8, 8, 1)
  split = ip.Split(images=np.repeat(image[None], 64, axis=0), labels=np.zeros(64, np.int32))
  dataset = ip.Dataset(name='same', train=split, test=split, validation=None, num_classes=1,
                       class_names=('x',), mean=(0.5,), std=(0.25,), augmentation='cifar')
  images = [ip.train_batch(dataset, 16, seed=0, epoch=e, index=i, augment=True)['image']
            for e, i in [(0, 0), (0, 1), (1, 0)]]
  assert not np.array_equal(images[0], images[1])
  assert not np.array_equal(images[0], images[2])


def test_resumed_epoch_equals_tail_of_full_epoch():
  dataset = id_dataset(130, height=8, width=8, channels=3, augmentation='cifar')
  full = list(ip.train_batches(dataset, 8, seed=1, epoch=5, augment=True))
  inline = list(ip.train_batches(dataset, 8, seed=1, epoch=5, augment=True, prefetch=0))
  resumed = list(ip.train_batches(dataset, 8, seed=1, epoch=5, augment=True, start_index=11))
  assert len(full) == len(inline) == ip.steps_per_epoch(dataset, 8) == 16
  assert len(resumed) == 5
  for expected, actual in zip(full, inline):
    np.testing.assert_array_equal(expected['image'], actual['image'])
  for expected, actual in zip(full[11:], resumed):
    np.testing.assert_array_equal(expected['image'], actual['image'])
    np.testing.assert_array_equal(expected['label'], actual['label'])
  assert list(ip.train_batches(dataset, 8, seed=1, epoch=5, augment=True, start_index=16)) == []
  with pytest.raises(ValueError, match='start_index'):
    ip.train_batches(dataset, 8, seed=1, epoch=5, augment=True, start_index=17)


def test_every_example_once_per_epoch_with_its_own_image():
  dataset = id_dataset(103)
  seen_per_epoch = []
  for epoch in range(3):
    batches = list(ip.train_batches(dataset, 10, seed=0, epoch=epoch, augment=False))
    labels = np.concatenate([b['label'] for b in batches])
    assert len(labels) == 100 and len(np.unique(labels)) == 100
    for batch in batches:  # Unaugmented images stay with their labels.
      pixels = denormalize(batch['image'], dataset.mean, dataset.std)
      np.testing.assert_array_equal(pixels, np.broadcast_to(
          (batch['label'] % 256).astype(np.uint8)[:, None, None, None], pixels.shape))
    seen_per_epoch.append(labels)
  assert not np.array_equal(seen_per_epoch[0], seen_per_epoch[1])


def test_abandoned_prefetching_iterator_stops():
  dataset = id_dataset(1000)
  batches = ip.train_batches(dataset, 10, seed=0, epoch=0, augment=False, prefetch=3)
  next(batches)
  batches.close()  # Must return promptly, not build the rest of the epoch or hang.


# --- Augmentation and normalisation --------------------------------------------------------


def test_random_crop_and_flip_take_values_only_from_padded_image():
  image = np.arange(1, 37, dtype=np.uint8).reshape(6, 6, 1)  # Distinct, non-zero pixels.
  images = np.broadcast_to(image, (400, 6, 6, 1))
  out = ip.random_crop_and_flip(images, 2, np.random.default_rng(0))
  assert out.shape == images.shape and out.dtype == np.uint8
  candidates = crop_candidates(image, 2)  # 25 offsets x {plain, mirrored}, all distinct.
  hits = [matching_candidates(o, candidates) for o in out]
  assert all(len(h) == 1 for h in hits)
  used = np.concatenate(hits)
  assert len(np.unique(used)) > 40  # Offsets and flips all get used...
  assert 0.4 < np.mean(used % 2) < 0.6  # ...and about half the crops are mirrored.


def test_cifar_augmentation_through_train_batch():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(64, 32, 32, 3), dtype=np.uint8)
  split = ip.Split(images=images, labels=np.arange(64, dtype=np.int32))
  dataset = ip.Dataset(name='c', train=split, test=split, validation=None, num_classes=64,
                       class_names=tuple(map(str, range(64))), mean=ip.CIFAR_MEAN,
                       std=ip.CIFAR_STD, augmentation='cifar')
  batch = ip.train_batch(dataset, 32, seed=0, epoch=0, index=1, augment=True)
  pixels = denormalize(batch['image'], ip.CIFAR_MEAN, ip.CIFAR_STD)
  for pixel_image, label in zip(pixels, batch['label']):
    assert len(matching_candidates(pixel_image, crop_candidates(images[label], 4))) == 1
  # Padding is zero before normalisation, so it shows up as (0 - mean) / std.
  padding_value = -np.asarray(ip.CIFAR_MEAN, np.float32) / np.asarray(ip.CIFAR_STD, np.float32)
  assert np.isclose(batch['image'], padding_value, atol=1e-6).all(axis=-1).any()
  plain = ip.train_batch(dataset, 32, seed=0, epoch=0, index=1, augment=False)
  np.testing.assert_array_equal(plain['label'], batch['label'])
  np.testing.assert_allclose(plain['image'], ip.normalize(images[batch['label']], ip.CIFAR_MEAN,
                                                          ip.CIFAR_STD))


def test_normalize_math():
  images = np.array([0, 1, 128, 255], np.uint8).reshape(1, 2, 2, 1).repeat(3, axis=-1)
  images[..., 1] = 255 - images[..., 1]
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  out = ip.normalize(images, mean, std)
  assert out.dtype == np.float32 and out.shape == images.shape
  expected = (images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
  assert np.isclose(out[0, 0, 0, 0], -0.1 / 0.2) and np.isclose(out[0, 1, 1, 2], (1 - 0.9) / 0.4)


# --- Evaluation batches and validation split ------------------------------------------------


def test_eval_batches_cover_every_example_once_with_mask():
  split = id_dataset(23).train
  batches = list(ip.eval_batches(split, 5, mean=(0.5,), std=(0.25,)))
  assert len(batches) == 5
  for batch in batches:
    assert batch['image'].shape == (5, 4, 4, 1) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == np.float32
  masks = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(masks, [1.0] * 23 + [0.0] * 2)
  np.testing.assert_array_equal(labels[masks == 1], np.arange(23))
  last_pixels = denormalize(batches[-1]['image'], (0.5,), (0.25,))
  np.testing.assert_array_equal(last_pixels[:3, 0, 0, 0], [20, 21, 22])
  exact = list(ip.eval_batches(split, 23, mean=(0.5,), std=(0.25,)))
  assert len(exact) == 1 and exact[0]['mask'].all()
  with pytest.raises(ValueError, match='batch_size'):
    ip.eval_batches(split, 0, mean=(0.5,), std=(0.25,))


def test_split_validation_is_stratified_disjoint_and_deterministic():
  labels = np.repeat(np.arange(3, dtype=np.int32), [100, 50, 30])
  ids = np.arange(len(labels))
  images = np.stack([ids // 256, ids % 256], axis=-1).astype(np.uint8)[:, None, None, :]
  split = ip.Split(images=images, labels=labels)

  def example_ids(part):
    return part.images[:, 0, 0, 0].astype(int) * 256 + part.images[:, 0, 0, 1]

  train, validation = ip.split_validation(split, 0.2, seed=4)
  np.testing.assert_array_equal(np.bincount(validation.labels), [20, 10, 6])
  np.testing.assert_array_equal(np.bincount(train.labels), [80, 40, 24])
  train_ids, validation_ids = example_ids(train), example_ids(validation)
  assert not set(train_ids) & set(validation_ids)
  np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, validation_ids])), ids)
  np.testing.assert_array_equal(labels[validation_ids], validation.labels)  # Pairs kept.

  _, same = ip.split_validation(split, 0.2, seed=4)
  _, different = ip.split_validation(split, 0.2, seed=5)
  np.testing.assert_array_equal(example_ids(same), validation_ids)
  assert not np.array_equal(example_ids(different), validation_ids)
  with pytest.raises(ValueError):
    ip.split_validation(split, 0.0, seed=0)


# --- CIFAR via TFDS ------------------------------------------------------------------------


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_loads_under_tfds_mock(name, num_classes, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=40):
    dataset = ip.load_dataset(make_config(dataset=name, data_dir=str(tmp_path),
                                          validation_fraction=0.25))
  assert dataset.name == name and dataset.num_classes == num_classes
  assert len(dataset.class_names) == num_classes
  assert all(isinstance(n, str) for n in dataset.class_names)
  assert dataset.test.images.shape == (40, 32, 32, 3)
  assert len(dataset.train) + len(dataset.validation) == 40 and len(dataset.validation) > 0
  for split in (dataset.train, dataset.validation, dataset.test):
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)
    assert split.labels.dtype == np.int32
    assert 0 <= split.labels.min() and split.labels.max() < num_classes
  assert dataset.mean == ip.CIFAR_MEAN and dataset.std == ip.CIFAR_STD
  assert dataset.augmentation == 'cifar'
  batch = ip.train_batch(dataset, 8, seed=0, epoch=0, index=0, augment=True)
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32


def test_missing_cifar_says_tfds_build(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(FileNotFoundError, match='tfds build cifar10') as error:
    ip.load_dataset(make_config(dataset='cifar10', data_dir=str(tmp_path)))
  assert '--config.data_dir' in str(error.value)


def test_imagenet_and_unknown_datasets_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='manual download'):
    ip.load_dataset(make_config(dataset='imagenet2012', data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match='Unknown dataset'):
    ip.load_dataset(make_config(dataset='mnist'))


def test_streaming_only_options_are_refused_for_in_memory_datasets():
  for field, value in (('color_jitter', 0.4), ('pca_lighting', 0.1), ('image_size', 64)):
    with pytest.raises(ValueError, match='imagenet2012 and folder:ROOT datasets only'):
      ip.load_dataset(make_config(dataset='cifar10', **{field: value}))
  with pytest.raises(ValueError, match='bad_images'):
    ip.load_dataset(make_config(bad_images='maybe'))
  dataset = id_dataset(4)
  assert (dataset.color_jitter, dataset.pca_lighting) == (0.0, 0.0)
  with pytest.raises(ValueError, match='color_jitter'):
    dataclasses.replace(dataset, color_jitter=-0.1)


def test_importing_the_package_does_not_import_tensorflow():
  code = ('import sys, pyramidnet_jax, pyramidnet_jax.input_pipeline; '
          'assert not any(m.split(".")[0] in ("tensorflow", "tensorflow_datasets") '
          'for m in sys.modules), "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
