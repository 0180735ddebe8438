"""What a training workdir must be before a run uses it: usable, its own, and consistent.

- `check_path`: refuses a path the checkpoint library cannot represent, an existing file, or a
  place this process cannot write, before anything is trained.
- `locked`: one training per workdir; a second is refused at once, naming the holder.
A workdir may be local or on an object store (--workdir=gs://bucket/run): every file goes
through `storage` (etils.epath), and the lock through `remote_lock` there.
- `record_config`: config.json describes the run from its first step; a resume must use the same
  training-relevant fields, and the few changes allowed are recorded in config_changes.jsonl.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Iterator, Sequence

from pyramidnet_jax.training import remote_lock
from pyramidnet_jax.training import storage

CONFIG_FILE = 'config.json'
CHANGES_FILE = 'config_changes.jsonl'
LOCK_FILE = 'lock'

# Fields that do not change the trained numbers (beyond float rounding): where and how often
# to log and save, how to compile, where the data is read from, the evaluation batch size.
FREE_FIELDS = frozenset((
    'progress_bar', 'log_every_steps', 'checkpoint_every_steps', 'checkpoints_to_keep',
    'write_report', 'profile_steps', 'compilation_cache_dir', 'cpu_conv',
    'xla_cpu_concurrency_scheduler', 'cpu_keep_freed_memory', 'data_dir', 'eval_batch_size'))
# Fields that only decide where the run stops, so the steps already taken stay those of the run
# described: extending a run, or stopping it earlier or later. Every other field (model, data,
# augmentation, batch size, schedule, optimiser, seed, ...) shapes the steps already taken, and
# so needs a new workdir.
CHANGEABLE_FIELDS = ('num_epochs', 'num_train_steps', 'early_stopping_patience',
                     'early_stopping_min_delta')
# Training fields added after workdirs were written, with the value that computes what a config
# without them computed: a config.json that lacks one compares as holding that value.
ADDED_FIELDS = {'model.bn_group_size': 0}

# Orbax reads its own files back through glob patterns of the whole path, so a '[...]' class,
# a backslash or '**' in the path makes it miss them: training runs and the first restore fails.
# A lone '*' or '?' still matches its own name and works. Brackets are refused alone as well as
# paired, which is simpler to state.
_PATTERN_CHARACTERS = ('[', ']', '\\', '**')


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked; the message says why and what to do."""


def check_path(workdir: str) -> None:
  """Raises WorkdirError for a workdir the run could not write or read back its checkpoints in."""
  if not workdir:
    raise WorkdirError('--workdir is empty: give a directory for checkpoints, logs and results.')
  path = storage.absolute(workdir)
  bad = [c for c in _PATTERN_CHARACTERS if c in path]
  if bad:
    raise WorkdirError(
        f'--workdir={workdir}: the checkpoint library (Orbax) reads paths with '
        f'{" or ".join(map(repr, bad))} as file patterns and could not restore its checkpoints '
        f'from {path}; choose a path without [, ], \\ or **.')
  if storage.is_remote(path):
    _check_remote_path(workdir, path)
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'--workdir={workdir} is an existing file, not a directory; choose '
                       'another path.')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f'--workdir={workdir}: {existing} is a file, so the workdir cannot be '
                       'made there; choose another path.')
  if not os.access(existing, os.W_OK | os.X_OK) or _read_only_filesystem(existing):
    what = 'the workdir' if existing == path else f'{existing}, where the workdir would be made,'
    raise WorkdirError(f'--workdir={workdir}: {what} is not writable by this user; choose a '
                       'writable path or fix its permissions.')


def _check_remote_path(workdir: str, path: str) -> None:
  """An object store's workdir: a bucket is named, the path is no object, and a probe object can
  be written there (an object store has no permission bits to read beforehand)."""
  scheme, rest = workdir.split('://', 1)
  if not rest.split('/')[0]:
    raise WorkdirError(f'--workdir={workdir} names no bucket; give {scheme}://BUCKET/RUN.')
  try:
    if storage.isfile(path):
      raise WorkdirError(f'--workdir={workdir} is an existing object, not a directory; choose '
                         'another path.')
    probe = storage.join(path, f'.write_probe.{socket.gethostname()}.{os.getpid()}')
    storage.write_atomically(probe, '')
    storage.remove(probe)
  except WorkdirError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Each store raises its own types.
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
    raise WorkdirError(f'--workdir={workdir} cannot be written by this process ({reason}); check '
                       'the bucket name, the credentials and their permissions.') from None


def _read_only_filesystem(path: str) -> bool:
  # os.access ignores a read-only mount for root on some systems; statvfs says it for all users.
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Holds WORKDIR's lock for the block; raises WorkdirError at once if another run holds it.

  The lock is an flock on WORKDIR/lock (the kernel releases it when its holder dies, so a lock
  left by a killed run is simply taken over), with the holder's host, PID and start time
  written in the file for the message. Where the filesystem has no flock, an exclusively
  created WORKDIR/lock.pid stands in for it, and one left by a dead process of this host is
  taken over. In a multi-process run each process locks its own file (lock, lock.1, ...), so a
  second run on the same shared workdir is refused on every process. On an object store (no
  flock) the lock is an object with a heartbeat: see remote_lock for its rule and why.
  """
  if storage.is_remote(workdir):
    path = storage.join(workdir, LOCK_FILE + _process_suffix())
    try:
      with remote_lock.locked(path, _holder(), _alive_here):
        yield
    except remote_lock.LockBusy as e:
      raise WorkdirError(_busy_message(workdir, e.args[0]) +
                         remote_lock.stale_hint(path, e.args[0])) from None
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE + _process_suffix())
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirError(_busy_message(workdir, _read_holder(path))) from None
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      raise
    with _pid_file_lock(workdir, path + '.pid'):
      yield
    return
  try:
    _write_holder(fd)
    yield
  finally:
    # Emptied, not deleted: a run waiting on this inode must not lock a file no longer there.
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)
    os.close(fd)  # Releases the flock.


def _process_suffix() -> str:
  jax = sys.modules.get('jax')  # Only a run that set up JAX can be one of several processes.
  index = jax.process_index() if jax is not None else 0
  return f'.{index}' if index else ''


def _holder() -> dict[str, Any]:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'process_start': _process_start(os.getpid()), 'command': ' '.join(sys.argv)}


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (tells a reused PID from its first owner), if known."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _write_holder(fd: int) -> None:
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(_holder()) + '\n').encode(), 0)
  os.fsync(fd)


def _read_holder(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.loads(f.read() or '{}')
  except (OSError, ValueError):
    return {}


def _busy_message(workdir: str, holder: dict[str, Any]) -> str:
  if holder.get('pid'):
    command = str(holder.get('command', '?'))
    command = command if len(command) <= 120 else command[:117] + '...'
    who = (f'process {holder["pid"]} on host {holder.get("host", "?")} (started '
           f'{holder.get("started", "?")}: {command})')
  else:
    who = 'another process (it has not written its host and PID yet)'
  return (f'{workdir} is in use by {who}: two trainings in one workdir would mix their '
          'checkpoints and logs. Wait for it to finish, stop it, or use another --workdir.')


def _alive_here(holder: dict[str, Any]) -> bool:
  pid = holder.get('pid')
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Alive, owned by another user.
  start = holder.get('process_start')
  return start is None or _process_start(pid) in (None, start)


@contextlib.contextmanager
def _pid_file_lock(workdir: str, path: str) -> Iterator[None]:
  """The lock without flock: an exclusively created file naming its holder."""
  for _ in range(2):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      break
    except FileExistsError:
      holder = _read_holder(path)
      if holder.get('host') != socket.gethostname():
        raise WorkdirError(
            _busy_message(workdir, holder) + f' This filesystem has no flock, so a run that died '
            f'on another host leaves {path} behind: if the holder is gone, delete that file.'
        ) from None
      if _alive_here(holder) or not _take_over(path, holder):
        raise WorkdirError(_busy_message(workdir, holder)) from None
  else:
    raise WorkdirError(_busy_message(workdir, _read_holder(path)))
  try:
    _write_holder(fd)
  finally:
    os.close(fd)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


def _take_over(path: str, holder: dict[str, Any]) -> bool:
  """Removes a dead holder's file, unless another process is taking it over at the same time."""
  guard = path + '.takeover'
  try:
    os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
  except FileExistsError:
    return False
  try:
    if _read_holder(path) != holder:
      return False  # Taken over by another run between our reads.
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
    return True
  finally:
    os.unlink(guard)


def record_config(workdir: str, config, allowed_changes: Sequence[str] = ()) -> None:
  """Writes WORKDIR/config.json at a run's first start; at a resume, checks the config against it.

  A resume may change FREE_FIELDS freely and the CHANGEABLE_FIELDS named in `allowed_changes`;
  those changes are appended to WORKDIR/config_changes.jsonl (old and new values, time), and
  config.json is never overwritten, so the two files together describe every step. Any other
  difference raises WorkdirError naming the fields. Only process 0 writes.
  """
  not_changeable = sorted(set(allowed_changes) - set(CHANGEABLE_FIELDS))
  if not_changeable:
    raise WorkdirError(
        f'--allow_config_change: {", ".join(not_changeable)} cannot be changed on resume (only '
        f'{", ".join(CHANGEABLE_FIELDS)} can); the other fields shape the steps already taken, '
        'so a changed one needs a new --workdir.')
  wanted = json.loads(config.to_json()) if hasattr(config, 'to_json') else dict(config)
  auto = _resolve_auto_fields(wanted)
  path = storage.join(workdir, CONFIG_FILE)
  writer = _process_suffix() == ''
  if not storage.exists(path):
    if writer:
      write_atomically(path, json.dumps(wanted, indent=2) + '\n')
    return
  stored = _with_added_fields(_current_config(workdir, path))
  changed = {name: (old, new) for name, (old, new) in _differences(stored, wanted).items()
             if name not in FREE_FIELDS}
  refused = sorted(name for name in changed if name not in allowed_changes)
  if refused:
    listed = '; '.join(f'{name}: {_show(changed[name][0])} in the workdir, '
                       f'{_show(changed[name][1])} now{auto.get(name, "")}' for name in refused)
    allowable = [name for name in refused if name in CHANGEABLE_FIELDS]
    hint = (f' To change {", ".join(allowable)} on purpose, add '
            f'--allow_config_change={",".join(allowable)}.' if allowable else '')
    raise WorkdirError(
        f'{workdir} was trained with another config ({path}): {listed}. Resume with the same '
        f'values, or use a new --workdir.{hint}')
  if changed and writer:
    record = {'time': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
              'changes': {name: {'old': old, 'new': new}
                          for name, (old, new) in sorted(changed.items())}}
    storage.append_text(storage.join(workdir, CHANGES_FILE), json.dumps(record) + '\n')


def _current_config(workdir: str, path: str) -> dict[str, Any]:
  """config.json with the recorded changes applied in order."""
  try:
    config = json.loads(storage.read_text(path))
    changes_path = storage.join(workdir, CHANGES_FILE)
    if storage.exists(changes_path):
      with storage.open_text(changes_path) as f:
        for line in f:
          if line.strip():
            for name, change in json.loads(line)['changes'].items():
              _set(config, name, change['new'])
  except (ValueError, KeyError, TypeError) as e:
    raise WorkdirError(f'{path} or its {CHANGES_FILE} cannot be read ({e}); restore them from a '
                       'backup, or use a new --workdir.') from None
  return config


def _resolve_auto_fields(config: dict[str, Any]) -> dict[str, str]:
  """Replaces config.model's 'auto' fields (dtype, channel_multiple) by what they mean on this
  platform, as config.json records them: a workdir then resumes under 'auto' where it computes
  the same (an old CPU workdir's 'float32' and 1 on a CPU), and is refused, naming the field,
  where 'auto' would compute otherwise (a CPU run resumed on a GPU). Returns a note per field."""
  from pyramidnet_jax.models import platforms  # pylint: disable=g-import-not-at-top
  model = config.get('model')
  if not isinstance(model, dict):
    return {}
  resolved = platforms.resolved_auto_fields(model)
  model.update(resolved)
  where = platforms.current_platform()
  return {f'model.{field}': f" ('auto' on {where}; pass the workdir's value to resume)"
          for field in resolved}


def _with_added_fields(config: dict[str, Any]) -> dict[str, Any]:
  for name, value in ADDED_FIELDS.items():
    *parents, leaf = name.split('.')
    tree = config
    for parent in parents:
      tree = tree.get(parent) if isinstance(tree, dict) else None
    if isinstance(tree, dict) and leaf not in tree:
      tree[leaf] = value
  return config


def _set(tree: dict[str, Any], name: str, value: Any) -> None:
  *parents, leaf = name.split('.')
  for parent in parents:
    tree = tree.setdefault(parent, {})
  tree[leaf] = value


def _differences(old: dict[str, Any], new: dict[str, Any],
                 prefix: str = '') -> dict[str, tuple[Any, Any]]:
  found = {}
  for key in sorted(set(old) | set(new)):
    a, b, name = old.get(key, _ABSENT), new.get(key, _ABSENT), f'{prefix}{key}'
    if isinstance(a, dict) and isinstance(b, dict):
      found.update(_differences(a, b, f'{name}.'))
    elif _normalise(a) != _normalise(b):
      found[name] = (a, b)
  return found


_ABSENT = '(absent)'


def _normalise(value: Any) -> Any:
  # Compared by value: 3 and 3.0 are the same number, a tuple and a list the same sequence.
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return value


def _show(value: Any) -> str:
  return value if value is _ABSENT else json.dumps(value)


write_atomically = storage.write_atomically  # Where the other modules import it from.
