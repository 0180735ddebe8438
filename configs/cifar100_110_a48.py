"""PyramidNet-110 (additive, alpha 48, basic blocks; 64 final features) on CIFAR-100.

  python -m pyramidnet_jax.main --config=configs/cifar100_110_a48.py --workdir=runs/cifar100_110_a48

Paper: four GPUs, batch 128 in all, LR 0.5; ours: one GPU or TPU host. Expected: the paper's 23.31%
top-1 test error. Time: ~1 h on one H100 (estimate: 36 PFLOP, bound by per-step overhead); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(110, 48, dataset='cifar100', bottleneck=False)
