"""The training loop: train, validate, checkpoint and resume, then evaluate on the test split.

The loop resumes from the workdir's latest checkpoint. Every batch is a pure function of (seed,
epoch, index, process) and dropout keys are folded from the step, so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from pyramidnet_jax import data
from pyramidnet_jax import models
from pyramidnet_jax.models import platforms
from pyramidnet_jax.evaluation import evaluator
from pyramidnet_jax.evaluation import report
from pyramidnet_jax.training import checkpoints
from pyramidnet_jax.training import config_checks
from pyramidnet_jax.training import feeding
from pyramidnet_jax.training import metrics_log
from pyramidnet_jax.training import optimizer
from pyramidnet_jax.training import resume
from pyramidnet_jax.training import runtime as runtime_lib
from pyramidnet_jax.training import storage
from pyramidnet_jax.training import workdir as workdir_lib

CLASS_NAMES_FILE = 'class_names.json'
RESULTS_FILE = 'results.json'
PROFILE_DIR = 'profile'  # config.profile_steps' trace, under the workdir.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allowed_config_changes: Sequence[str] = ()) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns the results.

  The config is checked first, then the workdir; the workdir is locked for the whole run, and a
  resume may change only the fields workdir.record_config allows (`allowed_config_changes`
  among them). With config.write_report, the test evaluation also writes WORKDIR/report/ from
  the same logits (report_path).
  """
  start_time = time.time()
  config_checks.validate(config)
  models.from_config(config.model, num_classes=1).num_features  # A bad network fails first.
  workdir_lib.check_path(workdir)
  with workdir_lib.locked(workdir):
    workdir_lib.record_config(workdir, config, allowed_config_changes)
    return _train_and_evaluate(config, workdir, start_time)


def _train_and_evaluate(config, workdir, start_time) -> dict[str, Any]:
  is_chief = jax.process_index() == 0
  dataset = data.load_dataset(config, jax.process_index(), jax.process_count())
  if config.early_stopping_patience > 0 and dataset.validation is None:
    raise ValueError('config.early_stopping_patience > 0 needs a validation split: set '
                     'config.validation_fraction (e.g. 0.1).')
  steps_per_epoch = dataset.train.steps_per_epoch(config.batch_size)
  if config.num_train_steps > 0:
    total_steps = config.num_train_steps
  else:
    total_steps = int(config.num_epochs) * steps_per_epoch
  num_epochs = math.ceil(total_steps / steps_per_epoch)

  model = models.from_config(config.model, dataset.num_classes)
  learning_rate_fn = optimizer.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = optimizer.create_optimizer(config, learning_rate_fn)
  runtime = runtime_lib.create_runtime(config, learning_rate_fn,
                                       preprocessing=dataset.preprocessing)
  state = runtime_lib.create_train_state(config, model, dataset.image_shape, tx, runtime)

  names_file = os.path.join(workdir, CLASS_NAMES_FILE)
  saved = resume.RunCheckpoints(workdir, config.checkpoints_to_keep)
  resumed = saved.resume(
      state, functools.partial(_check_resumable, config, dataset, workdir, names_file),
      with_best=dataset.validation is not None)
  if resumed.meta is not None:
    state, meta = resumed.state, resumed.meta
    logging.info('Resumed from %s at step %d.', saved.latest.directory, resumed.step)
  else:
    meta = {'model': _trained_model(config), 'dataset': config.dataset, 'step': 0, 'epoch': 0,
            'best_accuracy': None, 'best_epoch': None, 'best_step': None, 'bad_epochs': 0,
            'stopped_early': False}
  # The run's classes, for the check at a resume, and for predict and load (names without
  # reading, or importing a reader for, the dataset).
  meta['class_names'] = list(dataset.class_names)
  if is_chief:
    workdir_lib.write_atomically(names_file, json.dumps(list(dataset.class_names)))
    resume.truncate_metrics(os.path.join(workdir, metrics_log.METRICS_FILE), resumed.step)

  def timing() -> dict[str, float]:
    return {'wall_time_s': resumed.wall_time_s + time.time() - start_time}

  log = metrics_log.MetricsLog(workdir)
  step = int(jax.device_get(state.step))
  # The running sums of this epoch's train metrics, saved with every checkpoint, so that a
  # resumed run's epoch summary covers the steps taken before the resume too.
  sums, counted = dict(meta.get('epoch_sums') or {}), int(meta.get('epoch_steps', 0))
  profile = feeding.ProfileWindow(config.get('profile_steps'), storage.join(workdir, PROFILE_DIR),
                                  enabled=is_chief)
  batches = None
  try:
    while step < total_steps and not meta['stopped_early']:
      epoch = step // steps_per_epoch
      first_index = step % steps_per_epoch
      last_index = min(steps_per_epoch, first_index + total_steps - step)
      batches = dataset.train.train_batches(config.batch_size, config.seed, epoch,
                                            start_index=first_index)
      # The epoch's batches from first_index on, each placed on the devices during the step
      # before it; the host iterator is closed on every way out.
      feed = feeding.DeviceFeed(itertools.islice(batches, last_index - first_index),
                                runtime.put_batch)
      throughput = feeding.Throughput(config.batch_size, feed)
      history = []
      progress = _progress(config, epoch, num_epochs, first_index, last_index)
      for index in range(first_index, last_index):
        batch = next(feed)
        profile.before_step(step)
        state, metrics = runtime.train_step(state, batch)
        feed.dispatched(metrics)
        history.append(metrics)
        step += 1
        throughput.step_done()
        profile.after_step(step, metrics)
        progress.update(1)
        at_log = step % config.log_every_steps == 0 or index + 1 == last_index
        # The last step is saved too, so a run that ends mid-epoch can be continued from it.
        at_save = step % config.checkpoint_every_steps == 0 or step == total_steps
        if at_log or at_save:
          fetched = jax.device_get(history)  # Each step's metrics cross to the host once.
          summary = _mean_metrics(fetched)
          _check_finite(summary, step, workdir, saved.latest.latest_step())
          for metrics_of_step in fetched:
            for name, value in metrics_of_step.items():
              sums[name] = sums.get(name, 0.0) + float(value)
          counted += len(fetched)
          history = []
          speed = throughput.interval()
          log.write(step, 'train', {**summary, **speed}, epoch=epoch + 1)
          progress.set_postfix(loss=f'{summary["loss"]:.4f}', acc=f'{summary["accuracy"]:.4f}',
                               img_s=f'{speed["images_per_s"]:,.0f}',
                               input=f'{100 * speed["input_wait"]:.0f}%')
          logging.info('step %d: loss %.4f, accuracy %.4f; %s', step, summary['loss'],
                       summary['accuracy'], feeding.describe(speed))
        if at_save and index + 1 < steps_per_epoch:
          with throughput.paused():
            saved.save_latest(step, state, {**meta, 'step': step, 'epoch': epoch,
                                            'epoch_sums': sums, 'epoch_steps': counted}, timing())
      progress.close()
      batches.close()
      del batch  # The epoch's last batch leaves the devices before validation.
      if last_index < steps_per_epoch:
        break  # num_train_steps ended mid-epoch.
      train_summary = {name: total / counted for name, total in sums.items()}
      train_summary['learning_rate'] = float(learning_rate_fn(step))  # The LR going forward.
      meta, improved = _end_of_epoch(config, runtime, state, dataset, meta, log, step, epoch)
      sums, counted = {}, 0
      # One meta for both: best/<step> can then be saved again from checkpoints/<step>.
      epoch_meta = {**meta, 'step': step, 'epoch': epoch + 1, 'epoch_sums': {}, 'epoch_steps': 0}
      if improved:
        saved.save_best(step, state, epoch_meta, timing())
      saved.save_latest(step, state, epoch_meta, timing())
      _log_epoch_line(epoch, num_epochs, train_summary, meta, timing()['wall_time_s'])
    saved.settle()
  except BaseException:
    saved.abandon()
    if batches is not None:
      batches.close()  # Ends the host pipeline's threads now, not at garbage collection.
    raise
  finally:
    profile.close()
    log.close()

  # The test evaluation uses the best-on-validation state when there is one.
  evaluated_state, evaluated_step = state, step
  if dataset.validation is not None and meta['best_step'] is not None:
    evaluated_step = meta['best_step']
    evaluated_state = saved.restore_best(evaluated_step, state)
  logits, labels = evaluator.split_logits(runtime, evaluated_state, dataset.test,
                                          config.eval_batch_size)
  test = report.summary_metrics(logits, labels)
  process_time = time.time() - start_time
  results = {
      'dataset': config.dataset,
      'test_accuracy': test['top1'],
      'test_top5_accuracy': test['top5'],
      'test_loss': test['loss'],
      'best_epoch': (meta['best_epoch'] if dataset.validation is not None
                     else step // steps_per_epoch),
      'evaluated_step': evaluated_step,
      'steps': step,
      'stopped_early': meta['stopped_early'],
      # Every process that worked on the run, each up to its last checkpoint, and this one.
      'wall_time_s': resumed.wall_time_s + process_time,
      'process_wall_time_s': process_time,
      'num_params': int(sum(x.size for x in jax.tree.leaves(state.params))),
  }
  if is_chief:
    workdir_lib.write_atomically(os.path.join(workdir, RESULTS_FILE),
                                 json.dumps(results, indent=2))
    if config.write_report:
      _write_report(workdir, config, dataset, logits, labels, evaluated_step)
  logging.info('Results: %s', results)
  return results


def _trained_model(config) -> dict[str, Any]:
  """config.model with 'auto' resolved for this platform, as checkpoints and reports record it."""
  return platforms.resolved_model_config(config.model.to_dict())


def _check_resumable(config, dataset, workdir, names_file, meta) -> None:
  """ValueError where this config cannot continue the checkpoint whose meta this is."""
  differences = checkpoints.config_differences(meta['model'], _trained_model(config))
  if meta.get('dataset') != config.dataset:
    differences.append(f'dataset: checkpoint has {meta.get("dataset")!r}, config has '
                       f'{config.dataset!r}')
  if differences:
    raise ValueError(
        f'{workdir} holds a checkpoint of a different model, so it cannot be resumed with '
        f'this config: {"; ".join(differences)}. Use a new --workdir, or the same config.')
  resume.check_class_names(meta, dataset.class_names, workdir, names_file)


def report_path(workdir: str) -> str:
  """Where train_and_evaluate writes the report's markdown when config.write_report."""
  return os.path.join(workdir, evaluator.REPORT_DIR, 'report.md')


def _write_report(workdir, config, dataset, logits, labels, evaluated_step) -> None:
  """WORKDIR/report/ from the test logits."""
  kind = checkpoints.BEST if dataset.validation is not None else checkpoints.LATEST
  metrics = report.classification_metrics(logits, labels,
                                          evaluator.class_names_or_numbers(dataset))
  extra = {'workdir': storage.absolute(workdir),
           'checkpoint': os.path.join(storage.absolute(workdir), kind, str(evaluated_step),
                                      'state'),
           'step': evaluated_step, 'split': 'test', 'dataset': config.dataset,
           'model': _trained_model(config)}
  records = report.read_metrics_log(os.path.join(workdir, metrics_log.METRICS_FILE))
  report.write_report(os.path.join(workdir, evaluator.REPORT_DIR), metrics, records, extra)


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in history])) for k in history[0]}


def _check_finite(metrics: dict[str, float], step: int, workdir: str, last_saved: int | None):
  if not math.isfinite(metrics['loss']):
    kept = (f'the last good checkpoint (step {last_saved}) is kept in {workdir}'
            if last_saved is not None else 'no checkpoint had been saved yet')
    raise FloatingPointError(
        f'The training loss became {metrics["loss"]} by step {step}; {kept}. Lower '
        'config.learning_rate or add warm-up (config.warmup_epochs) and run again with a new '
        '--workdir, or resume this one after changing the config.')


def _progress(config, epoch, num_epochs, first_index, last_index):
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=last_index - first_index, desc=f'epoch {epoch + 1}/{num_epochs}',
                   leave=False, dynamic_ncols=True,
                   disable=not config.progress_bar or jax.process_index() != 0)


def _end_of_epoch(config, runtime, state, dataset, meta, log, step, epoch):
  """Validation and early stopping; returns the updated metadata, and whether it improved."""
  meta = dict(meta)
  if dataset.validation is None:
    return meta, False
  validation = evaluator.split_metrics(runtime, state, dataset.validation,
                                       config.eval_batch_size)
  log.write(step, 'validation', validation, epoch=epoch + 1)
  meta['last_validation'] = validation
  improved = (meta['best_accuracy'] is None or
              validation['accuracy'] > meta['best_accuracy'] + config.early_stopping_min_delta)
  if improved:
    meta.update(best_accuracy=validation['accuracy'], best_epoch=epoch + 1, best_step=step,
                bad_epochs=0)
  else:
    meta['bad_epochs'] += 1
    if 0 < config.early_stopping_patience <= meta['bad_epochs']:
      meta['stopped_early'] = True
  return meta, improved


def _log_epoch_line(epoch, num_epochs, train, meta, elapsed):
  parts = [f'epoch {epoch + 1}/{num_epochs}']
  if 'loss' in train:
    parts.append(f'train loss {train["loss"]:.4f} acc {train["accuracy"]:.4f} '
                 f'lr {train["learning_rate"]:.4g}')
  if 'last_validation' in meta:
    v = meta['last_validation']
    parts.append(f'val loss {v["loss"]:.4f} acc {v["accuracy"]:.4f} '
                 f'(best {meta["best_accuracy"]:.4f} @ {meta["best_epoch"]})')
  if meta['stopped_early']:
    parts.append(f'early stop after {meta["bad_epochs"]} epochs without improvement')
  parts.append(f'{elapsed:.0f}s')
  if jax.process_index() == 0:
    print(' | '.join(parts), flush=True)
