"""Tests of launch/: the Colab notebook runs end to end in a real Jupyter kernel (on the CPU, with a
tiny run), and the shell launchers parse, print the right cloud commands and reject bad arguments.
"""

import glob
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pyramidnet_jax.data import fashion_mnist
from tests import helpers
from tests.helpers import needs_fashion

LAUNCH = os.path.join(helpers.ROOT, 'launch')
NOTEBOOK = os.path.join(LAUNCH, 'colab_tpu.ipynb')
TPU_VM = os.path.join(LAUNCH, 'tpu_vm.sh')
MULTIHOST = os.path.join(LAUNCH, 'multihost.sh')
# Variables the launchers read as defaults; the tests give everything explicitly.
LAUNCHER_ENV = ('PROJECT', 'ZONE', 'NAME', 'ACCELERATOR', 'VERSION', 'CONFIG', 'WORKDIR', 'OUT',
                'PYTHON', 'JAX_PLATFORMS', 'XLA_FLAGS')


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
  env.update(extra)
  return env


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype='>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _tiny_fashion_mnist(directory, num_train=256, num_test=100):
  """The first images of the real Fashion-MNIST, as the four IDX files the loader reads."""
  os.makedirs(directory)
  sizes = {'train': num_train, 'test': num_test}
  for split, files in fashion_mnist.FILES.items():
    for name in files:
      data = fashion_mnist.read_idx(os.path.join(helpers.FASHION_DIR, name))
      _write_idx(os.path.join(directory, name), data[:sizes[split]])
  return directory


def _kernel_spec_dir(tmp_path):
  """A `python3` kernelspec that runs this interpreter (the venv's), first on JUPYTER_PATH."""
  spec_dir = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec_dir.mkdir(parents=True)
  spec = {'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
          'display_name': 'Python 3 (test)', 'language': 'python'}
  (spec_dir / 'kernel.json').write_text(json.dumps(spec))
  return str(tmp_path / 'jupyter')


@needs_fashion
def test_colab_notebook_runs_end_to_end_in_a_jupyter_kernel(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    assert not cell.get('outputs') and cell.get('execution_count') is None, 'outputs are stored'
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, 'exactly one cell must be tagged "parameters"'

  data_dir = _tiny_fashion_mnist(str(tmp_path / 'fashion'))
  workdir = str(tmp_path / 'run')
  overrides = ['--config.num_train_steps=10', '--config.log_every_steps=5',
               '--config.model.alpha=8', '--config.batch_size=16', '--config.eval_batch_size=50',
               f'--config.data_dir={data_dir}', '--config.compilation_cache_dir=',
               '--config.progress_bar=False']
  injected = '\n'.join([
      '# Injected by tests/launch_test.py.',
      "REPO_URL = 'file:///nonexistent/must-not-be-cloned'",
      "CONFIG = 'configs/fashion_mnist_demo.py'",
      f'WORKDIR = {workdir!r}',
      f'OVERRIDES = {overrides!r}',
      'import sys as _sys',
      f'assert _sys.prefix == {sys.prefix!r}, _sys.prefix  # The kernel runs the venv\'s Python.',
  ])
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(injected, id='injected-parameters'))

  monkeypatch.setenv('JUPYTER_PATH', _kernel_spec_dir(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('PYRAMIDNET_JAX_ROOT', raising=False)  # The checkout is found from the cwd.
  client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=240,
                                   resources={'metadata': {'path': LAUNCH}})
  client.execute()  # Raises CellExecutionError, with the cell's traceback, if any cell fails.

  outputs = {cell.get('id'): cell.get('outputs', []) for cell in nb.cells}
  assert not [o for cell_outputs in outputs.values() for o in cell_outputs
              if o['output_type'] == 'error']
  text = lambda cell_id: ''.join(o.get('text', '') for o in outputs[cell_id])
  assert 'pip skipped' in text('install')  # The venv has the package: no pip, no clone.
  assert f'repository: {helpers.ROOT}' in text('install')
  assert 'Fashion-MNIST: found' in text('data')
  assert re.search(r'test accuracy \d\.\d{4}', text('train')), text('train')[-2000:]
  images = [o for o in outputs['curves'] if 'image/png' in o.get('data', {})]
  assert len(images) == 2  # The training curves, then the confusion matrix of the report.
  assert any('text/markdown' in o.get('data', {}) for o in outputs['curves'])
  assert '"test_accuracy"' in text('curves')

  results = helpers.read_results(workdir)
  assert results['steps'] == 10 and results['dataset'] == 'fashion_mnist'
  with open(os.path.join(workdir, 'training_curves.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.isfile(os.path.join(workdir, 'report', 'report.md'))


def test_launch_scripts_parse():
  scripts = sorted(glob.glob(os.path.join(LAUNCH, '*.sh')) + glob.glob(os.path.join(LAUNCH, '*.sbatch')))
  assert {os.path.basename(s) for s in scripts} >= {'tpu_vm.sh', 'multihost.sh', 'slurm.sbatch'}
  for script in scripts:
    done = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
    assert done.returncode == 0, f'{script}: {done.stderr}'
  with open(os.path.join(LAUNCH, 'slurm.sbatch')) as f:
    sbatch = f.read()
  assert re.search(r'^#SBATCH --ntasks-per-node=1$', sbatch, re.M)
  assert re.search(r'^srun .*\n.*-m pyramidnet_jax\.main', sbatch, re.M)


def _tpu_vm(*args):
  return subprocess.run(['bash', TPU_VM, *args], capture_output=True, text=True, cwd=helpers.ROOT,
                        env=_clean_env(), timeout=60)


def _jax_pin():
  with open(os.path.join(helpers.ROOT, 'requirements.txt')) as f:
    return re.search(r'^jax==(\S+)', f.read(), re.M).group(1)


def test_tpu_vm_dry_run_prints_create_install_train_copy_delete_in_order():
  done = _tpu_vm('--dry-run', '--project=my-project', '--name=pyr-test',
                 '--config=configs/cifar100_110_a48.py', '--', '--config.num_epochs=2')
  assert done.returncode == 0, done.stderr
  # Each command is printed after '+ ', shell-quoted (the --command strings span lines).
  commands = [c.strip() for c in re.split(r'^\+ ', done.stdout, flags=re.M) if c.strip()]
  gcloud = [c for c in commands if c.startswith('gcloud ')]
  steps = ['tpu-vm create', 'tpu-vm scp', 'tpu-vm ssh', 'tpu-vm ssh', 'tpu-vm scp', 'tpu-vm delete']
  assert [next(s for s in steps if f'compute tpus {s} ' in c) for c in gcloud] == steps, gcloud
  create, upload, setup, train, download, delete = gcloud
  for command in gcloud:
    assert 'pyr-test' in command and '--zone=us-central2-b' in command
    assert '--project=my-project' in command
  assert '--accelerator-type=v4-8' in create and '--version=tpu-ubuntu2204-base' in create
  assert '--worker=all' in upload and '--worker=all' in setup and '--worker=all' in train
  assert f'jax[tpu]=={_jax_pin()}' in setup and 'requirements.txt' in setup
  assert 'launch/prepare_data.py --config=configs/cifar100_110_a48.py' in setup
  assert ('-m pyramidnet_jax.main --config=configs/cifar100_110_a48.py --workdir=runs/pyr-test '
          '--config.num_epochs=2') in train
  assert '--worker=0' in download and '--recurse' in download and 'runs/pyr-test-tpu' in download
  assert '--quiet' in delete
  # The repository goes as a git archive, built before anything is created.
  assert commands.index(next(c for c in commands if ' archive ' in c)) < commands.index(create)


def test_tpu_vm_options():
  done = _tpu_vm('--dry-run', '--name=v5', '--accelerator=v5litepod-8', '--keep', '--spot')
  assert done.returncode == 0, done.stderr
  gcloud = [c for c in re.split(r'^\+ ', done.stdout, flags=re.M) if c.startswith('gcloud')]
  assert '--version=v2-alpha-tpuv5-lite' in gcloud[0] and '--zone=us-west4-a' in gcloud[0]
  assert '--spot' in gcloud[0] and '--project' not in gcloud[0]
  assert not any('tpu-vm delete' in line for line in gcloud)  # --keep
  assert 'kept' in done.stderr

  assert _tpu_vm('-h').returncode == 0 and 'usage: launch/tpu_vm.sh' in _tpu_vm('-h').stdout
  for bad in (['--name=Bad_Name'], ['--config=configs/nope.py'], ['--bogus'],
              ['--accelerator=v9-8']):
    done = _tpu_vm('--dry-run', *bad)
    assert done.returncode == 2, (bad, done.stdout, done.stderr)
    assert 'usage: launch/tpu_vm.sh' in done.stderr and 'gcloud' not in done.stdout


def _multihost(*args, **env):
  return subprocess.run(['bash', MULTIHOST, *args], capture_output=True, text=True,
                        env=_clean_env(**env), timeout=60)


@pytest.mark.parametrize('args', [
    [],
    ['--', '--config=c'],
    ['--local'],
    ['--local', '0', '--', '--config=c'],
    ['--local', 'two', '--', '--config=c'],
    ['--local', '2'],
    ['--num_processes=2', '--', '--config=c'],
    ['--coordinator=host', '--num_processes=2', '--process_id=0', '--', '--config=c'],
    ['--coordinator=host:1234', '--num_processes=2', '--process_id=2', '--', '--config=c'],
    ['--local', '2', '--process_id=0', '--', '--config=c'],
    ['--local', '2', '--devices_per_process=0', '--', '--config=c'],
    ['--config=c'],
])
def test_multihost_argument_errors_give_usage(args):
  done = _multihost(*args, PYTHON='false')
  assert done.returncode == 2, (args, done.stdout, done.stderr)
  assert 'launch/multihost.sh: error:' in done.stderr
  assert 'usage: launch/multihost.sh --coordinator=HOST:PORT' in done.stderr


def _stub_python(tmp_path, fail_id=''):
  """A stand-in for python: records its arguments and environment, optionally fails."""
  stub = tmp_path / 'python'
  stub.write_text(f"""#!/bin/bash
for a; do case "$a" in --process_id=*) id="${{a#*=}}";; esac; done
printf '%s\\n' "$@" > "{tmp_path}/args.$id"
printf 'JAX_PLATFORMS=%s\\nXLA_FLAGS=%s\\n' "$JAX_PLATFORMS" "$XLA_FLAGS" > "{tmp_path}/env.$id"
[[ "$id" == "{fail_id}" ]] && exit 7
[[ -n "{fail_id}" ]] && exec sleep 60
exit 0
""")
  stub.chmod(0o755)
  return str(stub)


def test_multihost_per_host_passes_the_three_flags(tmp_path):
  done = _multihost('--coordinator=10.0.0.1:8476', '--num_processes=4', '--process_id=3', '--',
                    '--config=configs/fashion_mnist_demo.py', '--workdir=runs/x',
                    PYTHON=_stub_python(tmp_path))
  assert done.returncode == 0, done.stderr
  assert (tmp_path / 'args.3').read_text().split('\n')[:-1] == [
      '-m', 'pyramidnet_jax.main', '--coordinator_address=10.0.0.1:8476', '--num_processes=4',
      '--process_id=3', '--config=configs/fashion_mnist_demo.py', '--workdir=runs/x']


def test_multihost_local_starts_n_cpu_processes_and_fails_if_one_fails(tmp_path):
  done = _multihost('--local', '3', '--devices_per_process=2', '--', '--config=c',
                    PYTHON=_stub_python(tmp_path))
  assert done.returncode == 0, done.stderr
  coordinators = set()
  for i in range(3):
    args = (tmp_path / f'args.{i}').read_text().split('\n')
    assert args[:2] == ['-m', 'pyramidnet_jax.main'] and f'--process_id={i}' in args
    assert '--num_processes=3' in args and args[-2] == '--config=c'
    coordinators.update(a for a in args if a.startswith('--coordinator_address=127.0.0.1:'))
    assert (tmp_path / f'env.{i}').read_text() == (
        'JAX_PLATFORMS=cpu\nXLA_FLAGS=--xla_force_host_platform_device_count=2\n')
  assert len(coordinators) == 1

  failing = tmp_path / 'failing'
  failing.mkdir()
  done = _multihost('--local', '2', '--', '--config=c', PYTHON=_stub_python(failing, fail_id=1))
  assert done.returncode == 7, done.stderr  # Process 0 (sleeping) was stopped, not waited for.
  assert 'process 1 failed (exit status 7)' in done.stderr
