"""Captions of a text-to-image run: a frozen encoder's token states, cached once; prompts.

A text model (config.model.context_dim > 0) is conditioned on the last hidden states [L, D] of a
frozen text encoder (config.text.encoder, models/text_encoders.py) and their mask [L], with
L = config.model.context_len: shorter encodings are padded (mask False), longer ones truncated
(with a warning that counts them). Stable Diffusion instead attends to all 77 CLIP states,
padding included: text.pad_tokens = 'attend' (the default for model.pretrained) keeps them.

Training: `build_cache` lists the split's captions (data.sources.captions_of), encodes each
distinct caption once and writes states float32 [U, L, D] and masks bool [U, L] as .npy files
into a folder named by a hash of (encoder, L, the distinct captions). A resumed or repeated run
finds the folder and encodes nothing. Row 0 is the empty prompt: the null condition of
classifier-free guidance (caption dropout replaces an example's states by it). The data
pipeline reads rows of the memory-mapped files into each batch's 'context' and 'context_mask',
so the encoder never runs in, or next to, the train step. Size: U * L * D * 4 bytes (the
shapes data: ~700 distinct captions x 16 x 384, 17 MB; COCO's 590k captions at CLIP's 77 x 768
would be 140 GB, so there a shorter L or on-the-fly encoding is the better trade).

Sampling and evaluation encode their prompts directly (`encode`), a batch at a time.
"""

import hashlib
import json
import os
from typing import List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from data import sources

CACHE_VERSION = 1


def load_encoder(config):
  """The text encoder config.text.encoder names, checked against model.context_dim."""
  from models import text_encoders  # pylint: disable=g-import-not-at-top
  encoder = text_encoders.load(config.text.encoder)
  if encoder.dim != config.model.context_dim:
    raise ValueError(f'config.text.encoder={config.text.encoder!r} gives {encoder.dim}-d token '
                     f'states but config.model.context_dim={config.model.context_dim}; set '
                     f'--config.model.context_dim={encoder.dim}')
  return encoder


def encode(config, encoder, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
  """Token states float32 [N, L, D] and mask bool [N, L] of `prompts`, L = model.context_len.

  Encoded config.text.batch_size at a time; states past L are dropped (logged). Padding
  positions are zero with mask False, or with text.pad_tokens = 'attend' (`attends_padding`)
  the encoder's own states there with mask True: Stable Diffusion's conditioning, for encoders
  that pad to a fixed length (CLIP: 77).
  """
  length, bs = config.model.context_len, config.text.batch_size
  attend = attends_padding(config)
  prompts = list(prompts)
  states = np.zeros((len(prompts), length, encoder.dim), np.float32)
  mask = np.zeros((len(prompts), length), bool)
  truncated = 0
  for i in range(0, len(prompts), bs):
    s, m = encoder.encode(prompts[i:i + bs])
    s, m = np.asarray(s, np.float32), np.asarray(m, bool)
    truncated += int(m[:, length:].any(axis=1).sum())
    n = min(length, s.shape[1])
    if attend:  # SD: all L states, as the encoder computed them, all attended
      states[i:i + len(s), :n] = s[:, :n]
      mask[i:i + len(s), :n] = True
      continue
    # Zero where the mask is False: the encoder's outputs at padding are junk of no meaning, and
    # zeros make every padded row the same whatever batch it was encoded in.
    states[i:i + len(s), :n] = s[:, :n] * m[:, :n, None]
    mask[i:i + len(s), :n] = m[:, :n]
  if truncated:
    logging.warning('%d of %d prompts have more than model.context_len=%d tokens and were '
                    'truncated to it', truncated, len(prompts), length)
  return states, mask


def attends_padding(config) -> bool:
  """Whether the model sees the encoder's states at padding positions (text.pad_tokens
  'attend'; config_lib.apply_pretrained turns 'auto' into 'attend' for model.pretrained) rather
  than zeros masked out ('mask', and 'auto' otherwise)."""
  return config.text.get('pad_tokens', 'auto') == 'attend'


def conds(config, encoder, prompts: Sequence[str]) -> dict:
  """The text condition dict {'context': [N, L, D], 'context_mask': [N, L]} of `prompts`."""
  states, mask = encode(config, encoder, prompts)
  return {'context': states, 'context_mask': mask}


def null(config, encoder) -> Tuple[np.ndarray, np.ndarray]:
  """The empty prompt's (states [L, D], mask [L]): the null condition of guidance."""
  states, mask = encode(config, encoder, [''])
  return states[0], mask[0]


class CaptionCache:
  """A split's captions: their token states on disk and each example's caption ids.

  Attributes:
    folder: where states.npy (float32 [U, L, D]), mask.npy (bool [U, L]) and captions.json are.
    captions: the U distinct captions; captions[0] = ''.
    offsets, ids: example i's captions are ids[offsets[i]:offsets[i + 1]] (int32, >= 1 each).
  Pickles without the arrays (grain workers reopen the memory maps).
  """

  def __init__(self, folder: str, captions: Sequence[str], per_example: Sequence[Sequence[int]]):
    self.folder = folder
    self.captions = tuple(captions)
    self.offsets = np.cumsum([0] + [len(c) for c in per_example]).astype(np.int64)
    self.ids = np.fromiter((i for c in per_example for i in c), np.int32,
                           count=int(self.offsets[-1]))
    self._arrays = None

  def __len__(self):
    return len(self.offsets) - 1

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_arrays'] = None
    return state

  def _open(self):
    if self._arrays is None:
      self._arrays = (np.load(os.path.join(self.folder, 'states.npy'), mmap_mode='r'),
                      np.load(os.path.join(self.folder, 'mask.npy'), mmap_mode='r'))
    return self._arrays

  def example_ids(self, index: int) -> np.ndarray:
    """The caption ids of example `index`, int32 [k >= 1]."""
    return self.ids[self.offsets[index]:self.offsets[index + 1]]

  def rows(self, caption_ids) -> dict:
    """{'context': float32 [b, L, D], 'context_mask': bool [b, L]} of caption ids [b]."""
    states, mask = self._open()
    caption_ids = np.asarray(caption_ids)
    return {'context': np.asarray(states[caption_ids], np.float32),
            'context_mask': np.asarray(mask[caption_ids], bool)}

  @property
  def null(self) -> Tuple[np.ndarray, np.ndarray]:
    """The empty prompt's (states [L, D], mask [L]) (row 0)."""
    row = self.rows([0])
    return row['context'][0], row['context_mask'][0]

  @property
  def multiple(self) -> bool:
    """Whether some example has more than one caption (one is then picked per step)."""
    return bool(np.any(np.diff(self.offsets) > 1))


def cache_dir(config, workdir: str) -> str:
  return os.path.expanduser(config.text.cache_dir) or os.path.join(workdir, 'text_cache')


def build_cache(config, workdir: str, split: Optional[str] = None,
                encoder=None) -> CaptionCache:
  """The CaptionCache of the split (default data.split), encoding what is not on disk yet.

  Every process computes the same folder name; the first to finish moves its files in
  atomically and the others use them, so a shared workdir is safe.

  Raises:
    ValueError: the dataset has no captions (data.sources.captions_of), or the encoder's width
      is not model.context_dim.
  """
  per_example = sources.captions_of(config, split)
  distinct = [''] + sorted({c for caps in per_example for c in caps} - {''})
  index = {c: i for i, c in enumerate(distinct)}
  ids = [[index[c] for c in caps] for caps in per_example]
  parts = [CACHE_VERSION, config.text.encoder, config.model.context_len, distinct]
  if attends_padding(config):  # appended only then: the 'mask' caches keep their names
    parts.append('attend_padding')
  key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
  folder = os.path.join(cache_dir(config, workdir), key[:16])
  if os.path.isfile(os.path.join(folder, 'mask.npy')):
    logging.info('text cache: %d distinct captions of %d examples, read from %s',
                 len(distinct), len(per_example), folder)
    return CaptionCache(folder, distinct, ids)
  encoder = encoder or load_encoder(config)
  logging.info('text cache: encoding %d distinct captions of %d examples with %s into %s',
               len(distinct), len(per_example), config.text.encoder, folder)
  states, mask = encode(config, encoder, distinct)
  tmp = f'{folder}.tmp{os.getpid()}'
  os.makedirs(tmp, exist_ok=True)
  np.save(os.path.join(tmp, 'states.npy'), states)
  with open(os.path.join(tmp, 'captions.json'), 'w', encoding='utf-8') as f:
    json.dump({'encoder': config.text.encoder, 'context_len': config.model.context_len,
               'captions': distinct}, f, ensure_ascii=False, indent=0)
  np.save(os.path.join(tmp, 'mask.npy'), mask)  # last: its presence marks a complete folder
  try:
    os.rename(tmp, folder)
  except OSError:  # another process got there first with the same content
    if not os.path.isfile(os.path.join(folder, 'mask.npy')):
      raise
    for name in os.listdir(tmp):
      os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)
  return CaptionCache(folder, distinct, ids)


def read_prompts_file(path: str) -> List[str]:
  """The non-empty lines of a prompts file, stripped."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.sampling.prompts_file={path!r}: no such file')
  with open(path, encoding='utf-8') as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f'config.sampling.prompts_file={path!r} holds no prompt (one per line)')
  return prompts


def dataset_prompts(config, n: int, split: Optional[str] = None) -> List[str]:
  """The first caption of each of the split's first n examples (cycled when n is larger)."""
  prompts = [caps[0] for caps in sources.captions_of(config, split, limit=n)]
  return [prompts[i % len(prompts)] for i in range(n)]


def sampling_prompts(config, n: int, split: Optional[str] = None) -> List[str]:
  """The prompts of n samples: sampling.prompt for all, else sampling.prompts_file's lines
  cycled, else `dataset_prompts`."""
  s = config.sampling
  if s.prompt:
    return [s.prompt] * n
  if s.prompts_file:
    prompts = read_prompts_file(s.prompts_file)
    return [prompts[i % len(prompts)] for i in range(n)]
  return dataset_prompts(config, n, split)
