"""What every command line shares: config files from any directory, one-line errors."""

import os
import subprocess
import sys


from tests import helpers


def run_main(*args: str, cwd: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'pyramidnet_jax.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'PYTHONPATH': helpers.ROOT, 'JAX_PLATFORMS': 'cpu'})


def test_a_config_file_works_from_any_working_directory(tmp_path):
  config = os.path.join(helpers.ROOT, 'configs', 'fashion_mnist_demo.py')
  # An unknown field stops the run after the config file loaded (its `from configs import
  # default` worked from elsewhere) and before any training.
  process = run_main(f'--config={config}', f'--workdir={tmp_path / "run"}',
                     '--config.no_such_field=1', cwd=str(tmp_path))
  assert 'No module named' not in process.stderr, process.stderr[-2000:]
  assert process.returncode != 0
  assert 'no_such_field' in process.stderr
  assert not (tmp_path / 'run').exists()  # Failed before train_and_evaluate made the workdir.


def test_a_missing_config_file_is_one_line(tmp_path):
  process = run_main('--config=configs/no_such_config.py', f'--workdir={tmp_path / "run"}',
                     cwd=helpers.ROOT)
  assert process.returncode == 1
  errors = process.stderr.strip().splitlines()
  assert errors == ['error: config file configs/no_such_config.py does not exist; pass one of '
                    'the files in configs/, e.g. --config=configs/fashion_mnist_demo.py.']


def one_error_line(process) -> str:
  lines = process.stderr.strip().splitlines()
  assert process.returncode == 1 and len(lines) == 1, process.stderr[-3000:]
  assert lines[0].startswith('error: ')
  return lines[0]


def test_an_unknown_config_field_is_one_line(tmp_path):
  process = run_main('--config=configs/fashion_mnist_demo.py', f'--workdir={tmp_path / "run"}',
                     '--config.no_such_field=1', cwd=helpers.ROOT)
  assert one_error_line(process) == (
      "error: bad config override (--config.no_such_field=1): no such field 'no_such_field'. "
      'The fields are in configs/default.py.')


def test_a_missing_workdir_is_named_as_such():
  process = run_main('--config=configs/fashion_mnist_demo.py', cwd=helpers.ROOT)
  assert one_error_line(process) == ('error: --workdir is required: Directory for checkpoints, '
                                     'logs and results.')


def test_an_unknown_flag_is_one_line(tmp_path):
  process = run_main('--config=configs/fashion_mnist_demo.py', f'--wrokdir={tmp_path}',
                     cwd=helpers.ROOT)
  assert "Unknown command line flag 'wrokdir'. Did you mean: workdir ?" in one_error_line(process)


def test_a_config_file_that_fails_to_load_is_one_line(tmp_path):
  (tmp_path / 'broken.py').write_text('def get_config(:\n  pass\n')
  process = run_main(f'--config={tmp_path / "broken.py"}', f'--workdir={tmp_path / "run"}',
                     cwd=helpers.ROOT)
  assert one_error_line(process).startswith(
      f'error: config file {tmp_path / "broken.py"} cannot be loaded (line 1): SyntaxError')
