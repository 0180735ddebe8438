"""The kit's oneDNN convolutions: same values and gradients as XLA's, chosen when they should be.

oneDNN is a dependency on Linux x86-64 (onednn-cpu-gomp) and its FFI handler builds with the C++
compiler there; elsewhere `onednn.status()` says why not and these tests skip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyramidnet_jax import levers
from pyramidnet_jax import models
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.models import layers
from pyramidnet_jax.xla_cpu import convolution
from pyramidnet_jax.xla_cpu import host_init
from pyramidnet_jax.xla_cpu import onednn
from tests import helpers

needs_onednn = pytest.mark.skipif(onednn.status() is not None,
                                  reason=f'oneDNN convolutions unavailable: {onednn.status()}')


@pytest.fixture
def backend():
  """Sets the kit's convolution backend for one test and restores the previous one."""
  previous = convolution.backend()
  yield convolution.set_backend
  convolution.set_backend(previous)


def relative_error(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def conv_values_and_grads(x, kernel, stride, groups=1):
  padding = layers.symmetric_padding(kernel.shape[0])

  def loss(x, kernel):
    y = convolution.conv2d(x, kernel, stride, padding, groups)
    return jnp.sum(y * jnp.cos(y)), y  # A non-linear loss, so the cotangent is not uniform.

  (_, y), (dx, dkernel) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, kernel)
  return y, dx, dkernel


def hlo(fn, *args) -> str:
  # A new function each time: JAX's trace cache would otherwise ignore a backend change.
  return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


@needs_onednn
@pytest.mark.parametrize('batch,size,cin,cout,kernel,stride,groups', [
    (4, 32, 24, 27, 3, 1, 1),  # An odd PyramidNet width.
    (8, 33, 19, 37, 3, 2, 1),  # Stride 2 on an odd size: oneDNN's right padding differs.
    (4, 15, 1, 16, 7, 2, 1),   # The ImageNet stem on 1-channel input.
    (2, 16, 3, 16, 3, 1, 1),   # The CIFAR stem.
    (4, 8, 40, 160, 1, 1, 1),  # A bottleneck's 1x1.
    (4, 9, 32, 16, 9, 2, 16),  # PyConv levels: grouped, large kernels, strided.
    (2, 8, 12, 6, 5, 1, 3),
])
def test_onednn_matches_xla(backend, batch, size, cin, cout, kernel, stride, groups):
  keys = jax.random.split(jax.random.key(0))
  x = jax.random.normal(keys[0], (batch, size, size, cin))
  w = jax.random.normal(keys[1], (kernel, kernel, cin // groups, cout))
  backend('onednn')
  ours = conv_values_and_grads(x, w, stride, groups)
  assert onednn.TARGETS['forward'] in hlo(lambda x, w: convolution.conv2d(
      x, w, stride, layers.symmetric_padding(kernel), groups), x, w)
  backend('xla')
  theirs = conv_values_and_grads(x, w, stride, groups)
  for name, a, b in zip(('output', 'input gradient', 'kernel gradient'), ours, theirs):
    assert a.shape == b.shape, name
    assert relative_error(a, b) < 2e-5, (name, relative_error(a, b))


@needs_onednn
@pytest.mark.parametrize('bottleneck,depth', [(False, 8), (True, 11)])
def test_pyramidnet_training_gradients_match_across_backends(backend, bottleneck, depth):
  model = models.PyramidNet(depth=depth, alpha=8, num_classes=10, bottleneck=bottleneck)
  x = jax.random.normal(jax.random.key(1), (8, 15, 15, 3))  # Odd size: stride 2 on 15 and 8.
  variables = host_init.init_variables(model, jax.random.key(0), x.shape)
  labels = jnp.arange(8) % 10

  def loss(params):
    logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                  train=True, mutable=['batch_stats'])
    one_hot = jax.nn.one_hot(labels, 10)
    return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1)), updates

  results = {}
  for name in ('onednn', 'xla'):
    backend(name)
    grad_fn = jax.value_and_grad(loss, has_aux=True)  # A new function: a trace of its own.
    uses_onednn = onednn.TARGETS['backward_weights'] in hlo(grad_fn, variables['params'])
    assert uses_onednn == (name == 'onednn')
    results[name] = jax.jit(grad_fn)(variables['params'])
  (loss_o, stats_o), grads_o = results['onednn']
  (loss_x, stats_x), grads_x = results['xla']
  np.testing.assert_allclose(loss_o, loss_x, rtol=1e-5)
  # Relative to each leaf's size, or to a hundredth of the largest gradient for the BN biases
  # whose gradient is zero up to rounding by construction
  # (tests/models/pyramidnet_reference.train_mode_dead_biases).
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_x))
  for a, b in zip(jax.tree.leaves((grads_o, stats_o)), jax.tree.leaves((grads_x, stats_x))):
    scale = max(float(jnp.max(jnp.abs(b))), 1e-2 * largest)
    np.testing.assert_allclose(a, b, atol=1e-4 * scale)


@needs_onednn
def test_when_onednn_is_used(backend, monkeypatch):
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 4))

  def f(x, w):
    return convolution.conv2d(x, w, 1, ((1, 1), (1, 1)))

  target = onednn.TARGETS['forward']
  backend('auto')
  assert target in hlo(f, x, w)
  assert onednn.TARGETS['backward_weights'] in hlo(jax.grad(lambda w: f(x, w).sum()), w)
  assert target not in hlo(f, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))  # float32 only.
  backend('xla')
  assert target not in hlo(f, x, w)
  # On several devices the SPMD partitioner would replicate the FFI call: XLA's convolution.
  backend('auto')
  monkeypatch.setattr(convolution.jax, 'device_count', lambda: 8)
  assert target not in hlo(f, x, w)


def test_unknown_backend_is_rejected():
  with pytest.raises(ValueError, match="'auto', 'onednn', 'xla'"):
    convolution.set_backend('mkl')


def test_missing_onednn_says_what_to_install(backend, monkeypatch):
  monkeypatch.setattr(onednn, 'find_library', lambda: None)
  with pytest.raises(onednn.OnednnUnavailableError, match='pip install onednn-cpu-gomp'):
    onednn.load.__wrapped__()
  # 'onednn' asked for explicitly fails with that message; 'auto' falls back to XLA's.
  monkeypatch.setattr(onednn, 'load', onednn.load.__wrapped__)
  monkeypatch.setattr(onednn, 'status', lambda: 'no libdnnl.so.3 here')
  with pytest.raises(ValueError, match="config.cpu_conv='onednn' but .*onednn-cpu-gomp"):
    backend('onednn')
  backend('auto')
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  assert onednn.TARGETS['forward'] not in hlo(
      lambda x, w: convolution.conv2d(x, w, 1, ((1, 1), (1, 1))), x, w)


@pytest.mark.parametrize('cpu_conv', ['xla', 'onednn', 'auto'])
def test_enable_selects_the_configs_backend(backend, cpu_conv):
  """xla_cpu.enable(config) (the command lines' set-up) takes config.cpu_conv; no config: 'auto'."""
  if cpu_conv == 'onednn' and onednn.status() is not None:
    pytest.skip(f'oneDNN convolutions unavailable: {onednn.status()}')
  jax.devices()  # JAX started: enable leaves the process settings be (process_test.py).
  with levers.using(levers.current()):  # enable switches the process's levers: restored after.
    backend('xla' if cpu_conv != 'xla' else 'auto')
    assert xla_cpu.enable(helpers.tiny_config(cpu_conv=cpu_conv))
    assert convolution.backend() == cpu_conv
    backend('xla')
    assert xla_cpu.enable()
    assert convolution.backend() == 'auto'
    with pytest.raises(ValueError, match='Unknown CPU convolution backend'):
      xla_cpu.enable(helpers.tiny_config(cpu_conv='cudnn'))


@needs_onednn
def test_vmap_over_the_convolution(backend):
  """Per-example computations (jax.vmap, e.g. per-example gradients) work and match XLA's."""
  x = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))

  def per_example_grads(x):
    loss = lambda w, x: jnp.sum(jnp.sin(convolution.conv2d(x, w, 2, ((1, 1), (1, 1)))))
    return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, x)

  backend('onednn')
  ours = per_example_grads(x)
  backend('xla')
  assert relative_error(ours, per_example_grads(x)) < 2e-5
