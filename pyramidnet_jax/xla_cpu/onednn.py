"""oneDNN convolutions for XLA:CPU: csrc/onednn_conv.cc, built on first use and called by XLA FFI.

XLA's CPU convolutions are the bottleneck of a PyramidNet training step on CPU: at its odd widths
they are several times slower than oneDNN's, the library PyTorch uses, the weight gradient above
all (docs/benchmarks.md#levers). The handlers in csrc/onednn_conv.cc run oneDNN's primitives on
XLA's buffers in place. They are compiled here with the system's C++ compiler, against the XLA FFI
headers that jaxlib ships and oneDNN's headers and library, once per machine: the shared object
is cached under ~/.cache/pyramidnet_jax/onednn (PYRAMIDNET_ONEDNN_CACHE overrides), keyed on the
source, the compiler and the paths it was built from.

What is needed (pip install -r requirements.txt brings the library; headers come with TensorFlow,
already a dependency, or PyTorch): a C++17 compiler (`g++`, or $CXX), oneDNN 3.x's libdnnl.so.3
(the `onednn-cpu-gomp` wheel installs it into the environment; PYRAMIDNET_ONEDNN_LIB names
another), and its headers (PYRAMIDNET_ONEDNN_INCLUDE names a directory holding oneapi/dnnl/).
`status()` says what is missing. Only float32 convolutions on CPU use it; convolution.py decides
when.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'onednn_conv.cc')
TARGETS = {
    'forward': 'PyramidnetOnednnConvForward',
    'backward_data': 'PyramidnetOnednnConvBackwardData',
    'backward_weights': 'PyramidnetOnednnConvBackwardWeights',
}
_HEADER = os.path.join('oneapi', 'dnnl', 'dnnl.hpp')


class OnednnUnavailableError(RuntimeError):
  """The oneDNN convolutions cannot be built or loaded here; the message says why and what to do."""


def _package_dir(name: str) -> str | None:
  spec = importlib.util.find_spec(name)  # Finds the package without importing it.
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def find_include_dir() -> str | None:
  """A directory holding oneapi/dnnl/dnnl.hpp (oneDNN 3.x's C++ API)."""
  candidates = [os.environ.get('PYRAMIDNET_ONEDNN_INCLUDE'), os.path.join(sys.prefix, 'include')]
  tensorflow, torch = _package_dir('tensorflow'), _package_dir('torch')
  if tensorflow:
    candidates.append(os.path.join(tensorflow, 'include', 'external', 'onednn', 'include'))
  if torch:
    candidates.append(os.path.join(torch, 'include'))
  for directory in candidates:
    if directory and os.path.isfile(os.path.join(directory, _HEADER)):
      return directory
  return None


def find_library() -> str | None:
  """oneDNN 3.x's shared library, libdnnl.so.3."""
  given = os.environ.get('PYRAMIDNET_ONEDNN_LIB')
  if given:
    return given if os.path.isfile(given) else None
  for directory in (os.path.join(sys.prefix, 'lib'), os.path.join(sys.base_prefix, 'lib')):
    path = os.path.join(directory, 'libdnnl.so.3')
    if os.path.isfile(path):
      return path
  return ctypes.util.find_library('dnnl')


def _compiler() -> str | None:
  return shutil.which(os.environ.get('CXX', 'g++'))


def _cache_dir() -> str:
  return os.path.expanduser(os.environ.get('PYRAMIDNET_ONEDNN_CACHE',
                                           '~/.cache/pyramidnet_jax/onednn'))


def _build(compiler: str, include_dir: str, library: str) -> str:
  """The compiled shared object's path, compiling it if this combination is not cached yet."""
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(b'\0'.join([
      source, compiler.encode(), include_dir.encode(), os.path.realpath(library).encode(),
      jax.ffi.include_dir().encode(), jax.__version__.encode()])).hexdigest()[:16]
  output = os.path.join(_cache_dir(), f'libpyramidnet_onednn_{key}.so')
  if os.path.isfile(output):
    return output
  os.makedirs(_cache_dir(), exist_ok=True)
  # Built under a temporary name and renamed, so that concurrent processes never load half a file.
  fd, partial = tempfile.mkstemp(suffix='.so', dir=_cache_dir())
  os.close(fd)
  command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-Wno-attributes', SOURCE,
             '-o', partial, '-I', jax.ffi.include_dir(), '-I', include_dir,
             library, f'-Wl,-rpath,{os.path.dirname(os.path.realpath(library))}',
             '-Wl,--no-undefined']
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      raise OnednnUnavailableError(
          f'compiling {SOURCE} failed ({" ".join(command)}):\n{result.stderr[-2000:]}')
    os.replace(partial, output)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return output


@functools.cache
def load() -> str:
  """Builds (once) and loads the handlers and registers them with XLA; returns the .so's path.

  Raises OnednnUnavailableError saying what is missing and how to get it.
  """
  missing = []
  compiler, include_dir, library = _compiler(), find_include_dir(), find_library()
  if compiler is None:
    missing.append('a C++17 compiler (install g++, or set CXX)')
  if library is None:
    missing.append('oneDNN\'s libdnnl.so.3 (pip install onednn-cpu-gomp, or set '
                   'PYRAMIDNET_ONEDNN_LIB)')
  if include_dir is None:
    missing.append('oneDNN\'s headers, oneapi/dnnl/dnnl.hpp (they come with tensorflow or torch; '
                   'or set PYRAMIDNET_ONEDNN_INCLUDE)')
  if missing:
    raise OnednnUnavailableError('the oneDNN convolutions need ' + '; '.join(missing) + '.')
  path = _build(compiler, include_dir, library)
  try:
    handlers = ctypes.CDLL(path)
  except OSError as e:
    raise OnednnUnavailableError(f'loading {path} failed: {e}. Delete it to rebuild.') from e
  for target in TARGETS.values():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, target)),
                                platform='cpu')
  return path


@functools.cache
def status() -> str | None:
  """None if the oneDNN convolutions are usable here, else why not (built on the first call)."""
  try:
    load()
  except OnednnUnavailableError as e:
    return str(e)
  return None


def _call(target: str, shape, a: jax.Array, b: jax.Array, stride: int, pad: int,
          groups: int) -> jax.Array:
  # Under jax.vmap the handler runs once per mapped element (a batch is already its first axis).
  return jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct(shape, a.dtype),
                          vmap_method='sequential')(
      a, b, stride=np.int64(stride), pad=np.int64(pad), groups=np.int64(groups))


def conv_forward(x: jax.Array, kernel: jax.Array, stride: int, pad: int,
                 groups: int = 1) -> jax.Array:
  """NHWC x HWIO -> NHWC, symmetric zero padding `pad`, XLA's feature groups; float32, CPU."""
  n, h, w, _ = x.shape
  k, cout = kernel.shape[0], kernel.shape[3]
  shape = (n, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, cout)
  return _call('forward', shape, x, kernel, stride, pad, groups)


def conv_backward_data(dy: jax.Array, kernel: jax.Array, x_shape, stride: int, pad: int,
                       groups: int = 1) -> jax.Array:
  return _call('backward_data', tuple(x_shape), dy, kernel, stride, pad, groups)


def conv_backward_weights(x: jax.Array, dy: jax.Array, kernel_shape, stride: int, pad: int,
                          groups: int = 1) -> jax.Array:
  return _call('backward_weights', tuple(kernel_shape), x, dy, stride, pad, groups)
