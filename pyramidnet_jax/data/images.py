"""Reading one image file with PIL: the image-folder datasets and `predict` both use this.

PIL is imported inside read_image.
"""

from __future__ import annotations

import numpy as np

# Files with these extensions (any case) are image files, read by PIL (which reads every format
# TensorFlow's decode_image does: JPEG, PNG, GIF, BMP, WebP, and more).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.apng', '.bmp', '.dib', '.gif',
                    '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm', '.pnm', '.tga', '.ico',
                    '.qoi', '.jp2', '.j2k', '.avif')


class UnreadableImageError(ValueError):
  """An image file that PIL cannot open or decode; `path` and `reason` say which and why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'Cannot read image file {path}: {reason}')
    self.path = path
    self.reason = reason


def read_image(path: str, channels: int = 3) -> np.ndarray:
  """uint8 (H, W, channels) pixels of an image file (any format PIL reads; first frame of an
  animation; alpha dropped): RGB for channels=3, PIL's 'L' grey for channels=1. Any failure is an
  UnreadableImageError naming the file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}.')
  try:
    with Image.open(path) as image:
      array = np.asarray(image.convert('RGB' if channels == 3 else 'L'))
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error, ... for
    # bad files; every one of them makes this file unreadable, not the run broken.
    raise UnreadableImageError(path, f'{type(e).__name__}: {e}') from e
  if channels == 1 and array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[2] != channels or not array.size:
    raise UnreadableImageError(path, f'decoded to an array of shape {array.shape}')
  return array
