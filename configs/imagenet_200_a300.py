"""PyramidNet-200 (additive, alpha 300, bottleneck; 1456 final features) on ImageNet-1k.

  python -m pyramidnet_jax.main --config=configs/imagenet_200_a300.py \
      --workdir=runs/imagenet_200_a300

Authors: the PyTorch README runs this recipe on 8 GPUs, batch 128 in all; ours: one 80 GB GPU
or a TPU host (add --config.model.remat=True if it runs out of memory). Expected: the paper's
20.47% top-1 / 5.29% top-5 single-crop error, obtained with the Torch code and the paper's own
(unconfirmed) schedule, not with this recipe, whose result is unpublished. Time: ~4 days on one
H100 (estimate: 12.7 EFLOP at 40 TFLOP/s). Recipe, sources and caveats: configs/imagenet_common.py.
"""

from configs import imagenet_common


def get_config():
  return imagenet_common.get_config(200, 300)
