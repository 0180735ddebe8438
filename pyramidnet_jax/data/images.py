"""Image files: finding them below a folder (`list_image_files`, each file once) and reading one
(`read_image`, the one reader of image-folder datasets and `predict`).

What read_image gives, per PIL mode:
- 8-bit modes (1, L, P with or without transparency, LA, PA, RGB, RGBA, CMYK, YCbCr, LAB, ...):
  exactly the pixels of PIL's `convert('RGB')` (or `convert('L')` for one channel). Alpha is
  dropped, not composited, as torchvision's loader and TensorFlow's decoders drop it.
- 16-bit and 32-bit integer modes (I;16*, I): PIL's decoders put 16-bit samples there, so the
  range [0, 65535] is scaled to [0, 255] (v / 257, rounded; outside it, clipped). PIL's own
  convert clips them at 255, which turns a 16-bit photo white.
- Float (F): the float-image convention, [0, 1] scaled to [0, 255], outside clipped, NaN black.
- The first frame of an animation (GIF, APNG, WebP, multi-page TIFF).
- EXIF orientation is not applied: the stored pixels, as torchvision's loader and TensorFlow's
  decode_jpeg read ImageNet and as the authors trained, so a photo reads the same in training
  and in predict. A camera photo stored sideways is classified sideways.
Anything else PIL refuses (or a file larger than `max_pixels`) is an UnreadableImageError.

PIL is imported inside the functions that use it.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import numpy as np

# Files with these extensions (any case) are image files, read by PIL (which reads every format
# TensorFlow's decode_image does: JPEG, PNG, GIF, BMP, WebP, and more).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.apng', '.bmp', '.dib', '.gif',
                    '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm', '.pnm', '.tga', '.ico',
                    '.qoi', '.jp2', '.j2k', '.avif')

# Width x height above which a file is refused before it is decoded (a decompression bomb: a
# small file whose header claims a huge image). PIL's own refusal threshold, 2 x its default
# Image.MAX_IMAGE_PIXELS; predict's --max_image_pixels and config.max_image_pixels change it.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# Longer side over shorter side above which a file is refused: the eval transform resizes the
# shorter side to 256, so a 1 x 50,000 image would become tens of GB before the centre crop.
MAX_ASPECT_RATIO = 100


class UnreadableImageError(ValueError):
  """An image file that PIL cannot open or decode; `path` and `reason` say which and why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'Cannot read image file {path}: {reason}')
    self.path = path
    self.reason = reason


def read_image(path: str, channels: int = 3,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
  """uint8 (H, W, channels) pixels of an image file (module docstring): RGB for channels=3,
  grey for channels=1. A file that is not a regular file, is larger than `max_pixels` (width x
  height, checked from the header before decoding), or that PIL cannot fully decode is an
  UnreadableImageError naming the file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}.')
  if max_pixels < 1:
    raise ValueError(f'max_image_pixels must be positive, got {max_pixels}.')
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    raise UnreadableImageError(path, e.strerror or type(e).__name__) from None
  if not stat.S_ISREG(mode):  # Opening a FIFO or a device could block the reader for ever.
    raise UnreadableImageError(path, 'not a regular file')
  limit = getattr(Image, 'MAX_IMAGE_PIXELS', None)
  if limit is not None and 2 * limit < max_pixels:
    # PIL refuses more than 2 x this in Image.open, and warns above it: the caller allowed
    # larger files. Only ever raised (threads may race here, each writing at least its need).
    Image.MAX_IMAGE_PIXELS = max_pixels
  too_large = (f'over the limit of {max_pixels:,} pixels (max_image_pixels; raise it only for '
               'files you trust)')
  try:
    with Image.open(path) as image:
      width, height = image.size
      if width * height > max_pixels:
        raise UnreadableImageError(path, f'{width}x{height} is {width * height:,} pixels, '
                                   f'{too_large}')
      if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnreadableImageError(path, f'{width}x{height} is longer than {MAX_ASPECT_RATIO} '
                                   'times its width: no image of the datasets here')
      array = _pixels(image, channels)
  except UnreadableImageError:
    raise
  except Image.DecompressionBombError as e:  # PIL's own check, before ours; it says the size.
    pixels = re.search(r'\((\d+) pixels\)', str(e))
    raise UnreadableImageError(
        path, f'{int(pixels[1]):,} pixels, {too_large}' if pixels else f'{too_large}: {e}'
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad files; every one
    # of them makes this file unreadable, not the run broken.
    raise UnreadableImageError(path, f'{type(e).__name__}: {e}') from e
  if array.ndim != 3 or array.shape[2] != channels or not array.size:
    raise UnreadableImageError(path, f'decoded to an array of shape {array.shape}')
  return array


def _pixels(image: Any, channels: int) -> np.ndarray:
  """uint8 (H, W, channels) of an open PIL image, per the module docstring."""
  if image.mode == 'F' or image.mode == 'I' or image.mode.startswith('I;16'):
    values = np.asarray(image, np.float64)
    if image.mode == 'F':
      scaled = np.nan_to_num(values, nan=0.0) * 255.0
    else:
      scaled = values / 257.0  # 65535 / 255: 0 -> 0, 65535 -> 255.
    grey = np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    return np.repeat(grey[..., None], channels, axis=2)
  if channels == 3:
    return np.asarray(image.convert('RGB'))
  try:
    grey = image.convert('L')
  except ValueError:  # PIL converts some modes (LAB) to grey only by way of RGB.
    grey = image.convert('RGB').convert('L')
  return np.asarray(grey)[..., None]


def list_image_files(folder: str, seen: tuple[set[str], set[str]] | None = None
                     ) -> tuple[list[str], list[str], list[tuple[str, str]]]:
  """(image files, other files, skipped entries) below `folder`, recursively; paths sorted.

  Hidden entries (a leading '.') are ignored. Symbolic links are followed only where they lead
  to something new inside `folder` (which may itself be a link): a link whose target lies
  outside it, or is a file or folder listed already (a loop, a second name), is skipped, as
  (path, why), so that no file is listed twice. Real entries are listed before any link is
  followed, so a link never displaces the file it names. A subfolder that cannot be read is
  skipped too. `seen` (real paths of the folders and files listed so far, updated) carries
  "listed already" over calls: over the classes and splits of a dataset, no file gets two
  labels or is both trained and tested on.
  """
  top = os.path.realpath(folder)
  seen_dirs, seen_files = seen if seen is not None else (set(), set())
  images: list[str] = []
  others: list[str] = []
  skipped: list[tuple[str, str]] = []
  links: list[str] = []

  def inside(real: str) -> bool:
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)

  def add_file(path: str, real: str) -> None:
    if real in seen_files:
      skipped.append((path, 'a file listed already'))
      return
    seen_files.add(real)
    (images if path.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)

  def walk(directory: str, real: str) -> None:
    if real in seen_dirs:
      skipped.append((directory, 'a folder listed already'))
      return
    seen_dirs.add(real)
    try:
      with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    except OSError as e:
      skipped.append((directory, f'cannot be listed: {e.strerror or type(e).__name__}'))
      return
    subfolders = []
    for entry in entries:
      if entry.name.startswith('.'):
        continue
      if entry.is_symlink():
        links.append(entry.path)
      elif entry.is_dir(follow_symlinks=False):
        subfolders.append(entry)
      else:
        add_file(entry.path, os.path.join(real, entry.name))
    for entry in subfolders:
      walk(entry.path, os.path.join(real, entry.name))

  walk(folder, top)
  while links:  # Links met inside linked folders join the queue.
    link = links.pop(0)
    real = os.path.realpath(link)
    if not inside(real):
      skipped.append((link, f'leads outside {folder} (to {real})'))
    elif os.path.isdir(real):
      walk(link, real)
    else:  # A file, or a dangling link (unreadable when read, like a vanished file).
      add_file(link, real)
  return sorted(images), sorted(others), skipped
