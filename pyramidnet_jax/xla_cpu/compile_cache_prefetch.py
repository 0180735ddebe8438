"""Loading a function's persistent-cache entry while the function traces, for the CPU kit.

JAX finds a cache entry by a key computed from the lowered program, so even a cached start traces
and lowers the training step first and only then deserialises the executable; for a deep network on
a small CPU both take seconds (docs/benchmarks.md#levers). `prefetching` overlaps the two. A small
file in the cache directory records which entry a jitted function's last compile read, for the same
argument shapes, shardings, versions and context (the config); the next start deserialises that
entry on a background thread while the function traces (XLA releases the GIL while it deserialises).

JAX still computes the key of the program it traced. The preloaded executable stands in for JAX's
own read only under that exact key, compile options and devices, so a changed program compiles or
loads as it would have without this; a wrong guess costs only the background thread's work.
This hooks `jax._src.compiler._cache_read`, JAX's private read of one entry. Where a JAX release
lacks it or changes its signature, prefetching is off and nothing else changes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import os
import threading
from typing import Any, Iterator

from absl import logging
import jax

HINT_PREFIX = 'pyramidnet_jax-last-entry-'
_READ_PARAMETERS = ('module_name', 'cache_key', 'compile_options', 'backend',
                    'executable_devices')


def _local_cache_dir() -> str | None:
  cache_dir = jax.config.jax_compilation_cache_dir
  if not jax.config.jax_enable_compilation_cache or not cache_dir or '://' in cache_dir:
    return None  # Off, or remote (JAX's own reads handle those; the hint file is local I/O).
  return cache_dir


def signature_key(name: str, args: Any, context: str = '') -> str:
  """What a compile's program is guessed from: names, shapes, shardings, versions, devices.

  Only values that are the same in every process (no object addresses), so that the next run
  finds the same key.
  """
  leaves = jax.tree_util.tree_flatten_with_path(args)[0]
  described = [
      name, context, jax.__version__, importlib.metadata.version('jaxlib'),
      os.environ.get('XLA_FLAGS', ''),
      [(d.platform, d.device_kind, d.id) for d in jax.devices()],
      [(jax.tree_util.keystr(path), _abstract(leaf), str(getattr(leaf, 'sharding', None)))
       for path, leaf in leaves]]
  return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:32]


def _abstract(leaf: Any) -> str:
  try:
    return str(jax.typeof(leaf))
  except TypeError:
    return type(leaf).__qualname__


def _device_ids(executable_devices: Any) -> list[int]:
  return [d.id for d in executable_devices]


class Prefetch:
  """One `prefetching` block: the hint it read, the load it started, and what came of it.

  outcome: 'off' (no local persistent cache, a JAX without the hook, or inside another
  `prefetching` block), 'no hint' (nothing recorded for this signature yet), 'used' (JAX's read
  was answered by the preloaded executable), 'not used' (the program's key, options or devices
  differed, or the entry did not load).
  """

  def __init__(self, hint_path: str | None):
    self.hint_path = hint_path
    self.outcome = 'off' if hint_path is None else 'no hint'
    self._owner = threading.get_ident()
    self._hint: dict[str, Any] | None = None
    self._last_read: dict[str, Any] | None = None
    self._lock = threading.Lock()
    self._loaded: tuple[Any, Any] | None = None
    self._wanted = True
    self._thread: threading.Thread | None = None

  def start(self) -> None:
    try:
      with open(self.hint_path) as f:
        hint = json.load(f)
      by_id = {d.id: d for d in jax.devices()}
      devices = [by_id[i] for i in hint['device_ids']]
      options = base64.b64decode(hint['compile_options'])
      cache_key = hint['cache_key']
    except FileNotFoundError:
      return
    except (OSError, ValueError, KeyError, TypeError) as e:
      logging.info('Compilation cache hint %s not used: %r', self.hint_path, e)
      self.outcome = 'not used'
      return
    self._hint = hint
    self.outcome = 'not used'
    self._thread = threading.Thread(target=self._load, args=(cache_key, options, devices),
                                    name='compile-cache-prefetch', daemon=True)
    self._thread.start()

  def _load(self, cache_key: str, options: bytes, devices: list[Any]) -> None:
    # The same call JAX's read makes, with the options and devices the hint recorded.
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
    from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
    try:
      loaded = compilation_cache.get_executable_and_time(
          cache_key, xla_client.CompileOptions.ParseFromString(options), devices[0].client,
          xla_client.DeviceList(tuple(devices)))
    except Exception as e:  # pylint: disable=broad-except
      # JAX's own read of the same entry, if the program asks for it, reports the error.
      logging.info('Preloading compilation cache entry %s failed: %r', cache_key, e)
      return
    with self._lock:
      if self._wanted:
        self._loaded = loaded

  def read(self, original: Any, module_name: str, cache_key: str, compile_options: Any,
           backend: Any, executable_devices: Any) -> tuple[Any, Any]:
    """JAX's read of one entry, answered by the preloaded executable when it is that entry."""
    read = {'module_name': module_name, 'cache_key': cache_key,
            'compile_options': base64.b64encode(compile_options.SerializeAsString()).decode(),
            'device_ids': _device_ids(executable_devices)}
    self._last_read = read
    if self._thread is not None and self._hint is not None:
      if read == self._hint:
        self._thread.join()
        with self._lock:
          loaded, self._loaded, self._wanted = self._loaded, None, False
        if loaded is not None and loaded[0] is not None:
          self.outcome = 'used'
          return loaded
      elif module_name == self._hint.get('module_name'):
        self._drop()  # The function's own compile wants another entry: free the preload early.
    return original(module_name, cache_key, compile_options, backend, executable_devices)

  def _drop(self) -> None:
    with self._lock:
      self._loaded, self._wanted = None, False

  def close(self) -> None:
    """Waits for the load (so no thread outlives the block), drops it if unused, records the hint."""
    if self._thread is not None:
      self._thread.join()
    self._drop()
    if (self._last_read is None or self._last_read == self._hint
        or jax.process_index() != 0):
      return
    try:
      temporary = f'{self.hint_path}.{os.getpid()}.tmp'
      with open(temporary, 'w') as f:
        json.dump(self._last_read, f)
      os.replace(temporary, self.hint_path)  # Atomic: a concurrent start reads old or new.
    except OSError as e:
      logging.info('Compilation cache hint %s not written: %r', self.hint_path, e)


_active: Prefetch | None = None
_hook_installed = False


def _install_hook() -> bool:
  """Routes JAX's cache reads through the active Prefetch; False where JAX has no such read."""
  global _hook_installed
  if _hook_installed:
    return True
  try:
    from jax._src import compiler  # pylint: disable=g-import-not-at-top
    parameters = tuple(inspect.signature(compiler._cache_read).parameters)  # pylint: disable=protected-access
  except (ImportError, AttributeError, TypeError, ValueError):
    return False
  if parameters != _READ_PARAMETERS:
    return False
  original = compiler._cache_read  # pylint: disable=protected-access

  def cache_read(module_name, cache_key, compile_options, backend, executable_devices):
    prefetch = _active
    if prefetch is not None and prefetch._owner == threading.get_ident():  # pylint: disable=protected-access
      return prefetch.read(original, module_name, cache_key, compile_options, backend,
                           executable_devices)
    return original(module_name, cache_key, compile_options, backend, executable_devices)

  compiler._cache_read = cache_read  # pylint: disable=protected-access
  _hook_installed = True
  return True


@contextlib.contextmanager
def prefetching(name: str, args: Any, context: str = '') -> Iterator[Prefetch]:
  """Loads the cache entry that `name`'s last compile for these arguments read, while the block
  traces and compiles it; yields the Prefetch (its `outcome` says what happened)."""
  global _active
  cache_dir = _local_cache_dir()
  if cache_dir is None or _active is not None or not _install_hook():
    yield Prefetch(None)
    return
  prefetch = Prefetch(os.path.join(cache_dir, f'{HINT_PREFIX}{signature_key(name, args, context)}.json'))
  prefetch.start()
  _active = prefetch
  try:
    yield prefetch
  finally:
    _active = None
    prefetch.close()
    logging.info('Compilation cache prefetch for %s: %s', name, prefetch.outcome)
