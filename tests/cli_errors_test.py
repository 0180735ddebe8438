"""Every expected failure of a command line ends as one `error:` line with exit status 1.

Each test runs the real command in a subprocess. Most fail before any training, in a second or
two; the few that train run PyramidNet-8 for a couple of steps, sharing one XLA cache.
"""

import argparse
import errno
import gzip
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from configs import fashion_mnist_demo
from pyramidnet_jax import cli
from pyramidnet_jax.data import fashion_mnist
from pyramidnet_jax.interop import torch_weights
from pyramidnet_jax.training import workdir as workdir_lib
from tests import helpers
from tests.training.workdir_test import hold_lock
from tests.training.workdir_test import read_only_dir  # noqa: F401  A fixture.

DEMO = os.path.join(helpers.ROOT, 'configs', 'fashion_mnist_demo.py')


def run(module: str, *args: str, env: dict | None = None, timeout: int = 120):
  return subprocess.run([sys.executable, '-m', f'pyramidnet_jax.{module}', *args],
                        cwd=helpers.ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, 'PYTHONPATH': helpers.ROOT, 'JAX_PLATFORMS': 'cpu',
                             **(env or {})})


def error_line(process) -> str:
  """The one line of an expected failure; fails the test on anything else."""
  lines = process.stderr.strip().splitlines()
  assert process.returncode == 1, process.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), process.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """Flags for a quick training: 2 steps on the first 256 / 128 images of the real
  Fashion-MNIST, with an XLA cache shared by the xdist workers (their base temps have one
  parent), so one compile serves every run."""
  if not helpers.HAVE_FASHION:
    pytest.skip('needs the real Fashion-MNIST: `apt-get install dataset-fashion-mnist`')
  data_dir = tmp_path_factory.mktemp('fashion')
  for images_file, labels_file in fashion_mnist.FILES.values():
    for name, count in ((images_file, 256), (labels_file, 256)):
      array = fashion_mnist.read_idx(os.path.join(helpers.FASHION_DIR, name))[:count]
      header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
      with gzip.open(data_dir / name, 'wb') as f:
        f.write(header + array.tobytes())
  cache = tmp_path_factory.getbasetemp().parent / 'cli_errors_xla_cache'
  return (f'--config={DEMO}', f'--config.data_dir={data_dir}', '--config.progress_bar=false',
          '--config.write_report=false', f'--config.compilation_cache_dir={cache}')


# A representative subset of the fields (tests/training/config_checks_test.py checks
# every rule): each is refused at start with the field, its value and the range.
BAD_OVERRIDES = [
    ('checkpoints_to_keep=0', 'config.checkpoints_to_keep = 0: must be a whole number >= 1'),
    ('log_every_steps=0', 'config.log_every_steps = 0: must be a whole number >= 1'),
    ('lr_boundaries=abc', "config.lr_boundaries = ('abc',): must be a tuple of non-negative"),
    ('num_epochs=0', 'config.num_epochs = 0: must be >= 1 unless config.num_train_steps > 0'),
    ('momentum=2', 'config.momentum = 2.0: must be a number in [0, 1)'),
]


@pytest.mark.parametrize('override,message', BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_a_bad_field_is_one_line_before_anything_is_made(tmp_path, override, message):
  process = run('main', f'--config={DEMO}', f'--workdir={tmp_path / "run"}',
                f'--config.{override}')
  assert message in error_line(process)
  assert not (tmp_path / 'run').exists()


def test_a_bracket_workdir_is_refused_before_training(tmp_path):
  process = run('main', f'--config={DEMO}', f'--workdir={tmp_path / "runs" / "exp[1]"}')
  assert 'as file patterns' in error_line(process)
  assert not (tmp_path / 'runs').exists()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / 'run').write_text('not a directory')
  process = run('main', f'--config={DEMO}', f'--workdir={tmp_path / "run"}')
  assert 'is an existing file, not a directory' in error_line(process)


def test_a_read_only_workdir_is_one_line(read_only_dir):  # noqa: F811
  process = run('main', f'--config={DEMO}', f'--workdir={read_only_dir / "run"}')
  assert 'is not writable by this user' in error_line(process)


def test_a_second_training_on_a_workdir_in_use_is_refused_at_once(tmp_path):
  holder = hold_lock(tmp_path)
  try:
    process = run('main', f'--config={DEMO}', f'--workdir={tmp_path}', timeout=60)
  finally:
    holder.kill()
    holder.wait()
  line = error_line(process)
  assert f'in use by process {holder.pid} on host {socket.gethostname()}' in line
  assert not (tmp_path / workdir_lib.CONFIG_FILE).exists()


def test_a_resume_with_another_batch_size_is_refused_naming_it(tmp_path):
  config = fashion_mnist_demo.get_config()
  config.num_train_steps = 2
  workdir_lib.record_config(str(tmp_path), config)
  process = run('main', f'--config={DEMO}', f'--workdir={tmp_path}', '--config.num_train_steps=2',
                '--config.batch_size=32')
  line = error_line(process)
  assert 'batch_size: 64 in the workdir, 32 now' in line
  process = run('main', f'--config={DEMO}', f'--workdir={tmp_path}', '--config.num_train_steps=2',
                '--config.batch_size=32', '--allow_config_change=batch_size')
  assert ('--allow_config_change: batch_size cannot be changed on resume; only num_epochs, '
          'num_train_steps, early_stopping_patience, early_stopping_min_delta can') in error_line(
              process)


def test_a_killed_runs_lock_is_taken_over_and_the_run_extended_with_the_flag(tmp_path, tiny_run):
  holder = hold_lock(tmp_path)
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  common = (*tiny_run, f'--workdir={tmp_path}')
  first = run('main', *common, '--config.num_train_steps=2', timeout=180)
  assert first.returncode == 0, first.stderr[-3000:]
  config_json = (tmp_path / workdir_lib.CONFIG_FILE).read_text()

  refused = run('main', *common, '--config.num_train_steps=3')
  assert ('num_train_steps: 2 in the workdir, 3 now. Resume with the same values, or use a new '
          '--workdir. To change num_train_steps on purpose, add '
          '--allow_config_change=num_train_steps.') in error_line(refused)

  extended = run('main', *common, '--config.num_train_steps=3',
                 '--allow_config_change=num_train_steps', timeout=180)
  assert extended.returncode == 0, extended.stderr[-3000:]
  assert json.loads((tmp_path / 'results.json').read_text())['steps'] == 3
  assert (tmp_path / workdir_lib.CONFIG_FILE).read_text() == config_json
  changes = [json.loads(line) for line in
             (tmp_path / workdir_lib.CHANGES_FILE).read_text().splitlines()]
  assert [c['changes'] for c in changes] == [{'num_train_steps': {'old': 2, 'new': 3}}]


@pytest.fixture
def tiny_tmpfs(tmp_path):
  path = tmp_path / 'full'
  path.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs', str(path)],
                    capture_output=True, check=False).returncode != 0:
    pytest.skip('cannot mount a tmpfs here (not root?); test_disk_full_is_mapped covers the '
                'mapping in-process')
  yield path
  subprocess.run(['umount', str(path)], check=False)


def test_a_full_disk_is_one_line_naming_the_path(tiny_tmpfs, tiny_run):
  process = run('main', *tiny_run, f'--workdir={tiny_tmpfs / "run"}',
                '--config.num_train_steps=30', '--config.checkpoint_every_steps=3', timeout=180)
  line = error_line(process)
  assert f'no space left on the device writing {tiny_tmpfs / "run"}' in line
  assert 'run the same command again' in line


@pytest.mark.parametrize('error', [
    OSError(errno.ENOSPC, 'No space left on device', '/w/metrics.jsonl'),
    # How Orbax's TensorStore reports a failed checkpoint write, in the main thread.
    ValueError('RESOURCE_EXHAUSTED: Failed writing: "/w/checkpoints/10.orbax-checkpoint-tmp/'
               'state/d/8c": Failed to write 9905 bytes to file 11: No space left on device '
               "[os_error_code='28']"),
], ids=['oserror', 'orbax'])
def test_disk_full_is_mapped(monkeypatch, capsys, error):
  def main(argv):
    try:
      raise error
    finally:
      raise OSError(errno.ENOSPC, 'No space left on device')  # A flush on the way out.
  monkeypatch.setattr(cli, '_exit_quietly', lambda: sys.exit(1))
  with pytest.raises(SystemExit) as exit_:
    cli.run(main)([])
  assert exit_.value.code == 1
  path = '/w/metrics.jsonl' if isinstance(error, OSError) else '/w/checkpoints/10'
  assert capsys.readouterr().err == (
      f'error: no space left on the device writing {path}: free some space (or use a --workdir '
      'on another disk) and run the same command again; a training resumes from its last '
      'complete checkpoint.\n')


def test_an_unresolvable_coordinator_is_one_line(tmp_path):
  process = run('main', f'--config={DEMO}', f'--workdir={tmp_path / "run"}',
                '--coordinator_address=notahost', '--num_processes=2', '--process_id=0')
  assert 'is not HOST:PORT' in error_line(process)
  process = run('main', f'--config={DEMO}', f'--workdir={tmp_path / "run"}',
                '--coordinator_address=notahost.invalid:1234', '--num_processes=2',
                '--process_id=1')
  assert "host 'notahost.invalid' cannot be resolved" in error_line(process)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('process_id,message', [
    (0, 'not all 2 processes (--num_processes) joined at'),
    (1, 'nothing answers at --coordinator_address='),
])
def test_one_of_two_processes_ends_with_one_line_at_the_startup_timeout(tmp_path, process_id,
                                                                         message):
  address = f'localhost:{free_port()}'
  process = run('main', f'--config={DEMO}', f'--workdir={tmp_path / "run"}',
                f'--coordinator_address={address}', '--num_processes=2',
                f'--process_id={process_id}', '--startup_timeout_s=2', timeout=60)
  lines = process.stderr.strip().splitlines()
  # The wait is announced, so the silence is explained; then the one error line.
  assert lines[0].startswith(f'waiting up to 2s for 2 processes to join at {address}')
  assert process.returncode == 1 and len(lines) == 2, process.stderr[-3000:]
  assert lines[1].startswith('error: ') and message in lines[1]


def test_a_coordinator_port_in_use_is_one_line(tmp_path):
  # JAX's coordinator crashes the process (SIGSEGV) when its port is taken.
  with socket.socket() as taken:
    taken.bind(('localhost', 0))
    taken.listen()
    port = taken.getsockname()[1]
    process = run('main', f'--config={DEMO}', f'--workdir={tmp_path / "run"}',
                  f'--coordinator_address=localhost:{port}', '--num_processes=2',
                  '--process_id=0')
  assert f'port {port} is in use on this host' in error_line(process)


@pytest.mark.parametrize('how', ['flag', 'env'])
def test_debug_shows_the_traceback(tmp_path, how):
  args = [f'--config={DEMO}', f'--workdir={tmp_path / "run"}', '--config.momentum=2']
  process = run('main', *args, *(['--debug'] if how == 'flag' else []),
                env={cli.DEBUG_ENV: '1'} if how == 'env' else None)
  assert process.returncode != 0
  assert 'Traceback (most recent call last)' in process.stderr
  assert 'ValueError: bad config field: config.momentum = 2.0' in process.stderr


def test_evaluate_and_predict_name_a_damaged_metadata_file(tmp_path):
  (tmp_path / 'config.json').write_text('{"model": ')
  for module, extra in (('evaluate', ()), ('predict', ('image.png',))):
    process = run(module, f'--workdir={tmp_path}', *extra)
    assert f'{tmp_path / "config.json"} cannot be read (JSONDecodeError' in error_line(process)


def test_evaluate_without_workdir_names_the_flag():
  assert 'error: --workdir is required: A training workdir.' == error_line(run('evaluate'))


def test_convert_of_random_bytes_does_not_suggest_allow_pickle(tmp_path):
  pytest.importorskip('torch')
  (tmp_path / 'random.pth').write_bytes(os.urandom(3000))
  process = run('convert', f'--checkpoint={tmp_path / "random.pth"}', f'--out={tmp_path / "m"}')
  line = error_line(process)
  assert 'is not a readable PyTorch checkpoint (truncated or corrupt?)' in line
  assert 'allow_pickle' not in line


def test_a_pickled_checkpoint_still_gets_the_allow_pickle_hint(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'with_args.pth'
  torch.save({'state_dict': {'fc.bias': torch.zeros(2)}, 'args': argparse.Namespace(lr=0.1)},
             path)
  with pytest.raises(torch_weights.NotConvertible, match='If you trust the file, pass '
                     '--allow_pickle'):
    torch_weights.read_torch_checkpoint(str(path))


@pytest.mark.parametrize('module', ['benchmark', 'pipeline_benchmark'])
def test_the_benchmarks_refuse_a_bad_field_in_one_line(module):
  process = run(module, f'--config={DEMO}', '--config.batch_size=0')
  assert 'config.batch_size = 0: must be a whole number >= 1' in error_line(process)
