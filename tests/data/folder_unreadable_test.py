"""Image folders where a whole class, or a whole split, cannot be read: an error in both
bad_images modes that names the class or split and says what to fix, never a run that trains
without the class or divides by zero."""

import os
import types

import numpy as np
import pytest

from pyramidnet_jax import data
from tests import helpers

Image = pytest.importorskip('PIL.Image')
pytest.importorskip('tensorflow')

CLASSES = ('a', 'b', 'c')


def write_root(root, unreadable=()):
  """train/<class>/ with 3 PNGs each and val/<class>/ with 1; the files of `unreadable`
  ('train/b', 'val', ...) hold garbage."""
  for split, count in (('train', 3), ('val', 1)):
    for label, name in enumerate(CLASSES):
      folder = os.path.join(root, split, name)
      os.makedirs(folder)
      for k in range(count):
        path = os.path.join(folder, f'{k}.png')
        if split in unreadable or f'{split}/{name}' in unreadable:
          with open(path, 'wb') as f:
            f.write(b'not a PNG at all')
        else:
          Image.fromarray(np.full((6, 5, 3), 40 * label + k, np.uint8)).save(path)
  return root


def load(root, bad_images):
  config = types.SimpleNamespace(dataset=f'folder:{root}', data_dir='', validation_fraction=0.0,
                                 validation_seed=0, augment=False, image_size=8,
                                 color_jitter=0.0, pca_lighting=0.0, bad_images=bad_images)
  return data.load_dataset(config)


@pytest.mark.parametrize('bad_images', ['skip', 'error'])
def test_a_class_whose_files_are_all_unreadable_stops_training(tmp_path, bad_images):
  root = write_root(str(tmp_path / 'root'), unreadable=('train/b',))
  dataset = load(root, bad_images)
  with pytest.raises(ValueError) as error:
    list(dataset.train.train_batches(3, seed=0, epoch=0))
  message = str(error.value)
  assert (f"Every one of the 3 image files of class 'b' in {os.path.join(root, 'train')} is "
          'unreadable') in message, message
  assert os.path.join(root, 'train', 'b', '0.png') in message
  assert '\n' not in message
  # A class with one readable file left trains: its unreadable files are the policy's business.
  os.remove(os.path.join(root, 'train', 'b', '2.png'))
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(os.path.join(root, 'train', 'b', '2.png'))
  dataset = load(root, 'skip')
  labels = np.concatenate([b['label'] for b in dataset.train.train_batches(3, seed=0, epoch=0)])
  assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # b's two bad files replaced.


@pytest.mark.parametrize('bad_images', ['skip', 'error'])
def test_a_split_whose_files_are_all_unreadable_is_one_clear_error(tmp_path, bad_images):
  root = write_root(str(tmp_path / 'root'), unreadable=('val',))
  dataset = load(root, bad_images)
  with pytest.raises(ValueError) as error:
    list(dataset.test.eval_batches(2))
  message = str(error.value)
  assert f'None of the 3 image files of {os.path.join(root, "val")}' in message, message
  assert '\n' not in message


def test_training_on_such_a_folder_ends_in_the_error_without_results(tmp_path):
  from pyramidnet_jax.training import loop  # pylint: disable=g-import-not-at-top
  # One test, so that the four runs share their compilations through the cache.
  with helpers.persistent_compilation_cache(str(tmp_path / 'cache')):
    for unreadable, expected in (('val', 'None of the 3 image files'),
                                 ('train/b', "Every one of the 3 image files of class 'b'")):
      for bad_images in ('skip', 'error'):
        case = tmp_path / f'{unreadable.replace("/", "_")}_{bad_images}'
        root = write_root(str(case / 'root'), unreadable=(unreadable,))
        config = helpers.tiny_config(dataset=f'folder:{root}', image_size=8, batch_size=3,
                                     eval_batch_size=3, augment=False, bad_images=bad_images)
        with pytest.raises(ValueError) as error:
          loop.train_and_evaluate(config, str(case / 'run'))
        assert expected in str(error.value), (unreadable, bad_images, str(error.value))
        assert not os.path.exists(case / 'run' / 'results.json')
