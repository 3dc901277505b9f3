"""BERT encoder (Hugging Face `BertModel`) in Flax, with its PyTorch key mapping.

Used for sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads, intermediate
1536, exact erf GELU, LayerNorm eps 1e-12, 30522-token vocabulary, 512 positions): 22,713,216
parameters with the pooler (22,565,376 without it).

Post-norm layers, as in BERT:
  x = LayerNorm(x + Dense(Attention(x)));  x = LayerNorm(x + Dense(act(Dense(x))))
Embeddings are word + absolute position + token type (always type 0 here: single sentences),
then LayerNorm. Padding keys get the most negative float32 added to their attention logits,
so a real token's state does not depend on how much padding follows it.
"""

import dataclasses
from typing import Any, Dict, List

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import hf_port


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BertConfig this port uses (sizes in scalars)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'

  @classmethod
  def from_hf(cls, config: Dict[str, Any]) -> 'BertConfig':
    """From a parsed config.json; rejects position embeddings other than 'absolute'."""
    kind = config.get('position_embedding_type', 'absolute')
    if kind != 'absolute':
      raise ValueError(f'BERT position_embedding_type {kind!r} is not supported (absolute only).')
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


class BertLayer(nn.Module):
  """One post-norm transformer layer: [B, L, D] -> [B, L, D]."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    c = self.config
    q, k, v = (hf_port.dense(c.hidden_size, n)(x) for n in ('query', 'key', 'value'))
    a = hf_port.attention(q, k, v, c.num_attention_heads, bias)
    x = hf_port.layer_norm(c.layer_norm_eps, 'attention_norm')(
        x + hf_port.dense(c.hidden_size, 'attention_out')(a))
    h = hf_port.activation(c.hidden_act)(hf_port.dense(c.intermediate_size, 'intermediate')(x))
    return hf_port.layer_norm(c.layer_norm_eps, 'output_norm')(
        x + hf_port.dense(c.hidden_size, 'output')(h))


class BertModel(nn.Module):
  """BERT: token ids -> last hidden states and the (tanh) pooled [CLS] state.

  __call__(input_ids int [B, L], attention_mask bool/int [B, L]) ->
    (last_hidden_state float32 [B, L, D], pooled float32 [B, D]).
  """
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array):
    c = self.config
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f'{length} tokens > max_position_embeddings {c.max_position_embeddings}')
    x = (nn.Embed(c.vocab_size, c.hidden_size, name='word_embeddings')(input_ids) +
         nn.Embed(c.max_position_embeddings, c.hidden_size,
                  name='position_embeddings')(jnp.arange(length))[None] +
         nn.Embed(c.type_vocab_size, c.hidden_size,
                  name='token_type_embeddings')(jnp.zeros_like(input_ids)))
    x = hf_port.layer_norm(c.layer_norm_eps, 'embeddings_norm')(x)
    # As transformers: (1 - mask) * float32 min on the keys, the same for every query and head.
    keep = jnp.asarray(attention_mask, bool)[:, None, None, :]
    bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, name=f'layer_{i}')(x, bias)
    pooled = jnp.tanh(hf_port.dense(c.hidden_size, 'pooler')(x[:, 0]))
    return x, pooled


def entries(config: BertConfig) -> List[hf_port.Entry]:
  """(Flax path, torch key, kind) for every parameter of `BertModel(config)`."""
  out = (hf_port.embedding('embeddings.word_embeddings', ('word_embeddings',)) +
         hf_port.embedding('embeddings.position_embeddings', ('position_embeddings',)) +
         hf_port.embedding('embeddings.token_type_embeddings', ('token_type_embeddings',)) +
         hf_port.norm('embeddings.LayerNorm', ('embeddings_norm',)) +
         hf_port.linear('pooler.dense', ('pooler',)))
  for i in range(config.num_hidden_layers):
    t, f = f'encoder.layer.{i}.', (f'layer_{i}',)
    for name in ('query', 'key', 'value'):
      out += hf_port.linear(t + 'attention.self.' + name, f + (name,))
    out += (hf_port.linear(t + 'attention.output.dense', f + ('attention_out',)) +
            hf_port.norm(t + 'attention.output.LayerNorm', f + ('attention_norm',)) +
            hf_port.linear(t + 'intermediate.dense', f + ('intermediate',)) +
            hf_port.linear(t + 'output.dense', f + ('output',)) +
            hf_port.norm(t + 'output.LayerNorm', f + ('output_norm',)))
  return out


def param_shapes(config: BertConfig) -> Any:
  """The 'params' tree of `BertModel(config)` as ShapeDtypeStructs (no computation)."""
  ids = jnp.zeros((1, 2), jnp.int32)
  return jax.eval_shape(lambda: BertModel(config).init(jax.random.key(0), ids, ids))['params']


def convert(state: Dict[str, Any], config: BertConfig, source: str = 'checkpoint') -> Any:
  """Flax params from a BertModel state dict (keys with or without the 'bert.' prefix).

  The int64 `embeddings.position_ids` buffer is skipped; a pre-training head (`cls.*`) is too.
  """
  if any(k.startswith('bert.') for k in state):
    state = hf_port.strip_prefix(state, 'bert.')
  return hf_port.convert(state, entries(config), param_shapes(config), source,
                         ignore=('cls.',))
