"""PyramidNet-110 (multiplicative, alpha 27, basic blocks; 432 final features) on CIFAR-100.

  python -m pyramidnet_jax.main --config=configs/cifar100_110_a27_mul.py \
      --workdir=runs/cifar100_110_a27_mul

Paper: four GPUs, batch 128 in all, LR 0.5; ours: one GPU or TPU host. Expected: the paper's 18.79%
top-1 test error. Time: ~2 h on one H100 (estimate: 238 PFLOP at 40 TFLOP/s); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(110, 27, dataset='cifar100', bottleneck=False,
                                 widening='multiplicative')
