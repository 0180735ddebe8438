"""What the two streamed sources (TFDS ImageNet, image folders) share: process shards and batch
counts, per-example augmentation seeds, padded eval batches and numpy conversion.

The epoch's order and every example's augmentation are a pure function of (seed, epoch, process),
and batch `index` of an epoch is the same whether the epoch is read from the start or resumed at
`start_index`.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from pyramidnet_jax.data import source
from pyramidnet_jax.data import tf_import
from pyramidnet_jax.data.transforms import Preprocessing


class StreamedSplit:
  """Methods shared by streamed splits, which have `name`, `preprocessing`, `process_index`,
  `process_count` and `__len__`, and whose processes each read a shard of the split."""

  def _check_streamed(self) -> None:
    source.check_process(self.process_index, self.process_count)
    if self.preprocessing.image_size is None:
      raise ValueError('A streamed split needs preprocessing.image_size.')
    if self.preprocessing.augmentation not in ('imagenet', 'none'):
      raise ValueError(f'A streamed split takes augmentation \'imagenet\' or \'none\', got '
                       f'{self.preprocessing.augmentation!r}.')

  @property
  def num_examples(self) -> int:
    return len(self)

  @property
  def image_shape(self) -> tuple[int, ...]:
    size = self.preprocessing.image_size
    return (size, size, 3)

  @property
  def min_shard_size(self) -> int:
    return len(self) // self.process_count

  @property
  def max_shard_size(self) -> int:
    return -(-len(self) // self.process_count)

  def local_batch_size(self, batch_size: int) -> int:
    """This process's part of a global batch."""
    return source.local_batch_size(batch_size, self.process_count)

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full training batches per epoch; the remainder is dropped (a different one each epoch).
    Every process takes the same number of steps: as many as its smallest shard allows."""
    steps = self.min_shard_size // self.local_batch_size(batch_size)
    if steps == 0:
      raise source.too_few_examples(self.name, len(self), batch_size)
    return steps

  def eval_steps(self, batch_size: int) -> int:
    """Enough batches for the largest shard, the same count on every process."""
    return -(-self.max_shard_size // self.local_batch_size(batch_size))

  def _train_arguments(self, batch_size: int, seed: int, epoch: int,
                       start_index: int) -> tuple[int, int, int]:
    """(steps, seed, epoch), checked: bad arguments raise at the call, not at next()."""
    steps = self.steps_per_epoch(batch_size)
    source.check_start_index(start_index, steps)
    return steps, source.check_seed('seed', seed), source.check_seed('epoch', epoch)


class AugmentationSeeds:
  """Stateless per-example seeds of one (seed, epoch, process): [base, position] per use."""

  def __init__(self, seed: int, epoch: int, process: int):
    self.crop = source.derived_seed(source.CROP_STREAM, seed, epoch, process)
    self.flip = source.derived_seed(source.FLIP_STREAM, seed, epoch, process)
    self.jitter = source.derived_seed(source.JITTER_STREAM, seed, epoch, process)
    self.lighting = source.derived_seed(source.LIGHTING_STREAM, seed, epoch, process)

  def transform_kwargs(self, position: Any, preprocessing: Preprocessing) -> dict[str, Any]:
    """The train transform's seed and colour arguments for the example at `position`."""
    tf = tf_import.tensorflow()

    def seed(base):
      return tf.stack([tf.constant(base, tf.int64), tf.cast(position, tf.int64)])
    return dict(crop_seed=seed(self.crop), flip_seed=seed(self.flip),
                color_jitter=preprocessing.color_jitter, pca_lighting=preprocessing.pca_lighting,
                jitter_seed=seed(self.jitter), lighting_seed=seed(self.lighting))


def padded_eval_batches(batches: Iterator[dict[str, np.ndarray]], num_batches: int,
                        batch_size: int, image_shape: tuple[int, ...],
                        padding_pixel: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """`num_batches` batches of `batch_size` with a mask, padded as in-memory eval batches are.

  A batch's optional 'valid' entry (1 = real example) masks out examples inside it, whose
  images become padding too. `padding_pixel` (Preprocessing.padding_pixel) has the batches'
  image dtype.
  """
  try:
    for _ in range(num_batches):
      batch = next(batches, None)
      real = 0 if batch is None else len(batch['label'])
      mask = np.zeros(batch_size, np.float32)
      if real:
        mask[:real] = batch.get('valid', 1.0)
      if real < batch_size or not mask.all():
        # Padding looks like a black image after normalisation, as in the in-memory path.
        images = np.empty((batch_size,) + tuple(image_shape), padding_pixel.dtype)
        images[...] = padding_pixel
        labels = np.zeros(batch_size, np.int32)
        if real:
          images[:real] = batch['image']
          labels[:real] = batch['label']
          images[mask == 0] = padding_pixel
        batch = {'image': images, 'label': labels}
      yield {'image': batch['image'], 'label': batch['label'], 'mask': mask}
  finally:
    close = getattr(batches, 'close', None)
    if close is not None:
      close()  # Finishes the source now (e.g. its log of skipped files), not at garbage collection.


def numpy_batches(dataset: Any) -> Iterator[dict[str, np.ndarray]]:
  """A tf.data dataset of {'image', 'label', ...} batches as numpy {'image', 'label'}."""
  for batch in dataset.as_numpy_iterator():
    yield {'image': batch['image'], 'label': batch['label']}
