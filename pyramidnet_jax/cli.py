"""What the command-line entry points share: flag parsing, one-line errors, platform set-up and
the compilation cache.

An expected failure (a bad flag or config field, a missing or damaged file, a full disk, an
unreachable peer) ends as one line `error: ...` on stderr with exit status 1; `--debug` or
PYRAMIDNET_JAX_DEBUG=1 shows its traceback instead. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import logging as std_logging
import os
import re
import sys
import threading
from typing import Any, Callable, NoReturn

from absl import flags
import jax

DEFAULT_CACHE_DIR = '~/.cache/pyramidnet_jax/xla'  # As configs/default.py.
DEBUG_ENV = 'PYRAMIDNET_JAX_DEBUG'

# The failures that the user, not the code, must fix. OSError covers the filesystem (missing,
# read-only, full, not a directory) and the network.
EXPECTED = (ValueError, OSError, FloatingPointError)


def define_debug_flag() -> None:
  if 'debug' not in flags.FLAGS:
    flags.DEFINE_bool('debug', False, 'Show the traceback of an expected failure (a bad flag, '
                      'file or config) instead of its one-line error; as PYRAMIDNET_JAX_DEBUG=1.')


def debugging(argv: list[str] | None = None) -> bool:
  if os.environ.get(DEBUG_ENV, '') not in ('', '0'):
    return True
  if argv is not None:  # Before the flags are parsed.
    return any(a in ('--debug', '--debug=true', '--debug=1') for a in argv)
  return 'debug' in flags.FLAGS and flags.FLAGS.is_parsed() and bool(flags.FLAGS.debug)


def fail(message: str) -> NoReturn:
  """Prints `error: message` as one line and exits with status 1."""
  print(f'error: {one_line(message)}', file=sys.stderr, flush=True)
  _exit_quietly()


def _exit_quietly() -> NoReturn:
  # Background writers (Orbax's save threads, TensorBoard's) may fail again or wait at exit:
  # the one line stays the last word, and a stuck shutdown cannot hang the command.
  sys.stdout.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  sys.stderr = open(os.devnull, 'w')  # pylint: disable=consider-using-with
  watchdog = threading.Timer(30, os._exit, (1,))
  watchdog.daemon = True
  watchdog.start()
  sys.exit(1)


_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def one_line(message: str) -> str:
  return ' '.join(_ANSI.sub('', message).split())


def run(main: Callable[[list[str]], Any], expected: tuple[type[BaseException], ...] = ()):
  """`main` for absl's app.run, with every expected failure turned into one `error:` line."""

  @functools.wraps(main)
  def wrapped(argv):
    quiet_checkpoint_errors = _QuietOrbaxErrors()
    unraisablehook = sys.unraisablehook
    if not debugging():
      std_logging.getLogger('absl').addFilter(quiet_checkpoint_errors)
      sys.unraisablehook = functools.partial(_quiet_closed_loops, unraisablehook)
    try:
      return main(argv)
    except (*EXPECTED, *expected) as e:
      if debugging():
        raise
      fail(describe(e))
    finally:
      std_logging.getLogger('absl').removeFilter(quiet_checkpoint_errors)
      sys.unraisablehook = unraisablehook

  return wrapped


class _QuietOrbaxErrors(std_logging.Filter):
  """Drops Orbax's own tracebacks of a failed background save: the error reaches the main
  thread at the next save or wait, and is reported there once."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno >= std_logging.ERROR and 'orbax' in record.pathname)


def _quiet_closed_loops(default_hook, unraisable) -> None:
  # After a failed checkpoint write, TensorStore completes its remaining writes into Orbax's
  # closed event loop, one traceback per write; the failure itself reaches the main thread.
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and 'Event loop is closed' in str(unraisable.exc_value)):
    default_hook(unraisable)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def describe(error: BaseException) -> str:
  """The one line for an expected failure: a filesystem error anywhere in the chain of
  exceptions comes first (it is the cause, the rest followed from it), named by its path."""
  chain, seen = [], set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  found = [(e, *_filesystem_error(e)) for e in chain]
  found = [f for f in found if f[1] is not None]
  if found:
    e, code, path = next((f for f in found if f[2]), found[0])  # One that names its path.
    return _filesystem_message(code, path, e)
  return str(error) or type(error).__name__


def _filesystem_error(e: BaseException) -> tuple[int | None, str | None]:
  """(errno, path) of an OSError, or of a checkpoint write that TensorStore reports as a
  ValueError with the OS error code in its text; (None, None) for anything else."""
  if isinstance(e, OSError) and e.errno in _FILESYSTEM_ERRNOS:
    return e.errno, e.filename
  if isinstance(e, ValueError) and (match := _OS_ERROR_CODE.search(str(e))):
    path = _QUOTED_PATH.search(str(e))
    path = path.group(1) if path else None
    if path and '.orbax-checkpoint-tmp' in path:  # The step being saved, not its inner files.
      path = path[:path.index('.orbax-checkpoint-tmp')]
    return int(match.group(1)), path
  return None, None


_FILESYSTEM_ERRNOS = {errno.ENOSPC: 'no space left on the device',
                      errno.EDQUOT: 'disk quota exceeded',
                      errno.EROFS: 'read-only filesystem', errno.EACCES: 'permission denied',
                      errno.EPERM: 'operation not permitted', errno.EIO: 'input/output error',
                      errno.ENOTDIR: 'not a directory', errno.EISDIR: 'is a directory',
                      errno.ENAMETOOLONG: 'file name too long'}


def _filesystem_message(code: int, path: str | None, e: BaseException) -> str:
  what = _FILESYSTEM_ERRNOS.get(code, os.strerror(code).lower())
  where = f' writing {path}' if path else ''
  if code in (errno.ENOSPC, errno.EDQUOT):
    return (f'{what}{where}: free some space (or use a --workdir on another disk) and run the '
            'same command again; a training resumes from its last complete checkpoint.')
  if code in (errno.EROFS, errno.EACCES, errno.EPERM):
    return f'{what}{where or f": {e}"}: use a writable path, or fix its permissions.'
  if isinstance(e, OSError) and e.filename is None:
    return str(e)
  return f'{what}: {path}' if path else str(e)


def check_metadata(directory: str) -> None:
  """Raises ValueError naming a workdir's or model directory's JSON file that cannot be read."""
  shapes = {'config.json': ('an object with "model" and "dataset"',
                            lambda v: isinstance(v, dict) and isinstance(v.get('model'), dict)
                            and 'dataset' in v),
            'model.json': ('an object with "model" and "num_classes"',
                           lambda v: isinstance(v, dict) and isinstance(v.get('model'), dict)
                           and 'num_classes' in v),
            'class_names.json': ('a list of names', lambda v: isinstance(v, list))}
  from pyramidnet_jax.training import storage  # pylint: disable=g-import-not-at-top
  base = directory if storage.is_remote(directory) else os.path.expanduser(directory)
  for name, (wanted, fits) in shapes.items():
    path = storage.join(base, name)
    if not storage.isfile(path):
      continue
    try:
      value = json.loads(storage.read_text(path))
    except ValueError as e:  # Damaged JSON or not text at all.
      raise ValueError(f'{path} cannot be read ({type(e).__name__}: {e}); restore it from a '
                       'backup, or train or convert again.') from None
    if not fits(value):
      raise ValueError(f'{path} is not {wanted}; restore it from a backup, or train or convert '
                       'again.')


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def make_configs_importable(config_path: str) -> None:
  """Lets a config file's `from configs import default` work from any working directory.

  The experiment configs live in the repository's configs/ folder and import their shared
  helpers from it, so the folder above configs/ goes first on sys.path.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(os.path.expanduser(config_path))))
  if os.path.isfile(os.path.join(root, 'configs', 'default.py')) and root not in sys.path:
    sys.path.insert(0, root)


_REQUIRED = re.compile(r'Flag --(\w+) must have a value other than None')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, for every entry point, with one line for each way it can fail: a missing
  required flag, an unknown flag or value, a missing config file, a config file that fails to
  load, a bad config override."""
  define_debug_flag()
  path = _config_path(argv)
  if path is not None:
    if not os.path.isfile(os.path.expanduser(path.split(':')[0])):
      fail(f'config file {path} does not exist; pass one of the files in configs/, e.g. '
           '--config=configs/fashion_mnist_demo.py.')
    make_configs_importable(path.split(':')[0])
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if debugging(argv):
      raise
    if match := _REQUIRED.search(str(e)):
      name = match.group(1)
      fail(f'--{name} is required: {flags.FLAGS[name].help}')
    overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    if overrides and str(e).startswith('flag --config.'):
      fail(f'bad config override: {e}. The fields and their types are in configs/default.py.')
    fail(f'{e}. See --helpfull for the flags.')
  except (AttributeError, KeyError) as e:
    if debugging(argv):
      raise
    # ml_collections reports an unknown field as AttributeError(KeyError(name)).
    missing = e if isinstance(e, KeyError) else (e.args[0] if e.args else None)
    overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    if overrides and isinstance(missing, KeyError):
      what = str(missing.args[0]) if missing.args else ''  # "'name'", maybe with a suggestion.
      what = what if what.endswith(('.', '?')) else what + '.'
      fail(f'bad config override ({overrides}): no such field {what} The fields are in '
           'configs/default.py.')
    fail(f'config file {path} cannot be loaded: {type(e).__name__}: {e}. Run with --debug for '
         'the traceback.')
  except Exception as e:  # pylint: disable=broad-except
    # The config file is the user's Python: its failure to load is theirs to fix, in one line.
    if debugging(argv) or path is None:
      raise
    where = f' (line {e.lineno})' if isinstance(e, SyntaxError) else ''
    fail(f'config file {path} cannot be loaded{where}: {type(e).__name__}: {e}. '
         'Run with --debug for the traceback.')


parse_config_flags = parse_flags  # The name the entry points with a --config use.


def enable_compilation_cache(cache_dir: str = DEFAULT_CACHE_DIR) -> None:
  """XLA's persistent compilation cache: deep networks with a width per block compile slowly."""
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def set_up_platform(config=None) -> bool:
  """Before the first JAX computation: the XLA:CPU kit where the CPU is JAX's only platform
  (xla_cpu.enable; `config` is a training config, or None for evaluation and prediction).

  Returns whether the kit is on. Elsewhere (GPU, TPU) the plain levers run.
  """
  from pyramidnet_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  return xla_cpu.enable(config)
