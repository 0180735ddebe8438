"""Demo: PyConvResNet-18 with our small-image stem on the real Fashion-MNIST.

  python -m pyramidnet_jax.main --config=configs/fashion_mnist_pyconv.py \
      --workdir=runs/fashion_mnist_pyconv

This recipe is ours, not the paper's: stem='cifar' is our small-image variant (conv3x3/1 -> BN ->
ReLU, stage 1 at stride 1, so 28x28 ends at 4x4), at depth 18 (two-conv PyConv basic blocks, 5.4M
parameters). It follows configs/fashion_mnist_demo.py: a short cosine run with a brief warm-up, no
augmentation or label smoothing, light weight decay, batch 64, but one epoch only: the net costs 170
MMACs per image forward, 16x the PyramidNet demo. Expected accuracy: not measured. Hardware and
time: meant for a GPU (minutes, not measured); on the shared 2-core CI CPU one training step took
~10 s (measured once, after a ~40 s compile), so the 938-step epoch would take about 2.5 hours
there.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'pyconvresnet'
  config.model.depth = 18
  config.model.stem = 'cifar'
  config.dataset = 'fashion_mnist'
  config.augment = False
  config.batch_size = 64
  config.num_epochs = 1
  config.learning_rate = 0.1
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 0.1
  config.weight_decay = 5e-5
  config.checkpoint_every_steps = 500
  return config
