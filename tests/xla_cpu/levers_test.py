"""Which primitives run: the plain levers for a library user (and GPUs, TPUs), the kit's where
`xla_cpu.enable` found the CPU to be JAX's only platform, and the paths each set takes through
the same networks."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pyramidnet_jax import PyConvResNet
from pyramidnet_jax import PyramidNet
from pyramidnet_jax import levers
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.xla_cpu import onednn
from tests import helpers

ONEDNN_TARGET_PREFIX = 'PyramidnetOnednn'


def run_python(code: str, **env: str) -> list[str]:
  environment = {**os.environ, 'PYTHONPATH': helpers.ROOT, **env}
  result = subprocess.run([sys.executable, '-c', code], cwd=helpers.ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return result.stdout.split()


def test_a_fresh_import_gets_the_plain_levers():
  code = ('import pyramidnet_jax, pyramidnet_jax.models; from pyramidnet_jax import levers; '
          'print(levers.current().name)')
  assert run_python(code) == ['plain']


ENABLE = ('import jax; {before}from pyramidnet_jax import levers, xla_cpu; '
          'from jax._src import xla_bridge; '
          'print(xla_cpu.enable(), levers.current().name, xla_bridge.backends_are_initialized())')


def test_enable_switches_to_the_kit_where_jax_runs_on_the_cpu_alone():
  assert run_python(ENABLE.format(before=''), JAX_PLATFORMS='cpu') == ['True', 'xla_cpu', 'False']


def test_enable_leaves_the_plain_levers_where_an_accelerator_is_configured():
  # The platform is only configured, never started: this machine has no GPU.
  code = ENABLE.format(before="jax.config.update('jax_platforms', 'cuda'); ")
  assert run_python(code, JAX_PLATFORMS='cpu') == ['False', 'plain', 'False']


def test_the_tests_run_under_the_kit_and_using_restores_the_levers():
  assert levers.current() is xla_cpu.LEVERS  # tests/conftest.py, as the command lines on a CPU.
  with pytest.raises(RuntimeError):
    with levers.using(levers.PLAIN) as chosen:
      assert chosen is levers.current() is levers.PLAIN
      raise RuntimeError
  assert levers.current() is xla_cpu.LEVERS
  with levers.using(xla_cpu.LEVERS):
    xla_cpu.disable()
    assert levers.current() is levers.PLAIN
  assert levers.current() is xla_cpu.LEVERS


def traces(model, x):
  """(primitives of the training forward, primitives and lowered text of the gradient)."""
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                           jax.eval_shape(model.init, jax.random.key(0), x))

  def forward(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
    return logits.sum()

  # Fresh functions per call: each set of levers traces its own.
  grad = jax.grad(lambda p: forward(p))
  return (helpers.primitive_names(jax.make_jaxpr(lambda p: forward(p))(variables['params'])),
          helpers.primitive_names(jax.make_jaxpr(grad)(variables['params'])),
          jax.jit(grad).lower(variables['params']).as_text())


NETWORKS = {
    'pyramidnet': (PyramidNet(depth=8, alpha=8, num_classes=10), (2, 9, 9, 3)),
    'pyramidnet_bottleneck': (PyramidNet(depth=11, alpha=8, bottleneck=True, num_classes=10),
                              (2, 9, 9, 1)),
    'pyconvresnet': (PyConvResNet(depth=18, num_classes=10, stem='cifar'), (2, 8, 8, 3)),
}


@pytest.mark.parametrize('remat', [False, True])
@pytest.mark.parametrize('name', list(NETWORKS))
def test_plain_levers_are_xlas_convolution_autodiff_and_jax_checkpoint(name, remat):
  model, shape = NETWORKS[name]
  with levers.using(levers.PLAIN):
    forward, grad, hlo = traces(model.clone(remat=remat), jnp.ones(shape))
  assert ONEDNN_TARGET_PREFIX not in hlo  # No custom call of ours.
  assert 'conv_general_dilated' in forward and 'ffi_call' not in forward
  # nn.BatchNorm's arithmetic, differentiated by JAX; jax.checkpoint's primitive for remat.
  assert 'custom_vjp_call' not in forward | grad
  assert ('remat2' in forward) == remat and ('remat2' in grad) == remat


@pytest.mark.skipif(onednn.status() is not None, reason=f'oneDNN unavailable: {onednn.status()}')
@pytest.mark.parametrize('remat', [False, True])
@pytest.mark.parametrize('name', list(NETWORKS))
def test_kit_levers_are_onednn_the_textbook_gradient_and_pinned_remat(name, remat):
  model, shape = NETWORKS[name]
  with levers.using(xla_cpu.LEVERS):
    forward, grad, hlo = traces(model.clone(remat=remat), jnp.ones(shape))
  for target in onednn.TARGETS.values():
    assert target in hlo, target
  assert 'ffi_call' in forward
  assert 'conv_general_dilated' not in forward | grad  # Every convolution, grouped ones too.
  # The textbook BatchNorm gradient and the kit's remat are custom VJPs; no jax.checkpoint.
  assert 'custom_vjp_call' in forward
  assert 'remat2' not in forward | grad
