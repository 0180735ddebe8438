"""The device mesh, batch placement and the compiled steps of one run.

The steps are `jax.jit` over a Mesh of all devices: every batch is split on the 'data' axis and
the state is replicated, so BatchNorm statistics are computed over the global batch, or over
groups of config.model.bn_group_size consecutive examples of it (batch_size / devices: each
device's share, computed without communication). Each process places its own part of every global
batch (`put_batch`), uint8 images as they are, which the steps normalise on the device with the
split's mean and std (step.device_images; training/feeding.py places each batch during the step
before it); jit then runs one SPMD program. The network's dtype and channel multiple
'auto' are resolved where it is built (models.from_config), for JAX's default backend.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

from pyramidnet_jax import data
from pyramidnet_jax import levers
from pyramidnet_jax.training import step


@dataclasses.dataclass
class Runtime:
  """The mesh and the compiled functions for one model and optimiser."""
  mesh: jax.sharding.Mesh
  data_sharding: NamedSharding
  replicated: NamedSharding
  train_step: Callable[..., Any] | None  # None in an evaluation-only runtime.
  eval_step: Callable[..., Any]
  logits_step: Callable[..., Any]

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global batch, sharded over the mesh, from this process's part of it."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), batch)


def create_runtime(config: ml_collections.ConfigDict,
                   learning_rate_fn: optax.Schedule | None = None,
                   devices: Sequence[Any] | None = None,
                   eval_batch_size: int | None = None,
                   preprocessing: Any = None) -> Runtime:
  """The runtime over `devices` (default: all); without a schedule, for evaluation only, in
  batches of `eval_batch_size` (default: config.eval_batch_size). The steps normalise uint8
  batch images with the mean and std of `preprocessing` (the split's data.Preprocessing; default:
  that of config.dataset)."""
  devices = jax.devices() if devices is None else devices
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  data_sharding = NamedSharding(mesh, PartitionSpec('data'))
  replicated = NamedSharding(mesh, PartitionSpec())
  sizes = {'eval_batch_size': eval_batch_size or config.eval_batch_size}
  if learning_rate_fn is not None:
    sizes['batch_size'] = config.batch_size
  for name, size in sorted(sizes.items()):
    if size % len(devices):
      raise ValueError(f'config.{name}={size} must be divisible by the {len(devices)} devices '
                       'it is split over.')
  if learning_rate_fn is not None:
    check_bn_groups(config.model.get('bn_group_size', 0), config.batch_size, len(devices))
  if preprocessing is None:
    preprocessing = data.preprocessing_of(
        config.dataset, config.get('image_size', data.transforms.IMAGENET_IMAGE_SIZE))
  normalization = step.Normalization.of(preprocessing)
  compiled = levers.current().compiled
  context = config.to_json_best_effort(sort_keys=True)
  train_step = None
  if learning_rate_fn is not None:
    train = functools.partial(step.train_step, learning_rate_fn=learning_rate_fn,
                              label_smoothing=config.label_smoothing,
                              dropout_key=jax.random.key(config.seed + 1),
                              normalization=normalization)
    train_step = compiled(jax.jit(train, in_shardings=(replicated, data_sharding),
                                  out_shardings=(replicated, replicated), donate_argnums=0),
                          'train_step', context)
  # Fresh partials: jax.jit caches traces on the Python function, and this runtime's steps must
  # be traced under the levers of now, not those of an earlier runtime's first call.
  return Runtime(
      mesh=mesh, data_sharding=data_sharding, replicated=replicated, train_step=train_step,
      eval_step=compiled(jax.jit(functools.partial(step.eval_step, normalization=normalization),
                                 in_shardings=(replicated, data_sharding),
                                 out_shardings=replicated), 'eval_step', context),
      logits_step=compiled(jax.jit(functools.partial(step.logits_step,
                                                     normalization=normalization),
                                   in_shardings=(replicated, data_sharding),
                                   out_shardings=replicated), 'logits_step', context))


def check_bn_groups(group_size: int, batch_size: int, num_devices: int) -> None:
  """Refuses BatchNorm groups that straddle devices partly: each group must lie within one
  device's share of the batch (no communication) or cover whole shares (statistics all-reduced
  among those devices only). A group that ends inside another device's share would be correct but
  would make XLA move activations between devices at every BatchNorm."""
  share = batch_size // num_devices
  if group_size and share % group_size and group_size % share:
    raise ValueError(
        f'config.model.bn_group_size={group_size} straddles devices: each of the {num_devices} '
        f'devices holds {share} examples of the batch of {batch_size}; use a size that divides '
        f'{share} (per-device statistics at {share}) or a multiple of it, or 0 (the whole batch).')


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       image_shape: tuple[int, ...], tx: optax.GradientTransformation,
                       runtime: Runtime) -> step.TrainState:
  """The initial state (config.seed), replicated over the runtime's mesh."""
  chosen = levers.current()
  with chosen.tracing():
    variables = chosen.init_variables(model, jax.random.key(config.seed), image_shape)
    # Jitted: the optimiser's eager init compiles a kernel per distinct parameter shape, one jit
    # compiles them all at once and lands in the persistent cache.
    create = jax.jit(functools.partial(step.TrainState.create, apply_fn=model.apply, tx=tx),
                     out_shardings=runtime.replicated)
    return create(params=variables['params'], batch_stats=variables['batch_stats'])
