"""`pyramidnet_jax.load`: a trained network and its variables from a workdir or a model directory.

Two kinds of directory hold a network:
- a training workdir (`config.json`, `checkpoints/<step>/`, `best/<step>/`): the best-on-
  validation state if the run had a validation split, else the latest;
- a model directory written by `convert` (`model.json` and the Orbax item `variables/`).
Only the params and batch statistics are read (never the optimiser state), onto one device,
so a state trained on a pod loads on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

MODEL_FILE = 'model.json'
VARIABLES_DIR = 'variables'
_COLLECTIONS = ('params', 'batch_stats')
CIFAR10_CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                       'ship', 'truck')

# config.model of configs/default.py; a converted model is described with the same fields.
MODEL_DEFAULTS = {'name': 'pyramidnet', 'depth': 110, 'alpha': 48.0, 'bottleneck': False,
                  'widening': 'additive', 'stem': 'cifar', 'rounding': 'half_up',
                  'dropout_rate': 0.0, 'remat': False, 'channel_multiple': 1,
                  'dtype': 'float32'}


@dataclasses.dataclass
class Loaded:
  model: Any  # A Flax module: PyramidNet, PyConvResNet or PyConvHGResNet.
  variables: dict[str, Any]  # {'params', 'batch_stats'}
  model_config: dict[str, Any]
  num_classes: int
  dataset: str | None  # The data it was trained on: sets predict's transform and class names.
  class_names: tuple[str, ...] | None
  step: int | None  # Training step of the checkpoint (None for a converted model).
  config: Any  # The full training config (ConfigDict) of a workdir, else None.
  path: str  # The checkpoint or model directory actually read.
  # config.image_size (imagenet2012 and folder:ROOT crops); None when not recorded (224).
  image_size: int | None = None


def load(path: str, which: str = 'best') -> tuple[Any, dict[str, Any]]:
  """(model, variables) from a training workdir or a converted model directory.

  `model.apply(variables, images)` gives logits; `method='features'` the backbone features.
  `which` picks a workdir's 'best' (falls back to latest when there is none) or 'latest' state.
  """
  loaded = load_info(path, which)
  return loaded.model, loaded.variables


def load_info(path: str, which: str = 'best') -> Loaded:
  """Like `load`, with what the directory says about the data and the checkpoint."""
  from pyramidnet_jax.training import storage  # pylint: disable=g-import-not-at-top
  path = path if storage.is_remote(path) else os.path.expanduser(path)  # Or gs://...
  if which not in ('best', 'latest'):
    raise ValueError(f'which must be "best" or "latest", got {which!r}.')
  if storage.isfile(storage.join(path, MODEL_FILE)):
    return _load_model_directory(path)
  if storage.isfile(storage.join(path, 'config.json')):
    return _load_workdir(path, which)
  if not storage.exists(path):
    raise FileNotFoundError(f'{path} does not exist.')
  raise FileNotFoundError(
      f'{path} is neither a training workdir (no config.json) nor a converted model directory '
      f'(no {MODEL_FILE}). Pass the --workdir of a training run, or the --out of convert.')


def _load_workdir(workdir: str, which: str) -> Loaded:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import storage  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.loads(storage.read_text(
      storage.join(workdir, 'config.json'))))
  chosen = None
  for kind in ((checkpoints.BEST, checkpoints.LATEST) if which == 'best' else (checkpoints.LATEST,)):
    directory = storage.join(workdir, kind)
    steps = _steps(directory)
    if steps:
      chosen = storage.join(directory, str(steps[-1]), 'state')
      step = steps[-1]
      break
  if chosen is None:
    raise FileNotFoundError(f'{workdir} holds no checkpoint yet: train first (python -m '
                            f'pyramidnet_jax.main --config=... --workdir={workdir}).')
  variables = restore_variables(chosen)
  model_config = {**MODEL_DEFAULTS, **config.model.to_dict()}
  num_classes = int(variables['params']['fc']['bias'].shape[0])
  names_file = storage.join(workdir, 'class_names.json')  # training.loop.CLASS_NAMES_FILE
  if storage.isfile(names_file):
    class_names = tuple(json.loads(storage.read_text(names_file)))
  else:  # A workdir from before the file was written.
    class_names = class_names_of(config.dataset, num_classes, config.get('data_dir'))
  return Loaded(model=build_model(model_config, num_classes), variables=variables,
                model_config=model_config, num_classes=num_classes, dataset=config.dataset,
                class_names=class_names, step=step,
                config=config, path=chosen, image_size=config.get('image_size'))


def _load_model_directory(directory: str) -> Loaded:
  with open(os.path.join(directory, MODEL_FILE)) as f:
    info = json.load(f)
  variables = restore_variables(os.path.join(directory, VARIABLES_DIR))
  model_config = {**MODEL_DEFAULTS, **info['model']}
  num_classes = int(info['num_classes'])
  class_names = info.get('class_names') or class_names_of(info.get('dataset'), num_classes)
  return Loaded(model=build_model(model_config, num_classes), variables=variables,
                model_config=model_config, num_classes=num_classes, dataset=info.get('dataset'),
                class_names=tuple(class_names) if class_names else None, step=None, config=None,
                path=directory, image_size=info.get('image_size'))


def _steps(directory: str) -> list[int]:
  """The committed steps (on an object store, those with Orbax's commit file)."""
  from pyramidnet_jax.training import storage  # pylint: disable=g-import-not-at-top
  if not storage.isdir(directory):
    return []
  return sorted(int(name) for name in storage.listdir(directory) if name.isdigit() and (
      not storage.is_remote(directory)
      or storage.exists(storage.join(directory, name, 'commit_success.txt'))))


def restore_variables(directory: str) -> dict[str, Any]:
  """params and batch_stats of the Orbax pytree in `directory`, on the first local device."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.training import storage  # pylint: disable=g-import-not-at-top
  directory = storage.absolute(directory)  # Orbax finds no metadata under a relative path.
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    # The handler reads an item directory's tree metadata directly (the checkpointer would look
    # for, and warn about, the step-level metadata file of a CheckpointManager step).
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                metadata[k]) for k in _COLLECTIONS}
    restored = checkpointer.restore(
        directory, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))
  except Exception as e:  # Orbax raises several types for missing or damaged files.
    raise ValueError(f'{directory} cannot be read as a checkpoint ({type(e).__name__}: '
                     f'{str(e)[:300]}). Nothing was changed.') from e
  return {k: restored[k] for k in _COLLECTIONS}


def build_model(model_config: dict[str, Any], num_classes: int) -> Any:
  from pyramidnet_jax import models  # pylint: disable=g-import-not-at-top
  return models.from_config(model_config, num_classes)


def class_names_of(dataset: str | None, num_classes: int,
                   data_dir: str | None = None) -> tuple[str, ...] | None:
  """Class names of a known dataset, read without its data; None when unknown."""
  from pyramidnet_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  if dataset == 'fashion_mnist':
    names = fashion_mnist.CLASS_NAMES
  elif dataset in ('cifar10', 'cifar100', 'imagenet2012'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    # Prepared data records the names in its dataset_info; ImageNet's synsets ship with TFDS.
    names = tfds.builder(dataset, data_dir=data_dir or None).info.features['label'].names
    if dataset == 'cifar10' and list(names) == [str(i) for i in range(10)]:
      names = CIFAR10_CLASS_NAMES
  else:
    return None
  return tuple(names) if len(names) == num_classes else None


# A .pth file holds tensors only; what predict needs besides goes into x.pth.json beside x.pth.
SIDECAR_SUFFIX = '.json'


def sidecar_path(path: str) -> str:
  """Where the description of the state_dict file `path` is (or goes)."""
  return path + SIDECAR_SUFFIX


def write_sidecar(path: str, loaded: Loaded) -> None:
  """Describes the state_dict file `path` of `loaded`: model config, num_classes, dataset, class
  names and image size."""
  info = {'model': loaded.model_config, 'num_classes': loaded.num_classes,
          'dataset': loaded.dataset,
          'class_names': list(loaded.class_names) if loaded.class_names else None,
          'image_size': loaded.image_size,
          'source': f'converted from {os.path.abspath(loaded.path)}'}
  with open(sidecar_path(path), 'w') as f:
    json.dump(info, f, indent=2)


def read_sidecar(path: str, num_classes: int) -> dict[str, Any] | None:
  """The sidecar of the state_dict file `path` (write_sidecar), None when there is none. A
  damaged one, or one of a network with another number of classes, is a ValueError."""
  sidecar = sidecar_path(path)
  if not os.path.isfile(sidecar):
    return None
  try:
    with open(sidecar) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{sidecar}, the description of {path}, cannot be read ({e}): fix or '
                     'delete it.') from e
  if (not isinstance(info, dict) or not isinstance(info.get('model'), dict) or
      not isinstance(info.get('num_classes'), int)):
    raise ValueError(f'{sidecar} is not the description convert writes beside a .pth file (no '
                     'model or num_classes): delete or move it.')
  if info['num_classes'] != num_classes:
    raise ValueError(f'{sidecar} describes a network of {info["num_classes"]} classes, but '
                     f'{path} holds one of {num_classes}: it belongs to another file. Delete '
                     'or move it to convert on the shapes alone.')
  names = info.get('class_names')
  if names is not None and (not isinstance(names, list) or len(names) != num_classes):
    raise ValueError(f'{sidecar} does not name {num_classes} classes, as {path} has: fix it, or '
                     'delete it and pass --dataset and --class_names.')
  return info


def data_of(recorded: dict[str, Any] | None, dataset: str | None, class_names_file: str | None,
            num_classes: int, stem: str) -> tuple[str | None, tuple[str, ...] | None, int | None]:
  """(dataset, class names, image size) of a converted network: `dataset` and the names in
  `class_names_file` when given, else the sidecar's (`recorded`); without either, a 1000-class
  ImageNet-stem network is ImageNet's, and any other records no dataset (predict then asks)."""
  recorded = recorded or {}
  if dataset is None:
    dataset = recorded.get('dataset')
  same_data = recorded.get('dataset') == dataset  # The sidecar's names and size apply.
  if dataset is None and num_classes == 1000 and stem == 'imagenet':
    dataset = 'imagenet2012'
  if class_names_file:
    with open(class_names_file) as f:
      class_names = tuple(line.strip() for line in f if line.strip())
    if len(class_names) != num_classes:
      raise ValueError(f'{class_names_file} names {len(class_names)} classes; the network has '
                       f'{num_classes}.')
  elif same_data and recorded.get('class_names'):
    class_names = tuple(recorded['class_names'])
  else:
    class_names = class_names_of(dataset, num_classes)
  return dataset, class_names, recorded.get('image_size') if same_data else None


def check_new_directory(path: str) -> None:
  """Refuses to write into a directory that already holds files (nothing is ever overwritten)."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f'{path} already exists and is not empty; choose a new --out '
                          '(nothing was overwritten).')


def save(directory: str, model_config: dict[str, Any], num_classes: int,
         variables: dict[str, Any], dataset: str | None = None, source: str = '',
         class_names: tuple[str, ...] | None = None,
         image_size: int | None = None) -> dict[str, Any]:
  """Writes a model directory: `variables/` (Orbax) and `model.json`; returns the JSON."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  check_new_directory(directory)
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  variables = {k: variables[k] for k in _COLLECTIONS}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables)
  checkpointer.wait_until_finished()
  info = {
      'model': {**MODEL_DEFAULTS, **model_config},
      'num_classes': int(num_classes),
      'dataset': dataset,
      'class_names': list(class_names) if class_names else None,
      'image_size': int(image_size) if image_size else None,
      'source': source,
      'num_params': int(sum(np.size(x) for x in jax.tree.leaves(variables['params']))),
  }
  with open(os.path.join(directory, MODEL_FILE), 'w') as f:
    json.dump(info, f, indent=2)
  return info
