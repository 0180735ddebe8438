"""The benchmark command end to end on a tiny network: JSON fields present and positive.

No speed thresholds: only that every figure exists and is positive.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from configs import fashion_mnist_demo
from pyramidnet_jax.benchmarking import common
from pyramidnet_jax.benchmarking import pytorch
from tests import helpers

ROOT = helpers.ROOT

TRAIN_FIELDS = ('train_images_per_s', 'inference_images_per_s', 'time_to_first_step_s',
                'state_creation_s', 'peak_rss_mb', 'num_params')
JAX_FIELDS = TRAIN_FIELDS + ('inference_compile_s', 'xla_temp_bytes', 'xla_argument_bytes',
                             'xla_output_bytes')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """One XLA cache for the module's runs: the second run of the same step loads it."""
  return str(tmp_path_factory.mktemp('xla_cache'))


def _run(tmp_path, cache_dir, frameworks, *extra):
  output = tmp_path / 'bench.json'
  command = [
      sys.executable, '-m', 'pyramidnet_jax.benchmark', '--config=configs/fashion_mnist_demo.py',
      '--config.model.depth=8', '--config.batch_size=8', f'--config.compilation_cache_dir={cache_dir}',
      '--steps=2', '--warmup=1', f'--frameworks={frameworks}', f'--output={output}', *extra]
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'train img/s' in proc.stdout  # The table.
  with open(output) as f:
    return json.load(f), proc.stdout


def _check_positive(result, fields):
  assert 'error' not in result, result.get('error')
  for field in fields:
    assert result[field] > 0, (field, result[field])


def test_jax_only(tmp_path, cache_dir):
  report, _ = _run(tmp_path, cache_dir, 'jax')
  _check_positive(report['jax'], JAX_FIELDS)
  assert report['batch_size'] == 8
  assert report['image_shape'] == [28, 28, 1]
  assert report['model']['depth'] == 8
  assert report['device'] and report['date'] and report['config'].endswith('fashion_mnist_demo.py')
  assert report['num_params']['jax'] == report['jax']['num_params'] > 0
  assert report['torch'] == {}
  assert report['pytorch_best'] is None and report['ratio_vs_pytorch'] is None
  assert report['jax']['compilation_cache'].startswith('on')
  # The module's other run shares the cache: this one records or uses what loads while tracing.
  assert report['jax']['compilation_cache_prefetch'] in ('no hint', 'used')


def test_against_torch_eager(tmp_path, cache_dir):
  pytest.importorskip('torch')
  # One thread: two OpenMP threads that spin-wait on a shared 2-core machine slow tiny steps
  # down 10-30x, and this test checks the fields, not the speed.
  report, stdout = _run(tmp_path, cache_dir, 'jax,torch_eager,torch_eager_cl', '--torch_threads=1')
  _check_positive(report['jax'], JAX_FIELDS)
  assert set(report['torch']) == {'torch_eager', 'torch_eager_cl'}
  for result in report['torch'].values():
    _check_positive(result, TRAIN_FIELDS + ('inference_first_call_s',))
  # Same network: equal parameter counts (the 1-channel stem included).
  assert report['num_params']['torch'] == report['num_params']['jax']
  assert report['torch']['torch_eager']['num_params'] == report['jax']['num_params']
  assert report['pytorch_best']['variant'] in report['torch']
  assert report['pytorch_best']['train_images_per_s'] > 0
  assert report['ratio_vs_pytorch'] > 0
  assert report['torch_device'] == 'cpu (1 threads)'
  assert 'ratio_vs_pytorch' in stdout


def test_compile_only_reports_xla_memory_and_runs_no_step(tmp_path, cache_dir):
  # Torch variants asked for are dropped: --compile_only is ours only.
  report, stdout = _run(tmp_path, cache_dir, 'jax,torch_eager', '--compile_only',
                        '--config.model.remat=true', '--config.model.channel_multiple=16')
  ours = report['jax']
  _check_positive(ours, ('trace_s', 'compile_s', 'state_creation_s', 'xla_temp_bytes',
                         'xla_argument_bytes', 'peak_rss_mb', 'num_params'))
  assert ours['compile_only'] and report['compile_only']
  assert 'train_images_per_s' not in ours and report['torch'] == {}
  assert report['model']['remat'] and report['model']['channel_multiple'] == 16
  assert 'compile only: trace' in stdout and 'XLA temp' in stdout


def test_data_spec_reads_no_data():
  config = fashion_mnist_demo.get_config()
  assert common.data_spec(config) == ((28, 28, 1), 10)
  assert common.data_spec(config, 16) == ((16, 16, 1), 10)
  config.dataset = 'imagenet2012'
  assert common.data_spec(config) == ((224, 224, 3), 1000)
  config.dataset = 'mnist'
  with pytest.raises(ValueError, match='Unknown config.dataset'):
    common.data_spec(config)


def test_pyconv_small_stem_has_no_torch_reference():
  from configs import fashion_mnist_pyconv  # pylint: disable=g-import-not-at-top
  assert 'ImageNet stem' in pytorch.unsupported(fashion_mnist_pyconv.get_config())
  assert pytorch.unsupported(fashion_mnist_demo.get_config()) is None
