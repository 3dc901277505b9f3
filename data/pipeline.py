"""The batched, sharded, resumable input iterator (grain MapDataset over a random-access source).

Order of one process's stream, a pure function of (seed, process_index, position):
  source -> this process's shard: examples process_index, process_index + P, ... (stride P)
         -> shuffled per epoch (grain's index shuffle, seed folded with the epoch number)
         -> repeated -> decoded + cropped + resized (uint8)
         -> random flip, its coin seeded by (flip seed, position in the stream)
         -> batched -> float32 in [-1, 1]
so a restored position reproduces exactly the batches that follow it, flips included.
The per-process shards are disjoint and their union is the whole split: every epoch of
every process is one permutation of its shard.
"""

import os

import grain
import numpy as np

from data import preprocess
from data import sources

STATE_VERSION = 1


def _uint32_seeds(seed, process_index):
  """Two independent uint32 seeds (shuffle, flips) from the master seed and the process."""
  shuffle_seed, flip_seed = np.random.SeedSequence([int(seed) % 2**63]).generate_state(2)
  # Flips also depend on the process, so that process k's i-th example does not get the
  # same coin as process 0's; the shuffle seed does not need to (shards are disjoint).
  flip_seed = np.random.SeedSequence([int(flip_seed), process_index]).generate_state(1)[0]
  return int(shuffle_seed), int(flip_seed)


class DataIterator:
  """Iterator over batches with a JSON-serializable position.

  `next(it)` returns a dict of numpy arrays:
    'image'   float32 [b, H, W, C] in [-1, 1]  (uint8 [b, H, W, C] for uint8=True)
    'label'   int32 [b]
    'low_res' float32 [b, s, s, C] in [-1, 1], only when config.data.low_res_size > 0.
    'caption_id' int32 [b], 'context' float32 [b, L, D], 'context_mask' bool [b, L]: with a
      caption cache (text models), one caption of the example and its cached token states.
    'index'   int32 [b], with index=True: each example's position in the split's source (the
      row of a latent cache, latent_cache.py).
  """

  def __init__(self, dataset, meta):
    self._dataset = dataset
    self._iter = iter(dataset)
    self._meta = meta

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iter)

  def get_state(self):
    """The position in the stream, a JSON-serializable dict.

    It holds no process index: with equal shard positions (the usual case, every process
    having consumed the same number of batches) the state is the same on every process,
    so one process's copy in a checkpoint restores all of them.
    """
    return {'version': STATE_VERSION, **self._meta, 'grain': self._iter.get_state()}

  def set_state(self, state):
    """Moves to the position `state` (from get_state) describes.

    Raises:
      ValueError: the state comes from a pipeline with a different dataset, split,
        per-process batch size, process count, seed, shuffling or number of worker
        processes; restoring it would not give the batches the saved run was going to see.
    """
    for key, value in self._meta.items():
      saved = state.get(key)
      if saved != value:
        raise ValueError(f'data iterator state is for {key}={saved!r}, this pipeline has '
                         f'{key}={value!r}; resume with the config of the saved run')
    self._iter.set_state(state['grain'])

  def close(self):
    """Stops grain's worker processes, if any."""
    close = getattr(self._iter, 'close', None)
    if close is not None:
      close()


class _Captioned:
  """A source whose examples also carry their caption ids ('caption_ids', int32 [k])."""

  def __init__(self, source, captions):
    if len(captions) != len(source):
      raise ValueError(f'the caption cache holds {len(captions)} examples, the source '
                       f'{len(source)}')
    self._source, self._captions = source, captions

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    example = self._source[index]
    if example is not None:
      example = dict(example, caption_ids=self._captions.example_ids(index))
    return example


class _Indexed:
  """A source whose examples also carry their own index ('index')."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    example = self._source[index]
    if example is not None:
      example = dict(example, index=index)
    return example


def _element_fn(config, *, low_res_size, flip):
  """The per-example function: source dict -> uint8 'image' (+ 'low_res'), int32 'label'
  (+ int32 'caption_id', one of the example's captions, picked with the element's rng)."""
  d = config.data

  def fn(example, rng=None):
    if example is None:  # unreadable file, already logged: grain drops None elements
      return None
    image = preprocess.preprocess(example['image'], crop=d.crop, image_size=d.image_size,
                                  num_channels=d.num_channels)
    if flip:
      image = preprocess.maybe_flip(image, rng)
    out = {'image': image, 'label': np.int32(example['label'])}
    if low_res_size > 0:
      out['low_res'] = preprocess.downsample(image, low_res_size)
    if 'caption_ids' in example:
      ids = example['caption_ids']
      # grain seeds rng from the element's position: the pick is a function of the step.
      out['caption_id'] = np.int32(ids[rng.integers(len(ids))] if len(ids) > 1 else ids[0])
    if 'index' in example:
      out['index'] = np.int32(example['index'])
    return out

  return fn


def _batch_fn(uint8, captions=None):
  def fn(batch):
    if not uint8:
      batch['image'] = preprocess.to_float(batch['image'])
    if 'low_res' in batch:
      batch['low_res'] = preprocess.to_float(batch['low_res'])
    if captions is not None:
      batch.update(captions.rows(batch['caption_id']))
    return batch
  return fn


def get_dataset(config, *, split=None, batch_size=None, process_index=None, process_count=None,
                shuffle=True, repeat=True, drop_remainder=True, seed=None, uint8=False,
                augment=None, num_threads=None, captions=None, index=False):
  """The input iterator of one process.

  Args:
    config: the experiment config (uses config.data, config.training.batch_size, config.seed).
    split: split to read; default config.data.split.
    batch_size: examples per batch IN THIS PROCESS; default config.training.batch_size
      divided by process_count.
    process_index: this process's shard; default jax.process_index().
    process_count: number of shards; default jax.process_count().
    shuffle: reshuffle the shard every epoch (False: ascending source order).
    repeat: loop over epochs forever; False: one epoch, then StopIteration.
    drop_remainder: drop a final partial batch (matters only with repeat=False).
    seed: shuffle and flip seed; default config.seed.
    uint8: yield 'image' as uint8 [0, 255] (for dataset statistics such as FID's); use it
      with shuffle=False, repeat=False, drop_remainder=False to see every example once.
    augment: random horizontal flips when config.data.random_flip; default `not uint8`.
    num_threads: grain reader threads in each process; default 2 per core (up to 16).
    captions: a captions.CaptionCache of this split (text models): batches then carry each
      example's caption id and its cached token states.
    index: batches also carry 'index', each example's position in the split (the stream and
      the other fields do not change).

  Returns:
    A DataIterator (next() -> dict of numpy arrays; get_state() / set_state()).

  Raises:
    ValueError: config.training.batch_size does not divide over process_count, bad
      dataset spec, image key, crop or channel count; FileNotFoundError: tfds dataset
      not prepared, or folder missing.
  """
  import jax  # pylint: disable=g-import-not-at-top  (only for the process defaults)
  d = config.data
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  if batch_size is None:
    global_batch = config.training.batch_size
    if global_batch % process_count:
      raise ValueError(f'config.training.batch_size={global_batch} does not divide evenly over '
                       f'{process_count} processes; set it to a multiple of {process_count}')
    batch_size = global_batch // process_count
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if d.num_channels not in (1, 3):
    raise ValueError(f'config.data.num_channels must be 1 or 3, got {d.num_channels}')
  if d.crop not in preprocess.CROPS:
    raise ValueError(f'unknown config.data.crop={d.crop!r}; accepted: '
                     f'{", ".join(preprocess.CROPS)}')
  seed = config.seed if seed is None else seed
  augment = (not uint8) if augment is None else augment
  flip = bool(d.random_flip and augment)
  split = d.split if split is None else split

  source = sources.make_source(config, split)
  if captions is not None:
    source = _Captioned(source, captions)
  if index:
    source = _Indexed(source)
  if len(source) < process_count:
    raise ValueError(f'{d.dataset} split {split!r} has {len(source)} examples, fewer than the '
                     f'{process_count} processes reading it')
  shuffle_seed, flip_seed = _uint32_seeds(seed, process_index)

  ds = grain.MapDataset.source(source)[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed)
  if repeat:
    ds = ds.repeat(None)
  fn = _element_fn(config, low_res_size=d.low_res_size, flip=flip)
  # The caption pick needs an rng too; flips draw first, so adding captions keeps the flips.
  rng_map = flip or (captions is not None and captions.multiple)
  ds = ds.random_map(fn, seed=flip_seed) if rng_map else ds.map(fn)
  if num_threads is None:
    num_threads = min(16, 2 * (os.cpu_count() or 1))
  # Nones (unreadable files) are dropped here; the batch then takes the next examples.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=4 * batch_size))
  it = it.batch(batch_size, drop_remainder=drop_remainder)
  if d.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  it = it.map(_batch_fn(uint8, captions))

  meta = {'dataset': str(d.dataset), 'split': split, 'batch_size': batch_size,
          'process_count': process_count, 'seed': int(seed), 'shuffle': bool(shuffle),
          # Worker processes each batch their own slice: the stream depends on their number.
          'num_workers': int(d.num_workers)}
  return DataIterator(it, meta)
