"""The weight converter against PyTorch networks written independently of ours
(pyramidnet_jax/interop/torch_reference.py).

Parity: a reference network with random weights and non-trivial BN statistics is saved as the
authors' code saves it, converted, and its eval logits compared with ours. Round trip: our
variables -> PyTorch file -> ours is exact. Bad files are refused with a message naming the
first key or shape that does not fit.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from pyramidnet_jax import PyramidNet  # noqa: E402
from pyramidnet_jax import load  # noqa: E402
from pyramidnet_jax import models  # noqa: E402
from pyramidnet_jax.interop import loading  # noqa: E402
from pyramidnet_jax.interop import torch_reference as ref  # noqa: E402
from pyramidnet_jax.interop import torch_weights as convert  # noqa: E402
from pyramidnet_jax.xla_cpu import host_init  # noqa: E402
from tests import helpers  # noqa: E402

PARITY_TOLERANCE = 1e-4


def torch_logits(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  net.eval()
  with torch.no_grad():
    return net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def save_like_the_authors(net: torch.nn.Module, path: str, wrapped: bool = True) -> None:
  """As their train.py: {'epoch', 'arch', 'state_dict'} of a DataParallel model."""
  state_dict = {f'module.{k}': v for k, v in net.state_dict().items()}
  torch.save({'epoch': 3, 'arch': 'pyramidnet', 'state_dict': state_dict} if wrapped
             else net.state_dict(), path)


def convert_and_run(path: str, out: str, images: np.ndarray):
  info = convert.convert_torch_file(path, out)
  model, variables = load(out)
  return info, np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, images))


PYRAMIDNET_CASES = {
    # name: (reference kwargs, image size, expected inferred config subset)
    'cifar_basic': (dict(depth=8, alpha=12, num_classes=10), 16,
                    dict(depth=8, alpha=12, bottleneck=False, stem='cifar')),
    'cifar_bottleneck': (dict(depth=20, alpha=21, num_classes=7, bottleneck=True), 16,
                         dict(depth=20, alpha=21, bottleneck=True, stem='cifar')),
    # ImageNet 18 a84 has ties (74.5, ...), so the two rounding rules give different nets.
    'imagenet_tie_half_even': (dict(depth=18, alpha=84, num_classes=5, stem='imagenet',
                                    rounding='half_even'), 64,
                               dict(depth=18, alpha=84, stem='imagenet', rounding='half_even')),
    'imagenet_tie_half_up': (dict(depth=18, alpha=84, num_classes=5, stem='imagenet',
                                  rounding='half_up'), 64,
                             dict(depth=18, alpha=84, stem='imagenet', rounding='half_up')),
    'cifar_multiplicative': (dict(depth=14, alpha=4.75, num_classes=3, widening='multiplicative'),
                             16, dict(depth=14, alpha=4.75, widening='multiplicative')),
}


def test_the_tie_case_really_has_ties():
  half_up = models.block_widths(18, 84, stem='imagenet', rounding='half_up')
  half_even = models.block_widths(18, 84, stem='imagenet', rounding='half_even')
  assert half_up != half_even


@pytest.mark.parametrize('case', sorted(PYRAMIDNET_CASES))
def test_converted_pyramidnet_gives_the_reference_logits(case, tmp_path):
  kwargs, size, expected = PYRAMIDNET_CASES[case]
  torch.manual_seed(0)
  net = ref.randomize_batchnorm(ref.PyramidNet(**kwargs), seed=1)
  path = str(tmp_path / 'checkpoint.pth')
  save_like_the_authors(net, path)
  images = np.random.default_rng(0).standard_normal((3, size, size, 3)).astype(np.float32)

  info, ours = convert_and_run(path, str(tmp_path / 'converted'), images)

  assert {k: info['model'][k] for k in expected} == expected
  assert info['num_classes'] == kwargs['num_classes']
  assert info['num_params'] == ref.count_params(net)
  difference = np.max(np.abs(ours - torch_logits(net, images)))
  assert difference < PARITY_TOLERANCE, difference


def test_a_bare_state_dict_without_module_prefix_converts(tmp_path):
  net = ref.randomize_batchnorm(ref.PyramidNet(depth=8, alpha=6, num_classes=4))
  path = str(tmp_path / 'bare.pth')
  save_like_the_authors(net, path, wrapped=False)
  images = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
  _, ours = convert_and_run(path, str(tmp_path / 'converted'), images)
  assert np.max(np.abs(ours - torch_logits(net, images))) < PARITY_TOLERANCE


@pytest.mark.parametrize('kwargs', [
    dict(depth=8, alpha=10, num_classes=10),
    dict(depth=11, alpha=9, num_classes=10, bottleneck=True, rounding='half_even'),
    dict(depth=18, alpha=84, num_classes=6, stem='imagenet'),
])
def test_flax_to_pytorch_to_flax_is_exact(kwargs, tmp_path):
  model = PyramidNet(**kwargs)
  variables = host_init.init_variables(model, jax.random.key(3), (32, 32, 3))
  # Non-trivial statistics, so a swapped mean/var or scale/bias would show.
  variables['batch_stats'] = jax.tree.map(
      lambda x: x + np.random.default_rng(x.size).uniform(0.1, 1.0, x.shape).astype(np.float32),
      variables['batch_stats'])
  path = str(tmp_path / 'ours.pth')
  convert.write_torch_state_dict(convert.to_torch(model, variables), path)

  # The authors' network loads it strictly...
  net = ref.PyramidNet(**kwargs)
  net.load_state_dict(torch.load(path), strict=True)
  # ...and it converts back bit for bit, as the same network.
  state_dict = convert.read_torch_checkpoint(path)
  model_config, num_classes = convert.infer_model_config(state_dict)
  rebuilt = loading.build_model(model_config, num_classes)
  assert rebuilt.widths == model.widths
  back = convert.from_torch(rebuilt, state_dict, (32, 32))
  helpers.assert_trees_equal(back, {k: variables[k] for k in ('params', 'batch_stats')})


def test_truncated_file_is_refused(tmp_path):
  net = ref.PyramidNet(depth=8, alpha=6, num_classes=4)
  path = tmp_path / 'whole.pth'
  save_like_the_authors(net, str(path))
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  with pytest.raises(convert.NotConvertible, match='truncated.pth is not a readable PyTorch'):
    convert.convert_torch_file(str(truncated), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def plain_resnet_state_dict() -> dict[str, torch.Tensor]:
  """The keys and shapes of torchvision's ResNet-18, first stages (post-activation, downsample)."""
  shapes = {
      'conv1.weight': (64, 3, 7, 7), 'bn1.weight': (64,), 'bn1.bias': (64,),
      'bn1.running_mean': (64,), 'bn1.running_var': (64,),
      'layer1.0.conv1.weight': (64, 64, 3, 3), 'layer1.0.bn1.weight': (64,),
      'layer1.0.conv2.weight': (64, 64, 3, 3), 'layer1.0.bn2.weight': (64,),
      'layer2.0.conv1.weight': (128, 64, 3, 3), 'layer2.0.downsample.0.weight': (128, 64, 1, 1),
      'fc.weight': (1000, 512), 'fc.bias': (1000,),
  }
  return {k: torch.zeros(s) for k, s in shapes.items()}


def test_plain_resnet_is_refused_naming_a_key(tmp_path):
  path = str(tmp_path / 'resnet18.pth')
  torch.save(plain_resnet_state_dict(), path)
  with pytest.raises(convert.NotConvertible, match="layer1.0.conv1.weight"):
    convert.convert_torch_file(path, str(tmp_path / 'out'))


def test_a_pyramidnet_with_a_foreign_key_names_it(tmp_path):
  net = ref.PyramidNet(depth=8, alpha=6, num_classes=4)
  state_dict = dict(net.state_dict())
  state_dict['layer2.0.extra.weight'] = torch.zeros(3)
  path = str(tmp_path / 'odd.pth')
  torch.save(state_dict, path)
  with pytest.raises(convert.NotConvertible, match=r"'layer2.0.extra.weight' \(shape \[3\]\)"):
    convert.convert_torch_file(path, str(tmp_path / 'out'))


def test_a_wrong_shape_is_named(tmp_path):
  net = ref.PyramidNet(depth=8, alpha=6, num_classes=4)
  state_dict = dict(net.state_dict())
  state_dict['layer1.0.bn2.weight'] = torch.zeros(99)
  path = str(tmp_path / 'bad_shape.pth')
  torch.save(state_dict, path)
  with pytest.raises(convert.NotConvertible, match='layer1.0.bn2.weight'):
    convert.convert_torch_file(path, str(tmp_path / 'out'))


def test_existing_output_is_never_overwritten(tmp_path):
  net = ref.PyramidNet(depth=8, alpha=6, num_classes=4)
  path = str(tmp_path / 'net.pth')
  torch.save(net.state_dict(), path)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not empty'):
    convert.convert_torch_file(path, str(out))
  assert (out / 'keep.txt').read_text() == 'mine'


def test_cli_converts_both_ways(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  net = ref.randomize_batchnorm(ref.PyramidNet(depth=8, alpha=6, num_classes=4))
  path = str(tmp_path / 'net.pth')
  save_like_the_authors(net, path)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  run = lambda *args: subprocess.run([sys.executable, '-m', 'pyramidnet_jax.convert', *args],
                                     capture_output=True, text=True, cwd=helpers.ROOT, env=env)
  done = run(f'--checkpoint={path}', f'--out={tmp_path / "ours"}')
  assert done.returncode == 0, done.stderr
  assert 'pyramidnet depth 8 alpha 6' in done.stdout
  back = run(f'--checkpoint={tmp_path / "ours"}', f'--out={tmp_path / "back.pth"}')
  assert back.returncode == 0, back.stderr
  reloaded = torch.load(str(tmp_path / 'back.pth'))
  for key, value in net.state_dict().items():
    assert torch.equal(reloaded[key], value), key
  refused = run(f'--checkpoint={tmp_path / "resnet.pth"}', f'--out={tmp_path / "x"}')
  assert refused.returncode != 0 and refused.stderr.strip().startswith('error:')


# --- PyConv networks (issue #7) ------------------------------------------------------------------


@pytest.mark.parametrize('family, depth', [('PyConvResNet', 18), ('PyConvResNet', 50),
                                           ('PyConvHGResNet', 50)])
def test_converted_pyconv_gives_the_reference_logits(family, depth, tmp_path):
  torch.manual_seed(0)
  net = ref.randomize_batchnorm(getattr(ref, family)(depth, num_classes=6), seed=2)
  path = str(tmp_path / 'pyconv.pth')
  save_like_the_authors(net, path)
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)

  info, ours = convert_and_run(path, str(tmp_path / 'converted'), images)

  assert info['model']['name'] == family.lower() and info['model']['depth'] == depth
  assert info['num_params'] == ref.count_params(net)
  difference = np.max(np.abs(ours - torch_logits(net, images)))
  assert difference < PARITY_TOLERANCE, difference


@pytest.mark.parametrize('family, stem', [('PyConvResNet', 'imagenet'), ('PyConvResNet', 'cifar')])
def test_pyconv_flax_to_pytorch_to_flax_is_exact(family, stem, tmp_path):
  import pyramidnet_jax  # pylint: disable=g-import-not-at-top
  model = getattr(pyramidnet_jax, family)(depth=18, num_classes=4, stem=stem)
  variables = host_init.init_variables(model, jax.random.key(5), (32, 32, 3))
  path = str(tmp_path / 'ours.pth')
  convert.write_torch_state_dict(convert.to_torch(model, variables), path)
  if stem == 'imagenet':  # The authors' layout: their network loads it strictly.
    getattr(ref, family)(18, num_classes=4).load_state_dict(torch.load(path), strict=True)
  state_dict = convert.read_torch_checkpoint(path)
  model_config, num_classes = convert.infer_model_config(state_dict)
  assert (model_config['name'], model_config['stem']) == (family.lower(), stem)
  back = convert.from_torch(loading.build_model(model_config, num_classes), state_dict, (32, 32))
  helpers.assert_trees_equal(back, {k: variables[k] for k in ('params', 'batch_stats')})
