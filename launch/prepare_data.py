"""Puts the dataset of a training config on this machine, so that `pyramidnet_jax.main` finds it.

  python launch/prepare_data.py --config=configs/cifar10_110_a48.py [--config.<field>=value ...]

The training pipeline never downloads; this script does, once, on a machine with internet:
  fashion_mnist  `apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/
                 fashion-mnist), only when the files are missing; with sudo when not root.
  cifar10/100    the TFDS build (about 170 MB download) into config.data_dir or the TFDS default
                 (~/tensorflow_datasets, or $TFDS_DATA_DIR), when not prepared yet.
  imagenet2012   checked only: TFDS needs the ILSVRC2012 tar files downloaded by hand.
  anything else  nothing to do (e.g. an image folder already on disk).
Arguments other than --config and --config.* (e.g. --workdir) are ignored, so the launchers pass
the training command's arguments unchanged. Exit status 0 when the data is ready.
"""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # configs/*.py import `configs.default`.

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'  # pyramidnet_jax.data.fashion_mnist's default.
FASHION_MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                       't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)


def _run(cmd: list[str]) -> None:
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def prepare_fashion_mnist(data_dir: str) -> None:
  data_dir = data_dir or FASHION_MNIST_DIR
  missing = [f for f in FASHION_MNIST_FILES if not os.path.isfile(os.path.join(data_dir, f))]
  if not missing:
    print(f'Fashion-MNIST: found in {data_dir}')
    return
  if os.path.abspath(data_dir) != FASHION_MNIST_DIR or not shutil.which('apt-get'):
    sys.exit(f'error: Fashion-MNIST is missing from {data_dir} ({", ".join(missing)}) and this '
             'script can only install it with apt-get into '
             f'{FASHION_MNIST_DIR}: copy the four IDX files there instead.')
  sudo = [] if os.geteuid() == 0 else ['sudo']
  _run(sudo + ['apt-get', 'update', '-qq'])
  _run(sudo + ['apt-get', 'install', '-y', '-qq', 'dataset-fashion-mnist'])
  print(f'Fashion-MNIST: installed in {data_dir}')


def prepare_tfds(name: str, data_dir: str) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir or None)
  where = builder.data_dir
  if builder.is_prepared():
    print(f'{name}: prepared in {where}')
    return
  if name == 'imagenet2012':
    sys.exit(f'error: imagenet2012 is not prepared in {where}. TFDS cannot download it: put '
             'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the manual dir '
             '(~/tensorflow_datasets/downloads/manual), run `tfds build imagenet2012 '
             '--data_dir=DIR` and pass --config.data_dir=DIR.')
  print(f'{name}: downloading and preparing in {where}', flush=True)
  builder.download_and_prepare()
  print(f'{name}: prepared in {where}')


def main() -> None:
  argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a.startswith('--config')]
  try:
    FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError) as e:
    sys.exit(f'error: {e}\n{__doc__}')
  if FLAGS.config is None:
    sys.exit(f'error: --config is required.\n{__doc__}')
  config = FLAGS.config
  if config.dataset == 'fashion_mnist':
    prepare_fashion_mnist(config.data_dir)
  elif config.dataset in ('cifar10', 'cifar100', 'imagenet2012'):
    prepare_tfds(config.dataset, config.data_dir)
  else:  # E.g. an image folder: nothing to download; the training says if it is missing.
    print(f'{config.dataset}: nothing to prepare (not a dataset this script downloads).')


if __name__ == '__main__':
  main()
