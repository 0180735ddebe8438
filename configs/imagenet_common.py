"""Shared body of the 3 ImageNet configs (configs/imagenet_*.py).

Recipe: the one the authors' PyTorch code runs, confirmed in dyhan0920/PyramidNet-PyTorch (commit
5a0b32f). Its README trains ImageNet PyramidNet-200 a300 on 8 GPUs with `--lr 0.05 --batch_size 128
--epochs 100` (128 is the global batch: DataParallel splits it); its train.py uses SGD, momentum
0.9, nesterov=True, weight decay 1e-4 (defaults) and, for ImageNet, `lr = args.lr * (0.1 **
(epoch // 30))`, i.e. x0.1 at epochs 30, 60, 90. (Its loop runs epochs 0..100, 101 passes; we
run the 100 asked for: the extra one is at LR 5e-5.) The same README says its released
PyramidNet-101 a360 (21.98 / 6.20 top-1 / top-5 error) was trained with that code.

Not confirmed: the paper's own ImageNet schedule, reported as 120 epochs, LR 0.05, x0.1 at 60, 90
and 105. The paper text (arXiv 1610.02915) was not reachable in the stored sources (only its
abstract and introduction), and neither jhkim89/PyramidNet (Torch; its README gives the 200 a300 /
a450 results but no ImageNet schedule) nor jhkim89/PyramidNet-caffe (deploy/val prototxts only,
no solver) states it. So no config claims it; to try it add
`--config.num_epochs=120 --config.lr_boundaries='(60, 90, 105)'`.

Batch 128 at LR 0.05 is kept rather than 256 at a linearly scaled 0.1: it is the confirmed recipe
verbatim (same steps and LR per example), linear scaling would be an untested change for these
networks, and 128 fits one 80 GB GPU. BatchNorm statistics are the authors' 8-GPU run's:
DataParallel normalised each GPU's 16 examples with their own, so bn_group_size is 16, whatever
our device count (per-device statistics on 8 devices, 8 groups per device on one;
pyramidnet_jax/models/batch_norm.py); --config.model.bn_group_size=0 uses all 128. Augmentation
is the PyTorch code's: RandomResizedCrop 224 + flip for training, resize 256 + centre crop 224
for evaluation; the Torch code's colour jitter and PCA lighting are options
(--config.color_jitter=0.4 --config.pca_lighting=0.1), off here as in the PyTorch code. The data must be prepared by hand first
(`tfds build imagenet2012` after the manual download); the error says how when it is missing.

Wall-time estimates are rough, not measured: training FLOPs = 6 x forward MACs x 1,281,167 images
x 100 epochs, at an assumed sustained 40 TFLOP/s on one H100 (a float32 figure, as for CIFAR, see
configs/cifar_common.py); divide by the GPU count on a multi-GPU host.
"""

from configs import default


def get_config(depth: int, alpha: float, *, dropout_rate: float = 0.0, remat: bool = False):
  config = default.get_config()
  config.model.depth = depth
  config.model.alpha = float(alpha)
  config.model.bottleneck = True
  config.model.stem = 'imagenet'
  config.model.dropout_rate = dropout_rate
  config.model.remat = remat
  config.dataset = 'imagenet2012'
  config.batch_size = 128
  config.model.bn_group_size = 16  # 128 over the authors' 8 GPUs.
  config.learning_rate = 0.05
  config.num_epochs = 100
  config.lr_boundaries = (30, 60, 90)
  # 50,000 validation images in 125 unpadded batches, divisible by 1, 2, 4 or 8 devices.
  config.eval_batch_size = 400
  return config
