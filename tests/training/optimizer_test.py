"""The optimiser and its schedules: boundaries, warm-up, cosine, coupled weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pyramidnet_jax import levers
from pyramidnet_jax import models
from pyramidnet_jax import xla_cpu
from pyramidnet_jax.training import optimizer
from tests import helpers


def schedule_config(**overrides):
  fields = dict(learning_rate=0.1, lr_schedule='piecewise', lr_boundaries=(150, 225),
                lr_decay=0.1, warmup_epochs=0.0)
  fields.update(overrides)
  return helpers.tiny_config(**fields)


def lr_at(fn, step):
  return float(fn(step))


def test_piecewise_schedule_boundaries():
  spe = 391
  fn = optimizer.create_learning_rate_fn(schedule_config(), spe, 300 * spe)
  assert lr_at(fn, 0) == pytest.approx(0.1, rel=1e-6)
  assert lr_at(fn, 150 * spe - 1) == pytest.approx(0.1, rel=1e-6)
  assert lr_at(fn, 150 * spe) == pytest.approx(0.01, rel=1e-6)
  assert lr_at(fn, 225 * spe - 1) == pytest.approx(0.01, rel=1e-6)
  assert lr_at(fn, 225 * spe) == pytest.approx(0.001, rel=1e-6)
  assert lr_at(fn, 300 * spe - 1) == pytest.approx(0.001, rel=1e-6)


def test_warmup_is_linear_from_zero_and_keeps_the_boundaries():
  spe = 391
  fn = optimizer.create_learning_rate_fn(schedule_config(warmup_epochs=5), spe, 300 * spe)
  warmup = 5 * spe
  assert lr_at(fn, 0) == 0.0
  for step in (1, warmup // 3, warmup // 2, warmup - 1):
    assert lr_at(fn, step) == pytest.approx(0.1 * step / warmup, rel=1e-4)
  assert lr_at(fn, warmup) == pytest.approx(0.1, rel=1e-6)
  # Boundaries count epochs from the very start, warm-up included.
  assert lr_at(fn, 150 * spe - 1) == pytest.approx(0.1, rel=1e-6)
  assert lr_at(fn, 150 * spe) == pytest.approx(0.01, rel=1e-6)
  assert lr_at(fn, 225 * spe) == pytest.approx(0.001, rel=1e-6)


@pytest.mark.parametrize('warmup_epochs', [0.0, 2.0])
def test_cosine_schedule_ends_near_zero(warmup_epochs):
  spe, epochs = 100, 20
  total = spe * epochs
  fn = optimizer.create_learning_rate_fn(schedule_config(lr_schedule='cosine',
                                                     warmup_epochs=warmup_epochs), spe, total)
  warmup = int(warmup_epochs * spe)
  assert lr_at(fn, warmup) == pytest.approx(0.1, rel=1e-6)
  middle = warmup + (total - warmup) // 2
  assert lr_at(fn, middle) == pytest.approx(0.05, rel=1e-4)
  assert lr_at(fn, total - 1) < 1e-5
  assert lr_at(fn, total) == pytest.approx(0.0, abs=1e-9)
  values = [lr_at(fn, s) for s in range(warmup, total + 1, 50)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match='lr_schedule'):
    optimizer.create_learning_rate_fn(schedule_config(lr_schedule='step'), 10, 100)


def model_params(config, num_classes=10):
  """Parameters with the model's tree and shapes, PyTorch-like values, without compiling init."""
  model = models.from_config(config.model, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  rng = np.random.default_rng(0)

  def value(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    if name.endswith('scale'):
      return jnp.ones(leaf.shape, leaf.dtype)  # BN's initial gamma.
    return jnp.asarray(rng.uniform(-0.5, 0.5, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, shapes)


@pytest.mark.parametrize('nesterov', [True, False])
def test_weight_decay_reaches_every_parameter_bn_and_bias_included(nesterov):
  lr, wd, momentum = 0.5, 0.01, 0.9
  config = helpers.tiny_config(learning_rate=lr, weight_decay=wd, momentum=momentum,
                               nesterov=nesterov)
  params = model_params(config)
  tx = optimizer.create_optimizer(config, optimizer.create_learning_rate_fn(config, 10, 100))
  opt_state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, opt_state = tx.update(zero, opt_state, params)
  new = optax.apply_updates(params, updates)
  # Coupled L2: g = 0 + wd * p, then the first step of momentum SGD. The trace starts at zero, so
  # its first value is g; Nesterov steps along g + momentum * trace = (1 + momentum) * g
  # (PyTorch's d_p = g + momentum * buf with buf = g), plain momentum along g.
  factor = 1.0 - lr * wd * ((1.0 + momentum) if nesterov else 1.0)
  old_leaves, new_leaves = helpers.flat_leaves(params), helpers.flat_leaves(new)
  for name, old in old_leaves.items():
    np.testing.assert_allclose(new_leaves[name], old * np.float32(factor), rtol=1e-6,
                               err_msg=name)
  bn_scales = [n for n in old_leaves if n.endswith('/scale')]
  assert 'bn1/scale' in bn_scales and 'layer1_0/bn1/scale' in bn_scales
  for name in bn_scales:  # gamma = 1 moves by exactly -lr * wd * (1 + momentum).
    np.testing.assert_allclose(new_leaves[name], np.float32(factor), rtol=1e-6, err_msg=name)
  assert not np.array_equal(new_leaves['fc/bias'], old_leaves['fc/bias'])
  np.testing.assert_allclose(new_leaves['fc/bias'], old_leaves['fc/bias'] * np.float32(factor),
                             rtol=1e-6)


def test_the_optimizer_computes_the_learning_rate_once_per_step_with_the_same_values():
  config = schedule_config(lr_schedule='piecewise', lr_boundaries=(2, 3), warmup_epochs=1)
  lr_fn = optimizer.create_learning_rate_fn(config, 10, 100)
  tx = optimizer.create_optimizer(config, lr_fn)
  params = [jnp.full((i + 1, 3), 0.5) for i in range(40)]
  grads = [jnp.full(p.shape, 0.25) for p in params]
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  plain = optax.chain(optax.add_decayed_weights(config.weight_decay),
                      optax.sgd(lr_fn, momentum=config.momentum, nesterov=config.nesterov))
  plain_update = jax.jit(lambda g, s, p: plain.update(g, s, p)[0])
  state = tx.init(params)
  for step in range(40):  # Warm-up, both boundaries: every step's rate is the schedule's.
    updates, new_state = update(grads, state, params)
    want = plain_update(grads, state, params)
    for got_leaf, want_leaf in zip(updates, want):
      np.testing.assert_array_equal(got_leaf, want_leaf, err_msg=f'step {step}')
    state = new_state
  # XLA:CPU would copy the schedule's scalar arithmetic into each of the 40 leaves' update
  # kernels; inside the conditional it is there once per branch (the piecewise schedule takes
  # the sign of the step's distance to each boundary).
  hlo = update.lower(grads, tx.init(params), params).compile().as_text()
  assert hlo.count(' sign(') == 2 * len(config.lr_boundaries), hlo


def test_plain_levers_trace_the_schedule_as_written():
  config = schedule_config(lr_schedule='piecewise', lr_boundaries=(2, 3), warmup_epochs=1)
  lr_fn = optimizer.create_learning_rate_fn(config, 10, 100)
  params = [jnp.full((i + 1, 3), 0.5) for i in range(4)]
  grads = [jnp.full(p.shape, 0.25) for p in params]
  jaxprs = {}
  for chosen in (levers.PLAIN, xla_cpu.LEVERS):
    with levers.using(chosen):
      tx = optimizer.create_optimizer(config, lr_fn)
    jaxprs[chosen.name] = str(jax.make_jaxpr(tx.update)(grads, tx.init(params), params))
  assert 'cond[' not in jaxprs['plain'] and 'cond[' in jaxprs['xla_cpu']
