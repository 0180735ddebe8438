"""Weights between the authors' PyTorch checkpoints and ours, in both directions.

The command line is pyramidnet_jax/convert.py. A file is read as a PyTorch checkpoint (a bare
state_dict or {'state_dict': ...}, keys with or without DataParallel's `module.` prefix); the
network (family, stem, depth, block type, alpha, widening and the rounding rule) is inferred from
the tensor shapes alone and written as a model directory that `pyramidnet_jax.load` reads. A
directory (a training workdir or a converted model) is written the other way, as a bare
state_dict that the authors' code loads with `model.load_state_dict(torch.load(path))`.

What a state_dict cannot say (the dataset, whose eval transform and class names predict needs,
the class names, the crop size, the exact model config) goes into a sidecar, `x.pth.json`
beside `x.pth`. Converting `x.pth` back reads it when it is there: its model config when it
fits the tensors, else the file is refused (the sidecar belongs to another file); explicit
--dataset and --class_names win over what it says.

Our submodule names mirror the authors' keys, so the mapping is mechanical: `layer2_0/bn1/scale`
is `layer2.0.bn1.weight`, conv kernels go HWIO <-> OIHW, the classifier kernel is transposed.
PyTorch is imported only here, and only when a .pth file is read or written.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

# Leaf renames (ours -> PyTorch); conv and dense kernels are both `weight`.
_LEAF_TO_TORCH = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                  'var': 'running_var', 'kernel': 'weight'}
_BN_STATS = ('running_mean', 'running_var')
_IGNORED_TORCH_SUFFIXES = ('num_batches_tracked',)

# PyConv networks: blocks per stage and block type -> depth.
_PYCONV_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34,
                  ((3, 4, 6, 3), True): 50, ((3, 4, 23, 3), True): 101,
                  ((3, 8, 36, 3), True): 152}
_PYCONV_HG_GROUPS = 32  # PyConvHGResNet's first level has 32 groups; PyConvResNet's has 1.


class NotConvertible(ValueError):
  """The file is not a checkpoint of a network we implement."""


# ---------------------------------------------------------------------------------------------
# Reading PyTorch files.


def read_torch_checkpoint(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """The float32 numpy state_dict in a PyTorch checkpoint file, `module.` prefixes removed.

  Files are opened with `weights_only=True` (no arbitrary code runs); a checkpoint that pickles
  other Python objects (an argparse.Namespace, say) needs allow_pickle=True, for trusted files.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading PyTorch checkpoints needs PyTorch: pip install -e ".[torch]"') from e
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except FileNotFoundError:
    raise
  except Exception as e:  # torch raises many types for damaged or unexpected files.
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not allow_pickle and 'weights_only' in str(e) and _is_pickle_or_zip(path):
      raise NotConvertible(
          f'{path} holds Python objects besides tensors, so it was not unpickled ({message}). '
          'If you trust the file, pass --allow_pickle.') from e
    if 'weights_only' in str(e):  # Torch's advice on weights_only does not apply to garbage.
      message = 'neither a zip archive nor a pickle'
    raise NotConvertible(
        f'{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {message}') from e
  state_dict = loaded
  if isinstance(loaded, dict):
    for key in ('state_dict', 'model', 'model_state_dict'):
      if key in loaded and isinstance(loaded[key], dict):
        state_dict = loaded[key]
        break
  if not isinstance(state_dict, dict) or not state_dict:
    raise NotConvertible(f'{path} holds no state_dict (found {type(loaded).__name__}).')
  arrays = {}
  for key, value in state_dict.items():
    if not hasattr(value, 'detach'):
      raise NotConvertible(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor; '
                           'this is not a state_dict.')
    key = key[len('module.'):] if key.startswith('module.') else key
    if key.endswith(_IGNORED_TORCH_SUFFIXES):
      continue
    arrays[key] = value.detach().cpu().numpy()
  return arrays


def _is_pickle_or_zip(path: str) -> bool:
  """Whether the file is a zip (torch.save's format) or a pickle, read without running it:
  torch's safe loader fails alike on random bytes and on pickled objects; only the second is
  helped by --allow_pickle."""
  import pickletools  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  try:
    if zipfile.is_zipfile(path):
      return True
    with open(path, 'rb') as f:
      return all(True for _ in pickletools.genops(f))
  except Exception:  # pylint: disable=broad-except  Malformed input raises many types.
    return False


def write_torch_state_dict(state_dict: dict[str, np.ndarray], path: str) -> None:
  """Saves numpy arrays as a bare PyTorch state_dict, with BN's num_batches_tracked added."""
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {}
  for key, value in state_dict.items():
    tensors[key] = torch.from_numpy(np.array(value, np.float32))
    if key.endswith('.running_var'):
      tensors[key[:-len('running_var')] + 'num_batches_tracked'] = torch.tensor(0)
  torch.save(tensors, path)


# ---------------------------------------------------------------------------------------------
# Inferring the network from a state_dict.


def infer_model_config(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, Any], int]:
  """(model config as in configs/default.py's `config.model`, num_classes) from tensor shapes."""
  for key in ('conv1.weight', 'fc.weight', 'fc.bias'):
    if key not in state_dict:
      raise NotConvertible(f'no {key!r}: not a PyramidNet or PyConv state_dict (its first keys '
                           f'are {", ".join(list(state_dict)[:3])}).')
  if 'bn_final.weight' in state_dict:
    model_config = _infer_pyramidnet(state_dict)
  elif any(re.fullmatch(r'layer1\.0\.conv[12]\.conv2_1\.weight', k) for k in state_dict):
    model_config = _infer_pyconv(state_dict)
  else:
    first = next((k for k in state_dict if k.startswith('layer')), next(iter(state_dict)))
    raise NotConvertible(
        f'not a PyramidNet (no bn_final) nor a PyConv network (no layer1.0.conv2.conv2_1): '
        f'the first block key is {first!r}.')
  return model_config, int(state_dict['fc.weight'].shape[0])


def _stem(state_dict: dict[str, np.ndarray]) -> str:
  shape = state_dict['conv1.weight'].shape
  if len(shape) != 4 or shape[2] != shape[3] or shape[2] not in (3, 7):
    raise NotConvertible(f'conv1.weight has shape {list(shape)}: expected a 3x3 (CIFAR) or '
                         '7x7 (ImageNet) stem convolution.')
  return 'cifar' if shape[2] == 3 else 'imagenet'


def _layout(state_dict: dict[str, np.ndarray]) -> tuple[int, ...]:
  blocks: dict[int, set[int]] = {}
  for key in state_dict:
    match = re.match(r'layer(\d+)\.(\d+)\.', key)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  stages = sorted(blocks)
  if not stages or stages != list(range(1, len(stages) + 1)):
    raise NotConvertible(f'the residual stages are layer{stages}: expected layer1, layer2, ...')
  for stage in stages:
    if sorted(blocks[stage]) != list(range(len(blocks[stage]))):
      raise NotConvertible(f'layer{stage} has blocks {sorted(blocks[stage])}: not consecutive.')
  return tuple(len(blocks[s]) for s in stages)


def _base_config(name: str) -> dict[str, Any]:
  from pyramidnet_jax.interop import loading  # pylint: disable=g-import-not-at-top
  return {**loading.MODEL_DEFAULTS, 'name': name}


def _infer_pyramidnet(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  from pyramidnet_jax.models import pyramidnet as models  # pylint: disable=g-import-not-at-top
  stem = _stem(state_dict)
  layout = _layout(state_dict)
  bottleneck = 'layer1.0.bn4.weight' in state_dict
  if stem == 'cifar':
    if len(layout) != 3 or len(set(layout)) != 1:
      raise NotConvertible(f'a CIFAR-stem PyramidNet has 3 equal stages; this file has blocks '
                           f'{layout}.')
    depth = layout[0] * (9 if bottleneck else 6) + 2
  else:
    matches = [d for d, (l, b) in models.IMAGENET_LAYOUTS.items() if (l, b) == (layout, bottleneck)]
    if not matches:
      raise NotConvertible(f'an ImageNet-stem PyramidNet with blocks {layout} '
                           f'({"bottleneck" if bottleneck else "basic"}) has no known depth.')
    depth = matches[0]
  widths = []
  for stage, blocks in enumerate(layout, 1):
    for i in range(blocks):
      key = f'layer{stage}.{i}.conv1.weight'
      if key not in state_dict:
        raise NotConvertible(f'missing {key!r}, which every PyramidNet block has.')
      widths.append(int(state_dict[key].shape[0]))
  alpha, widening, rounding = _infer_widening(widths, depth, bottleneck, stem)
  config = _base_config('pyramidnet')
  config.update(depth=depth, alpha=alpha, bottleneck=bottleneck, widening=widening, stem=stem,
                rounding=rounding)
  return config


def _infer_widening(widths: list[int], depth: int, bottleneck: bool,
                    stem: str) -> tuple[float, str, str]:
  """The simplest alpha (and widening, rounding rule) whose schedule gives exactly `widths`.

  Each width w_i = round(acc_i) bounds alpha to an interval; of the values in the intersection
  we try the ones with the fewest decimals, and keep the first that reproduces every width under
  a rounding rule, preferring half-up (the authors' Torch rule) when both rules agree.
  """
  from pyramidnet_jax.models import pyramidnet as models  # pylint: disable=g-import-not-at-top
  start, n = float(models.STEM_WIDTH[stem]), len(widths)
  for widening in models.WIDENINGS:
    lo, hi = 0.0, math.inf
    for i, w in enumerate(widths, 1):
      if widening == 'additive':
        lo, hi = max(lo, (w - 0.5 - start) * n / i), min(hi, (w + 0.5 - start) * n / i)
      elif w > 0.5:
        lo = max(lo, math.exp(n / i * math.log((w - 0.5) / start)))
        hi = min(hi, math.exp(n / i * math.log((w + 0.5) / start)))
    if lo > hi + 1e-9:
      continue
    for candidate in _simple_numbers(lo, hi):
      for rounding in models.ROUNDINGS:
        try:
          got = models.block_widths(depth, candidate, bottleneck, widening, stem, rounding)
        except ValueError:
          continue
        if [w for stage in got for w in stage] == widths:
          return candidate, widening, rounding
  raise NotConvertible(
      f'the block widths {widths[:4]}...{widths[-2:]} follow no additive or multiplicative '
      'PyramidNet schedule.')


def _simple_numbers(lo: float, hi: float, per_step: int = 50):
  lo, hi = lo - 1e-9, hi + 1e-9
  for step in (1.0, 0.5, 0.25, 0.1, 0.05, 0.01, 0.001, 1e-4, 1e-5):
    first = math.ceil(lo / step)
    for k in range(first, first + per_step):
      value = round(k * step, 6)
      if value > hi:
        break
      if value > 0:
        yield float(value) if value != int(value) else int(value)
  yield (lo + hi) / 2


def _infer_pyconv(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  stem = _stem(state_dict)
  layout = _layout(state_dict)
  bottleneck = 'layer1.0.conv3.weight' in state_dict
  depth = _PYCONV_DEPTHS.get((layout, bottleneck))
  if depth is None:
    raise NotConvertible(f'a PyConv network with blocks {layout} '
                         f'({"bottleneck" if bottleneck else "basic"}) has no known depth.')
  # The first level's groups tell the families apart: its input is the block's planes
  # (bottleneck) or the stem's 64 channels (basic), its kernel's input axis that over groups.
  pyconv = 'layer1.0.conv2' if bottleneck else 'layer1.0.conv1'
  level = state_dict[f'{pyconv}.conv2_1.weight']
  inputs = state_dict['layer1.0.conv1.weight'].shape[0] if bottleneck else \
      state_dict['conv1.weight'].shape[0]
  groups = inputs // level.shape[1]
  name = 'pyconvhgresnet' if groups == _PYCONV_HG_GROUPS else 'pyconvresnet'
  config = _base_config(name)
  config.update(depth=depth, stem=stem, bottleneck=bottleneck)
  return config


# ---------------------------------------------------------------------------------------------
# Mapping variables.


def _pooled_shortcut(model: Any, stage: int, index: int) -> bool:
  """Whether a PyConv block's projection shortcut starts with a max-pool (a strided block)."""
  return index == 0 and (stage > 1 or getattr(model, 'stem', 'imagenet') == 'imagenet')


def torch_key(model: Any, path: tuple[str, ...]) -> str:
  """The PyTorch state_dict key of our variable at `path` (collection excluded)."""
  *modules, leaf = path
  parts = []
  stage = index = None
  for name in modules:
    match = re.fullmatch(r'layer(\d+)_(\d+)', name)
    if match:
      stage, index = int(match[1]), int(match[2])
      parts.append(f'layer{stage}.{index}')
    elif name in ('downsample_conv', 'downsample_bn'):
      offset = 1 if _pooled_shortcut(model, stage, index) else 0
      parts.append(f'downsample.{offset + (name == "downsample_bn")}')
    else:
      parts.append(name)
  parts.append(_LEAF_TO_TORCH[leaf])
  return '.'.join(parts)


def _to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW.
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  return value


def _from_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  return value


def _variable_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(str(getattr(p, 'key', p)) for p in path), leaf) for path, leaf in flat]


def to_torch(model: Any, variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """Our variables ({'params', 'batch_stats'}) as a numpy state_dict in the authors' layout."""
  state_dict = {}
  for path, value in _variable_paths({k: variables[k] for k in ('params', 'batch_stats')}):
    state_dict[torch_key(model, path[1:])] = _to_torch_layout(
        np.asarray(value, np.float32), path[-1])
  return state_dict


def from_torch(model: Any, state_dict: dict[str, np.ndarray],
               input_shape: tuple[int, ...] = (224, 224, 3)) -> dict[str, Any]:
  """The variables of `model` filled from a state_dict; a key or shape that doesn't fit is named."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  channels = state_dict['conv1.weight'].shape[1] if 'conv1.weight' in state_dict else 3
  x = jax.ShapeDtypeStruct((1, *input_shape[:2], channels), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  expected = {}
  for path, leaf in _variable_paths({k: shapes[k] for k in ('params', 'batch_stats')}):
    expected[torch_key(model, path[1:])] = (path, leaf.shape)
  for key, value in state_dict.items():
    if key not in expected:
      raise NotConvertible(f'key {key!r} (shape {list(value.shape)}) has no place in '
                           f'{_describe(model)}.')
  leaves = {}
  for key, (path, shape) in expected.items():
    if key not in state_dict:
      raise NotConvertible(f'{_describe(model)} needs {key!r}, which the file lacks.')
    value = _from_torch_layout(state_dict[key], path[-1])
    if value.shape != tuple(shape):
      raise NotConvertible(
          f'{key!r} has shape {list(state_dict[key].shape)}, but {_describe(model)} needs '
          f'{list(_to_torch_layout(np.zeros(shape), path[-1]).shape)}.')
    leaves[path] = jnp.asarray(value, jnp.float32)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: leaves[tuple(str(getattr(k, 'key', k)) for k in p)],
      {k: shapes[k] for k in ('params', 'batch_stats')})


def _describe(model: Any) -> str:
  name = type(model).__name__
  depth = getattr(model, 'depth', '?')
  if name == 'PyramidNet':
    return (f'PyramidNet-{depth} alpha {model.alpha} ({model.stem} stem, '
            f'{"bottleneck" if model.bottleneck else "basic"}, {model.widening}, '
            f'{model.rounding})')
  return f'{name}-{depth}'


def _input_shape(model_config: dict[str, Any]) -> tuple[int, int]:
  return (224, 224) if model_config.get('stem') == 'imagenet' else (32, 32)


def convert_torch_file(path: str, out: str, dataset: str | None = None,
                       allow_pickle: bool = False,
                       class_names_file: str | None = None) -> dict[str, Any]:
  """Converts a PyTorch checkpoint file into a model directory; returns its info.

  The network comes from the sidecar (loading.read_sidecar) when there is one, else from the
  tensor shapes; the data it was trained on as loading.data_of says.
  """
  from pyramidnet_jax import models  # pylint: disable=g-import-not-at-top
  from pyramidnet_jax.interop import loading  # pylint: disable=g-import-not-at-top
  loading.check_new_directory(out)
  state_dict = read_torch_checkpoint(path, allow_pickle)
  model_config, num_classes = infer_model_config(state_dict)
  recorded = loading.read_sidecar(path, num_classes)
  if recorded is not None:
    model_config = {**loading.MODEL_DEFAULTS, **recorded['model']}
  try:
    model = models.from_config(model_config, num_classes)
    variables = from_torch(model, state_dict, _input_shape(model_config))
  except ValueError as e:
    if recorded is None:
      raise
    raise ValueError(f'{loading.sidecar_path(path)} does not describe {path} ({e}): it belongs '
                     'to another file. Delete or move it to convert on the shapes alone.') from e
  dataset, class_names, image_size = loading.data_of(recorded, dataset, class_names_file,
                                                     num_classes, model_config['stem'])
  return loading.save(out, model_config, num_classes, variables, dataset=dataset,
                      source=f'converted from {os.path.abspath(path)}', class_names=class_names,
                      image_size=image_size)


def convert_to_torch_file(directory: str, out: str) -> dict[str, Any]:
  """Writes the model in a workdir or model directory as a bare PyTorch state_dict file `out`,
  and its description as the sidecar `out`.json (loading.write_sidecar)."""
  from pyramidnet_jax.interop import loading  # pylint: disable=g-import-not-at-top
  for path in (out, loading.sidecar_path(out)):
    if os.path.exists(path):
      raise FileExistsError(f'{path} exists; choose another --out (nothing was overwritten).')
  loaded = loading.load_info(directory)
  write_torch_state_dict(to_torch(loaded.model, loaded.variables), out)
  loading.write_sidecar(out, loaded)
  return {'model': loaded.model_config, 'num_classes': loaded.num_classes, 'out': out,
          'sidecar': loading.sidecar_path(out)}
