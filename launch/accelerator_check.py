"""The Python side of launch/accelerator_check.sh: the device probe, the kill-and-resume runs, and
the JSON report. The shell script runs each step under its own `timeout`; this file does what is
easier in Python, here and in accelerator_check_files.py (JSON and timed logs),
accelerator_check_resume.py (kill-and-resume) and accelerator_check_report.py (the JSON report).
Subcommands:

  install --wheels=DIR --python=PY [--make_venv]
                                     pip install --no-index from DIR: requirements.txt and
                                     the cuda12 extra (the venv of PY made first if asked)
  devices --out=FILE                 what JAX sees (devices, platform, kind, memory) and versions
  stamp --log=FILE -- COMMAND...     runs COMMAND, its output lines timed into FILE
  resume --out=FILE --scratch=DIR [--reference=WORKDIR] -- MAIN_ARGS...
                                     kill-and-resume against an uninterrupted run, with XLA's
                                     deterministic GPU ops and with the default flags
  record --dir=STEP_DIR ...          a step's plan or outcome (status.json)
  assemble --scratch=DIR --output=FILE ...
                                     every step's outcome and figures into the one JSON

`assemble`, `record` and `stamp` need only the standard library, so the report is written even
when the environment under test cannot import JAX.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys

from accelerator_check_files import ROOT, stamp, write_json
from accelerator_check_report import PARSERS, assemble, record
from accelerator_check_resume import resume


def install(args) -> int:
  """An offline install: the pinned requirements and the cuda12 extra, from a folder of wheels."""
  python = os.path.abspath(args.python)
  if args.make_venv and not os.path.exists(python):
    venv = os.path.dirname(os.path.dirname(python))
    print(f'making {venv}', flush=True)
    subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
  command = [python, '-m', 'pip', 'install', '--no-index', f'--find-links={args.wheels}',
             '-r', os.path.join(ROOT, 'requirements.txt'), '-e', f'{ROOT}[cuda12]']
  print('$ ' + ' '.join(command), flush=True)
  return subprocess.run(command, cwd=ROOT, check=False).returncode


# --- devices ------------------------------------------------------------------------------------


def devices(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  found = jax.devices()
  listed = []
  for d in found:
    stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
    listed.append({
        'id': d.id, 'platform': d.platform, 'device_kind': d.device_kind, 'repr': repr(d),
        # The allocator's limit: on a GPU, the share of the card JAX may take (75% by default).
        'memory_bytes_limit': (stats or {}).get('bytes_limit'),
    })
  packages = {}
  for name in ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'jax-cuda13-plugin',
               'jax-cuda13-pjrt', 'libtpu', 'flax', 'optax', 'orbax-checkpoint', 'numpy',
               'torch', 'tensorflow', 'tensorflow-cpu'):
    try:
      packages[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    platform_version = jax.extend.backend.get_backend().platform_version
  except Exception:  # pylint: disable=broad-except
    platform_version = None
  report = {
      'platform': found[0].platform, 'device_count': len(found), 'devices': listed,
      'jax_devices': repr(found), 'platform_version': platform_version, 'packages': packages,
      'python': sys.version.split()[0], 'executable': sys.executable,
      'nvidia_smi': _nvidia_smi(),
      'env': {k: os.environ.get(k) for k in ('JAX_PLATFORMS', 'XLA_FLAGS',
                                             'XLA_PYTHON_CLIENT_PREALLOCATE',
                                             'CUDA_VISIBLE_DEVICES')},
  }
  print(f'jax {jax.__version__}: {report["jax_devices"]}')
  write_json(args.out, report)
  return 0


def _nvidia_smi():
  """The cards as the driver lists them (name, total memory, driver), or None without one."""
  try:
    done = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'],
        capture_output=True, text=True, timeout=20, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if done.returncode:
    return None
  fields = ('name', 'memory_total', 'driver_version')
  return [dict(zip(fields, (p.strip() for p in line.split(','))))
          for line in done.stdout.strip().splitlines()]


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='launch/accelerator_check.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='what', required=True)
  p = sub.add_parser('install')
  p.add_argument('--wheels', required=True)
  p.add_argument('--python', required=True)
  p.add_argument('--make_venv', action='store_true')
  p = sub.add_parser('devices')
  p.add_argument('--out', required=True)
  p = sub.add_parser('stamp')
  p.add_argument('--log', required=True)
  p.add_argument('command', nargs=argparse.REMAINDER)
  p = sub.add_parser('resume')
  p.add_argument('--out', required=True)
  p.add_argument('--scratch', required=True)
  p.add_argument('--python', default=sys.executable)
  p.add_argument('--reference', default=None)
  p.add_argument('--smoke', action='store_true')
  p.add_argument('main_args', nargs=argparse.REMAINDER)
  p = sub.add_parser('record')
  p.add_argument('--dir', required=True)
  p.add_argument('--name', required=True)
  p.add_argument('--kind', required=True, choices=sorted(PARSERS))
  p.add_argument('--index', type=int, required=True)
  p.add_argument('--timeout', type=int, required=True)
  p.add_argument('--rc', type=int, default=None)
  p.add_argument('--wall', type=float, default=None)
  p.add_argument('--extra', action='append', default=[], help='KEY=VALUE kept in status.json')
  p.add_argument('command', nargs=argparse.REMAINDER)
  p = sub.add_parser('assemble')
  p.add_argument('--scratch', required=True)
  p.add_argument('--output', required=True)
  p.add_argument('--mode', required=True, choices=('accelerator', 'cpu-smoke'))
  p.add_argument('--python', default='')
  p.add_argument('--data_dir', default='')
  p.add_argument('--started', default='')
  p.add_argument('--started_epoch', type=float, default=0.0)
  p.add_argument('--announce', default='', help='print this step\'s outcome in one line')
  p.add_argument('--final', action='store_true',
                 help='print the outcome of the whole check; exit status 1 if a step failed')
  args = parser.parse_args(argv)
  if getattr(args, 'command', None) and args.command[0] == '--':
    args.command = args.command[1:]
  if args.what == 'stamp' and not args.command:
    parser.error('stamp: no command')
  return {'install': install, 'devices': devices, 'stamp': stamp, 'resume': resume,
          'record': record, 'assemble': assemble}[args.what](args)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
