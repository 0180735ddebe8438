"""Training metrics as TensorBoard scalars and lines of metrics.jsonl.

In a workdir on an object store (no append), metrics.jsonl is written again whole at each
record, and TensorBoard's event file at each of its flushes, through etils.epath.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import jax

from pyramidnet_jax.training import storage

METRICS_FILE = 'metrics.jsonl'


class MetricsLog:
  """TensorBoard scalars and metrics.jsonl, written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      tensorboard_dir = storage.join(workdir, 'tensorboard')
      if storage.is_remote(workdir):
        _register_remote_event_files(workdir)
      self.writer = tensorboardX.SummaryWriter(tensorboard_dir)
      self.path = storage.join(workdir, METRICS_FILE)
      if storage.is_remote(workdir):
        self.jsonl = None
        self.lines = storage.read_text(self.path) if storage.exists(self.path) else ''
      else:
        self.jsonl = open(self.path, 'a')

  def write(self, step: int, split: str, metrics: dict[str, float], **extra: Any) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self.writer.add_scalar(f'{split}/{name}', value, step)
    line = json.dumps({'step': step, 'split': split, **extra, **metrics}) + '\n'
    if self.jsonl is None:
      self.lines += line
      storage.write_atomically(self.path, self.lines)
    else:
      self.jsonl.write(line)
      self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      if self.jsonl is not None:
        self.jsonl.close()


class _EventFile:
  """An event file on an object store: the bytes so far, written whole at each flush."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    storage.write_atomically(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EventFiles:
  """tensorboardX's writer factory for a URL scheme, backed by etils.epath (tensorboardX's own
  gs:// writer needs google-cloud-storage, which this project does not otherwise use)."""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    storage.makedirs(path)


def _register_remote_event_files(workdir: str) -> None:
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory(os.fspath(workdir).split('://', 1)[0], _EventFiles())
