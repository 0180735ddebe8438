"""PyConvResNet-50 (Duta et al. 2020; 24.8M parameters, 2048 features) on ImageNet-1k.

  python -m pyramidnet_jax.main --config=configs/imagenet_pyconvresnet50.py \
      --workdir=runs/imagenet_pyconvresnet50

Recipe: the authors' (iduta/pyconv) 90 epochs, batch 256, LR 0.1 x0.1 at 30/60/80, momentum 0.9
without Nesterov, weight decay 1e-4; sources and caveats: configs/pyconv_common.py.

Hardware: theirs is one multi-GPU node (DataParallel); ours: one 80 GB GPU or a TPU host (add
--config.model.remat=True if batch 256 runs out of memory; not measured). Expected: the README's
77.88% top-1 (single 224 crop) for PyConvResNet-50. Time: ~18 h on one H100 (estimate, not
measured: 6 x 3.69 GMACs forward (XLA's cost analysis) x 1,281,167 images x 90 epochs = 2.55
EFLOP at an assumed 40 TFLOP/s in float32, as configs/imagenet_common.py assumes; the grouped
PyConv levels run below that rate on GPUs, so expect longer).
"""

from configs import pyconv_common


def get_config():
  return pyconv_common.get_config('pyconvresnet', 50)
