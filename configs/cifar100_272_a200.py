"""PyramidNet-272 (additive, alpha 200, bottleneck blocks; 864 final features) on CIFAR-100.

  python -m pyramidnet_jax.main --config=configs/cifar100_272_a200.py \
      --workdir=runs/cifar100_272_a200

Paper: four GPUs, batch 128 in all, LR 0.5; ours: one GPU or TPU host. Expected: the paper's 16.35%
top-1 test error. Time: ~3 h on one H100 (estimate: 404 PFLOP at 40 TFLOP/s); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(272, 200, dataset='cifar100', bottleneck=True)
