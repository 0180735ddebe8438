"""Train and evaluate a network.

  python -m pyramidnet_jax.main --config=configs/fashion_mnist_demo.py --workdir=runs/demo

Any config field can be overridden with --config.<field>=value. Running the same command again
resumes from the latest checkpoint in --workdir.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pyramidnet_jax import cli
from pyramidnet_jax.training import loop

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0, the same '
                    'on every process. Without it, TPU pods and SLURM jobs are auto-detected.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: total number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index, 0 to N-1.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """jax.distributed from the flags, or auto-detected on a TPU pod or in a SLURM job step.

  Every process then runs the same program: the global batch is split over all processes'
  devices, each reads its own shard, and only process 0 writes logs and results.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together: '
                       'give all three (the same address and count on every process).')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, {num_processes}).')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _on_multihost_cluster():
    jax.distributed.initialize()  # JAX reads the cluster from the environment.


def _on_multihost_cluster() -> bool:
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  slurm_tasks = int(os.environ.get('SLURM_STEP_NUM_TASKS', os.environ.get('SLURM_NTASKS', '1')))
  return ',' in tpu_hosts or ('SLURM_STEP_ID' in os.environ and slurm_tasks > 1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  try:
    cli.set_up_platform(config)
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    cli.enable_compilation_cache(config.compilation_cache_dir)
    results = loop.train_and_evaluate(config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  if jax.process_index() != 0:
    return
  print(f'test accuracy {results["test_accuracy"]:.4f}  top-5 {results["test_top5_accuracy"]:.4f}  '
        f'loss {results["test_loss"]:.4f}  ({results["steps"]} steps, '
        f'{results["wall_time_s"]:.0f}s); results in {FLAGS.workdir}/results.json')
  if config.write_report:
    print('report (per-class metrics, confusion matrix, training curves): '
          f'{loop.report_path(FLAGS.workdir)}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_config_flags)
