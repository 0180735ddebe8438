"""PyramidNet in JAX/Flax. Importing this package loads jax and flax only."""

from pyramidnet_jax.models import PRESETS
from pyramidnet_jax.models import PyramidNet
from pyramidnet_jax.models import block_widths
from pyramidnet_jax.models import blocks_per_stage
from pyramidnet_jax.models import create_model

__all__ = ['PRESETS', 'PyramidNet', 'block_widths', 'blocks_per_stage', 'create_model']
__version__ = '0.1.0'
