"""Dataset names: `load_dataset` from a config, and what a name's eval preprocessing is without
loading any data (`preprocessing_of`, `eval_transform`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from pyramidnet_jax.data import fashion_mnist
from pyramidnet_jax.data import folder
from pyramidnet_jax.data import images
from pyramidnet_jax.data import tfds_sources
from pyramidnet_jax.data import transforms
from pyramidnet_jax.data.arrays import split_validation
from pyramidnet_jax.data.source import Dataset
from pyramidnet_jax.data.transforms import IMAGENET_IMAGE_SIZE
from pyramidnet_jax.data.transforms import Preprocessing

FOLDER_PREFIX = folder.PREFIX
DATASETS = ('cifar10', 'cifar100', 'fashion_mnist', 'imagenet2012', FOLDER_PREFIX + '/path/to/root')


def load_dataset(config: Any, process_index: int = 0, process_count: int = 1,
                 platform: str | None = None) -> Dataset:
  """The dataset named by `config.dataset`, with the configured validation hold-out.

  Reads config.dataset, data_dir, validation_fraction, validation_seed and augment, and for the
  streamed datasets image_size, color_jitter, pca_lighting and (folders) bad_images and
  max_image_pixels (larger files count as unreadable); a config without these gets their
  defaults. Never downloads: a dataset that is not on disk
  raises an error that says how to provide it. CIFAR and Fashion-MNIST are loaded into memory
  (every process holds all of it and keeps its slice of each batch); imagenet2012 and
  `folder:ROOT` are streamed, each process reading only its shard. Every split yields process
  `process_index` of `process_count`'s part of each global batch (pass jax.process_index(),
  jax.process_count()). In-memory batches hold uint8 images; streamed ones hold the image dtype
  transforms.streamed_image_dtype chooses for the JAX `platform` that will train on them
  (default: JAX's default backend).
  """
  name = config.dataset
  fraction = float(config.validation_fraction)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'validation_fraction must be in [0, 1), got {fraction}.')
  image_size = int(getattr(config, 'image_size', IMAGENET_IMAGE_SIZE))
  color_jitter = float(getattr(config, 'color_jitter', 0.0))
  pca_lighting = float(getattr(config, 'pca_lighting', 0.0))
  bad_images = str(getattr(config, 'bad_images', 'skip'))
  max_image_pixels = int(getattr(config, 'max_image_pixels', images.DEFAULT_MAX_IMAGE_PIXELS))
  if image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}.')
  if max_image_pixels < 1:
    raise ValueError(f'max_image_pixels must be positive, got {max_image_pixels}.')
  if bad_images not in folder.BAD_IMAGE_POLICIES:
    raise ValueError(f'bad_images must be one of {folder.BAD_IMAGE_POLICIES}, got '
                     f'{bad_images!r}.')
  streamed = name == 'imagenet2012' or name.startswith(FOLDER_PREFIX)
  if not streamed:
    if image_size != IMAGENET_IMAGE_SIZE or color_jitter or pca_lighting:
      raise ValueError(
          f'config.image_size, color_jitter and pca_lighting apply to imagenet2012 and '
          f'{FOLDER_PREFIX}ROOT datasets only; {name} uses its own image size and augmentation: '
          f'leave them at {IMAGENET_IMAGE_SIZE}, 0 and 0.')
  if name == 'fashion_mnist':
    dataset = fashion_mnist.load(config.data_dir or fashion_mnist.DEFAULT_DIR)
  elif name in ('cifar10', 'cifar100'):
    dataset = tfds_sources.load_cifar(name, config.data_dir or None)
  elif name == 'imagenet2012':
    dataset = tfds_sources.load_imagenet(config.data_dir or None, fraction, process_index,
                                         process_count, image_size, streamed_image_dtype(platform))
  elif name.startswith(FOLDER_PREFIX):
    dataset = folder.load(name, fraction, int(config.validation_seed), process_index,
                          process_count, image_size, bad_images, max_image_pixels,
                          streamed_image_dtype(platform))
  else:
    raise ValueError(f'Unknown dataset {name!r}: expected one of {DATASETS}.')

  if not streamed:  # The streamed loaders hold out validation and shard by process themselves.
    if fraction > 0.0:
      train, validation = split_validation(dataset.train, fraction, int(config.validation_seed))
      dataset = dataclasses.replace(dataset, train=train, validation=validation)
    dataset = dataset.replace_splits(process_index=process_index, process_count=process_count)
  if streamed:
    dataset = dataset.with_preprocessing(color_jitter=color_jitter, pca_lighting=pca_lighting)
  if not config.augment:
    dataset = dataset.with_preprocessing(augmentation='none')
  return dataset


def streamed_image_dtype(platform: str | None = None) -> str:
  """transforms.streamed_image_dtype of `platform`, by default JAX's default backend."""
  if platform is None:
    import jax  # pylint: disable=g-import-not-at-top
    platform = jax.default_backend()
  return transforms.streamed_image_dtype(platform)


def preprocessing_of(dataset_name: str | None,
                     image_size: int = IMAGENET_IMAGE_SIZE) -> Preprocessing:
  """The Preprocessing of the dataset named `dataset_name`, read from no file. `image_size` is
  config.image_size, used by imagenet2012 and folder:ROOT only (in-memory datasets keep their
  stored size). The colour options are left off: they act on training only."""
  if dataset_name == 'fashion_mnist':
    return fashion_mnist.PREPROCESSING
  if dataset_name in ('cifar10', 'cifar100'):
    return tfds_sources.CIFAR_PREPROCESSING
  if dataset_name == 'imagenet2012' or (dataset_name or '').startswith(FOLDER_PREFIX):
    return transforms.imagenet_preprocessing(image_size)
  raise ValueError(f'Unknown dataset {dataset_name!r}: expected one of {DATASETS}.')


def image_shape_of(dataset_name: str | None,
                   image_size: int = IMAGENET_IMAGE_SIZE) -> tuple[int, ...]:
  """(H, W, C) of the eval batches' images of the dataset named `dataset_name`."""
  if dataset_name == 'fashion_mnist':
    return fashion_mnist.IMAGE_SHAPE
  if dataset_name in ('cifar10', 'cifar100'):
    return tfds_sources.CIFAR_IMAGE_SHAPE
  size = preprocessing_of(dataset_name, image_size).image_size
  return (size, size, 3)


def eval_transform(dataset_name: str | None, image_size: int = IMAGENET_IMAGE_SIZE,
                   channels: int = 3,
                   platform: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
  """The evaluation transform of one image of the dataset named `dataset_name`: uint8 (H, W,
  channels) pixels of any size -> float32 image_shape_of(dataset_name, image_size), exactly as
  the dataset's eval batches hold that image (see transforms.image_eval_transform).

  fashion_mnist: 28x28 grey, cifar10/cifar100: 32x32 RGB (other sizes are first resized to
  these); imagenet2012 and folder:ROOT: RGB, shorter side resized to round(image_size * 256 /
  224), centre crop of image_size. ValueError for an unknown name (None included: a converted
  model records no dataset) or when `channels` is not the dataset's. `platform`: as in
  load_dataset, whose streamed eval batches round pixels to uint8 on a GPU or TPU.
  """
  preprocessing = preprocessing_of(dataset_name, image_size)
  if preprocessing.image_size is not None:  # Streamed.
    preprocessing = dataclasses.replace(preprocessing,
                                        image_dtype=streamed_image_dtype(platform))
  image_shape = image_shape_of(dataset_name, image_size)
  if channels != image_shape[-1]:
    raise ValueError(f'{dataset_name} images have {image_shape[-1]} channel(s), not {channels}.')
  return transforms.image_eval_transform(preprocessing, image_shape)
