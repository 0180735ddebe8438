"""Fashion-MNIST from its four IDX files, read into memory; never downloaded."""

from __future__ import annotations

import gzip
import os

import numpy as np

from pyramidnet_jax.data.arrays import ArraySplit
from pyramidnet_jax.data.source import Dataset
from pyramidnet_jax.data.transforms import Preprocessing

NAME = 'fashion_mnist'
DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')
IMAGE_SHAPE = (28, 28, 1)
# Training-set pixel mean and std in [0, 1] units (tests recompute them from the files).
MEAN = (0.2860,)
STD = (0.3530,)
PREPROCESSING = Preprocessing(MEAN, STD, 'fashion_mnist')


def load(data_dir: str) -> Dataset:
  """Both splits from `data_dir`, or a FileNotFoundError that says how to install them."""
  needed = [f for pair in FILES.values() for f in pair]
  missing = [f for f in needed if not os.path.isfile(os.path.join(data_dir, f))]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST not found in {data_dir!r} (missing {", ".join(missing)}). Install it with '
        '`apt-get install dataset-fashion-mnist` (files go to '
        f'{DEFAULT_DIR}), or pass --config.data_dir=DIR where DIR contains '
        f'{", ".join(needed)}.')
  splits = {}
  for split_name, (images_file, labels_file) in FILES.items():
    images = read_idx(os.path.join(data_dir, images_file))
    labels = read_idx(os.path.join(data_dir, labels_file))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(f'Fashion-MNIST {split_name} files in {data_dir!r} do not match: images '
                       f'{images.shape}, labels {labels.shape}.')
    splits[split_name] = ArraySplit(images[..., None], labels.astype(np.int32),
                                    preprocessing=PREPROCESSING, name=NAME)
  return Dataset(
      name=NAME, train=splits['train'], test=splits['test'], validation=None,
      num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, preprocessing=PREPROCESSING)


def read_idx(path: str) -> np.ndarray:
  """A uint8 array from a (gzipped) IDX file, or a ValueError naming the file if it is damaged."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; truncation is an EOFError.
    raise ValueError(f'Cannot read IDX file {path}: {e}.') from e
  # Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
  # dimension as a big-endian uint32.
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f'{path} is not a uint8 IDX file (header {data[:4].hex() or "empty"}).')
  ndim = data[3]
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise ValueError(f'{path} is truncated: its header lists {ndim} dimensions but the file has '
                     f'{len(data)} bytes.')
  shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
  expected = header_size + int(np.prod(shape))
  if len(data) != expected:
    raise ValueError(f'{path} is truncated or corrupt: shape {shape} needs {expected} bytes, the '
                     f'file has {len(data)}.')
  return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)
