"""Symbolic links in image-folder datasets: each image file is listed once, and nothing outside
its class folder is listed; a link skipped for either reason is counted and named in a warning."""

import os
import shutil
import types

import numpy as np
import pytest

from pyramidnet_jax import data

Image = pytest.importorskip('PIL.Image')


def write_png(path, value=100):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def make_root(tmp_path):
  """train/{a,b}/ with two PNGs each (b's in a subfolder), val/{a,b}/ with one each."""
  root = tmp_path / 'root'
  for name in ('a/0.png', 'a/1.png', 'b/sub/0.png', 'b/sub/1.png'):
    write_png(str(root / 'train' / name))
  for name in ('a/0.png', 'b/0.png'):
    write_png(str(root / 'val' / name))
  return root


def load(root):
  config = types.SimpleNamespace(dataset=f'folder:{root}', data_dir='', validation_fraction=0.0,
                                 validation_seed=0, augment=False, image_size=8,
                                 color_jitter=0.0, pca_lighting=0.0, bad_images='skip')
  return data.load_dataset(config)


def link_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelname == 'WARNING' and 'symbolic link' in r.getMessage()]


def test_a_link_loop_and_duplicate_links_list_each_file_once(tmp_path, caplog):
  root = make_root(tmp_path)
  train = root / 'train'
  os.symlink('..', train / 'a' / 'loop')  # a/loop -> a: a loop.
  os.symlink('../../b', train / 'b' / 'sub' / 'up')  # b/sub/up -> b: a loop through a parent.
  os.symlink('0.png', train / 'a' / 'same.png')  # A second name of a listed file.
  os.symlink('0.png', train / 'a' / '+0.png')  # A third, sorted before the file itself.
  os.symlink('sub', train / 'b' / 'again')  # A second name of a listed folder.
  caplog.set_level('WARNING')
  dataset = load(root)
  assert dataset.train.paths == (str(train / 'a' / '0.png'), str(train / 'a' / '1.png'),
                                 str(train / 'b' / 'sub' / '0.png'),
                                 str(train / 'b' / 'sub' / '1.png'))
  np.testing.assert_array_equal(dataset.train.labels, [0, 0, 1, 1])
  assert dataset.train.steps_per_epoch(2) == 2
  (message,) = link_warnings(caplog)
  assert 'Skipped 5 symbolic link(s)' in message, message
  assert str(train / 'a' / 'loop') in message and str(train) in message


def test_a_link_out_of_its_class_folder_is_skipped(tmp_path, caplog):
  root = make_root(tmp_path)
  train = root / 'train'
  write_png(str(tmp_path / 'elsewhere' / 'x.png'))
  os.symlink(tmp_path / 'elsewhere', train / 'a' / 'outside')  # A folder outside the dataset.
  os.symlink(tmp_path / 'elsewhere' / 'x.png', train / 'a' / 'x.png')  # A file outside.
  os.symlink('../../b/sub/0.png', train / 'a' / 'from_b.png')  # Another class's file.
  os.symlink('../../../val/a/0.png', train / 'a' / 'from_val.png')  # The test split's file.
  caplog.set_level('WARNING')
  dataset = load(root)
  assert dataset.train.paths == (str(train / 'a' / '0.png'), str(train / 'a' / '1.png'),
                                 str(train / 'b' / 'sub' / '0.png'),
                                 str(train / 'b' / 'sub' / '1.png'))
  (message,) = link_warnings(caplog)
  assert 'Skipped 4 symbolic link(s)' in message, message
  assert 'outside' in message


def test_a_linked_class_folder_and_linked_files_inside_it_are_kept(tmp_path, caplog):
  # The class folder itself may be a link (a dataset assembled from folders kept elsewhere); a
  # link inside a class folder to a file of that folder that nothing else lists is kept too.
  root = make_root(tmp_path)
  write_png(str(tmp_path / 'store' / 'c' / '0.png'))
  write_png(str(tmp_path / 'store' / 'c' / 'hidden' / '.1.png'))
  os.symlink(tmp_path / 'store' / 'c', root / 'train' / 'c')
  os.symlink('hidden/.1.png', tmp_path / 'store' / 'c' / '1.png')
  os.makedirs(root / 'val' / 'c')
  caplog.set_level('WARNING')
  dataset = load(root)
  assert dataset.class_names == ('a', 'b', 'c')
  assert dataset.train.paths[-2:] == (str(root / 'train' / 'c' / '0.png'),
                                      str(root / 'train' / 'c' / '1.png'))
  assert not link_warnings(caplog)


def test_a_file_gets_one_class_and_one_split(tmp_path, caplog):
  root = make_root(tmp_path)
  os.symlink('a', root / 'train' / 'c')  # Class c would be class a's files again.
  os.makedirs(root / 'val' / 'c')
  caplog.set_level('WARNING')
  with pytest.raises(ValueError, match=r"hold no image files.*\['c'\]"):
    load(root)
  assert any(str(root / 'train' / 'c') in m for m in link_warnings(caplog))
  os.remove(root / 'train' / 'c')
  os.rmdir(root / 'val' / 'c')
  # val/b would test on the training images of b: it is skipped, and val/b is empty.
  shutil.rmtree(root / 'val' / 'b')
  os.symlink('../train/b', root / 'val' / 'b')
  caplog.clear()
  dataset = load(root)
  assert dataset.test.paths == (str(root / 'val' / 'a' / '0.png'),)
  (message,) = link_warnings(caplog)
  assert str(root / 'val') in message and 'listed already' in message
