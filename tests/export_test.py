"""What a GPU or a TPU would compile: the training step exported for them, on this CPU.

On those platforms the plain levers run (the CLIs switch to the CPU kit only where the CPU is
JAX's only platform), so the lowered step must hold no custom call of ours and none of the
kit's CPU-only constructs: the learning rate under a conditional, the remat's data-dependence
trick instead of jax.checkpoint's barriers.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pyramidnet_jax import levers
from pyramidnet_jax import models
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.training import optimizer
from pyramidnet_jax.training import step
from tests import helpers


def exported_train_step(platform: str, chosen: levers.Levers, model_name: str):
  """The training step exported for `platform` under `chosen` levers, the network built for that
  platform from the default config ('auto' dtype and channel multiple): jax.export.Exported, or
  for the CPU the lowered step (jax.export refuses our FFI calls, which have no stable ABI)."""
  config = helpers.tiny_config(lr_boundaries=(1, 2), **{'model.remat': True})
  if model_name == 'pyconvresnet':
    config.model.name, config.model.depth = 'pyconvresnet', 18
  with levers.using(chosen):
    model = models.from_config(config.model, 10, platform=platform)
    lr_fn = optimizer.create_learning_rate_fn(config, 10, 100)
    tx = optimizer.create_optimizer(config, lr_fn)
    image = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               image)
    state = jax.eval_shape(lambda v: step.TrainState.create(
        apply_fn=model.apply, params=v['params'], tx=tx, batch_stats=v['batch_stats']), variables)
    batch = {'image': jax.ShapeDtypeStruct((8, 16, 16, 1), jnp.float32),
             'label': jax.ShapeDtypeStruct((8,), jnp.int32)}
    train_step = jax.jit(functools.partial(step.train_step, learning_rate_fn=lr_fn,
                                           label_smoothing=0.0, dropout_key=jax.random.key(1)))
    if platform == 'cpu':
      return train_step.lower(state, batch)
    return jax.export.export(train_step, platforms=[platform])(state, batch)


def lowered_train_step(platform: str, chosen: levers.Levers, model_name: str) -> str:
  """The StableHLO text of exported_train_step."""
  exported = exported_train_step(platform, chosen, model_name)
  return exported.as_text() if platform == 'cpu' else exported.mlir_module()


@pytest.mark.parametrize('model_name', ['pyramidnet', 'pyconvresnet'])
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_the_step_for_gpu_and_tpu_holds_no_cpu_lever(platform, model_name):
  text = lowered_train_step(platform, levers.PLAIN, model_name)
  assert 'custom_call' not in text
  assert 'stablehlo.case' not in text and 'stablehlo.if' not in text
  assert 'optimization_barrier' in text  # jax.checkpoint's remat.
  assert 'stablehlo.convolution' in text


def test_the_cpu_kit_would_put_cpu_constructs_there():
  # The counterpart, so that the test above can fail: the kit's step calls oneDNN and computes
  # the learning rate under a conditional.
  text = lowered_train_step('cpu', xla_cpu.LEVERS, 'pyramidnet')
  assert 'PyramidnetOnednnConv' in text
  assert 'stablehlo.case' in text or 'stablehlo.if' in text


# A convolution's operand and result element types in StableHLO text.
CONVOLUTION = re.compile(r'stablehlo\.convolution.*: \(tensor<[0-9x]*x(\w+)>, tensor<[0-9x]*x(\w+)>\) '
                         r'-> tensor<([0-9x]*)x(\w+)>')


@pytest.mark.parametrize('model_name', ['pyramidnet', 'pyconvresnet'])
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_auto_dtype_trains_in_bfloat16_with_float32_state_on_gpu_and_tpu(platform, model_name):
  """dtype 'auto' there: every convolution multiplies bfloat16 operands; each kernel's gradient
  leaves its convolution as float32 (so its all-reduce is float32: multidevice_test.py); the
  parameters, BatchNorm statistics and optimiser state the step returns are float32; no custom
  call of ours."""
  exported = exported_train_step(platform, levers.PLAIN, model_name)
  text = exported.mlir_module()
  assert 'custom_call' not in text
  convolutions = CONVOLUTION.findall(text)
  assert convolutions and all(lhs == rhs == 'bf16' for lhs, rhs, _, _ in convolutions)
  new_state, metrics = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  kernels = [a.shape for a in jax.tree.leaves(new_state.params) if a.ndim == 4]
  # One float32 result per kernel: its gradient (at the padded widths of channel_multiple).
  assert sum(out == 'f32' for _, _, _, out in convolutions) == len(kernels)
  assert all(out == 'bf16' for _, _, _, out in convolutions if out != 'f32')
  floats = [a for a in jax.tree.leaves((new_state.params, new_state.batch_stats,
                                        new_state.opt_state, metrics['loss']))
            if jnp.issubdtype(a.dtype, jnp.floating)]
  assert floats and all(a.dtype == jnp.float32 for a in floats)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(exported.in_avals)
             if jnp.issubdtype(a.dtype, jnp.floating))


def test_auto_dtype_is_float32_on_the_cpu():
  """The counterpart: on the CPU 'auto' is float32, no bfloat16 anywhere in the step."""
  text = lowered_train_step('cpu', levers.PLAIN, 'pyramidnet')
  assert 'stablehlo.convolution' in text and 'bf16' not in text
