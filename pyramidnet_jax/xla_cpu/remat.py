"""Rematerialisation that holds on XLA:CPU: save a block's inputs, recompute the rest backward.

jax.checkpoint (nn.remat) keeps the recomputation apart from the forward pass with optimization
barriers, but XLA:CPU removes barriers before fusion and scheduling; common-subexpression
elimination then merges the recomputation back into the forward pass, and the forward
activations stay alive (docs/benchmarks.md#levers). Data dependencies survive
every pass: the recomputation reads its input as x + 0 * (an element of the block's output
cotangent), so it can neither merge with the forward pass nor run before the backward pass
reaches the block; and the input gradient carries + 0 * (the weight gradients' first elements),
so the block's weight gradients, and with them its recomputed activations, are done before the
previous block's backward starts. Adding zero is exact for finite values; a non-finite gradient
turns these into NaN, which the NaN check at log time reports.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax


def _first_element(array: jax.Array) -> jax.Array:
  return array.reshape(-1)[0]


def _recompute_vjp(body: Callable, saved: tuple, cotangent):
  """Cotangents of body's arguments, recomputing body from `saved` = (*others, x)."""
  *others, x = saved
  x = x + 0 * _first_element(jax.tree.leaves(cotangent)[0]).astype(x.dtype)
  *d_others, dx = jax.vjp(body, *others, x)[1](cotangent)
  weight_grads = sum(_first_element(g) for g in jax.tree.leaves(d_others[0]))
  return (*d_others, dx + 0 * weight_grads.astype(dx.dtype))


def rematerialised(body: Callable) -> Callable:
  """`body(params, stats, x)` that saves only its arguments and recomputes the rest backward."""

  @jax.custom_vjp
  def rematerialised_body(params, stats, x):
    return body(params, stats, x)

  def forward(params, stats, x):
    return body(params, stats, x), (params, stats, x)

  rematerialised_body.defvjp(forward, functools.partial(_recompute_vjp, body))
  return rematerialised_body


def rematerialised_call(module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
  """`module(x, train)` for a Linen block, rematerialised as above.

  The backward pass has no scope, so it recomputes the block by applying an unbound copy of it to
  the saved variables. Batch statistics update as in `module(x, train)`.
  """
  definition = module.clone(parent=None)

  def call(block, x):
    return block(x, train)

  def forward(block, x):
    variables = block.variables  # Before the call mutates batch_stats; train mode ignores them.
    return block(x, train), (variables['params'], variables.get('batch_stats', {}), x)

  def body(params, stats, x):
    y, _ = definition.apply({'params': params, 'batch_stats': stats}, x, train,
                            mutable=['batch_stats'])
    return y

  def backward(saved, cotangent):
    dparams, _, dx = _recompute_vjp(body, saved, cotangent)
    return {'params': dparams}, dx

  return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(module, x)
