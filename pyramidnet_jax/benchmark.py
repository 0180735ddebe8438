"""Training and inference speed of ours against the same network in PyTorch (issue #6).

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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from pyramidnet_jax import cli

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

# Dataset name -> (image size, channels, classes); no data is loaded.
DATASETS = {
    'fashion_mnist': (28, 1, 10),
    'cifar10': (32, 3, 10),
    'cifar100': (32, 3, 100),
    'imagenet2012': (224, 3, 1000),
}

_ARGV: list[str] = []  # The command line, replayed for the workers.


def parse_flags(argv: list[str]) -> list[str]:
  """cli.parse_config_flags, remembering the command line to replay it for the workers."""
  _ARGV[:] = argv[1:]
  return cli.parse_config_flags(argv)


def data_spec(config, image_size: int = 0) -> tuple[tuple[int, int, int], int]:
  """(image shape HWC, number of classes) for config.dataset, at `image_size` if non-zero."""
  if config.dataset not in DATASETS:
    raise ValueError(f'Unknown config.dataset {config.dataset!r}: expected one of '
                     f'{", ".join(map(repr, DATASETS))}.')
  size, channels, num_classes = DATASETS[config.dataset]
  size = image_size or size
  return (size, size, channels), num_classes


def synthetic_batch(batch_size: int, image_shape, num_classes: int, seed: int = 0):
  """Random 8-bit pixels, normalised as the input pipeline would; NHWC float32, int32 labels."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8)
  images = ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)
  labels = rng.integers(0, num_classes, (batch_size,)).astype(np.int32)
  return {'image': images, 'label': labels}


def _median_rate(times: list[float], batch_size: int) -> float:
  return batch_size / statistics.median(times)


def _rss_mb() -> float:
  """Current resident set size of this process (Linux), in MB."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
  except (OSError, ValueError):
    return float('nan')


def _peak_rss_mb() -> float:
  scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss: bytes on macOS, KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# ------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------


def our_num_params(config, image_shape, num_classes) -> int:
  """Parameter count of ours from shapes alone (tracing, no compile, no device memory)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import train  # pylint: disable=g-import-not-at-top

  model = train.create_model(config.model, num_classes)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes['params'])))


def _xla_memory(memory) -> dict[str, int | None]:
  """XLA's buffer assignment of a compiled step (None where the backend gives none)."""
  names = ('temp', 'argument', 'output', 'alias')
  return {f'xla_{n}_bytes': getattr(memory, f'{n}_size_in_bytes') if memory else None
          for n in names}


def run_jax(config, image_shape, num_classes, steps: int, warmup: int,
            cold_cache: bool, compile_only: bool = False) -> dict[str, Any]:
  """Ours: train.create_runtime's jitted, sharded, state-donating step, as training runs it."""
  rss_imports = _rss_mb()
  import jax  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import train  # pylint: disable=g-import-not-at-top

  train.configure_xla_cpu(config)
  if cold_cache:
    jax.config.update('jax_enable_compilation_cache', False)
    cache = 'off'
  elif config.compilation_cache_dir:
    compile_cache.enable(config.compilation_cache_dir)
    cache = f'on ({config.compilation_cache_dir})'
  else:
    cache = 'off (config.compilation_cache_dir is empty)'

  batch_size = config.batch_size
  model = train.create_model(config.model, num_classes)
  # The schedule's shape does not matter for speed; only its step count must be positive.
  steps_per_epoch = 1000
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else max(1, int(config.num_epochs)) * steps_per_epoch)
  lr_fn = train.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = train.create_optimizer(config, lr_fn)
  runtime = train.create_runtime(config, lr_fn)
  devices = jax.devices()

  t0 = time.perf_counter()
  state = train.create_train_state(config, model, image_shape, tx, runtime)
  jax.block_until_ready(state)
  state_creation_s = time.perf_counter() - t0
  num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  batch = runtime.put_batch(synthetic_batch(batch_size, image_shape, num_classes), is_global=True)
  jax.block_until_ready(batch)

  # Lowered and compiled once, ahead of time, so that its memory analysis costs no second
  # compile; the compiled executable keeps the jit's shardings and state donation. As on the
  # step's first call in training, the cache entry the last run used loads while it traces.
  t0 = time.perf_counter()
  with runtime.train_step.prefetching(state, batch) as prefetch:
    lowered = runtime.train_step.lower(state, batch)
    t1 = time.perf_counter()
    step = lowered.compile()
  t2 = time.perf_counter()
  # ru_maxrss only grows: this tells XLA's compile peak apart from the steps'.
  peak_rss_compile = _peak_rss_mb()
  common = {'state_creation_s': state_creation_s, 'num_params': num_params,
            'compilation_cache': cache, 'compilation_cache_prefetch': prefetch.outcome,
            **_xla_memory(step.memory_analysis()),
            'rss_after_imports_mb': rss_imports,
            'device': f'{devices[0].device_kind} x{len(devices)}',
            'platform': devices[0].platform}
  if compile_only:
    return {'compile_only': True, 'trace_s': t1 - t0, 'compile_s': t2 - t1,
            'peak_rss_mb': peak_rss_compile, **common}
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  t3 = time.perf_counter()
  first_step = {'time_to_first_step_s': t3 - t0, 'trace_s': t1 - t0, 'compile_s': t2 - t1,
                'first_step_run_s': t3 - t2}
  first_loss = float(metrics['loss'])

  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  train_times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    train_times.append(time.perf_counter() - t)

  device_peak = None
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    device_peak = max(d.memory_stats()['peak_bytes_in_use'] for d in devices)
  peak_rss_train = _peak_rss_mb()

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  t0 = time.perf_counter()
  infer_compiled = infer.lower(variables, batch['image']).compile()
  inference_compile_s = time.perf_counter() - t0
  for _ in range(1 + warmup):
    jax.block_until_ready(infer_compiled(variables, batch['image']))
  infer_times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(infer_compiled(variables, batch['image']))
    infer_times.append(time.perf_counter() - t)

  result = {
      'train_images_per_s': _median_rate(train_times, batch_size),
      'inference_images_per_s': _median_rate(infer_times, batch_size),
      **first_step,
      'inference_compile_s': inference_compile_s,
      'train_step_times_s': train_times,
      'inference_step_times_s': infer_times,
      'first_loss': first_loss,
      'peak_rss_mb': _peak_rss_mb(),
      'peak_rss_train_mb': peak_rss_train,
      'peak_rss_after_compile_mb': peak_rss_compile,
      **common,
  }
  if device_peak is not None:
    result['peak_device_mb'] = device_peak / 2**20
  return result


# ------------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------------


def torch_unsupported(config) -> str | None:
  """Why torch_reference cannot express config's network, or None."""
  if config.model.name in ('pyconvresnet', 'pyconvhgresnet') and config.model.stem != 'imagenet':
    return (f'torch_reference has only the ImageNet stem of {config.model.name}, config.model.stem '
            f'is {config.model.stem!r}')
  return None


def build_torch_model(config, image_shape, num_classes):
  """The same network as ours, from pyramidnet_jax.torch_reference."""
  from torch import nn  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import torch_reference as ref  # pylint: disable=g-import-not-at-top

  m = config.model
  if m.name == 'pyramidnet':
    net = ref.PyramidNet(m.depth, m.alpha, num_classes, bottleneck=m.bottleneck, stem=m.stem,
                         widening=m.widening, rounding=m.rounding)
  elif m.name == 'pyconvresnet':
    net = ref.PyConvResNet(m.depth, num_classes)
  elif m.name == 'pyconvhgresnet':
    net = ref.PyConvHGResNet(m.depth, num_classes)
  else:
    raise ValueError(f'Unknown config.model.name {m.name!r}.')
  channels = image_shape[-1]
  if channels != net.conv1.in_channels:
    # torch_reference's stems take RGB; ours takes the data's channels (1 for Fashion-MNIST).
    old = net.conv1
    net.conv1 = nn.Conv2d(channels, old.out_channels, old.kernel_size, stride=old.stride,
                          padding=old.padding, bias=False)
  if m.dropout_rate:
    net.fc = nn.Sequential(nn.Dropout(m.dropout_rate), net.fc)  # Ours: dropout before fc.
  return net


def torch_num_params(config, image_shape, num_classes) -> int:
  import torch  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import torch_reference as ref  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):
    return ref.count_params(build_torch_model(config, image_shape, num_classes))


def run_torch(config, variant: str, image_shape, num_classes, steps: int, warmup: int,
              cold_cache: bool, torch_threads: int = 0) -> dict[str, Any]:
  rss_imports = _rss_mb()
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import torch_reference as ref  # pylint: disable=g-import-not-at-top

  compiled = variant.startswith('torch_compile')
  channels_last = variant.endswith('_cl')
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  threads = None
  if cuda:
    torch.backends.cudnn.benchmark = True
    # JAX's default precision lets GPUs use TF32 in matmuls as well as convolutions.
    torch.set_float32_matmul_precision('high')
    torch.cuda.reset_peak_memory_stats()
  else:
    threads = torch_threads or (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                                else os.cpu_count())
    torch.set_num_threads(threads)
  if cold_cache:
    import torch._inductor.config  # pylint: disable=g-import-not-at-top
    torch._inductor.config.force_disable_caches = True  # pylint: disable=protected-access
  bf16 = config.model.dtype == 'bfloat16'

  def sync():
    if cuda:
      torch.cuda.synchronize()

  torch.manual_seed(config.seed)
  batch_size = config.batch_size
  batch = synthetic_batch(batch_size, image_shape, num_classes)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  t0 = time.perf_counter()
  net = build_torch_model(config, image_shape, num_classes).to(device,
                                                               memory_format=memory_format)
  x = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).to(device)
  x = x.contiguous(memory_format=memory_format)
  y = torch.from_numpy(batch['label']).long().to(device)
  sync()
  state_creation_s = time.perf_counter() - t0
  num_params = ref.count_params(net)
  opt = torch.optim.SGD(net.parameters(), lr=config.learning_rate, momentum=config.momentum,
                        nesterov=config.nesterov, weight_decay=config.weight_decay)

  def autocast():
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

  t0 = time.perf_counter()
  model = torch.compile(net) if compiled else net

  def train_step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
    loss.backward()
    opt.step()
    return loss

  net.train()
  first_loss = float(train_step().detach())
  sync()
  time_to_first_step_s = time.perf_counter() - t0
  for _ in range(warmup):
    train_step()
  sync()
  train_times = []
  for _ in range(steps):
    t = time.perf_counter()
    train_step()
    sync()
    train_times.append(time.perf_counter() - t)
  peak_device = torch.cuda.max_memory_allocated() if cuda else None
  peak_rss_train = _peak_rss_mb()

  net.eval()
  infer_times = []
  with torch.inference_mode():
    t0 = time.perf_counter()
    with autocast():
      model(x)
    sync()
    inference_first_call_s = time.perf_counter() - t0
    for i in range(warmup + steps):
      t = time.perf_counter()
      with autocast():
        model(x)
      sync()
      if i >= warmup:
        infer_times.append(time.perf_counter() - t)

  result = {
      'train_images_per_s': _median_rate(train_times, batch_size),
      'inference_images_per_s': _median_rate(infer_times, batch_size),
      'time_to_first_step_s': time_to_first_step_s,
      'state_creation_s': state_creation_s,
      'inference_first_call_s': inference_first_call_s,
      'train_step_times_s': train_times,
      'inference_step_times_s': infer_times,
      'first_loss': first_loss,
      'num_params': num_params,
      'compile_cache': 'off' if cold_cache else 'on (TorchInductor default)',
      'peak_rss_mb': _peak_rss_mb(),
      'peak_rss_train_mb': peak_rss_train,
      'rss_after_imports_mb': rss_imports,
      'torch_device': torch.cuda.get_device_name() if cuda else f'cpu ({threads} threads)',
      'torch_version': torch.__version__,
  }
  if peak_device is not None:
    result['peak_device_mb'] = peak_device / 2**20
  return result


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _worker(variant: str, output: str) -> None:
  config = FLAGS.config
  image_shape, num_classes = data_spec(config, FLAGS.image_size)
  args = (config, image_shape, num_classes, FLAGS.steps, FLAGS.warmup, FLAGS.cold_cache)
  try:
    if variant == 'jax':
      result = run_jax(*args, compile_only=FLAGS.compile_only)
    else:
      result = run_torch(config, variant, *args[1:], torch_threads=FLAGS.torch_threads)
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
  image_shape, num_classes = data_spec(config, FLAGS.image_size)
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
      reason = torch_unsupported(config)
    if reason:
      notes.append(f'PyTorch variants skipped: {reason}.')
      skipped = {v: {'skipped': reason} for v in variants if v in TORCH_VARIANTS}

  # The parent only traces, on the CPU, so that it holds no accelerator memory.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  num_params = {'jax': our_num_params(config, image_shape, num_classes)}
  if any(v in TORCH_VARIANTS and v not in skipped for v in variants):
    num_params['torch'] = torch_num_params(config, image_shape, num_classes)
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

  ours = results.get('jax', {})
  torch_ok = {v: r for v, r in results.items() if v in TORCH_VARIANTS and 'train_images_per_s' in r}
  best = max(torch_ok, key=lambda v: torch_ok[v]['train_images_per_s']) if torch_ok else None
  ratio = None
  if best and 'train_images_per_s' in ours:
    ratio = ours['train_images_per_s'] / torch_ok[best]['train_images_per_s']
  torch_device = next((r['torch_device'] for r in torch_ok.values()), None)
  if torch_device and ours.get('platform') and ours['platform'] != 'cpu' and torch_device.startswith(
      'cpu'):
    notes.append(f'PyTorch ran on the CPU, ours on {ours["platform"]}: not the same device.')
  if torch_device and ours.get('device') and not ours['device'].endswith(' x1'):
    notes.append(f'Ours split the batch over {ours["device"]}; PyTorch ran on one device.')
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
      'device': ours.get('device'),
      'torch_device': torch_device,
      'host': {'cpu_count': os.cpu_count(), 'machine': platform.machine(),
               'processor': _cpu_model()},
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'versions': _versions(results),
      'num_params': num_params,
      'jax': ours,
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
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  if FLAGS.worker:
    _worker(FLAGS.worker, FLAGS.worker_output)
    return
  try:
    report = benchmark()
  except ValueError as e:
    sys.exit(f'error: {e}')
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
  app.run(main, flags_parser=parse_flags)
