"""Variables drawn on the host with numpy, for the CPU kit: no compile of model.init.

`jax.jit(model.init)` compiles the whole network plus one RNG kernel per parameter, which takes
minutes for the deep ImageNet networks on a small CPU (docs/benchmarks.md#levers). Same
structure and laws as model.init, other random values.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def init_variables(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
  """Variables with model.init's structure and distributions, drawn on the host in seconds.

  The structure comes from jax.eval_shape (tracing only) and each leaf is drawn with numpy from a
  stream keyed on (key, its path), with the same law as the module's initialiser: He fan-out normal
  conv kernels, BN scale 1 / bias 0, running mean 0 / var 1, PyTorch's uniform(+-1/sqrt(fan_in)) for
  the classifier.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape[-3:]), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), key, x)
  seed = np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist()

  def draw(path, leaf):
    names = [str(getattr(p, 'key', p)) for p in path]
    collection, module, name = names[0], names[-2], names[-1]
    shape, dtype = leaf.shape, leaf.dtype
    if collection == 'batch_stats':
      value = np.zeros(shape) if name == 'mean' else np.ones(shape)
    elif module.startswith('bn') or module.endswith('_bn'):  # bn1, bn_final, downsample_bn.
      value = np.ones(shape) if name == 'scale' else np.zeros(shape)
    else:
      rng = np.random.default_rng([*seed, zlib.crc32('/'.join(names).encode())])
      if name == 'kernel' and len(shape) == 4:  # Conv, HWIO.
        value = rng.standard_normal(shape, np.float32) * math.sqrt(
            2.0 / (shape[0] * shape[1] * shape[3]))
      elif module == 'fc':
        bound = 1.0 / math.sqrt(shapes['params']['fc']['kernel'].shape[0])
        value = rng.uniform(-bound, bound, shape)
      else:
        raise ValueError(f'init_variables has no rule for parameter {"/".join(names)}.')
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


