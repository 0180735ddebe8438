"""Tests for pyramidnet_jax.report: numbers checked against hand arithmetic, files checked as images.

The prediction set (4 classes, 8 examples; 'bird' never occurs and is never predicted):
  labels      0 0 0 0 1 1 2 2
  predictions 0 0 0 1 1 1 2 0
Confusion (rows true): cat [3 1 0 0], dog [0 2 0 0], fox [1 0 1 0], bird [0 0 0 0].
Precision = column diagonal / column sum: cat 3/4, dog 2/3, fox 1/1, bird 0 (no predictions).
Recall = row diagonal / row sum: cat 3/4, dog 2/2, fox 1/2, bird 0 (no examples).
F1 = 2PR/(P+R): cat 3/4, dog (4/3)/(5/3) = 4/5, fox 1/(3/2) = 2/3, bird 0.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pyramidnet_jax.evaluation import report
from tests import helpers

ROOT = helpers.ROOT
NAMES = ['cat', 'dog', 'fox', 'bird']
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2])
PREDICTIONS = np.array([0, 0, 0, 1, 1, 1, 2, 0])


def _logits():
  logits = np.zeros((8, 4), np.float32)
  logits[np.arange(8), PREDICTIONS] = 2.0
  return logits


@pytest.fixture(scope='module')
def metrics():
  return report.classification_metrics(_logits(), LABELS, NAMES)


def test_confusion_matrix(metrics):
  assert metrics['confusion_matrix'] == [[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
  assert metrics['class_names'] == NAMES
  assert metrics['count'] == 8


def test_per_class_figures(metrics):
  expected = {'cat': (3 / 4, 3 / 4, 3 / 4, 4), 'dog': (2 / 3, 1.0, 4 / 5, 2),
              'fox': (1.0, 1 / 2, 2 / 3, 2), 'bird': (0.0, 0.0, 0.0, 0)}
  assert [row['name'] for row in metrics['per_class']] == NAMES
  for row in metrics['per_class']:
    precision, recall, f1, support = expected[row['name']]
    assert row['precision'] == pytest.approx(precision)
    assert row['recall'] == pytest.approx(recall)
    assert row['f1'] == pytest.approx(f1)
    assert row['support'] == support


def test_averages(metrics):
  # Macro: plain mean over all 4 classes, bird's zeros included.
  assert metrics['macro']['precision'] == pytest.approx((3 / 4 + 2 / 3 + 1 + 0) / 4)
  assert metrics['macro']['recall'] == pytest.approx((3 / 4 + 1 + 1 / 2 + 0) / 4)
  assert metrics['macro']['f1'] == pytest.approx((3 / 4 + 4 / 5 + 2 / 3 + 0) / 4)
  # Weighted by support 4, 2, 2, 0 out of 8.
  assert metrics['weighted']['precision'] == pytest.approx((4 * 3 / 4 + 2 * 2 / 3 + 2 * 1) / 8)
  assert metrics['weighted']['recall'] == pytest.approx(6 / 8)
  assert metrics['weighted']['f1'] == pytest.approx((4 * 3 / 4 + 2 * 4 / 5 + 2 * 2 / 3) / 8)


def test_top1_and_top_k_clipped_to_class_count(metrics):
  assert metrics['top1'] == pytest.approx(6 / 8)
  # Only 4 classes, so "top-5" is top-4 and always right.
  assert metrics['top_k'] == 4
  assert metrics['top5'] == 1.0


def test_top5_with_more_classes():
  # Logits rise with the class index: class 6 is first, class 2 fifth, class 1 sixth.
  logits = np.tile(np.arange(7, dtype=np.float32), (3, 1))
  result = report.classification_metrics(logits, np.array([6, 2, 1]), [str(i) for i in range(7)])
  assert result['top_k'] == 5
  assert result['top1'] == pytest.approx(1 / 3)
  assert result['top5'] == pytest.approx(2 / 3)


@pytest.mark.parametrize('offset', [0.0, 1000.0])
def test_loss_by_hand(offset):
  # Logits [0, log 3] give softmax [1/4, 3/4]: label 1 costs log(4/3), label 0 costs log 4.
  # The offset of 1000 would overflow a naive exp; log-softmax must not care.
  logits = np.array([[0.0, math.log(3)], [0.0, math.log(3)]]) + offset
  result = report.classification_metrics(logits, np.array([1, 0]), ['a', 'b'])
  assert result['loss'] == pytest.approx((math.log(4 / 3) + math.log(4)) / 2)
  assert result['top1'] == 0.5


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match='class names'):
    report.classification_metrics(_logits(), LABELS, NAMES[:3])
  with pytest.raises(ValueError, match='Labels'):
    report.classification_metrics(_logits(), LABELS + 4, NAMES)
  with pytest.raises(ValueError):
    report.classification_metrics(_logits()[:7], LABELS, NAMES)


def test_most_confused(metrics):
  # Off-diagonal counts: cat->dog 1 and fox->cat 1; the stable order puts cat->dog first.
  assert report.most_confused(metrics['confusion_matrix'], NAMES) == [
      ('cat', 'dog', 1), ('fox', 'cat', 1)]


def _write_log(path, records, tail=''):
  with open(path, 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
    f.write(tail)


def _training_records(epochs=3, with_validation=True):
  records = []
  for epoch in range(1, epochs + 1):
    for i, step in enumerate((epoch * 10 - 5, epoch * 10)):
      records.append({'step': step, 'split': 'train', 'epoch': epoch, 'loss': 2.0 / step,
                      'accuracy': 0.2 * epoch + 0.1 * i, 'learning_rate': 0.1 / epoch})
    if with_validation:
      records.append({'step': epoch * 10, 'split': 'validation', 'epoch': epoch,
                      'loss': 2.5 / epoch, 'accuracy': 0.2 * epoch, 'top5_accuracy': 0.9})
  return records


def test_read_metrics_log_keeps_the_last_entry_per_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  first = _training_records(epochs=2)
  # A crash after step 10's checkpoint, then a resume that re-logs step 15 and goes on; the cut
  # line is what a crash mid-write leaves.
  rerun = [{'step': 15, 'split': 'train', 'epoch': 2, 'loss': 0.5, 'accuracy': 0.99,
            'learning_rate': 0.05},
           {'step': 20, 'split': 'validation', 'epoch': 2, 'loss': 0.4, 'accuracy': 0.98}]
  _write_log(path, first + rerun, tail='{"step": 25, "spl')
  records = report.read_metrics_log(str(path))
  keys = [(r['step'], r['split']) for r in records]
  assert keys == [(5, 'train'), (10, 'train'), (10, 'validation'), (15, 'train'), (20, 'train'),
                  (20, 'validation')]
  by_key = {(r['step'], r['split']): r for r in records}
  assert by_key[(15, 'train')]['accuracy'] == 0.99
  assert by_key[(20, 'validation')]['accuracy'] == 0.98
  assert by_key[(20, 'train')] == first[4]


def test_read_metrics_log_missing_file(tmp_path):
  assert report.read_metrics_log(str(tmp_path / 'absent.jsonl')) == []


def test_accuracy_gap_uses_mean_train_accuracy_per_epoch():
  gaps = report.accuracy_gap(_training_records(epochs=2))
  # Epoch e: train lines 0.2e and 0.2e + 0.1 (mean 0.2e + 0.05), validation 0.2e.
  assert [g['epoch'] for g in gaps] == [1, 2]
  for g, epoch in zip(gaps, (1, 2)):
    assert g['train_accuracy'] == pytest.approx(0.2 * epoch + 0.05)
    assert g['validation_accuracy'] == pytest.approx(0.2 * epoch)
    assert g['gap'] == pytest.approx(0.05)
  assert report.accuracy_gap(_training_records(with_validation=False)) == []


def _check_png(path, min_side=100):
  assert os.path.getsize(path) > 0
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert image.width > min_side and image.height > min_side
    extrema = image.convert('RGB').getextrema()
  assert any(low < high for low, high in extrema), 'the image is one flat colour'


def test_write_report(tmp_path, metrics):
  outdir = tmp_path / 'report'
  extra = {'checkpoint_step': 1234, 'dataset': 'tiny', 'model': {'depth': 110, 'alpha': 48},
           'seed': np.int64(7)}
  files = report.write_report(str(outdir), metrics, _training_records(), extra)
  assert set(files) == {'json', 'markdown', 'confusion_matrix', 'training_curves'}
  assert sorted(os.listdir(outdir)) == ['confusion_matrix.png', 'report.json', 'report.md',
                                        'training_curves.png']
  _check_png(files['confusion_matrix'])
  _check_png(files['training_curves'])

  with open(files['json']) as f:
    saved = json.load(f)
  for key, value in metrics.items():
    assert saved[key] == value
  assert saved['checkpoint_step'] == 1234 and saved['model'] == {'depth': 110, 'alpha': 48}
  assert saved['seed'] == 7
  assert [g['epoch'] for g in saved['accuracy_gap']] == [1, 2, 3]

  markdown = (outdir / 'report.md').read_text()
  for name in NAMES:
    assert f'| {name} |' in markdown
  assert '| top-1 accuracy | 0.7500 |' in markdown
  assert '| top-4 accuracy | 1.0000 |' in markdown
  assert '| examples | 8 |' in markdown
  assert '| dog | 0.6667 | 1.0000 | 0.8000 | 2 |' in markdown
  assert '| fox | 1.0000 | 0.5000 | 0.6667 | 2 |' in markdown
  assert '| bird | 0.0000 | 0.0000 | 0.0000 | 0 |' in markdown
  assert 'cat → dog (1)' in markdown and 'fox → cat (1)' in markdown
  assert '(confusion_matrix.png)' in markdown and '(training_curves.png)' in markdown


def test_write_report_without_training_log(tmp_path, metrics):
  files = report.write_report(str(tmp_path), metrics, records=[])
  assert 'training_curves' not in files
  assert not os.path.exists(tmp_path / 'training_curves.png')
  _check_png(files['confusion_matrix'])
  with pytest.raises(ValueError, match='overwrite'):
    report.write_report(str(tmp_path), metrics, None, extra={'top1': 0.0})


def test_training_curves_without_validation(tmp_path):
  path = str(tmp_path / 'curves.png')
  assert report.plot_training_curves(_training_records(with_validation=False), path) == path
  _check_png(path)


@pytest.mark.parametrize('num_classes', [2, 60])
def test_confusion_matrix_plot_sizes(tmp_path, num_classes):
  rng = np.random.default_rng(0)
  matrix = rng.integers(0, 5, size=(num_classes, num_classes))
  matrix[0] = 0  # A class with no examples must not make NaNs when normalising.
  path = str(tmp_path / 'cm.png')
  report.plot_confusion_matrix(matrix, [f'class {i}' for i in range(num_classes)], path)
  _check_png(path)
  report.plot_confusion_matrix(matrix, [f'class {i}' for i in range(num_classes)], path,
                               normalize=False)
  _check_png(path)


def test_import_stays_light():
  code = ('import sys, pyramidnet_jax.evaluation.report; '
          'heavy = [m for m in ("sklearn", "matplotlib") if m in sys.modules]; '
          'assert not heavy, heavy')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)
