"""The authors' PyConv ImageNet recipe, shared by configs/imagenet_pyconv*.py.

Recipe: the authors' training code, read in iduta/pyconv (commit d8b39cf): args_file.py defaults
90 epochs, batch 256 (the total over the GPUs of one node: DataParallel splits it), LR 0.1, SGD
momentum 0.9, weight decay 1e-4 (torch's coupled L2, on every parameter, as ours), MultiStepLR
x0.1 at epochs 30, 60, 80 (scheduler.step() once per epoch). Nesterov: NOT used: main.py passes
`nesterov=args.nesterov`, a store_true flag that defaults to False, and the README's training
command does not set it; so nesterov=False here, unlike our PyramidNet configs. Caveat: the
repository's first commit defaulted to no scheduler, i.e. its adjust_learning_rate (x0.1 every
30 epochs, so at 30 and 60 only); the MultiStepLR default came later (commit d8b39cf, "set
MultiStepLR as default"), and the repo does not say which of the two trained the released
models; we follow the current default (docs/architecture.md). Augmentation is exactly theirs:
RandomResizedCrop 224 + flip for training, resize 256 + centre crop 224 for evaluation,
torchvision's mean/std; no dropout, no zero-init of the last BN, no label smoothing.
BatchNorm: DataParallel gave each GPU of their node its own statistics over 256 / GPUs examples,
and the repository does not say how many GPUs; so bn_group_size stays 0 (all 256). With G GPUs
in mind, --config.model.bn_group_size=256/G (e.g. 32 for 8) gives their statistics.
"""

from configs import default


def get_config(name: str, depth: int):
  """The authors' ImageNet recipe for config.model.name `name` ('pyconvresnet' or
  'pyconvhgresnet') at `depth`; alpha, bottleneck, widening and rounding stay at their defaults,
  which the PyConv networks ignore."""
  config = default.get_config()
  config.model.name = name
  config.model.depth = depth
  config.model.stem = 'imagenet'
  config.model.dropout_rate = 0.0
  config.model.remat = False
  config.dataset = 'imagenet2012'
  config.batch_size = 256
  config.learning_rate = 0.1
  config.num_epochs = 90
  config.lr_schedule = 'piecewise'
  config.lr_boundaries = (30, 60, 80)
  config.lr_decay = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  # 50,000 validation images in 125 unpadded batches, divisible by 1, 2, 4 or 8 devices.
  config.eval_batch_size = 400
  return config
