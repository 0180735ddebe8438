"""PyramidNet-110 (multiplicative, alpha 8, basic blocks; 128 final features) on CIFAR-10.

  python -m pyramidnet_jax.main --config=configs/cifar10_110_a8_mul.py \
      --workdir=runs/cifar10_110_a8_mul

Paper: one GPU, batch 128; ours: one GPU or TPU host. Expected: the paper's 4.50% top-1 test error.
Time: ~1 h on one H100 (estimate: 51 PFLOP, bound by per-step overhead); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(110, 8, dataset='cifar10', bottleneck=False,
                                 widening='multiplicative')
