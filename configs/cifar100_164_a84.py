"""PyramidNet-164 (additive, alpha 84, bottleneck blocks; 400 final features) on CIFAR-100.

  python -m pyramidnet_jax.main --config=configs/cifar100_164_a84.py --workdir=runs/cifar100_164_a84

Paper: four GPUs, batch 128 in all, LR 0.5; ours: one GPU or TPU host. Expected: the paper's 18.32%
top-1 test error. Time: ~1 h on one H100 (estimate: 67 PFLOP, bound by per-step overhead); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(164, 84, dataset='cifar100', bottleneck=True)
