"""PyramidNet-101 (additive, alpha 360, bottleneck; 1696 final features) on ImageNet-1k.

  python -m pyramidnet_jax.main --config=configs/imagenet_101_a360.py \
      --workdir=runs/imagenet_101_a360

Authors: the PyTorch code on 8 GPUs, batch 128 in all; ours: one 80 GB GPU or a TPU host.
Expected: 21.98% top-1 / 6.20% top-5 single-crop error, the authors' released PyTorch model,
trained with that code (its README does not state that run's LR or epochs). Time: ~2 days on one
H100 (estimate: 6.7 EFLOP at 40 TFLOP/s). Recipe, sources and caveats: configs/imagenet_common.py.
"""

from configs import imagenet_common


def get_config():
  return imagenet_common.get_config(101, 360)
