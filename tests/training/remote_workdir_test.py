"""A workdir on an object store (--workdir=gs://bucket/run), on a fake gs:// with no network.

The fake store is etils.epath's own test hook (`epath.testing.mock_epath`) mapping gs://BUCKET/...
to a local folder, with epath's TensorFlow check answering 'not installed' (what EPATH_USE_TF=false
does, but that check is cached for the process) so that epath routes gs:// through its backend
table instead of TensorFlow's gfile. It behaves as an object store where it matters here: no rename or
replace, no append. Orbax reaches it too: its file operations go through epath, so it takes its
object-store path (a step is written in place and committed by commit_success.txt, never
renamed), and its arrays, which TensorStore writes with its own gcs driver, are routed by
patching Orbax's gs:// -> TensorStore spec function to TensorStore's file driver at the same
local folder (test only). Orbax's bucket-type query (Hierarchical Namespace, a network call) is
patched to 'flat bucket'.
"""

import contextlib
import json
import os
import socket
import time
from unittest import mock

from etils import epath
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing
import pytest

from pyramidnet_jax.evaluation import evaluator
from pyramidnet_jax.training import loop
from pyramidnet_jax.training import remote_lock
from pyramidnet_jax.training import storage
from pyramidnet_jax.training import workdir as workdir_lib
from tests import helpers
from tests.helpers import needs_fashion

BUCKET = 'gs://fake-bucket'


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  with helpers.persistent_compilation_cache(str(tmp_path_factory.mktemp('xla_cache'))):
    yield


class FakeStore:
  """gs:// paths mapped onto `root`; records the object-store rules broken (should stay empty)."""

  def __init__(self, root: str):
    self.root = root
    self.refused: list[str] = []
    self.read_only = False

  def local(self, path) -> str:
    path = os.fspath(path)
    return os.path.join(self.root, path[len('gs://'):]) if path.startswith('gs://') else path

  def remote(self, path) -> str:
    path = os.fspath(path)
    return 'gs://' + os.path.relpath(path, self.root) if path.startswith(self.root + '/') else path

  def _refuse(self, what: str, path) -> None:
    self.refused.append(f'{what} {path}')
    raise OSError(f'an object store has no {what}: {path}')

  def functions(self):
    def plain(original, path, *args, **kwargs):
      return original(self.local(path), *args, **kwargs)

    def open_(original, path, mode='r', *args, **kwargs):
      if os.fspath(path).startswith('gs://'):
        if 'a' in mode or '+' in mode:
          self._refuse(f'open mode {mode!r}', path)
        if self.read_only and 'w' in mode:
          raise PermissionError(f'403 Forbidden: {path}')
        if 'w' in mode:  # An object's "folders" are only its name's prefix.
          os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
      return original(self.local(path), mode, *args, **kwargs)

    def no_rename(what):
      def rename(original, path, dst, *args, **kwargs):
        if os.fspath(path).startswith('gs://'):
          self._refuse(what, path)
        return original(path, dst, *args, **kwargs)
      return rename

    def copy(original, path, dst, *args, **kwargs):
      return original(self.local(path), self.local(dst), *args, **kwargs)

    def glob(original, pattern):
      return [self.remote(p) for p in original(self.local(pattern))]

    def walk(original, top, **kwargs):
      for root, dirs, files in original(self.local(top), **kwargs):
        yield self.remote(root), dirs, files

    names = ('exists', 'isdir', 'listdir', 'makedirs', 'mkdir', 'remove', 'rmtree', 'stat')
    return {**{name: plain for name in names}, 'open': open_, 'rename': no_rename('rename'),
            'replace': no_rename('replace'), 'copy': copy, 'glob': glob, 'walk': walk}


@pytest.fixture
def store(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  fake = FakeStore(str(tmp_path / 'store'))
  os.makedirs(fake.root)
  monkeypatch.setattr(epath_gpath, '_is_tf_installed', lambda: False)
  monkeypatch.setattr(remote_lock, 'CONFIRM_S', 0.0)

  def tensorstore_spec(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {'driver': 'file', 'path': os.path.join(fake.root, bucket, key)}
  with contextlib.ExitStack() as stack:
    stack.enter_context(epath_testing.mock_epath(**fake.functions()))
    stack.enter_context(mock.patch.object(gcs_utils, 'get_kvstore_for_gcs', tensorstore_spec))
    stack.enter_context(mock.patch.object(gcs_utils, 'is_hierarchical_namespace_enabled',
                                          lambda path: False))
    # Nothing may land in a local folder named 'gs:' (a URL taken for a relative path).
    monkeypatch.chdir(tmp_path / 'store')
    yield fake
  assert not os.path.exists(os.path.join(fake.root, 'gs:'))
  assert fake.refused == []


@needs_fashion
def test_a_run_on_an_object_store_trains_resumes_exactly_and_writes_its_report_there(
    store, tmp_path, monkeypatch):
  helpers.serve_subset(monkeypatch, num_train=132, num_test=64)
  config = helpers.tiny_config(validation_fraction=0.25, checkpoint_every_steps=3,
                               checkpoints_to_keep=2, write_report=True)
  total = 12  # Two epochs of 6 steps.

  def run(workdir, *stops):
    for steps in stops:
      config.num_train_steps = steps
      results = loop.train_and_evaluate(config, workdir,
                                        allowed_config_changes=('num_train_steps',))
    return results

  straight = run(str(tmp_path / 'local'), total)
  remote = f'{BUCKET}/run'
  # Stopped mid-epoch (step 8, no periodic checkpoint), then resumed to the end.
  resumed = run(remote, 8, total)

  backing = store.local(remote)
  step, state, meta = helpers.read_checkpoint(backing)
  _, straight_state, straight_meta = helpers.read_checkpoint(str(tmp_path / 'local'))
  assert step == total
  helpers.assert_trees_equal(state, straight_state, 'state')
  helpers.assert_trees_equal(helpers.read_checkpoint(backing, 'best')[1],
                             helpers.read_checkpoint(str(tmp_path / 'local'), 'best')[1], 'best')
  assert meta == straight_meta
  for key in ('wall_time_s', 'process_wall_time_s'):
    del straight[key], resumed[key]
  assert resumed == straight
  # Steps were pruned to checkpoints_to_keep on the store (no rename: commit file first).
  assert helpers.checkpoint_steps(backing) == [9, 12]
  assert all(os.path.exists(os.path.join(backing, 'checkpoints', str(s), 'commit_success.txt'))
             for s in (9, 12))

  files = {p.name for p in epath.Path(remote).iterdir()}
  assert {'config.json', 'config_changes.jsonl', 'metrics.jsonl', 'results.json',
          'class_names.json', 'report', 'tensorboard', 'checkpoints', 'best'} <= files
  assert 'lock' not in files  # Released at the end.
  assert json.loads(epath.Path(remote, 'results.json').read_text()) == {
      **resumed, **json.loads(epath.Path(remote, 'results.json').read_text())}
  assert helpers.read_metrics(backing) == helpers.read_metrics(str(tmp_path / 'local'))
  report = {p.name for p in epath.Path(remote, 'report').iterdir()}
  assert report == {'report.json', 'report.md', 'confusion_matrix.png', 'training_curves.png'}
  assert json.loads(epath.Path(remote, 'report', 'report.json').read_text())['workdir'] == remote
  assert any(p.name.startswith('events.out.tfevents')
             for p in epath.Path(remote, 'tensorboard').iterdir())
  assert len(epath.Path(remote, 'config_changes.jsonl').read_text().splitlines()) == 1

  # pyramidnet_jax.evaluate's path: the best checkpoint read back from the store, report there.
  evaluated = evaluator.evaluate_workdir(remote)
  assert evaluated['checkpoint'] == f'{remote}/best/{resumed["evaluated_step"]}/state'
  assert evaluated['files'] and all(path.startswith(f'{remote}/report/')
                                    for path in evaluated['files'].values())


def test_write_atomically_writes_the_object_whole_without_a_temporary(store):
  path = f'{BUCKET}/run/results.json'
  storage.write_atomically(path, 'one')
  storage.write_atomically(path, 'two')
  assert epath.Path(path).read_text() == 'two'
  assert os.listdir(store.local(f'{BUCKET}/run')) == ['results.json']
  storage.append_text(path, '+three')
  assert epath.Path(path).read_text() == 'two+three'


def test_check_path_refuses_patterns_and_a_missing_bucket_without_the_network():
  for bad in ('gs://bucket/run[1]', 'gs://bucket/a**b', 'gs://bucket/x\\y'):
    with pytest.raises(workdir_lib.WorkdirError, match='file patterns'):
      workdir_lib.check_path(bad)
  with pytest.raises(workdir_lib.WorkdirError, match='names no bucket'):
    workdir_lib.check_path('gs:///run')


def test_check_path_refuses_an_object_and_an_unwritable_bucket(store):
  epath.Path(f'{BUCKET}/taken').write_text('x')
  with pytest.raises(workdir_lib.WorkdirError, match='existing object'):
    workdir_lib.check_path(f'{BUCKET}/taken')
  workdir_lib.check_path(f'{BUCKET}/fresh')  # Writable: accepted, and no probe left behind.
  assert not epath.Path(f'{BUCKET}/fresh').exists() or not list(
      epath.Path(f'{BUCKET}/fresh').iterdir())
  store.read_only = True
  with pytest.raises(workdir_lib.WorkdirError, match='cannot be written.*403 Forbidden'):
    workdir_lib.check_path(f'{BUCKET}/fresh')


def test_a_second_run_is_refused_naming_the_holder_and_the_lock_is_released(store):
  run = f'{BUCKET}/run'
  with workdir_lib.locked(run):
    holder = json.loads(epath.Path(run, 'lock').read_text())
    assert holder['host'] == socket.gethostname() and holder['pid'] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirError) as refused:
      with workdir_lib.locked(run):
        pass
    message = str(refused.value)
    assert '\n' not in message
    assert f'process {os.getpid()} on host {socket.gethostname()}' in message
    assert 'last heartbeat was 0 s ago' in message
  assert not epath.Path(run, 'lock').exists()
  with workdir_lib.locked(run):  # Free again.
    pass


def _leave_lock(run: str, **holder) -> None:
  epath.Path(run).mkdir(parents=True, exist_ok=True)
  epath.Path(run, 'lock').write_text(json.dumps({'pid': 4242, 'started': '?', 'command': 'main',
                                                 **holder}))


def test_a_lock_of_another_host_is_taken_over_only_once_its_heartbeat_is_stale(store):
  run = f'{BUCKET}/run'
  _leave_lock(run, host='tpu-worker-7', heartbeat=time.time() - 30)
  with pytest.raises(workdir_lib.WorkdirError, match='process 4242 on host tpu-worker-7'):
    with workdir_lib.locked(run):
      pass
  _leave_lock(run, host='tpu-worker-7', heartbeat=time.time() - remote_lock.STALE_S - 1)
  with workdir_lib.locked(run):
    assert json.loads(epath.Path(run, 'lock').read_text())['pid'] == os.getpid()


def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over_at_once(store):
  run = f'{BUCKET}/run'
  dead = 2 ** 22 + 12345  # Above the default pid_max: no such process.
  _leave_lock(run, host=socket.gethostname(), pid=dead, heartbeat=time.time())
  with workdir_lib.locked(run):
    assert json.loads(epath.Path(run, 'lock').read_text())['pid'] == os.getpid()


def test_the_heartbeat_renews_the_lock(store, monkeypatch):
  monkeypatch.setattr(remote_lock, 'HEARTBEAT_S', 0.05)
  run = f'{BUCKET}/run'
  with workdir_lib.locked(run):
    first = json.loads(epath.Path(run, 'lock').read_text())['heartbeat']
    time.sleep(0.3)
    assert json.loads(epath.Path(run, 'lock').read_text())['heartbeat'] > first
