"""What the benchmark's runners share: the data spec, a synthetic batch, timing and memory."""

from __future__ import annotations

import os
import resource
import statistics
import sys

import numpy as np

# Dataset name -> (image size, channels, classes); no data is loaded.
DATASETS = {
    'fashion_mnist': (28, 1, 10),
    'cifar10': (32, 3, 10),
    'cifar100': (32, 3, 100),
    'imagenet2012': (224, 3, 1000),
}


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


def median_rate(times: list[float], batch_size: int) -> float:
  return batch_size / statistics.median(times)


def rss_mb() -> float:
  """Current resident set size of this process (Linux), in MB."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
  except (OSError, ValueError):
    return float('nan')


def peak_rss_mb() -> float:
  scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss: bytes on macOS, KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# ------------------------------------------------------------------------------------------------
# Ours


def xla_memory(memory) -> dict[str, int | None]:
  """XLA's buffer assignment of a compiled step (None where the backend gives none)."""
  names = ('temp', 'argument', 'output', 'alias')
  return {f'xla_{n}_bytes': getattr(memory, f'{n}_size_in_bytes') if memory else None
          for n in names}
