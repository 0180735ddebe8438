"""The workdir's guards: its lock, the config a resume must keep, and the paths it can live at.

Through `python -m pyramidnet_jax.main` they are checked in tests/cli_errors_test.py.
"""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import orbax.checkpoint as ocp
import pytest

from configs import default
from pyramidnet_jax.training import workdir
from tests import helpers

HOLD_LOCK = ('import sys, time\n'
             'from pyramidnet_jax.training import workdir\n'
             'with workdir.locked(sys.argv[1]):\n'
             '  print("held", flush=True)\n'
             '  time.sleep(120)\n')


def hold_lock(path) -> subprocess.Popen:
  """Another process holding the lock of `path` until it is killed."""
  process = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(path)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, 'PYTHONPATH': helpers.ROOT})
  assert process.stdout.readline().strip() == 'held'
  return process


def test_a_second_run_is_refused_at_once_naming_the_holders_host_and_pid(tmp_path):
  holder = hold_lock(tmp_path)
  try:
    with pytest.raises(workdir.WorkdirError) as error:
      with workdir.locked(str(tmp_path)):
        pass
  finally:
    holder.kill()
    holder.wait()
  message = str(error.value)
  assert f'process {holder.pid} on host {socket.gethostname()}' in message
  assert 'is in use' in message


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
  holder = hold_lock(tmp_path)
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  with workdir.locked(str(tmp_path)):
    written = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
  assert written['pid'] == os.getpid()
  assert (tmp_path / workdir.LOCK_FILE).read_text() == ''  # Emptied at release.


@pytest.fixture
def no_flock(monkeypatch):
  """A filesystem without flock (some network filesystems): the PID file stands in."""
  def flock(fd, operation):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(fcntl, 'flock', flock)


def write_pid_file(path, **holder):
  pid_file = path / (workdir.LOCK_FILE + '.pid')
  pid_file.write_text(json.dumps({'host': socket.gethostname(), 'started': 'then',
                                  'command': 'main', **holder}))
  return pid_file


def test_without_flock_a_live_holder_refuses_and_a_dead_one_is_taken_over(tmp_path, no_flock):
  sleeper = subprocess.Popen(['sleep', '60'])
  try:
    write_pid_file(tmp_path, pid=sleeper.pid)
    with pytest.raises(workdir.WorkdirError, match=f'process {sleeper.pid} on host'):
      with workdir.locked(str(tmp_path)):
        pass
  finally:
    sleeper.kill()
    sleeper.wait()
  pid_file = write_pid_file(tmp_path, pid=sleeper.pid)  # Now dead.
  with workdir.locked(str(tmp_path)):
    assert json.loads(pid_file.read_text())['pid'] == os.getpid()
  assert not pid_file.exists()


def test_without_flock_a_reused_pid_is_not_taken_for_the_holder(tmp_path, no_flock):
  # The PID is alive (it is this process), but it started at another time: the holder is gone.
  write_pid_file(tmp_path, pid=os.getpid(), process_start='1')
  with workdir.locked(str(tmp_path)):
    pass


def test_without_flock_a_holder_on_another_host_is_named_with_the_file_to_delete(tmp_path,
                                                                                no_flock):
  pid_file = write_pid_file(tmp_path, pid=1234, host='elsewhere')
  with pytest.raises(workdir.WorkdirError) as error:
    with workdir.locked(str(tmp_path)):
      pass
  assert 'process 1234 on host elsewhere' in str(error.value)
  assert f'leaves {pid_file} behind: if the holder is gone, delete that file' in str(error.value)


def training_config(**fields):
  config = default.get_config()
  for name, value in fields.items():
    config[name] = value
  return config


def test_config_json_is_written_at_the_first_start_and_kept(tmp_path):
  workdir.record_config(str(tmp_path), training_config(num_epochs=3))
  first = (tmp_path / workdir.CONFIG_FILE).read_text()
  assert json.loads(first)['num_epochs'] == 3
  # Bookkeeping fields may change on resume; config.json still describes the run.
  workdir.record_config(str(tmp_path), training_config(num_epochs=3, log_every_steps=7,
                                                      checkpoints_to_keep=5, progress_bar=False))
  assert (tmp_path / workdir.CONFIG_FILE).read_text() == first
  assert not (tmp_path / workdir.CHANGES_FILE).exists()


def test_a_resume_with_another_batch_size_is_refused_naming_the_field(tmp_path):
  workdir.record_config(str(tmp_path), training_config())
  with pytest.raises(workdir.WorkdirError) as error:
    workdir.record_config(str(tmp_path), training_config(batch_size=64, learning_rate=0.2))
  message = str(error.value)
  assert 'batch_size: 128 in the workdir, 64 now' in message
  assert 'learning_rate: 0.1 in the workdir, 0.2 now' in message
  assert '--allow_config_change' not in message  # Neither can be allowed.
  with pytest.raises(workdir.WorkdirError, match='batch_size cannot be changed on resume'):
    workdir.record_config(str(tmp_path), training_config(batch_size=64), ['batch_size'])


def test_an_allowed_change_is_recorded_and_config_json_is_never_overwritten(tmp_path):
  workdir.record_config(str(tmp_path), training_config(num_epochs=3))
  first = (tmp_path / workdir.CONFIG_FILE).read_text()
  with pytest.raises(workdir.WorkdirError, match='--allow_config_change=num_epochs'):
    workdir.record_config(str(tmp_path), training_config(num_epochs=5))
  workdir.record_config(str(tmp_path), training_config(num_epochs=5), ['num_epochs'])
  assert (tmp_path / workdir.CONFIG_FILE).read_text() == first
  records = [json.loads(line) for line in (tmp_path / workdir.CHANGES_FILE).read_text().splitlines()]
  assert len(records) == 1 and records[0]['changes'] == {'num_epochs': {'old': 3, 'new': 5}}
  assert 'time' in records[0]
  # The changed value is now the workdir's: resuming with it needs no flag, going back does.
  workdir.record_config(str(tmp_path), training_config(num_epochs=5))
  with pytest.raises(workdir.WorkdirError, match='num_epochs: 5 in the workdir, 3 now'):
    workdir.record_config(str(tmp_path), training_config(num_epochs=3))


def test_a_damaged_config_json_is_named(tmp_path):
  (tmp_path / workdir.CONFIG_FILE).write_text('{"batch_')
  with pytest.raises(workdir.WorkdirError, match='config.json or its config_changes.jsonl cannot'):
    workdir.record_config(str(tmp_path), training_config())


def save_and_restore(directory) -> None:
  state = {'w': jax.numpy.arange(3.0)}
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  with ocp.CheckpointManager(str(directory), options=options) as manager:
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  with ocp.CheckpointManager(str(directory), options=options) as manager:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    manager.restore(1, args=ocp.args.StandardRestore(abstract))


# The refused characters are the ones that break Orbax: if a new Orbax reads them back, the
# first test fails, and if it breaks on others, the second.
@pytest.mark.parametrize('name', ['exp[1]', 'exp[ab]', 'a\\b', 'a**b'])
def test_paths_orbax_cannot_read_back_are_refused(tmp_path, name):
  with pytest.raises(Exception):  # pylint: disable=broad-except
    save_and_restore(tmp_path / name / 'checkpoints')
  with pytest.raises(workdir.WorkdirError, match='reads paths with .* as file patterns'):
    workdir.check_path(str(tmp_path / 'runs' / name))


@pytest.mark.parametrize('name', ['exp1', 'a*b', 'a?b', 'a{1,2}', 'a b%#!=,'])
def test_paths_orbax_reads_back_are_accepted(tmp_path, name):
  save_and_restore(tmp_path / name / 'checkpoints')
  workdir.check_path(str(tmp_path / 'runs' / name))


def test_a_workdir_that_is_a_file_or_under_one_is_refused(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(workdir.WorkdirError, match='is an existing file, not a directory'):
    workdir.check_path(str(tmp_path / 'file'))
  with pytest.raises(workdir.WorkdirError, match='file, so the workdir cannot be made there'):
    workdir.check_path(str(tmp_path / 'file' / 'run'))


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory this process cannot write: a read-only tmpfs for root (who may write through
  any permission bits), else permission bits."""
  path = tmp_path / 'ro'
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o555)
    yield path
    path.chmod(0o755)
    return
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', str(path)],
                           capture_output=True, check=False).returncode == 0
  if not mounted:
    pytest.skip('root without permission to mount a read-only tmpfs')
  yield path
  subprocess.run(['umount', str(path)], check=False)


def test_a_workdir_that_cannot_be_written_is_refused(read_only_dir):
  with pytest.raises(workdir.WorkdirError, match='ro: the workdir is not writable by this user'):
    workdir.check_path(str(read_only_dir))
  with pytest.raises(workdir.WorkdirError, match='where the workdir would be made, is not'):
    workdir.check_path(str(read_only_dir / 'new' / 'run'))
