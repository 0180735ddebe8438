"""The laws of the initial variables, as the authors' code draws them (docs/architecture.md):
He fan-out normal conv kernels, BatchNorm scale 1 / bias 0 with running mean 0 / var 1, and
PyTorch's nn.Linear init for the classifier. Checked on the plain levers' model.init
(models/initialisation_test.py) and on the CPU kit's host-side draw (xla_cpu/host_init_test.py);
imported as `from tests.models import init_laws`.
"""

from __future__ import annotations

import math

import numpy as np

from pyramidnet_jax import PyramidNet
from tests.models.paper_tables import leaf_items

# Wide enough for tight statistics: widths 56, 96, 136 (outputs 224, 384, 544), 100 classes.
WIDE_NET = dict(depth=11, alpha=120, bottleneck=True, num_classes=100)
INPUT_SHAPE = (8, 8, 3)


def wide_net() -> PyramidNet:
  return PyramidNet(**WIDE_NET)


def check_he_fan_out_normal(name: str, kernel) -> None:
  """normal(0, sqrt(2 / (kh * kw * out))), not truncated, within sampling error."""
  kernel = np.asarray(kernel, np.float64)
  kh, kw, _, out = kernel.shape
  std = math.sqrt(2.0 / (kh * kw * out))
  flat = kernel.ravel()
  assert abs(flat.mean()) < 5 * std / math.sqrt(flat.size), name
  assert abs(flat.std() / std - 1) < 5 / math.sqrt(2 * flat.size), (name, flat.std(), std)
  if flat.size >= 20000:  # Not truncated: 4.55% of a normal lies beyond 2 sigma.
    assert 0.038 < np.mean(np.abs(flat) > 2 * std) < 0.053, name


def check_conv_kernels(variables) -> None:
  """The wide net's ten conv kernels, and fan-out, not fan-in, where they differ by 2x or more."""
  kernels = {k: np.asarray(v, np.float64) for k, v in leaf_items(variables['params'])
             if k.endswith("['kernel']") and "['fc']" not in k}
  assert len(kernels) == 10
  for key, kernel in kernels.items():
    check_he_fan_out_normal(key, kernel)
  for key in ("['layer2_0']['conv1']['kernel']", "['layer3_0']['conv3']['kernel']",
              "['conv1']['kernel']"):
    kh, kw, cin, out = kernels[key].shape
    fan_in_std = math.sqrt(2.0 / (kh * kw * cin))
    fan_out_std = math.sqrt(2.0 / (kh * kw * out))
    assert max(fan_in_std, fan_out_std) > 1.5 * min(fan_in_std, fan_out_std)
    assert abs(kernels[key].std() - fan_out_std) < abs(kernels[key].std() - fan_in_std) / 10


def check_batch_norms(variables, count: int) -> None:
  """`count` BatchNorms with scale 1 and bias 0, running mean 0 and variance 1."""
  scales = 0
  for key, leaf in leaf_items(variables['params']):
    if key.endswith("['scale']"):
      np.testing.assert_array_equal(leaf, 1, err_msg=key)
      scales += 1
    elif key.endswith("['bias']") and "['fc']" not in key:
      np.testing.assert_array_equal(leaf, 0, err_msg=key)
  assert scales == count
  stats = leaf_items(variables['batch_stats'])
  assert len(stats) == 2 * count
  for key, leaf in stats:
    np.testing.assert_array_equal(leaf, 1 if key.endswith("['var']") else 0, err_msg=key)


def check_classifier(variables, fan_in: int, classes: int) -> None:
  """PyTorch's nn.Linear default: U(+-1/sqrt(fan_in)) for kernel and bias alike."""
  kernel = np.asarray(variables['params']['fc']['kernel'], np.float64)
  bias = np.asarray(variables['params']['fc']['bias'], np.float64)
  assert kernel.shape == (fan_in, classes) and bias.shape == (classes,)
  bound = 1 / math.sqrt(fan_in)
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  assert np.abs(kernel).max() > 0.999 * bound and np.abs(bias).max() > 0.9 * bound
  assert abs(kernel.std() / (bound / math.sqrt(3)) - 1) < 0.02  # Uniform, not normal.
  assert abs(kernel.mean()) < 0.02 * bound
  assert abs(bias.std() / (bound / math.sqrt(3)) - 1) < 0.25

