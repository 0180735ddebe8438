"""Feeding the steps: uint8 batches normalised on the device exactly as on the host, the device
feed (order, at most two batches on the devices, no thread left), the streamed image dtype, the
throughput log, the profiler window and TensorFlow kept off the GPUs."""

import json
import os
import sys
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.data import fashion_mnist
from pyramidnet_jax.data import tf_import
from pyramidnet_jax.data import tfds_sources
from pyramidnet_jax.data import transforms
from pyramidnet_jax.training import config_checks
from pyramidnet_jax.training import feeding
from pyramidnet_jax.training import loop
from pyramidnet_jax.training import step
from tests import helpers
from tests.helpers import needs_fashion

STATISTICS = [(fashion_mnist.MEAN, fashion_mnist.STD),
              (tfds_sources.CIFAR_MEAN, tfds_sources.CIFAR_STD),
              (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
              ((0.123, 0.77), (0.0371, 0.9))]


@pytest.mark.parametrize('mean,std', STATISTICS)
def test_device_normalisation_equals_host_normalisation_bit_for_bit(mean, std):
  channels = len(mean)
  every_value = np.arange(256, dtype=np.uint8)[:, None, None, None]
  images = np.broadcast_to(every_value, (256, 2, 3, channels)).copy()
  host = transforms.normalize(images, mean, std)
  normalization = step.Normalization(tuple(mean), tuple(std))
  device = np.asarray(jax.jit(lambda x: step.device_images(x, normalization))(images))
  assert device.dtype == np.float32
  np.testing.assert_array_equal(device, host)
  # float32 images were normalised on the host: they pass unchanged.
  np.testing.assert_array_equal(np.asarray(step.device_images(jnp.asarray(host), None)), host)
  with pytest.raises(ValueError, match='normalization'):
    step.device_images(jnp.asarray(images), None)


@needs_fashion
def test_uint8_run_equals_host_normalised_run_and_logs_speed(tmp_path, monkeypatch):
  subset = helpers.serve_subset(monkeypatch, num_train=64, num_test=32)  # 4 steps per epoch.
  config = helpers.tiny_config(num_epochs=2, log_every_steps=2)
  config.profile_steps = (1, 3)
  device_run = str(tmp_path / 'device')
  loop.train_and_evaluate(config, device_run)
  host = subset.with_preprocessing(image_dtype='float32')
  assert next(host.train.train_batches(16, 0, 0))['image'].dtype == np.float32
  monkeypatch.setattr(fashion_mnist, 'load', lambda data_dir: host)
  config.profile_steps = ()
  host_run = str(tmp_path / 'host')
  loop.train_and_evaluate(config, host_run)
  helpers.assert_same_run(device_run, host_run)  # Metrics, results and states, bit for bit.

  with open(os.path.join(device_run, 'metrics.jsonl')) as f:
    train = [r for r in map(json.loads, f) if r['split'] == 'train']
  assert [r['step'] for r in train] == [2, 4, 6, 8]
  for record in train:
    assert record['images_per_s'] > 0 and record['steps_per_s'] > 0
    assert 0.0 <= record['input_wait'] <= 1.0
    assert record['images_per_s'] == pytest.approx(16 * record['steps_per_s'])
  traces = [name for _, _, names in os.walk(os.path.join(device_run, loop.PROFILE_DIR))
            for name in names]
  assert any(name.endswith('.xplane.pb') for name in traces), traces
  assert not os.path.exists(os.path.join(host_run, loop.PROFILE_DIR))
  assert not [t for t in threading.enumerate() if t.name.startswith('ThreadPoolExecutor')]


def test_device_feed_keeps_order_and_at_most_two_batches_on_the_devices():
  shape = (5, 7, 3)
  host = [{'image': np.full(shape, i, np.float32)} for i in range(6)]
  slow = jax.jit(lambda x: jnp.linalg.matrix_power(jnp.eye(256) + x.sum() * 1e-9, 64).sum())

  def on_devices():
    return len([a for a in jax.live_arrays() if a.shape == shape])

  feed = feeding.DeviceFeed(iter(host), jax.device_put)
  seen, counts = [], []
  for batch in feed:
    out = slow(batch['image'])
    feed.dispatched(out)
    counts.append(on_devices())
    seen.append(float(batch['image'][0, 0, 0]))
  assert seen == list(range(6))
  assert max(counts) <= 2 and feed.input_s > 0
  del batch, feed


def test_an_abandoned_epoch_leaves_no_thread():
  split = data.ArraySplit(np.zeros((64, 4, 4, 1), np.uint8), np.zeros(64, np.int32),
                          preprocessing=data.Preprocessing((0.5,), (0.25,), 'none'))
  before = threading.active_count()
  batches = split.train_batches(8, seed=0, epoch=0, prefetch=2)
  feed = feeding.DeviceFeed(batches, jax.device_put)
  next(feed)
  feed.dispatched(None)
  batches.close()
  assert threading.active_count() == before


def test_streamed_batches_are_uint8_on_accelerators_float32_on_cpu():
  assert transforms.streamed_image_dtype('cpu') == 'float32'
  assert transforms.streamed_image_dtype('gpu') == transforms.streamed_image_dtype('tpu') == 'uint8'
  assert data.registry.streamed_image_dtype() == 'float32'  # This machine's JAX: a CPU.
  pixels = np.array([-3.0, 0.4, 0.5, 1.5, 254.6, 300.0], np.float32)
  rounded = transforms.batch_pixels_tf(pixels, (0.5,), (0.25,), 'uint8').numpy()
  np.testing.assert_array_equal(rounded, [0, 0, 0, 2, 255, 255])  # Half to even, clipped.
  assert rounded.dtype == np.uint8
  padding = transforms.imagenet_preprocessing(image_dtype='uint8').padding_pixel
  assert padding.dtype == np.uint8 and not padding.any()


def test_profile_steps_rule():
  rule = next(r for r in config_checks.RULES if r.field == 'profile_steps')
  for good in ((), (0, 1), (100, 110), [3, 5]):
    assert rule.accepts(good), good
  for bad in ((3, 3), (5, 2), (-1, 2), (1,), (1, 2, 3), (1.0, 2), 'x', None, (True, 2)):
    assert not rule.accepts(bad), bad
  window = feeding.ProfileWindow((), '/nowhere')
  window.before_step(0)
  assert not window.active


def test_tensorflow_is_imported_with_no_gpu_and_in_one_place(monkeypatch):
  calls = []
  fake = types.ModuleType('tensorflow')
  fake.config = types.SimpleNamespace(set_visible_devices=lambda *a: calls.append(a))
  monkeypatch.setitem(sys.modules, 'tensorflow', fake)
  monkeypatch.setattr(tf_import, '_hidden', False)
  assert tf_import.tensorflow() is fake and tf_import.tensorflow() is fake
  assert calls == [([], 'GPU')]  # Once, before anything else of TensorFlow's.

  def too_late(*args):
    raise RuntimeError('Visible devices cannot be modified after being initialized')
  fake.config.set_visible_devices = too_late
  monkeypatch.setattr(tf_import, '_hidden', False)
  assert tf_import.tensorflow() is fake  # A warning, not a failure.
  # Every other module of the data package gets TensorFlow from tf_import.
  directory = os.path.dirname(data.__file__)
  for name in os.listdir(directory):
    if name.endswith('.py') and name != 'tf_import.py':
      with open(os.path.join(directory, name)) as f:
        text = f.read()
      assert 'import tensorflow' not in text, name
