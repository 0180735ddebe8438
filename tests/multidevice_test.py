"""Data parallelism: 8 (fake CPU) devices train exactly like 1 device on the same global batch.

The device count is fixed when JAX starts its CPU backend, so the comparison runs in a fresh
Python process with 8 fake CPU devices (chex.set_n_cpu_devices): this file, run as a script, is
that worker. It trains the same initial state on the same batches with a one-device and an
eight-device runtime and writes both results to an .npz file, which the test compares. It then
starts the eight-device run again from the persistent cache, as a new process would (in-memory
caches cleared), and its step must load the entry while it traces and train bit for bit the same.
"""

import os
import subprocess
import sys

if __name__ == '__main__':  # The worker: make the repository importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from tests import helpers

NUM_DEVICES = 8
NUM_STEPS = 3


def _dataset():
  """A few hundred real Fashion-MNIST images, or random ones where the files are absent."""
  from pyramidnet_jax import data  # pylint: disable=g-import-not-at-top
  if helpers.HAVE_FASHION:
    return helpers.fashion_subset(256, 64)
  rng = np.random.default_rng(0)
  preprocessing = data.Preprocessing(mean=(0.5,), std=(0.25,), augmentation='none')
  split = data.ArraySplit(rng.integers(0, 256, (256, 28, 28, 1), dtype=np.uint8),
                          rng.integers(0, 10, 256).astype(np.int32), preprocessing=preprocessing)
  return data.Dataset(name='random', train=split, test=split, validation=None, num_classes=10,
                      class_names=tuple(map(str, range(10))), preprocessing=preprocessing)


def worker(out_path: str, cache_dir: str) -> None:
  import chex  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import cli  # pylint: disable=g-import-not-at-top
  chex.set_n_cpu_devices(NUM_DEVICES)  # Before JAX's CPU backend starts.
  # 16 images split over 8 devices: 2 per device, so the BatchNorm statistics of one device's
  # shard would differ clearly from the global batch's.
  config = helpers.tiny_config(batch_size=16, eval_batch_size=32, learning_rate=0.1,
                               label_smoothing=0.1)
  assert cli.set_up_platform(config)  # As the command line does: the CPU kit.
  import jax  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import models  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import runtime as runtime_lib  # pylint: disable=g-import-not-at-top

  cli.enable_compilation_cache(cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)  # Tiny steps written too.

  devices = jax.devices()
  assert len(devices) == NUM_DEVICES, devices
  dataset = _dataset()
  steps_per_epoch = dataset.train.steps_per_epoch(config.batch_size)
  model = models.from_config(config.model, dataset.num_classes)
  lr_fn = optimizer.create_learning_rate_fn(config, steps_per_epoch, NUM_STEPS)
  tx = optimizer.create_optimizer(config, lr_fn)
  runtimes = {'one': runtime_lib.create_runtime(config, lr_fn, devices=devices[:1]),
              'eight': runtime_lib.create_runtime(config, lr_fn, devices=devices)}
  # One initial state, copied to host, then placed on each mesh (train_step donates its input).
  initial = jax.device_get(runtime_lib.create_train_state(config, model, dataset.image_shape,
                                                          tx, runtimes['one']))
  eval_batch = next(dataset.test.eval_batches(config.eval_batch_size))
  out = {}
  runtimes['eight_again'] = runtime_lib.create_runtime(config, lr_fn, devices=devices)
  for name, runtime in runtimes.items():
    if name == 'eight_again':
      jax.clear_caches()  # Nothing compiled in memory: a new process, with the same disk cache.
    state = jax.device_put(initial, runtime.replicated)
    for step in range(NUM_STEPS):
      batch = dataset.train.train_batch(config.batch_size, config.seed, 0, step)
      sharded = runtime.put_batch(batch)
      out[f'{name}/num_batch_shards'] = len(sharded['image'].addressable_shards)
      state, metrics = runtime.train_step(state, sharded)
      for key, value in metrics.items():
        out[f'{name}/metrics/{step}/{key}'] = np.asarray(value)
    out[f'{name}/num_state_devices'] = len(state.params['fc']['bias'].sharding.device_set)
    for key, value in helpers.flat_leaves(jax.device_get(
        {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
         'opt_state': state.opt_state})).items():
      out[f'{name}/state/{key}'] = value
    sums = runtime.eval_step(state, runtime.put_batch(eval_batch))
    for key, value in jax.device_get(sums).items():
      out[f'{name}/eval/{key}'] = np.asarray(value)
    out[f'{name}/prefetch'] = np.asarray(runtime.train_step.first_call_prefetch)
  initial_params = helpers.flat_leaves(initial.params)
  for key, value in initial_params.items():
    out[f'initial/params/{key}'] = value
  np.savez(out_path, **out)


def test_eight_devices_match_one_device(tmp_path):
  out_path = str(tmp_path / 'results.npz')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  process = subprocess.run([sys.executable, os.path.abspath(__file__), out_path,
                            str(tmp_path / 'xla_cache')],
                           cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=540)
  assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
  with np.load(out_path) as data:
    out = dict(data)

  # The eight-device run really was split: batch in 8 shards, state replicated on 8 devices.
  assert out['one/num_batch_shards'] == 1 and out['eight/num_batch_shards'] == NUM_DEVICES
  assert out['one/num_state_devices'] == 1 and out['eight/num_state_devices'] == NUM_DEVICES

  one = {k[len('one/'):]: v for k, v in out.items() if k.startswith('one/state/') or
         k.startswith('one/metrics/') or k.startswith('one/eval/')}
  eight = {k[len('eight/'):]: v for k, v in out.items() if k.startswith('eight/state/') or
           k.startswith('eight/metrics/') or k.startswith('eight/eval/')}
  assert sorted(one) == sorted(eight)
  assert any(k.startswith('state/params/') for k in one)
  assert any(k.startswith('state/batch_stats/') for k in one)
  assert int(one['state/step']) == int(eight['state/step']) == NUM_STEPS
  for key in sorted(one):
    np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # And 1e-5 relative on all the parameters as one vector.
  params = sorted(k for k in one if k.startswith('state/params/'))
  one_params = np.concatenate([one[k].ravel() for k in params])
  eight_params = np.concatenate([eight[k].ravel() for k in params])
  assert np.linalg.norm(eight_params - one_params) <= 1e-5 * np.linalg.norm(one_params)

  # The parameters moved well beyond that tolerance, so agreeing is not trivial.
  moved = [key for key in one if key.startswith('state/params/') and not np.allclose(
      one[key], out['initial/params/' + key[len('state/params/'):]], rtol=1e-3, atol=1e-4)]
  assert len(moved) > len([k for k in one if k.startswith('state/params/')]) // 2, moved
  # Exact agreement on the counts of the evaluation.
  assert one['eval/count'] == eight['eval/count'] == 32

  # The second eight-device start loaded its step's entry while tracing (the one-device step's
  # entry, recorded just before, has other shardings and was not taken) and trained identically.
  assert str(out['one/prefetch']) == str(out['eight/prefetch']) == 'no hint'
  assert str(out['eight_again/prefetch']) == 'used'
  again = {k[len('eight_again/'):]: v for k, v in out.items() if k.startswith('eight_again/state/')
           or k.startswith('eight_again/metrics/') or k.startswith('eight_again/eval/')}
  assert sorted(again) == sorted(eight)
  for key in sorted(eight):
    np.testing.assert_array_equal(again[key], eight[key], err_msg=key)


if __name__ == '__main__':
  worker(sys.argv[1], sys.argv[2])
