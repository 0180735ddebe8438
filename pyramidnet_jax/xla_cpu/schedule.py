"""The learning rate computed once per step on XLA:CPU, for the CPU kit."""

from __future__ import annotations

import jax
import optax


def computed_once(schedule: optax.Schedule) -> optax.Schedule:
  """The same schedule, computed inside a conditional.

  XLA:CPU copies a cheap scalar computation into every kernel that reads it: the learning rate
  (about 25 scalar operations for a piecewise schedule) into each parameter's update, a fifth of
  a deep PyramidNet's step, parsed again on every load from the persistent cache. XLA does not fuse
  across a conditional, so with the schedule as both of its branches the rate is computed once.
  On a GPU a conditional can make the host wait, which is one reason this is the CPU's only.
  """
  def schedule_fn(count):
    return jax.lax.cond(count >= 0, schedule, schedule, count)
  return schedule_fn
