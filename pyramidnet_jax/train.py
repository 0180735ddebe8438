"""Training and evaluation: a pure jit-compiled step over a device mesh, and the loop around it.

The step is `jax.jit` over a Mesh of all devices: the batch is split on the 'data' axis and the
state is replicated, so BatchNorm statistics are computed over the global batch. The loop resumes
from the workdir's latest checkpoint; since every batch is a pure function of (seed, epoch, index)
and dropout keys are folded from the step, a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import time
from typing import Any, Callable

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

from pyramidnet_jax import checkpoints
from pyramidnet_jax import compile_cache
from pyramidnet_jax import conv
from pyramidnet_jax import input_pipeline
from pyramidnet_jax import models
from pyramidnet_jax import pyconv

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
CLASS_NAMES_FILE = 'class_names.json'


class TrainState(train_state.TrainState):
  batch_stats: Any


MODEL_NAMES = ('pyramidnet', 'pyconvresnet', 'pyconvhgresnet')


_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'


def configure_xla_cpu(config: ml_collections.ConfigDict) -> None:
  """Applies the config's XLA:CPU settings that must precede JAX's backend start (CLIs: first).

  config.xla_cpu_concurrency_scheduler goes into XLA_FLAGS (XLA reads it there when its backend
  starts; jit's compiler_options do not reach it); a value the user put in XLA_FLAGS wins.
  config.cpu_keep_freed_memory tunes glibc's malloc (keep_freed_host_memory).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.warning('JAX\'s backend has started: config.xla_cpu_concurrency_scheduler and '
                    'config.cpu_keep_freed_memory are not applied; call configure_xla_cpu first '
                    '(or set %s in XLA_FLAGS).', _SCHEDULER_FLAG)
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if _SCHEDULER_FLAG not in flags:
    value = 'true' if config.xla_cpu_concurrency_scheduler else 'false'
    os.environ['XLA_FLAGS'] = f'{flags} {_SCHEDULER_FLAG}={value}'.strip()
  if config.cpu_keep_freed_memory and _jax_runs_on_cpu_only():
    keep_freed_host_memory()


_GLIBC_M_TRIM_THRESHOLD, _GLIBC_M_MMAP_MAX = -1, -4
_GLIBC_MALLOC_ENV = ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_',
                     'MALLOC_TOP_PAD_')


def keep_freed_host_memory() -> bool:
  """Makes XLA:CPU reuse one resident temp buffer across steps; True if it did. Before JAX starts.

  XLA:CPU allocates a train step's temporary buffer (hundreds of MB to GBs) at every execution
  and frees it after. glibc serves a block that large with a fresh mmap and unmaps it on free,
  so every step page-faults the whole buffer in again (PyramidNet-110 a48, batch 128: 1.7 GiB,
  460,000 faults and 0.7 s of system time per 2 s step on 2 cores). So: no mmap for large blocks
  and no trimming, and steps dispatched synchronously, so that the buffer is allocated on the
  calling thread, whose heap can grow (another thread's arena maps anything over 64 MB anyway).
  The next step then reuses the same resident pages: 20% faster training there
  (docs/benchmarks.md). The cost: the process keeps its peak memory until it exits, and Python
  waits for each step. A malloc setting the user put in the environment wins; no-op off glibc.
  """
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  if (any(name in os.environ for name in _GLIBC_MALLOC_ENV)
      or 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', '')):
    return False
  libc = ctypes.CDLL(None)
  # mallopt's trim threshold of -1 turns trimming off.
  if not all(libc.mallopt(param, value) == 1
             for param, value in ((_GLIBC_M_MMAP_MAX, 0), (_GLIBC_M_TRIM_THRESHOLD, -1))):
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True


def _jax_runs_on_cpu_only() -> bool:
  """Whether JAX will pick the CPU, known before its backend starts (no accelerator plugin)."""
  platforms = jax.config.jax_platforms
  if platforms:
    return all(p.strip() == 'cpu' for p in platforms.split(','))
  return not (importlib.metadata.entry_points(group='jax_plugins')
              or importlib.util.find_spec('jax_plugins') is not None
              or importlib.util.find_spec('libtpu') is not None)


def create_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The network config.model names: PyramidNet, PyConvResNet or PyConvHGResNet.

  The PyConv networks read depth, stem, dropout_rate, remat and dtype; alpha, bottleneck,
  widening, rounding and channel_multiple are PyramidNet's only and ignored for them.
  """
  if model_config.name not in MODEL_NAMES:
    raise ValueError(f'Unknown config.model.name {model_config.name!r}: expected one of '
                     f'{", ".join(map(repr, MODEL_NAMES))}.')
  if model_config.dtype not in DTYPES:
    raise ValueError(f'Unknown config.model.dtype {model_config.dtype!r}: expected one of '
                     f'{sorted(DTYPES)}.')
  if model_config.name != 'pyramidnet':
    cls = pyconv.PyConvResNet if model_config.name == 'pyconvresnet' else pyconv.PyConvHGResNet
    return cls(depth=model_config.depth, num_classes=num_classes, stem=model_config.stem,
               dropout_rate=model_config.dropout_rate, remat=model_config.remat,
               dtype=DTYPES[model_config.dtype])
  return models.PyramidNet(
      depth=model_config.depth, alpha=model_config.alpha, num_classes=num_classes,
      bottleneck=model_config.bottleneck, widening=model_config.widening, stem=model_config.stem,
      rounding=model_config.rounding, dropout_rate=model_config.dropout_rate,
      remat=model_config.remat, channel_multiple=model_config.channel_multiple,
      dtype=DTYPES[model_config.dtype])


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                            total_steps: int) -> optax.Schedule:
  """Linear warm-up, then piecewise-constant (boundaries in epochs) or cosine decay."""
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  if config.lr_schedule == 'piecewise':
    main = optax.piecewise_constant_schedule(
        config.learning_rate,
        # Boundaries count from the start of training, the warm-up included.
        {int(round(b * steps_per_epoch)) - warmup_steps: config.lr_decay
         for b in config.lr_boundaries})
  elif config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(config.learning_rate, max(1, total_steps - warmup_steps))
  else:
    raise ValueError(f'Unknown lr_schedule {config.lr_schedule!r}: expected "piecewise" or '
                     '"cosine".')
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and coupled L2 weight decay on every parameter (BN included).

  The decay is added to the gradient before momentum, as PyTorch's SGD(weight_decay=...) does.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(computed_once_on_cpu(learning_rate_fn), momentum=config.momentum,
                nesterov=config.nesterov))


def computed_once_on_cpu(schedule: optax.Schedule) -> optax.Schedule:
  """The same schedule, computed inside a conditional when traced for XLA:CPU.

  XLA:CPU copies a cheap scalar computation into every kernel that reads it: the learning rate
  (25 scalar operations for a piecewise schedule) into each parameter's update, 27,000 of the
  109,000 HLO instructions of PyramidNet-272 a200's step, each parsed on every load from the
  persistent cache. XLA does not fuse across a conditional, so with the schedule as both of its
  branches the rate is computed once (272 a200: cache load 5.9 -> 5.3 s, cold compile -2 s).
  Elsewhere (a GPU conditional can wait on the device) it is the schedule itself.
  """
  def schedule_fn(count):
    if jax.default_backend() != 'cpu':
      return schedule(count)
    return jax.lax.cond(count >= 0, schedule, schedule, count)
  return schedule_fn


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                       label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf is finite, as one reduction over all of them.

  A check per leaf compiles to about three XLA kernels per leaf (PyramidNet-272: 4,900 of its
  13,000), and XLA:CPU builds each executable's dependency graph, on compile and on load from the
  persistent cache, in time quadratic in its kernel count.
  """
  leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.isfinite(jnp.concatenate(leaves))) if leaves else jnp.bool_(True)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, learning_rate_fn: optax.Schedule,
               label_smoothing: float, dropout_key: jax.Array) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; pure, so jit can donate and shard it."""
  num_classes = state.params['fc']['bias'].shape[0]

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': jax.random.fold_in(dropout_key, state.step)})
    loss = cross_entropy_loss(logits, batch['label'], num_classes, label_smoothing).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # jnp's operators are jitted functions, traced anew for each new shape, and PyramidNet's
  # leaves have hundreds of shapes: inlined instead (the same jaxpr), 272 a200's step traces
  # 0.6 s faster. disable_jit inside a trace only inlines; nothing here loops or scans.
  with jax.disable_jit():
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    # XLA's CPU backend can drop NaNs in a max inside a reduction (the ReLU before the pooling),
    # so a NaN state may still give a finite loss: report the loss as NaN whenever the new state
    # isn't finite, so that the loop's NaN check stops the run before such a state is saved.
    finite = all_finite((new_state.params, new_state.batch_stats))
  metrics = {
      'loss': jnp.where(finite, loss, jnp.nan),
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'learning_rate': learning_rate_fn(state.step),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Masked sums over a padded eval batch: loss, top-1 and top-5 hits, example count."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'], train=False)
  num_classes = logits.shape[-1]
  mask = batch['mask']
  labels = batch['label']
  loss = cross_entropy_loss(logits, labels, num_classes)
  top_k = jax.lax.top_k(logits, min(5, num_classes))[1]
  return {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum((top_k[:, 0] == labels) * mask),
      'top5': jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
      'count': jnp.sum(mask),
  }


@contextlib.contextmanager
def python_gc_paused():
  """Python's cyclic garbage collector paused (reference counting still frees what it can).

  Tracing a deep PyramidNet creates millions of Python objects that live until the trace ends,
  and every collection they trigger walks them again: 272 a200's training step traces in 5.3 s
  with the collector paused, 7.4 s without.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


class FastStartJit:
  """A jitted function that starts fast: its calls, traces and lowerings run with python_gc_paused,
  and its first call loads the persistent cache entry its last compile read while it traces
  (compile_cache.prefetching; `context` says what else the program depends on, e.g. the config).

  Each call pauses the collector only while it lasts; other attributes are the jitted function's.
  """

  def __init__(self, jitted: Callable[..., Any], name: str, context: str = ''):
    self.jitted = jitted
    self.name = name
    self.context = context
    self.first_call_prefetch: str | None = None  # Its Prefetch.outcome, once called.

  def __call__(self, *args, **kwargs):
    with python_gc_paused():
      if self.first_call_prefetch is not None:
        return self.jitted(*args, **kwargs)
      with self.prefetching(*args) as prefetch:
        try:
          return self.jitted(*args, **kwargs)
        finally:
          self.first_call_prefetch = prefetch.outcome

  def prefetching(self, *args) -> contextlib.AbstractContextManager[compile_cache.Prefetch]:
    """For an ahead-of-time lower().compile() of these arguments in the block."""
    return compile_cache.prefetching(self.name, args, self.context)

  def trace(self, *args, **kwargs):
    with python_gc_paused():
      return self.jitted.trace(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with python_gc_paused():
      return self.jitted.lower(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.jitted, name)


@dataclasses.dataclass
class Runtime:
  """The mesh and the compiled functions for one model and optimiser."""
  mesh: jax.sharding.Mesh
  data_sharding: NamedSharding
  replicated: NamedSharding
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]

  def put_batch(self, batch: dict[str, np.ndarray], is_global: bool = False) -> dict[str, jax.Array]:
    """A sharded global batch from this process's slice (or from the whole batch if is_global)."""
    if is_global and jax.process_count() > 1:
      # In-memory datasets build the global batch on every process (cheap); keep our part.
      index, count = jax.process_index(), jax.process_count()
      batch = jax.tree.map(lambda x: np.split(x, count)[index], batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), batch)


def create_runtime(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule,
                   devices: Any = None) -> Runtime:
  conv.set_cpu_backend(config.cpu_conv)
  devices = jax.devices() if devices is None else devices
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  data_sharding = NamedSharding(mesh, PartitionSpec('data'))
  replicated = NamedSharding(mesh, PartitionSpec())
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % len(devices):
      raise ValueError(f'config.{name}={config[name]} must be divisible by the {len(devices)} '
                       'devices it is split over.')
  step = functools.partial(train_step, learning_rate_fn=learning_rate_fn,
                           label_smoothing=config.label_smoothing,
                           dropout_key=jax.random.key(config.seed + 1))
  context = config.to_json_best_effort(sort_keys=True)
  return Runtime(
      mesh=mesh, data_sharding=data_sharding, replicated=replicated,
      train_step=FastStartJit(jax.jit(step, in_shardings=(replicated, data_sharding),
                                      out_shardings=(replicated, replicated), donate_argnums=0),
                              'train_step', context),
      eval_step=FastStartJit(jax.jit(eval_step, in_shardings=(replicated, data_sharding),
                                     out_shardings=replicated), 'eval_step', context))


def create_train_state(config: ml_collections.ConfigDict, model: models.PyramidNet,
                       image_shape: tuple[int, ...], tx: optax.GradientTransformation,
                       runtime: Runtime) -> TrainState:
  with python_gc_paused():
    variables = models.init_variables(model, jax.random.key(config.seed), image_shape)
    # Jitted: the optimiser's eager init compiles a kernel per distinct parameter shape, one jit
    # compiles them all at once and lands in the persistent cache (272 a200: 10 s -> 3 s cold).
    create = jax.jit(functools.partial(TrainState.create, apply_fn=model.apply, tx=tx),
                     out_shardings=runtime.replicated)
    return create(params=variables['params'], batch_stats=variables['batch_stats'])


def evaluate(runtime: Runtime, state: TrainState, split: input_pipeline.Split,
             dataset: input_pipeline.Dataset, batch_size: int) -> dict[str, float]:
  totals = None
  is_global = isinstance(split, input_pipeline.Split)
  for batch in input_pipeline.eval_batches(split, batch_size, dataset.mean, dataset.std):
    sums = runtime.eval_step(state, runtime.put_batch(batch, is_global))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'accuracy': float(totals['top1']) / count,
          'top5_accuracy': float(totals['top5']) / count}


class MetricsLog:
  """TensorBoard scalars and metrics.jsonl, written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      import tensorboardX  # Loaded only by the training loop.
      self.writer = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, split: str, metrics: dict[str, float], **extra: Any) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self.writer.add_scalar(f'{split}/{name}', value, step)
    self.jsonl.write(json.dumps({'step': step, 'split': split, **extra, **metrics}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      self.jsonl.close()


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in history])) for k in history[0]}


def _check_finite(metrics: dict[str, float], step: int, workdir: str, last_saved: int | None):
  if not math.isfinite(metrics['loss']):
    kept = (f'the last good checkpoint (step {last_saved}) is kept in {workdir}'
            if last_saved is not None else 'no checkpoint had been saved yet')
    raise FloatingPointError(
        f'The training loss became {metrics["loss"]} by step {step}; {kept}. Lower '
        'config.learning_rate or add warm-up (config.warmup_epochs) and run again with a new '
        '--workdir, or resume this one after changing the config.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns the results."""
  start_time = time.time()
  create_model(config.model, num_classes=1).num_features  # A bad network fails before any work.
  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  dataset = input_pipeline.load_dataset(config, jax.process_index(), jax.process_count())
  in_memory = isinstance(dataset.train, input_pipeline.Split)
  if config.early_stopping_patience > 0 and dataset.validation is None:
    raise ValueError('config.early_stopping_patience > 0 needs a validation split: set '
                     'config.validation_fraction (e.g. 0.1).')
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset, config.batch_size)
  if config.num_train_steps > 0:
    total_steps = config.num_train_steps
  else:
    total_steps = int(config.num_epochs) * steps_per_epoch
  num_epochs = math.ceil(total_steps / steps_per_epoch)

  model = create_model(config.model, dataset.num_classes)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = create_optimizer(config, learning_rate_fn)
  runtime = create_runtime(config, learning_rate_fn)
  latest = checkpoints.create_manager(workdir, checkpoints.LATEST, config.checkpoints_to_keep)
  best = checkpoints.create_manager(workdir, checkpoints.BEST, 1)

  model_config = config.model.to_dict()
  meta = checkpoints.restore_meta(latest)
  if meta is not None:
    differences = checkpoints.config_differences(meta['model'], model_config)
    if meta.get('dataset') != config.dataset:
      differences.append(f'dataset: checkpoint has {meta.get("dataset")!r}, config has '
                         f'{config.dataset!r}')
    if differences:
      raise ValueError(
          f'{workdir} holds a checkpoint of a different model, so it cannot be resumed with '
          f'this config: {"; ".join(differences)}. Use a new --workdir, or the same config.')

  state = create_train_state(config, model, dataset.image_shape, tx, runtime)
  if meta is not None:
    state = checkpoints.restore_state(latest, state)
    logging.info('Resumed from %s at step %d.', latest.directory, meta['step'])
  else:
    meta = {'model': model_config, 'dataset': config.dataset, 'step': 0, 'epoch': 0,
            'best_accuracy': None, 'best_epoch': None, 'best_step': None, 'bad_epochs': 0,
            'stopped_early': False}
  if is_chief:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))
    # For predict and load: names without reading (or importing a reader for) the dataset.
    with open(os.path.join(workdir, CLASS_NAMES_FILE), 'w') as f:
      json.dump(list(dataset.class_names), f)

  log = MetricsLog(workdir)
  step = int(jax.device_get(state.step))
  last_saved = latest.latest_step()
  try:
    while step < total_steps and not meta['stopped_early']:
      epoch = step // steps_per_epoch
      first_index = step % steps_per_epoch
      last_index = min(steps_per_epoch, first_index + total_steps - step)
      batches = input_pipeline.train_batches(dataset, config.batch_size, config.seed, epoch,
                                             config.augment, start_index=first_index)
      history = []
      epoch_history = []
      progress = _progress(config, epoch, num_epochs, first_index, last_index)
      for index in range(first_index, last_index):
        batch = next(batches)
        state, metrics = runtime.train_step(state, runtime.put_batch(batch, in_memory))
        history.append(metrics)
        step += 1
        progress.update(1)
        at_log = step % config.log_every_steps == 0 or index + 1 == last_index
        # The last step is saved too, so a run that ends mid-epoch can be continued from it.
        at_save = step % config.checkpoint_every_steps == 0 or step == total_steps
        if at_log or at_save:
          fetched = jax.device_get(history)  # Each step's metrics cross to the host once.
          summary = _mean_metrics(fetched)
          _check_finite(summary, step, workdir, last_saved)
          epoch_history.extend(fetched)
          history = []
          log.write(step, 'train', summary, epoch=epoch + 1)
          progress.set_postfix(loss=f'{summary["loss"]:.4f}', acc=f'{summary["accuracy"]:.4f}')
        if at_save and index + 1 < steps_per_epoch:
          checkpoints.save(latest, step, state, {**meta, 'step': step, 'epoch': epoch})
          last_saved = step
      progress.close()
      batches.close()
      if last_index < steps_per_epoch:
        break  # num_train_steps ended mid-epoch.
      train_summary = _mean_metrics(epoch_history) if epoch_history else {}
      train_summary['learning_rate'] = float(learning_rate_fn(step))  # The LR going forward.
      meta = _end_of_epoch(config, runtime, state, dataset, best, meta, log, step, epoch)
      checkpoints.save(latest, step, state, {**meta, 'step': step, 'epoch': epoch + 1})
      last_saved = step
      _log_epoch_line(epoch, num_epochs, train_summary, meta, time.time() - start_time)
  finally:
    log.close()
    latest.wait_until_finished()
    best.wait_until_finished()

  # The final test evaluation uses the best-on-validation state when there is one.
  evaluated_state, evaluated_step = state, step
  if dataset.validation is not None and best.latest_step() is not None:
    evaluated_step = best.latest_step()
    evaluated_state = checkpoints.restore_state(best, state, evaluated_step)
  test = evaluate(runtime, evaluated_state, dataset.test, dataset, config.eval_batch_size)
  results = {
      'dataset': config.dataset,
      'test_accuracy': test['accuracy'],
      'test_top5_accuracy': test['top5_accuracy'],
      'test_loss': test['loss'],
      'best_epoch': meta['best_epoch'] if dataset.validation is not None else step // steps_per_epoch,
      'evaluated_step': evaluated_step,
      'steps': step,
      'stopped_early': meta['stopped_early'],
      'wall_time_s': time.time() - start_time,
      'num_params': int(sum(x.size for x in jax.tree.leaves(state.params))),
  }
  if is_chief:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  logging.info('Results: %s', results)
  return results


def _progress(config, epoch, num_epochs, first_index, last_index):
  import tqdm  # Loaded only by the training loop.
  return tqdm.tqdm(total=last_index - first_index, desc=f'epoch {epoch + 1}/{num_epochs}',
                   leave=False, dynamic_ncols=True,
                   disable=not config.progress_bar or jax.process_index() != 0)


def _end_of_epoch(config, runtime, state, dataset, best_manager, meta, log, step, epoch):
  """Validation, best checkpoint and early stopping; returns the updated metadata."""
  meta = dict(meta)
  if dataset.validation is None:
    return meta
  validation = evaluate(runtime, state, dataset.validation, dataset, config.eval_batch_size)
  log.write(step, 'validation', validation, epoch=epoch + 1)
  meta['last_validation'] = validation
  improved = (meta['best_accuracy'] is None or
              validation['accuracy'] > meta['best_accuracy'] + config.early_stopping_min_delta)
  if improved:
    meta.update(best_accuracy=validation['accuracy'], best_epoch=epoch + 1, best_step=step,
                bad_epochs=0)
    checkpoints.save(best_manager, step, state, {**meta, 'step': step, 'epoch': epoch + 1})
  else:
    meta['bad_epochs'] += 1
    if 0 < config.early_stopping_patience <= meta['bad_epochs']:
      meta['stopped_early'] = True
  return meta


def _log_epoch_line(epoch, num_epochs, train, meta, elapsed):
  parts = [f'epoch {epoch + 1}/{num_epochs}']
  if 'loss' in train:
    parts.append(f'train loss {train["loss"]:.4f} acc {train["accuracy"]:.4f} '
                 f'lr {train["learning_rate"]:.4g}')
  if 'last_validation' in meta:
    v = meta['last_validation']
    parts.append(f'val loss {v["loss"]:.4f} acc {v["accuracy"]:.4f} '
                 f'(best {meta["best_accuracy"]:.4f} @ {meta["best_epoch"]})')
  if meta['stopped_early']:
    parts.append(f'early stop after {meta["bad_epochs"]} epochs without improvement')
  parts.append(f'{elapsed:.0f}s')
  if jax.process_index() == 0:
    print(' | '.join(parts), flush=True)
