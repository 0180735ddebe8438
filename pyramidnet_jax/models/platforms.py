"""What config.model.dtype and config.model.channel_multiple 'auto' mean on each platform.

`models.from_config` resolves both here, for the platform it is given or, by default, for JAX's
default backend at run time, so the choice is made in one place and can be tested for any platform
on any machine (`from_config(model_config, 10, platform='tpu')`).

Computation dtype: bfloat16 where the matrix units run it natively (NVIDIA GPUs from Ampere on,
AMD GPUs with bfloat16 matrix cores, TPUs), float32 elsewhere. XLA:CPU converts bfloat16
convolutions to float32 anyway, and NVIDIA GPUs before Ampere have no bfloat16 tensor cores, so
XLA runs their bfloat16 convolutions in float32 too: there bfloat16 would only add conversions
and rounding. Parameters, BatchNorm
statistics, logits, the loss, the optimiser state and the parameter gradients stay float32 on
every platform (layers.low_precision_conv).

Channel multiple (pyramidnet_blocks.py): 1 on the CPU, measured (docs/benchmarks.md#levers). The
GPU and TPU values are NOT measured; they follow from the hardware:
- CUDA, 8: tensor-core convolutions want input and output channels in multiples of 8 for 16-bit
  types (16 bytes; TF32 needs 4, which 8 covers), and PyramidNet's widths (17, 19, 21, ...) miss
  that at nearly every block, so cuDNN or XLA would pad or fall back at each convolution.
- TPU, 128: the MXU multiplies 128 x 128 tiles and a vector register holds 8 x 128 words, so
  XLA:TPU pads the channel (minor) dimension to 128 lanes whatever the width; computing at those
  widths should add no MXU work, and gives runs of blocks the same shapes, so fewer distinct
  programs to compile.
- Everywhere else (ROCm, NVIDIA before Ampere, unknown platforms): 1, no padding.
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
AUTO = 'auto'
DTYPE_CHOICES = (AUTO, *sorted(DTYPES))

# Platform -> (computation dtype, channel multiple) that 'auto' resolves to.
RESOLVED = {
    'cpu': ('float32', 1),
    'cuda': ('bfloat16', 8),
    'cuda_pre_ampere': ('float32', 1),
    'rocm': ('bfloat16', 1),
    'tpu': ('bfloat16', 128),
}
_UNKNOWN = ('float32', 1)
# JAX names every GPU backend 'gpu'; a platform named so is taken as an NVIDIA GPU from Ampere on.
_ALIASES = {'gpu': 'cuda'}


def current_platform() -> str:
  """The platform JAX runs on now, as RESOLVED names it: JAX's default backend, a GPU as 'cuda'
  or 'rocm', and an NVIDIA GPU of compute capability below 8.0 as 'cuda_pre_ampere'."""
  backend = jax.default_backend()
  if backend != 'gpu':
    return backend
  device = jax.devices()[0]
  if 'rocm' in str(getattr(device.client, 'platform_version', '')).lower():
    return 'rocm'
  capability = getattr(device, 'compute_capability', None)
  try:
    major = int(str(capability).split('.')[0])
  except ValueError:  # Not reported: the common case, a recent GPU.
    return 'cuda'
  return 'cuda' if major >= 8 else 'cuda_pre_ampere'


def _resolved(platform: str | None) -> tuple[str, tuple[str, int]]:
  name = current_platform() if platform is None else str(platform).lower()
  name = _ALIASES.get(name, name)
  return name, RESOLVED.get(name, _UNKNOWN)


def dtype_name(value: str, platform: str | None = None) -> str:
  """The computation dtype's name ('float32' or 'bfloat16') config.model.dtype `value` means on
  `platform` (None: JAX's now)."""
  if value not in DTYPE_CHOICES:
    raise ValueError(f'Unknown config.model.dtype {value!r}: expected one of '
                     f'{", ".join(map(repr, DTYPE_CHOICES))}.')
  if value != AUTO:
    return value
  name, (resolved, _) = _resolved(platform)
  _log_once('dtype', name, resolved)
  return resolved


def dtype(value: str, platform: str | None = None):
  """The computation dtype config.model.dtype `value` means on `platform` (None: JAX's now)."""
  return DTYPES[dtype_name(value, platform)]


def channel_multiple(value, platform: str | None = None) -> int:
  """The channel multiple config.model.channel_multiple `value` means on `platform`."""
  if value != AUTO:
    return value  # PyramidNet checks it.
  name, (_, resolved) = _resolved(platform)
  _log_once('channel_multiple', name, resolved)
  return resolved


def resolved_auto_fields(model_config: dict[str, Any],
                         platform: str | None = None) -> dict[str, Any]:
  """The fields of `model_config` (config.model as a dict) that hold 'auto', with the values they
  mean on `platform`: what a workdir records, so that a run resumed elsewhere computes the same."""
  resolve = {'dtype': dtype_name, 'channel_multiple': channel_multiple}
  return {field: function(model_config[field], platform)
          for field, function in resolve.items() if model_config.get(field) == AUTO}


def resolved_model_config(model_config: dict[str, Any],
                          platform: str | None = None) -> dict[str, Any]:
  """`model_config` with its 'auto' fields resolved for `platform`: the network a run trains,
  as its checkpoints and report record it."""
  return {**model_config, **resolved_auto_fields(model_config, platform)}


@functools.cache
def _log_once(field: str, platform: str, value) -> None:
  logging.info("config.model.%s 'auto' is %s on %s.", field, value, platform)
