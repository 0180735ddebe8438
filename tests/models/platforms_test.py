"""What config.model.dtype and channel_multiple 'auto' mean on each platform (models/platforms.py),
and the networks models.from_config builds from them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pyramidnet_jax import models
from pyramidnet_jax.models import platforms
from tests import helpers

# Platform -> (computation dtype, channel multiple) that 'auto' must mean there.
EXPECTED = {
    'cpu': (jnp.float32, 1),
    'cuda': (jnp.bfloat16, 8),
    'gpu': (jnp.bfloat16, 8),  # JAX's name for any GPU backend: taken as a recent NVIDIA one.
    'cuda_pre_ampere': (jnp.float32, 1),
    'rocm': (jnp.bfloat16, 1),
    'tpu': (jnp.bfloat16, 128),
    'METAL': (jnp.float32, 1),  # Unknown: no bfloat16, no padding.
}


@pytest.mark.parametrize('platform', sorted(EXPECTED))
def test_auto_resolves_per_platform(platform):
  dtype, multiple = EXPECTED[platform]
  assert platforms.dtype('auto', platform) == dtype
  assert platforms.channel_multiple('auto', platform) == multiple
  # An explicit value means itself on every platform.
  assert platforms.dtype('float32', platform) == jnp.float32
  assert platforms.dtype('bfloat16', platform) == jnp.bfloat16
  assert platforms.channel_multiple(16, platform) == 16


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
def test_from_config_builds_the_platforms_network(platform):
  config = helpers.tiny_config()
  assert config.model.dtype == config.model.channel_multiple == 'auto'  # The default.
  model = models.from_config(config.model, 10, platform=platform)
  dtype, multiple = EXPECTED[platform]
  assert model.dtype == dtype and model.channel_multiple == multiple
  # Parameters keep their exact shapes and float32 whatever the platform.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))))
  exact = models.from_config({**config.model, 'dtype': 'float32', 'channel_multiple': 1}, 10)
  exact_shapes = jax.eval_shape(lambda: exact.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
      lambda a: (a.shape, jnp.float32), exact_shapes)


def test_on_this_cpu_auto_is_todays_float32_network():
  assert jax.default_backend() == 'cpu'
  assert platforms.current_platform() == 'cpu'
  model = models.from_config(helpers.tiny_config().model, 10)
  assert model.dtype == jnp.float32 and model.channel_multiple == 1


def test_resolved_auto_fields_names_only_the_auto_ones():
  model_config = {'dtype': 'auto', 'channel_multiple': 4, 'depth': 8}
  assert platforms.resolved_auto_fields(model_config, 'tpu') == {'dtype': 'bfloat16'}
  model_config = {'dtype': 'float32', 'channel_multiple': 'auto'}
  assert platforms.resolved_auto_fields(model_config, 'cuda') == {'channel_multiple': 8}


def test_an_unknown_dtype_is_refused_naming_the_choices():
  with pytest.raises(ValueError, match="'auto', 'bfloat16', 'float32'"):
    platforms.dtype('float16', 'cpu')
