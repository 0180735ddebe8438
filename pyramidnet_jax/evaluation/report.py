"""Evaluation report: metrics, training curves and confusion matrix from logits and metrics.jsonl.

This part is model-free, so `pyramidnet_jax.evaluate` only has to collect logits and labels, and
the numbers and figures can be tested on hand-made predictions. scikit-learn and matplotlib are
imported inside the functions: importing the package must need only jax and flax.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import numpy as np

from pyramidnet_jax.training import storage

# The figures are drawn on matplotlib Figure objects (Agg canvas) rather than through pyplot, so
# no global backend is switched in the caller's process and no figure outlives its function.
_ANNOTATE_MAX_CLASSES = 20
_TICK_LABELS_MAX_CLASSES = 50


def summary_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """Top-1, top-k (k = min(5, C)) and mean cross-entropy of logits (N, C) against labels (N,)."""
  logits = np.asarray(logits, dtype=np.float64)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
    raise ValueError(f'Expected logits (N, C) and labels (N,), got {logits.shape} and '
                     f'{labels.shape}.')
  count, num_classes = logits.shape
  if count == 0:
    raise ValueError('There are no predictions to report on.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'Labels must be integers, got dtype {labels.dtype}.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'Labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}.')

  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  loss = -log_probs[np.arange(count), labels].mean()
  k = min(5, num_classes)
  # A stable sort breaks ties towards the lower class index, as argmax does, so top-1 is the
  # first column of top-k.
  top_k = np.argsort(-logits, axis=1, kind='stable')[:, :k]
  return {
      'top1': float((top_k[:, 0] == labels).mean()),
      'top5': float((top_k == labels[:, None]).any(axis=1).mean()),
      'top_k': k,
      'loss': float(loss),
      'count': int(count),
  }


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
  """summary_metrics, per-class precision / recall / F1 and their averages, the confusion matrix."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top

  summary = summary_metrics(logits, labels)
  num_classes = np.shape(logits)[1]
  if len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names for {num_classes} logits per example.')
  labels = np.asarray(labels)
  predictions = np.asarray(logits).argmax(axis=1)
  class_ids = list(range(num_classes))
  precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels, predictions, labels=class_ids, zero_division=0)
  averages = {}
  for average in ('macro', 'weighted'):
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, predictions, labels=class_ids, average=average, zero_division=0)
    averages[average] = {'precision': float(p), 'recall': float(r), 'f1': float(f)}
  matrix = skm.confusion_matrix(labels, predictions, labels=class_ids)

  return {
      **summary,
      'per_class': [{'name': str(name), 'precision': float(precision[i]),
                     'recall': float(recall[i]), 'f1': float(f1[i]), 'support': int(support[i])}
                    for i, name in enumerate(class_names)],
      'macro': averages['macro'],
      'weighted': averages['weighted'],
      'confusion_matrix': matrix.astype(int).tolist(),
      'class_names': [str(name) for name in class_names],
  }


def read_metrics_log(path: str) -> list[dict[str, Any]]:
  """The records of a training run's metrics.jsonl, the last one for each (split, step).

  A resumed run re-logs the steps after its last checkpoint, so a step can appear more than once;
  the later line is the one from the run that carried on. Records come out ordered by step, train
  before validation. A missing file gives an empty list.
  """
  if not storage.exists(path):
    return []
  latest: dict[tuple[str, int], dict[str, Any]] = {}
  with storage.open_text(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        # A crash mid-write leaves a cut line; the steps it held are re-logged after resuming.
        logging.warning('Skipping unreadable line %d of %s.', number, path)
        continue
      if not isinstance(record, dict) or 'step' not in record or 'split' not in record:
        logging.warning('Skipping line %d of %s: no step or split.', number, path)
        continue
      key = (record['split'], int(record['step']))
      latest.pop(key, None)  # Re-inserted, so the dict keeps the latest position too.
      latest[key] = record
  order = {'train': 0, 'validation': 1}
  return sorted(latest.values(),
                key=lambda r: (int(r['step']), order.get(r['split'], 2), str(r['split'])))


def accuracy_gap(records: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
  """Per epoch: mean train accuracy of its train lines, validation accuracy, and their difference.

  Only epochs with both train and validation lines are listed.
  """
  train: dict[int, list[float]] = {}
  validation: dict[int, float] = {}
  for record in records:
    if 'epoch' not in record or 'accuracy' not in record:
      continue
    epoch = int(record['epoch'])
    if record['split'] == 'train':
      train.setdefault(epoch, []).append(float(record['accuracy']))
    elif record['split'] == 'validation':
      validation[epoch] = float(record['accuracy'])
  gaps = []
  for epoch in sorted(set(train) & set(validation)):
    train_accuracy = float(np.mean(train[epoch]))
    gaps.append({'epoch': epoch, 'train_accuracy': train_accuracy,
                 'validation_accuracy': validation[epoch],
                 'gap': train_accuracy - validation[epoch]})
  return gaps


def _series(records, split, key):
  points = [(r['step'], r[key]) for r in records
            if r.get('split') == split and r.get(key) is not None]
  return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(records: Sequence[dict[str, Any]], path: str) -> str:
  """One PNG with loss, accuracy, learning rate and the train-validation accuracy gap."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  fig = Figure(figsize=(12, 8), dpi=100)
  axes = fig.subplots(2, 2).ravel()
  for ax, key, title in ((axes[0], 'loss', 'Loss'), (axes[1], 'accuracy', 'Top-1 accuracy')):
    for split, style in (('train', '-'), ('validation', 'o-')):
      steps, values = _series(records, split, key)
      if steps:
        ax.plot(steps, values, style, label=split, markersize=3)
    ax.set(title=title, xlabel='step')
    if ax.lines:
      ax.legend()
    ax.grid(alpha=0.3)

  steps, rates = _series(records, 'train', 'learning_rate')
  axes[2].plot(steps, rates)
  axes[2].set(title='Learning rate', xlabel='step')
  axes[2].grid(alpha=0.3)

  gaps = accuracy_gap(records)
  ax = axes[3]
  ax.set(title='Train - validation accuracy', xlabel='epoch')
  if gaps:
    ax.plot([g['epoch'] for g in gaps], [g['gap'] for g in gaps], 'o-')
    ax.axhline(0.0, color='gray', linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  else:
    ax.text(0.5, 0.5, 'no validation split', ha='center', va='center', transform=ax.transAxes,
            fontsize=14, color='gray')
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  storage.save_figure(fig, path)
  return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str],
                          path: str, normalize: bool = True) -> str:
  """A heatmap of the confusion matrix (rows true, columns predicted), optionally row-normalised."""
  from matplotlib.figure import Figure

  counts = np.asarray(matrix, dtype=np.float64)
  num_classes = counts.shape[0]
  if counts.shape != (num_classes, num_classes) or len(class_names) != num_classes:
    raise ValueError(f'A {counts.shape} matrix does not fit {len(class_names)} class names.')
  if normalize:
    totals = counts.sum(axis=1, keepdims=True)
    # A class absent from the test set has an all-zero row; it stays zero instead of NaN.
    values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
  else:
    values = counts

  # Size grows with C but is capped, so a 1000-class matrix is a few thousand pixels, not 50,000.
  side = float(np.clip(2.0 + 0.5 * num_classes, 5.0, 24.0))
  fig = Figure(figsize=(side + 1.5, side), dpi=100)
  ax = fig.subplots()
  image = ax.imshow(values, cmap='Blues', interpolation='nearest',
                    vmin=0.0, vmax=1.0 if normalize else max(values.max(), 1.0))
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
               label='fraction of true class' if normalize else 'count')
  ax.set(xlabel='predicted', ylabel='true',
         title='Confusion matrix' + (' (row-normalised)' if normalize else ''))
  if num_classes <= _TICK_LABELS_MAX_CLASSES:
    ax.set_xticks(range(num_classes))
    ax.set_xticklabels(class_names, rotation=45, ha='right', rotation_mode='anchor')
    ax.set_yticks(range(num_classes))
    ax.set_yticklabels(class_names)
  else:
    ax.set_xticks([])
    ax.set_yticks([])
  if num_classes <= _ANNOTATE_MAX_CLASSES:
    threshold = values.max() / 2.0 if values.max() > 0 else 1.0
    for i in range(num_classes):
      for j in range(num_classes):
        text = f'{values[i, j]:.2f}' if normalize else f'{int(counts[i, j])}'
        ax.text(j, i, text, ha='center', va='center', fontsize=8,
                color='white' if values[i, j] > threshold else 'black')
  fig.tight_layout()
  storage.save_figure(fig, path)
  return path


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, 'to_dict'):  # ml_collections.ConfigDict, for the model config.
    return value.to_dict()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def _cell(name: str) -> str:
  return str(name).replace('|', '\\|')


def most_confused(matrix: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str],
                  n: int = 3) -> list[tuple[str, str, int]]:
  """The n largest off-diagonal counts as (true name, predicted name, count), zeros left out."""
  counts = np.array(matrix, dtype=np.int64)
  np.fill_diagonal(counts, 0)
  order = np.argsort(-counts, axis=None, kind='stable')[:n]
  pairs = []
  for flat in order:
    i, j = np.unravel_index(flat, counts.shape)
    if counts[i, j] > 0:
      pairs.append((class_names[i], class_names[j], int(counts[i, j])))
  return pairs


def _markdown(metrics, extra, files, gaps):
  lines = ['# Evaluation report', '']
  if extra:
    for key, value in extra.items():
      if isinstance(value, (str, int, float, bool)) or value is None:
        lines.append(f'- {key}: {value}')
    lines.append('')
  k = metrics.get('top_k', 5)
  lines += ['| metric | value |', '|---|---|',
            f'| top-1 accuracy | {metrics["top1"]:.4f} |',
            f'| top-{k} accuracy | {metrics["top5"]:.4f} |',
            f'| loss | {metrics["loss"]:.4f} |',
            f'| examples | {metrics["count"]} |', '']
  if gaps:
    last = gaps[-1]
    lines += [f'Training, last epoch ({last["epoch"]}): train accuracy '
              f'{last["train_accuracy"]:.4f}, validation accuracy '
              f'{last["validation_accuracy"]:.4f}, gap {last["gap"]:.4f}.', '']
  lines += ['## Per class', '', '| class | precision | recall | F1 | support |',
            '|---|---:|---:|---:|---:|']
  for row in metrics['per_class']:
    lines.append(f'| {_cell(row["name"])} | {row["precision"]:.4f} | {row["recall"]:.4f} | '
                 f'{row["f1"]:.4f} | {row["support"]} |')
  total = sum(row['support'] for row in metrics['per_class'])
  for average in ('macro', 'weighted'):
    a = metrics[average]
    lines.append(f'| *{average} average* | {a["precision"]:.4f} | {a["recall"]:.4f} | '
                 f'{a["f1"]:.4f} | {total} |')
  lines.append('')
  pairs = most_confused(metrics['confusion_matrix'], metrics['class_names'])
  if pairs:
    described = '; '.join(f'{_cell(t)} → {_cell(p)} ({n})' for t, p, n in pairs)
    lines += [f'Most confused (true → predicted): {described}.', '']
  else:
    lines += ['No misclassified examples.', '']
  lines += ['## Figures', '', '![Confusion matrix](confusion_matrix.png)', '']
  if 'training_curves' in files:
    lines += ['![Training curves](training_curves.png)', '']
  else:
    lines += ['No training log (metrics.jsonl) was found, so there are no training curves.', '']
  return '\n'.join(lines)


def write_report(outdir: str, metrics: dict[str, Any], records: list[dict[str, Any]] | None,
                 extra: dict[str, Any] | None = None) -> dict[str, str]:
  """Writes report.json, report.md and the PNGs into `outdir`; returns {kind: path}."""
  storage.makedirs(outdir)
  extra = dict(extra or {})
  clashes = sorted(set(extra) & (set(metrics) | {'accuracy_gap'}))
  if clashes:
    raise ValueError(f'Extra report fields {clashes} would overwrite metrics.')
  files = {'json': storage.join(outdir, 'report.json'),
           'markdown': storage.join(outdir, 'report.md'),
           'confusion_matrix': storage.join(outdir, 'confusion_matrix.png')}
  plot_confusion_matrix(metrics['confusion_matrix'], metrics['class_names'],
                        files['confusion_matrix'])
  gaps = []
  if records:
    files['training_curves'] = plot_training_curves(
        records, storage.join(outdir, 'training_curves.png'))
    gaps = accuracy_gap(records)
  report = {**metrics, **extra}
  if records:
    report['accuracy_gap'] = gaps
  storage.write_atomically(files['json'],
                           json.dumps(report, indent=2, default=_json_default) + '\n')
  storage.write_atomically(files['markdown'], _markdown(metrics, extra, files, gaps))
  return files
