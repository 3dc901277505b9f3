"""Reads `torch.save` checkpoints (state dicts) into numpy arrays, without torch.

A `torch.save` file (the zip format, torch >= 1.6) is a zip archive holding

  <name>/data.pkl     the pickled object; every tensor is a call to
                      torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) and every
                      storage a persistent id ('storage', torch.<Type>Storage, key, device, numel)
  <name>/data/<key>   the raw bytes of storage <key>
  <name>/byteorder    'little' or 'big' (absent in old files, which are little-endian)

This is the layout `evaluation/convert_inception.py` reads for a TorchScript archive; here the
pickle is a plain (nested) dict of tensors, as a DiT checkpoint is. The unpickler resolves only
the globals such a dict needs and refuses every other one, so reading an untrusted file cannot run
code (unlike torch.load with weights_only=False).
"""

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

# torch storage class -> numpy dtype. bfloat16 has no numpy dtype of its own; ml_dtypes (a jax
# dependency) supplies one, imported only when such a storage occurs.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16',
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


def _numpy_dtype(storage_type: str) -> np.dtype:
  dtype = _STORAGE_DTYPES[storage_type]
  if dtype == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    dtype = ml_dtypes.bfloat16
  return np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2 on a numpy storage (offset and strides in elements)."""
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # owns its memory, C-contiguous


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
  return data


class _Namespace:
  """Stand-in for argparse.Namespace (DiT's train.py stores its `args` in the checkpoint)."""

  def __setstate__(self, state):
    self.__dict__.update(state)


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('argparse', 'Namespace'): _Namespace,
}


class _StateDictUnpickler(pickle.Unpickler):
  """Resolves tensors, storages and dict types; refuses any other global."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._prefix = prefix
    self._byteorder = '<' if byteorder == 'little' else '>'
    self._storages = {}  # key -> array; several tensors may view one storage

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return name
    raise pickle.UnpicklingError(f'unexpected global {module}.{name} in a torch checkpoint; only '
                                 'dicts of tensors are read')

  def persistent_load(self, pid):
    kind, storage_type, key, unused_location, numel = pid
    if kind != 'storage' or storage_type not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    if key not in self._storages:
      dtype = _numpy_dtype(storage_type).newbyteorder(self._byteorder)
      raw = self._archive.read(f'{self._prefix}data/{key}')
      self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel).astype(
          dtype.newbyteorder('='))
    return self._storages[key]


def load(path_or_file) -> Any:
  """Reads a torch.save file.

  Args:
    path_or_file: a path or a binary file object of a zip-format torch.save file.

  Returns:
    The saved object with every tensor as a C-contiguous numpy array (bfloat16 tensors as
    ml_dtypes.bfloat16 arrays).

  Raises:
    ValueError: not a zip-format torch.save file (e.g. torch < 1.6's legacy format).
    pickle.UnpicklingError: the pickle needs a global other than tensors and dicts.
  """
  if not zipfile.is_zipfile(path_or_file):
    raise ValueError(f'{path_or_file}: not a zip-format torch.save file (torch < 1.6 wrote a '
                     'legacy format; re-save it with a recent torch, or export a .npz)')
  with zipfile.ZipFile(path_or_file) as archive:
    names = [n for n in archive.namelist() if n.endswith('data.pkl')]
    if len(names) != 1:
      raise ValueError(f'{path_or_file}: expected one data.pkl in the archive, found {names}')
    prefix = names[0][:-len('data.pkl')]
    byteorder = 'little'
    if f'{prefix}byteorder' in archive.namelist():
      byteorder = archive.read(f'{prefix}byteorder').decode()
    return _StateDictUnpickler(archive.read(names[0]), archive, prefix, byteorder).load()
