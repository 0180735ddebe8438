"""PyramidNet-110 (additive, alpha 48, basic blocks; 64 final features) on CIFAR-10.

  python -m pyramidnet_jax.main --config=configs/cifar10_110_a48.py --workdir=runs/cifar10_110_a48

Paper: one GPU, batch 128; ours: one GPU or TPU host. Expected: the paper's 4.62% top-1 test error.
Time: ~1 h on one H100 (estimate: 36 PFLOP, bound by per-step overhead); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(110, 48, dataset='cifar10', bottleneck=False)
