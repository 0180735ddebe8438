"""Demo: PyramidNet-8 a24 on the real Fashion-MNIST (Debian's dataset-fashion-mnist).

  python -m pyramidnet_jax.main --config=configs/fashion_mnist_demo.py --workdir=runs/demo

Hardware: a 2-core CPU. Expected: about 90.7-90.8% test accuracy (the last digits depend on the
CPU) after 3 epochs of 60,000 images, in about 80 s (2026-12-04, 2-core AMD EPYC VM, from a fresh
clone: 90.83%, 79 s; docs/benchmarks.md#fashion-mnist-demo).
This recipe is ours, not the paper's, tuned for that time budget: depth 8 (one basic block per
stage) with alpha 24 gives widths 24, 32, 40 (52k parameters); in 3 epochs the net underfits, so
augmentation and label smoothing are off and weight decay is light; batch 64 gives twice the
updates of batch 128 at the same images per second. BatchNorm statistics over the whole batch
(bn_group_size 0); dtype and channel multiple 'auto': float32 and 1 on the CPU.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.depth = 8
  config.model.alpha = 24.0
  config.dataset = 'fashion_mnist'
  config.augment = False
  config.batch_size = 64
  config.num_epochs = 3
  config.learning_rate = 0.1
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 0.1
  config.weight_decay = 5e-5
  config.checkpoint_every_steps = 500
  return config
