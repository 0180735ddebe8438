"""Every field of a training config checked before anything is written or trained.

One table, `RULES`, gives each field of configs/default.py its type and allowed values;
`CROSS_RULES` holds the few checks that need two fields. `validate` reports every bad field in
one message that names the field, its value and what is allowed, so a run with a typo stops at
once instead of training something else (or dividing by zero an hour in).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from pyramidnet_jax.data import registry
from pyramidnet_jax.models import platforms
from pyramidnet_jax.models import presets

INF = math.inf


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold.

  kind: 'bool', 'int' (a whole number), 'number', 'str', 'choice' (one of `choices`),
  'auto_int' ('auto' or a whole number), 'epochs' (a tuple of non-negative, strictly
  increasing numbers) or 'step_window' (() or (start, stop), whole numbers, 0 <= start < stop).
  Numbers lie in the interval from `low` to `high`, each end included unless `open_low` /
  `open_high`.
  """
  field: str
  kind: str
  low: float = -INF
  high: float = INF
  open_low: bool = False
  open_high: bool = False
  choices: tuple[Any, ...] = ()
  optional: bool = False  # May be absent: the data loader has a default for it.

  def allowed(self) -> str:
    if self.kind == 'bool':
      return 'True or False'
    if self.kind == 'str':
      return 'a string'
    if self.kind == 'choice':
      return 'one of ' + ', '.join(map(repr, self.choices))
    if self.kind == 'epochs':
      return 'a tuple of non-negative, strictly increasing numbers, e.g. (150, 225) or ()'
    if self.kind == 'step_window':
      return '() or (start, stop), whole numbers with 0 <= start < stop, e.g. (100, 110)'
    if self.kind == 'auto_int':
      return "'auto' or " + Rule(self.field, 'int', self.low, self.high, self.open_low,
                                 self.open_high).allowed()
    what = 'a whole number' if self.kind == 'int' else 'a number'
    if self.low == -INF and self.high == INF:
      return what
    if self.high == INF:
      return f'{what} {">" if self.open_low else ">="} {_fmt(self.low)}'
    if self.low == -INF:
      return f'{what} {"<" if self.open_high else "<="} {_fmt(self.high)}'
    return (f'{what} in {"(" if self.open_low else "["}{_fmt(self.low)}, {_fmt(self.high)}'
            f'{")" if self.open_high else "]"}')

  def accepts(self, value: Any) -> bool:
    if self.kind == 'bool':
      return isinstance(value, bool)
    if self.kind == 'str':
      return isinstance(value, str)
    if self.kind == 'choice':
      return isinstance(value, str) and value in self.choices
    if self.kind == 'epochs':
      return (isinstance(value, (tuple, list)) and all(_is_number(b) and b >= 0 for b in value)
              and all(a < b for a, b in zip(value, value[1:])))
    if self.kind == 'step_window':
      return (isinstance(value, (tuple, list)) and
              (not value or (len(value) == 2 and all(_is_whole(b) for b in value)
                             and 0 <= value[0] < value[1])))
    if self.kind == 'auto_int':
      if value == 'auto':
        return True
      if not isinstance(value, int):  # The model needs a Python int, not 8.0.
        return False
    if not _is_number(value) or (self.kind in ('int', 'auto_int') and value != int(value)):
      return False
    above = value > self.low if self.open_low else value >= self.low
    below = value < self.high if self.open_high else value <= self.high
    return above and below


def _fmt(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


def _is_whole(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _bool(field):
  return Rule(field, 'bool')


def _choice(field, *choices, optional=False):
  return Rule(field, 'choice', choices=choices, optional=optional)


_POSITIVE = dict(low=0, open_low=True)
_FRACTION = dict(low=0, high=1, open_high=True)  # [0, 1)

RULES: tuple[Rule, ...] = (
    _choice('model.name', *presets.MODEL_NAMES),
    # Which depths a family has is the network's to say (models.from_config lists them).
    Rule('model.depth', 'int', low=1),
    Rule('model.alpha', 'number', **_POSITIVE),
    _bool('model.bottleneck'),
    _choice('model.widening', 'additive', 'multiplicative'),
    _choice('model.stem', 'cifar', 'imagenet'),
    _choice('model.rounding', 'half_up', 'half_even'),
    Rule('model.dropout_rate', 'number', **_FRACTION),
    _bool('model.remat'),
    Rule('model.channel_multiple', 'auto_int', low=1),
    _choice('model.dtype', *platforms.DTYPE_CHOICES),
    Rule('model.bn_group_size', 'int', low=0),  # Divides batch_size: CROSS_RULES.
    Rule('dataset', 'str'),  # Its name is checked in CROSS_RULES, to allow folder:ROOT.
    Rule('data_dir', 'str'),
    _bool('augment'),
    Rule('validation_fraction', 'number', **_FRACTION),
    Rule('validation_seed', 'int'),
    Rule('image_size', 'int', low=1, optional=True),
    # Brightness, contrast and saturation factors are drawn from U(1 - x, 1 + x): above 1 a
    # factor could be negative.
    Rule('color_jitter', 'number', low=0, high=1, optional=True),
    Rule('pca_lighting', 'number', low=0, optional=True),
    _choice('bad_images', 'skip', 'error', optional=True),
    Rule('max_image_pixels', 'int', low=1, optional=True),
    Rule('batch_size', 'int', low=1),
    Rule('eval_batch_size', 'int', low=1),
    Rule('num_epochs', 'int', low=0),  # >= 1 unless num_train_steps > 0: CROSS_RULES.
    Rule('num_train_steps', 'int'),  # <= 0: train num_epochs.
    Rule('learning_rate', 'number', **_POSITIVE),
    _choice('lr_schedule', 'piecewise', 'cosine'),
    Rule('lr_boundaries', 'epochs'),
    Rule('lr_decay', 'number', **_POSITIVE),
    Rule('warmup_epochs', 'number', low=0),
    Rule('momentum', 'number', **_FRACTION),
    _bool('nesterov'),
    Rule('weight_decay', 'number', low=0),
    Rule('label_smoothing', 'number', **_FRACTION),
    Rule('early_stopping_patience', 'int', low=0),
    Rule('early_stopping_min_delta', 'number', low=0),
    Rule('seed', 'int'),
    Rule('checkpoint_every_steps', 'int', low=1),
    Rule('checkpoints_to_keep', 'int', low=1),  # 0 would keep nothing to resume from.
    Rule('log_every_steps', 'int', low=1),
    _bool('progress_bar'),
    _bool('write_report'),
    Rule('profile_steps', 'step_window', optional=True),
    Rule('compilation_cache_dir', 'str'),
    _choice('cpu_conv', 'auto', 'onednn', 'xla'),
    _bool('xla_cpu_concurrency_scheduler'),
    _bool('cpu_keep_freed_memory'),
)


def _dataset_name(c) -> str | None:
  name = c.dataset
  if name in registry.DATASETS or (name.startswith(registry.FOLDER_PREFIX)
                                   and len(name) > len(registry.FOLDER_PREFIX)):
    return None
  return (f'config.dataset = {name!r}: must be one of {", ".join(map(repr, registry.DATASETS))} '
          f'or {registry.FOLDER_PREFIX}/path/to/root')


def _epochs_or_steps(c) -> str | None:
  if c.num_train_steps <= 0 and c.num_epochs < 1:
    return (f'config.num_epochs = {c.num_epochs}: must be >= 1 unless config.num_train_steps > 0 '
            f'(it is {c.num_train_steps}); nothing would be trained')
  return None


def _early_stopping(c) -> str | None:
  if c.early_stopping_patience > 0 and c.validation_fraction <= 0:
    return (f'config.early_stopping_patience = {c.early_stopping_patience} needs a validation '
            'split: set config.validation_fraction (e.g. 0.1), or the patience to 0')
  return None


def _bn_groups(c) -> str | None:
  size = c.model.bn_group_size
  if size and c.batch_size % size:
    return (f'config.model.bn_group_size = {size}: must divide config.batch_size = '
            f'{c.batch_size} (BatchNorm statistics over groups of that many consecutive examples '
            'of the global batch; 0: the whole batch)')
  return None


def _streamed_only(c) -> str | None:
  name = c.dataset
  if name == 'imagenet2012' or name.startswith(registry.FOLDER_PREFIX):
    return None
  defaults = (('image_size', registry.IMAGENET_IMAGE_SIZE), ('color_jitter', 0),
              ('pca_lighting', 0))
  changed = [f'config.{f} = {c.get(f)!r}' for f, default in defaults
             if c.get(f, default) != default]
  if changed:
    return (f'{", ".join(changed)}: apply to imagenet2012 and {registry.FOLDER_PREFIX}ROOT only; '
            f'{name} has its own image size and augmentation')
  return None


# Checks of two fields or more, run once every field alone has passed RULES.
CROSS_RULES: tuple[Callable[[Any], str | None], ...] = (
    _dataset_name, _epochs_or_steps, _early_stopping, _bn_groups, _streamed_only)


def problems(config) -> list[str]:
  """What is wrong with `config`, one phrase per field; empty when nothing is."""
  flat = _flatten(config.to_dict() if hasattr(config, 'to_dict') else dict(config))
  known = {rule.field for rule in RULES}
  found = [f'config.{name} is not a config field (the fields are in configs/default.py)'
           for name in sorted(set(flat) - known)]
  for rule in RULES:
    if rule.field not in flat:
      if not rule.optional:
        found.append(f'config.{rule.field} is missing (start from configs/default.py, which '
                     'sets every field)')
    elif not rule.accepts(flat[rule.field]):
      found.append(f'config.{rule.field} = {flat[rule.field]!r}: must be {rule.allowed()}')
  if not found:
    found = [p for check in CROSS_RULES if (p := check(config)) is not None]
  return found


def validate(config) -> None:
  """Raises ValueError naming every bad field of a training config, its value and the range."""
  found = problems(config)
  if found:
    s = 's' if len(found) > 1 else ''
    raise ValueError(f'bad config field{s}: {"; ".join(found)}.')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
