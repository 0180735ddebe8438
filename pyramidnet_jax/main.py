"""Train and evaluate a PyramidNet.

  python -m pyramidnet_jax.main --config=configs/fashion_mnist_demo.py --workdir=runs/demo

Any config field can be overridden with --config.<field>=value. Running the same command again
resumes from the latest checkpoint in --workdir.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pyramidnet_jax import evaluate
from pyramidnet_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a one-line error for an unknown or ill-typed config field."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError) as e:
    overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    sys.exit(f'error: bad config override ({overrides}): {e}. The fields and their types are '
             'in configs/default.py.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  train.enable_compilation_cache(FLAGS.config.compilation_cache_dir)
  try:
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    report = None
    if FLAGS.config.write_report and jax.process_index() == 0:
      report = evaluate.evaluate_workdir(FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  print(f'test accuracy {results["test_accuracy"]:.4f}  top-5 {results["test_top5_accuracy"]:.4f}  '
        f'loss {results["test_loss"]:.4f}  ({results["steps"]} steps, '
        f'{results["wall_time_s"]:.0f}s); results in {FLAGS.workdir}/results.json')
  if report is not None:
    print(f'report (per-class metrics, confusion matrix, training curves): '
          f'{report["files"]["markdown"]}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
