"""The training loop end to end on tiny networks: real data, resumption, early stopping, safety.

Every network here is PyramidNet-8 (CIFAR stem, one basic block per stage) with alpha 8, trained on
a few hundred real Fashion-MNIST images (or mocked TFDS CIFAR), so a test takes seconds once its
step is compiled. The tests that call train_and_evaluate share one configuration and batch shape,
and a module-wide persistent XLA cache (see `compilation_cache`), so most of them compile nothing.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyramidnet_jax import data
from pyramidnet_jax.data import transforms
from pyramidnet_jax import levers
from pyramidnet_jax import models
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.training import loop
from pyramidnet_jax.training import optimizer
from pyramidnet_jax.training import runtime as runtime_lib
from tests import helpers
from tests.helpers import needs_fashion

RESULT_KEYS = {'dataset', 'test_accuracy', 'test_top5_accuracy', 'test_loss', 'best_epoch',
               'evaluated_step', 'steps', 'stopped_early', 'wall_time_s', 'process_wall_time_s',
               'num_params'}
TIMES = ('wall_time_s', 'process_wall_time_s')

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
    results = loop.train_and_evaluate(config, workdir)

  assert results == helpers.read_results(workdir)
  assert set(results) == RESULT_KEYS
  assert results['dataset'] == name
  assert results['steps'] == 2 and results['evaluated_step'] == 2
  assert results['stopped_early'] is False
  assert 0.0 <= results['test_accuracy'] <= results['test_top5_accuracy'] <= 1.0
  assert math.isfinite(results['test_loss']) and results['test_loss'] > 0
  model = models.from_config(config.model, num_classes)
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
  # The missing-data error that says how to prepare it; never a run on made-up data.
  with pytest.raises(FileNotFoundError, match='tfds build imagenet2012'):
    loop.train_and_evaluate(config, str(workdir))
  assert not (workdir / 'results.json').exists()
  assert not helpers.checkpoint_steps(str(workdir))


# --- 2. Learning on real data ------------------------------------------------------------------


@needs_fashion
def test_loss_falls_on_real_fashion_mnist():
  dataset = helpers.fashion_subset(512, 0)
  config = helpers.tiny_config(batch_size=32, learning_rate=0.1)
  steps_per_epoch = dataset.train.steps_per_epoch(config.batch_size)
  assert steps_per_epoch == 16
  total_steps = 40  # 2.5 epochs.
  model = models.from_config(config.model, dataset.num_classes)
  lr_fn = optimizer.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  runtime = runtime_lib.create_runtime(config, lr_fn)
  state = runtime_lib.create_train_state(config, model, dataset.image_shape,
                                         optimizer.create_optimizer(config, lr_fn), runtime)
  losses = []
  for step in range(total_steps):
    epoch, index = divmod(step, steps_per_epoch)
    batch = dataset.train.train_batch(config.batch_size, config.seed, epoch, index)
    state, metrics = runtime.train_step(state, runtime.put_batch(batch))
    losses.append(float(metrics['loss']))
  assert int(state.step) == total_steps
  assert all(math.isfinite(x) for x in losses)
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert first > 1.8  # Ten classes from a random start: about ln(10) = 2.30.
  assert last < 0.8 * first, losses


# --- 3. Resuming is bit-exact ------------------------------------------------------------------


@needs_fashion
@pytest.mark.parametrize('chosen', [xla_cpu.LEVERS, levers.PLAIN], ids=lambda lv: lv.name)
def test_resumed_runs_equal_the_uninterrupted_run(chosen, tmp_path, monkeypatch):
  monkeypatch.setattr(levers, '_current', chosen)
  helpers.serve_subset(monkeypatch, num_train=132, num_test=64)
  config = helpers.tiny_config(validation_fraction=0.25, checkpoint_every_steps=3,
                               checkpoints_to_keep=10)
  steps_per_epoch = data.load_dataset(config).train.steps_per_epoch(config.batch_size)
  assert steps_per_epoch == 6  # 98 of the 132 images after the hold-out.
  total = 2 * steps_per_epoch

  def run(workdir, *stops):
    for steps in stops:
      config.num_train_steps = steps
      results = loop.train_and_evaluate(config, str(tmp_path / workdir),
                                        allowed_config_changes=('num_train_steps',))
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
  for key in TIMES:
    del straight[key]
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
    for key in TIMES:
      del results[key]
    assert results == straight, name
  # The interrupted runs saved their stopping step.
  assert steps_per_epoch + 2 in helpers.checkpoint_steps(str(tmp_path / 'mid_epoch'))


@needs_fashion
def test_early_stopping_after_patience_epochs(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=132, num_test=64)
  patience = 2
  # No later epoch can beat epoch 1 by the minimum gain of 1.0 (accuracy is at most 1), so
  # validation accuracy never improves after epoch 1, whatever the weights and BN statistics do.
  config = helpers.tiny_config(validation_fraction=0.25, num_epochs=10,
                               early_stopping_patience=patience, early_stopping_min_delta=1.0)
  workdir = str(tmp_path)
  results = loop.train_and_evaluate(config, workdir)
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
  again = loop.train_and_evaluate(config, workdir)
  assert helpers.read_metrics(workdir) == lines
  for key in RESULT_KEYS - set(TIMES):
    assert again[key] == results[key], key


def test_early_stopping_needs_a_validation_split(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=64, num_test=32)
  config = helpers.tiny_config(early_stopping_patience=2)
  with pytest.raises(ValueError, match='validation_fraction'):
    loop.train_and_evaluate(config, str(tmp_path))


# --- 6. Safety -------------------------------------------------------------------------------


@needs_fashion
def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=96, num_test=32)  # 6 steps per epoch.
  config = helpers.tiny_config(num_epochs=3, checkpoint_every_steps=4)
  real_batch = data.ArraySplit.train_batch

  def poisoned(split, batch_size, seed, epoch, index):
    batch = real_batch(split, batch_size, seed, epoch, index)
    if (epoch, index) == (1, 3):  # Step 10: pixels normalised on the host, one of them NaN.
      batch['image'] = transforms.normalize(batch['image'], split.preprocessing.mean,
                                            split.preprocessing.std)
      batch['image'][0, 0, 0, 0] = np.nan
    return batch

  monkeypatch.setattr(data.ArraySplit, 'train_batch', poisoned)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError) as error:
    loop.train_and_evaluate(config, workdir)
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


@needs_fashion
def test_resuming_with_a_different_model_is_refused(tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=96, num_test=32)
  workdir = str(tmp_path)
  config = helpers.tiny_config(num_train_steps=2, checkpoint_every_steps=1)
  loop.train_and_evaluate(config, workdir)
  assert helpers.checkpoint_steps(workdir)[-1] == 2
  lines = helpers.read_metrics(workdir)

  config.model.alpha = 12.0
  config.num_train_steps = 4
  with pytest.raises(ValueError, match=r'model\.alpha|alpha') as error:
    loop.train_and_evaluate(config, workdir)
  assert 'alpha' in str(error.value) and '8' in str(error.value) and '12' in str(error.value)
  assert helpers.read_metrics(workdir) == lines  # Nothing was trained.
  assert helpers.checkpoint_steps(workdir)[-1] == 2


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
  config = helpers.tiny_config(data_dir=str(tmp_path / 'empty'), num_train_steps=1)
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist') as error:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '--config.data_dir' in str(error.value)


def test_missing_tfds_dataset_says_tfds_build(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  config = helpers.tiny_config(dataset='cifar100', data_dir=str(tmp_path / 'empty'),
                               num_train_steps=1)
  with pytest.raises(FileNotFoundError, match='tfds build cifar100'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
