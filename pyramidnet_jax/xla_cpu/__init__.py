"""The XLA:CPU speed kit, switched on by one call: `enable(config)`.

Everything in this package was measured on CPUs and runs only where the CPU is JAX's only
platform (docs/benchmarks.md#levers): oneDNN convolutions through XLA FFI (onednn.py,
csrc/onednn_conv.cc) and the convolution choice (convolution.py), BatchNorm's textbook gradient,
rematerialisation that survives XLA:CPU's passes, the learning rate computed once, traces with
jnp inlined and the garbage collector paused, the persistent-cache entry loaded while the step
traces (a hook on a private JAX function), variables drawn on the host, and the process settings
(malloc, dispatch, XLA's scheduler flag). The command-line entry points call `enable` before JAX
starts; a library user on a CPU may call it too. `LEVERS` is the kit's column of the table in
pyramidnet_jax/levers.py.
"""

from __future__ import annotations

from absl import logging

from pyramidnet_jax import levers
from pyramidnet_jax.xla_cpu import batch_norm
from pyramidnet_jax.xla_cpu import convolution
from pyramidnet_jax.xla_cpu import host_init
from pyramidnet_jax.xla_cpu import process
from pyramidnet_jax.xla_cpu import remat
from pyramidnet_jax.xla_cpu import schedule
from pyramidnet_jax.xla_cpu import tracing

LEVERS = levers.Levers(
    name='xla_cpu',
    conv2d=convolution.conv2d,
    conv_general_dilated=convolution.conv_general_dilated,
    batch_norm_gradient=batch_norm.textbook_gradient,
    remat=remat.rematerialised,
    remat_call=remat.rematerialised_call,
    learning_rate=schedule.computed_once,
    optimizer_trace=tracing.inlined_jnp,
    tracing=tracing.python_gc_paused,
    compiled=tracing.FastStartJit,
    init_variables=host_init.init_variables,
)


def enable(config=None) -> bool:
  """Switches the kit on when the CPU is JAX's only platform; True if it did.

  Reads a training config's xla_cpu_concurrency_scheduler and cpu_keep_freed_memory (process
  settings: call this before the first JAX computation) and cpu_conv (which convolutions).
  Without a config (evaluation, prediction), the levers and oneDNN's convolutions where they
  can be built, and no process settings. Where an accelerator is present nothing changes and the
  plain levers stay.
  """
  if not process.jax_runs_on_cpu_only():
    logging.info('An accelerator platform is present: the XLA:CPU kit stays off.')
    return False
  if config is not None:
    process.configure(config)
  convolution.set_backend('auto' if config is None else config.cpu_conv)
  levers.use(LEVERS)
  return True


def disable() -> None:
  """Back to the plain levers (the process settings stay)."""
  levers.use(levers.PLAIN)
