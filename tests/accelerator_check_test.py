"""Tests of the accelerator install path and launch/accelerator_check.sh, on the CPU: the extras
of setup.cfg against the installed jax's own extras, the check's plan, and its every stage in
miniature (--cpu-smoke) with the JSON it writes."""

import configparser
import importlib.metadata
import json
import os
import subprocess

import pytest
from packaging.requirements import Requirement

from tests import helpers
from tests.helpers import needs_fashion

SCRIPT = os.path.join(helpers.ROOT, 'launch', 'accelerator_check.sh')
STAGES = ('devices', 'demo', 'resume', 'bench_110_a48', 'bench_110_a48_compile', 'bench_272_a200',
          'bench_272_a200_compile', 'remat_272_a200', 'pipeline')


def _extras():
  setup = configparser.ConfigParser()
  setup.read(os.path.join(helpers.ROOT, 'setup.cfg'))
  section = setup['options.extras_require']
  return {name: [Requirement(line) for line in section[name].splitlines() if line.strip()]
          for name in ('cuda12', 'tpu')}


# What an extra needs besides jax's own: Orbax's client for deleting in a gs:// workdir.
OUR_ADDITIONS = {'cuda12': set(), 'tpu': {'google-cloud-storage'}}


def _jax_extra(extra):
  """jax's own Requires-Dist for `extra`, without the marker."""
  found = []
  for line in importlib.metadata.requires('jax'):
    requirement = Requirement(line)
    if requirement.marker and requirement.marker.evaluate({'extra': extra}):
      requirement.marker = None
      found.append(requirement)
  return found


@pytest.mark.parametrize('extra', ['cuda12', 'tpu'])
def test_extras_pin_jax_and_equal_jax_own_extras(extra):
  version = importlib.metadata.version('jax')
  ours = {r.name: r for r in _extras()[extra] if r.name not in OUR_ADDITIONS[extra]}
  assert str(ours.pop('jax').specifier) == f'=={version}'
  theirs = _jax_extra(extra)
  assert theirs, f'jax {version} has no extra {extra!r}'
  assert set(ours) == {r.name for r in theirs}
  for requirement in theirs:
    mine = ours[requirement.name]
    assert mine.extras == requirement.extras, requirement
    # The same versions allowed: an exact pin where jax pins (e.g. '<=X,>=X' is '==X').
    probe = [str(s.version) for s in requirement.specifier] or ['0']
    for v in probe:
      assert mine.specifier.contains(v, prereleases=True) == requirement.specifier.contains(
          v, prereleases=True), (mine, requirement)
    if requirement.name in ('jaxlib', 'jax-cuda12-plugin'):
      assert str(mine.specifier) == f'=={version}'


def _run(*args, env=None, timeout=600):
  return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                        env=env or dict(os.environ), cwd=helpers.ROOT)


def test_dry_run_lists_every_stage_within_ten_minutes(tmp_path):
  done = _run('--dry-run', '--wheels=wheels', str(tmp_path / 'out.json'))
  assert done.returncode == 0, done.stderr
  for stage in ('install', *STAGES):
    assert f'] {stage} (timeout' in done.stdout
  budget = int(done.stdout.split('timeouts adding up to ')[1].split()[0])
  assert budget <= 600  # The install (--wheels) comes on top.
  assert '--xla_gpu_deterministic_ops=true' in done.stdout
  assert not (tmp_path / 'out.json').exists()


def test_bad_option_is_one_error_line():
  done = _run('--no-such-option')
  assert done.returncode == 2 and 'error: unknown option' in done.stderr


@needs_fashion
def test_cpu_smoke_writes_every_stage(tmp_path):
  from tests.launch_test import _tiny_fashion_mnist  # pylint: disable=g-import-not-at-top
  data = _tiny_fashion_mnist(str(tmp_path / 'fashion'))
  out = tmp_path / 'check.json'
  done = _run('--cpu-smoke', f'--data-dir={data}', f'--workdir={tmp_path / "w"}', str(out))
  report = json.loads(out.read_text())
  assert report['mode'] == 'cpu-smoke' and report['complete']
  assert list(report['steps']) == list(STAGES)
  statuses = {name: step['status'] for name, step in report['steps'].items()}
  assert statuses['bench_272_a200_compile'] == 'skipped'
  assert report['ok'] and done.returncode == 0, (statuses, done.stdout[-3000:])
  steps = report['steps']
  assert steps['devices']['platform'] == 'cpu' and steps['devices']['device_count'] >= 1
  assert 0 <= steps['demo']['test_accuracy'] <= 1 and steps['demo']['steps'] == 40
  assert steps['resume']['deterministic']['identical'] is True
  assert steps['bench_110_a48']['variants']['jax']['train_images_per_s'] > 0
  assert steps['bench_110_a48_compile']['ratio_vs_pytorch'] > 0
  assert steps['remat_272_a200']['memory']['ratio'] > 0
  assert steps['pipeline']['median_images_per_s'] > 0
  assert report['summary']['resume_bit_identical_deterministic'] is True
