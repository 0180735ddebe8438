"""Training and inference speed of ours against the same network in PyTorch.

  python -m pyramidnet_jax.benchmark --config=configs/cifar10_110_a48.py --output=bench.json
  python -m pyramidnet_jax.benchmark --config=configs/imagenet_pyconvresnet50.py \
      --config.batch_size=32 --frameworks=jax,torch_eager_cl,torch_compile_cl

For each framework variant (ours: `jax`; PyTorch: `torch_eager`, `torch_eager_cl`,
`torch_compile`, `torch_compile_cl`, `_cl` meaning channels_last) on one synthetic batch of
config.batch_size: training and inference images per second (batch / median time of --steps
timed steps after --warmup untimed ones), time to the first training step (trace and compile
included), and peak memory. Prints a table; --output writes JSON with `ratio_vs_pytorch`, our
training images/s over the fastest PyTorch variant's. PyTorch is optional: without it only ours
runs. Each variant runs in its own subprocess, so peak memory, first-step times and (on a GPU)
JAX's memory preallocation do not leak from one variant into the next.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pyramidnet_jax import cli
from pyramidnet_jax.benchmarking import common
from pyramidnet_jax.benchmarking import ours
from pyramidnet_jax.benchmarking import pytorch
from pyramidnet_jax.training import config_checks

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('output', None, 'Write the results as JSON to this path.')
flags.DEFINE_integer('steps', 10, 'Timed steps (the median is reported).', lower_bound=1)
flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first one.', lower_bound=0)
flags.DEFINE_string('frameworks', 'jax,torch_eager,torch_eager_cl,torch_compile,torch_compile_cl',
                    'Comma-separated variants to run.')
flags.DEFINE_integer('image_size', 0, 'Image height and width; 0 = the dataset\'s.', lower_bound=0)
flags.DEFINE_bool('cold_cache', False, 'Disable the persistent compilation caches (XLA\'s and '
                  'TorchInductor\'s), so the time to the first step includes a full compile.')
flags.DEFINE_bool('compile_only', False, 'Ours only: trace and compile the training step and '
                  'report its times and XLA\'s memory analysis, without running it (for steps '
                  'too big for this machine\'s memory).')
flags.DEFINE_integer('torch_threads', 0, 'PyTorch CPU threads; 0 = all the CPUs this process may '
                     'use.', lower_bound=0)
# Internal: the parent runs each variant as `python -m pyramidnet_jax.benchmark ... --worker=V`.
flags.DEFINE_string('worker', None, 'Internal: run one variant and write its JSON to '
                    '--worker_output.')
flags.DEFINE_string('worker_output', None, 'Internal: see --worker.')
flags.mark_flags_as_required(['config'])

VARIANTS = ('jax', 'torch_eager', 'torch_eager_cl', 'torch_compile', 'torch_compile_cl')
TORCH_VARIANTS = VARIANTS[1:]

_ARGV: list[str] = []  # The command line, replayed for the workers.


def parse_flags(argv: list[str]) -> list[str]:
  """cli.parse_config_flags, remembering the command line to replay it for the workers."""
  _ARGV[:] = argv[1:]
  return cli.parse_config_flags(argv)


def _worker(variant: str, output: str) -> None:
  config = FLAGS.config
  image_shape, num_classes = common.data_spec(config, FLAGS.image_size)
  args = (config, image_shape, num_classes, FLAGS.steps, FLAGS.warmup, FLAGS.cold_cache)
  try:
    if variant == 'jax':
      result = ours.run(*args, compile_only=FLAGS.compile_only)
    else:
      result = pytorch.run(config, variant, *args[1:], torch_threads=FLAGS.torch_threads)
  except Exception as e:  # pylint: disable=broad-except
    # E.g. torch.compile without a working C++ compiler: reported, the other variants go on.
    logging.exception('%s failed', variant)
    result = {'error': f'{type(e).__name__}: {e}'.strip()[:2000]}
  with open(output, 'w') as f:
    json.dump(result, f)


def _run_variant(variant: str) -> dict[str, Any]:
  """Runs one variant in a fresh `python -m pyramidnet_jax.benchmark --worker=...` process."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
  with tempfile.TemporaryDirectory() as tmp:
    output = os.path.join(tmp, 'result.json')
    command = [sys.executable, '-m', 'pyramidnet_jax.benchmark', *_ARGV,
               f'--worker={variant}', f'--worker_output={output}']
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode == 0 and os.path.exists(output):
      with open(output) as f:
        result = json.load(f)
    else:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
      result = {'error': f'worker exited with status {proc.returncode}: ' + ' | '.join(tail)}
  if 'error' in result:
    print(f'  {variant}: {result["error"]}', file=sys.stderr)
  return result


def _format_table(results: dict[str, dict[str, Any]]) -> str:
  header = ('variant', 'train img/s', 'infer img/s', 'first step s', 'peak MB', 'note')
  rows = []
  for name, r in results.items():
    if 'error' in r or 'skipped' in r:
      note = r.get('skipped') or r['error']
      rows.append((name, '-', '-', '-', '-', note[:100]))
      continue
    if r.get('compile_only'):
      note = (f'compile only: trace {r["trace_s"]:.1f} s + compile {r["compile_s"]:.1f} s, XLA '
              f'temp {r["xla_temp_bytes"] / 2**30:.2f} GiB')
      if r.get('compilation_cache_prefetch') == 'used':
        note += ' (cache entry loaded while tracing)'
      rows.append((name, '-', '-', '-', f'{r["peak_rss_mb"]:.0f} (RSS)', note))
      continue
    peak = r.get('peak_device_mb', r['peak_rss_mb'])
    kind = 'device' if 'peak_device_mb' in r else 'RSS'
    rows.append((name, f'{r["train_images_per_s"]:.1f}', f'{r["inference_images_per_s"]:.1f}',
                 f'{r["time_to_first_step_s"]:.1f}', f'{peak:.0f} ({kind})', ''))
  widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
  lines = [' | '.join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
           for row in [header, *rows]]
  lines.insert(1, '-+-'.join('-' * w for w in widths))
  return '\n'.join(lines)


def benchmark() -> dict[str, Any]:
  config = FLAGS.config
  image_shape, num_classes = common.data_spec(config, FLAGS.image_size)
  variants = [v.strip() for v in FLAGS.frameworks.split(',') if v.strip()]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown or not variants:
    raise ValueError(f'--frameworks: unknown {", ".join(unknown) or "(empty)"}; expected a comma '
                     f'list of {", ".join(VARIANTS)}.')
  notes = []
  skipped = {}
  if FLAGS.compile_only:
    variants = ['jax']
    notes.append('--compile_only: ours only, compiled and not run.')
  if any(v in TORCH_VARIANTS for v in variants):
    import importlib.util  # pylint: disable=g-import-not-at-top
    reason = None
    if importlib.util.find_spec('torch') is None:
      reason = "PyTorch is not installed (pip install -e '.[torch]')"
    else:
      reason = pytorch.unsupported(config)
    if reason:
      notes.append(f'PyTorch variants skipped: {reason}.')
      skipped = {v: {'skipped': reason} for v in variants if v in TORCH_VARIANTS}

  # The parent only traces, on the CPU, so that it holds no accelerator memory.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  num_params = {'jax': ours.num_params(config, image_shape, num_classes)}
  if any(v in TORCH_VARIANTS and v not in skipped for v in variants):
    num_params['torch'] = pytorch.num_params(config, image_shape, num_classes)
    if num_params['torch'] != num_params['jax']:
      raise ValueError(f'Not the same network: ours has {num_params["jax"]:,} parameters, the '
                       f'PyTorch reference {num_params["torch"]:,}.')
  if config.model.remat:
    notes.append('config.model.remat is on for ours; PyTorch runs without checkpointing.')

  results = {}
  for i, variant in enumerate(variants):
    if variant in skipped:
      results[variant] = skipped[variant]
      continue
    print(f'[{i + 1}/{len(variants)}] {variant} ...', file=sys.stderr, flush=True)
    t = time.time()
    results[variant] = _run_variant(variant)
    print(f'[{i + 1}/{len(variants)}] {variant} done in {time.time() - t:.0f} s', file=sys.stderr,
          flush=True)

  our_result = results.get('jax', {})
  torch_ok = {v: r for v, r in results.items() if v in TORCH_VARIANTS and 'train_images_per_s' in r}
  best = max(torch_ok, key=lambda v: torch_ok[v]['train_images_per_s']) if torch_ok else None
  ratio = None
  if best and 'train_images_per_s' in our_result:
    ratio = our_result['train_images_per_s'] / torch_ok[best]['train_images_per_s']
  torch_device = next((r['torch_device'] for r in torch_ok.values()), None)
  if (torch_device and our_result.get('platform') and our_result['platform'] != 'cpu'
      and torch_device.startswith('cpu')):
    notes.append(f'PyTorch ran on the CPU, ours on {our_result["platform"]}: not the same device.')
  if torch_device and our_result.get('device') and not our_result['device'].endswith(' x1'):
    notes.append(f'Ours split the batch over {our_result["device"]}; PyTorch ran on one device.')
  return {
      'config': FLAGS['config'].config_filename,
      'model': config.model.to_dict(),
      'dataset': config.dataset,
      'batch_size': config.batch_size,
      'image_shape': list(image_shape),
      'num_classes': num_classes,
      'steps': FLAGS.steps,
      'warmup': FLAGS.warmup,
      'cold_cache': FLAGS.cold_cache,
      'compile_only': FLAGS.compile_only,
      'device': our_result.get('device'),
      'torch_device': torch_device,
      'host': {'cpu_count': os.cpu_count(), 'machine': platform.machine(),
               'processor': _cpu_model()},
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'versions': _versions(results),
      'num_params': num_params,
      'jax': our_result,
      'torch': {v: r for v, r in results.items() if v in TORCH_VARIANTS},
      'pytorch_best': ({'variant': best, 'train_images_per_s': torch_ok[best]['train_images_per_s']}
                       if best else None),
      'ratio_vs_pytorch': ratio,
      'notes': notes,
  }


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _versions(results) -> dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  versions = {'python': platform.python_version(), 'jax': jax.__version__, 'flax': flax.__version__}
  torch_version = next((r['torch_version'] for r in results.values() if 'torch_version' in r), None)
  if torch_version:
    versions['torch'] = torch_version
  return versions


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form '
                     '--name=value.')
  logging.set_verbosity(logging.WARNING)
  if FLAGS.worker:
    _worker(FLAGS.worker, FLAGS.worker_output)
    return
  config_checks.validate(FLAGS.config)
  report = benchmark()
  where = [f'{name} on {device}' for name, device in
           (('ours', report['device']), ('PyTorch', report['torch_device'])) if device]
  print(f'{report["config"]}: {report["model"]["name"]}-{report["model"]["depth"]}, '
        f'{report["num_params"]["jax"]:,} parameters, batch {report["batch_size"]} x '
        f'{"x".join(map(str, report["image_shape"]))}; {", ".join(where + [""])}median of '
        f'{report["steps"]} timed steps')
  table = {**({'jax': report['jax']} if report['jax'] else {}), **report['torch']}
  print(_format_table(table))
  if report['ratio_vs_pytorch'] is not None:
    print(f'ratio_vs_pytorch (training): {report["ratio_vs_pytorch"]:.2f} '
          f'(vs {report["pytorch_best"]["variant"]})')
  for note in report['notes']:
    print(f'note: {note}')
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {FLAGS.output}')
  if 'error' in report['jax']:
    sys.exit(1)


if __name__ == '__main__':
  app.run(cli.run(main), flags_parser=parse_flags)