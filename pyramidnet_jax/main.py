"""Train and evaluate a network.

  python -m pyramidnet_jax.main --config=configs/fashion_mnist_demo.py --workdir=runs/demo

Any config field can be overridden with --config.<field>=value; every field is checked before
anything starts (pyramidnet_jax/training/config_checks.py). Running the same command again
resumes from the latest checkpoint in --workdir, with the same training fields as the workdir's
config.json (--allow_config_change names the few that may change). One training at a time holds
a workdir; a second is refused. Expected failures end as one `error:` line (--debug shows the
traceback).
"""

import errno
import os
import socket
import sys
import threading

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pyramidnet_jax import cli
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
                    'on every process. Without it, TPU pods and SLURM jobs are auto-detected.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: total number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index, 0 to N-1.')
flags.DEFINE_integer('startup_timeout_s', 300, 'Multi-host: seconds to wait for every process '
                     'to join before giving up with an error.', lower_bound=1)
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, timeout_s: int = 300) -> None:
  """jax.distributed from the flags, or auto-detected on a TPU pod or in a SLURM job step.

  Every process then runs the same program: the global batch is split over all processes'
  devices, each reads its own shard, and only process 0 writes logs and results. Processes
  that do not all join within `timeout_s` end with an error (JAX itself would abort the
  process, without saying why).
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together: '
                       'give all three (the same address and count on every process).')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                       f'{num_processes}).')
    host, port = parse_address(coordinator_address)
    if process_id == 0:
      _check_port_free(port, coordinator_address)
    if num_processes > 1:
      print(f'waiting up to {timeout_s}s for {num_processes} processes to join at '
            f'{coordinator_address} (this is process {process_id})', file=sys.stderr, flush=True)
    with _startup_deadline(timeout_s, lambda: _not_joined(
        coordinator_address, host, port, num_processes, process_id, timeout_s)):
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=timeout_s + 30)
  elif _on_multihost_cluster():
    with _startup_deadline(timeout_s, lambda: (
        f'the processes of this cluster job did not all join within {timeout_s}s; check that '
        'every task started, or raise --startup_timeout_s.')):
      jax.distributed.initialize(initialization_timeout=timeout_s + 30)  # From the environment.


def parse_address(address: str) -> tuple[str, int]:
  """HOST and PORT of a --coordinator_address, the host resolved; ValueError if either is bad."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')  # [IPv6]:PORT
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'--coordinator_address={address} is not HOST:PORT (e.g. 10.0.0.1:1234, '
                     'the address of process 0 and a free port).')
  try:
    socket.getaddrinfo(host, int(port))
  except (socket.gaierror, UnicodeError) as e:
    raise ValueError(f'--coordinator_address={address}: host {host!r} cannot be resolved '
                     f'({getattr(e, "strerror", e)}); give the address of process 0.') from None
  return host, int(port)


def _check_port_free(port: int, address: str) -> None:
  """Process 0 serves the coordinator on `port`; JAX crashes when it is taken."""
  for family, any_host in ((socket.AF_INET6, '::'), (socket.AF_INET, '0.0.0.0')):
    try:
      with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As the coordinator's server.
        s.bind((any_host, port))
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise ValueError(f'--coordinator_address={address}: port {port} is in use on this host '
                         '(by another run\'s coordinator?); choose a free port for every '
                         'process.') from None
  # Neither family could bind for another reason: let JAX try and report it.


class _startup_deadline:  # pylint: disable=invalid-name
  """Ends the process with one error line if the block has not finished in `timeout_s`.

  JAX's start-up waits in C++ and aborts the process at its own timeout, so the deadline is a
  thread that exits the process first.
  """

  def __init__(self, timeout_s: float, message):
    self.timer = threading.Timer(timeout_s, self._expire, (message,))
    self.timer.daemon = True

  @staticmethod
  def _expire(message) -> None:
    print(f'error: {cli.one_line(message())}', file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access

  def __enter__(self):
    self.timer.start()

  def __exit__(self, *exc):
    self.timer.cancel()


def _not_joined(address: str, host: str, port: int, num_processes: int, process_id: int,
                timeout_s: int) -> str:
  if process_id != 0:
    try:
      socket.create_connection((host, port), timeout=5).close()
    except OSError:
      return (f'nothing answers at --coordinator_address={address} after {timeout_s}s: start '
              'process 0 there (with the same --coordinator_address and --num_processes), or '
              'raise --startup_timeout_s.')
  # JAX does not say how many arrived, only that some did not.
  return (f'not all {num_processes} processes (--num_processes) joined at {address} within '
          f'{timeout_s}s: start the missing ones with the same --coordinator_address and '
          '--num_processes and their own --process_id, or raise --startup_timeout_s.')


def _on_multihost_cluster() -> bool:
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  slurm_tasks = os.environ.get('SLURM_STEP_NUM_TASKS', os.environ.get('SLURM_NTASKS', '1'))
  return ',' in tpu_hosts or ('SLURM_STEP_ID' in os.environ and slurm_tasks.isdigit()
                              and int(slurm_tasks) > 1)


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
  initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.startup_timeout_s)
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
