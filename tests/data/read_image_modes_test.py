"""`data.read_image`, the one image reader of folder datasets and predict: every PIL mode gives
PIL's own RGB or grey pixels (16-bit and float images scaled, not clipped), and a file PIL
refuses, a file over the size limit or a file that is not a regular file is an
UnreadableImageError, never a hang."""

import os
import struct
import zlib

import numpy as np
import pytest

from pyramidnet_jax import data

Image = pytest.importorskip('PIL.Image')

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 5, 3), np.uint8)


def from_rgb(mode):
  return lambda: Image.fromarray(RGB).convert(mode)


def palette_with_transparency():
  image = Image.fromarray(RGB).convert('P')
  image.info['transparency'] = int(np.asarray(image)[0, 0])
  return image


# (file name, the image to save): 8-bit modes, compared with PIL's own convert.
EIGHT_BIT = [
    ('1.png', from_rgb('1')), ('L.png', from_rgb('L')), ('P.png', from_rgb('P')),
    ('P_transparency.png', palette_with_transparency), ('P.gif', from_rgb('P')),
    ('LA.png', from_rgb('LA')), ('RGB.png', from_rgb('RGB')), ('RGBA.png', from_rgb('RGBA')),
    ('RGBA.webp', from_rgb('RGBA')), ('CMYK.jpg', from_rgb('CMYK')),
    ('CMYK.tif', from_rgb('CMYK')), ('LAB.tif', from_rgb('LAB')), ('LA.tif', from_rgb('LA')),
    ('YCbCr.tif', from_rgb('YCbCr')), ('RGB.bmp', from_rgb('RGB')), ('L.pgm', from_rgb('L')),
]


@pytest.mark.parametrize('name,make', EIGHT_BIT, ids=[n for n, _ in EIGHT_BIT])
@pytest.mark.parametrize('channels', [3, 1])
def test_eight_bit_modes_give_pils_own_conversion(tmp_path, name, make, channels):
  path = str(tmp_path / name)
  image = make()
  image.save(path, **({'transparency': image.info['transparency']}
                      if 'transparency' in image.info else {}))
  with Image.open(path) as opened:
    assert opened.mode == image.mode or name.endswith(('.gif', '.webp', '.pgm', '.tif')), \
        opened.mode
    if channels == 3:
      expected = np.asarray(opened.convert('RGB'))
    elif opened.mode == 'LAB':  # PIL converts LAB to grey only by way of RGB.
      expected = np.asarray(opened.convert('RGB').convert('L'))
    else:
      expected = np.asarray(opened.convert('L'))
  got = data.read_image(path, channels)
  assert got.dtype == np.uint8 and got.shape == (6, 5, channels)
  np.testing.assert_array_equal(got, expected.reshape(got.shape))


SIXTEEN = RNG.integers(0, 65536, (6, 5), np.uint16)
SIXTEEN[0, :3] = (0, 65535, 32896)  # Black, white, and 128 * 257.


@pytest.mark.parametrize('name,image,expected', [
    ('I16.png', lambda: Image.fromarray(SIXTEEN), SIXTEEN / 257),
    ('I16.tif', lambda: Image.fromarray(SIXTEEN), SIXTEEN / 257),
    ('I16B.tif', lambda: Image.frombytes('I;16B', (5, 6), SIXTEEN.astype('>u2').tobytes()),
     SIXTEEN / 257),
    ('I.tif', lambda: Image.fromarray(SIXTEEN.astype(np.int32) - 1000),
     np.clip(SIXTEEN.astype(np.int64) - 1000, 0, None) / 257),
    ('F.tif', lambda: Image.fromarray((SIXTEEN / 65535 * 1.2 - 0.1).astype(np.float32)),
     np.clip((SIXTEEN / 65535 * 1.2 - 0.1).astype(np.float32), 0, 1) * 255.0),
])
def test_wide_integer_and_float_images_are_scaled_not_clipped(tmp_path, name, image, expected):
  path = str(tmp_path / name)
  image().save(path)
  expected = np.rint(expected).astype(np.uint8)
  for channels in (3, 1):
    got = data.read_image(path, channels)
    assert got.shape == (6, 5, channels)
    for c in range(channels):
      np.testing.assert_array_equal(got[..., c], expected)
  if name.startswith('I16'):
    assert data.read_image(path, 1)[0, :3, 0].tolist() == [0, 255, 128]


def test_first_frame_of_an_animated_gif(tmp_path):
  frames = [Image.fromarray(np.full((4, 4, 3), value, np.uint8)).convert('P')
            for value in ((204, 0, 0), (0, 0, 204))]  # Colours of PIL's web palette.
  path = str(tmp_path / 'anim.gif')
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
  with Image.open(path) as opened:
    assert opened.n_frames == 2 and opened.mode == 'P'
  np.testing.assert_array_equal(data.read_image(path), np.full((4, 4, 3), (204, 0, 0)))


def test_exif_orientation_is_not_applied(tmp_path):
  path = str(tmp_path / 'rotated.jpg')
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display": a phone photo taken upright, stored sideways.
  Image.fromarray(RGB).save(path, exif=exif, quality=100)
  with Image.open(path) as opened:
    assert opened.getexif()[0x0112] == 6
    expected = np.asarray(opened.convert('RGB'))
  got = data.read_image(path)
  assert got.shape == (6, 5, 3)  # The stored pixels, not the displayed 5 x 6.
  np.testing.assert_array_equal(got, expected)


def forged_png(path, width, height):
  """A 1x1 grey PNG whose header claims width x height: a decompression bomb's header, in bytes."""
  def chunk(kind, body):
    return (struct.pack('>I', len(body)) + kind + body +
            struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0,
                                                              0, 0))
            + chunk(b'IDAT', zlib.compress(b'\x00\x80')) + chunk(b'IEND', b''))


def test_a_file_over_the_pixel_limit_is_unreadable_before_it_is_decoded(tmp_path):
  bomb = str(tmp_path / 'bomb.png')
  forged_png(bomb, 20000, 20000)
  with pytest.raises(data.UnreadableImageError) as error:
    data.read_image(bomb)
  assert error.value.path == bomb
  assert '400,000,000 pixels, over the limit of 178,956,970' in error.value.reason
  good = str(tmp_path / 'good.png')
  Image.fromarray(RGB).save(good)
  with pytest.raises(data.UnreadableImageError, match='5x6 is 30 pixels, over the limit of 29 '):
    data.read_image(good, max_pixels=29)
  assert data.read_image(good, max_pixels=30).shape == (6, 5, 3)
  # Allowed past PIL's own threshold, the forged file reaches the decoder, which finds it short.
  with pytest.raises(data.UnreadableImageError) as error:
    data.read_image(bomb, max_pixels=400_000_000)
  assert 'limit' not in error.value.reason


def test_not_a_regular_file_is_unreadable_without_blocking(tmp_path):
  fifo = str(tmp_path / 'pipe.png')
  os.mkfifo(fifo)
  with pytest.raises(data.UnreadableImageError, match='not a regular file'):
    data.read_image(fifo)
  with pytest.raises(data.UnreadableImageError, match='not a regular file'):
    data.read_image(str(tmp_path))
  with pytest.raises(data.UnreadableImageError, match='No such file'):
    data.read_image(str(tmp_path / 'missing.png'))


@pytest.mark.parametrize('size, readable', [((1, 100), True), ((1, 101), False),
                                            ((20_000, 3), False)])
def test_an_image_far_longer_than_wide_is_unreadable(tmp_path, size, readable):
  # The eval transform resizes the shorter side to 256: 1 x 20,000 would need gigabytes.
  path = str(tmp_path / 'strip.png')
  Image.new('L', size).save(path)
  if readable:
    assert data.read_image(path).shape == (size[1], size[0], 3)
  else:
    with pytest.raises(data.UnreadableImageError, match='longer than 100 times'):
      data.read_image(path)
