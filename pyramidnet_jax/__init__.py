"""PyramidNet, PyConvResNet and PyConvHGResNet in JAX/Flax. Importing this loads jax, flax only."""

from pyramidnet_jax.models import PRESETS
from pyramidnet_jax.models import PyConv
from pyramidnet_jax.models import PyConvHGResNet
from pyramidnet_jax.models import PyConvResNet
from pyramidnet_jax.models import PyramidNet
from pyramidnet_jax.models import block_widths
from pyramidnet_jax.models import blocks_per_stage
from pyramidnet_jax.models import create_model


def load(path: str, which: str = 'best'):
  """(model, variables) from a training workdir or a directory written by `convert`.

  `model.apply(variables, images)` gives logits, `method='features'` the backbone features.
  A workdir gives its best-on-validation state (`which='best'`, the latest when there is none)
  or its latest (`which='latest'`). Imported lazily: orbax loads only when this is called.
  """
  from pyramidnet_jax.interop import loading  # pylint: disable=g-import-not-at-top
  return loading.load(path, which)


__all__ = ['PRESETS', 'PyConv', 'PyConvHGResNet', 'PyConvResNet', 'PyramidNet', 'block_widths',
           'blocks_per_stage', 'create_model', 'load']
__version__ = '0.1.0'
