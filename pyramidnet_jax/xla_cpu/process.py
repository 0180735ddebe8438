"""Process settings of the CPU kit that must precede the start of JAX's backend.

XLA:CPU's concurrency-optimised scheduler goes into XLA_FLAGS, and glibc's malloc is told to keep
freed memory, with steps dispatched synchronously (keep_freed_host_memory).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

from absl import logging
import jax

_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'


def configure(config) -> None:
  """Applies the config's XLA:CPU settings that must precede JAX's backend start.

  config.xla_cpu_concurrency_scheduler goes into XLA_FLAGS (XLA reads it there when its backend
  starts; jit's compiler_options do not reach it); a value the user put in XLA_FLAGS wins.
  config.cpu_keep_freed_memory tunes glibc's malloc (keep_freed_host_memory).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.warning('JAX\'s backend has started: config.xla_cpu_concurrency_scheduler and '
                    'config.cpu_keep_freed_memory are not applied; call xla_cpu.enable first '
                    '(or set %s in XLA_FLAGS).', _SCHEDULER_FLAG)
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if _SCHEDULER_FLAG not in flags:
    value = 'true' if config.xla_cpu_concurrency_scheduler else 'false'
    os.environ['XLA_FLAGS'] = f'{flags} {_SCHEDULER_FLAG}={value}'.strip()
  if config.cpu_keep_freed_memory:
    keep_freed_host_memory()


_GLIBC_M_TRIM_THRESHOLD, _GLIBC_M_MMAP_MAX = -1, -4
_GLIBC_MALLOC_ENV = ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_',
                     'MALLOC_TOP_PAD_')


def keep_freed_host_memory() -> bool:
  """Makes XLA:CPU reuse one resident temp buffer across steps; True if it did. Before JAX starts.

  XLA:CPU allocates a train step's temporary buffer (hundreds of MB to GBs) at every execution and
  frees it after. glibc serves a block that large with a fresh mmap and unmaps it on free, so every
  step page-faults the whole buffer in again. So: no mmap for large blocks and no trimming, and
  steps dispatched synchronously, so that the buffer is allocated on the calling thread, whose heap
  can grow (another thread's arena maps anything over 64 MB anyway). The next step then reuses the
  same resident pages (docs/benchmarks.md#levers). The cost: the process keeps its peak memory until
  it exits, and Python waits for each step. A malloc setting the user put in the environment wins;
  no-op off glibc.
  """
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  if (any(name in os.environ for name in _GLIBC_MALLOC_ENV)
      or 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', '')):
    return False
  libc = ctypes.CDLL(None)
  # mallopt's trim threshold of -1 turns trimming off.
  if not all(libc.mallopt(param, value) == 1
             for param, value in ((_GLIBC_M_MMAP_MAX, 0), (_GLIBC_M_TRIM_THRESHOLD, -1))):
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True


def jax_runs_on_cpu_only() -> bool:
  """Whether JAX will pick the CPU, known before its backend starts (no accelerator plugin)."""
  platforms = jax.config.jax_platforms
  if platforms:
    return all(p.strip() == 'cpu' for p in platforms.split(','))
  return not (importlib.metadata.entry_points(group='jax_plugins')
              or importlib.util.find_spec('jax_plugins') is not None
              or importlib.util.find_spec('libtpu') is not None)
