"""PyramidNet-164 (additive, alpha 270, bottleneck blocks; 1144 final features) on CIFAR-100.

  python -m pyramidnet_jax.main --config=configs/cifar100_164_a270.py \
      --workdir=runs/cifar100_164_a270

Paper: four GPUs, batch 128 in all, LR 0.5; ours: one GPU or TPU host. Expected: the paper's 17.01%
top-1 test error. Time: ~3 h on one H100 (estimate: 411 PFLOP at 40 TFLOP/s); basis in
configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(164, 270, dataset='cifar100', bottleneck=True)
