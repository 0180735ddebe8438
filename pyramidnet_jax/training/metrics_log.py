"""Training metrics as TensorBoard scalars and lines of metrics.jsonl."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

METRICS_FILE = 'metrics.jsonl'


class MetricsLog:
  """TensorBoard scalars and metrics.jsonl, written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self.writer = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self.jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')

  def write(self, step: int, split: str, metrics: dict[str, float], **extra: Any) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self.writer.add_scalar(f'{split}/{name}', value, step)
    self.jsonl.write(json.dumps({'step': step, 'split': split, **extra, **metrics}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      self.jsonl.close()

