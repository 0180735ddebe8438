"""Tests for the streamed ImageNet source (TfdsSplit in pyramidnet_jax.data.tfds_sources) and
the ImageNet transforms (pyramidnet_jax.data.transforms).

ImageNet cannot be downloaded here, so two stand-ins are used:
* tfds.testing.mock_data: the real imagenet2012 builder and features, random JPEGs of 5-50 pixels
  a side and random labels. It ignores split slicing and file shuffling.
* a tiny prepared imagenet2012 data dir written by `write_fake_imagenet`: real TFRecord shards
  read by the real TFDS reader (slicing, shuffled files, interleave). Example i has label
  offset + i and a constant image of value 3 * i % 256, so every example can be identified from
  its label and its pixels.
"""

import os
import types

import chex
import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.data import transforms

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

NUM_MOCK = 64
VALIDATION_OFFSET = 500  # Labels of the fake 'validation' split: 500 + i.
MEAN = np.asarray(transforms.IMAGENET_MEAN, np.float32)
STD = np.asarray(transforms.IMAGENET_STD, np.float32)


def make_config(**overrides):
  fields = dict(dataset='imagenet2012', data_dir='', validation_fraction=0.0, validation_seed=0,
                augment=True)
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def denormalize(images):
  return (images * STD + MEAN) * 255.0


def write_fake_imagenet(data_dir, sizes, num_shards=4, image_size=(40, 30)):
  """A prepared imagenet2012 TFDS data dir with sizes[split] identifiable examples per split."""
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  features = builder.info.features
  out = os.fspath(builder.data_dir)
  os.makedirs(out, exist_ok=True)
  split_infos = []
  for split, count in sizes.items():
    offset = VALIDATION_OFFSET if split == 'validation' else 0
    template = tfds.core.ShardedFileTemplate(
        data_dir=out, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
        dataset_name='imagenet2012', split=split, filetype_suffix='tfrecord')
    bounds = [count * s // num_shards for s in range(num_shards + 1)]
    for shard in range(num_shards):
      path = template.sharded_filepath(shard_index=shard, num_shards=num_shards)
      with tf.io.TFRecordWriter(os.fspath(path)) as writer:
        for i in range(bounds[shard], bounds[shard + 1]):
          image = np.full(image_size + (3,), 3 * i % 256, np.uint8)
          writer.write(features.serialize_example(
              {'image': image, 'label': offset + i, 'file_name': f'{split}_{i}.JPEG'}))
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[bounds[s + 1] - bounds[s] for s in range(num_shards)],
        num_bytes=0, filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(out)
  return data_dir


@pytest.fixture(scope='module')
def fake_dir(tmp_path_factory):
  return write_fake_imagenet(str(tmp_path_factory.mktemp('fake_imagenet')),
                             {'train': 64, 'validation': 40})


@pytest.fixture
def mocked():
  """The mocked imagenet2012 Dataset; batches must be built inside this fixture's test."""
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    yield data.load_dataset(make_config())


def concat(batches, key):
  return np.concatenate([b[key] for b in batches])


def assert_same_batches(expected, actual):
  chex.assert_trees_all_equal(expected, actual)  # Same structure, bit-identical arrays.


# --- Under tfds.testing.mock_data ----------------------------------------------------------


def test_mock_dataset_fields(mocked):
  assert mocked.name == 'imagenet2012' and mocked.num_classes == 1000
  assert len(mocked.class_names) == 1000 and mocked.class_names[0] == 'n01440764'
  assert mocked.mean == transforms.IMAGENET_MEAN and mocked.std == transforms.IMAGENET_STD
  assert mocked.preprocessing == data.preprocessing_of('imagenet2012')
  assert mocked.preprocessing.augmentation == 'imagenet' and mocked.validation is None
  assert isinstance(mocked.train, data.TfdsSplit) and isinstance(mocked.test, data.TfdsSplit)
  assert (mocked.train.split, mocked.test.split) == ('train', 'validation')
  assert len(mocked.train) == len(mocked.test) == NUM_MOCK
  assert mocked.image_shape == (224, 224, 3)
  assert mocked.train.steps_per_epoch(16) == 4 and mocked.train.steps_per_epoch(48) == 1
  with pytest.raises(ValueError, match='imagenet2012 training split has 64 examples, fewer than'):
    mocked.train.steps_per_epoch(128)
  # Streamed batches come in order from tf.data; there is no building one by its index.
  assert not hasattr(mocked.train, 'train_batch')


def test_mock_train_batches_shapes_ranges_and_determinism(mocked):
  full = list(mocked.train.train_batches(16, seed=3, epoch=1))
  assert len(full) == 4
  lowest, highest = (0 - MEAN) / STD, (1 - MEAN) / STD
  for batch in full:
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (16, 224, 224, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
    assert 0 <= batch['label'].min() and batch['label'].max() < 1000
    assert np.all(batch['image'] >= lowest - 1e-3) and np.all(batch['image'] <= highest + 1e-3)
  # Mock pixels are uniform noise in [0, 255): the crops average about half intensity.
  pixels = denormalize(concat(full, 'image')) / 255.0
  assert 0.35 < pixels.mean() < 0.65 and pixels.std() > 0.05

  again = list(mocked.train.train_batches(16, seed=3, epoch=1))
  assert_same_batches(full, again)
  resumed = list(mocked.train.train_batches(16, seed=3, epoch=1, start_index=1))
  assert_same_batches(full[1:], resumed)
  assert list(mocked.train.train_batches(16, seed=3, epoch=1, start_index=4)) == []
  with pytest.raises(ValueError, match='start_index'):
    mocked.train.train_batches(16, seed=3, epoch=1, start_index=5)

  other_epoch = list(mocked.train.train_batches(16, seed=3, epoch=2))
  other_seed = list(mocked.train.train_batches(16, seed=4, epoch=1))
  for other in (other_epoch, other_seed):
    assert not np.array_equal(concat(full, 'label'), concat(other, 'label'))
    # Same examples (mock_data serves all 64 whatever the split), another order.
    np.testing.assert_array_equal(np.sort(concat(full, 'label')), np.sort(concat(other, 'label')))


def test_mock_eval_batches_are_deterministic_and_padded(mocked):
  first = list(mocked.test.eval_batches(24))
  second = list(mocked.test.eval_batches(24))
  assert_same_batches(first, second)
  assert len(first) == 3
  for batch in first:
    assert batch['image'].shape == (24, 224, 224, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == np.float32
  np.testing.assert_array_equal(concat(first, 'mask'), [1.0] * 64 + [0.0] * 8)
  # Padding: label 0 and a black image after normalisation, as in the in-memory path.
  np.testing.assert_array_equal(first[-1]['label'][16:], 0)
  np.testing.assert_allclose(first[-1]['image'][16:], np.broadcast_to(-MEAN / STD,
                                                                      (8, 224, 224, 3)))
  # Eval order is the file order: the same labels as an unshuffled read.
  labels = concat(first, 'label')[:64]
  builder = tfds.builder('imagenet2012')
  np.testing.assert_array_equal(
      labels, [int(x['label']) for x in builder.as_dataset(split='validation')])


def test_mock_unaugmented_training_uses_the_eval_transform():
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    dataset = data.load_dataset(make_config(augment=False))
    assert dataset.preprocessing.augmentation == 'none'
    assert dataset.train.preprocessing.augmentation == 'none'
    plain = list(dataset.train.train_batches(32, seed=0, epoch=0))
    evaluated = list(dataset.test.eval_batches(64))[0]
  # The mock serves the same examples for every split: match them up by label.
  for image, label in zip(concat(plain, 'image'), concat(plain, 'label')):
    candidates = evaluated['image'][evaluated['label'] == label]
    assert any(np.array_equal(image, c) for c in candidates)


def test_mock_validation_hold_out_sizes():
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    dataset = data.load_dataset(make_config(validation_fraction=0.25))
  assert (dataset.validation.start, dataset.validation.stop) == (0, 16)
  assert (dataset.train.start, dataset.train.stop) == (16, 64)
  assert len(dataset.train) == 48 and len(dataset.test) == 64


# --- Missing data --------------------------------------------------------------------------


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    data.load_dataset(make_config(data_dir=str(tmp_path)))
  message = str(error.value)
  for part in ('manual download', 'ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
               os.path.join(str(tmp_path), 'downloads', 'manual'),
               'tfds build imagenet2012 --data_dir=DIR', '--config.data_dir=DIR'):
    assert part in message


# --- On a prepared (fake) data dir: the real TFDS reader -----------------------------------


def example_ids(batches):
  """Example ids from the constant pixel values, checked against the labels they came with."""
  batches = list(batches)
  labels = concat(batches, 'label')
  mask = concat(batches, 'mask') if 'mask' in batches[0] else np.ones(len(labels))
  pixels = denormalize(concat(batches, 'image'))
  labels = labels[mask == 1]
  pixels = pixels[mask == 1]
  # Constant images stay constant through crops, resizes and flips (up to JPEG rounding).
  assert np.abs(pixels - pixels.mean(axis=(1, 2, 3), keepdims=True)).max() < 2.0
  np.testing.assert_allclose(pixels.mean(axis=(1, 2, 3)), 3 * (labels % VALIDATION_OFFSET) % 256,
                             atol=2.0)
  return labels


def test_fake_dir_epoch_order_is_a_function_of_seed_and_epoch(fake_dir):
  dataset = data.load_dataset(make_config(data_dir=fake_dir))
  assert len(dataset.train) == 64 and len(dataset.test) == 40
  epoch = lambda e, **kw: list(dataset.train.train_batches(8, seed=0, epoch=e, **kw))
  first = epoch(0)
  ids = example_ids(first)
  assert sorted(ids) == list(range(64))  # Every example once.
  assert_same_batches(first, epoch(0))
  assert_same_batches(first[5:], epoch(0, start_index=5))
  assert not np.array_equal(ids, example_ids(epoch(1)))


def test_fake_dir_process_shards_are_disjoint_and_cover_the_split(fake_dir):
  shards = [data.load_dataset(make_config(data_dir=fake_dir), process_index=i, process_count=3)
            for i in range(3)]
  assert [d.train.shard_range() for d in shards] == [(0, 21), (21, 42), (42, 64)]
  # Global batch 12 = 4 per process; every process takes 21 // 4 steps.
  assert {d.train.steps_per_epoch(12) for d in shards} == {5}
  with pytest.raises(ValueError, match='divisible'):
    shards[0].train.steps_per_epoch(10)

  evaluated = [list(d.test.eval_batches(12)) for d in shards]
  # ceil(14 / 4) on every process.
  assert {len(batches) for batches in evaluated} == {d.test.eval_steps(12) for d in shards} == {4}
  eval_ids = [example_ids(batches) for batches in evaluated]
  np.testing.assert_array_equal(np.concatenate(eval_ids), VALIDATION_OFFSET + np.arange(40))

  trained = [example_ids(d.train.train_batches(12, seed=1, epoch=0)) for d in shards]
  for (begin, end), ids in zip([d.train.shard_range() for d in shards], trained):
    assert len(ids) == 20 and len(set(ids)) == 20 and set(ids) <= set(range(begin, end))


def test_fake_dir_validation_hold_out_is_the_head_of_train(fake_dir):
  dataset = data.load_dataset(make_config(data_dir=fake_dir, validation_fraction=0.25))
  held_out = example_ids(dataset.validation.eval_batches(16))
  np.testing.assert_array_equal(held_out, np.arange(16))
  trained = example_ids(dataset.train.train_batches(16, seed=0, epoch=0))
  assert sorted(trained) == list(range(16, 64))


# --- Transforms ----------------------------------------------------------------------------


def test_train_transform_is_stateless_and_random_across_seeds():
  rng = np.random.default_rng(0)
  jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
  def run(crop, flip):
    return transforms.imagenet_train_transform(jpeg, tf.constant([crop, 0], tf.int64),
                                               tf.constant([flip, 0], tf.int64), MEAN, STD,
                                               size=32).numpy()
  first = run(1, 1)
  assert first.shape == (32, 32, 3) and first.dtype == np.float32
  np.testing.assert_array_equal(first, run(1, 1))
  crops = [run(seed, 0) for seed in range(8)]
  assert len({c.tobytes() for c in crops}) == 8
  flips = [run(1, seed) for seed in range(8)]
  distinct = {f.tobytes() for f in flips}
  assert len(distinct) == 2  # Flipped or not; both happen.
  assert any(np.array_equal(f, first[:, ::-1]) for f in flips)


@pytest.mark.parametrize('height, width', [(300, 400), (400, 300), (100, 150), (256, 256)])
def test_eval_transform_resizes_shorter_side_then_center_crops(height, width):
  # A horizontal ramp: after the center crop the middle column keeps the image's middle value.
  ramp = np.linspace(0, 255, width).round().astype(np.uint8)
  image = np.broadcast_to(ramp[None, :, None], (height, width, 3)).copy()
  jpeg = tf.io.encode_jpeg(image, quality=100)
  out = transforms.imagenet_eval_transform(jpeg, MEAN, STD).numpy()
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  pixels = denormalize(out)
  # The shorter side becomes 256: one output pixel spans 1 / scale input pixels of the ramp.
  scale = 256 / min(height, width)
  expected_span = 223 * 255 / ((width - 1) * scale)
  span = pixels[112, -1, 0] - pixels[112, 0, 0]
  assert abs(span - expected_span) < 3.0
  assert abs(pixels[112, 111:113, 0].mean() - 127.5) < 3.0  # Centered.


# --- The Torch recipe's colour augmentation (fb.resnet.torch ColorJitter + Lighting) --------


def seed_tensor(*words):
  return tf.constant(words, tf.int64)


def numpy_color_jitter(image, alphas, order):
  """fb.resnet.torch's Brightness / Contrast / Saturation blends, in the given order."""
  grey_weights = np.asarray(transforms.GREY_WEIGHTS, np.float64)
  out = image.astype(np.float64)
  for op in order:
    alpha = float(alphas[op])
    grey = out @ grey_weights
    other = [np.zeros_like(out), np.full_like(out, grey.mean()), grey[..., None]][op]
    out = out * alpha + other * (1.0 - alpha)
  return out


def test_color_jitter_follows_torch_and_is_deterministic():
  image = np.random.default_rng(0).uniform(0, 255, (6, 5, 3)).astype(np.float32)
  outputs, orders = [], set()
  for s in range(12):
    out = transforms.torch_color_augment(tf.constant(image), 0.4, 0.0, seed_tensor(s, 7),
                                         None).numpy()
    alphas, order = (x.numpy() for x in transforms.color_jitter_params(0.4, seed_tensor(s, 7)))
    assert np.all((alphas >= 0.6) & (alphas <= 1.4)) and sorted(order) == [0, 1, 2]
    orders.add(tuple(order))
    np.testing.assert_allclose(out, numpy_color_jitter(image, alphas, order), rtol=1e-5,
                               atol=1e-3)
    assert np.isfinite(out).all() and not np.allclose(out, image, atol=0.5)
    np.testing.assert_array_equal(
        out, transforms.torch_color_augment(tf.constant(image), 0.4, 0.0, seed_tensor(s, 7),
                                            None).numpy())
    outputs.append(out.tobytes())
  assert len(set(outputs)) == 12 and len(orders) >= 3  # Random factors, random order.
  # Off: the very same pixels, whatever the seeds.
  same = transforms.torch_color_augment(tf.constant(image), 0.0, 0.0, seed_tensor(1, 1),
                                        seed_tensor(2, 2))
  np.testing.assert_array_equal(same.numpy(), image)


def test_pca_lighting_adds_the_pca_offset_per_channel():
  eigval = np.asarray(transforms.PCA_EIGVAL)
  eigvec = np.asarray(transforms.PCA_EIGVEC)
  np.testing.assert_allclose(eigval, [0.2175, 0.0188, 0.0045])
  image = np.random.default_rng(1).uniform(0, 255, (4, 4, 3)).astype(np.float32)
  offsets = []
  for s in range(4):
    seed = seed_tensor(s, 3)
    alpha = tf.random.stateless_normal((3,), seed=seed).numpy().astype(np.float64) * 0.1
    expected = eigvec @ (alpha * eigval)  # rgb[i] = sum_j eigvec[i, j] * alpha[j] * eigval[j].
    np.testing.assert_allclose(transforms.pca_lighting_offset(0.1, seed).numpy(), expected,
                               atol=1e-6)
    out = transforms.torch_color_augment(tf.constant(image), 0.0, 0.1, None, seed).numpy()
    np.testing.assert_allclose(out - image, np.broadcast_to(255 * expected, image.shape),
                               atol=1e-3)
    offsets.append(expected)
  assert len({o.tobytes() for o in offsets}) == 4
  # Through the train transform: the offset is added before normalisation, so the normalised
  # image moves by offset / std in each channel.
  jpeg = tf.io.encode_jpeg(image.astype(np.uint8))
  def transform(lighting):
    return transforms.imagenet_train_transform(jpeg, seed_tensor(1, 0), seed_tensor(2, 0), MEAN,
                                               STD, size=16, pca_lighting=lighting,
                                               lighting_seed=seed_tensor(0, 3)).numpy()
  np.testing.assert_allclose(transform(0.1) - transform(0.0),
                             np.broadcast_to(offsets[0] / STD, (16, 16, 3)), atol=1e-4)


def test_mock_color_augmentation_and_image_size_through_the_pipeline():
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    colour = data.load_dataset(make_config(image_size=48, color_jitter=0.4, pca_lighting=0.1))
    for split in colour.splits().values():
      assert (split.preprocessing.color_jitter, split.preprocessing.pca_lighting) == (0.4, 0.1)
    assert colour.image_shape == (48, 48, 3)
    plain = colour.with_preprocessing(color_jitter=0.0, pca_lighting=0.0)
    first = lambda d: next(d.train.train_batches(16, seed=5, epoch=0))
    coloured, again, grey = first(colour), first(colour), first(plain)
    evaluated = next(colour.test.eval_batches(16))
  assert coloured['image'].shape == evaluated['image'].shape == (16, 48, 48, 3)
  assert_same_batches([coloured], [again])
  np.testing.assert_array_equal(grey['label'], coloured['label'])  # Same examples and crops.
  assert np.isfinite(coloured['image']).all()
  differs = np.abs(coloured['image'] - grey['image']).mean(axis=(1, 2, 3))
  assert np.all(differs > 1e-3)
