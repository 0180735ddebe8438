"""The report of launch/accelerator_check.py: each step's status.json (`record`) and the one JSON
of every step's outcome and figures (`assemble`). Standard library only, so that the report is
written even when the environment under test cannot import JAX."""

from __future__ import annotations

import json
import os
import re
import time

from accelerator_check_files import (TAIL_LINES, log_tail, read_json, read_lines, stamped_lines,
                                     utc_now, write_json)
from accelerator_check_resume import DETERMINISTIC_FLAG

DEMO_TARGET_S = 60


def record(args) -> int:
  """status.json of a step: its plan (no --rc), then its outcome."""
  path = os.path.join(args.dir, 'status.json')
  status = read_json(path) or {}
  status.update(name=args.name, kind=args.kind, index=args.index, timeout_s=args.timeout,
                command=[a for a in args.command if a != '--'] or status.get('command'))
  for item in args.extra:
    key, _, value = item.partition('=')
    status[key] = value
  if args.rc is not None:
    status.update(returncode=args.rc, wall_time_s=args.wall, finished=utc_now())
  os.makedirs(args.dir, exist_ok=True)
  write_json(path, status)
  return 0


def assemble(args) -> int:
  """The one JSON: every step in the order run, its status and figures, and a summary."""
  steps_dir = os.path.join(args.scratch, 'steps')
  statuses = []
  for name in sorted(os.listdir(steps_dir)) if os.path.isdir(steps_dir) else []:
    status = read_json(os.path.join(steps_dir, name, 'status.json'))
    if status:
      statuses.append((os.path.join(steps_dir, name), status))
  statuses.sort(key=lambda s: int(s[1]['index']))
  steps = {}
  for step_dir, status in statuses:
    steps[status['name']] = _step_report(step_dir, status, steps, args.mode)
  finished = [s for s in steps.values() if s['status'] != 'not run']
  report = {
      'check': 'launch/accelerator_check.sh',
      'mode': args.mode,
      'complete': len(finished) == len(steps),
      'ok': bool(steps) and all(s['status'] in ('ok', 'skipped') for s in steps.values()),
      'started': args.started,
      'updated': utc_now(),
      'wall_time_s': round(time.time() - args.started_epoch, 1) if args.started_epoch else None,
      # The check's own steps; an install (--wheels) comes on top.
      'time_budget_s': sum(int(s['timeout_s']) for _, s in statuses if s.get('budget') != 'no'),
      'python': args.python,
      'data_dir': args.data_dir,
      'scratch': os.path.abspath(args.scratch),
      'summary': _summary(steps),
      'steps': steps,
  }
  write_json(args.output, report)
  if args.final:
    failed = [n for n, s in steps.items() if s['status'] != 'ok' and s['status'] != 'skipped']
    print(f'done in {report["wall_time_s"]} s: '
          + (f'failed: {", ".join(failed)}' if failed else 'every step ok') + f'; {args.output}')
    return 1 if failed else 0
  if args.announce and args.announce in steps:
    step = steps[args.announce]
    what = step.get('error') or ', '.join(f'{k} {v}' for k, v in _brief(step).items())
    print(f'  -> {step["status"]} in {step.get("wall_time_s")} s{": " + what if what else ""}',
          flush=True)
  return 0


def _step_report(step_dir: str, status: dict, earlier: dict, mode: str) -> dict:
  step = {'status': 'not run', 'timeout_s': int(status['timeout_s']),
          'command': status.get('command')}
  if status.get('description'):
    step['description'] = status['description']
  if 'returncode' not in status:
    return step
  if status.get('skip'):
    step.update(status='skipped', skipped=status['skip'])
    return step
  rc = int(status['returncode'])
  log = os.path.join(step_dir, 'log.txt')
  step.update(returncode=rc, wall_time_s=float(status['wall_time_s']), log=log)
  try:
    figures = PARSERS[status['kind']](step_dir, status, earlier, mode)
  except Exception as e:  # pylint: disable=broad-except
    figures = {'error': f'cannot read the step\'s figures: {type(e).__name__}: {e}'}
  step.update(figures)
  if rc in (124, 137):
    step['timed_out'] = True
    step['error'] = f'timed out after {step["timeout_s"]} s' + (
        f' ({step["error"]})' if step.get('error') else '')
  elif rc != 0 and 'error' not in step:
    step['error'] = f'exit status {rc}'
  if step.get('skipped') and rc == 0 and 'error' not in step:
    step['status'] = 'skipped'
  else:
    step['status'] = 'failed' if 'error' in step else 'ok'
  if step['status'] == 'failed':
    step['log_tail'] = [line for _, line in stamped_lines(log)][-TAIL_LINES:] or log_tail(log)
  return step


def _install_figures(step_dir, status, earlier, mode):
  return {'wheels': status.get('description', '').removeprefix('offline install from ')}


def _devices_figures(step_dir, status, earlier, mode):
  found = read_json(os.path.join(step_dir, 'result.json'))
  if found is None:
    return {'error': 'no device report'}
  out = dict(found)
  if mode == 'accelerator' and found['platform'] == 'cpu':
    out['error'] = ('JAX sees only the CPU: install the accelerator extra (pip install -r '
                    'requirements.txt -e \'.[cuda12]\') and check that the driver is visible '
                    '(nvidia-smi)')
  return out


_EPOCH = re.compile(r'^epoch (\d+)/(\d+) \|.*\| (\d+)s$')


def _demo_figures(step_dir, status, earlier, mode):
  workdir = status['workdir']
  results = read_json(os.path.join(workdir, 'results.json'))
  if results is None:
    return {'error': 'the run wrote no results.json', 'workdir': workdir}
  batch = int(status['batch_size'])
  out = {'workdir': workdir, 'dtype': status.get('dtype'),
         'test_accuracy': results['test_accuracy'],
         'test_top5_accuracy': results['test_top5_accuracy'], 'test_loss': results['test_loss'],
         'steps': results['steps'], 'batch_size': batch,
         'run_wall_time_s': results['wall_time_s'],
         'steps_per_s_overall': results['steps'] / results['wall_time_s']}
  # Training speed between the first epoch's line and the last one's, timed as they were
  # printed: the start, the compile and the test evaluation stay out.
  epochs = [(t, int(m.group(1))) for t, line in stamped_lines(os.path.join(step_dir, 'log.txt'))
            if (m := _EPOCH.match(line))]
  ends = _epoch_end_steps(workdir)
  out['steps_per_s'] = None
  if len(epochs) >= 2 and epochs[-1][0] > epochs[0][0] and all(e in ends for _, e in epochs):
    span_steps = ends[epochs[-1][1]] - ends[epochs[0][1]]
    out['steps_per_s'] = span_steps / (epochs[-1][0] - epochs[0][0])
    out['steps_per_s_epochs'] = [epochs[0][1] + 1, epochs[-1][1]]
    out['images_per_s'] = out['steps_per_s'] * batch
  # The target for one GPU, reported, not enforced (the timeout is the limit).
  out['within_60_s'] = results['wall_time_s'] <= DEMO_TARGET_S
  minimum = float(status['min_accuracy'])
  out['min_accuracy'] = minimum
  if results['test_accuracy'] < minimum:
    out['error'] = f'test accuracy {results["test_accuracy"]:.4f} is below {minimum}'
  return out


def _epoch_end_steps(workdir: str) -> dict[int, int]:
  """{epoch: the step it ended at}, from the train records of metrics.jsonl."""
  ends = {}
  for line in read_lines(os.path.join(workdir, 'metrics.jsonl')) or []:
    record_ = json.loads(line)
    if record_.get('split') == 'train' and 'epoch' in record_:
      ends[record_['epoch']] = max(ends.get(record_['epoch'], 0), record_['step'])
  return ends


def _resume_figures(step_dir, status, earlier, mode):
  report = read_json(os.path.join(step_dir, 'result.json'))
  if report is None:
    return {'error': 'no kill-and-resume report'}
  out = dict(report)
  deterministic = report.get('deterministic', {})
  if 'error' in deterministic:
    out['error'] = f'deterministic: {deterministic["error"]}'
  elif deterministic.get('passed') is False:
    out['error'] = ('with ' + DETERMINISTIC_FLAG + ' the resumed run is not bit-identical to the '
                    f'uninterrupted one (max abs diff {deterministic.get("max_abs_diff")})')
  elif 'passed' not in deterministic:
    out['error'] = 'the deterministic comparison did not finish'
  return out


def _benchmark_figures(step_dir, status, earlier, mode):
  bench = read_json(os.path.join(step_dir, 'result.json'))
  if bench is None:
    return {'error': 'the benchmark wrote no JSON'}
  out = {'config': bench['config'], 'dtype': bench['model'].get('dtype'),
         'batch_size': bench['batch_size'], 'device': bench.get('device'),
         'torch_device': bench.get('torch_device'), 'num_params': bench.get('num_params'),
         'notes': bench.get('notes', []), 'variants': {}}
  ran = {'jax': bench['jax'], **bench['torch']} if bench['jax'] else dict(bench['torch'])
  for name, r in ran.items():
    out['variants'][name] = {k: r.get(k) for k in (
        'train_images_per_s', 'inference_images_per_s', 'time_to_first_step_s',
        'peak_device_mb', 'peak_rss_mb', 'xla_temp_bytes', 'error', 'skipped') if k in r}
  errors = [f'{n}: {r["error"]}' for n, r in ran.items() if 'error' in r]
  torch_ran = [n for n, r in bench['torch'].items() if 'skipped' not in r and 'error' not in r]
  if (mode == 'accelerator' and torch_ran and not str(bench.get('device', '')).startswith('cpu')
      and str(bench.get('torch_device', '')).startswith('cpu')):
    # PyPI's torch wheel needs a driver for its CUDA version; without one it runs on the CPU.
    errors.append(f'PyTorch ran on the CPU ({bench["torch_device"]}) while ours ran on '
                  f'{bench.get("device")}: install a PyTorch build for this driver\'s CUDA')
  if errors:
    out['error'] = '; '.join(errors)[:1000]
  if ran and all('skipped' in r for r in ran.values()):
    out['skipped'] = next(iter(ran.values()))['skipped']
  paired = status.get('paired_with')
  if paired in earlier:
    # Ours (from the paired step) over the fastest PyTorch variant of both steps.
    variants = {**earlier[paired].get('variants', {}), **out['variants']}
    ours = variants.get('jax', {}).get('train_images_per_s')
    torch_rates = {n: v['train_images_per_s'] for n, v in variants.items()
                   if n != 'jax' and v.get('train_images_per_s')}
    if ours and torch_rates:
      best = max(torch_rates, key=torch_rates.get)
      out['ratio_vs_pytorch'] = ours / torch_rates[best]
      out['pytorch_best'] = best
  elif bench.get('ratio_vs_pytorch') is not None:
    out['ratio_vs_pytorch'] = bench['ratio_vs_pytorch']
    out['pytorch_best'] = bench['pytorch_best']['variant']
  return out


def _remat_figures(step_dir, status, earlier, mode):
  out = _benchmark_figures(step_dir, status, {}, mode)
  remat = out.get('variants', {}).get('jax', {})
  plain = earlier.get(status.get('compare_with'), {}).get('variants', {}).get('jax', {})
  memory = {}
  for name, figures in (('without_remat', plain), ('with_remat', remat)):
    memory[name] = {k: figures.get(k) for k in ('peak_device_mb', 'peak_rss_mb', 'xla_temp_bytes')}
  key = 'peak_device_mb' if remat.get('peak_device_mb') else 'xla_temp_bytes'
  if plain.get(key) and remat.get(key):
    memory['measure'] = key
    memory['ratio'] = plain[key] / remat[key]
  out['memory'] = memory
  return out


_PIPELINE = re.compile(r'median ([\d,.]+) images/s .*= ([\d,.]+) images/s')


def _pipeline_figures(step_dir, status, earlier, mode):
  for _, line in stamped_lines(os.path.join(step_dir, 'log.txt')):
    if match := _PIPELINE.search(line):
      out = {'median_images_per_s': float(match.group(1).replace(',', '')),
             'total_images_per_s': float(match.group(2).replace(',', '')), 'line': line}
      training = earlier.get('demo', {}).get('images_per_s')
      if training:
        # Input bounds training when the pipeline is not well above the step's rate.
        out['training_images_per_s'] = training
        out['pipeline_over_training'] = out['median_images_per_s'] / training
      return out
  return {'error': 'no images/s line in the output'}


PARSERS = {'install': _install_figures, 'devices': _devices_figures, 'demo': _demo_figures,
           'resume': _resume_figures, 'benchmark': _benchmark_figures, 'remat': _remat_figures,
           'pipeline': _pipeline_figures}


def _brief(step: dict) -> dict:
  """The figures of a step that the console line shows."""
  keys = ('platform', 'device_count', 'test_accuracy', 'steps_per_s', 'passed',
          'ratio_vs_pytorch', 'median_images_per_s')
  out = {k: (round(step[k], 4) if isinstance(step[k], float) else step[k])
         for k in keys if step.get(k) is not None}
  if 'memory' in step and step['memory'].get('ratio'):
    out['memory ratio'] = round(step['memory']['ratio'], 2)
  return out


def _summary(steps: dict) -> dict:
  """The headline figures of the steps that finished, in one place."""
  out = {'statuses': {name: step['status'] for name, step in steps.items()}}
  devices_step = steps.get('devices', {})
  if devices_step.get('devices'):
    out['devices'] = devices_step['jax_devices']
  demo = steps.get('demo', {})
  for key in ('test_accuracy', 'steps_per_s', 'images_per_s', 'run_wall_time_s'):
    if demo.get(key) is not None:
      out[f'demo_{key}'] = demo[key]
  resumed = steps.get('resume', {})
  if 'deterministic' in resumed:
    out['resume_bit_identical_deterministic'] = resumed['deterministic'].get('identical')
    out['resume_default_flags_differed'] = resumed.get('default', {}).get('differed')
  for name, step in steps.items():
    if step.get('ratio_vs_pytorch') is not None:
      out[f'{name}_ratio_vs_pytorch'] = step['ratio_vs_pytorch']
    if step.get('memory', {}).get('ratio'):
      out[f'{name}_memory_ratio'] = step['memory']['ratio']
  if steps.get('pipeline', {}).get('median_images_per_s'):
    out['pipeline_images_per_s'] = steps['pipeline']['median_images_per_s']
  return out
