"""Orbax checkpoints of a training run: the latest few and the best ones, each with its metadata.

A workdir holds `checkpoints/<step>/` (the latest `checkpoints_to_keep`) and `best/<step>/` (the
state with the best validation accuracy; `training/resume.py` says which steps are kept). Each
step saves three items:
- `state`: the TrainState pytree;
- `meta`: JSON, the same for every run that took the same steps: the model config, epoch,
  early-stopping counters, the epoch's running train sums, the class names, and sha256 digests of
  the state's layout (every leaf's path, dtype and shape) and of its bytes, so a workdir can be
  checked against the config that wants to resume it before any array is read, and a restore
  detects damaged files;
- `timing`: JSON, the wall time the run had spent when it was saved (it differs between runs
  that are otherwise identical, so it is kept out of `meta`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pyramidnet_jax.training import storage

LATEST = 'checkpoints'
BEST = 'best'
DIGEST = 'state_sha256'
LAYOUT = 'layout_sha256'


class CheckpointError(ValueError):
  """A checkpoint cannot be saved or used as asked; the message says what to do."""


class CorruptCheckpoint(Exception):
  """A committed checkpoint that does not read back as saved (the caller decides what follows)."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason


def create_manager(workdir: str, kind: str = LATEST,
                   max_to_keep: int | None = 2) -> ocp.CheckpointManager:
  """The manager of WORKDIR/kind; max_to_keep None keeps every step (deleted by the caller)."""
  directory = storage.join(storage.absolute(workdir), kind)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta', 'timing'))


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return storage.join(str(manager.directory), str(step))


def digests(state: Any) -> dict[str, str]:
  """{LAYOUT: sha256 of every leaf's path, dtype and shape; DIGEST: the same and its bytes}.

  Every process holds the whole replicated state, so each computes the same digests from its
  own copy.
  """
  layout, data = hashlib.sha256(), hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    array = _local_copy(leaf)
    header = f'{jax.tree_util.keystr(path)}|{array.dtype.name}|{array.shape}\n'.encode()
    layout.update(header)
    data.update(header)
    data.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
  return {LAYOUT: layout.hexdigest(), DIGEST: data.hexdigest()}


def layout_digest(target: Any) -> str:
  """The layout digest of a state with target's paths, dtypes and shapes (no bytes read)."""
  layout = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    layout.update(f'{jax.tree_util.keystr(path)}|{np.dtype(leaf.dtype).name}|'
                  f'{tuple(leaf.shape)}\n'.encode())
  return layout.hexdigest()


def _local_copy(leaf: Any) -> np.ndarray:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)  # Replicated: this process's copy is the whole array.
  return np.asarray(jax.device_get(leaf))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any],
         timing: dict[str, Any] | None = None) -> dict[str, Any]:
  """Starts saving `step` (Orbax commits it in the background); returns the meta saved with it,
  which carries the state's digests."""
  meta = {**meta, **digests(state)}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta),
                                             timing=ocp.args.JsonSave(timing or {})), force=True)
  return meta


def wait(manager: ocp.CheckpointManager, step: int) -> None:
  """Blocks until the save of `step` has committed; CheckpointError if it did not."""
  path = step_path(manager, step)
  try:
    manager.wait_until_finished()
  except Exception as e:  # A full disk, an I/O error: Orbax raises what the filesystem raised.
    raise CheckpointError(
        f'Saving the checkpoint {path} failed ({brief(e)}). The workdir still resumes from its '
        'last complete checkpoint: fix the cause and run the same command again.') from e
  if not storage.isdir(path):
    raise CheckpointError(
        f'Saving the checkpoint {path} failed (Orbax did not commit it; its log above says '
        'why). The workdir still resumes from its last complete checkpoint: fix the cause and '
        'run the same command again.')


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The metadata of `step`; CorruptCheckpoint if it cannot be read."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # Orbax raises several types for damaged files.
    raise CorruptCheckpoint(step_path(manager, step), f'its meta cannot be read: {brief(e)}') from e
  if not isinstance(meta, dict) or 'step' not in meta or 'model' not in meta:
    raise CorruptCheckpoint(step_path(manager, step), 'its meta lacks the step or the model')
  return meta


def read_timing(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The timing of `step` ({} for a checkpoint saved without one)."""
  if not storage.isdir(storage.join(step_path(manager, step), 'timing')):
    return {}
  try:
    return manager.restore(step, args=ocp.args.Composite(timing=ocp.args.JsonRestore()))['timing']
  except Exception as e:
    raise CorruptCheckpoint(step_path(manager, step),
                            f'its timing cannot be read: {brief(e)}') from e


def read_state(manager: ocp.CheckpointManager, step: int, target: Any,
               meta: dict[str, Any], on_host: bool = False) -> Any:
  """The state of `step`, laid out as target, checked against the digest in its meta.

  on_host: in host memory (a check only: no second copy of the state on the accelerator), not
  with target's shardings. CorruptCheckpoint if it cannot be read or its bytes differ from those
  saved. A checkpoint saved without digests is returned unchecked.
  """
  path = step_path(manager, step)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  if on_host:
    abstract = _on_host(abstract)
  try:
    state = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
  except Exception as e:
    raise CorruptCheckpoint(path, f'its state cannot be read: {brief(e)}') from e
  if DIGEST in meta and digests(state)[DIGEST] != meta[DIGEST]:
    raise CorruptCheckpoint(path, 'its state differs from the state saved (sha256 mismatch)')
  return state


def _on_host(abstract: Any) -> Any:
  try:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
  except RuntimeError:  # No CPU backend (JAX_PLATFORMS names only accelerators).
    return abstract
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract)


def brief(error: BaseException, limit: int = 300) -> str:
  """`Type: message` on one line, cut to `limit` characters (Orbax's can span pages)."""
  text = ' '.join(f'{type(error).__name__}: {error}'.split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


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
