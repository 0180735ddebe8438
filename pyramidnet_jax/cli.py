"""What the config-file commands (main, benchmark, pipeline_benchmark) share; defines no flags."""

from __future__ import annotations

import sys

from absl import flags


def parse_config_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a one-line error for an unknown or ill-typed config field."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError) as e:
    overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    sys.exit(f'error: bad config override ({overrides}): {e}. The fields and their types are '
             'in configs/default.py.')
