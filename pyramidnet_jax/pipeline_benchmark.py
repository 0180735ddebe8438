"""Input-pipeline throughput: images per second of the data pipeline alone, with no model.

  python -m pyramidnet_jax.pipeline_benchmark --config=configs/fashion_mnist_demo.py
  python -m pyramidnet_jax.pipeline_benchmark --config=configs/imagenet_200_a300.py \
      --config.data_dir=DIR --batches=100 --split=test
  python -m pyramidnet_jax.pipeline_benchmark --config=configs/imagenet_200_a300.py \
      --config.dataset=folder:/data/my_images --config.batch_size=64

Builds the batches a run would get (`--split=train`: the training split's train_batches with
config.batch_size, config.augment and the colour options, from epoch --epoch on; `test` or
`validation`: that split's eval_batches with config.eval_batch_size) and times each one as the
training loop asks for it. After --warmup untimed batches (the first ones start threads and trace
tf.data functions), prints the median images/s over --batches timed batches (batch size / median
time per batch) and the overall rate (timed images / timed seconds). The pipeline is measured for
one process: --process_index of --process_count, whose part of each global batch is batch_size /
process_count (a streamed dataset reads only that process's shard).

Input bounds a run when this rate is not well above the training step's images/s on the same
machine (`python -m pyramidnet_jax.benchmark`, or images per epoch / epoch time in a run's log):
then raise the host's CPU count or lower the decoding cost (smaller images on disk), not the GPU.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pyramidnet_jax import cli
from pyramidnet_jax import data
from pyramidnet_jax.training import config_checks

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_enum('split', 'train', ['train', 'test', 'validation'], 'Which batches to time.')
flags.DEFINE_integer('batches', 50, 'Timed batches.', lower_bound=1)
flags.DEFINE_integer('warmup', 5, 'Untimed batches before them.', lower_bound=0)
flags.DEFINE_integer('epoch', 0, 'Training epoch to start from (its order and augmentation).',
                     lower_bound=0)
flags.DEFINE_integer('process_index', 0, 'The process whose part of each batch is built.',
                     lower_bound=0)
flags.DEFINE_integer('process_count', 1, 'The number of processes.',
                     lower_bound=1)
flags.mark_flags_as_required(['config'])


def batch_stream(dataset: data.Dataset, config, split: str, epoch: int):
  """Batches without end: training epochs one after another, or evaluation passes repeated."""
  if split == 'train':
    while True:
      yield from dataset.train.train_batches(config.batch_size, config.seed, epoch)
      epoch += 1
  examples = dataset.test if split == 'test' else dataset.validation
  if examples is None:
    raise ValueError('--split=validation needs a validation split: set '
                     '--config.validation_fraction (e.g. 0.1).')
  while True:
    yield from examples.eval_batches(config.eval_batch_size)


def measure(config, split: str = 'train', batches: int = 50, warmup: int = 5, epoch: int = 0,
            process_index: int = 0, process_count: int = 1) -> dict[str, float]:
  """Loads config's dataset and times `batches` batches after `warmup`; returns the figures."""
  start = time.perf_counter()
  dataset = data.load_dataset(config, process_index, process_count)
  load_s = time.perf_counter() - start
  stream = batch_stream(dataset, config, split, epoch)
  times, sizes = [], []
  first_s = None
  for i in range(warmup + batches):
    start = time.perf_counter()
    batch = next(stream)
    elapsed = time.perf_counter() - start
    if i == 0:
      first_s = elapsed
    if i >= warmup:
      times.append(elapsed)
      sizes.append(len(batch['label']))
  stream.close()
  median = statistics.median(times)
  if split == 'train':
    per_pass = dataset.train.steps_per_epoch(config.batch_size)
  else:
    examples = dataset.test if split == 'test' else dataset.validation
    per_pass = examples.eval_steps(config.eval_batch_size)
  return {
      'dataset': dataset.name, 'split': split, 'batch_size': sizes[0], 'batches_per_pass': per_pass,
      'image_shape': tuple(batch['image'].shape[1:]), 'batches': batches, 'warmup': warmup,
      'load_s': load_s, 'first_batch_s': first_s, 'median_batch_s': median,
      'median_images_per_s': sizes[0] / median, 'total_images': sum(sizes),
      'total_s': sum(times), 'total_images_per_s': sum(sizes) / sum(times),
  }


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form '
                     '--name=value.')
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  config_checks.validate(config)
  if FLAGS.process_index >= FLAGS.process_count:
    raise ValueError(f'--process_index={FLAGS.process_index} must be below --process_count='
                     f'{FLAGS.process_count}.')
  result = measure(config, FLAGS.split, FLAGS.batches, FLAGS.warmup, FLAGS.epoch,
                   FLAGS.process_index, FLAGS.process_count)
  augment = (f', augment={config.augment}' if FLAGS.split == 'train' else '')
  print(f'{result["dataset"]} {result["split"]} pipeline{augment}: batches of '
        f'{result["batch_size"]} x {result["image_shape"]}; loaded in {result["load_s"]:.1f}s, '
        f'first batch {result["first_batch_s"]:.2f}s')
  print(f'median {result["median_images_per_s"]:,.0f} images/s '
        f'({1000 * result["median_batch_s"]:.1f} ms per batch) over {result["batches"]} batches '
        f'after {result["warmup"]} warm-up; total {result["total_images"]} images in '
        f'{result["total_s"]:.2f}s = {result["total_images_per_s"]:,.0f} images/s')
  if result['batches_per_pass'] < result['warmup'] + result['batches']:
    print(f'note: a pass over the split is {result["batches_per_pass"]} batches; each new pass '
          'restarts the pipeline inside the timed batches, which lowers the rates.')


if __name__ == '__main__':
  app.run(cli.run(main), flags_parser=cli.parse_flags)
