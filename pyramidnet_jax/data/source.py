"""What every data source provides: the `Split` protocol, the `Dataset` record, and the helpers
every source shares (process batch sizes, seed checks, derived seeds).

Every split is deterministic: batch `index` of epoch `epoch` is a pure function of (seed, epoch,
index, process), so a run resumed at step k sees exactly the batches an uninterrupted run would
have seen. Recipes: docs/architecture.md#training-recipes.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np

from pyramidnet_jax.data.transforms import Preprocessing

# Leading words of the numpy seed sequences, one per use. SeedSequence pads short entropy with
# zeros, so [seed, epoch] and [seed, epoch, 0] would give the same stream without them. Changing a
# value changes every batch of every run.
PERMUTATION_STREAM = 1
AUGMENTATION_STREAM = 2
VALIDATION_STREAM = 3
FILE_ORDER_STREAM = 4
EXAMPLE_ORDER_STREAM = 5
CROP_STREAM = 6
FLIP_STREAM = 7
JITTER_STREAM = 8
LIGHTING_STREAM = 9
FOLDER_ORDER_STREAM = 10


class Split(Protocol):
  """One split of a dataset as training and evaluation use it; every implementation is
  deterministic: batch `index` of epoch `epoch` is a pure function of (seed, epoch, index,
  process)."""
  name: str  # The dataset's name, for messages.
  preprocessing: Preprocessing
  process_index: int
  process_count: int

  def __len__(self) -> int:
    """Examples in the whole split, over all processes."""

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(H, W, C) of the batches' images."""

  def steps_per_epoch(self, batch_size: int) -> int:
    """Training batches per epoch for a global `batch_size`; the same on every process;
    ValueError if the split holds less than one batch."""

  def train_batches(self, batch_size: int, seed: int, epoch: int, start_index: int = 0,
                    prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """This process's part (batch_size // process_count examples) of global batches
    [start_index, steps_per_epoch): {'image', 'label': int32}, the images of
    preprocessing.image_dtype: uint8 pixels, normalised by the jitted steps on the device, or
    float32 normalised here."""

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once: this process's part of padded global batches, with 'mask' (float32,
    1 real / 0 padding); the same number of batches (eval_steps) on every process."""

  def eval_steps(self, batch_size: int) -> int:
    """The number of batches eval_batches yields for a global `batch_size`."""


# eq=False: field-wise == on arrays is ambiguous, and frozen+eq would make hashing fail.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A dataset's splits, classes and preprocessing, as load_dataset returns them."""
  name: str
  train: Split
  test: Split
  validation: Split | None
  num_classes: int
  class_names: tuple[str, ...]
  preprocessing: Preprocessing  # The same as every split's.

  def __post_init__(self):
    for part in ('train', 'test', 'validation'):
      split = getattr(self, part)
      if split is not None and split.preprocessing != self.preprocessing:
        raise ValueError(f'The {part} split of {self.name} has preprocessing '
                         f'{split.preprocessing}, the dataset {self.preprocessing}.')

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(H, W, C) of the images in this dataset's batches."""
    return self.train.image_shape

  @property
  def mean(self) -> tuple[float, ...]:
    return self.preprocessing.mean

  @property
  def std(self) -> tuple[float, ...]:
    return self.preprocessing.std

  def splits(self) -> dict[str, Split]:
    """{'train', 'test', and 'validation' if there is one: the split}."""
    parts = {'train': self.train, 'test': self.test, 'validation': self.validation}
    return {part: split for part, split in parts.items() if split is not None}

  def replace_splits(self, **changes) -> Dataset:
    """The dataset with `changes` (split fields) made to every split."""
    return self._replace(changes)

  def with_preprocessing(self, **changes) -> Dataset:
    """The dataset with `changes` (Preprocessing fields) made to its and every split's
    preprocessing, e.g. with_preprocessing(augmentation='none')."""
    preprocessing = dataclasses.replace(self.preprocessing, **changes)
    return self._replace({'preprocessing': preprocessing}, preprocessing=preprocessing)

  def _replace(self, split_changes: dict, **changes) -> Dataset:
    return dataclasses.replace(self, **changes, **{
        part: dataclasses.replace(split, **split_changes)
        for part, split in self.splits().items()})


def local_batch_size(batch_size: int, process_count: int) -> int:
  """This process's part of a global batch; ValueError unless it divides evenly."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if batch_size % process_count:
    raise ValueError(f'The global batch size {batch_size} must be divisible by the '
                     f'{process_count} processes that read it.')
  return batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside [0, {process_count}).')


def check_start_index(start_index: int, steps: int) -> None:
  if not 0 <= start_index <= steps:
    raise ValueError(f'start_index {start_index} is outside [0, {steps}].')


def too_few_examples(name: str, num_examples: int, batch_size: int) -> ValueError:
  return ValueError(f'The {name} training split has {num_examples} examples, fewer than one '
                    f'batch of {batch_size}.')


def check_seed(name: str, value: int) -> int:
  # numpy seed sequences need non-negative integers.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f'{name} must be a non-negative integer, got {value!r}.')
  return int(value)


def derived_seed(*words: int) -> int:
  """A seed in [0, 2**31) that is a pure function of `words` (the first names the use)."""
  return int(np.random.SeedSequence(list(words)).generate_state(1)[0] >> 1)
