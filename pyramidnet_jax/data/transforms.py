"""What a split does to pixels: `Preprocessing`, numpy and TF normalisation, and the ImageNet
recipe's TF transforms (random resized crop + flip and the Torch colour augmentation for training,
resize + centre crop for evaluation), plus the per-image eval transform that `predict` shares with
evaluation.

Batches carry uint8 pixels, which the jitted steps normalise on the device
(training/step.py: device_images, with `normalization_constants`), or, for streamed splits on a
CPU, float32 pixels normalised here: `streamed_image_dtype` is where that is chosen.

TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np

from pyramidnet_jax.data import tf_import

AUGMENTATIONS = ('cifar', 'fashion_mnist', 'imagenet', 'none')
IMAGE_DTYPES = ('uint8', 'float32')

# ImageNet (the authors' PyTorch recipe, docs/architecture.md#training-recipes):
# RandomResizedCrop(224) + flip for training, resize the shorter side to 256 + center crop 224 for
# evaluation, torchvision's statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_IMAGE_SIZE = 224
IMAGENET_RESIZE_SIZE = 256
IMAGENET_CROP_SCALE = (0.08, 1.0)  # Area of the crop, as a fraction of the image's.
IMAGENET_CROP_RATIO = (3 / 4, 4 / 3)  # Width / height of the crop.
# The side of the crops is configurable (config.image_size, ImageNet and folders); evaluation
# resizes the shorter side to round(size * 256 / 224) first, as 256 is to 224.
IMAGENET_RESIZE_RATIO = IMAGENET_RESIZE_SIZE / IMAGENET_IMAGE_SIZE

# The Torch recipe's colour augmentation (fb.resnet.torch datasets/imagenet.lua and transforms.lua,
# docs/architecture.md#training-recipes): ColorJitter (brightness, contrast, saturation 0.4, in a
# random order), then Lighting (AlexNet PCA noise, alphastd 0.1) with these eigenvalues and
# eigenvectors (columns) of the RGB covariance in [0, 1] units. Greyscale weights are Torch's (ITU-R
# 601).
TORCH_COLOR_JITTER = 0.4
TORCH_PCA_LIGHTING = 0.1
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def resize_size_for(image_size: int) -> int:
  """The eval resize (shorter side) for crops of `image_size`: 256 for 224, in proportion."""
  return int(np.floor(image_size * IMAGENET_RESIZE_RATIO + 0.5))


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What a split does to pixels.

  mean, std: per channel, in [0, 1] units. augmentation: training augmentation, one of
  AUGMENTATIONS ('none' when config.augment is off). color_jitter, pca_lighting: the Torch
  recipe's colour augmentation of streamed RGB training images (torch_color_augment), 0 = off.
  image_size: the side of a streamed split's crops (None for in-memory splits, whose images keep
  their stored size). image_dtype: what the batches' images are: 'uint8' pixels, normalised on
  the device by the jitted steps, or 'float32' pixels normalised on the host (streamed splits on
  a CPU, see streamed_image_dtype).
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augmentation: str
  color_jitter: float = 0.0
  pca_lighting: float = 0.0
  image_size: int | None = None
  image_dtype: str = 'uint8'

  def __post_init__(self):
    object.__setattr__(self, 'mean', tuple(self.mean))
    object.__setattr__(self, 'std', tuple(self.std))
    if len(self.mean) != len(self.std):
      raise ValueError(f'mean {self.mean} and std {self.std} differ in length.')
    if self.augmentation not in AUGMENTATIONS:
      raise ValueError(f'Unknown augmentation {self.augmentation!r}: expected one of '
                       f'{AUGMENTATIONS}.')
    if not 0.0 <= self.color_jitter <= 1.0:
      raise ValueError(f'color_jitter must be in [0, 1], got {self.color_jitter}.')
    if not 0.0 <= self.pca_lighting:
      raise ValueError(f'pca_lighting must be non-negative, got {self.pca_lighting}.')
    if self.image_size is not None and self.image_size < 1:
      raise ValueError(f'image_size must be positive, got {self.image_size}.')
    if self.image_dtype not in IMAGE_DTYPES:
      raise ValueError(f'image_dtype must be one of {IMAGE_DTYPES}, got {self.image_dtype!r}.')

  @property
  def resize_size(self) -> int:
    """Streamed evaluation resizes the shorter side to this, then centre-crops image_size."""
    return resize_size_for(self.image_size)

  @property
  def padding_pixel(self) -> np.ndarray:
    """(C,) of image_dtype: a black pixel as the batches hold it (0, or after normalisation),
    the pixel of padded eval examples."""
    if self.image_dtype == 'uint8':
      return np.zeros(len(self.mean), np.uint8)
    return -np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)


def streamed_image_dtype(platform: str) -> str:
  """The image dtype of streamed (TFDS ImageNet, folder:) batches on a JAX `platform`.

  Their resize gives non-integer pixels. On a GPU or TPU they are rounded to uint8 (as
  torchvision's PIL pipeline rounds them), so a batch crosses the host-device link in a quarter
  of the bytes and is normalised on the device; colour-augmented pixels are clipped to [0, 255]
  there, as PIL clips them. On a CPU, where no bytes cross a bus, they stay float32 and are
  normalised on the host, unrounded.
  """
  return 'float32' if platform == 'cpu' else 'uint8'


def imagenet_preprocessing(image_size: int = IMAGENET_IMAGE_SIZE,
                           image_dtype: str = 'float32') -> Preprocessing:
  """ImageNet's statistics and transforms at crops of `image_size` (ImageNet and folders), with
  batches of `image_dtype` (streamed_image_dtype)."""
  return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 'imagenet', image_size=image_size,
                       image_dtype=image_dtype)


def normalization_constants(mean: Sequence[float],
                            std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """float32 (scale, offset), per channel: normalised = pixel * scale + offset, the product
  rounded to float32 before the sum (`normalize` here, device_images in training/step.py)."""
  std = np.asarray(std, dtype=np.float32)
  scale = np.float32(1.0 / 255.0) / std
  offset = -np.asarray(mean, dtype=np.float32) / std
  return scale, offset


def normalize(images_uint8: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """float32 (images / 255 - mean) / std, per channel (the last axis)."""
  scale, offset = normalization_constants(mean, std)
  # In place, on rows of width * channels with the statistics tiled to match: broadcasting along a
  # last axis of 3 and allocating temporaries is several times slower on CIFAR batches.
  *leading, width, channels = images_uint8.shape
  rows = images_uint8.reshape(*leading, width * channels).astype(np.float32)
  rows *= np.tile(scale, width)
  rows += np.tile(offset, width)
  return rows.reshape(images_uint8.shape)


def normalize_tf(image: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
  """float32 pixels in [0, 255] -> (pixels / 255 - mean) / std."""
  tf = tf_import.tensorflow()

  std = np.asarray(std, np.float32)
  scale = tf.constant(1.0 / (255.0 * std), tf.float32)
  offset = tf.constant(-np.asarray(mean, np.float32) / std, tf.float32)
  return image * scale + offset


def batch_pixels_tf(image: Any, mean: Sequence[float], std: Sequence[float],
                    image_dtype: str) -> Any:
  """float32 pixels in [0, 255] as a batch of `image_dtype` holds them: rounded (half to even,
  like np.rint) and clipped to uint8, or normalised (normalize_tf)."""
  tf = tf_import.tensorflow()

  if image_dtype == 'uint8':
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
  return normalize_tf(image, mean, std)


def _random_resized_crop_window(shape: Any, crop_seed: Any) -> Any:
  """[top, left, height, width] of torchvision RandomResizedCrop's box, stateless.

  The box covers 8%-100% of the image's area with width/height in [3/4, 4/3] (10 tries, then the
  whole image).
  """
  tf = tf_import.tensorflow()

  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_seed,
      min_object_covered=0.0, aspect_ratio_range=IMAGENET_CROP_RATIO,
      area_range=IMAGENET_CROP_SCALE, max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


def _finish_train_image(crop: Any, size: int, flip_seed: Any, mean: Sequence[float],
                        std: Sequence[float], color_jitter: float, pca_lighting: float,
                        jitter_seed: Any, lighting_seed: Any, image_dtype: str) -> Any:
  """Resize a crop to size x size, flip, colour augmentation, then batch_pixels_tf."""
  tf = tf_import.tensorflow()

  image = tf.image.resize(crop, (size, size), method='bilinear', antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  # Torch flips after its colour transforms; they are the same on a mirrored image (they act per
  # pixel, or through the whole image's mean), so the order makes no difference.
  image = torch_color_augment(image, color_jitter, pca_lighting, jitter_seed, lighting_seed)
  return batch_pixels_tf(image, mean, std, image_dtype)


def imagenet_train_transform(jpeg: Any, crop_seed: Any, flip_seed: Any, mean: Sequence[float],
                             std: Sequence[float], size: int = IMAGENET_IMAGE_SIZE,
                             color_jitter: float = 0.0, pca_lighting: float = 0.0,
                             jitter_seed: Any = None, lighting_seed: Any = None,
                             image_dtype: str = 'float32') -> Any:
  """torchvision RandomResizedCrop(size) + RandomHorizontalFlip, stateless, then the optional
  colour augmentation of the Torch recipe (torch_color_augment) and normalisation (or uint8
  rounding, batch_pixels_tf).

  The crop (see _random_resized_crop_window) is decoded alone from the JPEG and resized
  (bilinear, antialiased like PIL) to size x size. Seeds: int (2,) tensors; the same seeds give
  the same output. jitter_seed / lighting_seed are needed only when their option is on.
  """
  tf = tf_import.tensorflow()

  window = _random_resized_crop_window(tf.image.extract_jpeg_shape(jpeg), crop_seed)
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return _finish_train_image(image, size, flip_seed, mean, std, color_jitter, pca_lighting,
                             jitter_seed, lighting_seed, image_dtype)


def random_resized_crop_transform(image: Any, crop_seed: Any, flip_seed: Any,
                                  mean: Sequence[float], std: Sequence[float],
                                  size: int = IMAGENET_IMAGE_SIZE, color_jitter: float = 0.0,
                                  pca_lighting: float = 0.0, jitter_seed: Any = None,
                                  lighting_seed: Any = None, image_dtype: str = 'float32') -> Any:
  """imagenet_train_transform on a decoded uint8 (H, W, 3) image instead of a JPEG."""
  tf = tf_import.tensorflow()

  window = _random_resized_crop_window(tf.shape(image), crop_seed)
  crop = tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))
  return _finish_train_image(crop, size, flip_seed, mean, std, color_jitter, pca_lighting,
                             jitter_seed, lighting_seed, image_dtype)


def color_jitter_params(strength: float, seed: Any) -> tuple[Any, Any]:
  """(alphas, order) of fb.resnet.torch's ColorJitter for a stateless seed (int (2,) tensor).

  alphas: float32 (3,), the blend factors of brightness, contrast and saturation, each uniform in
  [1 - strength, 1 + strength]; order: int32 (3,), a uniformly random permutation of (0, 1, 2)
  (Torch's RandomOrder), the order in which the three are applied.
  """
  tf = tf_import.tensorflow()

  uniform = tf.random.stateless_uniform((6,), seed=seed, dtype=tf.float32)
  alphas = 1.0 + strength * (2.0 * uniform[:3] - 1.0)
  return alphas, tf.argsort(uniform[3:], stable=True)


def pca_lighting_offset(alphastd: float, seed: Any) -> Any:
  """fb.resnet.torch's Lighting: the float32 (3,) RGB offset, in [0, 1] units, for a seed.

  alpha ~ N(0, alphastd) per principal component; offset = eigvec @ (alpha * eigval).
  """
  tf = tf_import.tensorflow()

  alpha = tf.random.stateless_normal((3,), seed=seed, dtype=tf.float32) * alphastd
  eigvec = tf.constant(PCA_EIGVEC, tf.float32)
  return tf.linalg.matvec(eigvec, alpha * tf.constant(PCA_EIGVAL, tf.float32))


def torch_color_augment(image: Any, color_jitter: float, pca_lighting: float, jitter_seed: Any,
                        lighting_seed: Any, scale: float = 255.0) -> Any:
  """fb.resnet.torch's ColorJitter then Lighting on a float32 (H, W, 3) RGB image in [0, scale].

  ColorJitter(brightness = contrast = saturation = color_jitter): in a random order (per image),
  blend the image with black (brightness), with the mean of its greyscale (contrast) and with its
  greyscale (saturation): image * alpha + other * (1 - alpha), alpha ~ U(1 -+ color_jitter).
  Greyscale = 0.299 R + 0.587 G + 0.114 B. Lighting(pca_lighting): adds pca_lighting_offset * scale
  to each channel. As in Torch nothing is clipped, so pixels may leave [0, scale]. With both
  strengths 0 the image is returned unchanged (no op is added). Seeds: int (2,) tensors.
  """
  tf = tf_import.tensorflow()

  if color_jitter > 0.0:
    alphas, order = color_jitter_params(color_jitter, jitter_seed)
    weights = tf.constant(GREY_WEIGHTS, tf.float32)

    def brightness(x):
      return x * alphas[0]

    def contrast(x):
      grey_mean = tf.reduce_mean(tf.tensordot(x, weights, axes=1))
      return x * alphas[1] + grey_mean * (1.0 - alphas[1])

    def saturation(x):
      grey = tf.tensordot(x, weights, axes=1)[..., None]
      return x * alphas[2] + grey * (1.0 - alphas[2])

    for step in range(3):
      image = tf.switch_case(order[step], [functools.partial(op, image)
                                           for op in (brightness, contrast, saturation)])
  if pca_lighting > 0.0:
    image = image + pca_lighting_offset(pca_lighting, lighting_seed) * scale
  return image


def resize_and_center_crop(image: Any, size: int = IMAGENET_IMAGE_SIZE,
                           resize: int = IMAGENET_RESIZE_SIZE) -> Any:
  """torchvision Resize(resize) (shorter side) + CenterCrop(size): float32 pixels in [0, 255]."""
  tf = tf_import.tensorflow()

  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  scale = resize / tf.minimum(height, width)
  # As torchvision: the shorter side becomes `resize` exactly, the longer one is truncated.
  new_height = tf.maximum(tf.cast(height * scale, tf.int32), resize)
  new_width = tf.maximum(tf.cast(width * scale, tf.int32), resize)
  new_height = tf.where(height <= width, resize, new_height)
  new_width = tf.where(width < height, resize, new_width)
  image = tf.image.resize(image, tf.stack([new_height, new_width]), method='bilinear',
                          antialias=True)
  top = tf.cast(tf.round(tf.cast(new_height - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - size, tf.float32) / 2.0), tf.int32)
  image = image[top:top + size, left:left + size]
  return tf.ensure_shape(image, (size, size, 3))


def imagenet_eval_transform(jpeg: Any, mean: Sequence[float], std: Sequence[float],
                            size: int = IMAGENET_IMAGE_SIZE,
                            resize: int = IMAGENET_RESIZE_SIZE, image_dtype: str = 'float32') -> Any:
  """torchvision Resize(resize) (shorter side) + CenterCrop(size), then normalisation (or uint8
  rounding, batch_pixels_tf)."""
  tf = tf_import.tensorflow()

  image = tf.io.decode_jpeg(jpeg, channels=3)
  return streamed_eval_transform(image, mean, std, size, resize, image_dtype)


def streamed_eval_transform(image: Any, mean: Sequence[float], std: Sequence[float], size: int,
                            resize: int, image_dtype: str = 'float32') -> Any:
  """A decoded uint8 (H, W, 3) image as the streamed eval batches of `image_dtype` hold it:
  resize + centre crop, then batch_pixels_tf."""
  return batch_pixels_tf(resize_and_center_crop(image, size, resize), mean, std, image_dtype)


def image_eval_transform(preprocessing: Preprocessing,
                         image_shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 (H, W, C) pixels of any size -> float32 `image_shape`, as the network sees the eval
  batches of a split with this preprocessing and image shape.

  Streamed (preprocessing.image_size set): streamed_eval_transform, run eagerly. In memory: the
  image is resized to the stored size (bilinear, antialiased, rounded back to uint8; for `predict`,
  eval batches hold images of that size already). uint8 pixels are then normalised by the numpy
  `normalize`, which equals the device's normalisation of uint8 batches bit for bit. For an image
  the eval batches hold, the output equals the network's input bit for bit.
  """
  channels = image_shape[-1]
  if preprocessing.image_size is not None:
    size, resize = preprocessing.image_size, preprocessing.resize_size

    def streamed(image: np.ndarray) -> np.ndarray:
      _check_image(image, channels)
      pixels = streamed_eval_transform(image, preprocessing.mean, preprocessing.std, size,
                                       resize, preprocessing.image_dtype).numpy()
      if pixels.dtype == np.uint8:
        return normalize(pixels, preprocessing.mean, preprocessing.std)
      return pixels
    return streamed

  def in_memory(image: np.ndarray) -> np.ndarray:
    _check_image(image, channels)
    if image.shape != tuple(image_shape):
      tf = tf_import.tensorflow()
      resized = tf.image.resize(image, image_shape[:2], method='bilinear', antialias=True)
      image = np.clip(np.rint(resized.numpy()), 0, 255).astype(np.uint8)
    return normalize(image, preprocessing.mean, preprocessing.std)
  return in_memory


def _check_image(image: np.ndarray, channels: int) -> None:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != channels:
    raise ValueError(f'The eval transform takes uint8 (H, W, {channels}) images, got '
                     f'{image.dtype} {image.shape}.')
