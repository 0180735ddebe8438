"""Evaluate a trained network and write its report.

  python -m pyramidnet_jax.evaluate --workdir=runs/demo

Restores the workdir's best checkpoint (the latest when the run had no validation split), runs
it on the test split of the data it was trained on, and writes `DIR/report/`: report.json and
report.md (top-1, top-5, loss, per-class precision/recall/F1, the confusion matrix, the most
confused pairs), confusion_matrix.png and training_curves.png (from DIR/metrics.jsonl).
"""

from __future__ import annotations

import sys

from pyramidnet_jax import cli
from pyramidnet_jax.evaluation import evaluator


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  cli.check_metadata(FLAGS.workdir)  # A damaged JSON file is named, not a bare parse error.
  cli.set_up_platform()
  cli.enable_compilation_cache(FLAGS.compilation_cache_dir)
  result = evaluator.evaluate_workdir(FLAGS.workdir, FLAGS.which, FLAGS.split,
                                      FLAGS.batch_size or None, FLAGS.out or None)
  if not result['files']:
    return  # Not process 0: the report is process 0's to write and print.
  print(f'{FLAGS.split} top-1 {result["top1"]:.4f}  top-{result["top_k"]} {result["top5"]:.4f}  '
        f'loss {result["loss"]:.4f}  ({result["count"]} images, checkpoint step {result["step"]})')
  print(f'report: {result["files"]["markdown"]}')


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_enum('which', 'best', ['best', 'latest'],
                    'Checkpoint: best on validation (latest if none) or latest.')
  flags.DEFINE_enum('split', 'test', list(evaluator.SPLITS), 'Split to evaluate on.')
  flags.DEFINE_integer('batch_size', 0, 'Eval batch size (0: the config\'s eval_batch_size).')
  flags.DEFINE_string('out', '', 'Report directory (default: WORKDIR/report).')
  flags.DEFINE_string('compilation_cache_dir', cli.DEFAULT_CACHE_DIR,
                      'Persistent XLA cache (\'\' turns it off): the second run starts faster.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(cli.run(main), flags_parser=cli.parse_flags)
