"""PyramidNet-200 (additive, alpha 240, bottleneck blocks; 1024 final features) on CIFAR-10.

  python -m pyramidnet_jax.main --config=configs/cifar10_200_a240.py --workdir=runs/cifar10_200_a240

Paper: one GPU, batch 128; ours: one GPU or TPU host. Expected: the paper's 3.44% top-1 test error.
Time: ~3 h on one H100 (estimate: 407 PFLOP at 40 TFLOP/s); basis in configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(200, 240, dataset='cifar10', bottleneck=True)
