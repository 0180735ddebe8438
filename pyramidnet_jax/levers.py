"""The primitives a platform may replace, in one place: each slot's plain form and who fills it.

The networks and the training step call these slots where a platform-specific speed lever could
stand in for a JAX or Flax primitive. Every platform runs the plain forms, and so does any program
that imports the package as a library:

| slot                 | plain (GPU, TPU, library use)      | XLA:CPU kit (xla_cpu/)            |
|----------------------|------------------------------------|-----------------------------------|
| conv2d               | lax.conv_general_dilated           | oneDNN through XLA FFI, or XLA's  |
|                      |                                    | with a matmul weight gradient     |
| conv_general_dilated | lax.conv_general_dilated (nn.Conv) | grouped: oneDNN, or a dense conv  |
|                      |                                    | with a block-diagonal kernel      |
| batch_norm_gradient  | autodiff of nn.BatchNorm's formula | the textbook gradient             |
| remat, remat_call    | jax.checkpoint, nn.checkpoint      | inputs saved, recomputation       |
|                      |                                    | pinned by data dependences        |
| learning_rate        | the optax schedule                 | computed once, under lax.cond     |
| optimizer_trace      | traced as written                  | jnp's operators inlined           |
| tracing              | as is                              | Python's cyclic GC paused         |
| compiled             | the jitted function                | + its persistent-cache entry      |
|                      |                                    | loaded while it traces            |
| init_variables       | jitted model.init                  | drawn on the host with numpy      |

The command-line entry points switch to the kit (`xla_cpu.enable`) only when the CPU is JAX's
only platform, so no GPU or TPU runs a lever that was never measured there, and nothing private
of JAX is touched off the CPU. Measured effects: docs/benchmarks.md#levers.

Switch the levers before tracing: jax.jit caches traces on the Python function, so a function
traced under one set keeps that trace; jit a fresh functools.partial of it after a switch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax

Padding = tuple[tuple[int, int], tuple[int, int]]
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def lax_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
               groups: int = 1) -> jax.Array:
  """NHWC x HWIO convolution with explicit padding and feature groups: XLA's own."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=DIMENSION_NUMBERS,
                                      feature_group_count=groups)


def checkpointed_call(module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
  """`module(x, train)` for a Linen block, recomputed in the backward pass (nn.checkpoint)."""
  return nn.checkpoint(lambda block, x: block(x, train))(module, x)


def jitted_init(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
  """model.init on a zero batch of one image, compiled."""
  x = jax.numpy.zeros((1, *input_shape[-3:]), jax.numpy.float32)
  return jax.jit(lambda key, x: model.init(key, x, train=False))(key, x)


def _unchanged(function: Callable[..., Any], *unused: Any) -> Callable[..., Any]:
  return function


@dataclasses.dataclass(frozen=True)
class Levers:
  """One implementation per slot; see the module docstring for the two sets."""
  name: str
  # (x, kernel, stride, padding, groups=1) -> y: the networks' bias-free convolutions.
  conv2d: Callable[..., jax.Array] = lax_conv2d
  # lax.conv_general_dilated's signature: the hook of PyConv's grouped nn.Conv levels.
  conv_general_dilated: Callable[..., jax.Array] = jax.lax.conv_general_dilated
  # BatchNorm's training forward (x32, scale, bias, epsilon) -> (y, mean, var) -> the same
  # function with the gradient this platform computes.
  batch_norm_gradient: Callable[[Callable], Callable] = _unchanged
  # body(params, stats, x) -> the same, recomputed in the backward pass (PyramidNet's blocks).
  remat: Callable[[Callable], Callable] = jax.checkpoint
  # (Linen block, x, train) -> block(x, train), recomputed in the backward pass (PyConv's blocks).
  remat_call: Callable[[nn.Module, jax.Array, bool], jax.Array] = checkpointed_call
  # optax schedule -> the schedule the optimiser traces.
  learning_rate: Callable[[Callable], Callable] = _unchanged
  # Context of the optimiser update's trace.
  optimizer_trace: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
  # Context of every trace of a compiled step or of the train state's creation.
  tracing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
  # (jitted function, name, context) -> what the training loop calls.
  compiled: Callable[..., Callable] = _unchanged
  # (model, key, input_shape) -> the initial {'params', 'batch_stats'}.
  init_variables: Callable[..., dict[str, Any]] = jitted_init


PLAIN = Levers(name='plain')
_current = PLAIN


def current() -> Levers:
  """The levers traces use now: PLAIN unless a platform kit was switched on."""
  return _current


def use(levers: Levers) -> None:
  """Switches the levers for the whole process (the CLIs, through xla_cpu.enable)."""
  global _current
  _current = levers


@contextlib.contextmanager
def using(levers: Levers) -> Iterator[Levers]:
  """The levers inside the block, the previous ones after (tests, comparisons)."""
  previous = current()
  use(levers)
  try:
    yield levers
  finally:
    use(previous)
