"""predict with a file over the pixel limit (a decompression bomb: a tiny PNG whose header claims
20000x20000) beside a good image: the bomb is one `error:` line, the good image is classified."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from pyramidnet_jax.evaluation import classifier
from pyramidnet_jax.interop import loading
from pyramidnet_jax.training import loop
from tests import helpers
from tests.helpers import needs_fashion

pytestmark = needs_fashion


def forged_png(path, width, height):
  """A 1x1 grey PNG whose header claims width x height: a decompression bomb's header."""
  def chunk(kind, body):
    return (struct.pack('>I', len(body)) + kind + body +
            struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))
  header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
            chunk(b'IDAT', zlib.compress(b'\x00\x80')) + chunk(b'IEND', b''))


def write_images(folder):
  """(good image, bomb) in folder."""
  os.makedirs(folder)
  good = os.path.join(folder, 'good.png')
  Image.fromarray(helpers.fashion_subset(16, 8).test.images[0, :, :, 0]).save(good)
  bomb = os.path.join(folder, 'bomb.png')
  forged_png(bomb, 20000, 20000)
  return good, bomb


def test_a_bomb_is_one_error_line_and_the_good_image_is_classified(tmp_path):
  # One test for the one tiny training run (xdist would run a module fixture once per worker).
  workdir = str(tmp_path / 'run')
  with pytest.MonkeyPatch.context() as monkeypatch:
    helpers.serve_subset(monkeypatch, 16, 8)
    loop.train_and_evaluate(helpers.tiny_config(), workdir)
  good, bomb = write_images(str(tmp_path / 'images'))
  command = [sys.executable, '-m', 'pyramidnet_jax.predict', f'--workdir={workdir}', '--top_k=2',
             '--compilation_cache_dir=', bomb, good]
  done = subprocess.run(command, capture_output=True, text=True, cwd=helpers.ROOT,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert done.returncode == 1, done.stderr
  (line,) = done.stdout.strip().splitlines()
  assert line.startswith(f'{good}: ') and len(line.split(', ')) == 2, line
  names = helpers.fashion_subset(16, 8).class_names
  assert any(line.startswith(f'{good}: {name} ') for name in names), line
  errors = done.stderr.strip().splitlines()
  assert len(errors) == 1, done.stderr  # No traceback, no warning: one line.
  assert errors[0].startswith(f'error: {bomb}: ') and 'limit of 178,956,970 pixels' in errors[0]

  # The limit is the caller's: here it refuses the 28x28 image too.
  loaded = loading.load_info(workdir)
  results, errors = classifier.predict(loaded, [good, bomb], top_k=1, max_image_pixels=28 * 28)
  assert [r['path'] for r in results] == [good] and len(errors) == 1 and bomb in errors[0]
  results, errors = classifier.predict(loaded, [good, bomb], top_k=1,
                                       max_image_pixels=28 * 28 - 1)
  assert not results and len(errors) == 2
  assert '28x28 is 784 pixels, over the limit of 783 pixels' in errors[0]
