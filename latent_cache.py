"""Latent diffusion's encoded training set: every example's posterior moments, computed once.

`--mode cache_latents` runs the frozen encoder over the split (data.split) once and writes
WORKDIR/latent_cache/SPLIT_HASH/{mean,logvar}.npy: float32 [N, h, w, L] each, row i the
posterior N(mean, exp(logvar)) of source example i, unscaled and unshifted. With
config.latent.cache = True the trainer reads those rows instead of running the encoder, and
still draws a fresh posterior sample per step, z = mean + exp(logvar / 2) * eps with eps keyed
by fold_in(latent_space.encoder_key, step) as on-the-fly encoding does: the cache holds the
moments, not samples, so training sees the same distribution (and the same draws). The scale
and shift are applied after the draw, so latent.scale_by_std and scale_factor may change
without a new cache.

HASH covers what makes the moments: the autoencoder's files (names, sizes, mtimes), its
latent.dtype, and config.data except num_workers; a cache of another autoencoder or another
preprocessing is never read. Random augmentation (data.random_flip) would make each epoch's
images differ from the cached ones, so it is refused.

The files are written into a temporary folder and renamed into place when complete: a killed
or stopped build (SIGTERM stops it between batches) leaves no partial cache behind.
"""

import hashlib
import json
import math
import os
import shutil

from absl import logging
import jax
import numpy as np

import config_lib
import latent_space
import progress
import sharding

CACHE_VERSION = 1
CACHE_DIR = 'latent_cache'


def check_cacheable(config):
  """Raises ConfigError where cached latents would not be the ones training should see."""
  if not config.latent.autoencoder:
    raise config_lib.ConfigError('config.latent.cache: there is no autoencoder to cache; set '
                                 'config.latent.autoencoder (or latent.cache=false)')
  if config.data.random_flip:
    raise config_lib.ConfigError(
        'config.data.random_flip: flipped images are not the cached ones; a latent cache needs '
        'fixed data (set --config.data.random_flip=false, or latent.cache=false to encode '
        'every step)')


def _autoencoder_fingerprint(path):
  """(relative name, size, mtime_ns) of every file under the autoencoder's path."""
  path = os.path.abspath(path)
  if os.path.isfile(path):
    st = os.stat(path)
    return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
  out = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
  return out


def folder(config, workdir, split=None):
  """WORKDIR/latent_cache/SPLIT_HASH: where the cache of this autoencoder and data lives."""
  split = config.data.split if split is None else split
  data = {k: v for k, v in config_lib.to_dict(config)['data'].items() if k != 'num_workers'}
  parts = [CACHE_VERSION, _autoencoder_fingerprint(config.latent.autoencoder),
           config.latent.dtype, data, split]
  key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join(os.path.abspath(workdir), CACHE_DIR, f'{split}_{key[:16]}')


class LatentCache:
  """The memory-mapped moments of a split: mean, logvar float32 [N, h, w, L]."""

  def __init__(self, path):
    self.path = path
    self.mean = np.load(os.path.join(path, 'mean.npy'), mmap_mode='r')
    self.logvar = np.load(os.path.join(path, 'logvar.npy'), mmap_mode='r')

  def __len__(self):
    return len(self.mean)

  def rows(self, index):
    """Host gather: int [..., b] source indices -> {'mean', 'logvar'} float32 [..., b, h, w, L]."""
    index = np.asarray(index)
    flat = np.sort(index.reshape(-1))  # reading in file order
    pos = np.searchsorted(flat, index)
    return {'mean': np.asarray(self.mean[flat])[pos], 'logvar': np.asarray(self.logvar[flat])[pos]}


def open_cache(config, workdir, split=None):
  """The LatentCache of this config in `workdir`.

  Raises:
    config_lib.ConfigError: it is not there (never built, or built for another autoencoder or
      data config), with the command that builds it.
  """
  path = folder(config, workdir, split)
  if not os.path.isfile(os.path.join(path, 'meta.json')):
    raise config_lib.ConfigError(
        f'config.latent.cache: no latent cache for this autoencoder and data config at {path}; '
        'build it first with the same flags and --mode cache_latents (or set latent.cache=false)')
  return LatentCache(path)


def build(config, workdir, *, split=None, latent=None, stop=None, mesh=None):
  """Encodes the split once into `folder(config, workdir, split)`; returns the folder.

  An existing complete cache is kept. Batches of config.training.batch_size (the last one
  padded) run the jitted encoder over every device, its params an argument; a progress line
  (done/total, rate, ETA) comes at least every 30 s, and `stop()` is asked between batches.
  One process only (in a multi-process job, run this mode as a single process first).

  Raises:
    config_lib.ConfigError: see check_cacheable; more than one process.
    progress.Interrupted: stopped between batches; nothing is left behind.
  """
  import data as data_lib  # pylint: disable=g-import-not-at-top
  check_cacheable(config)
  if jax.process_count() > 1:
    raise config_lib.ConfigError('--mode cache_latents runs as one process: launch it once '
                                 'without the multi-host environment, then train')
  split = config.data.split if split is None else split
  path = folder(config, workdir, split)
  if os.path.isfile(os.path.join(path, 'meta.json')):
    logging.info('latent cache: %s is already complete', path)
    return path
  latent = latent or latent_space.load(config)
  mesh = mesh or sharding.make_mesh()
  n = data_lib.num_examples(config, split)
  bs = config.training.batch_size
  ds = data_lib.get_dataset(config, split=split, batch_size=bs, process_index=0,
                            process_count=1, shuffle=False, repeat=False, drop_remainder=False,
                            augment=False, index=True)
  params = jax.device_put(latent.params, sharding.replicated(mesh))
  moments = jax.jit(latent.moments)
  shape = (n, config.data.image_size // config.latent.factor,
           config.data.image_size // config.latent.factor, config.latent.channels)
  tmp = f'{path}.tmp{os.getpid()}'
  os.makedirs(tmp, exist_ok=True)
  logging.info('latent cache: encoding %d examples of %s split %r into %s', n,
               config.data.dataset, split, path)
  tracker = progress.Progress('latent cache', n, stop=stop)
  try:
    out = {k: np.lib.format.open_memmap(os.path.join(tmp, f'{k}.npy'), mode='w+',
                                        dtype=np.float32, shape=shape)
           for k in ('mean', 'logvar')}
    written = 0
    for _ in range(math.ceil(n / bs) + 1):
      tracker.check_stop()
      try:
        batch = next(ds)
      except StopIteration:
        break
      b = len(batch['index'])
      images = sharding.pad_rows(batch['image'], bs)  # the last batch's padding: dropped below
      m, lv = moments(params, sharding.from_global_rows(mesh, images))
      out['mean'][batch['index']] = sharding.to_host(m)[:b]
      out['logvar'][batch['index']] = sharding.to_host(lv)[:b]
      written += b
      tracker.update(b)
    for a in out.values():
      a.flush()
    del out
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump({'version': CACHE_VERSION, 'num_examples': n, 'encoded': written,
                 'autoencoder': str(config.latent.autoencoder), 'split': split,
                 'dataset': str(config.data.dataset), 'shape': list(shape),
                 'what': 'posterior mean and logvar, unscaled and unshifted'}, f, indent=2)
    ds.close()
    os.rename(tmp, path)  # atomic: the folder is there complete or not at all
  except BaseException:
    ds.close()
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if written < n:  # unreadable files: their rows stay zero, and training never draws them
    logging.warning('latent cache: %d of %d examples could not be read', n - written, n)
  logging.info('latent cache: wrote %s', path)
  return path
