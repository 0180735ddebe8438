"""Orbax checkpoints of a training run: the latest few and the best one, each with its metadata.

A workdir holds `checkpoints/<step>/` (the latest `checkpoints_to_keep`) and `best/<step>/` (the
state with the best validation accuracy). Each step saves two items: `state` (the TrainState
pytree) and `meta` (JSON: the model config, epoch, early-stopping counters), so a workdir can be
checked against the config that wants to resume it before any array is read.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

LATEST = 'checkpoints'
BEST = 'best'


def create_manager(workdir: str, kind: str = LATEST, max_to_keep: int = 2) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), kind)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any] | None:
  """The metadata of `step` (default: the latest), or None if the manager holds no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # Orbax raises several types for damaged files.
    raise _unreadable(manager, step, e) from e


def restore_state(manager: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
  """The state saved at `step` (default: latest), with the shapes, dtypes and shardings of target."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  except Exception as e:
    raise _unreadable(manager, step, e) from e
  return restored['state']


def _unreadable(manager: ocp.CheckpointManager, step: int, error: Exception) -> RuntimeError:
  path = os.path.join(str(manager.directory), str(step))
  return RuntimeError(
      f'The checkpoint {path} cannot be read ({type(error).__name__}: {error}). Nothing was '
      'deleted. To resume from an earlier checkpoint, move this step directory out of the way; '
      'to start afresh, use a new --workdir.')


def config_differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = '') -> list[str]:
  """Human-readable list of the fields where two (nested) config dicts differ."""
  differences = []
  for key in sorted(set(saved) | set(wanted)):
    name = f'{prefix}{key}'
    if key not in saved or key not in wanted:
      where = 'checkpoint' if key not in wanted else 'config'
      differences.append(f'{name} is only in the {where}')
    elif isinstance(saved[key], dict) and isinstance(wanted[key], dict):
      differences.extend(config_differences(saved[key], wanted[key], f'{name}.'))
    elif _normalise(saved[key]) != _normalise(wanted[key]):
      differences.append(f'{name}: checkpoint has {saved[key]!r}, config has {wanted[key]!r}')
  return differences


def _normalise(value: Any) -> Any:
  # JSON turns tuples into lists and may turn 48.0 into 48; compare by value.
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return value
  return float(value)
