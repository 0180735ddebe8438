"""PyTorch in the benchmark: the same network from interop/torch_reference.py, eager or compiled."""

from __future__ import annotations

import os
import time
from typing import Any

from pyramidnet_jax.benchmarking import common
from pyramidnet_jax.models import platforms


def unsupported(config) -> str | None:
  """Why torch_reference cannot express config's network, or None."""
  if config.model.name in ('pyconvresnet', 'pyconvhgresnet') and config.model.stem != 'imagenet':
    return (f'torch_reference has only the ImageNet stem of {config.model.name}, config.model.stem '
            f'is {config.model.stem!r}')
  return None


def build_model(config, image_shape, num_classes):
  """The same network as ours, from pyramidnet_jax.interop.torch_reference."""
  from torch import nn  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.interop import torch_reference as ref  # pylint: disable=g-import-not-at-top

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


def num_params(config, image_shape, num_classes) -> int:
  import torch  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.interop import torch_reference as ref  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):
    return ref.count_params(build_model(config, image_shape, num_classes))


def run(config, variant: str, image_shape, num_classes, steps: int, warmup: int,
              cold_cache: bool, torch_threads: int = 0) -> dict[str, Any]:
  rss_imports = common.rss_mb()
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.interop import torch_reference as ref  # pylint: disable=g-import-not-at-top

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
  # bf16 autocast exactly where ours computes in bfloat16 on this machine ('auto' included).
  bf16 = platforms.dtype_name(config.model.dtype, _platform(torch)) == 'bfloat16'

  def sync():
    if cuda:
      torch.cuda.synchronize()

  torch.manual_seed(config.seed)
  batch_size = config.batch_size
  batch = common.synthetic_batch(batch_size, image_shape, num_classes)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  t0 = time.perf_counter()
  net = build_model(config, image_shape, num_classes).to(device,
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
  peak_rss_train = common.peak_rss_mb()

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
      'train_images_per_s': common.median_rate(train_times, batch_size),
      'inference_images_per_s': common.median_rate(infer_times, batch_size),
      'time_to_first_step_s': time_to_first_step_s,
      'state_creation_s': state_creation_s,
      'inference_first_call_s': inference_first_call_s,
      'train_step_times_s': train_times,
      'inference_step_times_s': infer_times,
      'first_loss': first_loss,
      'num_params': num_params,
      'compile_cache': 'off' if cold_cache else 'on (TorchInductor default)',
      'peak_rss_mb': common.peak_rss_mb(),
      'peak_rss_train_mb': peak_rss_train,
      'rss_after_imports_mb': rss_imports,
      'torch_device': torch.cuda.get_device_name() if cuda else f'cpu ({threads} threads)',
      'torch_version': torch.__version__,
      'torch_autocast': 'bfloat16' if bf16 else 'off',
  }
  if peak_device is not None:
    result['peak_device_mb'] = peak_device / 2**20
  return result


def _platform(torch) -> str:
  """The machine PyTorch runs on, named as platforms.RESOLVED names ours."""
  if not torch.cuda.is_available():
    return 'cpu'
  if torch.version.hip:
    return 'rocm'
  major, _ = torch.cuda.get_device_capability()
  return 'cuda' if major >= 8 else 'cuda_pre_ampere'
