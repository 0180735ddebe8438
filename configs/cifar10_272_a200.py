"""PyramidNet-272 (additive, alpha 200, bottleneck blocks; 864 final features) on CIFAR-10.

  python -m pyramidnet_jax.main --config=configs/cifar10_272_a200.py --workdir=runs/cifar10_272_a200

Paper: one GPU, batch 128; ours: one GPU or TPU host. Expected: the paper's 3.31% top-1 test error.
Time: ~3 h on one H100 (estimate: 404 PFLOP at 40 TFLOP/s); basis in configs/cifar_common.py.
"""

from configs import cifar_common


def get_config():
  return cifar_common.get_config(272, 200, dataset='cifar10', bottleneck=True)
