"""Shared helpers for the tests: tiny configs, real-data subsets, checkpoint reads, XLA memory."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import types

import chex
import jax
import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.data import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Test programs are tiny, so XLA's backend optimisations cost far more than they save: this cuts
# the CPU compile time of each test program by about a third.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})

FASHION_DIR = fashion_mnist.DEFAULT_DIR
HAVE_FASHION = all(
    os.path.isfile(os.path.join(FASHION_DIR, f))
    for pair in fashion_mnist.FILES.values() for f in pair)
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason='needs the real Fashion-MNIST: `apt-get install dataset-fashion-mnist`')


@contextlib.contextmanager
def persistent_compilation_cache(cache_dir: str):
  """JAX's persistent cache in cache_dir, every compile written; JAX's settings restored after."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes', 'jax_enable_compilation_cache')
  saved = {name: getattr(jax.config, name) for name in names}
  cc.reset_cache()
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  try:
    yield cache_dir
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    cc.reset_cache()


def tiny_config(**overrides):
  """configs/default.py with a tiny network (CIFAR stem, depth 8, alpha 8) on tiny batches.

  The learning rate is constant (no boundaries, no warm-up), so the compiled train step does not
  depend on the number of steps per epoch and tests with equal shapes share compilations.
  `overrides` are dotted field names (`model.alpha=12`) or plain ones.
  """
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.model.depth = 8
  config.model.alpha = 8.0
  config.dataset = 'fashion_mnist'
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 1
  config.num_train_steps = -1
  config.learning_rate = 0.1
  config.lr_boundaries = ()
  config.warmup_epochs = 0.0
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 1
  config.progress_bar = False
  config.write_report = False  # The tests of the report turn it on.
  config.compilation_cache_dir = ''
  for name, value in overrides.items():
    target = config
    *parents, leaf = name.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


@functools.lru_cache(maxsize=1)
def _fashion_mnist() -> data.Dataset:
  config = types.SimpleNamespace(dataset='fashion_mnist', data_dir='', validation_fraction=0.0,
                                 validation_seed=0, augment=True)
  return data.load_dataset(config)


def fashion_subset(num_train: int, num_test: int) -> data.Dataset:
  """The first `num_train` training and `num_test` test images of the real Fashion-MNIST."""
  if not HAVE_FASHION:
    pytest.skip('needs the real Fashion-MNIST: `apt-get install dataset-fashion-mnist`')
  full = _fashion_mnist()
  return dataclasses.replace(
      full,
      train=dataclasses.replace(full.train, images=full.train.images[:num_train],
                                labels=full.train.labels[:num_train]),
      test=dataclasses.replace(full.test, images=full.test.images[:num_test],
                               labels=full.test.labels[:num_test]))


def serve_subset(monkeypatch, num_train: int, num_test: int) -> data.Dataset:
  """Makes the Fashion-MNIST reader return a real subset; the rest of load_dataset (validation
  hold-out, config.augment, the process's slice) runs unchanged."""
  subset = fashion_subset(num_train, num_test)
  monkeypatch.setattr(fashion_mnist, 'load', lambda data_dir: subset)
  return subset


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's records without the loop's throughput, which differs from run to run."""
  from pyramidnet_jax.training import feeding  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k not in feeding.THROUGHPUT_FIELDS} for r in records]


def read_results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def checkpoint_steps(workdir: str, kind: str = 'checkpoints') -> list[int]:
  directory = os.path.join(workdir, kind)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def read_checkpoint(workdir: str, kind: str = 'checkpoints', step: int | None = None):
  """(step, state as a tree of numpy arrays, meta) of a saved checkpoint, read without a target."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  steps = checkpoint_steps(workdir, kind)
  assert steps, f'no checkpoint in {workdir}/{kind}'
  step = steps[-1] if step is None else step
  import jax  # pylint: disable=g-import-not-at-top
  # Restored onto one device whatever the saving run's topology (e.g. two processes).
  metadata = ocp.PyTreeCheckpointer().metadata(
      os.path.join(workdir, kind, str(step), 'state')).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
  with ocp.CheckpointManager(os.path.join(workdir, kind), item_names=('state', 'meta')) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  state = _to_numpy(restored['state'])
  return step, state, restored['meta']


def _to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, tree)


def flat_leaves(tree) -> dict[str, np.ndarray]:
  """{'params/layer1_0/bn1/scale': array, ...} for any pytree (dicts, tuples, dataclasses)."""
  import jax  # pylint: disable=g-import-not-at-top
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(leaf)
          for path, leaf in flat}


def assert_trees_equal(a, b, what: str = 'tree') -> None:
  """Same structure, and bit-identical arrays (NaN equal to NaN) at every leaf of a non-empty
  tree."""
  assert jax.tree.leaves(a), f'{what}: empty'
  chex.assert_trees_all_equal(a, b, custom_message=what)


def gradient_temp_bytes(model, x: jax.ShapeDtypeStruct) -> int:
  """XLA's temporary buffer for the parameter gradient of `model` in train mode on `x`."""
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def loss(params, batch_stats, x):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                            mutable=['batch_stats'])
    return logits.sum()
  compiled = jit(jax.grad(loss)).lower(variables['params'], variables['batch_stats'], x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def primitive_names(closed_jaxpr) -> set[str]:
  """Every primitive of a jaxpr (jax.make_jaxpr's), nested jaxprs included."""
  import jax.extend  # pylint: disable=g-import-not-at-top
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(closed_jaxpr.jaxpr)
  return names


# --- Interrupted runs: stopping a run at a chosen point, damaging its files, comparing runs ---


class StopRun(Exception):  # pylint: disable=g-bad-exception-name
  """Raised by the hooks below to end a run at a chosen point, as a kill would."""


def stop_after_epoch(monkeypatch, epoch: int) -> None:
  """Ends train_and_evaluate right after epoch `epoch` (1-based): its best and latest saves
  done, its line printed, nothing evaluated."""
  from pyramidnet_jax.training import loop  # pylint: disable=g-import-not-at-top
  real = loop._log_epoch_line  # pylint: disable=protected-access

  def log_then_stop(done, *args, **kwargs):
    real(done, *args, **kwargs)
    if done + 1 == epoch:
      raise StopRun(f'stopped after epoch {epoch}')
  monkeypatch.setattr(loop, '_log_epoch_line', log_then_stop)


def stop_after_save(monkeypatch, kind: str, step: int) -> None:
  """Ends train_and_evaluate once checkpoint `kind`/`step` (kind: 'checkpoints' or 'best') has
  committed."""
  from pyramidnet_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  real = checkpoints.save

  def save_then_stop(manager, at, *args, **kwargs):
    result = real(manager, at, *args, **kwargs)
    if at == step and os.path.basename(str(manager.directory)) == kind:
      manager.wait_until_finished()
      raise StopRun(f'stopped after saving {kind}/{step}')
    return result
  monkeypatch.setattr(checkpoints, 'save', save_then_stop)


def flip_bytes(step_dir: str, count: int = 64) -> str:
  """Inverts `count` bytes in the middle of the largest array data file of a checkpoint step
  (WORKDIR/<kind>/<step>); returns the file's path."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           for name in names if os.path.basename(root) == 'd']
  assert files, f'no data file under {step_dir}/state'
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    assert len(data) > 2 * count, path
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    f.seek(0)
    f.write(data)
  return path


def without_times(results: dict) -> dict:
  return {k: v for k, v in results.items() if k not in ('wall_time_s', 'process_wall_time_s')}


def assert_same_run(workdir: str, reference: str) -> None:
  """Two finished workdirs hold the same run: metrics.jsonl, results.json (but its wall times),
  the final latest checkpoint and the best one (state bit for bit, meta)."""
  assert read_metrics(workdir) == read_metrics(reference)
  assert without_times(read_results(workdir)) == without_times(read_results(reference))
  step, state, meta = read_checkpoint(workdir)
  reference_step, reference_state, reference_meta = read_checkpoint(reference)
  assert step == reference_step
  assert meta == reference_meta
  assert_trees_equal(state, reference_state, f'{workdir} final state')
  best_step = reference_meta['best_step']
  if best_step is not None:
    _, best_state, best_meta = read_checkpoint(workdir, 'best', best_step)
    _, reference_best, reference_best_meta = read_checkpoint(reference, 'best', best_step)
    assert best_meta == reference_best_meta
    assert_trees_equal(best_state, reference_best, f'{workdir} best state')
