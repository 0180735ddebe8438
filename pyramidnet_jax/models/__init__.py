"""The networks: PyramidNet and the PyConv family, their layers, presets and the config factory.

Importing this loads jax and flax only; building a network from a config does not import the
training code.
"""

from pyramidnet_jax.models.presets import DTYPES
from pyramidnet_jax.models.presets import MODEL_NAMES
from pyramidnet_jax.models.presets import PRESETS
from pyramidnet_jax.models.presets import create_model
from pyramidnet_jax.models.presets import from_config
from pyramidnet_jax.models.pyconv import PyConv
from pyramidnet_jax.models.pyconv import PyConvHGResNet
from pyramidnet_jax.models.pyconv import PyConvResNet
from pyramidnet_jax.models.pyramidnet import PyramidNet
from pyramidnet_jax.models.pyramidnet import block_widths
from pyramidnet_jax.models.pyramidnet import blocks_per_stage

__all__ = ['DTYPES', 'MODEL_NAMES', 'PRESETS', 'PyConv', 'PyConvHGResNet', 'PyConvResNet',
           'PyramidNet', 'block_widths', 'blocks_per_stage', 'create_model', 'from_config']
