"""PyConvHGResNet-50 (Duta et al. 2020; 25.2M parameters, 2048 features) on ImageNet-1k.

  python -m pyramidnet_jax.main --config=configs/imagenet_pyconvhgresnet50.py \
      --workdir=runs/imagenet_pyconvhgresnet50

Recipe: the authors' (iduta/pyconv) 90 epochs, batch 256, LR 0.1 x0.1 at 30/60/80, momentum 0.9
without Nesterov, weight decay 1e-4; sources and caveats: configs/pyconv_common.py.
Hardware: one 80 GB GPU or a TPU host (add --config.model.remat=True if it runs out of memory; not
measured). Expected: the README's 78.48% top-1 (single 224 crop) for PyConvHGResNet-50. Time: ~22 h
on one H100 (estimate, not measured: 6 x 4.53 GMACs forward x 1,281,167 images x 90 epochs = 3.13
EFLOP at an assumed 40 TFLOP/s; the grouped PyConv levels run below that rate, so expect longer).
"""

from configs import pyconv_common


def get_config():
  return pyconv_common.get_config('pyconvhgresnet', 50)
