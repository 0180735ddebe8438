"""The CPU kit's process settings and tracing: scheduler flag, malloc, the GC pause."""

import gc
import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyramidnet_jax.xla_cpu import process
from pyramidnet_jax.xla_cpu import tracing
from tests import helpers


def test_compiled_steps_trace_with_the_collector_paused_and_restore_it():
  seen = []

  def step(x):
    seen.append(gc.isenabled())
    return x + 1

  jitted = tracing.FastStartJit(jax.jit(step), 'step')
  assert gc.isenabled()
  assert int(jitted(1)) == 2
  np.testing.assert_array_equal(jitted.lower(jnp.ones(3)).compile()(jnp.ones(3)), 2)
  assert seen == [False, False] and gc.isenabled()
  assert jitted._cache_size() == 1  # Attributes are the jitted function's; lower() is apart.
  gc.disable()
  try:
    with tracing.python_gc_paused():
      assert not gc.isenabled()
    assert not gc.isenabled()  # A collector the caller had paused stays paused.
  finally:
    gc.enable()
  with pytest.raises(ValueError):
    with tracing.python_gc_paused():
      raise ValueError
  assert gc.isenabled()


@pytest.mark.parametrize('given,scheduler,expected', [
    ('', False, '--xla_cpu_enable_concurrency_optimized_scheduler=false'),
    ('--xla_dump_to=/tmp/x', True,
     '--xla_dump_to=/tmp/x --xla_cpu_enable_concurrency_optimized_scheduler=true'),
    # The user's own setting wins.
    ('--xla_cpu_enable_concurrency_optimized_scheduler=true', False,
     '--xla_cpu_enable_concurrency_optimized_scheduler=true'),
])
def test_configure_sets_the_scheduler_before_jax_starts(given, scheduler, expected):
  code = ('import os, jax; from configs import default; from pyramidnet_jax.xla_cpu import process; '
          f'c = default.get_config(); c.xla_cpu_concurrency_scheduler = {scheduler}; '
          'process.configure(c); jax.devices(); print(os.environ["XLA_FLAGS"])')
  env = {**os.environ, 'XLA_FLAGS': given, 'PYTHONPATH': helpers.ROOT}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == expected


_PAGE_FAULTS_OF_A_REPEATED_CALL = """
import json, os, resource, sys
import jax, jax.numpy as jnp
from configs import default
from pyramidnet_jax.xla_cpu import process
c = default.get_config(); c.cpu_keep_freed_memory = {keep}
process.configure(c)
x = jnp.ones((4096, 4096))
f = jax.jit(lambda x: (jnp.exp(x) + jnp.exp(x)[::-1, ::-1].T).max(0))  # XLA's temp: 128 MB.
faults = []
for _ in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _page_faults_per_call(keep: bool, **env: str) -> list[int]:
  env = {**os.environ, 'PYTHONPATH': helpers.ROOT, 'JAX_PLATFORMS': 'cpu', **env}
  out = subprocess.run([sys.executable, '-c', _PAGE_FAULTS_OF_A_REPEATED_CALL.format(keep=keep)],
                       env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc malloc only')
def test_cpu_keep_freed_memory_stops_repeated_page_faults():
  # 128 MB is 32768 pages: glibc maps a block that large afresh at every call (11 repeats: over
  # 360,000 faults), unless told to keep freed memory; then calls reuse resident pages, but for
  # a few while the heap settles (measured: at most 3 of the 11).
  assert sum(_page_faults_per_call(False)[1:]) > 300_000
  assert sum(_page_faults_per_call(True)[1:]) < 180_000
  # A malloc setting in the environment is the user's: left alone.
  assert sum(_page_faults_per_call(True, MALLOC_TRIM_THRESHOLD_='131072')[1:]) > 300_000


@pytest.mark.parametrize('platforms,expected', [('cpu', True), ('cuda', False), ('cpu,tpu', False)])
def test_malloc_tuning_only_where_jax_runs_on_cpu(platforms, expected):
  given = jax.config.jax_platforms
  jax.config.update('jax_platforms', platforms)
  try:
    assert process.jax_runs_on_cpu_only() == expected
  finally:
    jax.config.update('jax_platforms', given)


def test_configure_after_jax_started_changes_nothing(monkeypatch):
  jax.devices()
  monkeypatch.setenv('XLA_FLAGS', '')
  process.configure(helpers.tiny_config())
  assert os.environ['XLA_FLAGS'] == ''
