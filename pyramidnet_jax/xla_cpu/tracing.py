"""Faster traces and starts of compiled steps, for the CPU kit (docs/benchmarks.md#levers)."""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, Iterator

import jax

from pyramidnet_jax.xla_cpu import compile_cache_prefetch


@contextlib.contextmanager
def python_gc_paused() -> Iterator[None]:
  """Python's cyclic garbage collector paused (reference counting still frees what it can).

  Tracing a deep PyramidNet creates millions of Python objects that live until the trace ends,
  and every collection they trigger walks them again.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


def inlined_jnp() -> contextlib.AbstractContextManager:
  """jnp's operators inlined into the enclosing trace instead of traced as nested jits.

  Each jnp operator is a jitted function traced anew for each new shape, and PyramidNet's
  optimiser update has hundreds of leaf shapes; the jaxpr is the same. Only for code that neither
  loops nor scans: jax.disable_jit would unroll a lax.scan.
  """
  return jax.disable_jit()


class FastStartJit:
  """A jitted function that starts fast: its calls, traces and lowerings run with python_gc_paused,
  and its first call loads the persistent cache entry its last compile read while it traces
  (compile_cache_prefetch.prefetching; `context` says what else the program depends on, e.g. the
  config).

  Each call pauses the collector only while it lasts; other attributes are the jitted function's.
  """

  def __init__(self, jitted: Callable[..., Any], name: str, context: str = ''):
    self.jitted = jitted
    self.name = name
    self.context = context
    self.first_call_prefetch: str | None = None  # Its Prefetch.outcome, once called.

  def __call__(self, *args, **kwargs):
    with python_gc_paused():
      if self.first_call_prefetch is not None:
        return self.jitted(*args, **kwargs)
      with self.prefetching(*args) as prefetch:
        try:
          return self.jitted(*args, **kwargs)
        finally:
          self.first_call_prefetch = prefetch.outcome

  def prefetching(self, *args
                  ) -> contextlib.AbstractContextManager[compile_cache_prefetch.Prefetch]:
    """For an ahead-of-time lower().compile() of these arguments in the block."""
    return compile_cache_prefetch.prefetching(self.name, args, self.context)

  def trace(self, *args, **kwargs):
    with python_gc_paused():
      return self.jitted.trace(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with python_gc_paused():
      return self.jitted.lower(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.jitted, name)
