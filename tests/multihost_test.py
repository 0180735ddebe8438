"""Two processes on this machine (jax.distributed over 127.0.0.1, CPU) against one process.

Each process of the pair owns one CPU device, reads its half of every global batch and joins the
collectives over Gloo; process 0 alone writes the logs and results, and Orbax saves collectively.
One process with two host devices runs the same program on the same global batch, so the two
must agree bit for bit; one process with one device differs only in float reduction order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from tests.helpers import needs_fashion

pytestmark = needs_fashion

STEPS = 6
OVERRIDES = [
    '--config=configs/fashion_mnist_demo.py', f'--config.num_train_steps={STEPS}',
    '--config.model.alpha=8', '--config.batch_size=16', '--config.log_every_steps=2',
    '--config.checkpoint_every_steps=3', '--config.progress_bar=False',
    '--config.compilation_cache_dir=', '--config.write_report=False',
    # A constant learning rate: a run stopped at step 3 then continued to 6 follows the same
    # schedule as a straight run to 6 (the demo's cosine depends on the total step count).
    '--config.lr_schedule=piecewise', '--config.warmup_epochs=0',
]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def main_command(workdir, *extra, steps=STEPS):
  overrides = [o.replace(f'num_train_steps={STEPS}', f'num_train_steps={steps}')
               for o in OVERRIDES]
  return [sys.executable, '-m', 'pyramidnet_jax.main', *overrides, f'--workdir={workdir}', *extra]


def environment(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return env


def run_two_processes(workdir, *extra, steps=STEPS) -> list[subprocess.CompletedProcess]:
  address = f'127.0.0.1:{free_port()}'
  procs = [subprocess.Popen(
      main_command(workdir, f'--coordinator_address={address}', '--num_processes=2',
                   f'--process_id={i}', *extra, steps=steps),
      cwd=helpers.ROOT, env=environment(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  done = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
  return done


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('multihost')
  pair = run_two_processes(base / 'two_processes')
  for proc in pair:
    assert proc.returncode == 0, proc.stderr[-3000:]
  singles = {}
  for devices in (2, 1):
    workdir = base / f'one_process_{devices}_devices'
    proc = subprocess.run(main_command(workdir), cwd=helpers.ROOT, env=environment(devices),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    singles[devices] = str(workdir)
  return str(base / 'two_processes'), pair, singles


def test_only_process_zero_reports(runs):
  _, (first, second), _ = runs
  assert 'test accuracy' in first.stdout
  assert 'test accuracy' not in second.stdout


def test_two_processes_equal_one_process_on_the_same_global_batch(runs):
  workdir, _, singles = runs
  results = helpers.read_results(workdir)
  reference = helpers.read_results(singles[2])
  for key in ('test_accuracy', 'test_top5_accuracy', 'test_loss', 'steps'):
    assert results[key] == reference[key], key
  assert helpers.read_metrics(workdir) == helpers.read_metrics(singles[2])
  step, state, meta = helpers.read_checkpoint(workdir)
  ref_step, ref_state, _ = helpers.read_checkpoint(singles[2])
  assert step == ref_step == STEPS and meta['step'] == STEPS
  helpers.assert_trees_equal(state, ref_state, 'two processes vs one')


def test_one_device_differs_only_by_float_rounding(runs):
  workdir, _, singles = runs
  _, state, _ = helpers.read_checkpoint(workdir)
  _, one_device, _ = helpers.read_checkpoint(singles[1])
  two, one = helpers.flat_leaves(state['params']), helpers.flat_leaves(one_device['params'])
  worst = max(float(np.max(np.abs(two[k] - one[k]))) for k in two)
  assert worst < 1e-4, worst
  a, b = helpers.read_results(workdir), helpers.read_results(singles[1])
  assert abs(a['test_accuracy'] - b['test_accuracy']) <= 0.002
  assert a['test_loss'] == pytest.approx(b['test_loss'], rel=1e-4)


def test_two_processes_resume_from_their_checkpoint(runs, tmp_path):
  """A pair killed after step 3 (its checkpoint) and restarted ends where the straight pair did."""
  workdir, _, _ = runs
  resumed = tmp_path / 'resumed'
  assert all(p.returncode == 0 for p in run_two_processes(resumed, steps=3))
  # Extending the stopped run to STEPS is a change of its config the resume must be told of.
  again = run_two_processes(resumed, '--allow_config_change=num_train_steps')
  assert all(p.returncode == 0 for p in again), again[0].stderr[-3000:]
  _, state, _ = helpers.read_checkpoint(str(resumed))
  _, straight, _ = helpers.read_checkpoint(workdir)
  helpers.assert_trees_equal(state, straight, 'resumed pair vs straight pair')


def test_partial_distributed_flags_are_refused(tmp_path):
  proc = subprocess.run(main_command(tmp_path / 'x', '--num_processes=2'), cwd=helpers.ROOT,
                        env=environment(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'go together' in proc.stderr
  assert not (tmp_path / 'x').exists()


def test_results_json_is_written_once(runs):
  workdir, _, _ = runs
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['steps'] == STEPS
