"""Classify image files with a trained or converted network.

  python -m pyramidnet_jax.predict --workdir=runs/demo shirt.png boots/
  python -m pyramidnet_jax.predict --workdir=models/pyr101 --top_k=3 photos/

Arguments are image files or folders (searched recursively). Each image goes through the eval
transform of the data the network was trained on (pyramidnet_jax/evaluation/classifier.py). A
file that cannot be read as an image gets a one-line error naming it; the others are still
classified, and the exit status is 1.
"""

from __future__ import annotations

import json
import sys

from pyramidnet_jax import cli
from pyramidnet_jax import data
from pyramidnet_jax.evaluation import classifier
from pyramidnet_jax.interop import loading


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  logging.set_verbosity(logging.WARNING)
  cli.set_up_platform()
  cli.enable_compilation_cache(FLAGS.compilation_cache_dir)
  if len(argv) < 2:
    sys.exit('error: give image files or folders to classify, e.g. '
             'python -m pyramidnet_jax.predict --workdir=runs/demo photo.png photos/')
  # Expected failures (a missing or damaged workdir, a bad flag) become one line in cli.run.
  cli.check_metadata(FLAGS.workdir)
  loaded = loading.load_info(FLAGS.workdir, FLAGS.which)
  if FLAGS.dataset:
    loaded.dataset = FLAGS.dataset
    loaded.class_names = loading.class_names_of(FLAGS.dataset, loaded.num_classes)
  results, errors = classifier.predict(loaded, argv[1:], FLAGS.top_k, FLAGS.batch_size,
                                       FLAGS.max_image_pixels)
  for result in results:
    if FLAGS.json:
      print(json.dumps(result))
    else:
      print(f'{result["path"]}: ' + ', '.join(f'{name} {p:.3f}' for name, p in result['top']))
  for error in errors:
    print(f'error: {error}', file=sys.stderr)
  if not results and not errors:
    sys.exit(f'error: no image files found in {" ".join(argv[1:])} '
             f'(looked for {", ".join(data.IMAGE_EXTENSIONS)}).')
  if errors:
    sys.exit(1)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A training workdir or a converted model directory.')
  flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'A workdir\'s checkpoint to use.')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.DEFINE_string('dataset', '', 'Override the dataset whose transform and class names to '
                      'use (fashion_mnist, cifar10, cifar100, imagenet2012).')
  flags.DEFINE_integer('max_image_pixels', classifier.DEFAULT_MAX_IMAGE_PIXELS,
                       'Larger images (width x height, from the file\'s header) are not decoded '
                       'but reported as errors: a guard against decompression bombs.',
                       lower_bound=1)
  flags.DEFINE_bool('json', False, 'Print one JSON object per image.')
  flags.DEFINE_string('compilation_cache_dir', cli.DEFAULT_CACHE_DIR,
                      'Persistent XLA cache (\'\' turns it off): the second run starts faster.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(cli.run(main), flags_parser=cli.parse_flags)
