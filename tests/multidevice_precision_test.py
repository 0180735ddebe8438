"""On 8 fake CPU devices: the bfloat16 step's gradient all-reduce is float32, and BatchNorm groups
of one device's share are per-device statistics.

Like tests/multidevice_test.py, the checks run in a fresh Python process with 8 fake CPU devices
(this file, run as a script), which writes what it saw to a JSON file the tests read.

Where the all-reduce is read: XLA's SPMD partitioner places the gradient all-reduces, in the dtype
of the values it sums, and XLA:CPU then promotes every bfloat16 all-reduce to float32 (its
all-reduce-promotion pass; XLA:GPU's promotes only 16-bit integers). So the program is read right
after partitioning (an XLA dump of that pass), the types a GPU compile goes on with.
"""

import glob
import json
import os
import re
import subprocess
import sys

if __name__ == '__main__':  # The worker: make the repository importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from tests import helpers

NUM_DEVICES = 8
BATCH = 16  # 2 examples per device.
# The element types of an HLO all-reduce's result: `%x = (f32[3]{0}, bf16[2]{0}) all-reduce(`.
ALL_REDUCE = re.compile(r'=\s*(\(.*?\)|\S+)\s+all-reduce(?:-start)?\(')


def all_reduce_types(hlo_text: str) -> list[list[str]]:
  """Per all-reduce of an HLO module's text, the element types of what it sums."""
  return [re.findall(r'([a-z]+[0-9]+)\[', match) for match in ALL_REDUCE.findall(hlo_text)]


def _partitioned_train_step(config, dump_dir: str, seen: set[str]) -> str:
  """Compiles the training step over 8 devices (config.model built as for a GPU); returns its HLO
  right after SPMD partitioning, from the dump."""
  import jax  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import models  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  model = models.from_config(config.model, 10, platform='cuda')
  lr_fn = optimizer.create_learning_rate_fn(config, 10, 100)
  tx = optimizer.create_optimizer(config, lr_fn)
  runtime = runtime_lib.create_runtime(config, lr_fn)
  state = jax.eval_shape(lambda: runtime_lib.step.TrainState.create(
      apply_fn=model.apply, tx=tx, **model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)))))
  batch = {'image': jax.ShapeDtypeStruct((BATCH, 28, 28, 1), np.float32),
           'label': jax.ShapeDtypeStruct((BATCH,), np.int32)}
  runtime.train_step.lower(state, batch).compile()
  files = set(glob.glob(os.path.join(dump_dir, '*train_step*after_spmd-partitioning*.txt')))
  (new,) = files - seen
  seen.add(new)
  with open(new) as f:
    return f.read()


def _per_device_statistics(config) -> dict[str, float]:
  """One training forward and gradient with groups of one device's share, sharded over the 8
  devices, against the whole-batch network run device by device on each share."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import models  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import step  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images = (2.0 + rng.normal(size=(BATCH, 28, 28, 1))).astype(np.float32)
  labels = rng.integers(0, 10, BATCH).astype(np.int32)

  def run(model, images, labels, variables):
    def loss_fn(params):
      logits, updates = model.apply({**variables, 'params': params}, images, train=True,
                                    mutable=['batch_stats'])
      return step.cross_entropy_loss(logits, labels, 10).mean(), (logits, updates)
    (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables['params'])
    return logits, updates['batch_stats'], grads

  share = BATCH // NUM_DEVICES
  grouped = models.from_config({**config.model, 'bn_group_size': share}, 10)
  whole = models.from_config({**config.model, 'bn_group_size': 0}, 10)
  variables = whole.init(jax.random.key(0), images[:1])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  data = NamedSharding(mesh, PartitionSpec('data'))
  replicated = NamedSharding(mesh, PartitionSpec())

  def sharded(model):
    return helpers.jit(lambda v, x, y: run(model, x, y, v),
                       in_shardings=(replicated, data, data)).lower(variables, images,
                                                                    labels).compile()

  grouped_step, whole_step = sharded(grouped), sharded(whole)
  got = grouped_step(variables, images, labels)
  whole_batch = whole_step(variables, images, labels)
  on_one_device = helpers.jit(lambda v, x, y: run(whole, x, y, v))
  parts = [on_one_device(variables, images[d * share:(d + 1) * share],
                         labels[d * share:(d + 1) * share]) for d in range(NUM_DEVICES)]
  want = (jnp.concatenate([p[0] for p in parts]),
          jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *[p[1] for p in parts]),
          jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *[p[2] for p in parts]))

  def difference(a, b):
    a, b = jax.device_get((a, b))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                             jax.tree.leaves(b)))

  return {'max_difference': difference(got, want),
          'whole_batch_difference': difference(whole_batch[1], want[1]),
          'all_reduces': len(all_reduce_types(grouped_step.as_text())),
          'whole_batch_all_reduces': len(all_reduce_types(whole_step.as_text()))}


def worker(out_path: str, dump_dir: str) -> None:
  import chex  # pylint: disable=g-import-not-at-top
  chex.set_n_cpu_devices(NUM_DEVICES)  # Before JAX's CPU backend starts.
  import jax  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import levers  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.models import layers  # pylint: disable=g-import-not-at-top
  assert len(jax.devices()) == NUM_DEVICES

  config = helpers.tiny_config(batch_size=BATCH)
  out, seen = {}, set()
  out['ours'] = all_reduce_types(_partitioned_train_step(config, dump_dir, seen))
  # The counterpart: the kernel merely cast to bfloat16 (its gradient then bfloat16).
  ours = layers.conv2d
  layers.conv2d = lambda x, k, stride, padding, groups=1: levers.current().conv2d(
      x, k.astype(x.dtype), stride, padding, groups)
  try:
    out['cast'] = all_reduce_types(_partitioned_train_step(config, dump_dir, seen))
  finally:
    layers.conv2d = ours
  out['groups'] = _per_device_statistics(config)
  with open(out_path, 'w') as f:
    json.dump(out, f)


def _run_worker(tmp_path) -> dict:
  out_path, dump_dir = str(tmp_path / 'out.json'), str(tmp_path / 'dump')
  flags = f'--xla_dump_to={dump_dir} --xla_dump_hlo_pass_re=spmd-partitioning'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {flags}'.strip())
  process = subprocess.run([sys.executable, os.path.abspath(__file__), out_path, dump_dir],
                           cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=540)
  assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
  with open(out_path) as f:
    return json.load(f)


def test_gradient_all_reduce_is_float32_and_groups_are_per_device_statistics(tmp_path):
  out = _run_worker(tmp_path)

  # The bfloat16 step (the network as 'auto' builds it for a GPU) sums its gradients in float32;
  # merely casting the kernel would all-reduce the kernels' gradients in bfloat16.
  assert out['ours'] and all(types == ['f32'] * len(types) for types in out['ours'])
  assert any('bf16' in types for types in out['cast'])

  groups = out['groups']
  # Groups of one device's share: the logits, running averages and gradients of the network
  # run device by device, each on its share with whole-batch statistics...
  assert groups['max_difference'] < 1e-5
  # ... which differ from the global batch's.
  assert groups['whole_batch_difference'] > 1e-3
  # And the statistics need no communication: where the global batch's statistics all-reduce at
  # each BatchNorm, forward and backward, groups leave the gradients' and running averages'
  # (which XLA combines).
  assert groups['all_reduces'] <= 2 < 10 <= groups['whole_batch_all_reduces']


if __name__ == '__main__':
  worker(sys.argv[1], sys.argv[2])
