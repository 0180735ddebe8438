"""Demo: PyramidNet-8 a48 on the real Fashion-MNIST (Debian's dataset-fashion-mnist).

  python -m pyramidnet_jax.main --config=configs/fashion_mnist_demo.py --workdir=runs/demo

Hardware: a 2-core CPU. Expected: about 91% test accuracy in under 10 minutes.
This small configuration is ours, not the paper's: depth 8 (one basic block per stage) with
alpha 48 gives widths 32, 48, 64, multiples of 16 that XLA's CPU convolutions run fast.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.depth = 8
  config.model.alpha = 48.0
  config.dataset = 'fashion_mnist'
  config.batch_size = 128
  config.num_epochs = 2
  config.learning_rate = 0.1
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 0.1
  config.label_smoothing = 0.1
  config.weight_decay = 5e-4
  config.checkpoint_every_steps = 200
  return config
