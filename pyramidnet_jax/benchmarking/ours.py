"""Ours in the benchmark: the training step exactly as training compiles and runs it."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

from pyramidnet_jax.benchmarking import common


def num_params(config, image_shape, num_classes) -> int:
  """Parameter count of ours from shapes alone (tracing, no compile, no device memory)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import models  # pylint: disable=g-import-not-at-top

  model = models.from_config(config.model, num_classes)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes['params'])))


def run(config, image_shape, num_classes, steps: int, warmup: int,
        cold_cache: bool, compile_only: bool = False) -> dict[str, Any]:
  """Ours: the runtime's jitted, sharded, state-donating step, as training runs it."""
  rss_imports = common.rss_mb()
  from pyramidnet_jax import cli  # pylint: disable=g-import-not-at-top
  kit = cli.set_up_platform(config)  # Before JAX's backend starts, as in training.
  import jax  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import models  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import runtime as runtime_lib  # pylint: disable=g-import-not-at-top

  if cold_cache:
    jax.config.update('jax_enable_compilation_cache', False)
    cache = 'off'
  elif config.compilation_cache_dir:
    cli.enable_compilation_cache(config.compilation_cache_dir)
    cache = f'on ({config.compilation_cache_dir})'
  else:
    cache = 'off (config.compilation_cache_dir is empty)'

  batch_size = config.batch_size
  model = models.from_config(config.model, num_classes)
  # The schedule's shape does not matter for speed; only its step count must be positive.
  steps_per_epoch = 1000
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else max(1, int(config.num_epochs)) * steps_per_epoch)
  lr_fn = optimizer.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = optimizer.create_optimizer(config, lr_fn)
  runtime = runtime_lib.create_runtime(config, lr_fn)
  devices = jax.devices()

  t0 = time.perf_counter()
  state = runtime_lib.create_train_state(config, model, image_shape, tx, runtime)
  jax.block_until_ready(state)
  state_creation_s = time.perf_counter() - t0
  num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  batch = runtime.put_batch(common.synthetic_batch(batch_size, image_shape, num_classes))
  jax.block_until_ready(batch)

  # Lowered and compiled once, ahead of time, so that its memory analysis costs no second
  # compile; the compiled executable keeps the jit's shardings and state donation. As on the
  # step's first call in training, the cache entry the last run used loads while it traces.
  t0 = time.perf_counter()
  with _prefetching(runtime.train_step, state, batch) as prefetch:
    lowered = runtime.train_step.lower(state, batch)
    t1 = time.perf_counter()
    step = lowered.compile()
  t2 = time.perf_counter()
  # ru_maxrss only grows: this tells XLA's compile peak apart from the steps'.
  peak_rss_compile = common.peak_rss_mb()
  shared = {'state_creation_s': state_creation_s, 'num_params': num_params,
            'compilation_cache': cache, 'compilation_cache_prefetch': prefetch.outcome,
            **common.xla_memory(step.memory_analysis()),
            'rss_after_imports_mb': rss_imports,
            'device': f'{devices[0].device_kind} x{len(devices)}',
            'platform': devices[0].platform,
            'levers': 'xla_cpu' if kit else 'plain'}
  if compile_only:
    return {'compile_only': True, 'trace_s': t1 - t0, 'compile_s': t2 - t1,
            'peak_rss_mb': peak_rss_compile, **shared}
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  t3 = time.perf_counter()
  first_step = {'time_to_first_step_s': t3 - t0, 'trace_s': t1 - t0, 'compile_s': t2 - t1,
                'first_step_run_s': t3 - t2}
  first_loss = float(metrics['loss'])

  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  train_times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    train_times.append(time.perf_counter() - t)

  device_peak = None
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    device_peak = max(d.memory_stats()['peak_bytes_in_use'] for d in devices)
  peak_rss_train = common.peak_rss_mb()

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  t0 = time.perf_counter()
  infer_compiled = infer.lower(variables, batch['image']).compile()
  inference_compile_s = time.perf_counter() - t0
  for _ in range(1 + warmup):
    jax.block_until_ready(infer_compiled(variables, batch['image']))
  infer_times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(infer_compiled(variables, batch['image']))
    infer_times.append(time.perf_counter() - t)

  result = {
      'train_images_per_s': common.median_rate(train_times, batch_size),
      'inference_images_per_s': common.median_rate(infer_times, batch_size),
      **first_step,
      'inference_compile_s': inference_compile_s,
      'train_step_times_s': train_times,
      'inference_step_times_s': infer_times,
      'first_loss': first_loss,
      'peak_rss_mb': common.peak_rss_mb(),
      'peak_rss_train_mb': peak_rss_train,
      'peak_rss_after_compile_mb': peak_rss_compile,
      **shared,
  }
  if device_peak is not None:
    result['peak_device_mb'] = device_peak / 2**20
  return result


class _NoPrefetch:
  outcome = 'off'


def _prefetching(step: Any, *args) -> contextlib.AbstractContextManager:
  """The CPU kit's cache prefetch for an ahead-of-time compile, as on the step's first call."""
  if hasattr(step, 'prefetching'):
    return step.prefetching(*args)
  return contextlib.nullcontext(_NoPrefetch())
