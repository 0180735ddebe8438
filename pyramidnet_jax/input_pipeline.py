"""Datasets and deterministic batching for training and evaluation.

Three kinds of split. `Split` holds a small dataset (CIFAR, Fashion-MNIST) in memory: every training
batch is a pure function of (seed, epoch, index), its order and augmentation coming from numpy
generators keyed on those numbers. `TfdsSplit` streams a prepared TFDS dataset (ImageNet) through
tf.data: the epoch's order and every example's augmentation are a pure function of (seed, epoch),
and batch `index` of an epoch is the same whether the epoch is read from the start or resumed at
`start_index`. `FolderSplit` streams the user's own image files (`folder:/path/to/root`), decoded
by PIL inside tf.data, with the same guarantees. Either way a run resumed at step k sees exactly
the batches an uninterrupted run would have seen. Recipes: ../shared/SPEC.md sections 2, 6.

TensorFlow, TFDS and PIL are imported inside the functions that need them, so importing this module
(or the package) does not load TensorFlow.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import gzip
import os
import threading
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np

FOLDER_PREFIX = 'folder:'
DATASETS = ('cifar10', 'cifar100', 'fashion_mnist', 'imagenet2012', FOLDER_PREFIX + '/path/to/root')
AUGMENTATIONS = ('cifar', 'fashion_mnist', 'imagenet', 'none')

# Zero padding before the random crop. CIFAR: the paper's pad 4 + crop 32. Fashion-MNIST: pad 2 +
# crop 28 + flip is this project's choice (no paper recipe), scaled to the smaller image.
AUGMENTATION_PADDING = {'cifar': 4, 'fashion_mnist': 2}

# Per-channel statistics in [0, 1] units. CIFAR: the authors' values, used for both CIFARs.
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
# Fashion-MNIST training-set pixel mean and std (tests recompute them from the files).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

# ImageNet (SPEC section 2, the authors' PyTorch recipe): RandomResizedCrop(224) + flip for
# training, resize the shorter side to 256 + center crop 224 for evaluation, torchvision's
# statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_IMAGE_SIZE = 224
IMAGENET_RESIZE_SIZE = 256
IMAGENET_CROP_SCALE = (0.08, 1.0)  # Area of the crop, as a fraction of the image's.
IMAGENET_CROP_RATIO = (3 / 4, 4 / 3)  # Width / height of the crop.
# The side of the crops is configurable (config.image_size, ImageNet and folders); evaluation
# resizes the shorter side to round(size * 256 / 224) first, as 256 is to 224.
IMAGENET_RESIZE_RATIO = IMAGENET_RESIZE_SIZE / IMAGENET_IMAGE_SIZE

# The Torch recipe's colour augmentation (fb.resnet.torch datasets/imagenet.lua and transforms.lua,
# SPEC section 2): ColorJitter (brightness, contrast, saturation 0.4, in a random order), then
# Lighting (AlexNet PCA noise, alphastd 0.1) with these eigenvalues and eigenvectors (columns) of
# the RGB covariance in [0, 1] units. Greyscale weights are Torch's (ITU-R 601).
TORCH_COLOR_JITTER = 0.4
TORCH_PCA_LIGHTING = 0.1
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
GREY_WEIGHTS = (0.299, 0.587, 0.114)

# Image folders: files with these extensions (any case) are read, by PIL (which reads every format
# TensorFlow's decode_image does: JPEG, PNG, GIF, BMP, WebP, and more); other files are ignored.
FOLDER_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.apng', '.bmp', '.dib',
                           '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm', '.pnm',
                           '.tga', '.ico', '.qoi', '.jp2', '.j2k', '.avif')
FOLDER_LAYOUT = ('ROOT/train/<class>/<image files> and ROOT/val/<class>/<image files> (the same '
                 'class subfolders in both; images of any size, in any format PIL reads)')
BAD_IMAGE_POLICIES = ('skip', 'error')

# Examples in the tf.data shuffle buffer of each process (encoded JPEGs, ~110 KB each: ~1.1 GB).
# Files are also read in a shuffled order, so the buffer only has to mix within a few files.
IMAGENET_SHUFFLE_BUFFER = 10_000
# Files read at once; fixed (not AUTOTUNE) because the interleave order depends on it.
_TFDS_INTERLEAVE_CYCLE = 16
_TFDS_INTERLEAVE_BLOCK = 16

FASHION_MNIST_DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
FASHION_MNIST_CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                             'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

# Leading words of the numpy seed sequences, one per use. SeedSequence pads short entropy with
# zeros, so [seed, epoch] and [seed, epoch, 0] would give the same stream without them.
_PERMUTATION_STREAM = 1
_AUGMENTATION_STREAM = 2
_VALIDATION_STREAM = 3
_FILE_ORDER_STREAM = 4
_EXAMPLE_ORDER_STREAM = 5
_CROP_STREAM = 6
_FLIP_STREAM = 7
_JITTER_STREAM = 8
_LIGHTING_STREAM = 9
_FOLDER_ORDER_STREAM = 10

# Examples per tf.data batch when copying a TFDS split into memory (bounds TF's peak memory).
_TFDS_READ_BATCH = 10_000


# eq=False: field-wise == on arrays is ambiguous, and frozen+eq would make hashing fail.
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int32 (N,)

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f'images must be uint8 (N, H, W, C), got {self.images.dtype} '
                       f'{self.images.shape}.')
    if self.labels.dtype != np.int32 or self.labels.ndim != 1:
      raise ValueError(f'labels must be int32 (N,), got {self.labels.dtype} {self.labels.shape}.')
    if len(self.images) != len(self.labels):
      raise ValueError(f'{len(self.images)} images but {len(self.labels)} labels.')

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  """Examples [start, stop) of a prepared TFDS split, streamed from disk, never held in memory.

  Process `process_index` of `process_count` reads only its shard of that range (see
  `shard_range`); `len()` is the size of the whole range, over all processes. `image_shape` is
  the shape of the batches' images, after cropping.
  """
  name: str  # TFDS builder name, e.g. 'imagenet2012'.
  split: str  # TFDS split name, e.g. 'train'.
  start: int
  stop: int
  image_shape: tuple[int, ...]
  data_dir: str | None = None  # None: the TFDS default.
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if not 0 <= self.start < self.stop:
      raise ValueError(f'TfdsSplit {self.split} needs 0 <= start < stop, got [{self.start}, '
                       f'{self.stop}).')
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index {self.process_index} is outside [0, '
                       f'{self.process_count}).')
    if self.stop - self.start < self.process_count:
      raise ValueError(f'{self.stop - self.start} examples cannot be shared by '
                       f'{self.process_count} processes.')

  def __len__(self) -> int:
    return self.stop - self.start

  @property
  def num_examples(self) -> int:
    return len(self)

  def shard_range(self, process_index: int | None = None) -> tuple[int, int]:
    """[begin, end) of a process's shard: contiguous, disjoint, sizes differing by at most 1."""
    i = self.process_index if process_index is None else process_index
    n = len(self)
    return (self.start + n * i // self.process_count,
            self.start + n * (i + 1) // self.process_count)

  @property
  def shard_spec(self) -> str:
    """The TFDS split string of this process's shard, e.g. 'train[0:640583]'."""
    begin, end = self.shard_range()
    return f'{self.split}[{begin}:{end}]'

  @property
  def min_shard_size(self) -> int:
    return len(self) // self.process_count

  @property
  def max_shard_size(self) -> int:
    return -(-len(self) // self.process_count)

  def local_batch_size(self, batch_size: int) -> int:
    """This process's part of a global batch."""
    return _local_batch_size(batch_size, self.process_count)


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if batch_size % process_count:
    raise ValueError(f'The global batch size {batch_size} must be divisible by the '
                     f'{process_count} processes that read it.')
  return batch_size // process_count


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSplit:
  """Image files of one split of an image-folder dataset, decoded as they are read.

  `paths` are sorted (class by class, then by path) and `labels[i]` is the class of `paths[i]`.
  Process `process_index` of `process_count` reads only files process_index, process_index +
  process_count, ... of that list (`shard_indices`): the shards are disjoint, cover the split,
  differ in size by at most 1, and each holds every class in its proportion. `len()` counts all
  files, over all processes. `image_shape` is the shape of the batches' images (RGB crops of
  `image_size`). `bad_images` ('skip' | 'error') says what an unreadable file does (see
  _folder_decoder).
  """
  directory: str  # ROOT/train or ROOT/val, for messages.
  paths: tuple[str, ...]
  labels: np.ndarray  # int32 (N,)
  image_size: int = IMAGENET_IMAGE_SIZE
  bad_images: str = 'skip'
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if len(self.paths) != len(self.labels):
      raise ValueError(f'{len(self.paths)} paths but {len(self.labels)} labels.')
    if self.bad_images not in BAD_IMAGE_POLICIES:
      raise ValueError(f'bad_images must be one of {BAD_IMAGE_POLICIES}, got '
                       f'{self.bad_images!r}.')
    if self.image_size < 1:
      raise ValueError(f'image_size must be positive, got {self.image_size}.')
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index {self.process_index} is outside [0, '
                       f'{self.process_count}).')
    if len(self.paths) < self.process_count:
      raise ValueError(f'The {len(self.paths)} images of {self.directory} cannot be shared by '
                       f'{self.process_count} processes.')

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def num_examples(self) -> int:
    return len(self)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, 3)

  @property
  def resize_size(self) -> int:
    """Evaluation resizes the shorter side to this, then centre-crops image_size."""
    return resize_size_for(self.image_size)

  def shard_indices(self, process_index: int | None = None) -> np.ndarray:
    """Indices into `paths` of a process's shard, in file order."""
    i = self.process_index if process_index is None else process_index
    return np.arange(i, len(self), self.process_count)

  @property
  def min_shard_size(self) -> int:
    return len(self) // self.process_count

  @property
  def max_shard_size(self) -> int:
    return -(-len(self) // self.process_count)

  def local_batch_size(self, batch_size: int) -> int:
    """This process's part of a global batch."""
    return _local_batch_size(batch_size, self.process_count)


def resize_size_for(image_size: int) -> int:
  """The eval resize (shorter side) for crops of `image_size`: 256 for 224, in proportion."""
  return int(np.floor(image_size * IMAGENET_RESIZE_RATIO + 0.5))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  name: str
  train: Split | TfdsSplit | FolderSplit
  test: Split | TfdsSplit | FolderSplit
  validation: Split | TfdsSplit | FolderSplit | None
  num_classes: int
  class_names: tuple[str, ...]
  mean: tuple[float, ...]  # Per channel, in [0, 1] units.
  std: tuple[float, ...]
  augmentation: str  # One of AUGMENTATIONS.
  # The Torch recipe's colour augmentation of streamed RGB training images ('imagenet'
  # augmentation only), see torch_color_augment: jitter strength and PCA lighting std, 0 = off.
  color_jitter: float = 0.0
  pca_lighting: float = 0.0

  def __post_init__(self):
    if self.augmentation not in AUGMENTATIONS:
      raise ValueError(f'Unknown augmentation {self.augmentation!r}: expected one of '
                       f'{AUGMENTATIONS}.')
    if not 0.0 <= self.color_jitter <= 1.0:
      raise ValueError(f'color_jitter must be in [0, 1], got {self.color_jitter}.')
    if not 0.0 <= self.pca_lighting:
      raise ValueError(f'pca_lighting must be non-negative, got {self.pca_lighting}.')

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(H, W, C) of the images in this dataset's batches."""
    return self.train.image_shape


# ---------------------------------------------------------------------------------------------
# Loading.


def load_dataset(config: Any, process_index: int = 0, process_count: int = 1) -> Dataset:
  """The dataset named by `config.dataset`, with the configured validation hold-out.

  Reads config.dataset, data_dir, validation_fraction, validation_seed and augment, and for the
  streamed datasets image_size, color_jitter, pca_lighting and (folders) bad_images; a config
  without the last four gets their defaults. Never downloads: a dataset that is not on disk
  raises an error that says how to provide it. CIFAR and Fashion-MNIST are loaded into memory
  (every process holds all of it, and process_index / process_count are ignored); imagenet2012
  and `folder:ROOT` are streamed, each of the `process_count` processes reading only its shard
  (pass jax.process_index(), jax.process_count()).
  """
  name = config.dataset
  fraction = float(config.validation_fraction)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'validation_fraction must be in [0, 1), got {fraction}.')
  image_size = int(_config_field(config, 'image_size', IMAGENET_IMAGE_SIZE))
  color_jitter = float(_config_field(config, 'color_jitter', 0.0))
  pca_lighting = float(_config_field(config, 'pca_lighting', 0.0))
  bad_images = str(_config_field(config, 'bad_images', 'skip'))
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}.')
  if bad_images not in BAD_IMAGE_POLICIES:
    raise ValueError(f'bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}.')
  streamed = name == 'imagenet2012' or name.startswith(FOLDER_PREFIX)
  if not streamed:
    if image_size != IMAGENET_IMAGE_SIZE or color_jitter or pca_lighting:
      raise ValueError(
          f'config.image_size, color_jitter and pca_lighting apply to imagenet2012 and '
          f'{FOLDER_PREFIX}ROOT datasets only; {name} uses its own image size and augmentation: '
          f'leave them at {IMAGENET_IMAGE_SIZE}, 0 and 0.')
  if name == 'fashion_mnist':
    dataset = _load_fashion_mnist(config.data_dir or FASHION_MNIST_DEFAULT_DIR)
  elif name in ('cifar10', 'cifar100'):
    dataset = _load_cifar(name, config.data_dir or None)
  elif name == 'imagenet2012':
    dataset = _load_imagenet(config.data_dir or None, fraction, process_index, process_count,
                             image_size)
  elif name.startswith(FOLDER_PREFIX):
    dataset = _load_folder(name, fraction, int(config.validation_seed), process_index,
                           process_count, image_size, bad_images)
  else:
    raise ValueError(f'Unknown dataset {name!r}: expected one of {DATASETS}.')

  if fraction > 0.0 and isinstance(dataset.train, Split):
    train, validation = split_validation(dataset.train, fraction, int(config.validation_seed))
    dataset = dataclasses.replace(dataset, train=train, validation=validation)
  if streamed:
    dataset = dataclasses.replace(dataset, color_jitter=color_jitter, pca_lighting=pca_lighting)
  if not config.augment:
    dataset = dataclasses.replace(dataset, augmentation='none')
  return dataset


def _config_field(config: Any, name: str, default: Any) -> Any:
  return getattr(config, name, default)


def _load_fashion_mnist(data_dir: str) -> Dataset:
  needed = [f for pair in FASHION_MNIST_FILES.values() for f in pair]
  missing = [f for f in needed if not os.path.isfile(os.path.join(data_dir, f))]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST not found in {data_dir!r} (missing {", ".join(missing)}). Install it with '
        '`apt-get install dataset-fashion-mnist` (files go to '
        f'{FASHION_MNIST_DEFAULT_DIR}), or pass --config.data_dir=DIR where DIR contains '
        f'{", ".join(needed)}.')
  splits = {}
  for split_name, (images_file, labels_file) in FASHION_MNIST_FILES.items():
    images = read_idx(os.path.join(data_dir, images_file))
    labels = read_idx(os.path.join(data_dir, labels_file))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(f'Fashion-MNIST {split_name} files in {data_dir!r} do not match: images '
                       f'{images.shape}, labels {labels.shape}.')
    splits[split_name] = Split(images=images[..., None], labels=labels.astype(np.int32))
  return Dataset(
      name='fashion_mnist', train=splits['train'], test=splits['test'], validation=None,
      num_classes=len(FASHION_MNIST_CLASS_NAMES), class_names=FASHION_MNIST_CLASS_NAMES,
      mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, augmentation='fashion_mnist')


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


def _load_cifar(name: str, data_dir: str | None) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir)
  splits = {split: _read_tfds_split(builder, split, data_dir) for split in ('train', 'test')}
  label_feature = builder.info.features['label']
  return Dataset(
      name=name, train=splits['train'], test=splits['test'], validation=None,
      num_classes=label_feature.num_classes, class_names=tuple(label_feature.names),
      mean=CIFAR_MEAN, std=CIFAR_STD, augmentation='cifar')


def _read_tfds_split(builder: Any, split: str, data_dir: str | None) -> Split:
  """Copies a prepared TFDS split into memory; never downloads."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # The missing-data check is as_dataset's own: builder.is_prepared() stays False under
  # tfds.testing.mock_data, which serves data all the same. as_dataset(batch_size=-1) is avoided
  # because it aborts the process under mock_data; batched reads work on both.
  try:
    dataset = builder.as_dataset(split=split).batch(_TFDS_READ_BATCH)
    chunks = list(tfds.as_numpy(dataset))
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
    where = data_dir or 'the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)'
    raise FileNotFoundError(
        f'TFDS dataset {builder.name} is not prepared in {where}, and this pipeline never '
        f'downloads. On a machine with internet run `tfds build {builder.name} '
        f'--data_dir=DIR` (or copy a prepared TFDS data dir), then pass --config.data_dir=DIR. '
        f'TFDS said: {e}') from e
  if not chunks:
    raise ValueError(f'TFDS dataset {builder.name} split {split!r} is empty.')
  images = np.concatenate([c['image'] for c in chunks]).astype(np.uint8, copy=False)
  labels = np.concatenate([c['label'] for c in chunks]).astype(np.int32)
  return Split(images=images, labels=labels)


def _load_imagenet(data_dir: str | None, validation_fraction: float, process_index: int,
                   process_count: int, image_size: int = IMAGENET_IMAGE_SIZE) -> Dataset:
  """ImageNet as streaming splits: train 'train', test 'validation' (the official 50,000).

  The validation hold-out is the first round(fraction * N) examples of 'train', by TFDS split
  slicing. It is not stratified (unlike the in-memory datasets') and config.validation_seed is not
  used: TFDS shuffles ImageNet's training examples when it writes the files, so the first examples
  are a class-balanced-in-expectation random sample (~fraction of each class's ~1,300 images), and
  slicing lets each process read only its part without an index of labels.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = 'imagenet2012'
  builder = tfds.builder(name, data_dir=data_dir)
  sizes = {split: _tfds_split_size(builder, split, data_dir) for split in ('train', 'validation')}
  image_shape = (image_size, image_size, 3)
  make = functools.partial(TfdsSplit, name, image_shape=image_shape, data_dir=data_dir,
                           process_index=process_index, process_count=process_count)
  validation = None
  train_start = 0
  if validation_fraction > 0.0:
    held_out = int(np.floor(validation_fraction * sizes['train'] + 0.5))
    if not 0 < held_out < sizes['train']:
      raise ValueError(f'Validation fraction {validation_fraction} of {sizes["train"]} examples '
                       'leaves the training or the validation split empty.')
    validation = make('train', 0, held_out)
    train_start = held_out
  label_feature = builder.info.features['label']
  return Dataset(
      name=name, train=make('train', train_start, sizes['train']),
      test=make('validation', 0, sizes['validation']), validation=validation,
      num_classes=label_feature.num_classes, class_names=tuple(label_feature.names),
      mean=IMAGENET_MEAN, std=IMAGENET_STD, augmentation='imagenet')


def _tfds_split_size(builder: Any, split: str, data_dir: str | None) -> int:
  """Examples in a prepared TFDS split; a FileNotFoundError that says how to prepare it if not."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # As in _read_tfds_split, as_dataset is the test of whether the data is there: is_prepared()
  # is False under tfds.testing.mock_data, which serves data all the same.
  try:
    dataset = builder.as_dataset(split=split)
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
    root = os.fspath(builder.data_dir_root)  # data_dir, or the TFDS default if not given.
    manual = os.path.join(root, 'downloads', 'manual')
    raise FileNotFoundError(
        f'TFDS dataset {builder.name} is not prepared in {root}, and this pipeline never '
        f'downloads. ImageNet needs a manual download: put ILSVRC2012_img_train.tar and '
        f'ILSVRC2012_img_val.tar (from https://image-net.org) in {manual} and run `tfds build '
        f'{builder.name} --data_dir=DIR` (or copy a prepared TFDS data dir), then pass '
        f'--config.data_dir=DIR. TFDS said: {e}') from e
  except (KeyError, ValueError) as e:
    raise ValueError(f'TFDS dataset {builder.name} in {data_dir or "the default data dir"} has '
                     f'no split {split!r}: {e}') from e
  if builder.info.splits:  # Prepared data: the split sizes are recorded in dataset_info.json.
    size = builder.info.splits[split].num_examples
  else:  # Under mock_data no split is recorded, but the mock dataset knows its length.
    size = int(dataset.cardinality())
  if size <= 0:
    raise ValueError(f'TFDS dataset {builder.name} split {split!r} is empty or of unknown size.')
  return size


def _load_folder(spec: str, validation_fraction: float, validation_seed: int, process_index: int,
                 process_count: int, image_size: int, bad_images: str) -> Dataset:
  """`folder:ROOT`: the user's images in ROOT/train/<class>/ and ROOT/val/<class>/.

  Classes are the sorted subfolder names of ROOT/train (ROOT/val must have the same); files are
  found recursively below each class folder and kept if their extension is an image format's
  (FOLDER_IMAGE_EXTENSIONS), sorted by path. Nothing is decoded or written here: listing a large
  folder costs one directory walk. Test split: ROOT/val. config.validation_fraction holds out a
  stratified random part of ROOT/train (seeded by validation_seed), as for in-memory datasets.
  Transforms: ImageNet's, at `image_size` (random-resized crop + flip; eval resize + centre
  crop), with ImageNet's mean and std.
  """
  root = os.path.expanduser(spec[len(FOLDER_PREFIX):])
  if not root:
    raise ValueError(f'{FOLDER_PREFIX} needs a directory: --config.dataset={FOLDER_PREFIX}ROOT '
                     f'with {FOLDER_LAYOUT}.')
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root!r} does not exist or is not a directory. '
                            f'Expected {FOLDER_LAYOUT}.')
  directories = {split: os.path.join(root, split) for split in ('train', 'val')}
  for directory in directories.values():
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'{directory!r} is missing: an image folder needs {FOLDER_LAYOUT}.')
  classes = {split: _class_folders(directory) for split, directory in directories.items()}
  if not classes['train']:
    raise FileNotFoundError(f'{directories["train"]!r} has no class subfolders. Expected '
                            f'{FOLDER_LAYOUT}.')
  if classes['train'] != classes['val']:
    only_train = sorted(set(classes['train']) - set(classes['val']))
    only_val = sorted(set(classes['val']) - set(classes['train']))
    raise ValueError(
        f'The class subfolders of {directories["train"]!r} and {directories["val"]!r} differ: '
        f'only in train/: {only_train or "none"}; only in val/: {only_val or "none"}. Both must '
        'hold the same class folders (an empty one is allowed in val/).')
  class_names = classes['train']
  listed = {split: _list_images(directory, class_names)
            for split, directory in directories.items()}
  paths, labels = listed['train']
  empty = [c for i, c in enumerate(class_names) if not np.any(labels == i)]
  if empty:
    raise ValueError(f'These class folders of {directories["train"]!r} hold no image files '
                     f'({", ".join(FOLDER_IMAGE_EXTENSIONS[:6])}, ...): {empty}.')
  if not listed['val'][0]:
    raise ValueError(f'{directories["val"]!r} holds no image files in its class folders.')
  make = functools.partial(FolderSplit, image_size=image_size, bad_images=bad_images,
                           process_index=process_index, process_count=process_count)
  validation = None
  if validation_fraction > 0.0:
    held_out = _stratified_hold_out(labels, validation_fraction, validation_seed)
    kept = np.flatnonzero(~held_out)
    validation = make(directories['train'], tuple(paths[i] for i in np.flatnonzero(held_out)),
                      labels[held_out])
    paths, labels = tuple(paths[i] for i in kept), labels[kept]
  return Dataset(
      name=spec, train=make(directories['train'], paths, labels),
      test=make(directories['val'], *listed['val']), validation=validation,
      num_classes=len(class_names), class_names=class_names, mean=IMAGENET_MEAN,
      std=IMAGENET_STD, augmentation='imagenet')


def _class_folders(directory: str) -> tuple[str, ...]:
  """Sorted names of the subfolders (hidden ones excepted): the classes."""
  with os.scandir(directory) as entries:
    return tuple(sorted(e.name for e in entries
                        if e.is_dir() and not e.name.startswith('.')))


def _list_images(directory: str, class_names: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
  """(paths, int32 labels) of the image files below directory/<class>/, class by class, sorted."""
  paths, labels, ignored = [], [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(directory, name)
    if not os.path.isdir(class_dir):  # Only possible in val/ (an absent folder = no images).
      continue
    found = []
    for parent, subdirs, files in os.walk(class_dir, followlinks=True):
      subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
      for file in files:
        if file.startswith('.'):
          continue
        path = os.path.join(parent, file)
        if file.lower().endswith(FOLDER_IMAGE_EXTENSIONS):
          found.append(path)
        else:
          ignored.append(path)
    found.sort()
    paths += found
    labels += [label] * len(found)
  if ignored:
    logging.warning('Ignored %d file(s) in %s whose extension is not an image format\'s, e.g. %s.',
                    len(ignored), directory, ', '.join(sorted(ignored)[:3]))
  return tuple(paths), np.asarray(labels, np.int32)


# ---------------------------------------------------------------------------------------------
# Validation hold-out.


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
  """(train, validation): round(fraction * n_c) random examples of each class c go to validation.

  Deterministic in `seed`; both parts keep the original example order.
  """
  is_validation = _stratified_hold_out(split.labels, fraction, seed)
  return (Split(split.images[~is_validation], split.labels[~is_validation]),
          Split(split.images[is_validation], split.labels[is_validation]))


def _stratified_hold_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A boolean mask: round(fraction * n_c) random examples of each class c, seeded by `seed`."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'Validation fraction must be in (0, 1), got {fraction}.')
  rng = np.random.default_rng([_VALIDATION_STREAM, _check_seed('seed', seed)])
  is_validation = np.zeros(len(labels), dtype=bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = int(np.floor(fraction * len(members) + 0.5))
    is_validation[rng.permutation(members)[:count]] = True
  if not is_validation.any() or is_validation.all():
    raise ValueError(f'Validation fraction {fraction} of {len(labels)} examples leaves the '
                     'training or the validation split empty.')
  return is_validation


# ---------------------------------------------------------------------------------------------
# Batches.


def normalize(images_uint8: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """float32 (images / 255 - mean) / std, per channel (the last axis)."""
  std = np.asarray(std, dtype=np.float32)
  scale = np.float32(1.0 / 255.0) / std
  offset = -np.asarray(mean, dtype=np.float32) / std
  # In place, on rows of width * channels with the statistics tiled to match: broadcasting along a
  # last axis of 3 and allocating temporaries made this ~9x slower on CIFAR batches.
  *leading, width, channels = images_uint8.shape
  rows = images_uint8.reshape(*leading, width * channels).astype(np.float32)
  rows *= np.tile(scale, width)
  rows += np.tile(offset, width)
  return rows.reshape(images_uint8.shape)


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
  """Full training batches per epoch; the remainder is dropped (a different one each epoch)."""
  if isinstance(dataset.train, (TfdsSplit, FolderSplit)):
    # Every process takes the same number of steps: as many as its smallest shard allows.
    local_batch_size = dataset.train.local_batch_size(batch_size)
    steps = dataset.train.min_shard_size // local_batch_size
    if steps == 0:
      raise ValueError(f'The {dataset.name} training split has {len(dataset.train)} examples, '
                       f'fewer than one batch of {batch_size}.')
    return steps
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  steps = len(dataset.train) // batch_size
  if steps == 0:
    raise ValueError(f'The {dataset.name} training split has {len(dataset.train)} examples, fewer '
                     f'than one batch of {batch_size}.')
  return steps


def train_batch(dataset: Dataset, batch_size: int, seed: int, epoch: int, index: int,
                augment: bool) -> dict[str, np.ndarray]:
  """Training batch `index` of epoch `epoch`: a pure function of its arguments.

  Returns {'image': float32 (B, H, W, C) normalised, 'label': int32 (B,)}. In-memory datasets
  only: a streamed one serves its batches through train_batches.
  """
  if isinstance(dataset.train, (TfdsSplit, FolderSplit)):
    raise TypeError(f'{dataset.name} is streamed, so its batches cannot be built one at a time '
                    'by index: use train_batches(..., start_index=index).')
  steps = steps_per_epoch(dataset, batch_size)
  if not 0 <= index < steps:
    raise ValueError(f'Batch index {index} is outside the epoch\'s {steps} batches.')
  order = _epoch_permutation(_check_seed('seed', seed), _check_seed('epoch', epoch),
                             len(dataset.train))
  chosen = order[index * batch_size:(index + 1) * batch_size]
  images = dataset.train.images[chosen]
  labels = dataset.train.labels[chosen]
  if augment and dataset.augmentation != 'none':
    rng = np.random.default_rng([_AUGMENTATION_STREAM, seed, epoch, index])
    images = random_crop_and_flip(images, AUGMENTATION_PADDING[dataset.augmentation], rng)
  return {'image': normalize(images, dataset.mean, dataset.std), 'label': labels}


def train_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int, augment: bool,
                  start_index: int = 0, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """train_batch(..., index) for index in [start_index, steps_per_epoch).

  Up to `prefetch` batches are built ahead in a background thread (0 builds them inline). For a
  streamed dataset (TfdsSplit, FolderSplit) the batches come from tf.data (`prefetch` is its
  prefetch depth) and are this process's part of each global batch of `batch_size`.
  """
  steps = steps_per_epoch(dataset, batch_size)
  if not 0 <= start_index <= steps:
    raise ValueError(f'start_index {start_index} is outside [0, {steps}].')
  if isinstance(dataset.train, (TfdsSplit, FolderSplit)):
    augment = augment and dataset.augmentation != 'none'
    color = _ColorAugmentation(dataset.color_jitter, dataset.pca_lighting) if augment else None
    if isinstance(dataset.train, FolderSplit):
      return _folder_train_batches(dataset.train, batch_size, steps, _check_seed('seed', seed),
                                   _check_seed('epoch', epoch), augment, start_index, dataset.mean,
                                   dataset.std, prefetch, color)
    return _tfds_train_batches(dataset.train, batch_size, steps, _check_seed('seed', seed),
                               _check_seed('epoch', epoch), augment, start_index, dataset.mean,
                               dataset.std, prefetch, color)
  make = functools.partial(train_batch, dataset, batch_size, seed, epoch, augment=augment)
  # Returned rather than yielded from here, so bad arguments raise at the call, not at next().
  return _prefetched(make, range(start_index, steps), prefetch)


def _prefetched(make: Any, indices: range, prefetch: int) -> Iterator[dict[str, np.ndarray]]:
  if prefetch <= 0:
    for index in indices:
      yield make(index=index)
    return
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  pending = collections.deque()
  try:
    for index in indices:
      pending.append(executor.submit(make, index=index))
      if len(pending) > prefetch:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    # Also runs when the consumer stops early: drop the batches nobody will take.
    executor.shutdown(wait=True, cancel_futures=True)


def eval_batches(split: Split | TfdsSplit | FolderSplit, batch_size: int, mean: Sequence[float],
                 std: Sequence[float]) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in batches of exactly `batch_size`.

  Each batch is {'image', 'label', 'mask'}; the last is padded with zero images and label 0, and
  'mask' (float32) is 1 for real examples and 0 for padding. A streamed split (TfdsSplit,
  FolderSplit) yields this process's shard in batches of batch_size / process_count, and every
  process yields the same number of batches (the processes with a smaller shard pad more). A
  FolderSplit's unreadable file is, with bad_images='skip', masked out like padding (and named
  in the log), or with 'error' a ValueError naming it.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if isinstance(split, TfdsSplit):
    return _tfds_eval_batches(split, split.local_batch_size(batch_size), mean, std)
  if isinstance(split, FolderSplit):
    return _folder_eval_batches(split, split.local_batch_size(batch_size), mean, std)
  return _eval_batches(split, batch_size, mean, std)


def _eval_batches(split: Split, batch_size: int, mean: Sequence[float],
                  std: Sequence[float]) -> Iterator[dict[str, np.ndarray]]:
  for start in range(0, len(split), batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    real = len(labels)
    mask = np.zeros(batch_size, dtype=np.float32)
    mask[:real] = 1.0
    if real < batch_size:
      padding = batch_size - real
      images = np.concatenate([images, np.zeros((padding,) + images.shape[1:], np.uint8)])
      labels = np.concatenate([labels, np.zeros(padding, np.int32)])
    yield {'image': normalize(images, mean, std), 'label': labels, 'mask': mask}


def random_crop_and_flip(images: np.ndarray, padding: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Zero-pads each side by `padding`, crops back to the input size at a random offset, and
  mirrors left-right with probability 1/2, independently per image.

  Works on uint8 before normalisation, like torchvision RandomCrop(padding) + RandomHorizontalFlip
  on the PIL image, so padded pixels become (0 - mean) / std after normalisation.
  """
  # A loop over the batch with slices: measured 3.5x faster than one fancy-indexing gather.
  count, height, width, channels = images.shape
  padded = np.zeros((count, height + 2 * padding, width + 2 * padding, channels), images.dtype)
  padded[:, padding:padding + height, padding:padding + width] = images
  top = rng.integers(0, 2 * padding + 1, size=count)
  left = rng.integers(0, 2 * padding + 1, size=count)
  flip = rng.random(count) < 0.5
  out = np.empty_like(images)
  for i in range(count):
    crop = padded[i, top[i]:top[i] + height, left[i]:left[i] + width]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out


# ---------------------------------------------------------------------------------------------
# Streaming (TFDS + tf.data). TensorFlow is imported inside the functions.


def _derived_seed(*words: int) -> int:
  """A seed in [0, 2**31) that is a pure function of `words` (the first names the use)."""
  return int(np.random.SeedSequence(list(words)).generate_state(1)[0] >> 1)


def _tfds_read(split: TfdsSplit, train: bool, file_seed: int | None) -> Any:
  """This process's shard as a tf.data.Dataset of (jpeg_bytes, int32 label), in a fixed order.

  Training reads the files in an order shuffled by `file_seed`; the interleave of files has a
  fixed cycle and block length and runs deterministically, so the order is a function of the seed.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(
      shuffle_seed=file_seed, shuffle_reshuffle_each_iteration=False,
      interleave_cycle_length=_TFDS_INTERLEAVE_CYCLE,
      interleave_block_length=_TFDS_INTERLEAVE_BLOCK, try_autocache=False, options=options)
  builder = tfds.builder(split.name, data_dir=split.data_dir)
  dataset = builder.as_dataset(split=split.shard_spec, shuffle_files=train,
                               decoders={'image': tfds.decode.SkipDecoding()},
                               read_config=read_config)
  begin, end = split.shard_range()
  # A no-op on real data; mock_data ignores split slicing and serves its own count.
  dataset = dataset.take(end - begin)
  return dataset.map(lambda example: (example['image'], tf.cast(example['label'], tf.int32)),
                     num_parallel_calls=tf.data.AUTOTUNE)


def _normalize_tf(image: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
  """float32 pixels in [0, 255] -> (pixels / 255 - mean) / std."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  std = np.asarray(std, np.float32)
  scale = tf.constant(1.0 / (255.0 * std), tf.float32)
  offset = tf.constant(-np.asarray(mean, np.float32) / std, tf.float32)
  return image * scale + offset


@dataclasses.dataclass(frozen=True)
class _ColorAugmentation:
  """The Torch recipe's colour augmentation settings of a streamed dataset (0 = off)."""
  color_jitter: float = 0.0
  pca_lighting: float = 0.0


def _random_resized_crop_window(shape: Any, crop_seed: Any) -> Any:
  """[top, left, height, width] of torchvision RandomResizedCrop's box, stateless.

  The box covers 8%-100% of the image's area with width/height in [3/4, 4/3] (10 tries, then the
  whole image).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_seed,
      min_object_covered=0.0, aspect_ratio_range=IMAGENET_CROP_RATIO,
      area_range=IMAGENET_CROP_SCALE, max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


def _finish_train_image(crop: Any, size: int, flip_seed: Any, mean: Sequence[float],
                        std: Sequence[float], color_jitter: float, pca_lighting: float,
                        jitter_seed: Any, lighting_seed: Any) -> Any:
  """Resize a crop to size x size, flip, colour augmentation, normalisation."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  image = tf.image.resize(crop, (size, size), method='bilinear', antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  # Torch flips after its colour transforms; they are the same on a mirrored image (they act per
  # pixel, or through the whole image's mean), so the order makes no difference.
  image = torch_color_augment(image, color_jitter, pca_lighting, jitter_seed, lighting_seed)
  return _normalize_tf(image, mean, std)


def imagenet_train_transform(jpeg: Any, crop_seed: Any, flip_seed: Any, mean: Sequence[float],
                             std: Sequence[float], size: int = IMAGENET_IMAGE_SIZE,
                             color_jitter: float = 0.0, pca_lighting: float = 0.0,
                             jitter_seed: Any = None, lighting_seed: Any = None) -> Any:
  """torchvision RandomResizedCrop(size) + RandomHorizontalFlip, stateless, then the optional
  colour augmentation of the Torch recipe (torch_color_augment) and normalisation.

  The crop (see _random_resized_crop_window) is decoded alone from the JPEG and resized
  (bilinear, antialiased like PIL) to size x size. Seeds: int (2,) tensors; the same seeds give
  the same output. jitter_seed / lighting_seed are needed only when their option is on.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  window = _random_resized_crop_window(tf.image.extract_jpeg_shape(jpeg), crop_seed)
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return _finish_train_image(image, size, flip_seed, mean, std, color_jitter, pca_lighting,
                             jitter_seed, lighting_seed)


def random_resized_crop_transform(image: Any, crop_seed: Any, flip_seed: Any,
                                  mean: Sequence[float], std: Sequence[float],
                                  size: int = IMAGENET_IMAGE_SIZE, color_jitter: float = 0.0,
                                  pca_lighting: float = 0.0, jitter_seed: Any = None,
                                  lighting_seed: Any = None) -> Any:
  """imagenet_train_transform on a decoded uint8 (H, W, 3) image instead of a JPEG."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  window = _random_resized_crop_window(tf.shape(image), crop_seed)
  crop = tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))
  return _finish_train_image(crop, size, flip_seed, mean, std, color_jitter, pca_lighting,
                             jitter_seed, lighting_seed)


def color_jitter_params(strength: float, seed: Any) -> tuple[Any, Any]:
  """(alphas, order) of fb.resnet.torch's ColorJitter for a stateless seed (int (2,) tensor).

  alphas: float32 (3,), the blend factors of brightness, contrast and saturation, each uniform in
  [1 - strength, 1 + strength]; order: int32 (3,), a uniformly random permutation of (0, 1, 2)
  (Torch's RandomOrder), the order in which the three are applied.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  uniform = tf.random.stateless_uniform((6,), seed=seed, dtype=tf.float32)
  alphas = 1.0 + strength * (2.0 * uniform[:3] - 1.0)
  return alphas, tf.argsort(uniform[3:], stable=True)


def pca_lighting_offset(alphastd: float, seed: Any) -> Any:
  """fb.resnet.torch's Lighting: the float32 (3,) RGB offset, in [0, 1] units, for a seed.

  alpha ~ N(0, alphastd) per principal component; offset = eigvec @ (alpha * eigval).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  alpha = tf.random.stateless_normal((3,), seed=seed, dtype=tf.float32) * alphastd
  eigvec = tf.constant(PCA_EIGVEC, tf.float32)
  return tf.linalg.matvec(eigvec, alpha * tf.constant(PCA_EIGVAL, tf.float32))


def torch_color_augment(image: Any, color_jitter: float, pca_lighting: float, jitter_seed: Any,
                        lighting_seed: Any, scale: float = 255.0) -> Any:
  """fb.resnet.torch's ColorJitter then Lighting on a float32 (H, W, 3) RGB image in [0, scale].

  ColorJitter(brightness = contrast = saturation = color_jitter): in a random order (per image),
  blend the image with black (brightness), with the mean of its greyscale (contrast) and with its
  greyscale (saturation): image * alpha + other * (1 - alpha), alpha ~ U(1 -+ color_jitter).
  Greyscale = 0.299 R + 0.587 G + 0.114 B. Lighting(pca_lighting): adds pca_lighting_offset * scale
  to each channel. As in Torch nothing is clipped, so pixels may leave [0, scale]. With both
  strengths 0 the image is returned unchanged (no op is added). Seeds: int (2,) tensors.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if color_jitter > 0.0:
    alphas, order = color_jitter_params(color_jitter, jitter_seed)
    weights = tf.constant(GREY_WEIGHTS, tf.float32)

    def brightness(x):
      return x * alphas[0]

    def contrast(x):
      grey_mean = tf.reduce_mean(tf.tensordot(x, weights, axes=1))
      return x * alphas[1] + grey_mean * (1.0 - alphas[1])

    def saturation(x):
      grey = tf.tensordot(x, weights, axes=1)[..., None]
      return x * alphas[2] + grey * (1.0 - alphas[2])

    for step in range(3):
      image = tf.switch_case(order[step], [functools.partial(op, image)
                                           for op in (brightness, contrast, saturation)])
  if pca_lighting > 0.0:
    image = image + pca_lighting_offset(pca_lighting, lighting_seed) * scale
  return image


def resize_and_center_crop(image: Any, size: int = IMAGENET_IMAGE_SIZE,
                           resize: int = IMAGENET_RESIZE_SIZE) -> Any:
  """torchvision Resize(resize) (shorter side) + CenterCrop(size): float32 pixels in [0, 255]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  scale = resize / tf.minimum(height, width)
  # As torchvision: the shorter side becomes `resize` exactly, the longer one is truncated.
  new_height = tf.maximum(tf.cast(height * scale, tf.int32), resize)
  new_width = tf.maximum(tf.cast(width * scale, tf.int32), resize)
  new_height = tf.where(height <= width, resize, new_height)
  new_width = tf.where(width < height, resize, new_width)
  image = tf.image.resize(image, tf.stack([new_height, new_width]), method='bilinear',
                          antialias=True)
  top = tf.cast(tf.round(tf.cast(new_height - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - size, tf.float32) / 2.0), tf.int32)
  image = image[top:top + size, left:left + size]
  return tf.ensure_shape(image, (size, size, 3))


def imagenet_eval_transform(jpeg: Any, mean: Sequence[float], std: Sequence[float],
                            size: int = IMAGENET_IMAGE_SIZE,
                            resize: int = IMAGENET_RESIZE_SIZE) -> Any:
  """torchvision Resize(resize) (shorter side) + CenterCrop(size), then normalisation."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  image = tf.io.decode_jpeg(jpeg, channels=3)
  return _normalize_tf(resize_and_center_crop(image, size, resize), mean, std)


class _AugmentationSeeds:
  """Stateless per-example seeds of one (seed, epoch, process): [base, position] per use."""

  def __init__(self, seed: int, epoch: int, process: int):
    self.crop = _derived_seed(_CROP_STREAM, seed, epoch, process)
    self.flip = _derived_seed(_FLIP_STREAM, seed, epoch, process)
    self.jitter = _derived_seed(_JITTER_STREAM, seed, epoch, process)
    self.lighting = _derived_seed(_LIGHTING_STREAM, seed, epoch, process)

  def transform_kwargs(self, position: Any, color: _ColorAugmentation | None) -> dict[str, Any]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def seed(base):
      return tf.stack([tf.constant(base, tf.int64), tf.cast(position, tf.int64)])
    color = color or _ColorAugmentation()
    return dict(crop_seed=seed(self.crop), flip_seed=seed(self.flip),
                color_jitter=color.color_jitter, pca_lighting=color.pca_lighting,
                jitter_seed=seed(self.jitter), lighting_seed=seed(self.lighting))


def _tfds_train_batches(split: TfdsSplit, batch_size: int, steps: int, seed: int, epoch: int,
                        augment: bool, start_index: int, mean: Sequence[float],
                        std: Sequence[float], prefetch: int,
                        color: _ColorAugmentation | None = None
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Batches [start_index, steps) of the epoch, this process's part of each.

  The order is a pure function of (seed, epoch, process): file order and example shuffle are
  seeded from them, and example k of the epoch gets stateless augmentation seeds (base, k).
  Resuming skips the first start_index batches' records before decoding them, so the examples
  after them keep their positions and seeds.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  local_batch_size = split.local_batch_size(batch_size)
  process = split.process_index
  size = split.image_shape[0]
  dataset = _tfds_read(split, train=True,
                       file_seed=_derived_seed(_FILE_ORDER_STREAM, seed, epoch, process))
  dataset = dataset.shuffle(IMAGENET_SHUFFLE_BUFFER,
                            seed=_derived_seed(_EXAMPLE_ORDER_STREAM, seed, epoch, process),
                            reshuffle_each_iteration=False)
  dataset = dataset.take(steps * local_batch_size).enumerate()
  dataset = dataset.skip(start_index * local_batch_size)
  seeds = _AugmentationSeeds(seed, epoch, process)

  def transform(position, example):
    jpeg, label = example
    if augment:
      image = imagenet_train_transform(jpeg, mean=mean, std=std, size=size,
                                       **seeds.transform_kwargs(position, color))
    else:
      image = imagenet_eval_transform(jpeg, mean, std, size, resize_size_for(size))
    return {'image': image, 'label': label}

  dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  dataset = dataset.prefetch(max(prefetch, 1))
  return _numpy_batches(dataset)


def _tfds_eval_batches(split: TfdsSplit, local_batch_size: int, mean: Sequence[float],
                       std: Sequence[float]) -> Iterator[dict[str, np.ndarray]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  size = split.image_shape[0]
  dataset = _tfds_read(split, train=False, file_seed=None)
  dataset = dataset.map(
      lambda jpeg, label: {'image': imagenet_eval_transform(jpeg, mean, std, size,
                                                            resize_size_for(size)),
                           'label': label},
      num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(local_batch_size).prefetch(2)
  # Same count on every process: enough batches for the largest shard.
  num_batches = -(-split.max_shard_size // local_batch_size)
  padding_pixel = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32))
  return _padded_eval_batches(_numpy_batches(dataset), num_batches, local_batch_size,
                              split.image_shape, padding_pixel)


# ---------------------------------------------------------------------------------------------
# Image folders: files decoded by PIL inside tf.data.
#
# Unreadable files. Nothing is decoded when the dataset is loaded (a scan of a large folder would
# take as long as an epoch); a file is found unreadable when an epoch reaches it: PIL cannot open
# or fully decode it (not an image, truncated, corrupt, vanished, no permission, too large).
# bad_images='error': the batch that holds it raises a ValueError naming the file and PIL's reason,
# before the training step on that batch (the CLI prints it as `error: ...`; nothing half-done is
# saved, as checkpoints are only written between steps). bad_images='skip': the file is named in
# a WARNING the first time a process meets it, and each epoch's skipped files are counted (and
# named) in a WARNING when the epoch's batches are done. In training, the example is replaced by
# the next readable file in this process's shard (in file order, wrapping around): a function of
# the files alone, not of timing or threads, so an epoch is still a pure function of (seed, epoch)
# and a resumed run sees the same batches. In evaluation it is masked out like padding, so it
# counts in no metric (and no other example is counted twice). A shard without any readable file
# is an error in both modes.


class UnreadableImageError(ValueError):
  """An image file that PIL cannot open or decode; `path` and `reason` say which and why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'Cannot read image file {path}: {reason}')
    self.path = path
    self.reason = reason


def read_image(path: str) -> np.ndarray:
  """uint8 (H, W, 3) RGB pixels of an image file (any format PIL reads; first frame of an
  animation; alpha dropped), or UnreadableImageError naming the file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error, ... for
    # bad files; every one of them makes this file unreadable, not the run broken.
    raise UnreadableImageError(path, f'{type(e).__name__}: {e}') from e
  if array.ndim != 3 or array.shape[2] != 3 or not array.size:
    raise UnreadableImageError(path, f'decoded to an array of shape {array.shape}')
  return array


_OK, _UNREADABLE, _NONE_READABLE = 0, 1, 2
_PLACEHOLDER_IMAGE = np.zeros((1, 1, 3), np.uint8)  # Stands for an unreadable file's pixels.


class _FolderReader:
  """tf.numpy_function body: position k in this process's shard -> the decoded file.

  Returns (uint8 (H, W, 3) image, int32 label, int32 status, path, reason): status _OK, or
  _UNREADABLE with the unreadable file's path and PIL's reason (the image then is the next
  readable file's, with its label, when `replace`; else a 1x1 placeholder), or _NONE_READABLE.
  """

  def __init__(self, split: FolderSplit, replace: bool):
    self.paths = split.paths
    self.labels = split.labels
    self.shard = split.shard_indices()
    self.replace = replace and split.bad_images == 'skip'

  def __call__(self, position: Any) -> tuple[Any, ...]:
    k = int(position)
    i = int(self.shard[k])
    try:
      return read_image(self.paths[i]), self.labels[i], np.int32(_OK), b'', b''
    except UnreadableImageError as e:
      path, reason = e.path.encode(), e.reason.encode()
    if not self.replace:
      return _PLACEHOLDER_IMAGE, self.labels[i], np.int32(_UNREADABLE), path, reason
    for step in range(1, len(self.shard)):
      j = int(self.shard[(k + step) % len(self.shard)])
      try:
        return read_image(self.paths[j]), self.labels[j], np.int32(_UNREADABLE), path, reason
      except UnreadableImageError:
        continue
    return _PLACEHOLDER_IMAGE, self.labels[i], np.int32(_NONE_READABLE), path, reason


def _read_folder_example(reader: _FolderReader, position: Any) -> tuple[Any, ...]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  image, label, status, path, reason = tf.numpy_function(
      reader, [position], [tf.uint8, tf.int32, tf.int32, tf.string, tf.string], stateful=False)
  image.set_shape((None, None, 3))
  for scalar in (label, status, path, reason):
    scalar.set_shape(())
  return image, label, status, path, reason


def _folder_train_batches(split: FolderSplit, batch_size: int, steps: int, seed: int, epoch: int,
                          augment: bool, start_index: int, mean: Sequence[float],
                          std: Sequence[float], prefetch: int,
                          color: _ColorAugmentation | None) -> Iterator[dict[str, np.ndarray]]:
  """Batches [start_index, steps) of the epoch, this process's part of each.

  The epoch reads this process's shard in an order shuffled by (seed, epoch, process); the
  example at position k gets stateless augmentation seeds (base, k), as in _tfds_train_batches.
  Resuming starts at position start_index * local batch size without reading what precedes it.
  Files are decoded in parallel (tf.data map; PIL releases the GIL while decoding), in order.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  local_batch_size = split.local_batch_size(batch_size)
  process = split.process_index
  size = split.image_shape[0]
  order = np.random.default_rng([_FOLDER_ORDER_STREAM, seed, epoch, process]).permutation(
      len(split.shard_indices()))
  positions = np.arange(start_index * local_batch_size, steps * local_batch_size)
  reader = _FolderReader(split, replace=True)
  seeds = _AugmentationSeeds(seed, epoch, process)

  def transform(position, shard_position):
    image, label, status, path, reason = _read_folder_example(reader, shard_position)
    if augment:
      image = random_resized_crop_transform(image, mean=mean, std=std, size=size,
                                            **seeds.transform_kwargs(position, color))
    else:
      image = _normalize_tf(resize_and_center_crop(image, size, split.resize_size), mean, std)
    return {'image': image, 'label': label, 'status': status, 'path': path, 'reason': reason}

  dataset = tf.data.Dataset.from_tensor_slices((positions, order[positions]))
  dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  dataset = dataset.prefetch(max(prefetch, 1))
  return _checked_folder_batches(dataset, split, f'Training epoch {epoch}', evaluation=False)


def _folder_eval_batches(split: FolderSplit, local_batch_size: int, mean: Sequence[float],
                         std: Sequence[float]) -> Iterator[dict[str, np.ndarray]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  size, resize = split.image_shape[0], split.resize_size
  reader = _FolderReader(split, replace=False)

  def transform(shard_position):
    image, label, status, path, reason = _read_folder_example(reader, shard_position)
    image = _normalize_tf(resize_and_center_crop(image, size, resize), mean, std)
    return {'image': image, 'label': label, 'status': status, 'path': path, 'reason': reason}

  dataset = tf.data.Dataset.range(len(split.shard_indices()))
  dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local_batch_size).prefetch(2)
  num_batches = -(-split.max_shard_size // local_batch_size)
  padding_pixel = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32))
  batches = _checked_folder_batches(dataset, split, 'Evaluation', evaluation=True)
  return _padded_eval_batches(batches, num_batches, local_batch_size, split.image_shape,
                              padding_pixel)


_warned_unreadable: set[str] = set()  # Files this process has named in a warning already.
_warned_lock = threading.Lock()


def _checked_folder_batches(dataset: Any, split: FolderSplit, what: str,
                            evaluation: bool) -> Iterator[dict[str, np.ndarray]]:
  """The numpy batches, with unreadable files handled per split.bad_images (see above).

  Evaluation batches get a float32 'valid' entry, 0 for an unreadable (masked-out) example.
  """
  skipped = []
  action = ('masked out of the metrics' if evaluation else
            'replaced by the next readable file of this process\'s shard')
  try:
    for batch in dataset.as_numpy_iterator():
      status = batch.pop('status')
      paths, reasons = batch.pop('path'), batch.pop('reason')
      for b in np.flatnonzero(status != _OK):
        path, reason = paths[b].decode(errors='replace'), reasons[b].decode(errors='replace')
        if status[b] == _NONE_READABLE:
          raise ValueError(f'No file of {split.directory} in process {split.process_index}\'s '
                           f'shard is a readable image (the first: {path}: {reason}).')
        if split.bad_images == 'error':
          raise ValueError(
              f'Cannot read image file {path}: {reason}. Fix or delete it, or pass '
              '--config.bad_images=skip to skip unreadable files (each is named in the log).')
        skipped.append(path)
        with _warned_lock:
          first = path not in _warned_unreadable
          _warned_unreadable.add(path)
        if first:
          logging.warning('Skipping unreadable image file %s (%s); %s.', path, reason, action)
      batch = {'image': batch['image'], 'label': batch['label']}
      if evaluation:
        batch['valid'] = (status == _OK).astype(np.float32)
      yield batch
  finally:
    if skipped:
      shown = ', '.join(skipped[:10]) + (', ...' if len(skipped) > 10 else '')
      logging.warning('%s of %s (process %d): skipped %d unreadable image file(s), %s: %s.',
                      what, split.directory, split.process_index, len(skipped), action, shown)


def _padded_eval_batches(batches: Iterator[dict[str, np.ndarray]], num_batches: int,
                         batch_size: int, image_shape: tuple[int, ...],
                         padding_pixel: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """`num_batches` batches of `batch_size` with a mask, padded as _eval_batches pads.

  A batch's optional 'valid' entry (1 = real example) masks out examples inside it, whose
  images become padding too.
  """
  try:
    for _ in range(num_batches):
      batch = next(batches, None)
      real = 0 if batch is None else len(batch['label'])
      mask = np.zeros(batch_size, np.float32)
      if real:
        mask[:real] = batch.get('valid', 1.0)
      if real < batch_size or not mask.all():
        # Padding looks like a black image after normalisation, as in the in-memory path.
        images = np.empty((batch_size,) + tuple(image_shape), np.float32)
        images[...] = padding_pixel
        labels = np.zeros(batch_size, np.int32)
        if real:
          images[:real] = batch['image']
          labels[:real] = batch['label']
          images[mask == 0] = padding_pixel
        batch = {'image': images, 'label': labels}
      yield {'image': batch['image'], 'label': batch['label'], 'mask': mask}
  finally:
    close = getattr(batches, 'close', None)
    if close is not None:
      close()  # Finishes the source now (e.g. its log of skipped files), not at garbage collection.


def _numpy_batches(dataset: Any) -> Iterator[dict[str, np.ndarray]]:
  for batch in dataset.as_numpy_iterator():
    yield {'image': batch['image'], 'label': batch['label']}


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  # Cached: every batch of an epoch needs the same permutation. Read-only, as it is shared.
  order = np.random.default_rng([_PERMUTATION_STREAM, seed, epoch]).permutation(num_examples)
  order.flags.writeable = False
  return order


def _check_seed(name: str, value: int) -> int:
  # numpy seed sequences need non-negative integers.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f'{name} must be a non-negative integer, got {value!r}.')
  return int(value)
