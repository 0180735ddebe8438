"""`load`, `evaluate` and `predict` on a real (tiny) training run on Fashion-MNIST images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from pyramidnet_jax import data
from pyramidnet_jax import load
from pyramidnet_jax.evaluation import classifier
from pyramidnet_jax.evaluation import evaluator
from pyramidnet_jax.interop import loading
from pyramidnet_jax.training import loop
from pyramidnet_jax.training import step
from tests import helpers
from tests.helpers import needs_fashion

pytestmark = needs_fashion

NUM_TEST = 40


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """One epoch of PyramidNet-8 on 96 real images, with a validation split (so best/ exists),
  writing its report; then the same workdir evaluated as `python -m pyramidnet_jax.evaluate`
  does, into another directory."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = helpers.tiny_config(validation_fraction=0.25, eval_batch_size=16, write_report=True)
  with pytest.MonkeyPatch.context() as monkeypatch:
    helpers.serve_subset(monkeypatch, 96, NUM_TEST)
    passes = []
    real_split_logits = evaluator.split_logits
    monkeypatch.setattr(evaluator, 'split_logits',
                        lambda *args: passes.append(args[2]) or real_split_logits(*args))
    loop.train_and_evaluate(config, workdir)
    assert len(passes) == 1  # The report is written from the test pass's own logits.
    # evaluate reads the data again; it must see the same subset.
    result = evaluator.evaluate_workdir(workdir, out_dir=os.path.join(workdir, 'evaluated'))
  return workdir, result


def test_load_gives_the_best_checkpoint(workdir):
  workdir, _ = workdir
  model, variables = load(workdir)
  step, state, _ = helpers.read_checkpoint(workdir, 'best')
  helpers.assert_trees_equal(variables, {'params': state['params'],
                                         'batch_stats': state['batch_stats']})
  assert model.depth == 8 and model.num_classes == 10
  assert loading.load_info(workdir).step == step
  latest_step, latest, _ = helpers.read_checkpoint(workdir, 'checkpoints')
  _, latest_variables = load(workdir, which='latest')
  helpers.assert_trees_equal(latest_variables['params'], latest['params'])
  assert loading.load_info(workdir, 'latest').step == latest_step


def test_load_refuses_a_directory_without_a_model(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither a training workdir'):
    load(str(tmp_path))


def test_evaluation_report_agrees_with_the_training_results(workdir):
  workdir, result = workdir
  results = helpers.read_results(workdir)
  assert result['count'] == NUM_TEST
  assert result['top1'] == results['test_accuracy']
  assert result['top5'] == results['test_top5_accuracy']
  assert result['loss'] == results['test_loss']
  matrix = np.asarray(result['confusion_matrix'])
  assert matrix.sum() == NUM_TEST
  assert np.trace(matrix) == round(result['top1'] * NUM_TEST)
  labels = helpers.fashion_subset(96, NUM_TEST).test.labels
  assert [c['support'] for c in result['per_class']] == np.bincount(labels, minlength=10).tolist()
  trained, evaluated = (os.path.join(workdir, evaluator.REPORT_DIR),
                        os.path.join(workdir, 'evaluated'))
  for report_dir in (trained, evaluated):
    for name in ('report.json', 'report.md', 'confusion_matrix.png', 'training_curves.png'):
      assert os.path.getsize(os.path.join(report_dir, name)) > 0, name
    assert 'Ankle boot' in open(os.path.join(report_dir, 'report.md')).read()
  with open(os.path.join(trained, 'report.json')) as f:
    from_training = json.load(f)
  with open(os.path.join(evaluated, 'report.json')) as f:
    from_evaluate = json.load(f)
  assert from_evaluate['step'] == result['step'] and from_evaluate['split'] == 'test'
  # The training run's report and evaluate's are the same report of the same checkpoint.
  assert from_training == from_evaluate


def write_test_images(directory, count: int):
  subset = helpers.fashion_subset(96, NUM_TEST)
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i in range(count):
    path = os.path.join(directory, f'{i:02d}.png')
    Image.fromarray(subset.test.images[i, :, :, 0]).save(path)
    paths.append(path)
  return subset, paths


def network_input(images, preprocessing):
  """Eval batch images (uint8) as the steps normalise them on the device."""
  return np.asarray(step.device_images(images, step.Normalization.of(preprocessing)))


def test_predict_matches_the_model_on_the_dataset_pipeline(workdir, tmp_path):
  workdir, _ = workdir
  subset, paths = write_test_images(str(tmp_path / 'images'), 5)
  loaded = loading.load_info(workdir)
  results, errors = classifier.predict(loaded, [str(tmp_path / 'images')], top_k=3, batch_size=4)
  assert not errors
  assert [r['path'] for r in results] == paths
  dataset = helpers.fashion_subset(96, NUM_TEST)
  images = network_input(next(dataset.test.eval_batches(5))['image'], dataset.preprocessing)
  expected = np.asarray(jax.nn.softmax(loaded.model.apply(loaded.variables, images)))
  for result, p in zip(results, expected):
    order = np.argsort(-p, kind='stable')[:3]
    assert [name for name, _ in result['top']] == [dataset.class_names[i] for i in order]
    np.testing.assert_allclose([q for _, q in result['top']], p[order], rtol=1e-5, atol=1e-6)


def test_predict_names_bad_files_and_classifies_the_rest(workdir, tmp_path):
  workdir, _ = workdir
  _, paths = write_test_images(str(tmp_path / 'images'), 2)
  (tmp_path / 'images' / 'notes.png').write_text('not an image')
  whole = (tmp_path / 'images' / '00.png').read_bytes()
  (tmp_path / 'images' / 'cut.png').write_bytes(whole[:len(whole) // 2])
  command = [sys.executable, '-m', 'pyramidnet_jax.predict', f'--workdir={workdir}', '--top_k=2',
             str(tmp_path / 'images'), str(tmp_path / 'missing.jpg')]
  done = subprocess.run(command, capture_output=True, text=True, cwd=helpers.ROOT,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert done.returncode == 1
  lines = done.stdout.strip().splitlines()
  assert [line.split(':')[0] for line in lines] == paths
  assert all(len(line.split(', ')) == 2 for line in lines)
  errors = [line for line in done.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 3, done.stderr
  assert any('notes.png' in e for e in errors)
  assert any('cut.png' in e for e in errors)
  assert any('missing.jpg: no such file' in e for e in errors)


def test_predict_feeds_the_network_the_pixels_evaluation_feeds_it(workdir, tmp_path):
  workdir, _ = workdir
  subset, paths = write_test_images(str(tmp_path / 'images'), 3)
  transform, channels = classifier.transform_of(loading.load_info(workdir))
  fed_by_evaluation = network_input(next(subset.test.eval_batches(3))['image'],
                                    subset.preprocessing)
  for path, expected in zip(paths, fed_by_evaluation):
    np.testing.assert_array_equal(transform(data.read_image(path, channels)), expected)
