"""The training and evaluation steps: pure functions of (state, batch) that jit compiles.

`train_step` is one SGD step on a global batch (the loss, its gradient, the optimiser update and
the BatchNorm running averages); `eval_step` gives masked sums over a padded evaluation batch.
Under a bfloat16 network the loss, gradients, parameters and optimiser state are float32
(models/layers.py, models/head.py).
Dropout keys are folded from the step count, so a resumed run repeats the uninterrupted one.
Every step starts with `device_images`: uint8 batches cross to the device and are normalised
there, with the split's mean and std (`Normalization`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pyramidnet_jax import levers
from pyramidnet_jax.data import transforms


class TrainState(train_state.TrainState):
  batch_stats: Any


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel mean and std, in [0, 1] units, of a split's preprocessing."""
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def of(cls, preprocessing: Any) -> Normalization:
    """The normalisation of a data.Preprocessing."""
    return cls(tuple(preprocessing.mean), tuple(preprocessing.std))


def device_images(images: jax.Array, normalization: Normalization | None) -> jax.Array:
  """The network's input from a batch's images: uint8 pixels normalised here, float32 ones
  (normalised on the host) as they are.

  uint8 gives exactly the float32 of data.transforms.normalize on the host, fl(fl(pixel * scale)
  + offset), on every platform. Compilers fuse a multiply and an add into one FMA, rounded once
  (XLA:CPU and XLA:GPU do, whatever the HLO says), so the product is formed from two halves of
  the scale, each product exact: their sum is fl(pixel * scale) whether or not it is fused.
  """
  if images.dtype == jnp.float32:
    return images
  if images.dtype != jnp.uint8:
    raise ValueError(f'Batch images must be uint8 or float32, got {images.dtype}.')
  if normalization is None:
    raise ValueError('uint8 batch images need the split\'s normalization (mean and std).')
  channels = images.shape[-1]
  if len(normalization.mean) != channels:
    raise ValueError(f'The normalization has {len(normalization.mean)} channels, the images '
                     f'{channels}.')
  scale, offset = transforms.normalization_constants(normalization.mean, normalization.std)
  high, low = _split_significand(scale)
  pixels = images.astype(jnp.float32)
  return (pixels * high + pixels * low) + offset


def _split_significand(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float32 (high, low), high + low == values exactly, each with at most 12 significant bits:
  times an 8-bit pixel, each product is exact in float32."""
  values = np.asarray(values, np.float32)
  high = (values.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
  return high, values - high


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                       label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels, in float32
  whatever the network computes in."""
  logits = logits.astype(jnp.float32)
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf is finite, as one reduction over all of them.

  A check per leaf compiles to about three XLA kernels per leaf, thousands for a deep network, and
  XLA builds each executable's dependency graph in time that grows with its kernel count.
  """
  leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.isfinite(jnp.concatenate(leaves))) if leaves else jnp.bool_(True)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, learning_rate_fn: optax.Schedule,
               label_smoothing: float, dropout_key: jax.Array,
               normalization: Normalization | None = None) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; pure, so jit can donate and shard it."""
  num_classes = state.params['fc']['bias'].shape[0]
  images = device_images(batch['image'], normalization)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': jax.random.fold_in(dropout_key, state.step)})
    loss = cross_entropy_loss(logits, batch['label'], num_classes, label_smoothing).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  with levers.current().optimizer_trace():
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    # XLA can drop NaNs in a max inside a reduction (the ReLU before the pooling), so a NaN
    # state may still give a finite loss: report the loss as NaN whenever the new state isn't
    # finite, so that the loop's NaN check stops the run before such a state is saved.
    finite = all_finite((new_state.params, new_state.batch_stats))
  metrics = {
      'loss': jnp.where(finite, loss, jnp.nan),
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'learning_rate': learning_rate_fn(state.step),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              normalization: Normalization | None = None) -> dict[str, jax.Array]:
  """Masked sums over a padded eval batch: loss, top-1 and top-5 hits, example count."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          device_images(batch['image'], normalization), train=False)
  num_classes = logits.shape[-1]
  mask = batch['mask']
  labels = batch['label']
  loss = cross_entropy_loss(logits, labels, num_classes)
  top_k = jax.lax.top_k(logits, min(5, num_classes))[1]
  return {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum((top_k[:, 0] == labels) * mask),
      'top5': jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
      'count': jnp.sum(mask),
  }



@flax.struct.dataclass
class InferenceState:
  """What evaluation needs of a TrainState: the network's apply and its variables."""
  apply_fn: Any = flax.struct.field(pytree_node=False)
  params: Any = None
  batch_stats: Any = None


def logits_step(state: TrainState | InferenceState, batch: dict[str, jax.Array], *,
                normalization: Normalization | None = None) -> dict[str, jax.Array]:
  """Eval-mode float32 logits of a padded batch, beside its labels and mask."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          device_images(batch['image'], normalization), train=False)
  return {'logits': logits, 'label': batch['label'], 'mask': batch['mask']}
