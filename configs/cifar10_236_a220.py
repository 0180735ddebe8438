"""PyramidNet-236 (additive, alpha 220, bottleneck blocks; 944 final features) on CIFAR-10.

  python -m pyramidnet_jax.main --config=configs/cifar10_236_a220.py --workdir=runs/cifar10_236_a220

Paper: one GPU, batch 128; ours: one GPU or TPU host. Expected: the paper's 3.40% top-1 test error.
Time: ~3 h on one H100 (estimate: 412 PFLOP at 40 TFLOP/s); basis in configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(236, 220, dataset='cifar10', bottleneck=True)
