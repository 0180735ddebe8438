"""The package's shape: light imports, rooms of modest size, the CPU kit behind its boundary."""

import glob
import os
import subprocess
import sys

import pytest

from tests import helpers

HEAVY = ('optax', 'orbax', 'tensorflow', 'tensorflow_datasets', 'torch', 'sklearn', 'matplotlib',
         'PIL')


def imported_after(statement: str) -> list[str]:
  code = (f'import sys; {statement}; '
          f'print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))')
  out = subprocess.run([sys.executable, '-c', code], cwd=helpers.ROOT, capture_output=True,
                       text=True, check=True).stdout
  return eval(out.strip().splitlines()[-1])  # pylint: disable=eval-used


@pytest.mark.parametrize('statement', [
    'import pyramidnet_jax',
    'import pyramidnet_jax.models',
    # Building a network from a config does not import the training code.
    'from pyramidnet_jax import models; models.from_config({"name": "pyramidnet", "depth": 8, '
    '"alpha": 8.0, "bottleneck": False, "widening": "additive", "stem": "cifar", '
    '"rounding": "half_up", "dropout_rate": 0.0, "remat": False, "channel_multiple": 1, '
    '"dtype": "float32"}, 10).num_features',
])
def test_the_models_import_jax_and_flax_only(statement):
  assert imported_after(statement) == []


def test_a_fresh_process_runs_the_plain_levers():
  code = ('import pyramidnet_jax, pyramidnet_jax.models; from pyramidnet_jax import levers; '
          'print(levers.current().name)')
  out = subprocess.run([sys.executable, '-c', code], cwd=helpers.ROOT, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == 'plain'


def test_only_the_cpu_kit_touches_private_jax():
  package = os.path.join(helpers.ROOT, 'pyramidnet_jax')
  users = sorted(os.path.relpath(path, package)
                 for path in glob.glob(os.path.join(package, '**', '*.py'), recursive=True)
                 if 'jax._src' in open(path).read())
  assert users and all(path.startswith('xla_cpu' + os.sep) for path in users), users


def test_no_module_is_much_over_400_lines():
  package = os.path.join(helpers.ROOT, 'pyramidnet_jax')
  sizes = {os.path.relpath(path, package): sum(1 for _ in open(path))
           for path in glob.glob(os.path.join(package, '**', '*.py'), recursive=True)}
  assert {path: n for path, n in sizes.items() if n > 450} == {}
