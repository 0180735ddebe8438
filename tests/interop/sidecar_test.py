"""Weights exported to a .pth file and imported back keep what the tensors cannot say: the
dataset (predict's transform), the class names and the crop size travel in the sidecar
`x.pth.json`, and the .pth stays a bare state_dict. Without a sidecar or --dataset, predict
refuses a small-image network instead of guessing its data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip('torch')

from pyramidnet_jax.evaluation import classifier  # noqa: E402
from pyramidnet_jax.interop import loading  # noqa: E402
from pyramidnet_jax.interop import torch_reference as ref  # noqa: E402
from pyramidnet_jax.interop import torch_weights  # noqa: E402
from pyramidnet_jax.training import loop  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import needs_fashion  # noqa: E402

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def run(module, *args):
  return subprocess.run([sys.executable, '-m', f'pyramidnet_jax.{module}', *args],
                        capture_output=True, text=True, cwd=helpers.ROOT, env=ENV, timeout=180)


def top(results):
  return [[name for name, _ in r['top']] for r in results], [[p for _, p in r['top']]
                                                             for r in results]


@needs_fashion
def test_workdir_to_pth_and_back_keeps_dataset_and_class_names(tmp_path):
  # One test for the one tiny training run (xdist would run a module fixture once per worker).
  workdir = str(tmp_path / 'run')
  with pytest.MonkeyPatch.context() as monkeypatch:
    subset = helpers.serve_subset(monkeypatch, 16, 8)
    loop.train_and_evaluate(helpers.tiny_config(), workdir)
  images = []
  for i in range(3):
    images.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(subset.test.images[i, :, :, 0]).save(images[-1])
  on_workdir = classifier.predict(loading.load_info(workdir), images, top_k=3)
  assert not on_workdir[1]

  pth = str(tmp_path / 'x.pth')
  done = run('convert', f'--checkpoint={workdir}', f'--out={pth}')
  assert done.returncode == 0, done.stderr
  # The .pth is a bare state_dict: the authors' network (with a grey stem) loads it strictly.
  state_dict = torch.load(pth, weights_only=True)
  net = ref.PyramidNet(depth=8, alpha=8, num_classes=10)
  net.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1, bias=False)
  net.load_state_dict(state_dict, strict=True)
  with open(pth + '.json') as f:
    sidecar = json.load(f)
  assert sidecar['dataset'] == 'fashion_mnist' and sidecar['num_classes'] == 10
  assert sidecar['class_names'] == list(subset.class_names)
  assert sidecar['model']['depth'] == 8 and sidecar['model']['alpha'] == 8.0

  converted = str(tmp_path / 'converted')
  torch_weights.convert_torch_file(pth, converted)
  loaded = loading.load_info(converted)
  assert loaded.dataset == 'fashion_mnist' and loaded.class_names == subset.class_names
  on_converted = classifier.predict(loaded, images, top_k=3)
  assert top(on_converted[0])[0] == top(on_workdir[0])[0]
  np.testing.assert_allclose(top(on_converted[0])[1], top(on_workdir[0])[1], rtol=1e-5)

  # Explicit class names win over the sidecar's; the dataset still comes from it.
  names_file = tmp_path / 'names.txt'
  names_file.write_text('\n'.join(f'k{i}' for i in range(10)))
  renamed = str(tmp_path / 'renamed')
  torch_weights.convert_torch_file(pth, renamed, class_names_file=str(names_file))
  loaded = loading.load_info(renamed)
  assert loaded.dataset == 'fashion_mnist' and loaded.class_names[0] == 'k0'

  # Without its sidecar, the small-image network records no dataset: predict asks for one.
  os.makedirs(tmp_path / 'bare')
  bare_pth = str(tmp_path / 'bare' / 'x.pth')
  shutil.copy(pth, bare_pth)
  bare = str(tmp_path / 'bare_converted')
  torch_weights.convert_torch_file(bare_pth, bare)
  assert loading.load_info(bare).dataset is None
  done = run('predict', f'--workdir={bare}', '--compilation_cache_dir=', images[0])
  assert done.returncode != 0 and not done.stdout
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith('error: ') and 'records no dataset' in line and '--dataset' in line
  loaded = loading.load_info(bare)
  loaded.dataset = 'fashion_mnist'  # What predict --dataset=fashion_mnist does.
  np.testing.assert_allclose(top(classifier.predict(loaded, images, top_k=3)[0])[1],
                             top(on_workdir[0])[1], rtol=1e-5)


def save_reference(path, alpha=6, num_classes=4):
  net = ref.PyramidNet(depth=8, alpha=alpha, num_classes=num_classes)
  torch.save(net.state_dict(), path)


@pytest.mark.parametrize('sidecar, message', [
    ('{"model": {"depth": 8', 'cannot be read'),
    ('[1, 2]', 'not the description convert writes'),
    (json.dumps({'model': {'depth': 8, 'alpha': 6}, 'num_classes': 10}), 'belongs to another'),
    (json.dumps({'model': {'depth': 8, 'alpha': 20}, 'num_classes': 4}), 'belongs to another'),
    (json.dumps({'model': {'depth': 8, 'alpha': 6}, 'num_classes': 4, 'class_names': ['a']}),
     'does not name 4 classes'),
])
def test_a_sidecar_that_does_not_describe_its_file_is_refused(tmp_path, sidecar, message):
  path = str(tmp_path / 'net.pth')
  save_reference(path)
  with open(path + '.json', 'w') as f:
    f.write(sidecar)
  with pytest.raises(ValueError, match=message) as error:
    torch_weights.convert_torch_file(path, str(tmp_path / 'out'))
  assert path + '.json' in str(error.value)
  assert not os.path.exists(tmp_path / 'out' / loading.MODEL_FILE)


def test_an_imagenet_stem_network_without_a_dataset_gets_imagenets_transform():
  # What load_info gives for such a converted network; transform_of reads only these fields.
  loaded = loading.Loaded(
      model=None, variables={'params': {'conv1': {'kernel': np.zeros((7, 7, 3, 64))}}},
      model_config={**loading.MODEL_DEFAULTS, 'stem': 'imagenet'}, num_classes=3, dataset=None,
      class_names=None, step=None, config=None, path='converted')
  transform, channels = classifier.transform_of(loaded)
  assert channels == 3
  assert transform(np.zeros((300, 400, 3), np.uint8)).shape == (224, 224, 3)


def test_exporting_never_overwrites_a_sidecar(tmp_path):
  directory = str(tmp_path / 'model')
  path = str(tmp_path / 'net.pth')
  save_reference(path)
  torch_weights.convert_torch_file(path, directory)
  out = str(tmp_path / 'back.pth')
  with open(out + '.json', 'w') as f:
    f.write('mine')
  with pytest.raises(FileExistsError, match='back.pth.json exists'):
    torch_weights.convert_to_torch_file(directory, out)
  assert not os.path.exists(out) and open(out + '.json').read() == 'mine'
