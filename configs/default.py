"""Defaults shared by every experiment config: the paper's CIFAR-10 recipe (docs/architecture.md).

Experiment configs import this and change only what differs. Every field here is read by the
training code; `--config.<field>=value` overrides any of them and an unknown field is an error.
Each field's type and range is checked at start (pyramidnet_jax/training/config_checks.py). A
resume must keep the training fields of the workdir's config.json; the bookkeeping ones, data_dir
and eval_batch_size may change (pyramidnet_jax/training/workdir.py).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Network: keywords of pyramidnet_jax.PyramidNet.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'pyramidnet'
  config.model.depth = 110
  config.model.alpha = 48.0
  config.model.bottleneck = False
  config.model.widening = 'additive'  # 'additive' | 'multiplicative'
  config.model.stem = 'cifar'  # 'cifar' | 'imagenet'
  config.model.rounding = 'half_up'  # 'half_up' | 'half_even'
  config.model.dropout_rate = 0.0
  config.model.remat = False
  # PyramidNet computes each block at its widths rounded up to this multiple (1: exact widths).
  # Parameters keep their exact shapes and results change only at float rounding level
  # (pyramidnet_jax/models/pyramidnet_blocks.py). 'auto': 1 on CPU (16 compiles deep nets faster
  # but trained the small demo net slower there, docs/benchmarks.md#levers), 8 on NVIDIA GPUs
  # (tensor cores' channel multiple), 128 on TPU (the MXU's and vector registers' lane count), 1
  # elsewhere. The GPU and TPU values follow from the hardware and are NOT measured
  # (pyramidnet_jax/models/platforms.py). Any type: 'auto' or a whole number >= 1.
  config.model.channel_multiple = config_dict.FieldReference('auto', field_type=object)
  # Computation dtype: 'auto' (bfloat16 on GPU and TPU, float32 on CPU and NVIDIA GPUs before
  # Ampere), 'bfloat16' or 'float32'. Parameters, BatchNorm statistics, logits, the loss, the
  # optimiser state and the parameter gradients (their all-reduce included) stay float32.
  config.model.dtype = 'auto'
  # BatchNorm statistics in training over groups of this many consecutive examples of the global
  # batch, the running averages updated with the mean of the groups'; 0: the whole global batch.
  # batch_size / devices gives per-device statistics, as PyTorch's DataParallel computes them,
  # with no communication. Must divide batch_size, and divide each device's share or be a
  # multiple of it (pyramidnet_jax/models/batch_norm.py, training/runtime.py).
  config.model.bn_group_size = 0

  # Data.
  # 'cifar10' | 'cifar100' | 'imagenet2012' | 'fashion_mnist' | 'folder:/path/to/root', the
  # user's images in root/train/<class>/* and root/val/<class>/* (val/ is the test split).
  config.dataset = 'cifar10'
  config.data_dir = ''  # '' = the TFDS default, or /usr/share/datasets/fashion-mnist.
  config.augment = True  # Dataset's training augmentation (CIFAR: pad 4, crop, flip).
  config.validation_fraction = 0.0  # Hold-out from the training split (stratified in memory).
  config.validation_seed = 0
  # imagenet2012 and folder: only. Side of the training crop and of the eval centre crop (eval
  # first resizes the shorter side to round(image_size * 256 / 224)).
  config.image_size = 224
  # imagenet2012 and folder: only, training with augment. The Torch recipe's (fb.resnet.torch)
  # colour jitter: brightness, contrast and saturation factors ~ U(1 -+ color_jitter), applied
  # in a random order; 0 = off, 0.4 = the Torch recipe.
  config.color_jitter = 0.0
  # imagenet2012 and folder: only, training with augment. Std of AlexNet-style PCA lighting noise
  # (ImageNet's RGB eigenvalues and eigenvectors); 0 = off, 0.1 = the Torch recipe.
  config.pca_lighting = 0.0
  # folder: only. An unreadable image file is named in the log and 'skip'ped (training: replaced
  # by the next readable file of the shard; evaluation: masked out; counted per epoch), or is an
  # 'error' that stops the run.
  config.bad_images = 'skip'
  # folder: only. An image file of more pixels (read from its header) counts as unreadable, so
  # that a corrupt or hostile header cannot exhaust memory; PIL's own limit by default.
  config.max_image_pixels = 178_956_970

  # Optimisation: SGD, Nesterov, coupled L2 weight decay on all parameters.
  config.batch_size = 128  # Global, across all devices and hosts.
  config.eval_batch_size = 400  # Divisible by 1, 2, 4, 8, 16 devices.
  config.num_epochs = 300
  config.num_train_steps = -1  # When > 0, overrides num_epochs.
  config.learning_rate = 0.1
  config.lr_schedule = 'piecewise'  # 'piecewise' | 'cosine'
  config.lr_boundaries = (150, 225)  # Epochs at which the LR is multiplied by lr_decay.
  config.lr_decay = 0.1
  config.warmup_epochs = 0.0  # Linear warm-up from 0, before either schedule.
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.label_smoothing = 0.0

  # Early stopping on validation accuracy (needs validation_fraction > 0); 0 turns it off.
  config.early_stopping_patience = 0  # Epochs without improvement before stopping.
  config.early_stopping_min_delta = 0.0  # Smallest accuracy gain that counts as improvement.

  # Bookkeeping.
  config.seed = 0
  config.checkpoint_every_steps = 1000
  config.checkpoints_to_keep = 2
  config.log_every_steps = 50
  config.progress_bar = True
  config.write_report = True  # At the end: WORKDIR/report/ (pyramidnet_jax.evaluate's report).
  # A JAX profiler trace of training steps [start, stop) into WORKDIR/profile (process 0), for
  # TensorBoard's profile plugin or Perfetto, e.g. --config.profile_steps='(100, 110)'; () is off.
  config.profile_steps = ()
  config.compilation_cache_dir = '~/.cache/pyramidnet_jax/xla'  # '' turns the cache off.
  # The XLA:CPU kit (pyramidnet_jax/xla_cpu), on where the CPU is JAX's only platform.
  # Convolutions on CPU: 'auto' (oneDNN's, built on first use, where a C++ compiler and oneDNN
  # are at hand; else XLA's, several times slower), 'onednn' (or an error saying what is
  # missing), 'xla'. Same results to float rounding; pyramidnet_jax/xla_cpu/convolution.py.
  config.cpu_conv = 'auto'
  # XLA:CPU's concurrency-optimised scheduler (its default) keeps more buffers alive to run
  # independent ops side by side; off, the train step needs several times less memory and runs
  # as fast or faster on CPU (docs/benchmarks.md#levers). Other platforms ignore it.
  config.xla_cpu_concurrency_scheduler = False
  # On a CPU-only JAX: glibc's malloc keeps freed memory (no mmap, no trim) and steps dispatch
  # synchronously, so XLA's per-step temporary buffer is reused instead of page-faulted in afresh
  # every step (docs/benchmarks.md#levers); the process keeps its peak memory
  # (pyramidnet_jax/xla_cpu/process.py). Other platforms ignore it.
  config.cpu_keep_freed_memory = True

  return config
