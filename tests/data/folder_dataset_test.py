"""Tests for image-folder datasets (`--config.dataset=folder:ROOT`, pyramidnet_jax.data.folder).

The tree is generated with PIL: 3 classes, images of mixed sizes and formats (PNG, JPEG, BMP, GIF,
greyscale and RGBA PNGs), one corrupt file in train/ (garbage bytes) and one in val/ (a truncated
PNG), a non-image file that is ignored. Image number k is a constant grey of value 20 + 10 k, so
every example in a batch can be identified from its pixels (crops and resizes keep it constant).
"""

import os
import re
import subprocess
import sys
import types

import chex
import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.data import transforms

tf = pytest.importorskip('tensorflow')
Image = pytest.importorskip('PIL.Image')

CLASSES = ('ant', 'bee', 'cat')
FORMATS = ('png', 'jpg', 'bmp', 'gif', 'grey.png', 'rgba.png')
SIZE = 32
MEAN = np.asarray(transforms.IMAGENET_MEAN, np.float32)
STD = np.asarray(transforms.IMAGENET_STD, np.float32)


def write_image(path, value, height, width, fmt):
  pixels = np.full((height, width, 3), value, np.uint8)
  if fmt == 'grey.png':
    image = Image.fromarray(pixels[..., 0], 'L')
  elif fmt == 'rgba.png':
    image = Image.fromarray(np.concatenate([pixels, np.full_like(pixels[..., :1], 255)], -1),
                            'RGBA')
  else:
    image = Image.fromarray(pixels, 'RGB')
  image.save(path, quality=95) if fmt == 'jpg' else image.save(path)


def write_tree(root):
  """{split: [(path, class index, image id), ...] of the readable images, in file order}."""
  rng = np.random.default_rng(0)
  images = {'train': [], 'val': []}
  next_id = 0
  for split, per_class in (('train', 4), ('val', 2)):
    for label, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name))
      for k in range(per_class):
        fmt = FORMATS[(next_id + label) % len(FORMATS)]
        path = os.path.join(root, split, name, f'img{k}.{fmt}')
        height, width = rng.integers(12, 70, size=2)
        write_image(path, 20 + 10 * next_id, height, width, fmt)
        images[split].append((path, label, next_id))
        next_id += 1
  with open(os.path.join(root, 'train', 'bee', 'zz_corrupt.jpg'), 'wb') as f:
    f.write(b'this is not a JPEG file' * 10)
  with open(images['val'][-1][0], 'rb') as f:  # A real PNG, cut short.
    data = f.read()
  with open(os.path.join(root, 'val', 'cat', 'truncated.png'), 'wb') as f:
    f.write(data[:len(data) // 2])
  with open(os.path.join(root, 'train', 'ant', 'notes.txt'), 'w') as f:
    f.write('not an image')
  os.makedirs(os.path.join(root, 'train', '.hidden'))
  return images


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folder') / 'root')
  return root, write_tree(root)


def make_config(root, **overrides):
  fields = dict(dataset=f'folder:{root}', data_dir='', validation_fraction=0.0,
                validation_seed=0, augment=True, image_size=SIZE, color_jitter=0.0,
                pca_lighting=0.0, bad_images='skip')
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def image_ids(batches):
  """Image ids from the constant pixels, checked against the labels they came with."""
  ids, labels = [], []
  for batch in batches:
    mask = batch.get('mask', np.ones(len(batch['label'])))
    pixels = (batch['image'][mask == 1] * STD + MEAN) * 255.0
    if not len(pixels):
      continue
    assert np.abs(pixels - pixels.mean(axis=(1, 2, 3), keepdims=True)).max() < 3.0
    ids += list(np.rint((pixels.mean(axis=(1, 2, 3)) - 20) / 10).astype(int))
    labels += list(batch['label'][mask == 1])
  return np.asarray(ids), np.asarray(labels)


def corrupt_path(root):
  return os.path.join(root, 'train', 'bee', 'zz_corrupt.jpg')


def test_classes_listing_and_fields(tree):
  root, images = tree
  dataset = data.load_dataset(make_config(root))
  assert dataset.name == f'folder:{root}'
  assert dataset.class_names == CLASSES and dataset.num_classes == 3
  assert dataset.preprocessing == data.preprocessing_of(dataset.name, SIZE)
  assert dataset.mean == transforms.IMAGENET_MEAN and dataset.std == transforms.IMAGENET_STD
  assert dataset.preprocessing.augmentation == 'imagenet' and dataset.validation is None
  assert isinstance(dataset.train, data.FolderSplit) and dataset.train.bad_images == 'skip'
  assert dataset.image_shape == (SIZE, SIZE, 3) and dataset.train.resize_size == 37
  # Listed: every image file, the corrupt ones included; notes.txt is not an image.
  assert len(dataset.train) == 13 and len(dataset.test) == 7
  assert corrupt_path(root) in dataset.train.paths
  assert not any(p.endswith('.txt') for p in dataset.train.paths)
  np.testing.assert_array_equal(dataset.train.labels, [0] * 4 + [1] * 5 + [2] * 4)
  assert dataset.train.steps_per_epoch(4) == 3
  # Streamed batches come in order from tf.data; there is no building one by its index.
  assert not hasattr(dataset.train, 'train_batch')


def test_skip_replaces_the_corrupt_file_deterministically_and_logs_it(tree, caplog):
  root, images = tree
  dataset = data.load_dataset(make_config(root))
  caplog.set_level('WARNING')
  # One batch of 13: the whole epoch, so the corrupt file is in it.
  (batch,) = list(dataset.train.train_batches(13, seed=0, epoch=0))
  assert batch['image'].shape == (13, SIZE, SIZE, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  ids, labels = image_ids([batch])
  # The documented replacement: the next readable file in file order, here cat's first image.
  train_ids = [i for _, _, i in images['train']]
  first_cat = next(i for _, label, i in images['train'] if label == 2)
  assert sorted(ids) == sorted(train_ids + [first_cat])
  np.testing.assert_array_equal(labels, [dict((i, l) for _, l, i in images['train'])[i]
                                         for i in ids])
  summary = [r.getMessage() for r in caplog.records if 'skipped 1 unreadable' in r.getMessage()]
  assert len(summary) == 1 and corrupt_path(root) in summary[0]
  assert 'Training epoch 0' in summary[0]

  # Deterministic: the same epoch again, and a resumed epoch is the tail of the full one.
  full = list(dataset.train.train_batches(4, seed=1, epoch=2))
  assert len(full) == 3
  again = list(dataset.train.train_batches(4, seed=1, epoch=2))
  resumed = list(dataset.train.train_batches(4, seed=1, epoch=2, start_index=1))
  chex.assert_trees_all_equal(full, again)
  chex.assert_trees_all_equal(full[1:], resumed)
  other = list(dataset.train.train_batches(4, seed=1, epoch=3))
  assert not np.array_equal(image_ids(full)[0], image_ids(other)[0])


def test_error_names_the_corrupt_file(tree):
  root, _ = tree
  dataset = data.load_dataset(make_config(root, bad_images='error'))
  with pytest.raises(ValueError) as error:
    list(dataset.train.train_batches(13, seed=0, epoch=0))
  message = str(error.value)
  assert corrupt_path(root) in message and 'bad_images=skip' in message
  with pytest.raises(ValueError, match='truncated.png'):
    list(dataset.test.eval_batches(4))


def test_eval_batches_mask_out_the_unreadable_file(tree, caplog):
  root, images = tree
  dataset = data.load_dataset(make_config(root))
  caplog.set_level('WARNING')
  batches = list(dataset.test.eval_batches(4))
  assert len(batches) == 2
  for batch in batches:
    assert batch['image'].shape == (4, SIZE, SIZE, 3) and batch['image'].dtype == np.float32
    assert batch['mask'].dtype == np.float32 and batch['label'].dtype == np.int32
  # File order: the 6 readable images, then truncated.png (masked out), then padding.
  np.testing.assert_array_equal(np.concatenate([b['mask'] for b in batches]), [1] * 6 + [0] * 2)
  ids, labels = image_ids(batches)
  np.testing.assert_array_equal(ids, [i for _, _, i in images['val']])
  np.testing.assert_array_equal(labels, [label for _, label, _ in images['val']])
  np.testing.assert_allclose(batches[1]['image'][2:], np.broadcast_to(-MEAN / STD,
                                                                      (2, SIZE, SIZE, 3)))
  assert any('skipped 1 unreadable' in r.getMessage() and 'truncated.png' in r.getMessage()
             for r in caplog.records)
  # Without augmentation, training batches use the same resize and centre crop.
  plain = data.load_dataset(make_config(root, augment=False))
  assert plain.preprocessing.augmentation == plain.train.preprocessing.augmentation == 'none'
  trained = list(plain.train.train_batches(4, seed=0, epoch=0))
  assert set(image_ids(trained)[0]) <= {i for _, _, i in images['train']}


def test_process_shards_are_disjoint_and_cover_the_split(tree):
  root, images = tree
  shards = [data.load_dataset(make_config(root), process_index=i, process_count=3)
            for i in range(3)]
  indices = [d.train.shard_indices() for d in shards]
  np.testing.assert_array_equal(np.sort(np.concatenate(indices)), np.arange(13))
  assert [len(i) for i in indices] == [5, 4, 4]
  # Global batch 6 = 2 per process; every process takes 4 // 2 steps.
  assert {d.train.steps_per_epoch(6) for d in shards} == {2}
  with pytest.raises(ValueError, match='divisible'):
    shards[0].train.steps_per_epoch(4)
  evaluated = [image_ids(d.test.eval_batches(3))[0] for d in shards]
  np.testing.assert_array_equal(np.sort(np.concatenate(evaluated)),
                                [i for _, _, i in images['val']])
  id_of_path = {path: i for path, _, i in images['train']}
  for dataset, shard in zip(shards, indices):
    ids, _ = image_ids(dataset.train.train_batches(6, seed=0, epoch=0))
    readable = {id_of_path[dataset.train.paths[i]] for i in shard if dataset.train.paths[i]
                in id_of_path}
    assert len(ids) == 4 and set(ids) <= readable


def test_validation_hold_out_and_colour_augmentation(tree):
  root, _ = tree
  dataset = data.load_dataset(make_config(root, validation_fraction=0.5, color_jitter=0.4,
                                        pca_lighting=0.1))
  assert np.bincount(dataset.validation.labels).tolist() == [2, 3, 2]  # round(n_c / 2).
  assert len(dataset.train) + len(dataset.validation) == 13
  assert not set(dataset.train.paths) & set(dataset.validation.paths)
  for split in dataset.splits().values():
    assert (split.preprocessing.color_jitter, split.preprocessing.pca_lighting) == (0.4, 0.1)
  first = next(dataset.train.train_batches(3, seed=0, epoch=0))
  again = next(dataset.train.train_batches(3, seed=0, epoch=0))
  np.testing.assert_array_equal(first['image'], again['image'])
  assert np.isfinite(first['image']).all()
  plain = dataset.with_preprocessing(color_jitter=0.0, pca_lighting=0.0)
  grey = next(plain.train.train_batches(3, seed=0, epoch=0))
  np.testing.assert_array_equal(first['label'], grey['label'])
  assert np.abs(first['image'] - grey['image']).mean(axis=(1, 2, 3)).min() > 1e-3
  # The grey images got colour: lighting adds a different offset to each channel.
  pixels = (first['image'] * STD + MEAN) * 255.0
  assert np.ptp(pixels, axis=-1).min() > 0.1


def test_missing_or_malformed_folders_say_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match='ROOT/train/<class>') as error:
    data.load_dataset(make_config(str(tmp_path / 'nowhere')))
  assert str(tmp_path / 'nowhere') in str(error.value)
  root = tmp_path / 'root'
  (root / 'train' / 'a').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='val'):
    data.load_dataset(make_config(str(root)))
  (root / 'val' / 'b').mkdir(parents=True)
  with pytest.raises(ValueError, match=r"only in train/: \['a'\]; only in val/: \['b'\]"):
    data.load_dataset(make_config(str(root)))
  (root / 'val' / 'b').rmdir()
  (root / 'val' / 'a').mkdir()
  with pytest.raises(ValueError, match=r"hold no image files.*\['a'\]"):
    data.load_dataset(make_config(str(root)))
  with pytest.raises(ValueError, match='bad_images'):
    data.load_dataset(make_config(str(root), bad_images='ignore'))
  with pytest.raises(ValueError, match='needs a directory'):
    data.load_dataset(make_config(''))


def test_pipeline_benchmark_command_on_the_tree(tree):
  root, _ = tree
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, '-m', 'pyramidnet_jax.pipeline_benchmark',
       '--config=configs/fashion_mnist_demo.py', f'--config.dataset=folder:{root}',
       '--config.image_size=32', '--config.batch_size=4', '--batches=4', '--warmup=1'],
      cwd=repo, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'folder:{root} train pipeline, augment=False: batches of 4 x (32, 32, 3)' in result.stdout
  assert re.search(r'median [\d,]+ images/s .* over 4 batches after 1 warm-up; total 16 images',
                   result.stdout), result.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'pyramidnet_jax.pipeline_benchmark',
       '--config=configs/fashion_mnist_demo.py', f'--config.dataset=folder:{root}/nowhere'],
      cwd=repo, capture_output=True, text=True, check=False)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith('error: Image folder')
