"""The optimiser and its learning-rate schedule, from the config."""

from __future__ import annotations

import ml_collections
import optax

from pyramidnet_jax import levers


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                            total_steps: int) -> optax.Schedule:
  """Linear warm-up, then piecewise-constant (boundaries in epochs) or cosine decay."""
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  if config.lr_schedule == 'piecewise':
    main = optax.piecewise_constant_schedule(
        config.learning_rate,
        # Boundaries count from the start of training, the warm-up included.
        {int(round(b * steps_per_epoch)) - warmup_steps: config.lr_decay
         for b in config.lr_boundaries})
  elif config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(config.learning_rate, max(1, total_steps - warmup_steps))
  else:
    raise ValueError(f'Unknown lr_schedule {config.lr_schedule!r}: expected "piecewise" or '
                     '"cosine".')
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and coupled L2 weight decay on every parameter (BN included).

  The decay is added to the gradient before momentum, as PyTorch's SGD(weight_decay=...) does.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(levers.current().learning_rate(learning_rate_fn), momentum=config.momentum,
                nesterov=config.nesterov))
