"""A workdir's files on a local disk or an object store (gs://, s3://), through etils.epath.

Orbax reaches the same places through the same library. Local paths keep what POSIX gives
(rename, append, fsync); an object store has none of these, but writes a whole object at once,
so each operation below picks the idiom that stays safe on both.
"""

from __future__ import annotations

import io
import os
from typing import Iterator

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL-style path (gs://bucket/run): an object store, not a local filesystem."""
  return '://' in os.fspath(path)


def absolute(path: str) -> str:
  """A local path made absolute with ~ expanded (Orbax needs absolute paths); a URL as given,
  without a trailing slash."""
  if is_remote(path):
    return os.fspath(epath.Path(path))
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *names: str) -> str:
  return os.fspath(epath.Path(path).joinpath(*names)) if is_remote(path) else os.path.join(
      path, *names)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  return epath.Path(path).is_file()


def listdir(path: str) -> list[str]:
  return sorted(child.name for child in epath.Path(path).iterdir())


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: str) -> None:
  epath.Path(path).unlink()


def rmtree(path: str) -> None:
  epath.Path(path).rmtree()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def open_text(path: str) -> Iterator[str]:
  return epath.Path(path).open()


def write_atomically(path: str, data: str | bytes) -> None:
  """Readers, and a run that was killed while writing, see the old file or the new, never half.

  Local: a temporary file, fsync'd, then os.replace. Object store: one write of the object,
  which the store makes visible whole or not at all (it has no rename to do it the local way).
  """
  if is_remote(path):
    target = epath.Path(path)
    if isinstance(data, bytes):
      target.write_bytes(data)
    else:
      target.write_text(data)
    return
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def append_text(path: str, text: str) -> None:
  """Appends to a file; on an object store (no append) the object is written again whole."""
  if is_remote(path):
    old = read_text(path) if exists(path) else ''
    write_atomically(path, old + text)
    return
  with open(path, 'a') as f:
    f.write(text)


def save_figure(figure, path: str) -> None:
  """Saves a matplotlib figure as PNG at a local or remote path."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png')
  if is_remote(path):
    write_atomically(path, buffer.getvalue())
  else:
    with open(path, 'wb') as f:
      f.write(buffer.getvalue())


def move_tree(source: str, target: str, marker: str | None = None) -> None:
  """Moves a directory. Local: one rename (atomic). Object store (no rename): the objects are
  copied, then the source removed, its `marker` object (the one that makes it count as complete)
  first, so a kill part way leaves the source incomplete rather than looking whole."""
  if not is_remote(source):
    os.rename(source, target)
    return
  for root, _, files in epath.Path(source).walk():
    relative = os.fspath(root)[len(source):].lstrip('/')
    for name in files:
      destination = epath.Path(target).joinpath(relative, name) if relative else epath.Path(
          target) / name
      destination.parent.mkdir(parents=True, exist_ok=True)
      (root / name).copy(destination, overwrite=True)
  remove_tree(source, marker)


def remove_tree(path: str, marker: str | None = None) -> None:
  """Removes a directory; on an object store its `marker` object goes first (see move_tree)."""
  if is_remote(path) and marker and exists(join(path, marker)):
    remove(join(path, marker))
  rmtree(path)
