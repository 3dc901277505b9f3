"""CLIP's text and vision transformers (Hugging Face `CLIPModel` layout) in Flax.

One implementation for both users: `models.text_encoders` (the text tower as a diffusion
conditioning encoder) and `evaluation.clip` (both towers for CLIP score).

Pre-norm layers, as in CLIP:
  x = x + out_proj(Attention(LN1(x)));  x = x + fc2(act(fc1(LN2(x))))
Text: token + learned position embeddings (77 positions), causal self-attention, final
LayerNorm; the pooled state is the one at the first end-of-text token (legacy configs with
eos_token_id == 2 take the argmax of the ids instead, as transformers does: in OpenAI's vocab the
end-of-text token has the highest id). Vision: a stride-p p x p patch conv (no bias), a learned
class token, position embeddings, `pre_layrnorm` (transformers' spelling), the layers, and
`post_layernorm` on the class token. Projections are bias-free linears.

Without an attention mask, as Stable Diffusion runs it: the causal mask alone keeps every real
token (and the pooled end-of-text state) independent of the padding after it, so a padding mask
would change only the states at padded positions.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import hf_port


def _fields(cls, config: Dict[str, Any]) -> Dict[str, Any]:
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in config.items() if k in names}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """CLIPTextConfig fields (transformers' defaults: the ViT-B/32 text tower)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407

  @classmethod
  def from_hf(cls, config: Dict[str, Any]) -> 'TextConfig':
    config = dict(config)
    if isinstance(config.get('eos_token_id'), (list, tuple)):
      config['eos_token_id'] = config['eos_token_id'][0]
    return cls(**_fields(cls, config))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIPVisionConfig fields (transformers' defaults: ViT-B/32 at 224 px)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_hf(cls, config: Dict[str, Any]) -> 'VisionConfig':
    return cls(**_fields(cls, config))


# ------------------------------------------------------------------------------------ modules


class EncoderLayer(nn.Module):
  """One pre-norm layer: [B, L, D] -> [B, L, D]; `bias` as in `hf_port.attention`."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  act: str
  eps: float

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    d = self.hidden_size
    h = hf_port.layer_norm(self.eps, 'layer_norm1')(x)
    q, k, v = (hf_port.dense(d, n)(h) for n in ('q_proj', 'k_proj', 'v_proj'))
    x = x + hf_port.dense(d, 'out_proj')(hf_port.attention(q, k, v, self.num_heads, bias))
    h = hf_port.layer_norm(self.eps, 'layer_norm2')(x)
    h = hf_port.activation(self.act)(hf_port.dense(self.intermediate_size, 'fc1')(h))
    return x + hf_port.dense(d, 'fc2')(h)


def _layers(c, x, bias):
  for i in range(c.num_hidden_layers):
    x = EncoderLayer(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.hidden_act,
                     c.layer_norm_eps, name=f'layers_{i}')(x, bias)
  return x


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """[B] index of the pooled token: the first `eos_token_id` (argmax of ids if it is 2)."""
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class TextTransformer(nn.Module):
  """CLIP text tower: ids int [B, L] (L <= max_position_embeddings) ->
  (last_hidden_state float32 [B, L, D] after the final LayerNorm, pooled float32 [B, D])."""
  config: TextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> Tuple[jax.Array, jax.Array]:
    c = self.config
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f'{length} tokens > max_position_embeddings {c.max_position_embeddings}')
    x = (nn.Embed(c.vocab_size, c.hidden_size, name='token_embedding')(input_ids) +
         nn.Embed(c.max_position_embeddings, c.hidden_size,
                  name='position_embedding')(jnp.arange(length))[None])
    causal = jnp.tril(jnp.ones((length, length), bool))
    x = _layers(c, x, jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)[None, None])
    x = hf_port.layer_norm(c.layer_norm_eps, 'final_layer_norm')(x)
    pooled = x[jnp.arange(x.shape[0]), eos_positions(input_ids, c.eos_token_id)]
    return x, pooled


class VisionTransformer(nn.Module):
  """CLIP vision tower: normalized pixels float32 [B, S, S, C] (S = image_size, NHWC) ->
  (last_hidden_state [B, 1 + (S/p)^2, D] before post_layernorm, pooled [B, D] after it)."""
  config: VisionConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> Tuple[jax.Array, jax.Array]:
    c = self.config
    if pixel_values.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f'pixels {pixel_values.shape} need {c.image_size}x{c.image_size} '
                       '(no position-embedding interpolation; preprocess first)')
    p = c.patch_size
    x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding='VALID', use_bias=False,
                precision=hf_port.PRECISION, name='patch_embedding')(pixel_values)
    x = x.reshape(x.shape[0], -1, c.hidden_size)  # row-major patches, as torch's flatten(2)
    cls = self.param('class_embedding', nn.initializers.normal(0.02), (c.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.hidden_size)), x], axis=1)
    x = x + nn.Embed(x.shape[1], c.hidden_size, name='position_embedding')(
        jnp.arange(x.shape[1]))[None]
    x = hf_port.layer_norm(c.layer_norm_eps, 'pre_layrnorm')(x)
    x = _layers(c, x, None)
    return x, hf_port.layer_norm(c.layer_norm_eps, 'post_layernorm')(x[:, 0])


class CLIPText(nn.Module):
  """Text tower with an optional projection (CLIPTextModel / CLIPTextModelWithProjection).

  __call__(ids [B, L]) -> (last_hidden_state [B, L, D], pooled [B, D], embeds [B, P]):
  embeds = text_projection(pooled) if projection_dim > 0, else pooled itself (P = D).
  """
  text: TextConfig
  projection_dim: int = 0

  @nn.compact
  def __call__(self, input_ids):
    last, pooled = TextTransformer(self.text, name='text_model')(input_ids)
    if not self.projection_dim:
      return last, pooled, pooled
    return last, pooled, hf_port.dense(self.projection_dim, 'text_projection', False)(pooled)


class CLIP(nn.Module):
  """Both towers, projections and the logit scale (transformers' CLIPModel).

  `text_features(ids [B, L])` and `image_features(pixels [B, S, S, C])` give the projected,
  unnormalized [B, projection_dim] embeddings (get_text_features / get_image_features);
  `text_outputs(ids)` also the last hidden state and pooled state.
  """
  text: TextConfig
  vision: VisionConfig
  projection_dim: int = 512

  def setup(self):
    self.text_model = TextTransformer(self.text)
    self.vision_model = VisionTransformer(self.vision)
    self.text_projection = hf_port.dense(self.projection_dim, None, False)
    self.visual_projection = hf_port.dense(self.projection_dim, None, False)
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(2.6592), ())

  def text_outputs(self, input_ids):
    last, pooled = self.text_model(input_ids)
    return last, pooled, self.text_projection(pooled)

  def text_features(self, input_ids):
    return self.text_outputs(input_ids)[2]

  def image_features(self, pixel_values):
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def __call__(self, input_ids, pixel_values):
    """(text features, image features, logit_scale); used to initialise both towers."""
    return self.text_features(input_ids), self.image_features(pixel_values), self.logit_scale


# ------------------------------------------------------------------------------- key mapping


def _layer_entries(t: str, f: Tuple[str, ...], n: int) -> List[hf_port.Entry]:
  out = []
  for i in range(n):
    tl, fl = f'{t}encoder.layers.{i}.', f + (f'layers_{i}',)
    out += hf_port.norm(tl + 'layer_norm1', fl + ('layer_norm1',))
    for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      out += hf_port.linear(tl + 'self_attn.' + name, fl + (name,))
    out += (hf_port.norm(tl + 'layer_norm2', fl + ('layer_norm2',)) +
            hf_port.linear(tl + 'mlp.fc1', fl + ('fc1',)) +
            hf_port.linear(tl + 'mlp.fc2', fl + ('fc2',)))
  return out


def text_entries(c: TextConfig, t: str = 'text_model.') -> List[hf_port.Entry]:
  """Entries of the text tower, torch key prefix `t`, Flax ('text_model',)."""
  f = ('text_model',)
  return (hf_port.embedding(t + 'embeddings.token_embedding', f + ('token_embedding',)) +
          hf_port.embedding(t + 'embeddings.position_embedding', f + ('position_embedding',)) +
          _layer_entries(t, f, c.num_hidden_layers) +
          hf_port.norm(t + 'final_layer_norm', f + ('final_layer_norm',)))


def vision_entries(c: VisionConfig) -> List[hf_port.Entry]:
  """Entries of the vision tower, torch prefix 'vision_model.', Flax ('vision_model',)."""
  t, f = 'vision_model.', ('vision_model',)
  return ([(f + ('class_embedding',), t + 'embeddings.class_embedding', 'copy'),
           (f + ('patch_embedding', 'kernel'), t + 'embeddings.patch_embedding.weight', 'conv')] +
          hf_port.embedding(t + 'embeddings.position_embedding', f + ('position_embedding',)) +
          hf_port.norm(t + 'pre_layrnorm', f + ('pre_layrnorm',)) +
          _layer_entries(t, f, c.num_hidden_layers) +
          hf_port.norm(t + 'post_layernorm', f + ('post_layernorm',)))


def text_shapes(text: TextConfig, projection_dim: int = 0) -> Any:
  """'params' of CLIPText as ShapeDtypeStructs."""
  ids = jnp.zeros((1, 2), jnp.int32)
  return jax.eval_shape(
      lambda: CLIPText(text, projection_dim).init(jax.random.key(0), ids))['params']


def clip_shapes(text: TextConfig, vision: VisionConfig, projection_dim: int) -> Any:
  """'params' of CLIP as ShapeDtypeStructs."""
  ids = jnp.zeros((1, 2), jnp.int32)
  pixels = jnp.zeros((1, vision.image_size, vision.image_size, vision.num_channels))
  return jax.eval_shape(lambda: CLIP(text, vision, projection_dim).init(
      jax.random.key(0), ids, pixels))['params']


# ----------------------------------------------------------------------------------- folders


def read_config(folder: str) -> Dict[str, Any]:
  """A CLIP folder's config.json: {'model_type', 'text', 'vision' (None for text-only),
  'projection_dim'} for model_type 'clip' (nested configs) or 'clip_text_model' (flat)."""
  config = hf_port.read_json(folder)
  kind = config.get('model_type')
  if kind == 'clip':
    text = config.get('text_config') or config.get('text_config_dict') or {}
    vision = config.get('vision_config') or config.get('vision_config_dict') or {}
    return {'model_type': kind, 'text': TextConfig.from_hf(text),
            'vision': VisionConfig.from_hf(vision),
            'projection_dim': int(config.get('projection_dim', 512))}
  if kind == 'clip_text_model':
    return {'model_type': kind, 'text': TextConfig.from_hf(config), 'vision': None,
            'projection_dim': int(config.get('projection_dim') or 512)}
  raise ValueError(f'{folder}/config.json: model_type {kind!r}, expected "clip" or '
                   '"clip_text_model"')


def text_prefix(state: Dict[str, np.ndarray]) -> str:
  """'text_model.' if the text tower's keys carry it, else ''.

  transformers 5 saves a CLIPTextModel without the prefix; CLIPModel,
  CLIPTextModelWithProjection and earlier CLIPTextModel checkpoints (Stable Diffusion's
  text_encoder/) have it. Errors then name keys as the file spells them.
  """
  return 'text_model.' if any(k.startswith('text_model.') for k in state) else ''


def load_text(folder: str) -> Tuple[CLIPText, Any]:
  """CLIPText module and float32 numpy params from any CLIP folder (text tower only).

  The projection is loaded when the weights have `text_projection.weight` (CLIPModel,
  CLIPTextModelWithProjection); a plain CLIPTextModel has none.
  """
  config = read_config(folder)
  state = hf_port.load_state(folder)
  projection = config['projection_dim'] if 'text_projection.weight' in state else 0
  entries = text_entries(config['text'], text_prefix(state))
  if projection:
    entries += hf_port.linear('text_projection', ('text_projection',), bias=False)
  params = hf_port.convert(state, entries, text_shapes(config['text'], projection), folder,
                           ignore=('vision_model.', 'visual_projection.', 'logit_scale'))
  return CLIPText(config['text'], projection), params


def load_clip(folder: str) -> Tuple[CLIP, Any]:
  """CLIP module and float32 numpy params from a CLIPModel folder."""
  config = read_config(folder)
  if config['vision'] is None:
    raise ValueError(f'{folder} holds a text-only CLIP ({config["model_type"]}); CLIP score '
                     'needs a CLIPModel folder (vision + text + projections).')
  text, vision, dim = config['text'], config['vision'], config['projection_dim']
  entries = (text_entries(text) + vision_entries(vision) +
             hf_port.linear('text_projection', ('text_projection',), bias=False) +
             hf_port.linear('visual_projection', ('visual_projection',), bias=False) +
             [(('logit_scale',), 'logit_scale', 'copy')])
  params = hf_port.convert(hf_port.load_state(folder), entries, clip_shapes(text, vision, dim),
                           folder)
  return CLIP(text, vision, dim), params


# --------------------------------------------------------------------------------- tokenizer


def _token(value: Any) -> Optional[str]:
  return value.get('content') if isinstance(value, dict) else value


def find_tokenizer_folder(folder: str) -> Optional[str]:
  """First of folder, folder/tokenizer, folder/../tokenizer (diffusers' layout: text_encoder/
  beside tokenizer/) holding tokenizer.json or vocab.json + merges.txt; None if none does."""
  for d in (folder, os.path.join(folder, 'tokenizer'),
            os.path.join(os.path.dirname(os.path.abspath(folder)), 'tokenizer')):
    if os.path.isfile(os.path.join(d, 'tokenizer.json')) or all(
        os.path.isfile(os.path.join(d, n)) for n in ('vocab.json', 'merges.txt')):
      return d
  return None


def load_tokenizer(folder: str, max_length: int = 77):
  """CLIP's tokenizer as a `tokenizers.Tokenizer`, truncating and padding to `max_length`.

  From tokenizer.json when present, else from vocab.json + merges.txt with the pipeline
  transformers' CLIPTokenizer builds from them (NFC, whitespace runs -> one space, lowercase;
  CLIP's split regex; byte-level BPE with the '</w>' end-of-word suffix; <|startoftext|> ...
  <|endoftext|> around the tokens). The pad token is the folder's (special_tokens_map.json or
  tokenizer_config.json: '<|endoftext|>' for SD 1.x, '!' for SD 2.x), '<|endoftext|>' if
  neither names one. Padding to max_length (77) is what Stable Diffusion does.

  Raises:
    FileNotFoundError: no tokenizer files (see `find_tokenizer_folder`).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import Regex, decoders, normalizers  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  d = find_tokenizer_folder(folder)
  if d is None:
    raise FileNotFoundError(f'{folder}: no CLIP tokenizer (tokenizer.json or vocab.json + '
                            'merges.txt here, in tokenizer/ or in ../tokenizer/); pass token '
                            'ids to encode_ids instead.')
  special = {'bos_token': '<|startoftext|>', 'eos_token': '<|endoftext|>',
             'pad_token': '<|endoftext|>', 'unk_token': '<|endoftext|>'}
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    path = os.path.join(d, name)
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        special.update({k: _token(v) for k, v in json.load(f).items()
                        if k in special and _token(v)})
  if os.path.isfile(os.path.join(d, 'tokenizer.json')):
    tok = tokenizers.Tokenizer.from_file(os.path.join(d, 'tokenizer.json'))
  else:
    vocab, merges = tokenizers.models.BPE.read_file(os.path.join(d, 'vocab.json'),
                                                    os.path.join(d, 'merges.txt'))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab, merges, continuing_subword_prefix='', end_of_word_suffix='</w>',
        fuse_unk=False, unk_token=special['unk_token']))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                   r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(sorted({special[k] for k in ('bos_token', 'eos_token', 'pad_token')}))
    tok.post_processor = processors.RobertaProcessing(
        (special['eos_token'], tok.token_to_id(special['eos_token'])),
        (special['bos_token'], tok.token_to_id(special['bos_token'])),
        trim_offsets=False, add_prefix_space=False)
  pad_id = tok.token_to_id(special['pad_token'])
  if pad_id is None:
    raise ValueError(f'{d}: pad token {special["pad_token"]!r} is not in the vocabulary')
  tok.enable_truncation(max_length)
  tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=special['pad_token'])
  return tok
