"""Classify image files with a trained or converted network, as its evaluation would see them.

Each image is decoded by the same reader and goes through the same eval transform that the
network's evaluation data goes through (`data.eval_transform`): for ImageNet-stem networks and
image-folder datasets, the shorter side resized and the centre cropped; for the small-image
datasets, the image resized to their size (28x28 grey for Fashion-MNIST, 32x32 RGB for CIFAR)
and normalised with their statistics.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from pyramidnet_jax import data
from pyramidnet_jax.data.images import DEFAULT_MAX_IMAGE_PIXELS
from pyramidnet_jax.interop import loading

IMAGENET_IMAGE_SIZE = 224


def find_images(paths: Sequence[str]) -> Iterator[str]:
  """The given files, and the image files under the given folders (sorted, recursively)."""
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
          if name.lower().endswith(data.IMAGE_EXTENSIONS):
            yield os.path.join(root, name)
    else:
      yield path


def transform_of(loaded: loading.Loaded) -> Any:
  """(The eval transform of the data `loaded` was trained on (uint8 image -> network input),
  channels). A network that records no dataset (converted from a .pth file without its
  sidecar) gets ImageNet's transform if its stem is ImageNet's, which is the authors' for such
  networks; a small-image network's data (Fashion-MNIST, CIFAR, a folder) cannot be told from
  its weights, and guessing one would feed it other pixels, so that is an error."""
  channels = int(jax.tree.leaves(loaded.variables['params']['conv1'])[0].shape[2])
  dataset = loaded.dataset
  if dataset is None:
    if loaded.model_config['stem'] != 'imagenet':
      raise ValueError(
          f'{loaded.path} records no dataset, and the eval transform and class names of a '
          f'small-image network depend on it: pass --dataset=fashion_mnist, cifar10, cifar100 or '
          f'{data.FOLDER_PREFIX}ROOT (or convert the .pth file again with --dataset).')
    dataset = 'imagenet2012'
  image_size = loaded.image_size or IMAGENET_IMAGE_SIZE
  return data.eval_transform(dataset, image_size, channels), channels


def _read(path: str, transform: Any, channels: int, max_pixels: int) -> np.ndarray:
  """The network input of one file, or a ValueError naming the file and the problem."""
  if not os.path.exists(path):
    raise ValueError(f'{path}: no such file')
  if os.path.isdir(path):
    raise ValueError(f'{path}: is a directory')
  try:
    return transform(data.read_image(path, channels, max_pixels))
  except data.UnreadableImageError as e:
    raise ValueError(f'{path}: unreadable image ({e.reason})') from None


def predict(loaded: loading.Loaded, paths: Sequence[str], top_k: int = 5, batch_size: int = 32,
            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
            ) -> tuple[list[dict[str, Any]], list[str]]:
  """([{'path', 'top': [(class, probability), ...]}], [error line, ...]) for the images.

  A file that cannot be read (or is larger than max_image_pixels, width x height) is an error
  line naming it; every other image is still classified."""
  transform, channels = transform_of(loaded)
  names = loaded.class_names or tuple(str(i) for i in range(loaded.num_classes))
  forward = jax.jit(lambda v, x: jax.nn.softmax(loaded.model.apply(v, x, train=False)))
  top_k = max(1, min(top_k, loaded.num_classes))
  paths = list(find_images(paths))
  batch_size = max(1, min(batch_size, len(paths)))  # A few images: no padded work.
  results, errors = [], []
  batch_paths, batch_images = [], []

  def flush():
    images = np.stack(batch_images)
    padded = np.concatenate([images, np.zeros((batch_size - len(images),) + images.shape[1:],
                                              np.float32)])  # One compiled shape for all.
    probabilities = np.asarray(forward(loaded.variables, padded))[:len(images)]
    for path, p in zip(batch_paths, probabilities):
      order = np.argsort(-p, kind='stable')[:top_k]
      results.append({'path': path, 'top': [(names[i], float(p[i])) for i in order]})
    batch_paths.clear()
    batch_images.clear()

  for path in paths:
    try:
      batch_images.append(_read(path, transform, channels, max_image_pixels))
    except ValueError as e:
      errors.append(str(e))
      continue
    batch_paths.append(path)
    if len(batch_images) == batch_size:
      flush()
  if batch_images:
    flush()
  return results, errors
