"""The PyTorch reference networks (pyramidnet_jax/interop/torch_reference.py) against the paper's
facts (docs/architecture.md#fidelity)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip('torch')

from pyramidnet_jax.interop import torch_reference as ref  # noqa: E402  (needs torch)


def _meta(build):
  with torch.device('meta'):
    return build()


def _shapes(model):
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Exact parameter counts (SPEC sections 1 and 5), built on the meta device: no memory, no time.
# ----------------------------------------------------------------------------------------------

PYRAMIDNET_COUNTS = [
    # (depth, alpha, classes, kwargs, params)
    (110, 48, 10, {}, 1_772_706),
    (110, 270, 10, {}, 28_485_477),
    (164, 270, 10, {'bottleneck': True}, 27_216_021),
    (200, 240, 10, {'bottleneck': True}, 26_752_702),
    (236, 220, 10, {'bottleneck': True}, 26_969_046),
    (272, 200, 10, {'bottleneck': True}, 26_210_842),
    (101, 360, 1000, {'stem': 'imagenet'}, 42_455_070),
    (200, 300, 1000, {'stem': 'imagenet'}, 62_368_168),
    (200, 450, 1000, {'stem': 'imagenet', 'bottleneck': True}, 116_775_213),
]


@pytest.mark.parametrize('depth,alpha,classes,kwargs,expected', PYRAMIDNET_COUNTS)
def test_pyramidnet_param_count(depth, alpha, classes, kwargs, expected):
  model = _meta(lambda: ref.PyramidNet(depth, alpha, classes, **kwargs))
  assert ref.count_params(model) == expected


@pytest.mark.parametrize('cls,depth,expected', [
    (ref.PyConvResNet, 18, 5_911_976),
    (ref.PyConvResNet, 34, 11_091_048),
    (ref.PyConvResNet, 50, 24_847_720),
    (ref.PyConvResNet, 101, 42_307_944),
    (ref.PyConvResNet, 152, 56_640_872),
    (ref.PyConvHGResNet, 50, 25_234_728),
    (ref.PyConvHGResNet, 101, 44_627_240),
    (ref.PyConvHGResNet, 152, 60_657_960),
])
def test_pyconv_param_count(cls, depth, expected):
  model = _meta(lambda: cls(depth, 1000))
  assert ref.count_params(model) == expected


def test_count_params_skips_frozen():
  model = ref.PyramidNet(8, 4, 3)
  total = ref.count_params(model)
  model.fc.weight.requires_grad_(False)
  assert ref.count_params(model) == total - model.fc.weight.numel()


# ----------------------------------------------------------------------------------------------
# Widths
# ----------------------------------------------------------------------------------------------


def _first_last(widths):
  return [(stage[0], stage[-1]) for stage in widths]


def test_widths_cifar110_a48_basic():
  model = _meta(lambda: ref.PyramidNet(110, 48, 10))
  assert _first_last(model.widths) == [(17, 32), (33, 48), (49, 64)]
  assert [len(s) for s in model.widths] == [18, 18, 18]
  assert model.num_features == 64
  sd = _shapes(model)
  assert sd['conv1.weight'] == (16, 3, 3, 3)
  assert sd['layer1.0.conv1.weight'] == (17, 16, 3, 3)
  assert sd['layer3.17.conv2.weight'] == (64, 64, 3, 3)
  assert sd['fc.weight'] == (10, 64)


def test_widths_cifar272_a200_bottleneck():
  model = _meta(lambda: ref.PyramidNet(272, 200, 10, bottleneck=True))
  assert _first_last(model.widths) == [(18, 83), (85, 149), (152, 216)]
  assert model.num_features == 864
  sd = _shapes(model)
  assert sd['layer1.0.bn1.weight'] == (16,)
  assert sd['layer1.0.conv3.weight'] == (72, 18, 1, 1)
  assert sd['layer2.0.conv1.weight'] == (85, 83 * 4, 1, 1)
  assert sd['bn_final.running_var'] == (864,)


def test_widths_imagenet():
  model = _meta(lambda: ref.PyramidNet(200, 300, 1000, stem='imagenet'))
  assert _first_last(model.widths) == [(69, 78), (82, 187), (191, 350), (355, 364)]
  assert model.num_features == 1456
  assert _shapes(model)['conv1.weight'] == (64, 3, 7, 7)
  assert _meta(lambda: ref.PyramidNet(101, 360, 1000, stem='imagenet')).num_features == 1696


def test_widths_match_pyramid_widths_helper():
  model = _meta(lambda: ref.PyramidNet(164, 270, 100, bottleneck=True, rounding='half_even'))
  assert model.widths == ref.pyramid_widths(164, 270, True, 'cifar', rounding='half_even')


def test_rounding_tie_imagenet50_a300():
  """50 a300 hits 101.5 and 251.5 (both rules agree) and 176.5 / 326.5 (they differ)."""
  up = ref.pyramid_widths(50, 300, stem='imagenet', rounding='half_up')
  even = ref.pyramid_widths(50, 300, stem='imagenet', rounding='half_even')
  assert up[0] == (83, 102, 120)
  assert even[0] == (83, 102, 120)
  assert up[1][2] == 177 and even[1][2] == 176
  assert up[2][2] == 252 and even[2][2] == 252  # 251.5: 252 is also the even neighbour.
  assert up[3][0] == 327 and even[3][0] == 326  # 326.5
  assert up != even
  m_up = _meta(lambda: ref.PyramidNet(50, 300, 1000, stem='imagenet', rounding='half_up'))
  m_even = _meta(lambda: ref.PyramidNet(50, 300, 1000, stem='imagenet', rounding='half_even'))
  assert m_up.widths == up and m_even.widths == even
  s_up, s_even = _shapes(m_up), _shapes(m_even)
  assert list(s_up) == list(s_even)  # same keys ...
  assert s_up['layer2.2.conv2.weight'] == (177, 177, 3, 3)  # ... different shapes
  assert s_even['layer2.2.conv2.weight'] == (176, 176, 3, 3)


def test_rounding_tie_cifar110_a270_bottleneck():
  up = ref.pyramid_widths(110, 270, True, rounding='half_up')
  even = ref.pyramid_widths(110, 270, True, rounding='half_even')
  assert up[0][:3] == (24, 31, 39)  # 23.5, 31.0, 38.5
  assert even[0][:3] == (24, 31, 38)


def test_multiplicative_widening():
  widths = ref.pyramid_widths(110, 4.75, widening='multiplicative')
  assert widths[0][:2] == (16, 17)  # 16.47, 16.95
  assert widths[-1][-1] == 76  # 16 * 4.75 = 76


def test_invalid_arguments():
  with pytest.raises(ValueError, match='6n\\+2'):
    ref.PyramidNet(111, 48, 10)
  with pytest.raises(ValueError, match='9n\\+2'):
    ref.PyramidNet(32, 48, 10, bottleneck=True)
  with pytest.raises(ValueError, match='ImageNet'):
    ref.PyramidNet(110, 48, 10, stem='imagenet')
  with pytest.raises(ValueError, match='bottleneck'):
    ref.PyramidNet(101, 48, 10, bottleneck=False, stem='imagenet')
  with pytest.raises(ValueError, match='rounding'):
    ref.PyramidNet(20, 48, 10, rounding='nearest')
  with pytest.raises(ValueError, match='widening'):
    ref.PyramidNet(20, 48, 10, widening='linear')
  with pytest.raises(ValueError, match='stem'):
    ref.PyramidNet(20, 48, 10, stem='tiny')
  with pytest.raises(ValueError):
    ref.PyConvResNet(26)
  with pytest.raises(ValueError):
    ref.PyConvHGResNet(18)


# ----------------------------------------------------------------------------------------------
# state_dict key layout
# ----------------------------------------------------------------------------------------------

BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def test_pyramidnet_basic_keys():
  keys = list(ref.PyramidNet(8, 6, 10).state_dict())
  expected = ['conv1.weight'] + [f'bn1.{k}' for k in BN_KEYS]
  for stage in (1, 2, 3):
    prefix = f'layer{stage}.0.'
    expected += [prefix + f'bn1.{k}' for k in BN_KEYS] + [prefix + 'conv1.weight']
    expected += [prefix + f'bn2.{k}' for k in BN_KEYS] + [prefix + 'conv2.weight']
    expected += [prefix + f'bn3.{k}' for k in BN_KEYS]
  expected += [f'bn_final.{k}' for k in BN_KEYS] + ['fc.weight', 'fc.bias']
  assert keys == expected


def test_pyramidnet_bottleneck_keys():
  sd = _shapes(_meta(lambda: ref.PyramidNet(164, 48, 100, bottleneck=True)))
  for name in ('bn1', 'bn2', 'bn3', 'bn4'):
    for k in BN_KEYS:
      assert f'layer2.0.{name}.{k}' in sd
  for name in ('conv1', 'conv2', 'conv3'):
    assert f'layer3.17.{name}.weight' in sd
  assert 'layer4.0.bn1.weight' not in sd and 'layer3.18.bn1.weight' not in sd
  assert not any('shortcut' in k or 'downsample' in k for k in sd)
  assert sd['fc.weight'] == (100, sd['bn_final.weight'][0]) and sd['fc.bias'] == (100,)
  imagenet = _shapes(_meta(lambda: ref.PyramidNet(101, 360, 1000, stem='imagenet')))
  assert 'layer4.2.bn4.running_var' in imagenet and 'layer3.22.conv3.weight' in imagenet


def test_pyconvresnet50_keys():
  sd = _shapes(_meta(lambda: ref.PyConvResNet(50, 1000)))
  # Stage 1: four levels 3/5/7/9 with groups 1/4/8/16, 16 output channels each.
  assert sd['layer1.0.conv2.conv2_1.weight'] == (16, 64, 3, 3)
  assert sd['layer1.0.conv2.conv2_4.weight'] == (16, 64 // 16, 9, 9)
  # Stage 2: three levels, split 1/4, 1/4, 1/2.
  assert sd['layer2.1.conv2.conv2_3.weight'] == (64, 128 // 8, 7, 7)
  assert 'layer2.1.conv2.conv2_4.weight' not in sd
  assert sd['layer3.5.conv2.conv2_2.weight'] == (128, 256 // 4, 5, 5)
  # Stage 4: one level, a plain conv.
  assert sd['layer4.0.conv2.weight'] == (512, 512, 3, 3)
  assert 'layer4.0.conv2.conv2_1.weight' not in sd
  # Shortcut with a max-pool first: conv is downsample.1, BN downsample.2.
  assert sd['layer1.0.downsample.1.weight'] == (256, 64, 1, 1)
  assert sd['layer1.0.downsample.2.running_mean'] == (256,)
  assert 'layer1.0.downsample.0.weight' not in sd
  assert sd['layer4.0.downsample.1.weight'] == (2048, 1024, 1, 1)
  assert not any(k.startswith('layer1.1.downsample') for k in sd)
  assert sd['layer1.2.bn3.weight'] == (256,)
  assert sd['conv1.weight'] == (64, 3, 7, 7) and sd['fc.weight'] == (1000, 2048)
  assert not any(k.startswith('bn_final') or k.startswith('layer5') for k in sd)


def test_pyconvresnet18_keys():
  model = _meta(lambda: ref.PyConvResNet(18, 1000))
  sd = _shapes(model)
  # PyConv is conv1 in the two-conv block, conv2 is a 1x1.
  assert sd['layer1.0.conv1.conv2_4.weight'] == (16, 64 // 16, 9, 9)
  assert sd['layer1.0.conv2.weight'] == (64, 64, 1, 1)
  assert sd['layer4.1.conv1.weight'] == (512, 512, 3, 3)
  assert not any('conv3' in k or 'bn3' in k for k in sd)
  # Stage 1 keeps 64 channels and strides 2: a bare max-pool shortcut, no parameters.
  assert not any(k.startswith('layer1.0.downsample') for k in sd)
  assert isinstance(model.layer1[0].downsample, torch.nn.MaxPool2d)
  assert sd['layer2.0.downsample.1.weight'] == (128, 64, 1, 1)
  assert sd['fc.weight'] == (1000, 512)


def test_pyconvhgresnet50_keys():
  sd = _shapes(_meta(lambda: ref.PyConvHGResNet(50, 1000)))
  assert sd['layer1.0.conv1.weight'] == (128, 64, 1, 1)
  assert sd['layer1.0.conv2.conv2_1.weight'] == (32, 128 // 32, 3, 3)
  assert sd['layer2.0.conv2.conv2_3.weight'] == (128, 256 // 64, 7, 7)
  assert sd['layer4.0.conv2.weight'] == (1024, 1024 // 32, 3, 3)
  assert sd['layer1.0.conv3.weight'] == (256, 128, 1, 1)
  assert sd['layer1.0.downsample.1.weight'] == (256, 64, 1, 1)
  assert sd['fc.weight'] == (1000, 2048)


def test_width_only_shortcut_keys():
  """A stride-1 block that changes width uses downsample.0 (conv) / downsample.1 (bn)."""
  block = ref.PyConvBottleneck(32, 16, 1, (3, 5), (1, 4), ((1, 2), (1, 2)), 4)
  keys = [k for k in block.state_dict() if k.startswith('downsample')]
  assert keys[0] == 'downsample.0.weight' and 'downsample.1.running_var' in keys
  assert ref.PyConvBottleneck(64, 16, 1, (3,), (1,), ((1, 1),), 4).downsample is None


# ----------------------------------------------------------------------------------------------
# Forward passes and building blocks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('build,shape', [
    (lambda: ref.PyramidNet(11, 9, 10, bottleneck=True), (2, 3, 32, 32)),
    (lambda: ref.PyramidNet(8, 6, 7), (2, 3, 32, 32)),
    (lambda: ref.PyramidNet(8, 6, 7), (1, 3, 9, 11)),  # odd sizes: ceil-mode average pool
    (lambda: ref.PyramidNet(18, 16, 5, stem='imagenet'), (2, 3, 64, 64)),
    (lambda: ref.PyConvResNet(18, 6), (2, 3, 64, 64)),
])
def test_forward_shapes(build, shape):
  torch.manual_seed(0)
  model = ref.randomize_batchnorm(build(), seed=3).eval()
  with torch.no_grad():
    out = model(torch.randn(*shape))
  assert out.shape == (shape[0], model.fc.out_features)
  assert torch.isfinite(out).all()


def test_forward_train_mode_updates_stats():
  model = ref.PyramidNet(8, 6, 4).train()
  before = model.bn_final.running_mean.clone()
  model(torch.randn(3, 3, 16, 16)).sum().backward()
  assert not torch.equal(before, model.bn_final.running_mean)
  assert model.conv1.weight.grad is not None


def test_pyramid_shortcut_pads_channels_at_end():
  """With a zeroed final BN the block is its shortcut: pooled input, zeros appended at the end."""
  block = ref.PyramidBasicBlock(3, 5, stride=2).eval()
  with torch.no_grad():
    block.bn3.weight.zero_()
    block.bn3.bias.zero_()
    x = torch.randn(2, 3, 7, 7)
    y = block(x)
  assert y.shape == (2, 5, 4, 4)  # ceil(7 / 2)
  expected = torch.nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True)
  torch.testing.assert_close(y[:, :3], expected)
  assert torch.equal(y[:, 3:], torch.zeros(2, 2, 4, 4))
  # Bottom-right output sees only the input's last row/column: the 1-element window mean.
  torch.testing.assert_close(y[:, :3, 3, 3], x[:, :, 6, 6])


def test_pyramid_identity_shortcut_no_relu_after_add():
  block = ref.PyramidBottleneckBlock(8, 2, stride=1).eval()
  with torch.no_grad():
    block.bn4.weight.zero_()
    block.bn4.bias.fill_(-10.0)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(block(x), x - 10.0)  # negative values survive: no final ReLU


def test_pyconv_levels_concatenated_in_kernel_order():
  conv = ref.make_pyconv(16, 16, (3, 5, 7), (1, 4, 8), ((1, 4), (1, 4), (1, 2)), stride=2)
  x = torch.randn(1, 16, 9, 9)
  with torch.no_grad():
    y = conv(x)
    assert y.shape == (1, 16, 5, 5)
    torch.testing.assert_close(y[:, :4], conv.conv2_1(x))
    torch.testing.assert_close(y[:, 4:8], conv.conv2_2(x))
    torch.testing.assert_close(y[:, 8:], conv.conv2_3(x))
  assert conv.conv2_3.groups == 8 and conv.conv2_3.padding == (3, 3)


def test_pyconv_post_activation_relu_after_add():
  block = ref.PyConvBasicBlock(4, 4, 1, (3,), (1,), ((1, 1),)).eval()
  with torch.no_grad():
    y = block(torch.randn(2, 4, 6, 6) - 5.0)
  assert (y >= 0).all()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def test_randomize_batchnorm():
  model = ref.randomize_batchnorm(ref.PyramidNet(11, 9, 10, bottleneck=True), seed=7)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert len(bns) == 1 + 3 * 4 + 1
  for bn in bns:
    assert (bn.running_var >= 0.5).all() and (bn.running_var <= 2.0).all()
    assert not torch.all(bn.weight == 1) and not torch.all(bn.bias == 0)
    assert not torch.all(bn.running_mean == 0) and not torch.all(bn.running_var == 1)
  assert not torch.equal(bns[1].weight[:8], bns[2].weight[:8])
  again = ref.randomize_batchnorm(ref.PyramidNet(11, 9, 10, bottleneck=True), seed=7)
  other = ref.randomize_batchnorm(ref.PyramidNet(11, 9, 10, bottleneck=True), seed=8)
  sd, sd_again, sd_other = model.state_dict(), again.state_dict(), other.state_dict()
  for key in sd:
    if 'bn' in key and 'num_batches' not in key:
      assert torch.equal(sd[key], sd_again[key])
  assert not torch.equal(sd['bn_final.running_var'], sd_other['bn_final.running_var'])


def test_state_dict_roundtrip_between_instances():
  a = ref.randomize_batchnorm(ref.PyConvResNet(18, 3), seed=1).eval()
  b = ref.PyConvResNet(18, 3).eval()
  b.load_state_dict(a.state_dict())
  x = torch.randn(1, 3, 32, 32)
  with torch.no_grad():
    torch.testing.assert_close(a(x), b(x))
