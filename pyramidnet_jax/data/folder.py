"""Image-folder datasets (`folder:ROOT`): the user's image files, listed once and decoded by PIL
inside tf.data as an epoch reads them (FolderSplit).

Unreadable files. Nothing is decoded when the dataset is loaded (a scan of a large folder would
take as long as an epoch); a file is found unreadable when an epoch reaches it: PIL cannot open
or fully decode it (not an image, truncated, corrupt, vanished, no permission, too large).
bad_images='error': the batch that holds it raises a ValueError naming the file and PIL's reason,
before the training step on that batch (the CLI prints it as `error: ...`; nothing half-done is
saved, as checkpoints are only written between steps). bad_images='skip': the file is named in
a WARNING the first time a process meets it, and each epoch's skipped files are counted (and
named) in a WARNING when the epoch's batches are done. In training, the example is replaced by
the next readable file in this process's shard (in file order, wrapping around): a function of
the files alone, not of timing or threads, so an epoch is still a pure function of (seed, epoch)
and a resumed run sees the same batches. In evaluation it is masked out like padding, so it
counts in no metric (and no other example is counted twice). A shard without any readable file
is an error in both modes, and so is a class (or a whole split) none of whose files is readable,
in any process's shard: it is found when an epoch first meets one of its unreadable files (the
class's files are then tried in order until one reads), and named with what to fix, instead of
a run that trains without the class or evaluates nothing. A file larger than max_image_pixels
(width x height, from its header) is unreadable too, under the same policy.

Listing follows symbolic links only to files and folders inside their class folder that are not
listed already (images.list_image_files): a loop, a second name, or a link out of the class
folder is skipped, and the skipped links are counted and named in a WARNING.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np

from pyramidnet_jax.data import source
from pyramidnet_jax.data import streaming
from pyramidnet_jax.data import tf_import
from pyramidnet_jax.data import transforms
from pyramidnet_jax.data.arrays import stratified_hold_out
from pyramidnet_jax.data.images import DEFAULT_MAX_IMAGE_PIXELS
from pyramidnet_jax.data.images import IMAGE_EXTENSIONS
from pyramidnet_jax.data.images import UnreadableImageError
from pyramidnet_jax.data.images import list_image_files
from pyramidnet_jax.data.images import read_image
from pyramidnet_jax.data.transforms import Preprocessing

PREFIX = 'folder:'
LAYOUT = ('ROOT/train/<class>/<image files> and ROOT/val/<class>/<image files> (the same '
          'class subfolders in both; images of any size, in any format PIL reads)')
BAD_IMAGE_POLICIES = ('skip', 'error')


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSplit(streaming.StreamedSplit):
  """Image files of one split of an image-folder dataset, decoded as they are read.

  `paths` are sorted (class by class, then by path) and `labels[i]` is the class of `paths[i]`.
  Process `process_index` of `process_count` reads only files process_index, process_index +
  process_count, ... of that list (`shard_indices`): the shards are disjoint, cover the split,
  differ in size by at most 1, and each holds every class in its proportion. `len()` counts all
  files, over all processes. `image_shape` is the shape of the batches' images (RGB crops of
  preprocessing.image_size). `bad_images` ('skip' | 'error') says what an unreadable file does
  (see the module docstring), and max_image_pixels which files are too large to read.
  """
  name: str  # The dataset's name, 'folder:ROOT', for messages.
  directory: str  # ROOT/train or ROOT/val, for messages.
  paths: tuple[str, ...]
  labels: np.ndarray  # int32 (N,)
  _: dataclasses.KW_ONLY
  preprocessing: Preprocessing
  bad_images: str = 'skip'
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if len(self.paths) != len(self.labels):
      raise ValueError(f'{len(self.paths)} paths but {len(self.labels)} labels.')
    if self.bad_images not in BAD_IMAGE_POLICIES:
      raise ValueError(f'bad_images must be one of {BAD_IMAGE_POLICIES}, got '
                       f'{self.bad_images!r}.')
    self._check_streamed()
    if len(self.paths) < self.process_count:
      raise ValueError(f'The {len(self.paths)} images of {self.directory} cannot be shared by '
                       f'{self.process_count} processes.')

  def __len__(self) -> int:
    return len(self.paths)

  @property
  def resize_size(self) -> int:
    """Evaluation resizes the shorter side to this, then centre-crops image_size."""
    return self.preprocessing.resize_size

  def shard_indices(self, process_index: int | None = None) -> np.ndarray:
    """Indices into `paths` of a process's shard, in file order."""
    i = self.process_index if process_index is None else process_index
    return np.arange(i, len(self), self.process_count)

  def train_batches(self, batch_size: int, seed: int, epoch: int, start_index: int = 0,
                    prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Batches [start_index, steps) of the epoch, this process's part of each.

    The epoch reads this process's shard in an order shuffled by (seed, epoch, process); the
    example at position k gets stateless augmentation seeds (base, k), as in TfdsSplit. Resuming
    starts at position start_index * local batch size without reading what precedes it. Files
    are decoded in parallel (tf.data map; PIL releases the GIL while decoding), in order.
    """
    tf = tf_import.tensorflow()

    steps, seed, epoch = self._train_arguments(batch_size, seed, epoch, start_index)
    local_batch_size = self.local_batch_size(batch_size)
    process = self.process_index
    p = self.preprocessing
    augment = p.augmentation != 'none'
    order = np.random.default_rng([source.FOLDER_ORDER_STREAM, seed, epoch, process]).permutation(
        len(self.shard_indices()))
    positions = np.arange(start_index * local_batch_size, steps * local_batch_size)
    reader = _FolderReader(self, replace=True)
    seeds = streaming.AugmentationSeeds(seed, epoch, process)

    def transform(position, shard_position):
      image, label, status, path, reason = _read_example(reader, shard_position)
      if augment:
        image = transforms.random_resized_crop_transform(
            image, mean=p.mean, std=p.std, size=p.image_size, image_dtype=p.image_dtype,
            **seeds.transform_kwargs(position, p))
      else:
        image = transforms.streamed_eval_transform(image, p.mean, p.std, p.image_size,
                                                   p.resize_size, p.image_dtype)
      return {'image': image, 'label': label, 'status': status, 'path': path, 'reason': reason}

    dataset = tf.data.Dataset.from_tensor_slices((positions, order[positions]))
    dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local_batch_size, drop_remainder=True)
    dataset = dataset.prefetch(max(prefetch, 1))
    return _checked_batches(dataset, self, f'Training epoch {epoch}', evaluation=False)

  def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every file once, in file order: this process's shard in batches of batch_size /
    process_count with a 'mask', padded to eval_steps batches on every process. An unreadable
    file is, with bad_images='skip', masked out like padding (and named in the log), or with
    'error' a ValueError naming it."""
    tf = tf_import.tensorflow()

    num_batches = self.eval_steps(batch_size)
    local_batch_size = self.local_batch_size(batch_size)
    p = self.preprocessing
    reader = _FolderReader(self, replace=False)

    def transform(shard_position):
      image, label, status, path, reason = _read_example(reader, shard_position)
      image = transforms.streamed_eval_transform(image, p.mean, p.std, p.image_size,
                                                 p.resize_size, p.image_dtype)
      return {'image': image, 'label': label, 'status': status, 'path': path, 'reason': reason}

    dataset = tf.data.Dataset.range(len(self.shard_indices()))
    dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local_batch_size).prefetch(2)
    batches = _checked_batches(dataset, self, 'Evaluation', evaluation=True)
    return streaming.padded_eval_batches(batches, num_batches, local_batch_size,
                                         self.image_shape, p.padding_pixel)


_OK, _UNREADABLE, _NONE_READABLE, _CLASS_UNREADABLE, _SPLIT_UNREADABLE = range(5)
_PLACEHOLDER_IMAGE = np.zeros((1, 1, 3), np.uint8)  # Stands for an unreadable file's pixels.


class _FolderReader:
  """tf.numpy_function body: position k in this process's shard -> the decoded file.

  Returns (uint8 (H, W, 3) image, int32 label, int32 status, path, reason): status _OK, or
  _UNREADABLE with the unreadable file's path and PIL's reason (the image then is the next
  readable file's, with its label, when `replace`; else a 1x1 placeholder), or _NONE_READABLE
  (nothing in the shard reads), or _CLASS_UNREADABLE / _SPLIT_UNREADABLE when no file of the
  unreadable file's class / of the split reads (with that class's label and its first file).
  """

  def __init__(self, split: FolderSplit, replace: bool):
    self.paths = split.paths
    self.labels = split.labels
    self.shard = split.shard_indices()
    self.replace = replace and split.bad_images == 'skip'
    self.max_pixels = split.max_image_pixels
    self._class_checks: dict[int, tuple[bool, bytes, bytes]] = {}
    self._lock = threading.Lock()  # tf.data calls the reader from several threads.

  def _read(self, i: int) -> np.ndarray:
    return read_image(self.paths[i], max_pixels=self.max_pixels)

  def _class_check(self, label: int) -> tuple[bool, bytes, bytes]:
    """(whether a file of class `label` reads, its first file's path and reason if none does),
    over the whole split: files are tried in order until one reads, once per epoch."""
    with self._lock:  # Holding it spares other threads the same reads.
      if label not in self._class_checks:
        first = None
        for i in np.flatnonzero(self.labels == label):
          try:
            self._read(int(i))
            self._class_checks[label] = (True, b'', b'')
            break
          except UnreadableImageError as e:
            first = first or (e.path.encode(), e.reason.encode())
        else:
          self._class_checks[label] = (False, *first)
      return self._class_checks[label]

  def _whole_class_or_split(self, label: int) -> tuple[Any, ...] | None:
    """The status tuple when no file of class `label` reads, else None."""
    readable, path, reason = self._class_check(label)
    if readable:
      return None
    classes = np.unique(self.labels)
    if not any(self._class_check(int(c))[0] for c in classes):
      _, path, reason = self._class_check(int(classes[0]))
      return _PLACEHOLDER_IMAGE, np.int32(classes[0]), np.int32(_SPLIT_UNREADABLE), path, reason
    return _PLACEHOLDER_IMAGE, np.int32(label), np.int32(_CLASS_UNREADABLE), path, reason

  def __call__(self, position: Any) -> tuple[Any, ...]:
    k = int(position)
    i = int(self.shard[k])
    try:
      return self._read(i), self.labels[i], np.int32(_OK), b'', b''
    except UnreadableImageError as e:
      path, reason = e.path.encode(), e.reason.encode()
    whole = self._whole_class_or_split(int(self.labels[i]))
    if whole is not None:
      return whole
    if not self.replace:
      return _PLACEHOLDER_IMAGE, self.labels[i], np.int32(_UNREADABLE), path, reason
    for step in range(1, len(self.shard)):
      j = int(self.shard[(k + step) % len(self.shard)])
      try:
        return self._read(j), self.labels[j], np.int32(_UNREADABLE), path, reason
      except UnreadableImageError:
        continue
    return _PLACEHOLDER_IMAGE, self.labels[i], np.int32(_NONE_READABLE), path, reason


def _read_example(reader: _FolderReader, position: Any) -> tuple[Any, ...]:
  tf = tf_import.tensorflow()

  image, label, status, path, reason = tf.numpy_function(
      reader, [position], [tf.uint8, tf.int32, tf.int32, tf.string, tf.string], stateful=False)
  image.set_shape((None, None, 3))
  for scalar in (label, status, path, reason):
    scalar.set_shape(())
  return image, label, status, path, reason


_warned_unreadable: set[str] = set()  # Files this process has named in a warning already.
_warned_lock = threading.Lock()


def _checked_batches(dataset: Any, split: FolderSplit, what: str,
                     evaluation: bool) -> Iterator[dict[str, np.ndarray]]:
  """The numpy batches, with unreadable files handled per split.bad_images (module docstring).

  Evaluation batches get a float32 'valid' entry, 0 for an unreadable (masked-out) example.
  """
  skipped = []
  action = ('masked out of the metrics' if evaluation else
            'replaced by the next readable file of this process\'s shard')
  try:
    for batch in dataset.as_numpy_iterator():
      status = batch.pop('status')
      paths, reasons = batch.pop('path'), batch.pop('reason')
      for b in np.flatnonzero(status != _OK):
        path, reason = paths[b].decode(errors='replace'), reasons[b].decode(errors='replace')
        if status[b] in (_CLASS_UNREADABLE, _SPLIT_UNREADABLE):
          raise _unreadable_class_or_split(split, status[b], batch['label'][b], path, reason,
                                           evaluation)
        if status[b] == _NONE_READABLE:
          raise ValueError(f'No file of {split.directory} in process {split.process_index}\'s '
                           f'shard is a readable image (the first: {path}: {reason}).')
        if split.bad_images == 'error':
          raise ValueError(
              f'Cannot read image file {path}: {reason}. Fix or delete it, or pass '
              '--config.bad_images=skip to skip unreadable files (each is named in the log).')
        skipped.append(path)
        with _warned_lock:
          first = path not in _warned_unreadable
          _warned_unreadable.add(path)
        if first:
          logging.warning('Skipping unreadable image file %s (%s); %s.', path, reason, action)
      batch = {'image': batch['image'], 'label': batch['label']}
      if evaluation:
        batch['valid'] = (status == _OK).astype(np.float32)
      yield batch
  finally:
    if skipped:
      shown = ', '.join(skipped[:10]) + (', ...' if len(skipped) > 10 else '')
      logging.warning('%s of %s (process %d): skipped %d unreadable image file(s), %s: %s.',
                      what, split.directory, split.process_index, len(skipped), action, shown)


def _unreadable_class_or_split(split: FolderSplit, status: int, label: int, path: str,
                               reason: str, evaluation: bool) -> ValueError:
  if status == _SPLIT_UNREADABLE:
    return ValueError(f'None of the {len(split)} image files of {split.directory} is readable '
                      f'(the first: {path}: {reason}). Fix or replace them, or point '
                      f'--config.dataset at the right folder ({LAYOUT}).')
  name = os.path.relpath(path, split.directory).split(os.sep)[0]
  count = int(np.sum(split.labels == label))
  fix = ('delete them (a class folder of val/ may be empty)'
         if os.path.basename(split.directory) == 'val' else
         f'remove the folder {name} from both train/ and val/ to train without the class')
  return ValueError(f'Every one of the {count} image files of class {name!r} in '
                    f'{split.directory} is unreadable (the first: {path}: {reason}), so '
                    f'{"evaluation" if evaluation else "training"} would go on without the '
                    f'class. Fix or replace them, or {fix}.')


def load(spec: str, validation_fraction: float, validation_seed: int, process_index: int,
         process_count: int, image_size: int, bad_images: str,
         max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
         image_dtype: str = 'float32') -> source.Dataset:
  """`folder:ROOT`: the user's images in ROOT/train/<class>/ and ROOT/val/<class>/.

  Classes are the sorted subfolder names of ROOT/train (ROOT/val must have the same); files are
  found recursively below each class folder and kept if their extension is an image format's
  (IMAGE_EXTENSIONS), sorted by path, each once (images.list_image_files). Nothing is decoded or
  written here: listing a large folder costs one directory walk. Test split: ROOT/val.
  config.validation_fraction holds out a stratified random part of ROOT/train (seeded by
  validation_seed), as for in-memory datasets. Transforms: ImageNet's, at `image_size`
  (random-resized crop + flip; eval resize + centre crop), with ImageNet's mean and std, in
  batches of `image_dtype` images (transforms.streamed_image_dtype).
  """
  root = os.path.expanduser(spec[len(PREFIX):])
  if not root:
    raise ValueError(f'{PREFIX} needs a directory: --config.dataset={PREFIX}ROOT with {LAYOUT}.')
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root!r} does not exist or is not a directory. '
                            f'Expected {LAYOUT}.')
  directories = {split: os.path.join(root, split) for split in ('train', 'val')}
  for directory in directories.values():
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'{directory!r} is missing: an image folder needs {LAYOUT}.')
  classes = {split: _class_folders(directory) for split, directory in directories.items()}
  if not classes['train']:
    raise FileNotFoundError(f'{directories["train"]!r} has no class subfolders. Expected '
                            f'{LAYOUT}.')
  if classes['train'] != classes['val']:
    only_train = sorted(set(classes['train']) - set(classes['val']))
    only_val = sorted(set(classes['val']) - set(classes['train']))
    raise ValueError(
        f'The class subfolders of {directories["train"]!r} and {directories["val"]!r} differ: '
        f'only in train/: {only_train or "none"}; only in val/: {only_val or "none"}. Both must '
        'hold the same class folders (an empty one is allowed in val/).')
  class_names = classes['train']
  seen = (set(), set())  # No file is listed twice: not in two classes, nor in train and val.
  listed = {split: _list_images(directory, class_names, seen)
            for split, directory in directories.items()}
  paths, labels = listed['train']
  empty = [c for i, c in enumerate(class_names) if not np.any(labels == i)]
  if empty:
    raise ValueError(f'These class folders of {directories["train"]!r} hold no image files '
                     f'({", ".join(IMAGE_EXTENSIONS[:6])}, ...): {empty}.')
  if not listed['val'][0]:
    raise ValueError(f'{directories["val"]!r} holds no image files in its class folders.')
  preprocessing = transforms.imagenet_preprocessing(image_size, image_dtype)

  def make(directory, paths, labels):
    return FolderSplit(spec, directory, paths, labels, preprocessing=preprocessing,
                       bad_images=bad_images, max_image_pixels=max_image_pixels,
                       process_index=process_index,
                       process_count=process_count)
  validation = None
  if validation_fraction > 0.0:
    held_out = stratified_hold_out(labels, validation_fraction, validation_seed)
    kept = np.flatnonzero(~held_out)
    validation = make(directories['train'], tuple(paths[i] for i in np.flatnonzero(held_out)),
                      labels[held_out])
    paths, labels = tuple(paths[i] for i in kept), labels[kept]
  return source.Dataset(
      name=spec, train=make(directories['train'], paths, labels),
      test=make(directories['val'], *listed['val']), validation=validation,
      num_classes=len(class_names), class_names=class_names, preprocessing=preprocessing)


def _class_folders(directory: str) -> tuple[str, ...]:
  """Sorted names of the subfolders (hidden ones excepted): the classes."""
  with os.scandir(directory) as entries:
    return tuple(sorted(e.name for e in entries
                        if e.is_dir() and not e.name.startswith('.')))


def _list_images(directory: str, class_names: Sequence[str],
                 seen: tuple[set[str], set[str]]) -> tuple[tuple[str, ...], np.ndarray]:
  """(paths, int32 labels) of the image files below directory/<class>/, class by class, sorted."""
  paths, labels, ignored, skipped = [], [], [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(directory, name)
    if not os.path.isdir(class_dir):  # Only possible in val/ (an absent folder = no images).
      continue
    found, others, skipped_here = list_image_files(class_dir, seen)
    paths += found
    labels += [label] * len(found)
    ignored += others
    skipped += skipped_here
  if ignored:
    logging.warning('Ignored %d file(s) in %s whose extension is not an image format\'s, e.g. %s.',
                    len(ignored), directory, ', '.join(sorted(ignored)[:3]))
  if skipped:
    logging.warning(
        'Skipped %d symbolic link(s) or folder(s) in %s that would list a file twice or lead out '
        'of their class folder (a dataset lists each file once, from inside its class folder: '
        'copy a file there to list it): %s%s.',
        len(skipped), directory, '; '.join(f'{path} ({why})' for path, why in skipped[:5]),
        '; ...' if len(skipped) > 5 else '')
  return tuple(paths), np.asarray(labels, np.int32)
