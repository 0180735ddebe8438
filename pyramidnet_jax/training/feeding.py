"""Feeding the steps: batches placed on the devices one step ahead, the loop's throughput, and a
profiler trace of a window of steps.

`DeviceFeed` keeps at most two batches on the devices: the one the running step reads and the
next one, which crosses to the devices while that step runs. It holds no thread of its own (JAX
places arrays asynchronously), so stopping early or on an error leaves nothing running, and it
takes the host batches in their order, one each: the batches used are those an unfed loop uses.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Iterator

import jax

# The metrics.jsonl fields of the loop's speed over a logging interval: they differ between two
# runs of the same steps, unlike every other field.
THROUGHPUT_FIELDS = ('images_per_s', 'steps_per_s', 'input_wait')


class DeviceFeed:
  """Host batches placed on the devices (`place`, e.g. Runtime.put_batch) one step ahead.

      feed = DeviceFeed(host_batches, runtime.put_batch)
      for batch in feed:
        state, metrics = runtime.train_step(state, batch)
        feed.dispatched(metrics)

  `dispatched(outputs)` of step i waits for step i - 1 to finish (so at most one step waits behind
  the running one, and step i - 1's batch is freed), then places batch i + 1 while step i runs.
  `input_s` adds up the seconds spent waiting for host batches and placing them.
  """

  def __init__(self, batches: Iterable[dict[str, Any]],
               place: Callable[[dict[str, Any]], dict[str, Any]]):
    self._batches = iter(batches)
    self._place = place
    self._next: dict[str, Any] | None = None
    self._previous_outputs: Any = None
    self._exhausted = False
    self.input_s = 0.0

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._next is None:
      self._prefetch()
    if self._next is None:
      raise StopIteration
    batch, self._next = self._next, None
    return batch

  def dispatched(self, outputs: Any) -> None:
    """Call once the step on the last batch is dispatched, with (some of) its outputs."""
    if self._previous_outputs is not None:
      jax.block_until_ready(self._previous_outputs)
    self._previous_outputs = outputs
    if self._next is None:
      self._prefetch()

  def _prefetch(self) -> None:
    if self._exhausted:
      return
    start = time.perf_counter()
    try:
      host = next(self._batches, None)
      if host is None:
        self._exhausted = True
      else:
        self._next = self._place(host)
    finally:
      self.input_s += time.perf_counter() - start


class Throughput:
  """Images/s, steps/s and the share of wall time spent waiting for input (the feed's input_s),
  per interval of the loop; time spent `paused` (saving a checkpoint) is left out."""

  def __init__(self, images_per_step: int, feed: DeviceFeed):
    self.images_per_step = images_per_step
    self._feed = feed
    self._start = time.perf_counter()
    self._start_input_s = feed.input_s
    self._steps = 0

  def step_done(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self._start += time.perf_counter() - start

  def interval(self) -> dict[str, float]:
    """THROUGHPUT_FIELDS since the last call (or the start); starts the next interval."""
    now, input_s = time.perf_counter(), self._feed.input_s
    seconds = max(now - self._start, 1e-9)
    out = {'images_per_s': self._steps * self.images_per_step / seconds,
           'steps_per_s': self._steps / seconds,
           'input_wait': min(1.0, (input_s - self._start_input_s) / seconds)}
    self._start, self._start_input_s, self._steps = now, input_s, 0
    return out


def describe(throughput: dict[str, float]) -> str:
  """A log line's part for THROUGHPUT_FIELDS."""
  return (f'{throughput["images_per_s"]:,.0f} images/s, {throughput["steps_per_s"]:.2f} steps/s, '
          f'{100 * throughput["input_wait"]:.0f}% of the time waiting for input')


class ProfileWindow:
  """A JAX profiler trace of steps [start, stop) (config.profile_steps) into `directory`, on
  process 0 (`enabled`), for TensorBoard's profile plugin or Perfetto.

  A run resumed inside the window traces from its first step; one that ends or fails inside it
  writes the trace of the steps taken (close)."""

  def __init__(self, steps: Any, directory: str, enabled: bool = True):
    steps = tuple(steps or ())
    self.start, self.stop = steps if steps else (0, 0)
    self.directory = directory
    self.enabled = enabled and self.start < self.stop
    self.active = False

  def before_step(self, step: int) -> None:
    """Call before dispatching the step that starts at global step `step`."""
    if self.enabled and not self.active and self.start <= step < self.stop:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after_step(self, step: int, outputs: Any) -> None:
    """Call after dispatching it, with `step` the global step reached and its outputs."""
    if self.active and step >= self.stop:
      jax.block_until_ready(outputs)  # The window's last step runs inside the trace.
      self.close()

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
