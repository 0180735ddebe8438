"""PyramidNet's width schedule: block widths, final feature dimensions, rounding at exact ties,
and the padded widths that let blocks share their shapes.

The widths are checked against a reference accumulator written here from the paper's rule (the
width is widened before every block, the first included); nothing is compiled.
"""

from __future__ import annotations

import math

import pytest

from pyramidnet_jax import PyramidNet, block_widths, blocks_per_stage
from pyramidnet_jax.models import pyramidnet_blocks
from tests.models import paper_tables
from tests.models.paper_tables import IMAGENET_LAYOUTS, abstract_variables


def half_up(value: float) -> int:
  return math.floor(value + 0.5)


def half_even(value: float) -> int:
  return round(value)  # Python 3: ties to even.


def reference_accumulator(layout, start, alpha, widening='additive'):
  """The widening accumulator before rounding, one float per block, grouped by stage."""
  total = sum(layout)
  acc = float(start)
  stages = []
  for stage_blocks in layout:
    stage = []
    for _ in range(stage_blocks):
      if widening == 'additive':
        acc += alpha / total
      else:
        acc *= alpha ** (1.0 / total)
      stage.append(acc)
    stages.append(stage)
  return stages


def reference_widths(layout, start, alpha, widening='additive', rule=half_up):
  return tuple(tuple(rule(a) for a in stage)
               for stage in reference_accumulator(layout, start, alpha, widening))


@pytest.mark.parametrize('kwargs, stage_ranges, features', [
    (dict(depth=110, alpha=48), [(17, 32), (33, 48), (49, 64)], 64),
    (dict(depth=272, alpha=200, bottleneck=True), [(18, 83), (85, 149), (152, 216)], 864),
    (dict(depth=200, alpha=300, bottleneck=True, stem='imagenet'),
     [(69, 78), (82, 187), (191, 350), (355, 364)], 1456),
])
def test_block_widths_stage_ranges(kwargs, stage_ranges, features):
  widths = block_widths(**kwargs)
  assert [(stage[0], stage[-1]) for stage in widths] == stage_ranges
  assert all(b >= a for stage in widths for a, b in zip(stage, stage[1:]))
  assert PyramidNet(num_classes=10, **kwargs).num_features == features


@pytest.mark.parametrize('name', list(paper_tables.TABLE_CONFIGS))
def test_num_features_and_widths_of_paper_tables(name):
  kwargs = paper_tables.TABLE_CONFIGS[name]
  model = PyramidNet(num_classes=10, **kwargs)
  assert model.num_features == paper_tables.NUM_FEATURES[name]
  stem = kwargs.get('stem', 'cifar')
  bottleneck = kwargs.get('bottleneck', False)
  if stem == 'cifar':
    layout = ((kwargs['depth'] - 2) // (9 if bottleneck else 6),) * 3
  else:
    layout = IMAGENET_LAYOUTS[kwargs['depth']]
  assert blocks_per_stage(kwargs['depth'], bottleneck, stem) == layout
  expected = reference_widths(layout, 16 if stem == 'cifar' else 64, kwargs['alpha'],
                              kwargs.get('widening', 'additive'))
  assert block_widths(kwargs['depth'], kwargs['alpha'], bottleneck,
                      kwargs.get('widening', 'additive'), stem) == expected
  assert model.widths == expected


def test_blocks_per_stage():
  for depth, layout in IMAGENET_LAYOUTS.items():
    assert blocks_per_stage(depth, depth >= 50, 'imagenet') == layout
  assert blocks_per_stage(110, False) == (18, 18, 18)
  assert blocks_per_stage(110, True) == (12, 12, 12)
  assert blocks_per_stage(272, True) == (30, 30, 30)
  assert blocks_per_stage(8, False) == (1, 1, 1)
  assert blocks_per_stage(11, True) == (1, 1, 1)


@pytest.mark.parametrize('depth, alpha, stem, ties, differing', [
    (110, 270, 'cifar', None, 9),
    (50, 300, 'imagenet', [101.5, 176.5, 251.5, 326.5], 2),
])
def test_rounding_rules_on_ties(depth, alpha, stem, ties, differing):
  layout = blocks_per_stage(depth, True, stem)
  start = 16 if stem == 'cifar' else 64
  acc = [a for stage in reference_accumulator(layout, start, alpha) for a in stage]
  found_ties = [a for a in acc if a - math.floor(a) == 0.5]
  if ties is not None:
    assert found_ties == ties
  else:
    assert found_ties[:2] == [23.5, 38.5]
  up = reference_widths(layout, start, alpha, rule=half_up)
  even = reference_widths(layout, start, alpha, rule=half_even)
  assert up != even
  got_up = block_widths(depth, alpha, True, stem=stem, rounding='half_up')
  got_even = block_widths(depth, alpha, True, stem=stem, rounding='half_even')
  assert got_up == up
  assert got_even == even
  assert block_widths(depth, alpha, True, stem=stem) == up  # The default is half up.
  # The rules agree everywhere except at ties that round to an odd number under half up.
  flat_up = [w for s in got_up for w in s]
  flat_even = [w for s in got_even for w in s]
  for a, u, e in zip(acc, flat_up, flat_even):
    if a in found_ties and half_up(a) % 2:
      assert (u, e) == (half_up(a), half_up(a) - 1)
    else:
      assert u == e
  assert sum(u != e for u, e in zip(flat_up, flat_even)) == differing  # docs/architecture.md.


def test_rounding_rules_hand_checked():
  up = block_widths(110, 270, True, rounding='half_up')
  even = block_widths(110, 270, True, rounding='half_even')
  # Accumulator 16 + 7.5 = 23.5: both give 24 (24 is even). 16 + 3 * 7.5 = 38.5: 39 vs 38.
  assert up[0][0] == 24 and even[0][0] == 24
  assert up[0][2] == 39 and even[0][2] == 38
  assert up[0][:4] == (24, 31, 39, 46) and even[0][:4] == (24, 31, 38, 46)
  up = block_widths(50, 300, True, stem='imagenet', rounding='half_up')
  even = block_widths(50, 300, True, stem='imagenet', rounding='half_even')
  assert up[0][1] == even[0][1] == 102  # 101.5
  assert (up[1][2], even[1][2]) == (177, 176)  # 176.5
  assert up[2][2] == even[2][2] == 252  # 251.5
  assert (up[3][0], even[3][0]) == (327, 326)  # 326.5


def test_rounding_reaches_the_parameters():
  # CIFAR depth 11 bottleneck, alpha 4.5: accumulator 17.5, 19, 20.5.
  up = PyramidNet(depth=11, alpha=4.5, bottleneck=True, num_classes=10)
  even = PyramidNet(depth=11, alpha=4.5, bottleneck=True, num_classes=10, rounding='half_even')
  assert up.widths == ((18,), (19,), (21,))
  assert even.widths == ((18,), (19,), (20,))
  assert abstract_variables(up)['params']['layer3_0']['conv2']['kernel'].shape == (3, 3, 21, 21)
  assert abstract_variables(even)['params']['layer3_0']['conv2']['kernel'].shape == (3, 3, 20, 20)
  assert up.num_features == 84 and even.num_features == 80


def test_padded_blocks_share_shapes():
  # PyramidNet-110 a48: 54 blocks, 48 different widths, and at exact widths no two blocks share
  # their shapes; at widths rounded up to multiples of 16 they have 5 shapes between them, which
  # is what shortens the compile (docs/benchmarks.md#levers).
  widths = block_widths(110, 48)

  def shapes(multiple):
    return {(s.stride, s.padded_in, s.padded_width)
            for s in pyramidnet_blocks.block_specs(widths, 16, False, multiple)}

  assert len({w for stage in widths for w in stage}) == 48
  assert len(shapes(1)) == 54 and len(shapes(16)) == 5
  # channel_multiple 1 pads nothing: the exact network's computation.
  assert all((s.padded_in, s.padded_width) == (s.in_channels, s.width)
             for s in pyramidnet_blocks.block_specs(widths, 16, False, 1))
