"""Shared body of the 24 CIFAR configs (configs/cifar10_*.py, configs/cifar100_*.py).

Each of those files is one network of the paper's CIFAR tables with the paper's recipe
(docs/architecture.md, = configs/default.py): SGD, Nesterov momentum 0.9, batch 128, 300
epochs, LR x0.1 at epochs 150 and 225, coupled L2 weight decay 1e-4, pad-4 crop + flip. Only the LR differs:
0.1 on CIFAR-10 (the paper: one GPU) and 0.5 on CIFAR-100 (the paper: 4 GPUs with batch 128,
jhkim89/PyramidNet README). BatchNorm statistics are the authors' too: DataParallel normalises
each GPU's share of the batch with its own statistics, so CIFAR-10 (one GPU) used the whole batch
of 128 (bn_group_size 0) and CIFAR-100 groups of 32 (128 over 4 GPUs: bn_group_size 32). A group
size does not depend on our device count: groups of 32 are per-device statistics on 4 devices,
4 groups per device on one, and span 2 devices on 8 (pyramidnet_jax/models/batch_norm.py).
--config.model.bn_group_size=0 gives statistics over the whole global batch instead.

Wall-time estimates in the configs are rough, not measured: training FLOPs = 6 x forward MACs x
50,000 images x 300 epochs, at an assumed sustained 40 TFLOP/s on one H100: ~10% of its dense
TF32 peak, as BatchNorm and element-wise ops are memory-bound. That is a float32 figure; the
default bfloat16 computation (dtype 'auto') should be faster, by an amount not yet measured.
Narrow networks (under ~1 GMAC) are bound by per-step overhead over their 117k steps instead, so
they are quoted at about an hour.
"""

from configs import default

DATASETS = ('cifar10', 'cifar100')
LEARNING_RATE = {'cifar10': 0.1, 'cifar100': 0.5}
# Examples per GPU in the paper's runs (0: all 128, its one GPU).
BN_GROUP_SIZE = {'cifar10': 0, 'cifar100': 32}


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
  config.model.bn_group_size = BN_GROUP_SIZE[dataset]
  # 10,000 test images in 25 unpadded batches, divisible by 1, 2, 4 or 8 devices (500 is not by 8).
  config.eval_batch_size = 400
  return config
