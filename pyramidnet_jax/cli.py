"""What the command-line entry points share: config flags, platform set-up, compilation cache."""

from __future__ import annotations

import os
import sys

from absl import flags
import jax

DEFAULT_CACHE_DIR = '~/.cache/pyramidnet_jax/xla'  # As configs/default.py.


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


def parse_config_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a one-line error for a missing config file or a bad config field."""
  path = _config_path(argv)
  if path is not None:
    if not os.path.isfile(os.path.expanduser(path.split(':')[0])):
      sys.exit(f'error: config file {path} does not exist; pass one of the files in configs/, '
               'e.g. --config=configs/fashion_mnist_demo.py.')
    make_configs_importable(path.split(':')[0])
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError) as e:
    overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    sys.exit(f'error: bad config override ({overrides}): {e}. The fields and their types are '
             'in configs/default.py.')


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
