"""In-memory splits (CIFAR, Fashion-MNIST): `ArraySplit`, its batches and the stratified hold-out.

Every training batch is a pure function of (seed, epoch, index): its order and augmentation come
from numpy generators keyed on those numbers. Every process holds the whole split and builds the
whole global batch's order and augmentation draws, then keeps its own contiguous slice of it.
Crops and flips move uint8 pixels exactly, so batches hold uint8 images that the steps normalise
on the device (preprocessing.image_dtype 'float32': normalised here instead).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from typing import Any, Iterator

import numpy as np

from pyramidnet_jax.data import source
from pyramidnet_jax.data.transforms import Preprocessing
from pyramidnet_jax.data.transforms import normalize

# Zero padding before the random crop. CIFAR: the paper's pad 4 + crop 32. Fashion-MNIST: pad 2 +
# crop 28 + flip is this project's choice (no paper recipe), scaled to the smaller image.
AUGMENTATION_PADDING = {'cifar': 4, 'fashion_mnist': 2}


# eq=False: field-wise == on arrays is ambiguous, and frozen+eq would make hashing fail.
@dataclasses.dataclass(frozen=True, eq=False)
class ArraySplit:
  """A split held in memory; process `process_index` of `process_count` gets its contiguous
  slice of every global batch (the processes' slices, in order, make up the global batch)."""
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int32 (N,)
  _: dataclasses.KW_ONLY
  preprocessing: Preprocessing
  name: str = 'in-memory'  # The dataset's name, for messages.
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f'images must be uint8 (N, H, W, C), got {self.images.dtype} '
                       f'{self.images.shape}.')
    if self.labels.dtype != np.int32 or self.labels.ndim != 1:
      raise ValueError(f'labels must be int32 (N,), got {self.labels.dtype} {self.labels.shape}.')
    if len(self.images) != len(self.labels):
      raise ValueError(f'{len(self.images)} images but {len(self.labels)} labels.')
    augmentation = self.preprocessing.augmentation
    if augmentation != 'none' and augmentation not in AUGMENTATION_PADDING:
      raise ValueError(f'An in-memory split takes augmentation {tuple(AUGMENTATION_PADDING)} or '
                       f'\'none\', got {augmentation!r}.')
    source.check_process(self.process_index, self.process_count)

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  def local_batch_size(self, batch_size: int) -> int:
    """This process's part of a global batch."""
    return source.local_batch_size(batch_size, self.process_count)

  def _local_slice(self, batch_size: int) -> slice:
    local = self.local_batch_size(batch_size)
    return slice(self.process_index * local, (self.process_index + 1) * local)

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full training batches per epoch; the remainder is dropped (a different one each epoch)."""
    self.local_batch_size(batch_size)
    steps = len(self) // batch_size
    if steps == 0:
      raise source.too_few_examples(self.name, len(self), batch_size)
    return steps

  def train_batch(self, batch_size: int, seed: int, epoch: int,
                  index: int) -> dict[str, np.ndarray]:
    """This process's part of training batch `index` of epoch `epoch`: a pure function of the
    arguments and the process. {'image': (B, H, W, C) uint8 pixels (or float32 normalised, see
    the module docstring), 'label': int32 (B,)}."""
    steps = self.steps_per_epoch(batch_size)
    if not 0 <= index < steps:
      raise ValueError(f'Batch index {index} is outside the epoch\'s {steps} batches.')
    seed, epoch = source.check_seed('seed', seed), source.check_seed('epoch', epoch)
    mine = self._local_slice(batch_size)
    chosen = _epoch_permutation(seed, epoch, len(self))[index * batch_size:(index + 1) * batch_size]
    images = self.images[chosen[mine]]
    augmentation = self.preprocessing.augmentation
    if augmentation != 'none':
      # Drawn for the whole global batch, so every process's slice is as in a one-process run.
      rng = np.random.default_rng([source.AUGMENTATION_STREAM, seed, epoch, index])
      padding = AUGMENTATION_PADDING[augmentation]
      top, left, flip = _crop_draws(batch_size, padding, rng)
      images = _crop_and_flip(images, padding, top[mine], left[mine], flip[mine])
    return {'image': self._batch_images(images), 'label': self.labels[chosen[mine]]}

  def _batch_images(self, images: np.ndarray) -> np.ndarray:
    if self.preprocessing.image_dtype == 'uint8':
      return images
    return normalize(images, self.preprocessing.mean, self.preprocessing.std)

  def train_batches(self, batch_size: int, seed: int, epoch: int, start_index: int = 0,
                    prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """train_batch(..., index) for index in [start_index, steps_per_epoch).

    Up to `prefetch` batches are built ahead in a background thread (0 builds them inline).
    """
    steps = self.steps_per_epoch(batch_size)
    source.check_start_index(start_index, steps)
    source.check_seed('seed', seed)
    source.check_seed('epoch', epoch)
    make = functools.partial(self.train_batch, batch_size, seed, epoch)
    # Returned rather than yielded from here, so bad arguments raise at the call, not at next().
    return _prefetched(make, range(start_index, steps), prefetch)

  def eval_steps(self, batch_size: int) -> int:
    self.local_batch_size(batch_size)
    return -(-len(self) // batch_size)

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order: this process's slice of global batches of exactly
    `batch_size` {'image', 'label', 'mask'}. The last is padded with zero images (black) and
    label 0; 'mask' (float32) is 1 for real examples, 0 for padding."""
    return self._eval_batches(batch_size, self._local_slice(batch_size))

  def _eval_batches(self, batch_size: int, mine: slice) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(self), batch_size):
      images = self.images[start:start + batch_size]
      labels = self.labels[start:start + batch_size]
      real = len(labels)
      mask = np.zeros(batch_size, dtype=np.float32)
      mask[:real] = 1.0
      if real < batch_size:
        padding = batch_size - real
        images = np.concatenate([images, np.zeros((padding,) + images.shape[1:], np.uint8)])
        labels = np.concatenate([labels, np.zeros(padding, np.int32)])
      yield {'image': self._batch_images(images[mine]), 'label': labels[mine],
             'mask': mask[mine]}


def random_crop_and_flip(images: np.ndarray, padding: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Zero-pads each side by `padding`, crops back to the input size at a random offset, and
  mirrors left-right with probability 1/2, independently per image.

  Works on uint8 before normalisation, like torchvision RandomCrop(padding) + RandomHorizontalFlip
  on the PIL image, so padded pixels become (0 - mean) / std after normalisation.
  """
  return _crop_and_flip(images, padding, *_crop_draws(len(images), padding, rng))


def _crop_draws(count: int, padding: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
  """(top, left, flip) of `count` images, in the order random_crop_and_flip draws them."""
  top = rng.integers(0, 2 * padding + 1, size=count)
  left = rng.integers(0, 2 * padding + 1, size=count)
  flip = rng.random(count) < 0.5
  return top, left, flip


def _crop_and_flip(images: np.ndarray, padding: int, top: np.ndarray, left: np.ndarray,
                   flip: np.ndarray) -> np.ndarray:
  # A loop over the batch with slices: several times faster than one fancy-indexing gather.
  count, height, width, channels = images.shape
  padded = np.zeros((count, height + 2 * padding, width + 2 * padding, channels), images.dtype)
  padded[:, padding:padding + height, padding:padding + width] = images
  out = np.empty_like(images)
  for i in range(count):
    crop = padded[i, top[i]:top[i] + height, left[i]:left[i] + width]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out


def _prefetched(make: Any, indices: range, prefetch: int) -> Iterator[dict[str, np.ndarray]]:
  if prefetch <= 0:
    for index in indices:
      yield make(index=index)
    return
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  pending = collections.deque()
  try:
    for index in indices:
      pending.append(executor.submit(make, index=index))
      if len(pending) > prefetch:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    # Also runs when the consumer stops early: drop the batches nobody will take.
    executor.shutdown(wait=True, cancel_futures=True)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  # Cached: every batch of an epoch needs the same permutation. Read-only, as it is shared.
  order = np.random.default_rng([source.PERMUTATION_STREAM, seed, epoch]).permutation(num_examples)
  order.flags.writeable = False
  return order


def split_validation(split: ArraySplit, fraction: float,
                     seed: int) -> tuple[ArraySplit, ArraySplit]:
  """(train, validation): round(fraction * n_c) random examples of each class c go to validation.

  Deterministic in `seed`; both parts keep the original example order and the split's other
  fields.
  """
  is_validation = stratified_hold_out(split.labels, fraction, seed)
  return (dataclasses.replace(split, images=split.images[~is_validation],
                              labels=split.labels[~is_validation]),
          dataclasses.replace(split, images=split.images[is_validation],
                              labels=split.labels[is_validation]))


def stratified_hold_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A boolean mask: round(fraction * n_c) random examples of each class c, seeded by `seed`."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'Validation fraction must be in (0, 1), got {fraction}.')
  rng = np.random.default_rng([source.VALIDATION_STREAM, source.check_seed('seed', seed)])
  is_validation = np.zeros(len(labels), dtype=bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = int(np.floor(fraction * len(members) + 0.5))
    is_validation[rng.permutation(members)[:count]] = True
  if not is_validation.any() or is_validation.all():
    raise ValueError(f'Validation fraction {fraction} of {len(labels)} examples leaves the '
                     'training or the validation split empty.')
  return is_validation
