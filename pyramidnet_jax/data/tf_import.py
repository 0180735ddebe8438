"""TensorFlow and TFDS for the input pipeline, imported on first use with no GPU visible to them.

tf.data runs on the host; a TensorFlow that saw the GPUs would reserve most of their memory for
itself and start CUDA contexts beside JAX's. Every TensorFlow import of the data package goes
through `tensorflow()`, which hides the GPUs from TensorFlow before it runs its first op.
"""

from __future__ import annotations

import threading
from typing import Any

from absl import logging

_lock = threading.Lock()
_hidden = False


def tensorflow() -> Any:
  """The `tensorflow` module, its GPUs hidden from it (once per process)."""
  global _hidden
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not _hidden:
    with _lock:
      if not _hidden:
        try:
          tf.config.set_visible_devices([], 'GPU')
        except RuntimeError as e:  # Its devices were initialised already, by other code.
          logging.warning('TensorFlow ran before the input pipeline could hide the GPUs from it, '
                          'so it may hold GPU memory that JAX needs: %s', e)
        _hidden = True
  return tf


def tensorflow_datasets() -> Any:
  """The `tensorflow_datasets` module, imported after `tensorflow()`."""
  tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds
