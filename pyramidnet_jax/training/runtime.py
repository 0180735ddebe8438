"""The device mesh, batch placement and the compiled steps of one run.

The steps are `jax.jit` over a Mesh of all devices: every batch is split on the 'data' axis and
the state is replicated, so BatchNorm statistics are computed over the global batch. Each process
places its own part of every global batch (`put_batch`); jit then runs one SPMD program.
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
                   eval_batch_size: int | None = None) -> Runtime:
  """The runtime over `devices` (default: all); without a schedule, for evaluation only, in
  batches of `eval_batch_size` (default: config.eval_batch_size)."""
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
  compiled = levers.current().compiled
  context = config.to_json_best_effort(sort_keys=True)
  train_step = None
  if learning_rate_fn is not None:
    train = functools.partial(step.train_step, learning_rate_fn=learning_rate_fn,
                              label_smoothing=config.label_smoothing,
                              dropout_key=jax.random.key(config.seed + 1))
    train_step = compiled(jax.jit(train, in_shardings=(replicated, data_sharding),
                                  out_shardings=(replicated, replicated), donate_argnums=0),
                          'train_step', context)
  # Fresh partials: jax.jit caches traces on the Python function, and this runtime's steps must
  # be traced under the levers of now, not those of an earlier runtime's first call.
  return Runtime(
      mesh=mesh, data_sharding=data_sharding, replicated=replicated, train_step=train_step,
      eval_step=compiled(jax.jit(functools.partial(step.eval_step),
                                 in_shardings=(replicated, data_sharding),
                                 out_shardings=replicated), 'eval_step', context),
      logits_step=compiled(jax.jit(functools.partial(step.logits_step),
                                   in_shardings=(replicated, data_sharding),
                                   out_shardings=replicated), 'logits_step', context))


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
