"""Convert weights between the authors' PyTorch checkpoints and ours, in both directions.

  python -m pyramidnet_jax.convert --checkpoint=pyramidnet101_a360.pth --out=models/pyr101
  python -m pyramidnet_jax.convert --checkpoint=runs/demo --out=demo.pth

A .pth file becomes a model directory that `pyramidnet_jax.load` and `predict` read, the network
inferred from its tensor shapes; a training workdir or model directory becomes a bare state_dict
that the authors' code loads (pyramidnet_jax/interop/torch_weights.py).
"""

from __future__ import annotations

import warnings

from pyramidnet_jax import cli
from pyramidnet_jax.interop import torch_weights
from pyramidnet_jax.training import storage


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  # torch.load warns about pickle protocols on its way to the error that says what to do.
  warnings.filterwarnings('ignore', category=UserWarning, module=r'torch\.')
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if storage.isdir(FLAGS.checkpoint):  # A local or gs:// workdir or model directory.
    cli.check_metadata(FLAGS.checkpoint)
    info = torch_weights.convert_to_torch_file(FLAGS.checkpoint, FLAGS.out)
    print(f'wrote {info["out"]}: a PyTorch state_dict of {info["model"]["name"]} '
          f'depth {info["model"]["depth"]}, {info["num_classes"]} classes.')
  else:
    info = torch_weights.convert_torch_file(FLAGS.checkpoint, FLAGS.out, FLAGS.dataset or None,
                                            FLAGS.allow_pickle, FLAGS.class_names or None)
    model = info['model']
    extra = (f' alpha {model["alpha"]} ({model["widening"]}, {model["rounding"]})'
             if model['name'] == 'pyramidnet' else '')
    print(f'wrote {FLAGS.out}: {model["name"]} depth {model["depth"]}{extra}, '
          f'{model["stem"]} stem, {info["num_classes"]} classes, {info["num_params"]:,} '
          'parameters.')


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('checkpoint', None, 'A PyTorch checkpoint file (to convert to ours), or a '
                      'training workdir / model directory (to convert to PyTorch).')
  flags.DEFINE_string('out', None, 'Output: a new model directory, or a new .pth file.')
  flags.DEFINE_string('dataset', '', 'Dataset whose eval transform and class names predict '
                      'should use (default: imagenet2012 for 1000-class ImageNet-stem nets).')
  flags.DEFINE_string('class_names', '', 'A text file with one class name per line, in label '
                      'order (default: the dataset\'s names; ImageNet\'s are WordNet IDs).')
  flags.DEFINE_bool('allow_pickle', False, 'Unpickle arbitrary Python objects in the file '
                    '(only for files you trust).')
  flags.mark_flags_as_required(['checkpoint', 'out'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  # ImportError: PyTorch missing for a .pth file.
  app.run(cli.run(main, expected=(ImportError,)), flags_parser=cli.parse_flags)
