"""Classify image files with a trained or converted network.

  python -m pyramidnet_jax.predict --workdir=runs/demo shirt.png boots/
  python -m pyramidnet_jax.predict --workdir=models/pyr101 --top_k=3 photos/

Arguments are image files or folders (searched recursively). Each image goes through the eval
transform of the data the network was trained on, the same as torchvision's for the authors'
models: ImageNet-stem networks and image-folder datasets resize the shorter side to 256 and
centre-crop 224 (in proportion for another config.image_size), small-image networks resize the
whole image to their training size (32x32 RGB for CIFAR, 28x28 grey for Fashion-MNIST, whose
garments are light on a black background). A file that cannot be read as an
image gets a one-line error naming it; the others are still classified, and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from pyramidnet_jax import compile_cache
from pyramidnet_jax import input_pipeline
from pyramidnet_jax import loading
from pyramidnet_jax import train

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm',
                    '.pgm')


class Transform:
  """PIL image -> normalised float32 (H, W, C) array, as the network saw its eval data."""

  def __init__(self, dataset: str | None, model_config: dict[str, Any], channels: int,
               image_size: int = input_pipeline.IMAGENET_IMAGE_SIZE):
    self.crop = image_size
    self.resize = input_pipeline.resize_size_for(image_size)
    if dataset == 'fashion_mnist':
      self.mean, self.std, self.size = (input_pipeline.FASHION_MNIST_MEAN,
                                        input_pipeline.FASHION_MNIST_STD, (28, 28))
    elif dataset in ('cifar10', 'cifar100'):
      self.mean, self.std, self.size = input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, (32, 32)
    elif (dataset == 'imagenet2012' or (dataset or '').startswith('folder:') or
          (dataset is None and model_config['stem'] == 'imagenet')):
      self.mean, self.std = input_pipeline.IMAGENET_MEAN, input_pipeline.IMAGENET_STD
      self.size = None  # Resize the shorter side, then centre-crop.
    elif dataset is None:  # A converted small-image network: CIFAR statistics and size.
      self.mean, self.std, self.size = input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, (32, 32)
    else:
      raise ValueError(f'predict knows no eval transform for dataset {dataset!r}.')
    self.mode = 'L' if channels == 1 else 'RGB'
    if len(self.mean) != channels:
      self.mean, self.std = (np.mean(self.mean),) * channels, (np.mean(self.std),) * channels

  def __call__(self, image: Any) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = image.convert(self.mode)
    if self.size is None:
      resize, crop = self.resize, self.crop
      width, height = image.size
      scale = resize / min(width, height)
      # torchvision's Resize(256) (for crop 224): the shorter side becomes 256, the longer one is
      # truncated.
      new = (resize, int(height * scale)) if width <= height else (int(width * scale), resize)
      image = image.resize(new, Image.BILINEAR)
      left = int(round((new[0] - crop) / 2.0))
      top = int(round((new[1] - crop) / 2.0))
      image = image.crop((left, top, left + crop, top + crop))
    elif image.size != self.size[::-1]:
      image = image.resize(self.size[::-1], Image.BILINEAR)
    array = np.asarray(image, np.float32) / 255.0
    if array.ndim == 2:
      array = array[..., None]
    return (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def find_images(paths: Sequence[str]) -> Iterator[str]:
  """The given files, and the image files under the given folders (sorted, recursively)."""
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
          if name.lower().endswith(IMAGE_EXTENSIONS):
            yield os.path.join(root, name)
    else:
      yield path


def read_image(path: str, transform: Transform) -> np.ndarray:
  """The transformed image, or a ValueError whose message names the file and the problem."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image.load()
      return transform(image)
  except FileNotFoundError:
    raise ValueError(f'{path}: no such file') from None
  except IsADirectoryError:
    raise ValueError(f'{path}: is a directory') from None
  except UnidentifiedImageError:
    raise ValueError(f'{path}: not an image PIL can read') from None
  except (OSError, SyntaxError, ValueError) as e:  # Truncated or corrupt image data.
    raise ValueError(f'{path}: unreadable image ({e})') from None


def predict(loaded: loading.Loaded, paths: Sequence[str], top_k: int = 5,
            batch_size: int = 32) -> tuple[list[dict[str, Any]], list[str]]:
  """([{'path', 'top': [(class, probability), ...]}], [error line, ...]) for the images."""
  import jax  # pylint: disable=g-import-not-at-top
  channels = int(jax.tree.leaves(loaded.variables['params']['conv1'])[0].shape[2])
  image_size = loaded.config.get('image_size', input_pipeline.IMAGENET_IMAGE_SIZE) \
      if loaded.config is not None else input_pipeline.IMAGENET_IMAGE_SIZE
  transform = Transform(loaded.dataset, loaded.model_config, channels, image_size)
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
      batch_images.append(read_image(path, transform))
    except ValueError as e:
      errors.append(str(e))
      continue
    batch_paths.append(path)
    if len(batch_images) == batch_size:
      flush()
  if batch_images:
    flush()
  return results, errors


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  logging.set_verbosity(logging.WARNING)
  compile_cache.enable(FLAGS.compilation_cache_dir)
  if len(argv) < 2:
    sys.exit('error: give image files or folders to classify, e.g. '
             'python -m pyramidnet_jax.predict --workdir=runs/demo photo.png photos/')
  try:
    loaded = loading.load_info(FLAGS.workdir, FLAGS.which)
    if FLAGS.dataset:
      loaded.dataset = FLAGS.dataset
      loaded.class_names = loading.class_names_of(FLAGS.dataset, loaded.num_classes)
    results, errors = predict(loaded, argv[1:], FLAGS.top_k, FLAGS.batch_size)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  for result in results:
    if FLAGS.json:
      print(json.dumps(result))
    else:
      print(f'{result["path"]}: ' + ', '.join(f'{name} {p:.3f}' for name, p in result['top']))
  for error in errors:
    print(f'error: {error}', file=sys.stderr)
  if not results and not errors:
    sys.exit(f'error: no image files found in {" ".join(argv[1:])} '
             f'(looked for {", ".join(IMAGE_EXTENSIONS)}).')
  if errors:
    sys.exit(1)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A training workdir or a converted model directory.')
  flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'A workdir\'s checkpoint to use.')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.DEFINE_string('dataset', '', 'Override the dataset whose transform and class names to '
                      'use (fashion_mnist, cifar10, cifar100, imagenet2012).')
  flags.DEFINE_bool('json', False, 'Print one JSON object per image.')
  flags.DEFINE_string('compilation_cache_dir', compile_cache.DEFAULT_DIR,
                      'Persistent XLA cache (\'\' turns it off): the second run starts faster.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
