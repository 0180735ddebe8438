"""Shared body of the 24 CIFAR configs (configs/cifar10_*.py, configs/cifar100_*.py).

Each of those files is one network of the paper's CIFAR tables with the paper's recipe
(docs/architecture.md, = configs/default.py): SGD, Nesterov momentum 0.9, batch 128, 300 epochs, LR x0.1
at epochs 150 and 225, coupled L2 weight decay 1e-4, pad-4 crop + flip. Only the LR differs:
0.1 on CIFAR-10 (the paper: one GPU) and 0.5 on CIFAR-100 (the paper: 4 GPUs with batch 128,
jhkim89/PyramidNet README). Unlike the authors' DataParallel runs, our BatchNorm statistics are
over the whole global batch (pyramidnet_jax/training/runtime.py), not per GPU.

Wall-time estimates in the configs are rough, not measured: training FLOPs = 6 x forward MACs x
50,000 images x 300 epochs, at an assumed sustained 40 TFLOP/s on one H100 in float32 (TF32
convolutions; ~10% of its dense TF32 peak, as BatchNorm and element-wise ops are memory-bound).
Narrow networks (under ~1 GMAC) are bound by per-step overhead over their 117k steps instead, so
they are quoted at about an hour.
"""

from configs import default

DATASETS = ('cifar10', 'cifar100')
LEARNING_RATE = {'cifar10': 0.1, 'cifar100': 0.5}


def get_config(depth: int, alpha: float, *, dataset: str, bottleneck: bool,
               widening: str = 'additive'):
  if dataset not in DATASETS:
    raise ValueError(f'dataset must be one of {DATASETS}, got {dataset!r}.')
  config = default.get_config()
  config.model.depth = depth
  config.model.alpha = float(alpha)
  config.model.bottleneck = bottleneck
  config.model.widening = widening
  config.dataset = dataset
  config.learning_rate = LEARNING_RATE[dataset]
  # 10,000 test images in 25 unpadded batches, divisible by 1, 2, 4 or 8 devices (500 is not by 8).
  config.eval_batch_size = 400
  return config
