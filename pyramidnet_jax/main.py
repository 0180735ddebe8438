"""Train and evaluate a network.

  python -m pyramidnet_jax.main --config=configs/fashion_mnist_demo.py --workdir=runs/demo

Any config field can be overridden with --config.<field>=value; every field is checked before
anything starts (pyramidnet_jax/training/config_checks.py). Running the same command again
resumes from the latest checkpoint in --workdir, with the same training fields as the workdir's
config.json (--allow_config_change names the few that may change). One training at a time holds
a workdir; a second is refused. Expected failures end as one `error:` line (--debug shows the
traceback).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pyramidnet_jax import cli
from pyramidnet_jax import distributed
from pyramidnet_jax.training import config_checks
from pyramidnet_jax.training import loop
from pyramidnet_jax.training import workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_list(
    'allow_config_change', [],
    'On resume, fields that may differ from the workdir\'s config.json, comma-separated: only '
    f'{", ".join(workdir_lib.CHANGEABLE_FIELDS)}, which decide where the run stops and not the '
    'steps already taken (e.g. num_epochs, to extend a run). Every other training field shapes '
    'the earlier steps, so changing it needs a new --workdir. Changes are recorded in '
    f'WORKDIR/{workdir_lib.CHANGES_FILE}. Bookkeeping fields (logging, checkpoint interval and '
    'count, report, caches, CPU kit, data_dir, eval_batch_size) may change without it.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0, the same '
                    'on every process. Without it, Cloud TPU slices, SLURM job steps (srun) and '
                    'Open MPI jobs (mpirun) are detected (pyramidnet_jax/distributed.py).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: total number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index, 0 to N-1.')
flags.DEFINE_integer('expected_devices', None, 'The JAX devices (GPUs, TPU chips) the job holds '
                     'over all processes: stop with an error unless JAX sees exactly these. The '
                     'launchers pass what they asked the scheduler for.', lower_bound=1)
flags.DEFINE_integer('startup_timeout_s', 300, 'Multi-host: seconds to wait for every process '
                     'to join before giving up with an error.', lower_bound=1)
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form '
                     '--name=value.')
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  # Checked before anything starts: the platform, the peers, the data.
  config_checks.validate(config)
  workdir_lib.check_path(FLAGS.workdir)
  allowed = [name.strip() for name in FLAGS.allow_config_change if name.strip()]
  unknown = sorted(set(allowed) - set(workdir_lib.CHANGEABLE_FIELDS))
  if unknown:
    raise ValueError(f'--allow_config_change: {", ".join(unknown)} cannot be changed on resume; '
                     f'only {", ".join(workdir_lib.CHANGEABLE_FIELDS)} can (see --helpfull).')
  cli.set_up_platform(config)
  cluster = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id, FLAGS.startup_timeout_s)
  # Never train on fewer devices than the job holds.
  distributed.check_devices(cluster, FLAGS.expected_devices)
  cli.enable_compilation_cache(config.compilation_cache_dir)
  results = loop.train_and_evaluate(config, FLAGS.workdir, allowed_config_changes=allowed)
  if jax.process_index() != 0:
    return
  print(f'test accuracy {results["test_accuracy"]:.4f}  top-5 {results["test_top5_accuracy"]:.4f}  '
        f'loss {results["test_loss"]:.4f}  ({results["steps"]} steps, '
        f'{results["wall_time_s"]:.0f}s); results in {FLAGS.workdir}/results.json')
  if config.write_report:
    print('report (per-class metrics, confusion matrix, training curves): '
          f'{loop.report_path(FLAGS.workdir)}')


if __name__ == '__main__':
  app.run(cli.run(main), flags_parser=cli.parse_flags)
