"""PyramidNet-164 (additive, alpha 48, bottleneck blocks; 256 final features) on CIFAR-100.

  python -m pyramidnet_jax.main --config=configs/cifar100_164_a48.py --workdir=runs/cifar100_164_a48

Paper: four GPUs, batch 128 in all, LR 0.5; ours: one GPU or TPU host. Expected: the paper's 19.52%
top-1 test error. Time: ~1 h on one H100 (estimate: 35 PFLOP, bound by per-step overhead); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(164, 48, dataset='cifar100', bottleneck=True)
