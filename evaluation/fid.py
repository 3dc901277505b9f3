"""Inception features over whole datasets, and cached reference statistics.

Every example counts: batches are re-chunked to one fixed size (one compilation)
and the last one is padded, its padding dropped from the result, so a dataset of
N images gives exactly N feature rows. Statistics files are .npz with `mu`
[2048] and `sigma` [2048, 2048] (float64), `num_images`, optionally `features`
(float32, needed for KID) and `logits`.

  stats = fid.reference_statistics(uint8_batches, cache_path)  # computes once
  feats = fid.compute_features(params, uint8_batches, batch_size=256)
  score = metrics.fid(*metrics.statistics(feats), stats['mu'], stats['sigma'])
"""

import os
import re

import jax
import numpy as np

from data.preprocess import to_uint8  # noqa: F401  (FID's quantization; re-exported)
from evaluation import inception
from evaluation import metrics

# Written into every statistics file; a file from another pipeline is refused.
PIPELINE = 'tf-inception-2015-12-05/pool3/nv_bilinear_float/uint8'


def load_inception(path=''):
  """The FID network and its params (converting the weights on first use).

  Args:
    path: converted .npz ('' = default cache; see `convert_inception.load_or_convert`).

  Returns:
    (module, params): `module.apply({'params': params}, inception.preprocess(images))` gives
    pool3 features; params are jax arrays on the default device, float32.
  """
  from evaluation import convert_inception  # pylint: disable=g-import-not-at-top
  params = convert_inception.load_or_convert(path)
  return (inception.InceptionV3(num_classes=inception.num_classes_of(params)),
          jax.device_put(params))


def _rechunk(batches, batch_size):
  """Yields (uint8 [batch_size, H, W, C], number of real rows), padding the last chunk."""
  if isinstance(batches, np.ndarray) or isinstance(batches, jax.Array):
    batches = [batches]
  pending, count = [], 0
  for batch in batches:
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
      raise TypeError(f'images must be uint8 [B, H, W, C], got {batch.dtype} '
                      '(convert [-1, 1] floats with fid.to_uint8)')
    pending.append(batch)
    count += len(batch)
    while count >= batch_size:
      merged = np.concatenate(pending)
      yield merged[:batch_size], batch_size
      pending, count = [merged[batch_size:]], count - batch_size
  if count:
    merged = np.concatenate(pending)
    pad = np.zeros((batch_size - count,) + merged.shape[1:], np.uint8)
    yield np.concatenate([merged, pad]), count


def compute_features(params, images, batch_size=256, *, with_logits=False, sharding=None,
                     on_batch=None):
  """Pool3 features (and logits) of every image of a dataset.

  Args:
    params: Inception params from `load_inception()`.
    images: a uint8 array [N, H, W, C] or an iterable of uint8 batches [b, H, W, C]
      (any b; same H, W, C throughout; C in {1, 3}).
    batch_size: images per Inception call (a multiple of the device count when
      `sharding` splits the batch).
    with_logits: also return logits (weights with a classifier head only).
    sharding: optional jax.sharding for each batch, e.g.
      NamedSharding(mesh, P('data')); None = the default device.
    on_batch: called with the number of real images after each Inception call (progress
      reports; it may raise to stop between batches).

  Returns:
    float32 [N, 2048] numpy; with_logits: (that, float32 [N, K]).
  """
  feats, logits = [], []
  for batch, real in _rechunk(images, batch_size):
    if sharding is not None:
      batch = jax.device_put(batch, sharding)
    out = inception.features(params, batch, with_logits=with_logits)
    f, l = out if with_logits else (out, None)
    feats.append(np.asarray(f)[:real])
    if with_logits:
      logits.append(np.asarray(l)[:real])
    if on_batch is not None:
      on_batch(real)
  if not feats:
    raise ValueError('no images')
  feats = np.concatenate(feats)
  return (feats, np.concatenate(logits)) if with_logits else feats


def process_rows(n, process_index, process_count):
  """This process's share of n rows: (start, stop); every share has ceil(n / P) rows or fewer."""
  per = -(-n // process_count)
  return min(n, process_index * per), min(n, (process_index + 1) * per)


def local_sharding(batch_size):
  """Splits an Inception batch over this process's devices when it divides evenly, else None."""
  devices = jax.local_devices()
  if len(devices) == 1 or batch_size % len(devices):
    return None
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def compute_features_all_processes(params, images, batch_size=256, *, with_logits=False,
                                   on_batch=None):
  """`compute_features` of uint8 images [N, ...] held whole by every process, work split.

  Process p embeds its contiguous share of the rows on its own devices; the shares are then
  gathered (jax.experimental.multihost_utils.process_allgather), so every process returns all N
  rows in order. Shares are padded to equal length for the gather and trimmed after it.
  `on_batch` (see `compute_features`) counts this process's rows.
  """
  images = np.asarray(images)
  n, count = len(images), jax.process_count()
  start, stop = process_rows(n, jax.process_index(), count)
  per = -(-n // count)
  mine = images[start:stop]
  if len(mine) < per:  # the last shares may be short or empty; pad with copies of row 0
    mine = np.concatenate([mine, np.repeat(images[:1], per - len(mine), 0)])
  out = compute_features(params, mine, batch_size, with_logits=with_logits,
                         sharding=local_sharding(batch_size), on_batch=on_batch)
  if count == 1:
    return out
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(out, tiled=True)
  trim = lambda a: np.asarray(a)[:n]
  return tuple(map(trim, gathered)) if with_logits else trim(gathered)


def save_stats(path, mu, sigma, features=None, logits=None, num_images=None):
  """Writes a statistics .npz atomically (a reader never sees half a file).

  Args:
    path: destination .npz.
    mu: [D] mean; sigma: [D, D] covariance (stored float64).
    features: optional [N, D] features (stored float32; KID needs them).
    logits: optional [N, K] logits (Inception Score).
    num_images: N the statistics came from (default: len(features) if given).
  """
  arrays = dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                pipeline=np.array(PIPELINE))
  if features is not None:
    arrays['features'] = np.asarray(features, np.float32)
    num_images = len(features) if num_images is None else num_images
  if num_images is not None:
    arrays['num_images'] = np.array(num_images)
  if logits is not None:
    arrays['logits'] = np.asarray(logits, np.float32)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_stats(path):
  """Reads a statistics .npz -> dict with 'mu', 'sigma' (+ 'features', 'logits', 'num_images').

  Raises:
    ValueError: the file was made by another feature pipeline (e.g. another
      network or resize), which would make FID values incomparable.
  """
  with np.load(path) as data:
    stats = {k: data[k] for k in data.files}
  pipeline = str(stats.pop('pipeline', ''))
  if pipeline != PIPELINE:
    raise ValueError(f'{path} holds statistics of pipeline {pipeline!r}, not {PIPELINE!r}')
  if 'num_images' in stats:
    stats['num_images'] = int(stats['num_images'])
  return stats


def default_stats_path(dataset, split, image_size):
  """Cache path of a dataset's reference statistics, next to the Inception weights."""
  from evaluation import convert_inception  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(convert_inception.default_cache_path())
  name = re.sub(r'[^A-Za-z0-9._-]+', '_', f'{dataset}_{split}_{image_size}px')
  return os.path.join(root, 'fid_stats', f'{name}.npz')


def reference_statistics(images, cache_path, *, params=None, batch_size=256,
                         keep_features=True, sharding=None, on_batch=None):
  """A dataset's FID statistics, computed once and cached.

  Args:
    images: uint8 array [N, H, W, C] or iterable of uint8 batches, every example
      of the reference set (not read at all when the cache exists; a callable
      returning such an iterable defers building it).
    cache_path: .npz to read if present, else to write.
    params: Inception params (None = `load_inception()`).
    batch_size: images per Inception call.
    keep_features: also cache the [N, 2048] float32 features (needed for KID;
      ~400 MB for 50k images).
    sharding: optional batch sharding, see `compute_features`.
    on_batch: see `compute_features`; if it raises, nothing is cached.

  Returns:
    dict from `load_stats`.
  """
  if os.path.exists(cache_path):
    return load_stats(cache_path)
  if params is None:
    _, params = load_inception()
  if callable(images):
    images = images()
  feats = compute_features(params, images, batch_size, sharding=sharding, on_batch=on_batch)
  mu, sigma = metrics.statistics(feats)
  save_stats(cache_path, mu, sigma, features=feats if keep_features else None,
             num_images=len(feats))
  return load_stats(cache_path)
