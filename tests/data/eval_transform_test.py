"""eval_transform (what `predict` feeds the network) against the eval batches: for the same image
file, the same network input bit for bit (uint8 batches as the steps normalise them on the
device)."""

import os
import types

import jax
import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.training import step

from tests.helpers import needs_fashion

Image = pytest.importorskip('PIL.Image')


def network_input(images, preprocessing):
  """The batch images as the jitted steps hand them to the network."""
  normalization = step.Normalization.of(preprocessing)
  return np.asarray(jax.jit(lambda x: step.device_images(x, normalization))(images))


@needs_fashion
def test_fashion_mnist_png_matches_the_eval_batches(tmp_path):
  config = types.SimpleNamespace(dataset='fashion_mnist', data_dir='', validation_fraction=0.0,
                                 validation_seed=0, augment=True)
  dataset = data.load_dataset(config)
  batches = [network_input(b['image'], dataset.preprocessing)
             for b in dataset.test.eval_batches(1000)]
  transform = data.eval_transform('fashion_mnist', channels=1)
  for i in (0, 1234, 9999):
    path = str(tmp_path / f'test{i}.png')
    Image.fromarray(dataset.test.images[i, ..., 0], 'L').save(path)
    pixels = data.read_image(path, channels=1)
    np.testing.assert_array_equal(pixels, dataset.test.images[i])  # PNG is lossless.
    expected = batches[i // 1000][i % 1000]
    out = transform(pixels)
    assert out.dtype == expected.dtype == np.float32
    assert np.array_equal(out, expected), i
  # Another size is resized to 28x28 first (predict only): a flat grey stays that grey, a
  # doubled image comes back close to the original.
  flat = transform(np.full((56, 40, 1), 100, np.uint8))
  assert flat.shape == (28, 28, 1) and flat.dtype == np.float32
  np.testing.assert_array_equal(flat, transform(np.full((28, 28, 1), 100, np.uint8)))
  doubled = np.repeat(np.repeat(dataset.test.images[7], 2, axis=0), 2, axis=1)
  correlation = np.corrcoef(transform(doubled).ravel(), batches[0][7].ravel())[0, 1]
  assert correlation > 0.95


@pytest.mark.parametrize('image_size,platform', [(32, 'cpu'), (224, 'cpu'), (32, 'gpu')])
def test_folder_files_match_the_eval_batches(tmp_path, image_size, platform):
  pytest.importorskip('tensorflow')
  rng = np.random.default_rng(0)
  files = {'train/a/x.png': (20, 30), 'train/b/y.jpg': (30, 20),
           'val/a/noise.jpg': (37, 50), 'val/a/tall.png': (64, 41), 'val/b/wide.jpeg': (45, 90)}
  for name, (height, width) in files.items():
    path = tmp_path / name
    os.makedirs(path.parent, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
  dataset = data.load_dataset(types.SimpleNamespace(
      dataset=f'folder:{tmp_path}', data_dir='', validation_fraction=0.0, validation_seed=0,
      augment=True, image_size=image_size), platform=platform)
  (batch,) = list(dataset.test.eval_batches(4))
  np.testing.assert_array_equal(batch['mask'], [1, 1, 1, 0])
  # Streamed pixels are rounded to uint8 on a GPU or TPU, kept float32 on a CPU.
  assert batch['image'].dtype == (np.float32 if platform == 'cpu' else np.uint8)
  images = network_input(batch['image'], dataset.preprocessing)
  transform = data.eval_transform(dataset.name, image_size, channels=3, platform=platform)
  for k, path in enumerate(dataset.test.paths):
    out = transform(data.read_image(path))
    assert out.shape == (image_size, image_size, 3) and out.dtype == np.float32
    assert np.array_equal(out, images[k]), path
