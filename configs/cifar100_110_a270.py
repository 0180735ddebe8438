"""PyramidNet-110 (additive, alpha 270, basic blocks; 286 final features) on CIFAR-100.

  python -m pyramidnet_jax.main --config=configs/cifar100_110_a270.py \
      --workdir=runs/cifar100_110_a270

Paper: four GPUs, batch 128 in all, LR 0.5; ours: one GPU or TPU host. Expected: the paper's 18.25%
top-1 test error. Time: ~3 h on one H100 (estimate: 425 PFLOP at 40 TFLOP/s); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(110, 270, dataset='cifar100', bottleneck=False)
