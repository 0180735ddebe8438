"""Workdirs left by a kill, a damaged file or a changed dataset: the same command resumes them to
the uninterrupted run's numbers, or refuses in one line that says what to do.

Each run is PyramidNet-8 a8 on 132 real Fashion-MNIST images (98 train after the hold-out: 6
steps an epoch), 2 epochs, a checkpoint every 4 steps: checkpoints at 4, 6, 8, 12, and best/ at
the epoch ends that improve (both do). The interrupted states are produced on disk exactly as a
kill leaves them, after a run stopped at a chosen point by an exception (as a kill would stop it).
"""

import dataclasses
import os
import shutil

import pytest

from pyramidnet_jax.data import fashion_mnist
from pyramidnet_jax.training import loop
from pyramidnet_jax.training import workdir as workdir_lib
from tests import helpers
from tests.helpers import needs_fashion

pytestmark = needs_fashion

SPE = 6  # Steps per epoch.


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  with helpers.persistent_compilation_cache(str(tmp_path_factory.mktemp('xla_cache'))):
    yield


def make_config(**overrides):
  return helpers.tiny_config(validation_fraction=0.25, checkpoint_every_steps=4, num_epochs=2,
                             **overrides)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The uninterrupted run: (workdir, its printed epoch lines)."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  with pytest.MonkeyPatch.context() as monkeypatch:
    helpers.serve_subset(monkeypatch, num_train=132, num_test=64)
    printed = _printed_lines(lambda: loop.train_and_evaluate(make_config(), workdir))
  assert helpers.checkpoint_steps(workdir) == [8, 12]
  results = helpers.read_results(workdir)
  # Epoch 2 improved on epoch 1, so each state below differs from the run's other best.
  assert results['best_epoch'] == 2 and results['evaluated_step'] == 2 * SPE
  return workdir, printed


def _printed_lines(run):
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    run()
  return [line for line in out.getvalue().splitlines() if line.startswith('epoch ')]


@pytest.fixture
def serve(monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=132, num_test=64)


def stopped_run(monkeypatch, workdir, stop):
  """Runs the config in workdir until `stop(monkeypatch)` ends it; then undoes the hook."""
  with monkeypatch.context() as patch:
    stop(patch)
    with pytest.raises(helpers.StopRun):
      loop.train_and_evaluate(make_config(), workdir)


def one_line(error) -> str:
  message = str(error.value)
  assert '\n' not in message, message
  return message


# --- 1 and 2: a kill between the two end-of-epoch commits, in either order -------------------


def test_best_committed_latest_not_resumes_to_the_same_run(straight, serve, monkeypatch,
                                                           tmp_path, caplog):
  workdir = str(tmp_path)
  stopped_run(monkeypatch, workdir, lambda p: helpers.stop_after_epoch(p, 2))
  # The kill came after best/12 committed and before checkpoints/12 did.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '12'))
  assert helpers.checkpoint_steps(workdir) == [8]
  assert 12 in helpers.checkpoint_steps(workdir, 'best')

  caplog.set_level('WARNING')
  loop.train_and_evaluate(make_config(), workdir)
  helpers.assert_same_run(workdir, straight[0])
  assert any('best/12' in r.getMessage() and 'never recorded' in r.getMessage()
             for r in caplog.records)


def test_latest_committed_best_unfinished_resumes_to_the_same_run(straight, serve, monkeypatch,
                                                                  tmp_path, caplog):
  workdir = str(tmp_path)
  stopped_run(monkeypatch, workdir, lambda p: helpers.stop_after_epoch(p, 1))
  epoch_1_best = str(tmp_path.parent / f'{tmp_path.name}-best6')
  shutil.copytree(os.path.join(workdir, 'best', '6'), epoch_1_best)
  with monkeypatch.context() as patch:
    helpers.stop_after_epoch(patch, 2)
    with pytest.raises(helpers.StopRun):
      loop.train_and_evaluate(make_config(), workdir)
  # The kill came after checkpoints/12 committed and before best/12 did: best/12 is still a
  # temporary directory, and the previous best (step 6) not yet deleted.
  best = os.path.join(workdir, 'best')
  os.rename(os.path.join(best, '12'), os.path.join(best, '12.orbax-checkpoint-tmp'))
  if not os.path.isdir(os.path.join(best, '6')):
    shutil.copytree(epoch_1_best, os.path.join(best, '6'))
  assert helpers.checkpoint_steps(workdir) == [8, 12]

  caplog.set_level('WARNING')
  loop.train_and_evaluate(make_config(), workdir)
  # Not the older best (step 6): best/12, saved again from checkpoints/12.
  helpers.assert_same_run(workdir, straight[0])
  assert not os.path.exists(os.path.join(best, '12.orbax-checkpoint-tmp'))
  messages = [r.getMessage() for r in caplog.records]
  assert any('12.orbax-checkpoint-tmp' in m for m in messages), messages
  assert any('saving it again from' in m and 'checkpoints/12' in m for m in messages), messages


# --- 5: damaged checkpoints ----------------------------------------------------------------------


def test_damaged_latest_checkpoint_falls_back_and_is_moved_aside(straight, serve, monkeypatch,
                                                                 tmp_path, caplog):
  workdir = str(tmp_path)
  stopped_run(monkeypatch, workdir, lambda p: helpers.stop_after_epoch(p, 2))
  assert helpers.checkpoint_steps(workdir) == [8, 12]
  helpers.flip_bytes(os.path.join(workdir, 'checkpoints', '12'))

  caplog.set_level('WARNING')
  loop.train_and_evaluate(make_config(), workdir)
  # Resumed from step 8 (whose best, step 6, was kept for it), and replayed to the same run.
  helpers.assert_same_run(workdir, straight[0])
  moved = os.path.join(workdir, 'corrupted', 'checkpoints-12')
  assert os.path.isdir(os.path.join(moved, 'state'))  # Moved aside, not deleted.
  assert any('checkpoints/12' in r.getMessage() and 'damaged' in r.getMessage()
             and moved in r.getMessage() for r in caplog.records)


def test_every_checkpoint_damaged_is_refused_in_one_line(serve, monkeypatch, tmp_path):
  workdir = str(tmp_path)
  stopped_run(monkeypatch, workdir, lambda p: helpers.stop_after_epoch(p, 2))
  helpers.flip_bytes(os.path.join(workdir, 'checkpoints', '12'))
  # A meta cut short counts as damage too.
  meta_file = os.path.join(workdir, 'checkpoints', '8', 'meta', 'metadata')
  with open(meta_file, 'r+') as f:
    f.truncate(10)
  lines = helpers.read_metrics(workdir)
  listing = sorted(os.listdir(workdir))

  with pytest.raises(ValueError) as error:
    loop.train_and_evaluate(make_config(), workdir)
  message = one_line(error)
  for path in ('checkpoints/12', 'checkpoints/8', f'move {workdir}/checkpoints'):
    assert path in message, message
  assert helpers.read_metrics(workdir) == lines  # Nothing trained,
  assert sorted(os.listdir(workdir)) == listing  # nothing moved.
  assert helpers.checkpoint_steps(workdir) == [8, 12]


def test_damaged_best_is_saved_again_from_its_latest_twin(straight, serve, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight[0], workdir)
  helpers.flip_bytes(os.path.join(workdir, 'best', '12'))
  loop.train_and_evaluate(make_config(), workdir)
  helpers.assert_same_run(workdir, straight[0])
  assert os.path.isdir(os.path.join(workdir, 'corrupted', 'best-12'))


def test_damaged_best_without_a_twin_is_refused_not_replaced(serve, tmp_path):
  # No later epoch can beat epoch 1 by 1.0: best stays at step 6, which checkpoints/ no longer
  # keeps when the run ends ([8, 12]).
  workdir = str(tmp_path)
  config = make_config(early_stopping_min_delta=1.0)
  loop.train_and_evaluate(config, workdir)
  assert helpers.checkpoint_steps(workdir) == [8, 12]
  assert helpers.checkpoint_steps(workdir, 'best') == [6]
  helpers.flip_bytes(os.path.join(workdir, 'best', '6'))
  os.remove(os.path.join(workdir, 'results.json'))

  with pytest.raises(ValueError) as error:
    loop.train_and_evaluate(config, workdir)
  message = one_line(error)
  assert 'best/6' in message and 'move' in message, message
  assert not os.path.exists(os.path.join(workdir, 'results.json'))  # Never an older best.


# --- 3: a checkpoint that does not read back -----------------------------------------------------


def test_unreadable_first_checkpoint_stops_the_run_at_once(serve, monkeypatch, tmp_path):
  # Orbax writes a '[1]' path's arrays without the manifest that restores them: a real case
  # of checkpoints that save without error and cannot be read.
  monkeypatch.setattr(workdir_lib, 'check_path', lambda workdir: None, raising=False)
  workdir = str(tmp_path / 'exp[1]')
  with pytest.raises(ValueError) as error:
    loop.train_and_evaluate(make_config(), workdir)
  message = one_line(error)
  assert 'checkpoints/4' in message and 'does not read back' in message, message
  assert [m['step'] for m in helpers.read_metrics(workdir)] == [1, 2, 3, 4]


# --- An I/O error during a save ------------------------------------------------------------------


def test_disk_error_in_the_best_save_stops_in_one_line_and_resumes(straight, serve, monkeypatch,
                                                                   tmp_path):
  import errno  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  real_rename = async_path.rename

  async def full_disk(source, target, *args, **kwargs):
    if f'{os.sep}best{os.sep}12' in str(target):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await real_rename(source, target, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(async_path, 'rename', full_disk)
    with pytest.raises(ValueError) as error:
      loop.train_and_evaluate(make_config(), workdir)
  message = one_line(error)
  assert 'best/12' in message and 'No space left' in message, message
  assert 12 not in helpers.checkpoint_steps(workdir)  # The latest save never started.

  loop.train_and_evaluate(make_config(), workdir)
  helpers.assert_same_run(workdir, straight[0])


# --- 7: the epoch line and the wall time across a resume -----------------------------------------


def test_resumed_epoch_line_and_wall_time_cover_every_process(straight, serve, monkeypatch,
                                                              tmp_path):
  workdir = str(tmp_path)
  # Stopped mid-epoch 2, right after the checkpoint at step 8.
  first = _printed_lines(
      lambda: stopped_run(monkeypatch, workdir,
                          lambda p: helpers.stop_after_save(p, 'checkpoints', 8)))
  assert len(first) == 1
  results = {}
  second = _printed_lines(lambda: results.update(loop.train_and_evaluate(make_config(), workdir)))

  def without_time(line):
    return line.rsplit(' | ', 1)[0]
  straight_lines = straight[1]
  assert len(straight_lines) == 2 and len(second) == 1
  # Epoch 2's train loss and accuracy average all 6 of its steps, 4 of them trained before the
  # resume.
  assert without_time(second[0]) == without_time(straight_lines[1])
  assert without_time(first[0]) == without_time(straight_lines[0])
  helpers.assert_same_run(workdir, straight[0])
  _, _, meta8 = helpers.read_checkpoint(workdir, step=8)
  assert meta8['epoch_steps'] == 2
  earlier = _timing(workdir, 8)['wall_time_s']
  assert earlier > 0
  assert results['process_wall_time_s'] > 0
  assert results['wall_time_s'] == pytest.approx(earlier + results['process_wall_time_s'],
                                                 rel=1e-9)
  assert helpers.read_results(workdir)['wall_time_s'] == results['wall_time_s']


def _timing(workdir, step):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'checkpoints', str(step), 'timing', 'metadata')) as f:
    return json.load(f)


# --- 8: the class list changed before a resume ---------------------------------------------------


@pytest.mark.parametrize('change', ['add_and_rename', 'rename'])
def test_changed_class_list_is_named_not_blamed_on_the_checkpoint(change, monkeypatch, tmp_path):
  subset = helpers.serve_subset(monkeypatch, num_train=132, num_test=64)
  workdir = str(tmp_path)
  stopped_run(monkeypatch, workdir, lambda p: helpers.stop_after_epoch(p, 1))
  lines = helpers.read_metrics(workdir)

  names = ['Jacket' if n == 'Coat' else n for n in subset.class_names]
  if change == 'add_and_rename':
    names.append('Hat')
  changed = dataclasses.replace(subset, class_names=tuple(names), num_classes=len(names))
  monkeypatch.setattr(fashion_mnist, 'load', lambda data_dir: changed)
  with pytest.raises(ValueError) as error:
    loop.train_and_evaluate(make_config(), workdir)
  message = one_line(error)
  assert "removed 'Coat'" in message, message
  if change == 'add_and_rename':
    assert "added 'Jacket', 'Hat'" in message and '10 classes then, 11 now' in message, message
  else:
    assert "added 'Jacket'" in message, message
  assert helpers.read_metrics(workdir) == lines
  assert helpers.checkpoint_steps(workdir) == [4, 6]
