"""Loading a persistent-cache entry while the step traces (compile_cache_prefetch.prefetching,
through tracing.FastStartJit, the kit's `compiled` lever).

The preloaded executable may only ever stand in for the entry JAX itself asks for: a changed
program, a corrupt entry or a JAX without the hook must give what JAX alone would.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.training import step as step_lib
from pyramidnet_jax.xla_cpu import compile_cache_prefetch
from pyramidnet_jax.xla_cpu import tracing
from tests import helpers


@pytest.fixture(autouse=True)
def cache_dir(tmp_path):
  """A fresh persistent cache per test (every compile written), JAX's settings restored after."""
  jax.clear_caches()
  with helpers.persistent_compilation_cache(str(tmp_path / 'xla')) as path:
    yield path
  jax.clear_caches()


def _args():
  x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
  return jnp.asarray(x), jnp.asarray(x.T * 0.5)


def _fresh_start(fn, context='config A'):
  """A new process's view: no executable in memory, only the persistent cache on disk."""
  jax.clear_caches()
  jitted = tracing.FastStartJit(jax.jit(fn), 'step', context)
  return jitted, jitted(*_args())


def _reference(scale):
  x, w = (np.asarray(a, np.float64) for a in _args())
  return np.tanh(x @ w) * scale


def make_step(scale):
  def step(x, w):  # Module 'jit_step' whatever the scale; the scale is a constant in it.
    return jnp.tanh(x @ w) * scale
  return step


step = make_step(2.0)


def test_only_the_kit_compiles_through_fast_start_jit():
  jitted = jax.jit(step)
  assert levers.PLAIN.compiled(jitted, 'step', 'config A') is jitted
  fast = xla_cpu.LEVERS.compiled(jitted, 'step', 'config A')
  assert isinstance(fast, tracing.FastStartJit)
  assert (fast.jitted, fast.name, fast.context) == (jitted, 'step', 'config A')


def test_second_start_loads_the_entry_the_first_compile_read(cache_dir):
  _, want = _fresh_start(step)
  jitted, got = _fresh_start(step)
  assert jitted.first_call_prefetch == 'used'
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got, _reference(2), rtol=1e-6)
  (hint_file,) = glob.glob(os.path.join(cache_dir, compile_cache_prefetch.HINT_PREFIX + '*.json'))
  with open(hint_file) as f:
    hint = json.load(f)
  assert hint['module_name'] == 'jit_step'
  assert os.path.exists(os.path.join(cache_dir, hint['cache_key'] + '-cache'))
  # Later calls are plain jitted calls: no new prefetch, the same executable.
  np.testing.assert_array_equal(jitted(*_args()), want)
  assert jitted._cache_size() == 1


def test_first_start_records_without_prefetching():
  jitted, _ = _fresh_start(step)
  assert jitted.first_call_prefetch == 'no hint'


def _hint(cache_dir):
  (hint_file,) = glob.glob(os.path.join(cache_dir, compile_cache_prefetch.HINT_PREFIX + '*.json'))
  with open(hint_file) as f:
    return json.load(f)


def test_a_changed_program_with_the_same_signature_is_compiled_not_preloaded(cache_dir):
  _fresh_start(step)
  old_key = _hint(cache_dir)['cache_key']

  changed = make_step(3.0)  # Same name, context and argument shapes: another program.
  jitted, got = _fresh_start(changed)
  assert jitted.first_call_prefetch == 'not used'
  np.testing.assert_allclose(got, _reference(3), rtol=1e-6)
  # The hint now follows the new program: the next start of it preloads its entry.
  assert _hint(cache_dir)['cache_key'] != old_key
  jitted, again = _fresh_start(changed)
  assert jitted.first_call_prefetch == 'used'
  np.testing.assert_array_equal(again, got)


def test_a_corrupt_entry_is_left_to_jax_which_warns_and_compiles(cache_dir):
  _, want = _fresh_start(step)
  (entry,) = glob.glob(os.path.join(cache_dir, 'jit_step-*-cache'))
  with open(entry, 'wb') as f:
    f.write(b'not an executable')
  with pytest.warns(UserWarning, match='Error reading persistent compilation cache entry'):
    jitted, got = _fresh_start(step)
  assert jitted.first_call_prefetch == 'not used'
  np.testing.assert_array_equal(got, want)


def test_an_unreadable_hint_is_ignored(cache_dir):
  _, want = _fresh_start(step)
  (hint_file,) = glob.glob(os.path.join(cache_dir, compile_cache_prefetch.HINT_PREFIX + '*.json'))
  with open(hint_file, 'w') as f:
    f.write('{"cache_key": ')
  jitted, got = _fresh_start(step)
  assert jitted.first_call_prefetch == 'not used'
  np.testing.assert_array_equal(got, want)
  with open(hint_file) as f:
    assert json.load(f)['module_name'] == 'jit_step'  # Rewritten by this start.


def test_off_without_a_persistent_cache():
  jax.config.update('jax_enable_compilation_cache', False)
  jitted, got = _fresh_start(step)
  assert jitted.first_call_prefetch == 'off'
  np.testing.assert_allclose(got, _reference(2), rtol=1e-6)


def test_off_where_jax_has_no_cache_read_to_hook(monkeypatch):
  from jax._src import compiler  # pylint: disable=g-import-not-at-top
  args = _args()
  monkeypatch.setattr(compile_cache_prefetch, '_hook_installed', False)
  monkeypatch.setattr(compiler, '_cache_read', lambda cache_key, backend: (None, None))
  with compile_cache_prefetch.prefetching('step', args) as prefetch:
    pass
  assert prefetch.outcome == 'off'


def test_signature_key_holds_no_object_addresses_and_tells_signatures_apart():
  def state(scale):
    # A flax struct whose static fields are fresh function objects, as TrainState.apply_fn.
    return step_lib.TrainState.create(apply_fn=lambda *a: a,
                                      params={'w': jnp.ones((2, 3)) * scale},
                                      tx=optax.sgd(0.1), batch_stats={})

  signature_key = compile_cache_prefetch.signature_key
  key = signature_key('step', (state(1.0),), 'ctx')
  assert signature_key('step', (state(2.0),), 'ctx') == key  # Values don't count.
  assert signature_key('eval', (state(1.0),), 'ctx') != key
  assert signature_key('step', (state(1.0),), 'other') != key
  other_shape = step_lib.TrainState.create(apply_fn=None, params={'w': jnp.ones((3, 3))},
                                           tx=optax.sgd(0.1), batch_stats={})
  assert signature_key('step', (other_shape,), 'ctx') != key
