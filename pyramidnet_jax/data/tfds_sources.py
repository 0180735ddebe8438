"""Prepared TFDS datasets, never downloaded: CIFAR-10/100 copied into memory (ArraySplit) and
ImageNet streamed from its files through tf.data (TfdsSplit).

TensorFlow and TFDS are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator

import numpy as np

from pyramidnet_jax.data import source
from pyramidnet_jax.data import streaming
from pyramidnet_jax.data import tf_import
from pyramidnet_jax.data import transforms
from pyramidnet_jax.data.arrays import ArraySplit
from pyramidnet_jax.data.source import Dataset
from pyramidnet_jax.data.transforms import Preprocessing

# Per-channel statistics in [0, 1] units: the authors' values, used for both CIFARs.
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CIFAR_IMAGE_SHAPE = (32, 32, 3)
CIFAR_PREPROCESSING = Preprocessing(CIFAR_MEAN, CIFAR_STD, 'cifar')

# Examples in the tf.data shuffle buffer of each process (encoded JPEGs, ~110 KB each: ~1.1 GB).
# Files are also read in a shuffled order, so the buffer only has to mix within a few files.
IMAGENET_SHUFFLE_BUFFER = 10_000
# Files read at once; fixed (not AUTOTUNE) because the interleave order depends on it.
_INTERLEAVE_CYCLE = 16
_INTERLEAVE_BLOCK = 16
# Examples per tf.data batch when copying a TFDS split into memory (bounds TF's peak memory).
_READ_BATCH = 10_000


@dataclasses.dataclass(frozen=True)
class TfdsSplit(streaming.StreamedSplit):
  """Examples [start, stop) of a prepared TFDS split, streamed from disk, never held in memory.

  Process `process_index` of `process_count` reads only its shard of that range (see
  `shard_range`); `len()` is the size of the whole range, over all processes. `image_shape` is
  the shape of the batches' images, after cropping (preprocessing.image_size).
  """
  name: str  # TFDS builder name, e.g. 'imagenet2012' (also the dataset's name).
  split: str  # TFDS split name, e.g. 'train'.
  start: int
  stop: int
  preprocessing: Preprocessing
  data_dir: str | None = None  # None: the TFDS default.
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if not 0 <= self.start < self.stop:
      raise ValueError(f'TfdsSplit {self.split} needs 0 <= start < stop, got [{self.start}, '
                       f'{self.stop}).')
    self._check_streamed()
    if self.stop - self.start < self.process_count:
      raise ValueError(f'{self.stop - self.start} examples cannot be shared by '
                       f'{self.process_count} processes.')

  def __len__(self) -> int:
    return self.stop - self.start

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

  def train_batches(self, batch_size: int, seed: int, epoch: int, start_index: int = 0,
                    prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Batches [start_index, steps) of the epoch, this process's part of each.

    The order is a pure function of (seed, epoch, process): file order and example shuffle are
    seeded from them, and example k of the epoch gets stateless augmentation seeds (base, k).
    Resuming skips the first start_index batches' records before decoding them, so the examples
    after them keep their positions and seeds. `prefetch` is tf.data's prefetch depth.
    """
    tf = tf_import.tensorflow()

    steps, seed, epoch = self._train_arguments(batch_size, seed, epoch, start_index)
    local_batch_size = self.local_batch_size(batch_size)
    process = self.process_index
    p = self.preprocessing
    augment = p.augmentation != 'none'
    dataset = self._read(train=True, file_seed=source.derived_seed(
        source.FILE_ORDER_STREAM, seed, epoch, process))
    dataset = dataset.shuffle(IMAGENET_SHUFFLE_BUFFER, seed=source.derived_seed(
        source.EXAMPLE_ORDER_STREAM, seed, epoch, process), reshuffle_each_iteration=False)
    dataset = dataset.take(steps * local_batch_size).enumerate()
    dataset = dataset.skip(start_index * local_batch_size)
    seeds = streaming.AugmentationSeeds(seed, epoch, process)

    def transform(position, example):
      jpeg, label = example
      if augment:
        image = transforms.imagenet_train_transform(
            jpeg, mean=p.mean, std=p.std, size=p.image_size, image_dtype=p.image_dtype,
            **seeds.transform_kwargs(position, p))
      else:
        image = transforms.imagenet_eval_transform(jpeg, p.mean, p.std, p.image_size,
                                                   p.resize_size, p.image_dtype)
      return {'image': image, 'label': label}

    dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(local_batch_size, drop_remainder=True)
    dataset = dataset.prefetch(max(prefetch, 1))
    return streaming.numpy_batches(dataset)

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in file order: this process's shard in batches of batch_size /
    process_count with a 'mask', padded to eval_steps batches on every process."""
    tf = tf_import.tensorflow()

    num_batches = self.eval_steps(batch_size)
    local_batch_size = self.local_batch_size(batch_size)
    p = self.preprocessing
    dataset = self._read(train=False, file_seed=None)
    dataset = dataset.map(
        lambda jpeg, label: {'image': transforms.imagenet_eval_transform(
            jpeg, p.mean, p.std, p.image_size, p.resize_size, p.image_dtype), 'label': label},
        num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(local_batch_size).prefetch(2)
    return streaming.padded_eval_batches(streaming.numpy_batches(dataset), num_batches,
                                         local_batch_size, self.image_shape, p.padding_pixel)

  def _read(self, train: bool, file_seed: int | None) -> Any:
    """This process's shard as a tf.data.Dataset of (jpeg_bytes, int32 label), in a fixed order.

    Training reads the files in an order shuffled by `file_seed`; the interleave of files has a
    fixed cycle and block length and runs deterministically, so the order is a function of the
    seed.
    """
    tf = tf_import.tensorflow()
    tfds = tf_import.tensorflow_datasets()

    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(
        shuffle_seed=file_seed, shuffle_reshuffle_each_iteration=False,
        interleave_cycle_length=_INTERLEAVE_CYCLE, interleave_block_length=_INTERLEAVE_BLOCK,
        try_autocache=False, options=options)
    builder = tfds.builder(self.name, data_dir=self.data_dir)
    dataset = builder.as_dataset(split=self.shard_spec, shuffle_files=train,
                                 decoders={'image': tfds.decode.SkipDecoding()},
                                 read_config=read_config)
    begin, end = self.shard_range()
    # A no-op on real data; mock_data ignores split slicing and serves its own count.
    dataset = dataset.take(end - begin)
    return dataset.map(lambda example: (example['image'], tf.cast(example['label'], tf.int32)),
                       num_parallel_calls=tf.data.AUTOTUNE)


def load_cifar(name: str, data_dir: str | None) -> Dataset:
  """'cifar10' or 'cifar100', both splits copied into memory."""
  tfds = tf_import.tensorflow_datasets()

  builder = tfds.builder(name, data_dir=data_dir)
  splits = {split: _read_split(builder, split, data_dir) for split in ('train', 'test')}
  label_feature = builder.info.features['label']
  return Dataset(
      name=name, train=splits['train'], test=splits['test'], validation=None,
      num_classes=label_feature.num_classes, class_names=tuple(label_feature.names),
      preprocessing=CIFAR_PREPROCESSING)


def _read_split(builder: Any, split: str, data_dir: str | None) -> ArraySplit:
  """Copies a prepared TFDS split into memory; never downloads."""
  tf = tf_import.tensorflow()
  tfds = tf_import.tensorflow_datasets()

  # The missing-data check is as_dataset's own: builder.is_prepared() stays False under
  # tfds.testing.mock_data, which serves data all the same. as_dataset(batch_size=-1) is avoided
  # because it aborts the process under mock_data; batched reads work on both.
  try:
    dataset = builder.as_dataset(split=split).batch(_READ_BATCH)
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
  return ArraySplit(images, labels, preprocessing=CIFAR_PREPROCESSING, name=builder.name)


def load_imagenet(data_dir: str | None, validation_fraction: float, process_index: int,
                  process_count: int, image_size: int = transforms.IMAGENET_IMAGE_SIZE,
                  image_dtype: str = 'float32') -> Dataset:
  """ImageNet as streaming splits: train 'train', test 'validation' (the official 50,000), in
  batches of `image_dtype` images (transforms.streamed_image_dtype).

  The validation hold-out is the first round(fraction * N) examples of 'train', by TFDS split
  slicing. It is not stratified (unlike the in-memory datasets') and config.validation_seed is not
  used: TFDS shuffles ImageNet's training examples when it writes the files, so the first examples
  are a class-balanced-in-expectation random sample (~fraction of each class's ~1,300 images), and
  slicing lets each process read only its part without an index of labels.
  """
  tfds = tf_import.tensorflow_datasets()

  name = 'imagenet2012'
  builder = tfds.builder(name, data_dir=data_dir)
  sizes = {split: _split_size(builder, split, data_dir) for split in ('train', 'validation')}
  preprocessing = transforms.imagenet_preprocessing(image_size, image_dtype)
  make = functools.partial(TfdsSplit, name, preprocessing=preprocessing, data_dir=data_dir,
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
      preprocessing=preprocessing)


def _split_size(builder: Any, split: str, data_dir: str | None) -> int:
  """Examples in a prepared TFDS split; a FileNotFoundError that says how to prepare it if not."""
  tf = tf_import.tensorflow()

  # As in _read_split, as_dataset is the test of whether the data is there: is_prepared() is
  # False under tfds.testing.mock_data, which serves data all the same.
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
