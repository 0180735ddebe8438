"""What every network here shares around its own body: the features API and the classifier head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyramidnet_jax.models import layers


class ImageClassifier(nn.Module):
  """A base of PyramidNet and the PyConv networks: subclasses define the fields `num_classes`,
  `dropout_rate`, `dtype`, `param_dtype`, the property `num_features`, and a compact
  `__call__(x, train=False, return_features=False)` that ends in `self.classify`."""

  def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Backbone outputs: {'stem', 'stage1', ..., 'pooled'}; 'pooled' is (batch, num_features).

    Call it with `model.apply(variables, x, method='features')`.
    """
    return self(x, train, return_features=True)

  def classify(self, pooled: jax.Array, train: bool) -> jax.Array:
    """Dropout, then the fully connected classifier with PyTorch's nn.Linear init: float32 logits.

    Called from the subclass's compact __call__, so its layers are that network's `dropout`
    and `fc`. The classifier computes in float32 whatever the network's dtype: it is a tiny share
    of the work, its logits feed the float32 loss, and its parameters' gradients (sums over the
    batch) then stay float32.
    """
    pooled = nn.Dropout(self.dropout_rate, name='dropout')(pooled, deterministic=not train)
    init = layers.torch_linear_init(self.num_features)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                      kernel_init=init, bias_init=init, name='fc')(pooled.astype(jnp.float32))
    return logits.astype(jnp.float32)
