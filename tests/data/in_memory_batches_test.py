"""Tests for in-memory splits (pyramidnet_jax.data.arrays): training and evaluation batches,
augmentation, normalisation, the validation hold-out and each process's slice, on small
hand-made datasets."""

import dataclasses
import itertools
import time

import chex
import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.data import arrays
from pyramidnet_jax.data import tfds_sources
from pyramidnet_jax.data import transforms


def id_split(num_examples, height=4, width=4, channels=1, augmentation='none', **fields):
  """An ArraySplit whose label is the example's id and whose pixels all equal id % 256."""
  ids = np.arange(num_examples, dtype=np.int32)
  images = np.broadcast_to((ids % 256).astype(np.uint8)[:, None, None, None],
                           (num_examples, height, width, channels)).copy()
  preprocessing = data.Preprocessing((0.5,) * channels, (0.25,) * channels, augmentation)
  return data.ArraySplit(images, ids, preprocessing=preprocessing, name='ids', **fields)


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


# --- Training batches ----------------------------------------------------------------------


def test_steps_per_epoch_drops_remainder():
  assert id_split(103).steps_per_epoch(10) == 10
  with pytest.raises(ValueError, match='ids training split has 5 examples, fewer than one batch'):
    id_split(5).steps_per_epoch(10)


def test_train_batch_is_pure_function_of_seed_epoch_index():
  split = id_split(200, augmentation='cifar')
  first = split.train_batch(16, seed=7, epoch=3, index=2)
  again = split.train_batch(16, seed=7, epoch=3, index=2)
  chex.assert_shape(first['image'], (16, 4, 4, 1))
  chex.assert_shape(first['label'], (16,))
  chex.assert_type([first['image'], first['label']], [np.uint8, np.int32])
  chex.assert_trees_all_equal(first, again)
  other_epoch = split.train_batch(16, seed=7, epoch=4, index=2)
  other_seed = split.train_batch(16, seed=8, epoch=3, index=2)
  other_index = split.train_batch(16, seed=7, epoch=3, index=3)
  for other in (other_epoch, other_seed, other_index):
    assert not np.array_equal(first['label'], other['label'])


def test_augmentation_randomness_differs_per_batch_and_epoch():
  # All examples share one image, so batches differ only through their augmentation.
  image = np.arange(1, 65, dtype=np.uint8).reshape(8, 8, 1)
  split = data.ArraySplit(np.repeat(image[None], 64, axis=0), np.zeros(64, np.int32),
                          preprocessing=data.Preprocessing((0.5,), (0.25,), 'cifar'))
  images = [split.train_batch(16, seed=0, epoch=e, index=i)['image']
            for e, i in [(0, 0), (0, 1), (1, 0)]]
  assert not np.array_equal(images[0], images[1])
  assert not np.array_equal(images[0], images[2])


def test_resumed_epoch_equals_tail_of_full_epoch():
  split = id_split(130, height=8, width=8, channels=3, augmentation='cifar')
  full = list(split.train_batches(8, seed=1, epoch=5))
  inline = list(split.train_batches(8, seed=1, epoch=5, prefetch=0))
  resumed = list(split.train_batches(8, seed=1, epoch=5, start_index=11))
  assert len(full) == len(inline) == split.steps_per_epoch(8) == 16
  assert len(resumed) == 5
  chex.assert_trees_all_equal(full, inline)
  chex.assert_trees_all_equal(full[11:], resumed)
  assert list(split.train_batches(8, seed=1, epoch=5, start_index=16)) == []
  with pytest.raises(ValueError, match='start_index'):
    split.train_batches(8, seed=1, epoch=5, start_index=17)
  with pytest.raises(ValueError, match='seed must be a non-negative integer'):
    split.train_batches(8, seed=-1, epoch=5)  # At the call, not at next().


def test_every_example_once_per_epoch_with_its_own_image():
  split = id_split(103)
  seen_per_epoch = []
  for epoch in range(3):
    batches = list(split.train_batches(10, seed=0, epoch=epoch))
    labels = np.concatenate([b['label'] for b in batches])
    assert len(labels) == 100 and len(np.unique(labels)) == 100
    for batch in batches:  # Unaugmented images stay with their labels.
      pixels = batch['image']
      np.testing.assert_array_equal(pixels, np.broadcast_to(
          (batch['label'] % 256).astype(np.uint8)[:, None, None, None], pixels.shape))
    seen_per_epoch.append(labels)
  assert not np.array_equal(seen_per_epoch[0], seen_per_epoch[1])


def test_abandoned_prefetching_iterator_stops(monkeypatch):
  built = []
  real = data.ArraySplit.train_batch
  monkeypatch.setattr(data.ArraySplit, 'train_batch',
                      lambda *args, **kwargs: built.append(kwargs.get('index')) or real(*args,
                                                                                       **kwargs))
  batches = id_split(1000).train_batches(10, seed=0, epoch=0, prefetch=3)
  next(batches)
  batches.close()  # Returns at once: the queued batches are dropped, the epoch not built.
  count = len(built)
  time.sleep(0.2)
  assert len(built) == count <= 1 + 3 + 1  # The one taken, the queue, at most one in flight.


# --- Augmentation and normalisation --------------------------------------------------------


def test_random_crop_and_flip_take_values_only_from_padded_image():
  image = np.arange(1, 37, dtype=np.uint8).reshape(6, 6, 1)  # Distinct, non-zero pixels.
  images = np.broadcast_to(image, (400, 6, 6, 1))
  out = arrays.random_crop_and_flip(images, 2, np.random.default_rng(0))
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
  split = data.ArraySplit(images, np.arange(64, dtype=np.int32),
                          preprocessing=tfds_sources.CIFAR_PREPROCESSING)
  mean, std = tfds_sources.CIFAR_MEAN, tfds_sources.CIFAR_STD
  batch = split.train_batch(32, seed=0, epoch=0, index=1)
  assert batch['image'].dtype == np.uint8  # Normalised on the device.
  for pixel_image, label in zip(batch['image'], batch['label']):
    assert len(matching_candidates(pixel_image, crop_candidates(images[label], 4))) == 1
  # Padding is zero (black); the images themselves have no zero pixel.
  assert (batch['image'] == 0).all(axis=-1).any()
  # Preprocessing augmentation 'none' (config.augment=False): the same examples, uncropped.
  plain = dataclasses.replace(split, preprocessing=dataclasses.replace(
      split.preprocessing, augmentation='none')).train_batch(32, seed=0, epoch=0, index=1)
  np.testing.assert_array_equal(plain['label'], batch['label'])
  np.testing.assert_array_equal(plain['image'], images[batch['label']])
  # image_dtype 'float32': the same pixels, normalised on the host.
  on_host = dataclasses.replace(split, preprocessing=dataclasses.replace(
      split.preprocessing, image_dtype='float32')).train_batch(32, seed=0, epoch=0, index=1)
  assert on_host['image'].dtype == np.float32
  np.testing.assert_array_equal(on_host['image'], transforms.normalize(batch['image'], mean, std))


def test_normalize_math():
  images = np.array([0, 1, 128, 255], np.uint8).reshape(1, 2, 2, 1).repeat(3, axis=-1)
  images[..., 1] = 255 - images[..., 1]
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  out = transforms.normalize(images, mean, std)
  assert out.dtype == np.float32 and out.shape == images.shape
  expected = (images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
  assert np.isclose(out[0, 0, 0, 0], -0.1 / 0.2) and np.isclose(out[0, 1, 1, 2], (1 - 0.9) / 0.4)


def test_preprocessing_and_split_checks():
  with pytest.raises(ValueError, match='color_jitter'):
    data.Preprocessing((0.5,), (0.25,), 'none', color_jitter=-0.1)
  with pytest.raises(ValueError, match='Unknown augmentation'):
    data.Preprocessing((0.5,), (0.25,), 'mixup')
  with pytest.raises(ValueError, match='image_dtype'):
    data.Preprocessing((0.5,), (0.25,), 'none', image_dtype='float16')
  with pytest.raises(ValueError, match='in-memory split takes augmentation'):
    id_split(4, augmentation='imagenet')
  with pytest.raises(ValueError, match='labels must be int32'):
    data.ArraySplit(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64),
                    preprocessing=data.Preprocessing((0.5,), (0.25,), 'none'))
  split = id_split(4)
  dataset = data.Dataset(name='ids', train=split, test=split, validation=None, num_classes=4,
                         class_names=tuple('abcd'), preprocessing=split.preprocessing)
  assert (dataset.mean, dataset.std) == ((0.5,), (0.25,)) and dataset.image_shape == (4, 4, 1)
  plain = dataset.with_preprocessing(augmentation='cifar')
  assert plain.train.preprocessing.augmentation == plain.test.preprocessing.augmentation == 'cifar'
  with pytest.raises(ValueError, match='The test split of ids has preprocessing'):
    dataclasses.replace(dataset, test=plain.test)


# --- Evaluation batches and validation split ------------------------------------------------


def test_eval_batches_cover_every_example_once_with_mask():
  split = id_split(23)
  batches = list(split.eval_batches(5))
  assert len(batches) == 5 == split.eval_steps(5)
  for batch in batches:
    chex.assert_shape(batch['image'], (5, 4, 4, 1))
    chex.assert_type([batch['image'], batch['label'], batch['mask']],
                     [np.uint8, np.int32, np.float32])
  masks = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(masks, [1.0] * 23 + [0.0] * 2)
  np.testing.assert_array_equal(labels[masks == 1], np.arange(23))
  last_pixels = batches[-1]['image']
  np.testing.assert_array_equal(last_pixels[:, 0, 0, 0], [20, 21, 22, 0, 0])  # Black padding.
  exact = list(split.eval_batches(23))
  assert len(exact) == 1 and exact[0]['mask'].all()
  with pytest.raises(ValueError, match='batch_size'):
    split.eval_batches(0)


def test_split_validation_is_stratified_disjoint_and_deterministic():
  labels = np.repeat(np.arange(3, dtype=np.int32), [100, 50, 30])
  ids = np.arange(len(labels))
  images = np.stack([ids // 256, ids % 256], axis=-1).astype(np.uint8)[:, None, None, :]
  split = data.ArraySplit(images, labels,
                          preprocessing=data.Preprocessing((0.5,) * 2, (0.25,) * 2, 'none'))

  def example_ids(part):
    return part.images[:, 0, 0, 0].astype(int) * 256 + part.images[:, 0, 0, 1]

  train, validation = arrays.split_validation(split, 0.2, seed=4)
  np.testing.assert_array_equal(np.bincount(validation.labels), [20, 10, 6])
  np.testing.assert_array_equal(np.bincount(train.labels), [80, 40, 24])
  train_ids, validation_ids = example_ids(train), example_ids(validation)
  assert not set(train_ids) & set(validation_ids)
  np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, validation_ids])), ids)
  np.testing.assert_array_equal(labels[validation_ids], validation.labels)  # Pairs kept.

  _, same = arrays.split_validation(split, 0.2, seed=4)
  _, different = arrays.split_validation(split, 0.2, seed=5)
  np.testing.assert_array_equal(example_ids(same), validation_ids)
  assert not np.array_equal(example_ids(different), validation_ids)
  with pytest.raises(ValueError):
    arrays.split_validation(split, 0.0, seed=0)


# --- Processes: each keeps its contiguous slice of every global batch -----------------------


@pytest.mark.parametrize('count', [2, 4])
def test_process_slices_make_up_the_one_process_batches(count):
  whole = id_split(130, height=8, width=8, channels=3, augmentation='cifar')
  parts = [dataclasses.replace(whole, process_index=i, process_count=count) for i in range(count)]
  assert {p.steps_per_epoch(16) for p in parts} == {whole.steps_per_epoch(16)}
  expected = list(whole.train_batches(16, seed=2, epoch=1, start_index=3))
  sliced = [list(p.train_batches(16, seed=2, epoch=1, start_index=3)) for p in parts]
  for b, batch in enumerate(expected):  # Same pixels: the crops of the whole global batch.
    chex.assert_trees_all_equal(
        batch, {k: np.concatenate([s[b][k] for s in sliced]) for k in batch})
    chex.assert_shape(sliced[0][b]['image'], (16 // count, 8, 8, 3))
  evaluated = list(whole.eval_batches(24))
  eval_sliced = [list(p.eval_batches(24)) for p in parts]
  assert {len(e) for e in eval_sliced} == {len(evaluated)} == {parts[0].eval_steps(24)}
  for b, batch in enumerate(evaluated):
    chex.assert_trees_all_equal(
        batch, {k: np.concatenate([e[b][k] for e in eval_sliced]) for k in batch})
  with pytest.raises(ValueError, match='divisible'):
    parts[0].steps_per_epoch(18 if count == 4 else 15)
  with pytest.raises(ValueError, match='process_index'):
    dataclasses.replace(whole, process_index=count, process_count=count)
