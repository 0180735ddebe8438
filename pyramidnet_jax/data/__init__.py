"""Datasets and deterministic batching for training, evaluation and prediction.

One module per concern: `source` (the Split protocol, Dataset, shared seed helpers),
`transforms` (Preprocessing and the pixel transforms), `arrays` (in-memory splits: CIFAR,
Fashion-MNIST), `fashion_mnist`, `tfds_sources` (CIFAR in memory, ImageNet streamed), `folder`
(image folders), `streaming` (what the streamed splits share), `images` (reading one image file),
`registry` (load_dataset and the per-name preprocessing).

    dataset = data.load_dataset(config, jax.process_index(), jax.process_count())
    for batch in dataset.train.train_batches(config.batch_size, config.seed, epoch): ...
    for batch in dataset.test.eval_batches(config.eval_batch_size): ...

Importing this package loads numpy and absl only: TensorFlow, TFDS and PIL are imported inside
the functions that need them.
"""

from pyramidnet_jax.data.arrays import ArraySplit
from pyramidnet_jax.data.folder import FolderSplit
from pyramidnet_jax.data.images import IMAGE_EXTENSIONS
from pyramidnet_jax.data.images import UnreadableImageError
from pyramidnet_jax.data.images import read_image
from pyramidnet_jax.data.registry import DATASETS
from pyramidnet_jax.data.registry import FOLDER_PREFIX
from pyramidnet_jax.data.registry import eval_transform
from pyramidnet_jax.data.registry import load_dataset
from pyramidnet_jax.data.registry import preprocessing_of
from pyramidnet_jax.data.source import Dataset
from pyramidnet_jax.data.source import Split
from pyramidnet_jax.data.tfds_sources import TfdsSplit
from pyramidnet_jax.data.transforms import Preprocessing

__all__ = ['ArraySplit', 'DATASETS', 'Dataset', 'FOLDER_PREFIX', 'FolderSplit', 'IMAGE_EXTENSIONS',
           'Preprocessing', 'Split', 'TfdsSplit', 'UnreadableImageError', 'eval_transform',
           'load_dataset', 'preprocessing_of', 'read_image']
