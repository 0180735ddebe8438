"""The files of launch/accelerator_check.py: JSON written whole, and logs whose lines are timed
as they arrive (written by `stamp`, read back by the report). Standard library only."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL_LINES = 15


def write_json(path: str, value) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)  # A reader (or a kill) never sees half a file.


def read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def log_tail(path: str, lines: int = TAIL_LINES) -> list[str]:
  try:
    with open(path, errors='replace') as f:
      return [line.rstrip('\n') for line in f.readlines()[-lines:]]
  except OSError:
    return []


def read_lines(path: str) -> list[str] | None:
  try:
    with open(path) as f:
      return f.read().splitlines()
  except OSError:
    return None


def stamp(args) -> int:
  """Runs the command with its output, each line prefixed by the seconds since the start, in
  args.log; the exit status is the command's (128 + N for signal N, as a shell reports it)."""
  start = time.monotonic()
  with open(args.log, 'w') as log:
    log.write(f'[{0:9.3f}] $ {" ".join(args.command)}\n')
    log.flush()
    try:
      proc = subprocess.Popen(args.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              cwd=ROOT)
    except OSError as e:
      log.write(f'[{0:9.3f}] cannot start: {e}\n')
      return 127
    for raw in proc.stdout:
      line = raw.decode('utf-8', 'replace').rstrip('\n').rstrip('\r')
      log.write(f'[{time.monotonic() - start:9.3f}] {line}\n')
      log.flush()
    code = proc.wait()
  return code if code >= 0 else 128 - code


def stamped_lines(path: str) -> list[tuple[float, str]]:
  lines = []
  try:
    with open(path, errors='replace') as f:
      for line in f:
        match = re.match(r'\[\s*([\d.]+)\] (.*)', line.rstrip('\n'))
        if match:
          lines.append((float(match.group(1)), match.group(2)))
  except OSError:
    pass
  return lines
