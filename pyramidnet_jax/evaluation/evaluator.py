"""A network on a whole split: metrics during training, logits for reports, a workdir's report.

Every process feeds its own part of each padded global batch, placed on the devices while the
step before it runs (training/feeding.py); the compiled step runs on all devices of all processes
and returns replicated results, so every process sees the same numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pyramidnet_jax.evaluation import report
from pyramidnet_jax.interop import loading
from pyramidnet_jax.training import feeding
from pyramidnet_jax.training import runtime as runtime_lib
from pyramidnet_jax.training import step
from pyramidnet_jax.training import storage

REPORT_DIR = 'report'
SPLITS = ('test', 'validation')


def split_metrics(runtime: runtime_lib.Runtime, state: Any, split: Any,
                  batch_size: int) -> dict[str, float]:
  """Mean loss, top-1 and top-5 accuracy over `split` (a data.Split), summed on the devices."""
  totals = None
  feed = feeding.DeviceFeed(split.eval_batches(batch_size), runtime.put_batch)
  for batch in feed:
    sums = runtime.eval_step(state, batch)
    feed.dispatched(sums)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'accuracy': float(totals['top1']) / count,
          'top5_accuracy': float(totals['top5']) / count}


def split_logits(runtime: runtime_lib.Runtime, state: Any, split: Any,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(logits (N, C), labels (N,)) of every example of `split`, padding dropped.

  In order for one process; with several, grouped by global batch (each batch's examples in
  process order).
  """
  logits, labels = [], []
  feed = feeding.DeviceFeed(split.eval_batches(batch_size), runtime.put_batch)
  for batch in feed:
    out = runtime.logits_step(state, batch)
    feed.dispatched(out)  # The next batch crosses to the devices while this one runs.
    out = jax.device_get(out)
    real = out['mask'] > 0
    logits.append(np.asarray(out['logits'])[real])
    labels.append(np.asarray(out['label'])[real])
  return np.concatenate(logits), np.concatenate(labels)


def class_names_or_numbers(dataset: Any) -> tuple[str, ...]:
  if len(dataset.class_names) == dataset.num_classes:
    return tuple(dataset.class_names)
  return tuple(str(i) for i in range(dataset.num_classes))


def evaluate_workdir(workdir: str, which: str = 'best', split_name: str = 'test',
                     batch_size: int | None = None, out_dir: str | None = None,
                     write: bool = True) -> dict[str, Any]:
  """Evaluates a workdir's checkpoint on one split and writes the report (unless not `write`,
  or not process 0); returns its metrics."""
  from pyramidnet_jax import data  # pylint: disable=g-import-not-at-top
  if split_name not in SPLITS:
    raise ValueError(f'Unknown split {split_name!r}: expected one of {SPLITS}.')
  loaded = loading.load_info(workdir, which)
  if loaded.config is None:
    raise ValueError(f'{workdir} is a converted model, not a training workdir: it records no '
                     'data to evaluate on. Classify images with pyramidnet_jax.predict instead.')
  config = loaded.config
  dataset = data.load_dataset(config, jax.process_index(), jax.process_count())
  split = dataset.test if split_name == 'test' else dataset.validation
  if split is None:
    raise ValueError(f'{workdir} was trained without a validation split '
                     '(config.validation_fraction = 0); evaluate --split=test instead.')
  batch_size = batch_size or config.eval_batch_size
  devices = jax.device_count()
  if batch_size % devices:
    batch_size += devices - batch_size % devices  # Keep every device equally fed.
  runtime = runtime_lib.create_runtime(config, eval_batch_size=batch_size,
                                       preprocessing=dataset.preprocessing)
  # From host memory: every process holds the same variables, placed on all devices.
  state = jax.device_put(step.InferenceState(apply_fn=loaded.model.apply,
                                             **jax.device_get(loaded.variables)),
                         runtime.replicated)
  logits, labels = split_logits(runtime, state, split, batch_size)
  metrics = report.classification_metrics(logits, labels, class_names_or_numbers(dataset))
  extra = {'workdir': storage.absolute(workdir), 'checkpoint': loaded.path, 'step': loaded.step,
           'split': split_name, 'dataset': config.dataset, 'model': loaded.model_config}
  files = {}
  if write and jax.process_index() == 0:
    records = report.read_metrics_log(storage.join(workdir, 'metrics.jsonl'))
    files = report.write_report(out_dir or storage.join(workdir, REPORT_DIR), metrics, records,
                                extra)
  return {**metrics, 'files': files, 'step': loaded.step, 'checkpoint': loaded.path}
