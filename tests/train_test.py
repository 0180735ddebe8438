"""Tests of pyramidnet_jax.train and checkpoints: the training loop end to end on tiny networks.

Every network here is PyramidNet-8 (CIFAR stem, one basic block per stage) with alpha 8, trained on
a few hundred real Fashion-MNIST images (or mocked TFDS CIFAR), so a test takes seconds once its
step is compiled. The tests that call train_and_evaluate share one configuration and batch shape,
and a module-wide persistent XLA cache (see `compilation_cache`), so most of them compile nothing.
"""

import gc
import json
import math
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pyramidnet_jax import input_pipeline
from pyramidnet_jax import models
from pyramidnet_jax import train
from tests import helpers
from tests.helpers import needs_fashion

RESULT_KEYS = {'dataset', 'test_accuracy', 'test_top5_accuracy', 'test_loss', 'best_epoch',
               'evaluated_step', 'steps', 'stopped_early', 'wall_time_s', 'num_params'}


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for this module only (one per xdist worker), restored afterwards.

  XLA's CPU compiler takes ~1.5 s per random-number op, so initialising even PyramidNet-8 compiles
  for ~10 s, and every train_and_evaluate call builds fresh jitted functions. With the cache, the
  second and later runs of the same configuration load their executables instead (measured:
  ~20 s -> ~5 s per run). Results are unaffected: a cached executable is the compiled program.
  """
  with helpers.persistent_compilation_cache(str(tmp_path_factory.mktemp('xla_cache'))):
    yield


def train_lines(workdir):
  return [m for m in helpers.read_metrics(workdir) if m['split'] == 'train']


# --- 1. One real step through each TFDS pipeline -----------------------------------------------


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_train_and_evaluate_on_mocked_tfds_cifar(name, num_classes, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = helpers.tiny_config(dataset=name, data_dir=str(tmp_path / 'tfds'), num_train_steps=2)
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=32):  # 32 train images: one epoch of 2 steps of 16.
    results = train.train_and_evaluate(config, workdir)

  assert results == helpers.read_results(workdir)
  assert set(results) == RESULT_KEYS
  assert results['dataset'] == name
  assert results['steps'] == 2 and results['evaluated_step'] == 2
  assert results['stopped_early'] is False
  assert 0.0 <= results['test_accuracy'] <= results['test_top5_accuracy'] <= 1.0
  assert math.isfinite(results['test_loss']) and results['test_loss'] > 0
  model = train.create_model(config.model, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  assert results['num_params'] == sum(x.size for x in jax.tree.leaves(shapes))
  lines = train_lines(workdir)
  assert [m['step'] for m in lines] == [1, 2]
  for line in lines:
    assert line['epoch'] == 1 and math.isfinite(line['loss']) and 0 <= line['accuracy'] <= 1
    assert line['learning_rate'] == pytest.approx(0.1)
  assert helpers.checkpoint_steps(workdir) == [2]
  _, state, meta = helpers.read_checkpoint(workdir)
  assert int(state['step']) == 2 and meta['step'] == 2 and meta['epoch'] == 1
  assert state['params']['fc']['kernel'].shape == (model.num_features, num_classes)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['dataset'] == name


def test_imagenet_without_its_files_is_refused_not_faked(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  config = helpers.tiny_config(dataset='imagenet2012', data_dir=str(tmp_path / 'empty'),
                               num_train_steps=1)
  workdir = tmp_path / 'run'
  # Either the pipeline's "not implemented" ValueError, or (once ImageNet is streamed) the
  # missing-data error that says how to prepare it; never a run on made-up data.
  with pytest.raises((ValueError, FileNotFoundError), match='imagenet2012') as error:
    train.train_and_evaluate(config, str(workdir))
  if isinstance(error.value, FileNotFoundError):
    assert 'tfds build imagenet2012' in str(error.value)
  else:
    assert 'not implemented' in str(error.value)
  assert not (workdir / 'results.json').exists()
  assert not helpers.checkpoint_steps(str(workdir))


def test_create_train_state_equals_flax_create_and_is_replicated():
  config = helpers.tiny_config()
  model = train.create_model(config.model, 10)
  lr_fn = train.create_learning_rate_fn(config, 10, 100)
  tx = train.create_optimizer(config, lr_fn)
  runtime = train.create_runtime(config, lr_fn)
  state = train.create_train_state(config, model, (28, 28, 1), tx, runtime)
  variables = models.init_variables(model, jax.random.key(config.seed), (28, 28, 1))
  eager = jax.device_put(train.TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables['batch_stats']), runtime.replicated)
  assert jax.tree.structure(state) == jax.tree.structure(eager)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(eager)):
    assert got.dtype == want.dtype and got.sharding == runtime.replicated
    np.testing.assert_array_equal(got, want)
  assert state.apply_fn == model.apply and state.tx is tx


def test_compiled_steps_trace_with_the_collector_paused_and_restore_it():
  seen = []

  def step(x):
    seen.append(gc.isenabled())
    return x + 1

  jitted = train.FastStartJit(jax.jit(step), 'step')
  assert gc.isenabled()
  assert int(jitted(1)) == 2
  np.testing.assert_array_equal(jitted.lower(jnp.ones(3)).compile()(jnp.ones(3)), 2)
  assert seen == [False, False] and gc.isenabled()
  assert jitted._cache_size() == 1  # Attributes are the jitted function's; lower() is apart.
  gc.disable()
  try:
    with train.python_gc_paused():
      assert not gc.isenabled()
    assert not gc.isenabled()  # A collector the caller had paused stays paused.
  finally:
    gc.enable()
  with pytest.raises(ValueError):
    with train.python_gc_paused():
      raise ValueError
  assert gc.isenabled()


# --- 2. Learning on real data ------------------------------------------------------------------


@needs_fashion
def test_loss_falls_on_real_fashion_mnist():
  dataset = helpers.fashion_subset(512, 0)
  config = helpers.tiny_config(batch_size=32, learning_rate=0.1)
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset, config.batch_size)
  assert steps_per_epoch == 16
  total_steps = 40  # 2.5 epochs.
  model = train.create_model(config.model, dataset.num_classes)
  lr_fn = train.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  runtime = train.create_runtime(config, lr_fn)
  state = train.create_train_state(config, model, dataset.train.images.shape[1:],
                                   train.create_optimizer(config, lr_fn), runtime)
  losses = []
  for step in range(total_steps):
    epoch, index = divmod(step, steps_per_epoch)
    batch = input_pipeline.train_batch(dataset, config.batch_size, config.seed, epoch, index,
                                       augment=True)
    state, metrics = runtime.train_step(state, runtime.put_batch(batch))
    losses.append(float(metrics['loss']))
  assert int(state.step) == total_steps
  assert all(math.isfinite(x) for x in losses)
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert first > 1.8  # Ten classes from a random start: about ln(10) = 2.30.
  assert last < 0.8 * first, losses


# --- 3. Resuming is bit-exact ------------------------------------------------------------------


@needs_fashion
def test_resumed_runs_equal_the_uninterrupted_run(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=132, num_test=64)
  config = helpers.tiny_config(validation_fraction=0.25, checkpoint_every_steps=3,
                               checkpoints_to_keep=10)
  steps_per_epoch = input_pipeline.steps_per_epoch(input_pipeline.load_dataset(config),
                                                   config.batch_size)
  assert steps_per_epoch == 6  # 98 of the 132 images after the hold-out.
  total = 2 * steps_per_epoch

  def run(workdir, *stops):
    for steps in stops:
      config.num_train_steps = steps
      results = train.train_and_evaluate(config, str(tmp_path / workdir))
      assert results['steps'] == steps
    return results

  straight = run('straight', total)
  # Stopped at the epoch boundary (step 6), and mid-epoch at step 8, a step with no periodic
  # checkpoint (those are every 3 steps): the run still leaves its final state on disk.
  stopped = {'boundary': run('boundary', steps_per_epoch, total),
             'mid_epoch': run('mid_epoch', steps_per_epoch + 2, total)}

  straight_dir = str(tmp_path / 'straight')
  step, straight_state, straight_meta = helpers.read_checkpoint(straight_dir)
  assert step == total and straight_meta['step'] == total and straight_meta['epoch'] == 2
  assert 'last_validation' in straight_meta and straight_meta['best_epoch'] in (1, 2)
  best_steps = helpers.checkpoint_steps(straight_dir, 'best')
  assert best_steps[-1] == straight_meta['best_step']
  _, straight_best, _ = helpers.read_checkpoint(straight_dir, 'best')
  del straight['wall_time_s']
  straight_lines = helpers.read_metrics(straight_dir)
  assert [m['step'] for m in straight_lines if m['split'] == 'train'] == list(range(1, total + 1))
  assert [m['step'] for m in straight_lines if m['split'] == 'validation'] == [6, 12]

  for name, results in stopped.items():
    workdir = str(tmp_path / name)
    # The second call resumed where the first stopped: every step was trained (and logged)
    # exactly once, with the same loss as in the uninterrupted run.
    assert helpers.read_metrics(workdir) == straight_lines, name
    step, state, meta = helpers.read_checkpoint(workdir)
    assert step == total
    helpers.assert_trees_equal(state['params'], straight_state['params'], f'{name} params')
    helpers.assert_trees_equal(state['batch_stats'], straight_state['batch_stats'],
                               f'{name} batch_stats')
    helpers.assert_trees_equal(state['opt_state'], straight_state['opt_state'],
                               f'{name} opt_state')
    helpers.assert_trees_equal(state, straight_state, f'{name} state')
    assert meta == straight_meta
    assert helpers.checkpoint_steps(workdir, 'best') == best_steps
    helpers.assert_trees_equal(helpers.read_checkpoint(workdir, 'best')[1], straight_best,
                               f'{name} best state')
    del results['wall_time_s']
    assert results == straight, name
  # The interrupted runs saved their stopping step.
  assert steps_per_epoch + 2 in helpers.checkpoint_steps(str(tmp_path / 'mid_epoch'))


# --- 5. Schedules, weight decay, label smoothing, early stopping -------------------------------


def schedule_config(**overrides):
  fields = dict(learning_rate=0.1, lr_schedule='piecewise', lr_boundaries=(150, 225),
                lr_decay=0.1, warmup_epochs=0.0)
  fields.update(overrides)
  return helpers.tiny_config(**fields)


def lr_at(fn, step):
  return float(fn(step))


def test_piecewise_schedule_boundaries():
  spe = 391
  fn = train.create_learning_rate_fn(schedule_config(), spe, 300 * spe)
  assert lr_at(fn, 0) == pytest.approx(0.1, rel=1e-6)
  assert lr_at(fn, 150 * spe - 1) == pytest.approx(0.1, rel=1e-6)
  assert lr_at(fn, 150 * spe) == pytest.approx(0.01, rel=1e-6)
  assert lr_at(fn, 225 * spe - 1) == pytest.approx(0.01, rel=1e-6)
  assert lr_at(fn, 225 * spe) == pytest.approx(0.001, rel=1e-6)
  assert lr_at(fn, 300 * spe - 1) == pytest.approx(0.001, rel=1e-6)


def test_warmup_is_linear_from_zero_and_keeps_the_boundaries():
  spe = 391
  fn = train.create_learning_rate_fn(schedule_config(warmup_epochs=5), spe, 300 * spe)
  warmup = 5 * spe
  assert lr_at(fn, 0) == 0.0
  for step in (1, warmup // 3, warmup // 2, warmup - 1):
    assert lr_at(fn, step) == pytest.approx(0.1 * step / warmup, rel=1e-4)
  assert lr_at(fn, warmup) == pytest.approx(0.1, rel=1e-6)
  # Boundaries count epochs from the very start, warm-up included.
  assert lr_at(fn, 150 * spe - 1) == pytest.approx(0.1, rel=1e-6)
  assert lr_at(fn, 150 * spe) == pytest.approx(0.01, rel=1e-6)
  assert lr_at(fn, 225 * spe) == pytest.approx(0.001, rel=1e-6)


@pytest.mark.parametrize('warmup_epochs', [0.0, 2.0])
def test_cosine_schedule_ends_near_zero(warmup_epochs):
  spe, epochs = 100, 20
  total = spe * epochs
  fn = train.create_learning_rate_fn(schedule_config(lr_schedule='cosine',
                                                     warmup_epochs=warmup_epochs), spe, total)
  warmup = int(warmup_epochs * spe)
  assert lr_at(fn, warmup) == pytest.approx(0.1, rel=1e-6)
  middle = warmup + (total - warmup) // 2
  assert lr_at(fn, middle) == pytest.approx(0.05, rel=1e-4)
  assert lr_at(fn, total - 1) < 1e-5
  assert lr_at(fn, total) == pytest.approx(0.0, abs=1e-9)
  values = [lr_at(fn, s) for s in range(warmup, total + 1, 50)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match='lr_schedule'):
    train.create_learning_rate_fn(schedule_config(lr_schedule='step'), 10, 100)


def model_params(config, num_classes=10):
  """Parameters with the model's tree and shapes, PyTorch-like values, without compiling init."""
  model = train.create_model(config.model, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  rng = np.random.default_rng(0)

  def value(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    if name.endswith('scale'):
      return jnp.ones(leaf.shape, leaf.dtype)  # BN's initial gamma.
    return jnp.asarray(rng.uniform(-0.5, 0.5, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, shapes)


@pytest.mark.parametrize('nesterov', [True, False])
def test_weight_decay_reaches_every_parameter_bn_and_bias_included(nesterov):
  lr, wd, momentum = 0.5, 0.01, 0.9
  config = helpers.tiny_config(learning_rate=lr, weight_decay=wd, momentum=momentum,
                               nesterov=nesterov)
  params = model_params(config)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 10, 100))
  opt_state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, opt_state = tx.update(zero, opt_state, params)
  new = optax.apply_updates(params, updates)
  # Coupled L2: g = 0 + wd * p, then the first step of momentum SGD. The trace starts at zero, so
  # its first value is g; Nesterov steps along g + momentum * trace = (1 + momentum) * g
  # (PyTorch's d_p = g + momentum * buf with buf = g), plain momentum along g.
  factor = 1.0 - lr * wd * ((1.0 + momentum) if nesterov else 1.0)
  old_leaves, new_leaves = helpers.flat_leaves(params), helpers.flat_leaves(new)
  for name, old in old_leaves.items():
    np.testing.assert_allclose(new_leaves[name], old * np.float32(factor), rtol=1e-6,
                               err_msg=name)
  bn_scales = [n for n in old_leaves if n.endswith('/scale')]
  assert 'bn1/scale' in bn_scales and 'layer1_0/bn1/scale' in bn_scales
  for name in bn_scales:  # gamma = 1 moves by exactly -lr * wd * (1 + momentum).
    np.testing.assert_allclose(new_leaves[name], np.float32(factor), rtol=1e-6, err_msg=name)
  assert not np.array_equal(new_leaves['fc/bias'], old_leaves['fc/bias'])
  np.testing.assert_allclose(new_leaves['fc/bias'], old_leaves['fc/bias'] * np.float32(factor),
                             rtol=1e-6)


def test_the_optimizer_computes_the_learning_rate_once_per_step_with_the_same_values():
  config = schedule_config(lr_schedule='piecewise', lr_boundaries=(2, 3), warmup_epochs=1)
  lr_fn = train.create_learning_rate_fn(config, 10, 100)
  tx = train.create_optimizer(config, lr_fn)
  params = [jnp.full((i + 1, 3), 0.5) for i in range(40)]
  grads = [jnp.full(p.shape, 0.25) for p in params]
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  plain = optax.chain(optax.add_decayed_weights(config.weight_decay),
                      optax.sgd(lr_fn, momentum=config.momentum, nesterov=config.nesterov))
  plain_update = jax.jit(lambda g, s, p: plain.update(g, s, p)[0])
  state = tx.init(params)
  for step in range(40):  # Warm-up, both boundaries: every step's rate is the schedule's.
    updates, new_state = update(grads, state, params)
    want = plain_update(grads, state, params)
    for got_leaf, want_leaf in zip(updates, want):
      np.testing.assert_array_equal(got_leaf, want_leaf, err_msg=f'step {step}')
    state = new_state
  # XLA:CPU would copy the schedule's scalar arithmetic into each of the 40 leaves' update
  # kernels; inside the conditional it is there once per branch (the piecewise schedule takes
  # the sign of the step's distance to each boundary).
  hlo = update.lower(grads, tx.init(params), params).compile().as_text()
  assert hlo.count(' sign(') == 2 * len(config.lr_boundaries), hlo


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_cross_entropy_with_label_smoothing_matches_the_formula(smoothing):
  rng = np.random.default_rng(1)
  num_classes = 7
  logits = rng.normal(0, 3, (5, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, 5).astype(np.int32)
  got = np.asarray(train.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels),
                                            num_classes, smoothing))
  z = logits.astype(np.float64)
  log_softmax = z - z.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  targets = (1 - smoothing) * np.eye(num_classes)[labels] + smoothing / num_classes
  expected = -(targets * log_softmax).sum(-1)
  assert got.shape == (5,)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  if smoothing == 0.0:
    np.testing.assert_allclose(got, -log_softmax[np.arange(5), labels], rtol=1e-5)


@needs_fashion
def test_early_stopping_after_patience_epochs(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=132, num_test=64)
  patience = 2
  # No later epoch can beat epoch 1 by the minimum gain of 1.0 (accuracy is at most 1), so
  # validation accuracy never improves after epoch 1, whatever the weights and BN statistics do.
  config = helpers.tiny_config(validation_fraction=0.25, num_epochs=10,
                               early_stopping_patience=patience, early_stopping_min_delta=1.0)
  workdir = str(tmp_path)
  results = train.train_and_evaluate(config, workdir)
  spe = 6
  assert results['stopped_early'] is True
  assert results['steps'] == (1 + patience) * spe
  assert results['best_epoch'] == 1
  assert results['evaluated_step'] == spe  # The test score is the best (epoch-1) state's.
  assert helpers.read_results(workdir) == results
  assert helpers.checkpoint_steps(workdir, 'best') == [spe]
  assert helpers.checkpoint_steps(workdir)[-1] == (1 + patience) * spe
  _, _, meta = helpers.read_checkpoint(workdir)
  assert meta['stopped_early'] is True and meta['bad_epochs'] == patience
  assert meta['best_epoch'] == 1 and meta['best_step'] == spe
  validation = [m for m in helpers.read_metrics(workdir) if m['split'] == 'validation']
  assert [m['epoch'] for m in validation] == [1, 2, 3]
  assert validation[0]['accuracy'] == meta['best_accuracy']

  # Running it again trains nothing more and reports the same.
  lines = helpers.read_metrics(workdir)
  again = train.train_and_evaluate(config, workdir)
  assert helpers.read_metrics(workdir) == lines
  for key in RESULT_KEYS - {'wall_time_s'}:
    assert again[key] == results[key], key


def test_early_stopping_needs_a_validation_split(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=64, num_test=32)
  config = helpers.tiny_config(early_stopping_patience=2)
  with pytest.raises(ValueError, match='validation_fraction'):
    train.train_and_evaluate(config, str(tmp_path))


# --- 6. Safety -------------------------------------------------------------------------------


@needs_fashion
def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=96, num_test=32)  # 6 steps per epoch.
  config = helpers.tiny_config(num_epochs=3, checkpoint_every_steps=4)
  real_batch = input_pipeline.train_batch

  def poisoned(dataset, batch_size, seed, epoch, index, augment):
    batch = real_batch(dataset, batch_size, seed, epoch, index, augment)
    if (epoch, index) == (1, 3):  # Step 10.
      batch['image'][0, 0, 0, 0] = np.nan
    return batch

  monkeypatch.setattr(input_pipeline, 'train_batch', poisoned)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert 'step 10' in message and 'checkpoint (step 8)' in message and workdir in message
  assert 'learning_rate' in message
  assert helpers.checkpoint_steps(workdir) == [6, 8]
  _, state, meta = helpers.read_checkpoint(workdir)
  assert meta['step'] == 8 and int(state['step']) == 8
  for name, leaf in helpers.flat_leaves(state).items():
    assert np.all(np.isfinite(leaf)), name
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  assert all(math.isfinite(m['loss']) for m in train_lines(workdir) if m['step'] < 10)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('where', ['first', 'middle', 'last', 'bf16'])
def test_all_finite_finds_one_bad_element_in_any_leaf(bad, where):
  tree = {'a': np.ones((3, 4), np.float32), 'b': [np.zeros(5, np.float32), np.full((2,), 7.0)],
          'c': jnp.ones((2, 2), jnp.bfloat16), 'd': np.float32(3.0)}
  assert bool(jax.jit(train.all_finite)(tree))
  if where == 'bf16':
    tree['c'] = tree['c'].at[1, 0].set(bad)
  else:
    leaf = {'first': tree['a'], 'middle': tree['b'][0], 'last': tree['b'][1]}[where]
    leaf.flat[-1] = bad
  assert not bool(jax.jit(train.all_finite)(tree))
  assert bool(train.all_finite({}))


def test_all_finite_compiles_to_one_check_not_one_per_leaf():
  # A check per leaf made 4,900 of PyramidNet-272's 13,000 XLA kernels (see all_finite).
  tree = [jnp.ones((i + 1, 3)) for i in range(40)]
  hlo = jax.jit(train.all_finite).lower(tree).compile().as_text()
  assert hlo.count('is-finite(') == 1, hlo


@needs_fashion
def test_resuming_with_a_different_model_is_refused(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=96, num_test=32)
  workdir = str(tmp_path)
  config = helpers.tiny_config(num_train_steps=2, checkpoint_every_steps=1)
  train.train_and_evaluate(config, workdir)
  assert helpers.checkpoint_steps(workdir)[-1] == 2
  lines = helpers.read_metrics(workdir)

  config.model.alpha = 12.0
  config.num_train_steps = 4
  with pytest.raises(ValueError, match=r'model\.alpha|alpha') as error:
    train.train_and_evaluate(config, workdir)
  assert 'alpha' in str(error.value) and '8' in str(error.value) and '12' in str(error.value)
  assert helpers.read_metrics(workdir) == lines  # Nothing was trained.
  assert helpers.checkpoint_steps(workdir)[-1] == 2


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
  config = helpers.tiny_config(data_dir=str(tmp_path / 'empty'), num_train_steps=1)
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist') as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '--config.data_dir' in str(error.value)


def test_missing_tfds_dataset_says_tfds_build(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  config = helpers.tiny_config(dataset='cifar100', data_dir=str(tmp_path / 'empty'),
                               num_train_steps=1)
  with pytest.raises(FileNotFoundError, match='tfds build cifar100'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_unknown_config_field_is_an_error_before_training(tmp_path):
  workdir = tmp_path / 'run'
  process = subprocess.run(
      [sys.executable, '-m', 'pyramidnet_jax.main', '--config=configs/fashion_mnist_demo.py',
       f'--workdir={workdir}', '--config.no_such_field=1'],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert process.returncode != 0
  assert 'no_such_field' in process.stderr
  assert not workdir.exists()  # Failed before train_and_evaluate made the workdir.


@pytest.mark.parametrize('given,scheduler,expected', [
    ('', False, '--xla_cpu_enable_concurrency_optimized_scheduler=false'),
    ('--xla_dump_to=/tmp/x', True,
     '--xla_dump_to=/tmp/x --xla_cpu_enable_concurrency_optimized_scheduler=true'),
    # The user's own setting wins.
    ('--xla_cpu_enable_concurrency_optimized_scheduler=true', False,
     '--xla_cpu_enable_concurrency_optimized_scheduler=true'),
])
def test_configure_xla_cpu_sets_the_scheduler_before_jax_starts(given, scheduler, expected):
  code = ('import os, jax; from configs import default; from pyramidnet_jax import train; '
          f'c = default.get_config(); c.xla_cpu_concurrency_scheduler = {scheduler}; '
          'train.configure_xla_cpu(c); jax.devices(); print(os.environ["XLA_FLAGS"])')
  env = {**os.environ, 'XLA_FLAGS': given, 'PYTHONPATH': helpers.ROOT}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == expected


_PAGE_FAULTS_OF_A_REPEATED_CALL = """
import json, os, resource, sys
import jax, jax.numpy as jnp
from configs import default
from pyramidnet_jax import train
c = default.get_config(); c.cpu_keep_freed_memory = {keep}
train.configure_xla_cpu(c)
x = jnp.ones((4096, 4096))
f = jax.jit(lambda x: (jnp.exp(x) + jnp.exp(x)[::-1, ::-1].T).max(0))  # XLA's temp: 128 MB.
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _page_faults_per_call(keep: bool, **env: str) -> list[int]:
  env = {**os.environ, 'PYTHONPATH': helpers.ROOT, 'JAX_PLATFORMS': 'cpu', **env}
  out = subprocess.run([sys.executable, '-c', _PAGE_FAULTS_OF_A_REPEATED_CALL.format(keep=keep)],
                       env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc malloc only')
def test_cpu_keep_freed_memory_stops_repeated_page_faults():
  # 128 MB is 32768 pages: glibc maps a block that large afresh at every call (11 repeats: over
  # 360,000 faults), unless told to keep freed memory; then calls reuse resident pages, but for
  # a few while the heap settles (measured: at most 3 of the 11).
  assert sum(_page_faults_per_call(False)[1:]) > 300_000
  assert sum(_page_faults_per_call(True)[1:]) < 180_000
  # A malloc setting in the environment is the user's: left alone.
  assert sum(_page_faults_per_call(True, MALLOC_TRIM_THRESHOLD_='131072')[1:]) > 300_000


@pytest.mark.parametrize('platforms,expected', [('cpu', True), ('cuda', False), ('cpu,tpu', False)])
def test_malloc_tuning_only_where_jax_runs_on_cpu(platforms, expected):
  given = jax.config.jax_platforms
  jax.config.update('jax_platforms', platforms)
  try:
    assert train._jax_runs_on_cpu_only() == expected  # pylint: disable=protected-access
  finally:
    jax.config.update('jax_platforms', given)


def test_configure_xla_cpu_after_jax_started_changes_nothing(monkeypatch):
  jax.devices()
  monkeypatch.setenv('XLA_FLAGS', '')
  train.configure_xla_cpu(helpers.tiny_config())
  assert os.environ['XLA_FLAGS'] == ''
