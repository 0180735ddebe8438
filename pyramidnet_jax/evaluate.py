"""Evaluate a trained network and write its report.

  python -m pyramidnet_jax.evaluate --workdir=runs/demo

Restores the workdir's best checkpoint (the latest when the run had no validation split), runs
it on the test split of the data it was trained on, and writes `DIR/report/`: report.json and
report.md (top-1, top-5, loss, per-class precision/recall/F1, the confusion matrix, the most
confused pairs), confusion_matrix.png and training_curves.png (from DIR/metrics.jsonl).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from pyramidnet_jax import compile_cache
from pyramidnet_jax import input_pipeline
from pyramidnet_jax import loading
from pyramidnet_jax import train
from pyramidnet_jax import report

REPORT_DIR = 'report'
SPLITS = ('test', 'validation')


def predict_split(model: Any, variables: dict[str, Any], split: Any,
                  dataset: input_pipeline.Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(logits (N, C), labels (N,)) of every example of `split`, in order, on all local devices."""
  devices = jax.local_devices()
  if batch_size % len(devices):
    batch_size += len(devices) - batch_size % len(devices)  # Keep every device equally fed.
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  replicated = NamedSharding(mesh, PartitionSpec())
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False),
                    in_shardings=(replicated, NamedSharding(mesh, PartitionSpec('data'))),
                    out_shardings=replicated)
  variables = jax.device_put(variables, replicated)
  logits, labels = [], []
  for batch in input_pipeline.eval_batches(split, batch_size, dataset.mean, dataset.std):
    real = batch['mask'] > 0
    logits.append(np.asarray(forward(variables, batch['image']))[real])
    labels.append(batch['label'][real])
  return np.concatenate(logits), np.concatenate(labels)


def evaluate_workdir(workdir: str, which: str = 'best', split_name: str = 'test',
                     batch_size: int | None = None, out_dir: str | None = None,
                     write: bool = True) -> dict[str, Any]:
  """Evaluates a workdir's checkpoint on one split and writes the report (unless not `write`);
  returns its metrics."""
  if split_name not in SPLITS:
    raise ValueError(f'Unknown split {split_name!r}: expected one of {SPLITS}.')
  loaded = loading.load_info(workdir, which)
  if loaded.config is None:
    raise ValueError(f'{workdir} is a converted model, not a training workdir: it records no '
                     'data to evaluate on. Classify images with pyramidnet_jax.predict instead.')
  config = loaded.config
  dataset = input_pipeline.load_dataset(config)
  split = dataset.test if split_name == 'test' else dataset.validation
  if split is None:
    raise ValueError(f'{workdir} was trained without a validation split '
                     '(config.validation_fraction = 0); evaluate --split=test instead.')
  logits, labels = predict_split(loaded.model, loaded.variables, split, dataset,
                                 batch_size or config.eval_batch_size)
  class_names = dataset.class_names if len(dataset.class_names) == dataset.num_classes else \
      tuple(str(i) for i in range(dataset.num_classes))
  metrics = report.classification_metrics(logits, labels, class_names)
  records = report.read_metrics_log(os.path.join(workdir, 'metrics.jsonl'))
  extra = {'workdir': os.path.abspath(workdir), 'checkpoint': loaded.path, 'step': loaded.step,
           'split': split_name, 'dataset': config.dataset, 'model': loaded.model_config}
  files = {}
  if write:
    files = report.write_report(out_dir or os.path.join(workdir, REPORT_DIR), metrics, records,
                                extra)
  return {**metrics, 'files': files, 'step': loaded.step, 'checkpoint': loaded.path}


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  compile_cache.enable(FLAGS.compilation_cache_dir)
  try:
    result = evaluate_workdir(FLAGS.workdir, FLAGS.which, FLAGS.split, FLAGS.batch_size or None,
                              FLAGS.out or None)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  print(f'{FLAGS.split} top-1 {result["top1"]:.4f}  top-{result["top_k"]} {result["top5"]:.4f}  '
        f'loss {result["loss"]:.4f}  ({result["count"]} images, checkpoint step {result["step"]})')
  print(f'report: {result["files"]["markdown"]}')


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_enum('which', 'best', ['best', 'latest'],
                    'Checkpoint: best on validation (latest if none) or latest.')
  flags.DEFINE_enum('split', 'test', list(SPLITS), 'Split to evaluate on.')
  flags.DEFINE_integer('batch_size', 0, 'Eval batch size (0: the config\'s eval_batch_size).')
  flags.DEFINE_string('out', '', 'Report directory (default: WORKDIR/report).')
  flags.DEFINE_string('compilation_cache_dir', compile_cache.DEFAULT_DIR,
                      'Persistent XLA cache (\'\' turns it off): the second run starts faster.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
