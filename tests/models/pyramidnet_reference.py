"""Tiny PyramidNets (and a tiny PyConvResNet), and a reference PyramidNet written straight from
the paper and the authors' PyTorch code, shared by the tests that run networks (imported as
`from tests.models import pyramidnet_reference`).

Compiling dominates the cost on CPU, so each test compiles at most a couple of programs and the
nets use variables made from the traced shapes (no init compile): He fan-out conv kernels and
non-trivial BN parameters / running statistics, so every BN shows in the outputs. Inputs mix an
even and an odd side, so one compile checks symmetric padding (even side) and the ceil(n / 2)
shortcut (odd side); the bottleneck net takes a 1-channel input.

The compiled probes are jitted once per set of levers (`jit_per_levers`): jax.jit caches a trace
per function object and the levers are not part of its key.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pyramidnet_jax import PyConvResNet
from pyramidnet_jax import PyramidNet
from pyramidnet_jax import levers
from tests import helpers
from tests.models.paper_tables import rng

SMALL_NETS = {
    # name: (model kwargs, input shape)
    'cifar_basic': (dict(depth=8, alpha=12), (4, 32, 33, 3)),
    'cifar_bottleneck': (dict(depth=11, alpha=12, bottleneck=True), (4, 31, 32, 1)),
    'imagenet_basic': (dict(depth=18, alpha=16, stem='imagenet'), (4, 64, 65, 3)),
}


def jit_per_levers(fn=None, **jit_kwargs):
  """helpers.jit(fn, **jit_kwargs), with a trace of its own under each set of levers.

  JAX keys its trace cache on the Python function, whatever jit wraps it, so each set of levers
  gets a fresh function that calls `fn`.
  """
  if fn is None:
    return functools.partial(jit_per_levers, **jit_kwargs)
  jitted = {}

  @functools.wraps(fn)
  def call(*args, **kwargs):
    chosen = levers.current()
    if chosen not in jitted:
      def fresh(*args, **kwargs):
        return fn(*args, **kwargs)
      jitted[chosen] = helpers.jit(functools.wraps(fn)(fresh), **jit_kwargs)
    return jitted[chosen](*args, **kwargs)

  return call


def synthetic_variables(model, shape, seed: int = 0):
  """Variables of model's shapes: He fan-out kernels, the classifier's uniform init, and BN
  parameters and statistics away from their initial 1 and 0."""
  abstract = jax.eval_shape(model.init, rng(), jax.ShapeDtypeStruct(shape, jnp.float32))
  r = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path)
    if "['fc']" in name:
      bound = 1 / math.sqrt(model.num_features)
      value = r.uniform(-bound, bound, leaf.shape)
    elif name.endswith("['kernel']"):
      kh, kw, _, out = leaf.shape
      value = r.normal(0.0, math.sqrt(2 / (kh * kw * out)), leaf.shape)
    elif name.endswith("['scale']"):
      value = r.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['var']"):
      value = r.uniform(0.5, 2.0, leaf.shape)
    else:  # BN bias and running mean.
      value = r.normal(0.0, 0.3, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, abstract)


@functools.lru_cache(maxsize=None)
def small_net(name: str, **overrides):
  """(model, synthetic variables, input) of a SMALL_NETS network; overrides are module fields."""
  kwargs, shape = SMALL_NETS[name]
  model = PyramidNet(**{'num_classes': 10, **kwargs, **overrides})
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  return model, synthetic_variables(model, shape), x


@functools.lru_cache(maxsize=None)
def tiny_pyconv(remat: bool = False):
  """(model, synthetic variables, input) of PyConvResNet-18 with the small-image stem on 16x16:
  stage 4 at 2x2, so that its BatchNorms see 16 values per channel."""
  model = PyConvResNet(depth=18, num_classes=10, stem='cifar', remat=remat)
  shape = (4, 16, 16, 3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  return model, synthetic_variables(model, shape), x


def labels_for(x):
  return jnp.arange(x.shape[0]) % 10


def cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


@jit_per_levers(static_argnames=('model',))
def eval_probe(model, variables, x):
  """Eval-mode logits, `features` and every submodule's output, in one compiled program."""
  logits, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  features = model.apply(variables, x, method='features')
  return logits, features, state['intermediates']


@functools.lru_cache(maxsize=None)
def _eval_run(name: str, chosen: levers.Levers):
  model, variables, x = small_net(name)
  return eval_probe(model, variables, x)


def eval_run(name: str):
  """eval_probe of a SMALL_NETS network under the current levers, computed once."""
  return _eval_run(name, levers.current())


@jit_per_levers(static_argnames=('model',))
def train_and_eval(model, variables, x):
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  features, _ = model.apply(variables, x, train=True, return_features=True,
                            mutable=['batch_stats'])
  eval_logits = model.apply(variables, x)  # No mutable collection needed.
  updated_logits = model.apply({'params': variables['params'], **updates}, x)
  return logits, updates, features, eval_logits, updated_logits


@jit_per_levers(static_argnames=('model', 'train'))
def model_grads(model, params, batch_stats, x, labels, train):
  """((loss, logits), parameter gradients), in train mode or with the running statistics."""
  def loss(params):
    variables = {'params': params, 'batch_stats': batch_stats}
    if train:
      logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    else:
      logits = model.apply(variables, x)
    return cross_entropy(logits, labels), logits
  return jax.value_and_grad(loss, has_aux=True)(params)


@jit_per_levers(static_argnames=('model',))
def training_results(model, variables, x, labels):
  """What a training step takes from the network, in train mode: {'loss', 'logits', 'grads'
  (of the parameters), 'batch_stats' (the updated running statistics)}."""
  def loss(params):
    logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                  x, train=True, mutable=['batch_stats'])
    return cross_entropy(logits, labels), (logits, updates['batch_stats'])
  (loss, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
  return {'loss': loss, 'logits': logits, 'grads': grads, 'batch_stats': stats}


# ------------------------------------------------------------------------------------------------
# The reference network: eval-mode PyramidNet in plain lax, at HIGHEST precision.


def ref_conv(x, kernel, stride, pad):
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)


def same_conv(x, kernel, stride):
  return lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)


def ref_bn(x, params, stats):
  return (x - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5) * params['scale'] + params['bias']


def ref_avg_pool_ceil(x):
  # Replicating the last row / column, then plain 2x2 means, equals averaging only the covered
  # pixels of PyTorch's ceil_mode windows.
  x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)), mode='edge')
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def reference_block(h, bp, bs, stride, bottleneck, conv=None):
  """One pre-activation block (docs/architecture.md); `conv(x, kernel, stride, pad)`, symmetric
  ref_conv by default."""
  conv = conv or ref_conv
  r = ref_bn(h, bp['bn1'], bs['bn1'])
  if bottleneck:
    r = conv(r, bp['conv1']['kernel'], 1, 0)
    r = jax.nn.relu(ref_bn(r, bp['bn2'], bs['bn2']))
    r = conv(r, bp['conv2']['kernel'], stride, 1)
    r = jax.nn.relu(ref_bn(r, bp['bn3'], bs['bn3']))
    r = conv(r, bp['conv3']['kernel'], 1, 0)
    r = ref_bn(r, bp['bn4'], bs['bn4'])
  else:
    r = conv(r, bp['conv1']['kernel'], stride, 1)
    r = jax.nn.relu(ref_bn(r, bp['bn2'], bs['bn2']))
    r = conv(r, bp['conv2']['kernel'], 1, 1)
    r = ref_bn(r, bp['bn3'], bs['bn3'])
  short = ref_avg_pool_ceil(h) if stride == 2 else h
  short = jnp.pad(short, ((0, 0), (0, 0), (0, 0), (0, r.shape[-1] - short.shape[-1])))
  return r + short  # No ReLU after the addition.


def reference_forward_fn(variables, x, stem, bottleneck):
  """Eval-mode PyramidNet with the authors' PyTorch semantics: {'stem', 'stage1', ..., 'pooled',
  'logits'}."""
  p, s = variables['params'], variables['batch_stats']
  out = {}
  if stem == 'cifar':
    h = ref_bn(ref_conv(x, p['conv1']['kernel'], 1, 1), p['bn1'], s['bn1'])  # No ReLU.
  else:
    h = jax.nn.relu(ref_bn(ref_conv(x, p['conv1']['kernel'], 2, 3), p['bn1'], s['bn1']))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                          ((0, 0), (1, 1), (1, 1), (0, 0)))
  out['stem'] = h
  stage = 1
  while f'layer{stage}_0' in p:
    i = 0
    while f'layer{stage}_{i}' in p:
      bp, bs = p[f'layer{stage}_{i}'], s[f'layer{stage}_{i}']
      stride = 2 if stage > 1 and i == 0 else 1
      h = reference_block(h, bp, bs, stride, bottleneck)
      i += 1
    out[f'stage{stage}'] = h
    stage += 1
  h = jax.nn.relu(ref_bn(h, p['bn_final'], s['bn_final']))
  out['pooled'] = pooled = h.mean(axis=(1, 2))
  out['logits'] = jnp.dot(pooled, p['fc']['kernel'], precision=lax.Precision.HIGHEST) \
      + p['fc']['bias']
  return out


reference_forward = helpers.jit(reference_forward_fn, static_argnames=('stem', 'bottleneck'))


@functools.partial(helpers.jit, static_argnames=('stem', 'bottleneck'))
def reference_grads(params, batch_stats, x, labels, stem, bottleneck):
  def loss(params):
    out = reference_forward_fn({'params': params, 'batch_stats': batch_stats}, x, stem,
                               bottleneck)
    return cross_entropy(out['logits'], labels)
  return jax.value_and_grad(loss)(params)


def assert_close_scaled(got, want, rtol):
  """Elementwise closeness relative to the tensor's overall scale."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  scale = max(float(np.abs(want).max()), 1e-6)
  err = float(np.abs(got - want).max())
  assert err <= rtol * scale, f'max error {err} vs scale {scale}'


def train_mode_dead_biases(params, cifar_stem: bool) -> set[str]:
  """BN biases whose gradient is exactly zero in train mode, by construction.

  A per-channel constant added after the last BN of a block (or after the CIFAR stem's BN,
  which has no ReLU) travels unchanged along the shortcuts (the ceil-mode average of a constant
  is that constant; appended channels are zero) and is removed by the next train-mode BN (the
  next block's bn1, and bn_final). In a bottleneck, bn1's bias passes a 1x1 conv and is removed
  by bn2. The basic block's bn1 bias is NOT dead: the 3x3 conv's zero padding breaks the
  constant at the borders. A ReLU added after the addition or in the CIFAR stem would revive
  these, so the set pins the architecture down.
  """
  dead = {"['bn1']['bias']"} if cifar_stem else set()
  for block in params:
    if block.startswith('layer'):
      if 'bn4' in params[block]:
        dead |= {f"['{block}']['bn4']['bias']", f"['{block}']['bn1']['bias']"}
      else:
        dead.add(f"['{block}']['bn3']['bias']")
  return dead
