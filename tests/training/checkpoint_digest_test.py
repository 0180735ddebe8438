"""Checkpoints carry sha256 digests of their state, and a restore checks them.

Orbax stores incompressible chunks (trained float weights) as raw zstd blocks without a checksum,
so flipped bytes there restore without any error: only the digest saved in the step's meta can
tell. These tests find such a silent corruption on disk first, so they check the digest and not
a decompression error.
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pyramidnet_jax.training import checkpoints
from tests import helpers


def saved_state(directory):
  rng = np.random.default_rng(0)
  state = {'w': jnp.asarray(rng.standard_normal((64, 64), np.float32)),
           'b': jnp.asarray(rng.standard_normal((64,), np.float32)),
           'step': jnp.asarray(3, jnp.int32)}
  manager = checkpoints.create_manager(directory, checkpoints.LATEST, None)
  meta = checkpoints.save(manager, 3, state, {'step': 3, 'model': {}})
  checkpoints.wait(manager, 3)
  return manager, state, meta


def raw_restore(manager, state):
  """Orbax's own restore, without the digest check."""
  abstract = {k: ocp.utils.to_shape_dtype_struct(v) for k, v in state.items()}
  return manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))


def test_digests_follow_every_byte_and_the_layout():
  rng = np.random.default_rng(0)
  state = {'a': rng.standard_normal((3, 4)).astype(np.float32), 'b': np.arange(5)}
  first = checkpoints.digests(state)
  assert checkpoints.digests({k: v.copy() for k, v in state.items()}) == first
  flipped = state['a'].copy()
  flipped.reshape(-1).view(np.uint8)[7] ^= 1
  changed = checkpoints.digests({**state, 'a': flipped})
  assert changed[checkpoints.DIGEST] != first[checkpoints.DIGEST]
  assert changed[checkpoints.LAYOUT] == first[checkpoints.LAYOUT]
  reshaped = checkpoints.digests({**state, 'a': state['a'].reshape(4, 3)})
  assert reshaped[checkpoints.LAYOUT] != first[checkpoints.LAYOUT]
  assert checkpoints.layout_digest(state) == first[checkpoints.LAYOUT]


def test_silently_flipped_bytes_are_caught_by_the_digest(tmp_path):
  manager, state, meta = saved_state(str(tmp_path / 'run'))
  step_dir = checkpoints.step_path(manager, 3)
  pristine = str(tmp_path / 'pristine')
  shutil.copytree(step_dir, pristine)
  helpers.assert_trees_equal(checkpoints.read_state(manager, 3, state, meta), state)

  # Flip 64 bytes at places of the largest data file until Orbax restores without an error
  # what differs from the state saved: the corruption the issue observed.
  silent = None
  for fraction in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8):
    shutil.rmtree(step_dir)
    shutil.copytree(pristine, step_dir)
    flip_at(step_dir, fraction)
    try:
      restored = raw_restore(manager, state)['state']
    except Exception:  # pylint: disable=broad-except
      continue  # A decompression error: not silent.
    if any(not np.array_equal(restored[k], state[k]) for k in state):
      silent = fraction
      break
  assert silent is not None, 'no silent corruption found: the test would prove nothing'

  with pytest.raises(checkpoints.CorruptCheckpoint, match='sha256'):
    checkpoints.read_state(manager, 3, state, meta)
  with pytest.raises(checkpoints.CorruptCheckpoint, match='sha256'):
    checkpoints.read_state(manager, 3, state, meta, on_host=True)


def test_unreadable_meta_counts_as_corruption(tmp_path):
  manager, _, _ = saved_state(str(tmp_path / 'run'))
  with open(os.path.join(checkpoints.step_path(manager, 3), 'meta', 'metadata'), 'r+') as f:
    f.truncate(5)
  with pytest.raises(checkpoints.CorruptCheckpoint, match='meta cannot be read'):
    checkpoints.read_meta(manager, 3)


def flip_at(step_dir, fraction, count=64):
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           for name in names if os.path.basename(root) == 'd']
  path = max(sorted(files), key=os.path.getsize)
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    start = int(len(data) * fraction)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    f.seek(0)
    f.write(data)
