"""PyramidNet-200 (additive, alpha 450, bottleneck, dropout 0.5; 2056 features) on ImageNet-1k.

  python -m pyramidnet_jax.main --config=configs/imagenet_200_a450.py \
      --workdir=runs/imagenet_200_a450

Authors: the PyTorch recipe ran on 8 GPUs, batch 128 in all; ours: one 80 GB GPU or a TPU host, with
rematerialisation on (a rough count gives ~75 GB of float32 activations at batch 128; remat
recomputes activations in the backward pass for about 1/3 more compute). Expected: the paper's
20.11% top-1 / 5.43% top-5 single-crop error, obtained with the Torch code and the paper's own
(unconfirmed) schedule, not with this recipe. Time: ~9 days on one H100 (estimate: 22.4 EFLOP at 40
TFLOP/s, x4/3 for remat). Recipe, sources and caveats: configs/imagenet_common.py.
"""

from configs import imagenet_common


def get_config():
  return imagenet_common.get_config(200, 450, dropout_rate=0.5, remat=True)
