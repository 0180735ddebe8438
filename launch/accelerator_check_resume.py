"""Kill-and-resume for launch/accelerator_check.py: a training run SIGKILLed after its first
checkpoint and rerun to the end, compared with an uninterrupted run (results, metrics, and every
array of the final state)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from accelerator_check_files import ROOT, log_tail, read_json, read_lines, write_json

DETERMINISTIC_FLAG = '--xla_gpu_deterministic_ops=true'
# Runs whose results do not depend on where or how long they ran.
TIME_FIELDS = ('wall_time_s', 'process_wall_time_s')
# The training log's speed fields: measurements of the machine, not of the run's numbers.
METRICS_TIME_FIELDS = ('images_per_s', 'steps_per_s', 'input_wait')


def resume(args) -> int:
  """Kill-and-resume: with XLA's deterministic GPU ops, an uninterrupted run and a run killed
  (SIGKILL) after its first checkpoint and rerun to the end must end bit-identical; with the
  default flags, the same killed run is compared with args.reference (the demo step's run) and
  the difference is recorded, not checked. With args.smoke (on the CPU, where the flag changes
  nothing) the deterministic runs are compared with args.reference and the default ones skipped:
  the same code path, at two runs' cost instead of five."""
  env = dict(os.environ)
  os.environ['JAX_PLATFORMS'] = 'cpu'  # This process only reads checkpoints: no device memory.
  main_args = [a for a in args.main_args if a != '--']
  runs_dir = os.path.join(args.scratch, 'runs')
  logs_dir = os.path.join(args.scratch, 'logs')
  os.makedirs(runs_dir, exist_ok=True)
  os.makedirs(logs_dir, exist_ok=True)
  deterministic_env = dict(env, XLA_FLAGS=' '.join(
      f for f in (env.get('XLA_FLAGS', ''), DETERMINISTIC_FLAG) if f))
  report = {'kill': 'SIGKILL once the first checkpoint is committed, then the same command',
            'deterministic': {'xla_flags': deterministic_env['XLA_FLAGS'],
                              'expected': 'bit-identical to the uninterrupted run'},
            'default': {'xla_flags': env.get('XLA_FLAGS', ''),
                        'expected': 'recorded only: without the flag XLA may pick GPU kernels '
                                    'that sum in a varying order'}}

  def save():
    write_json(args.out, report)

  def run(name, flavour_env, cache, kill=False):
    workdir = os.path.join(runs_dir, name)
    command = [args.python, '-m', 'pyramidnet_jax.main', *main_args, f'--workdir={workdir}',
               f'--config.compilation_cache_dir={cache}']
    log = os.path.join(logs_dir, f'{name}.log')
    outcome = _run_training(command, flavour_env, log, workdir, kill)
    print(f'{name}: {outcome}', flush=True)
    return workdir, outcome

  ok = True
  flavours = (('deterministic', deterministic_env), ('default', env))
  if args.smoke:
    report['default']['skipped'] = 'cpu-smoke: the XLA flag is for GPUs'
    flavours = flavours[:1]
  for flavour, flavour_env in flavours:
    section = report[flavour]
    cache = os.path.join(args.scratch, f'xla_cache_{flavour}')  # Executables of these flags only.
    reference = args.reference if flavour == 'default' or args.smoke else None
    if reference and not os.path.isfile(os.path.join(reference, 'results.json')):
      section['note'] = f'{reference} did not finish: an uninterrupted run is made here instead.'
      reference = None
    if reference is None:
      reference, outcome = run(f'{flavour}_uninterrupted', flavour_env, cache)
      section['uninterrupted'] = outcome
      save()
      if outcome['returncode'] != 0:
        section['error'] = 'the uninterrupted run failed'
        ok = ok and flavour != 'deterministic'
        continue
    section['reference'] = reference
    workdir, killed = run(f'{flavour}_killed', flavour_env, cache, kill=True)
    section['killed'] = killed
    save()
    if not killed.get('killed'):
      section['error'] = killed.get('error', 'the run was not killed')
      ok = ok and flavour != 'deterministic'
      continue
    _, resumed = run(f'{flavour}_killed', flavour_env, cache)
    section['resumed'] = resumed
    save()
    if resumed['returncode'] != 0:
      section['error'] = 'the resumed run failed'
      ok = ok and flavour != 'deterministic'
      continue
    comparison = compare_runs(workdir, reference)
    section.update(comparison)
    if flavour == 'deterministic':
      section['passed'] = comparison['identical']
      ok = ok and comparison['identical']
    else:
      section['differed'] = not comparison['identical']
    save()
  report['passed'] = ok
  save()
  return 0 if ok else 1


def _run_training(command, env, log, workdir, kill):
  """Runs one training command; with `kill`, SIGKILLs it as soon as a checkpoint is committed
  (Orbax renames a finished save to the bare step number)."""
  start = time.monotonic()
  with open(log, 'a') as out:
    out.write(f'$ {" ".join(command)}\n')
    out.flush()
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    outcome = {}
    if kill:
      while proc.poll() is None:
        steps = _committed_steps(workdir)
        if steps:
          proc.send_signal(signal.SIGKILL)
          outcome = {'killed': True, 'checkpoints_at_kill': steps,
                     'seconds_to_kill': round(time.monotonic() - start, 3)}
          break
        time.sleep(0.02)
    code = proc.wait()
    if kill and not outcome:
      outcome = {'killed': False,
                 'error': f'the run ended (exit status {code}) before its first checkpoint'}
  outcome.update(returncode=code, wall_time_s=round(time.monotonic() - start, 3), log=log)
  if kill and outcome['killed']:
    outcome['results_at_kill'] = os.path.exists(os.path.join(workdir, 'results.json'))
  elif code != 0:
    outcome['log_tail'] = log_tail(log)
  return outcome


def _committed_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  except OSError:
    return []


def compare_runs(workdir: str, reference: str) -> dict:
  """The resumed run against the uninterrupted one: results.json (but its wall times),
  metrics.jsonl, and the final checkpoint's state (its sha256, then every array)."""
  results = [read_json(os.path.join(w, 'results.json')) or {} for w in (workdir, reference)]
  for r in results:
    for field in TIME_FIELDS:
      r.pop(field, None)
  metrics = [_read_metrics(w) for w in (workdir, reference)]
  steps = [_committed_steps(w) for w in (workdir, reference)]
  final = [s[-1] if s else None for s in steps]
  metas = [read_json(os.path.join(w, 'checkpoints', str(f), 'meta', 'metadata')) or {}
           for w, f in zip((workdir, reference), final)]
  state_equal = (final[0] == final[1] and metas[0].get('state_sha256') is not None
                 and metas[0].get('state_sha256') == metas[1].get('state_sha256'))
  out = {
      'results_equal': results[0] == results[1],
      'metrics_equal': metrics[0] == metrics[1],
      'final_step': final[1],
      'state_sha256_equal': state_equal,
      'test_accuracy': [r.get('test_accuracy') for r in results],
      'test_loss': [r.get('test_loss') for r in results],
  }
  if results[0] != results[1]:
    out['results_differences'] = {k: [results[0].get(k), results[1].get(k)]
                                  for k in sorted(set(results[0]) | set(results[1]))
                                  if results[0].get(k) != results[1].get(k)}
  try:
    out.update(_array_differences(workdir, reference, final))
  except Exception as e:  # pylint: disable=broad-except
    out['arrays_error'] = f'{type(e).__name__}: {e}'[:500]
  out['identical'] = out['results_equal'] and out['metrics_equal'] and state_equal
  return out


def _read_metrics(workdir: str) -> list[dict] | None:
  lines = read_lines(os.path.join(workdir, 'metrics.jsonl'))
  if lines is None:
    return None
  records = [json.loads(line) for line in lines]
  for r in records:
    for field in METRICS_TIME_FIELDS:
      r.pop(field, None)
  return records


def _array_differences(workdir, reference, final) -> dict:
  """Largest absolute difference over every array of the two final states, and where."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  states = [_read_state(w, step) for w, step in zip((workdir, reference), final)]
  a, b = states
  if set(a) != set(b):
    return {'max_abs_diff': None, 'arrays_error': 'the two states have other leaves'}
  worst, where, differing = 0.0, None, 0
  for path in sorted(a):
    x, y = np.asarray(a[path]), np.asarray(b[path])
    if x.shape != y.shape:
      return {'max_abs_diff': None, 'arrays_error': f'{path}: shapes {x.shape} and {y.shape}'}
    if x.dtype.kind not in 'fc':
      differing += int(not np.array_equal(x, y))
      continue
    diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
    if diff.size and np.nanmax(diff) > 0:
      differing += 1
      if np.nanmax(diff) > worst:
        worst, where = float(np.nanmax(diff)), path
  return {'max_abs_diff': worst, 'max_abs_diff_at': where, 'arrays_differing': differing,
          'arrays_compared': len(a)}


def _read_state(workdir: str, step: int) -> dict:
  """{path: numpy array} of a checkpoint's state, read on the CPU without a target."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  metadata = ocp.PyTreeCheckpointer().metadata(path)
  metadata = getattr(metadata, 'item_metadata', metadata)
  device = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(path, abstract)
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in flat}
