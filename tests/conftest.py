"""Shared pytest setup.

The repository root goes on sys.path, so the tests import the package and configs/ from the
checkout. The tests run with the XLA:CPU kit's levers, as the command lines run on this CPU-only
machine; a test of the plain forms (GPU, TPU, library use) switches with `levers.using(PLAIN)`.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True, scope='session')
def _xla_cpu_levers():
  from pyramidnet_jax import levers  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  with levers.using(xla_cpu.LEVERS):
    yield
