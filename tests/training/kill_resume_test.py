"""SIGKILL at many points of a training run; the same command then resumes it to the numbers of the
uninterrupted run, bit for bit.

A run is PyramidNet-8 a8 on 132 real Fashion-MNIST images (6 steps an epoch after the hold-out),
3 epochs, a checkpoint every 4 steps (latest saves at 4, 6, 8, 12, 16, 18; best/ at each epoch
end that improves), in a subprocess of this file (`python -m tests.training.kill_resume_test`).
The worker kills itself at a chosen point (KILL: inside a save, inside Orbax's commit, half-way
through a line of metrics.jsonl or a deletion, before an atomic rename), or the test kills it
after a seeded random delay. Several kills follow each other in one workdir (a chain), and the
last process runs to the end: every chain ends with the final state, the best state, the
metrics and the results of the uninterrupted run. The workers share a persistent compilation
cache, so only the reference run compiles.
"""

import concurrent.futures
import os
import random
import signal
import subprocess
import sys
import time

from tests import helpers
from tests.helpers import needs_fashion

pytestmark = needs_fashion

KILL_ENV = 'PYRAMIDNET_TEST_KILL'
STARTED_ENV = 'PYRAMIDNET_TEST_STARTED'  # A file the worker makes as it starts training.
SEED = 20240611

# Chains of kill points; a chain's points come in the order its processes reach them.
# save:<kind>:<step>:<when>: before the save call, right after it (commit in flight), or after
# its commit. rename:<n>:<when>: around Orbax's n-th rename of a process (the commit of an item
# or a step). metrics:<n>: half-way through writing the n-th line of metrics.jsonl.
# rmtree:<n>: half-way through the n-th directory deletion. replace:<name>: before the atomic
# rename of WORKDIR/<name>.
CHAINS = [
    # The kill between the two end-of-epoch commits (best first), then later ones.
    ['save:best:6:committed', 'save:checkpoints:12:started', 'save:best:18:committed'],
    ['save:checkpoints:6:before', 'rename:4:before', 'metrics:5', 'save:checkpoints:16:committed'],
    ['rename:2:after', 'save:best:12:started', 'rmtree:1', 'replace:results.json'],
]
TIMED_KILLS = 3


def make_config():
  return helpers.tiny_config(validation_fraction=0.25, checkpoint_every_steps=4, num_epochs=3)


# --- The worker ----------------------------------------------------------------------------------


def worker(workdir: str, cache_dir: str) -> None:
  from pyramidnet_jax import cli  # pylint: disable=g-import-not-at-top
  config = make_config()
  cli.set_up_platform(config)
  import jax  # pylint: disable=g-import-not-at-top
  cli.enable_compilation_cache(cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  from pyramidnet_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import loop  # pylint: disable=g-import-not-at-top
  subset = helpers.fashion_subset(132, 64)
  fashion_mnist.load = lambda data_dir: subset
  if os.environ.get(KILL_ENV):
    _install_kill(os.environ[KILL_ENV])
  open(os.environ[STARTED_ENV], 'w').close()
  loop.train_and_evaluate(config, workdir)


def _die():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(spec: str) -> None:
  kind, *args = spec.split(':')
  count = [0]

  def nth(n: int) -> bool:
    count[0] += 1
    return count[0] == n

  if kind == 'save':
    from pyramidnet_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
    which, step, when = args[0], int(args[1]), args[2]
    real_save = checkpoints.save

    def save(manager, at, *a, **k):
      here = at == step and os.path.basename(str(manager.directory)) == which
      if here and when == 'before':
        _die()
      result = real_save(manager, at, *a, **k)
      if here and when == 'committed':
        manager.wait_until_finished()
      if here:
        _die()
      return result
    checkpoints.save = save
  elif kind == 'rename':
    from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
    n, when = int(args[0]), args[1]
    real_rename = async_path.rename

    async def rename(*a, **k):
      hit = nth(n)
      if hit and when == 'before':
        _die()
      result = await real_rename(*a, **k)
      if hit:
        _die()
      return result
    async_path.rename = rename
  elif kind == 'metrics':
    from pyramidnet_jax.training import metrics_log  # pylint: disable=g-import-not-at-top
    n = int(args[0])
    real_write = metrics_log.MetricsLog.write

    def write(self, *a, **k):
      if nth(n):
        self.jsonl.write('{"step": 99, "split": "tr')  # Half a line, as a kill leaves it.
        self.jsonl.flush()
        _die()
      return real_write(self, *a, **k)
    metrics_log.MetricsLog.write = write
  elif kind == 'rmtree':
    import shutil  # pylint: disable=g-import-not-at-top
    n = int(args[0])
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
      if nth(n):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
        for f in files[:len(files) // 2]:
          os.remove(f)
        _die()
      return real_rmtree(path, *a, **k)
    shutil.rmtree = rmtree
  elif kind == 'replace':
    name = args[0]
    real_replace = os.replace

    def replace(source, target, *a, **k):
      if os.path.basename(str(target)) == name:
        _die()
      return real_replace(source, target, *a, **k)
    os.replace = replace
  else:
    raise ValueError(f'unknown kill point {spec}')


# --- The test ------------------------------------------------------------------------------------


class Runner:
  """Starts workers in workdirs; keeps their output for the failure messages."""

  def __init__(self, tmp_path):
    self.cache = str(tmp_path / 'xla_cache')
    self.logs = tmp_path / 'logs'
    self.logs.mkdir()
    self.count = 0
    self.env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', KILL_ENV)}
    self.env['JAX_PLATFORMS'] = 'cpu'

  def start(self, workdir, kill=None):
    self.count += 1
    env = dict(self.env)
    if kill:
      env[KILL_ENV] = kill
    log = self.logs / f'{self.count:02d}-{os.path.basename(workdir)}-{kill}.log'.replace(':', '_')
    env[STARTED_ENV] = f'{log}.started'
    with open(log, 'w') as out:
      process = subprocess.Popen(
          [sys.executable, '-m', 'tests.training.kill_resume_test', workdir, self.cache],
          cwd=helpers.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    process.log = log
    return process

  def run(self, workdir, kill=None, delay=None):
    """(exit status, log); with a delay, the worker is killed that long after it started
    training (its imports and set-up done), unless it ended before."""
    process = self.start(workdir, kill)
    if delay is None:
      process.wait(timeout=300)
      return process.returncode, process.log
    started = f'{process.log}.started'
    while not os.path.exists(started) and process.poll() is None:
      time.sleep(0.01)
    try:
      process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      process.kill()  # SIGKILL.
      process.wait()
    return process.returncode, process.log

  def finish(self, workdir):
    """Runs the worker to its end; returns how long it trained and evaluated."""
    code, log = self.run(workdir)
    assert code == 0, f'the resumed run failed:\n{tail(log)}'
    return time.time() - os.path.getmtime(f'{log}.started')


def tail(log, lines=30):
  with open(log) as f:
    return ''.join(f.readlines()[-lines:])


def test_killed_anywhere_resumes_to_the_uninterrupted_run(tmp_path):
  helpers.fashion_subset(1, 1)  # Skips without the real Fashion-MNIST.
  runner = Runner(tmp_path)
  reference = str(tmp_path / 'reference')
  runner.finish(reference)  # Compiles, into the shared cache.
  duration = runner.finish(str(tmp_path / 'again'))  # From a warm cache, as every later run.
  helpers.assert_same_run(str(tmp_path / 'again'), reference)
  results = helpers.read_results(reference)
  assert results['steps'] == 18 and results['best_epoch'] == 3
  assert helpers.checkpoint_steps(reference) == [16, 18]
  assert helpers.checkpoint_steps(reference, 'best') == [12, 18]  # Named by checkpoints/16, 18.

  def hooked_chain(index):
    workdir = str(tmp_path / f'chain{index}')
    for kill in CHAINS[index]:
      code, log = runner.run(workdir, kill)
      assert code == -signal.SIGKILL, f'{kill} was never reached (exit {code}):\n{tail(log)}'
      if kill == 'save:best:6:committed':  # The state: best/6 committed, latest not.
        assert helpers.checkpoint_steps(workdir, 'best') == [6]
        assert 6 not in helpers.checkpoint_steps(workdir)
    return workdir

  def timed_chain():
    # Kills at random moments (seeded), one after the other in one workdir.
    # A resumed run has less left to do, so each delay is drawn from a shorter span; a run that
    # ends before its kill leaves nothing for the later ones.
    rng = random.Random(SEED)
    workdir = str(tmp_path / 'timed')
    killed = 0
    for k in range(TIMED_KILLS):
      code, log = runner.run(workdir, delay=rng.uniform(0.1, 0.6) * duration / (k + 1))
      assert code in (0, -signal.SIGKILL), tail(log)
      if code == 0:
        break
      killed += 1
    assert killed, 'no timed kill hit a running process'
    return workdir

  # Two chains at a time, one per core.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    chains = [pool.submit(hooked_chain, i) for i in range(len(CHAINS))]
    chains.append(pool.submit(timed_chain))
    workdirs = [chain.result() for chain in chains]
    finals = [pool.submit(runner.finish, workdir) for workdir in workdirs]
    for final in finals:
      final.result()
  for workdir in workdirs:
    helpers.assert_same_run(workdir, reference)
    # Kills leave no damage to report and nothing half made once resumed.
    assert not os.path.exists(os.path.join(workdir, 'corrupted')), workdir
    for directory in (workdir, os.path.join(workdir, 'checkpoints'),
                      os.path.join(workdir, 'best')):
      assert not [n for n in os.listdir(directory) if 'tmp' in n], directory


if __name__ == '__main__':
  worker(sys.argv[1], sys.argv[2])
