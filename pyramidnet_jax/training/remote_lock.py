"""The workdir lock on an object store (gs://), which has no flock.

The lock is an object, WORKDIR/lock (lock.1, ... for the other processes of a run), holding its
holder's host, PID, start time, a random token and a heartbeat time that a background thread
rewrites every HEARTBEAT_S seconds. A run takes the lock when the object is absent, or when its
holder is gone: a process of this host that no longer runs, or a heartbeat older than STALE_S
(the holder was killed, or its host lost). Otherwise it is refused at once, naming the holder.

Why this rule: the path library (etils.epath) offers no create-if-absent on an object store, so
two runs starting together could both see no lock. Each writes its own token, waits
CONFIRM_S (longer than the gap between one run's check and write) and reads the object back; the
store reads back the last write (strong read-after-write consistency), so exactly one run finds
its own token and goes on, and the other is refused. A killed run cannot release its lock; the
heartbeat lets the next run take it STALE_S later without anyone deleting files, and at once on
the same host. Hosts' clocks are compared, so STALE_S is far above any NTP-kept skew. The
alternative, refusing remote workdirs the lock altogether, would let two runs mix a workdir's
checkpoints, which is the one thing the lock exists to stop.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from absl import logging

from pyramidnet_jax.training import storage

HEARTBEAT_S = 60.0
STALE_S = 600.0
CONFIRM_S = 2.0


class LockBusy(Exception):
  """The lock is held; args[0] is the holder as read from the lock object."""


@contextlib.contextmanager
def locked(path: str, holder: dict[str, Any],
           alive_here: Callable[[dict[str, Any]], bool]) -> Iterator[None]:
  """Holds the lock object at `path` for the block; LockBusy(holder) if another run holds it."""
  current = _read(path)
  if current and not _abandoned(current, alive_here):
    raise LockBusy(current)
  if current:
    logging.warning('Taking over %s from process %s on host %s: %s.', path, current.get('pid'),
                    current.get('host'), _why_abandoned(current))
  token = uuid.uuid4().hex
  mine = {**holder, 'token': token}
  _write(path, mine)
  time.sleep(CONFIRM_S)  # Another run that checked when we did has written by now.
  current = _read(path)
  if current.get('token') != token:
    raise LockBusy(current)
  stop = threading.Event()
  beat = threading.Thread(target=_heartbeat, args=(path, mine, stop), daemon=True,
                          name='workdir-lock-heartbeat')
  beat.start()
  try:
    yield
  finally:
    stop.set()
    beat.join()
    with contextlib.suppress(Exception):  # Released, unless another run took it over.
      if _read(path).get('token') == token:
        storage.remove(path)


def stale_hint(path: str, holder: dict[str, Any]) -> str:
  """What to do about a lock whose holder may be gone (for the refusal message)."""
  beat = holder.get('heartbeat')
  age = f'{time.time() - beat:.0f} s ago' if isinstance(beat, (int, float)) else 'never'
  return (f' Its last heartbeat was {age}; a run that died frees {path} {STALE_S:.0f} s after '
          'its last heartbeat (or delete that object if you know the holder is gone).')


def _abandoned(holder: dict[str, Any], alive_here: Callable[[dict[str, Any]], bool]) -> bool:
  if holder.get('host') == socket.gethostname():
    return not alive_here(holder)
  beat = holder.get('heartbeat')
  return not isinstance(beat, (int, float)) or time.time() - beat > STALE_S


def _why_abandoned(holder: dict[str, Any]) -> str:
  if holder.get('host') == socket.gethostname():
    return 'that process no longer runs'
  return f'no heartbeat for more than {STALE_S:.0f} s'


def _heartbeat(path: str, mine: dict[str, Any], stop: threading.Event) -> None:
  while not stop.wait(HEARTBEAT_S):
    try:
      current = _read(path)
      if current.get('token') != mine['token']:
        logging.error('%s was taken over by process %s on host %s while this run held it.',
                      path, current.get('pid'), current.get('host'))
        return
      _write(path, mine)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not renew the workdir lock %s: %s', path, e)


def _write(path: str, holder: dict[str, Any]) -> None:
  storage.write_atomically(path, json.dumps({**holder, 'heartbeat': time.time()}) + '\n')


def _read(path: str) -> dict[str, Any]:
  if not storage.exists(path):
    return {}
  try:
    return json.loads(storage.read_text(path) or '{}')
  except ValueError:
    return {'host': '?', 'heartbeat': None}  # Unreadable: treated as held by a dead run.
