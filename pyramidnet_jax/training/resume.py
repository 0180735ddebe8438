"""A run's two checkpoint managers as one recoverable unit: start-up repair, ordered saves, checks.

What holds after a kill, a disk error or an I/O error at any moment, so that the same command
resumes to the uninterrupted run's numbers:
- At an epoch's end best/<S> is saved and committed before checkpoints/<S> starts. A best step
  newer than the newest latest step is therefore from an epoch that checkpoints/ never recorded:
  start-up removes it, and the replayed epoch saves it again, bit for bit.
- best/ keeps every step that a kept latest checkpoint names as its best (a best step is deleted
  only once the latest save that stops naming it has committed), so a fall-back to an older
  latest checkpoint finds its best too.
- A best step that the resumed checkpoint names but best/ lacks (or holds damaged) is saved again
  from checkpoints/ at that step; where that is gone too, the run refuses: it never evaluates an
  older best.
- A checkpoint that does not read back as saved (meta unreadable, files missing, state unreadable
  or its sha256 changed) is named in the log and moved to WORKDIR/corrupted/<kind>-<step>; the
  run resumes from the newest good one, or, with none good, refuses and says what to move.
- Steps are deleted here, not by Orbax: renamed to an unfinished save's name first, so a kill
  leaves them whole or unfinished. Unfinished saves and deletions (`*.orbax-checkpoint-tmp*`)
  and files half written are removed at start-up, with a log line.
- metrics.jsonl keeps the records up to the resumed step: a killed run may have logged further,
  and half a line.
- The first checkpoint a process saves is read back at once, so a filesystem or path that does
  not keep checkpoints stops the run at its first save, not at its end.
In a multi-process run every process reads and restores (Orbax restores collectively) and reaches
the same verdicts from the same files; process 0 alone moves files, between barriers.
On an object store (gs://), which has no rename, Orbax writes a step in place and marks it
finished with a commit file last: a step without one is an unfinished save, deleting removes
that file first, and moving aside copies (see storage.move_tree).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

from absl import logging
import jax

from pyramidnet_jax.training import checkpoints
from pyramidnet_jax.training import storage
from pyramidnet_jax.training.checkpoints import BEST
from pyramidnet_jax.training.checkpoints import CheckpointError
from pyramidnet_jax.training.checkpoints import CorruptCheckpoint
from pyramidnet_jax.training.checkpoints import LATEST
from pyramidnet_jax.training.workdir import write_atomically

CORRUPTED_DIR = 'corrupted'
UNFINISHED = '.orbax-checkpoint-tmp'
# write_atomically's temporary files, of the files the loop writes so.
_ATOMIC_TEMPORARY = re.compile(r'(results\.json|class_names\.json|metrics\.jsonl)\.tmp\d+')
# The object Orbax writes last into a step saved on an object store, where it cannot rename.
COMMIT_FILE = 'commit_success.txt'


@dataclasses.dataclass
class Resumed:
  """What a run continues from: nothing (step 0) or a verified latest checkpoint."""
  step: int = 0
  state: Any = None
  meta: dict[str, Any] | None = None
  wall_time_s: float = 0.0  # Spent by the processes that took the run to this checkpoint.


class RunCheckpoints:
  """WORKDIR/checkpoints and WORKDIR/best, saved and repaired together (see the module doc)."""

  def __init__(self, workdir: str, checkpoints_to_keep: int):
    self.workdir = storage.absolute(workdir)
    _as_chief(lambda: _remove_unfinished(self.workdir), 'remove_unfinished')
    # Both are pruned here, not by Orbax, whose deletion a kill can leave half done: a step is
    # renamed to an unfinished save's name first, so start-up finishes its removal.
    self.keep = checkpoints_to_keep
    self.latest = checkpoints.create_manager(workdir, LATEST, None)
    self.best = checkpoints.create_manager(workdir, BEST, None)
    self.named: dict[int, int | None] = {}  # Latest step -> the best step its meta names.
    self._in_flight: int | None = None  # The latest step being saved in the background.
    self._read_back = False

  # --- Start-up ---------------------------------------------------------------------------------

  def resume(self, target: Any, check: Callable[[dict[str, Any]], None],
             with_best: bool) -> Resumed:
    """The newest good latest checkpoint, laid out as target, after repairing the workdir.

    `check(meta)` raises ValueError where this config cannot continue a checkpoint with that
    meta; it runs before the checkpoint's arrays are read, so a changed config is reported as
    such and never taken for a damaged checkpoint. with_best: the run has a validation split,
    so best/ must hold the best step the checkpoint names.
    """
    layout = checkpoints.layout_digest(target)
    resumed, corrupt = Resumed(), []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        meta = checkpoints.read_meta(self.latest, step)
        check(meta)
        _check_layout(meta, layout, checkpoints.step_path(self.latest, step))
        state = checkpoints.read_state(self.latest, step, target, meta)
        timing = checkpoints.read_timing(self.latest, step)
      except CorruptCheckpoint as e:
        corrupt.append((step, e))
        continue
      if checkpoints.DIGEST not in meta:
        logging.warning('%s was saved without checksums (by an earlier version): resumed from it '
                        'unverified.', checkpoints.step_path(self.latest, step))
      resumed = Resumed(step, state, _without_digests(meta), float(timing.get('wall_time_s', 0)))
      break
    if corrupt and resumed.meta is None:
      listed = '; '.join(f'{e.path}: {e.reason}' for _, e in corrupt)
      raise CheckpointError(
          f'Every checkpoint in {self.latest.directory} is damaged ({listed}), so this run '
          f'cannot be resumed. To start it afresh here, move {self.latest.directory} and '
          f'{self.best.directory} out of {self.workdir}; or use a new --workdir.')
    for step, e in corrupt:
      self._move_aside(self.latest, step, e.reason)
    self.named = {}
    for step in self.latest.all_steps():
      if step < resumed.step:
        try:
          self.named[step] = checkpoints.read_meta(self.latest, step).get('best_step')
        except CorruptCheckpoint as e:
          self._move_aside(self.latest, step, e.reason)
    if resumed.meta is not None:
      self.named[resumed.step] = resumed.meta.get('best_step')
    self._prune(newest=resumed.step if resumed.meta is not None else -1, at_start=True)
    best_step = (resumed.meta or {}).get('best_step')
    if with_best and best_step is not None:
      self.restore_best(best_step, target, on_host=True,
                        named_by=checkpoints.step_path(self.latest, resumed.step))
    return resumed

  # --- Saving -----------------------------------------------------------------------------------

  def save_best(self, step: int, state: Any, meta: dict[str, Any],
                timing: dict[str, Any]) -> None:
    """Saves best/<step> and waits for its commit (the latest save of the step comes after)."""
    checkpoints.save(self.best, step, state, meta, timing)
    checkpoints.wait(self.best, step)
    self._read_back_once(self.best, step, state)

  def save_latest(self, step: int, state: Any, meta: dict[str, Any],
                  timing: dict[str, Any]) -> None:
    """Starts saving checkpoints/<step>, once the previous one has committed."""
    self.settle()
    checkpoints.save(self.latest, step, state, meta, timing)
    self.named[step] = meta.get('best_step')
    self._in_flight = step
    if not self._read_back:
      self.settle()
      self._read_back_once(self.latest, step, state)

  def settle(self) -> None:
    """Waits for the latest save in flight to commit, then deletes the latest steps beyond
    checkpoints_to_keep and the best steps no kept latest checkpoint names."""
    if self._in_flight is None:
      return
    step, self._in_flight = self._in_flight, None
    checkpoints.wait(self.latest, step)
    self._prune(newest=step, at_start=False)

  def abandon(self) -> None:
    """On the way out of a failed run: lets saves in flight end and prunes as settle does, quietly
    (the workdir stays resumable whether or not they commit)."""
    try:
      self.settle()
      self.best.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('A checkpoint save in flight failed as the run stopped: %s',
                      checkpoints.brief(e))

  def _read_back_once(self, manager, step: int, state: Any) -> None:
    if self._read_back:
      return
    path = checkpoints.step_path(manager, step)
    try:
      checkpoints.read_state(manager, step, state, checkpoints.read_meta(manager, step),
                             on_host=True)
    except CorruptCheckpoint as e:
      raise CheckpointError(
          f'The checkpoint {path} was saved but does not read back ({e.reason}): checkpoints '
          f'in {self.workdir} cannot be resumed or evaluated, so the run stopped at step {step} '
          'instead of training on. Use a --workdir on another filesystem (or a plainer path).'
      ) from e
    self._read_back = True

  # --- best/ ------------------------------------------------------------------------------------

  def restore_best(self, step: int, target: Any, on_host: bool = False,
                   named_by: str | None = None) -> Any:
    """best/<step>, verified; saved again from checkpoints/<step> if missing or damaged there.

    on_host: a check only, see checkpoints.read_state. CheckpointError where no good copy of that
    step is left (never an older best instead).
    """
    problem = 'is missing'
    if step in self.best.all_steps():
      try:
        meta = checkpoints.read_meta(self.best, step)
        return checkpoints.read_state(self.best, step, target, meta, on_host=on_host)
      except CorruptCheckpoint as e:
        moved = self._move_aside(self.best, step, e.reason)
        problem = f'was damaged ({e.reason}) and moved to {moved}'
    path = checkpoints.step_path(self.best, step)
    source = checkpoints.step_path(self.latest, step)
    if step in self.latest.all_steps():
      try:
        meta = checkpoints.read_meta(self.latest, step)
        state = checkpoints.read_state(self.latest, step, target, meta)
        timing = checkpoints.read_timing(self.latest, step)
      except CorruptCheckpoint as e:
        problem += f', and {source} is damaged too ({e.reason})'
      else:
        logging.warning('%s %s; saving it again from %s.', path, problem, source)
        checkpoints.save(self.best, step, state, _without_digests(meta), timing)
        checkpoints.wait(self.best, step)
        return state
    else:
      problem += f', and {source} is no longer kept'
    named_by = named_by or f'the run\'s final checkpoint in {self.latest.directory}'
    raise CheckpointError(
        f'{named_by} names {path} as the best state on validation, but {path} {problem}, so '
        'that state is lost and this run cannot be evaluated as recorded. To train it again, '
        f'move {self.latest.directory} and {self.best.directory} out of {self.workdir}; or use '
        'a new --workdir.')

  def _prune(self, newest: int, at_start: bool) -> None:
    """Deletes the latest steps beyond the newest checkpoints_to_keep, then the best steps up to
    `newest` (the newest committed latest step) that no kept latest checkpoint names. A newer
    best step is, during the run, the best of an epoch whose latest save comes next; at
    start-up, one from an epoch that checkpoints/ never recorded, which the replay saves again."""
    for step in sorted(self.latest.all_steps())[:-self.keep]:
      self._delete(self.latest, step)
    kept_latest = set(self.latest.all_steps())
    self.named = {s: b for s, b in self.named.items() if s in kept_latest}
    keep = set(self.named.values())
    for step in self.best.all_steps():
      if step in keep or (step > newest and not at_start):
        continue
      if step > newest:
        logging.warning('Removing %s: its epoch was never recorded in %s (the resumed run '
                        'saves it again).', checkpoints.step_path(self.best, step),
                        self.latest.directory)
      else:
        logging.info('Removing %s: no kept checkpoint names it as its best.',
                     checkpoints.step_path(self.best, step))
      self._delete(self.best, step)

  def _delete(self, manager, step: int) -> None:
    path = checkpoints.step_path(manager, step)
    doomed = f'{path}{UNFINISHED}-deleted'

    def delete():
      if storage.is_remote(path):
        storage.remove_tree(path, COMMIT_FILE)  # Unfinished once its commit file is gone.
        return
      if os.path.exists(doomed):
        storage.rmtree(doomed)
      os.rename(path, doomed)  # Atomic: a kill leaves the step whole, or an unfinished save.
      storage.rmtree(doomed)
    _as_chief(delete, f'delete_{_kind(manager)}_{step}')
    manager.reload()

  def _move_aside(self, manager, step: int, reason: str) -> str:
    """Moves a damaged step directory to WORKDIR/corrupted/<kind>-<step>; returns where."""
    source = checkpoints.step_path(manager, step)
    kind = _kind(manager)
    target = storage.join(self.workdir, CORRUPTED_DIR, f'{kind}-{step}')
    suffix = 1
    while storage.exists(target):
      suffix += 1
      target = storage.join(self.workdir, CORRUPTED_DIR, f'{kind}-{step}.{suffix}')

    def move():
      storage.makedirs(storage.join(self.workdir, CORRUPTED_DIR))
      storage.move_tree(source, target, COMMIT_FILE)
    _as_chief(move, f'move_aside_{kind}_{step}')
    manager.reload()
    logging.warning('The checkpoint %s is damaged (%s): moved to %s.', source, reason, target)
    return target


def _check_layout(meta: dict[str, Any], layout: str, path: str) -> None:
  saved = meta.get(checkpoints.LAYOUT)
  if saved is not None and saved != layout:
    raise CheckpointError(
        f'The state in {path} has other arrays (names, shapes or dtypes) than this config '
        'builds: the model, optimiser or dataset changed since it was saved. Resume with the '
        'config it was trained with, or use a new --workdir.')


def _kind(manager) -> str:
  return str(manager.directory).rstrip('/').rsplit('/', 1)[-1]


def _without_digests(meta: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in meta.items() if k not in (checkpoints.DIGEST, checkpoints.LAYOUT)}


def _remove_unfinished(workdir: str) -> None:
  """Removes what killed runs left half made: saves, deletions, files written atomically."""
  if storage.isdir(workdir):
    for name in storage.listdir(workdir):
      if _ATOMIC_TEMPORARY.fullmatch(name):
        logging.warning('Removing %s: a file that a stopped run never finished writing.',
                        storage.join(workdir, name))
        storage.remove(storage.join(workdir, name))
  for kind in (LATEST, BEST):
    directory = storage.join(workdir, kind)
    if not storage.isdir(directory):
      continue
    for name in storage.listdir(directory):
      path = storage.join(directory, name)
      if UNFINISHED in name or (storage.is_remote(path) and name.isdigit()
                                and not storage.exists(storage.join(path, COMMIT_FILE))):
        logging.warning('Removing %s: a save that a stopped run never finished.', path)
        storage.rmtree(path)


def _as_chief(action: Callable[[], None], name: str) -> None:
  """Runs a filesystem change on process 0 only; every process waits for it."""
  if jax.process_index() == 0:
    action()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'pyramidnet_jax.resume.{name}')


# --- The workdir's other files ------------------------------------------------------------------


def check_class_names(meta: dict[str, Any], class_names: tuple[str, ...], workdir: str,
                      names_file: str) -> None:
  """ValueError naming the classes added and removed since the run started, if any."""
  started = meta.get('class_names')
  if started is None and storage.isfile(names_file):
    started = json.loads(storage.read_text(names_file))
  if started is None or list(started) == list(class_names):
    return
  added = [n for n in class_names if n not in started]
  removed = [n for n in started if n not in class_names]
  parts = [f'{verb} {", ".join(map(repr, names))}'
           for verb, names in (('added', added), ('removed', removed)) if names]
  what = '; '.join(parts) or 'the same names in another order'
  raise ValueError(
      f'The dataset\'s classes changed since {workdir} started ({what}: {len(started)} classes '
      f'then, {len(class_names)} now), so its checkpoints cannot be continued. Restore the '
      'dataset\'s class folders as they were, or use a new --workdir.')


def truncate_metrics(path: str, step: int) -> None:
  """Keeps the records of steps up to `step` (those the resumed run does not repeat): a killed
  run may have logged steps after its last checkpoint, and half a line."""
  if not storage.isfile(path):
    return
  with storage.open_text(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
      if line.endswith('\n') and record['step'] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass
  if kept != lines:
    dropped = len(lines) - len(kept)
    logging.warning('%s: dropping %d records after step %d, which the resumed run logs again.',
                    path, dropped, step)
    write_atomically(path, ''.join(kept))
