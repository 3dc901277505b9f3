"""Pieces for running Hugging Face (PyTorch) transformer checkpoints in Flax.

* `read_json`, `load_state`: a checkpoint folder's config.json and its safetensors weights
  (one `model.safetensors` or the shards a `model.safetensors.index.json` lists), as float32
  numpy arrays read with `safetensors.numpy` (no torch).
* `convert`: builds a Flax params tree from an explicit list of `(flax path, torch key, kind)`
  entries, checking every shape against the module's own (from `jax.eval_shape`) and naming the
  first missing or mismatched torch key; `export` is its inverse (Flax params -> torch keys and
  layouts), for writing a diffusers / transformers folder back.
* `activation`, `attention`, `dense`, `layer_norm`: the transformer arithmetic, in float32 with
  HIGHEST matmul precision so that the ports match PyTorch's float32 results to ~1e-6 on any
  backend (accelerators would otherwise multiply in bf16/tf32).

Layout conversion, PyTorch -> Flax:
  nn.Linear weight [out, in]            -> Dense kernel [in, out]          ('linear')
  nn.Conv2d weight [O, I, kh, kw]       -> Conv kernel [kh, kw, I, O]      ('conv')
  nn.LayerNorm weight / bias            -> LayerNorm scale / bias          ('copy')
  nn.Embedding weight [V, D]            -> Embed embedding [V, D]          ('copy')
"""

import json
import os
from typing import Any, Dict, Iterable, Mapping, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PRECISION = jax.lax.Precision.HIGHEST

# (flax path inside the 'params' tree, torch state-dict key, kind)
Entry = Tuple[Tuple[str, ...], str, str]

# torch layout of a Flax shape, per kind (the inverse of the conversion below)
_TORCH_SHAPE = {
    'linear': lambda s: (s[1], s[0]),
    'conv': lambda s: (s[3], s[2], s[0], s[1]),
    'copy': lambda s: tuple(s),
}
_TO_FLAX = {
    'linear': lambda a: a.T,
    'conv': lambda a: a.transpose(2, 3, 1, 0),
    'copy': lambda a: a,
}
_TO_TORCH = {  # the inverse of _TO_FLAX
    'linear': lambda a: a.T,
    'conv': lambda a: a.transpose(3, 2, 0, 1),
    'copy': lambda a: a,
}


def read_json(folder: str, name: str = 'config.json') -> Dict[str, Any]:
  """Parses `folder/name`; FileNotFoundError naming the file if it is absent."""
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: expected a Hugging Face model folder with '
                            f'{name} and model.safetensors.')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def load_state(folder: str) -> Dict[str, np.ndarray]:
  """All tensors of a folder's safetensors checkpoint, float tensors as float32 numpy arrays.

  Reads `model.safetensors`, or every shard named in `model.safetensors.index.json` (large
  models). Integer buffers (e.g. BERT's `embeddings.position_ids`) are kept as they are.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  single = os.path.join(folder, 'model.safetensors')
  index = single + '.index.json'
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      files = [os.path.join(folder, s) for s in sorted(set(json.load(f)['weight_map'].values()))]
  else:
    raise FileNotFoundError(f'{folder}: no model.safetensors (or its .index.json); only '
                            f'safetensors checkpoints are read (no pytorch_model.bin).')
  state = {}
  for path in files:
    for key, value in load_file(path).items():
      state[key] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  return state


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
  """The entries under `prefix` with it removed (e.g. 'text_model.'), others dropped."""
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def convert(state: Mapping[str, np.ndarray], entries: Iterable[Entry], expected: Any,
            source: str = 'checkpoint', ignore: Iterable[str] = ()) -> Dict[str, Any]:
  """Builds the Flax params tree `expected` describes from a torch state dict.

  Args:
    state: torch key -> numpy array.
    entries: every (flax path, torch key, kind) of the module; kind in 'linear', 'conv', 'copy'.
    expected: the module's params tree of arrays or ShapeDtypeStructs (jax.eval_shape of init).
    source: the checkpoint's name for error messages (its folder).
    ignore: torch-key prefixes that may stay unused (e.g. a tower this module does not have);
      keys ending in 'position_ids' (integer buffers) always may.

  Returns:
    Nested dict of float32 numpy arrays with exactly the structure of `expected`.

  Raises:
    KeyError: a torch key the module needs is absent (the first one, with its expected shape).
    ValueError: a tensor has another shape than the module's (first one, both in torch layout),
      or the checkpoint has tensors no entry reads (a config that does not match the weights,
      e.g. fewer layers).
  """
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected))
  flat, used = {}, set()
  for path, key, kind in entries:
    shape = tuple(want[path].shape)
    torch_shape = _TORCH_SHAPE[kind](shape)
    if key not in state:
      raise KeyError(f'{source}: missing weight {key!r} (shape {torch_shape}, for Flax '
                     f'{"/".join(path)}).')
    value = np.asarray(state[key])
    if value.shape != torch_shape:
      raise ValueError(f'{source}: weight {key!r} has shape {value.shape}, the model built from '
                       f'its config.json expects {torch_shape}.')
    flat[path] = np.asarray(_TO_FLAX[kind](value), np.float32)
    used.add(key)
  if set(flat) != set(want):  # a bug in an entries list, not in a checkpoint
    raise AssertionError(f'entries do not cover the module: {sorted(set(want) ^ set(flat))[:4]}')
  ignore = tuple(ignore)
  # Integer position_ids buffers (older checkpoints save them) are arange(n): nothing to read.
  unused = sorted(k for k in state if k not in used and not k.startswith(ignore) and
                  not k.endswith('position_ids'))
  if unused:
    raise ValueError(f'{source}: {len(unused)} weights are not read by the model its config.json '
                     f'describes, first {unused[0]!r} {np.shape(state[unused[0]])}.')
  return flax.traverse_util.unflatten_dict(flat)


def export(params: Any, entries: Iterable[Entry]) -> Dict[str, np.ndarray]:
  """The inverse of `convert`: a Flax params tree -> the torch state dict `entries` describe
  (float32, contiguous, torch layouts), e.g. for safetensors.numpy.save_file.

  Raises:
    AssertionError: the entries do not cover the params exactly (a bug in an entries list).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(params)))
  state, read = {}, set()
  for path, key, kind in entries:
    state[key] = np.ascontiguousarray(_TO_TORCH[kind](np.asarray(flat[path], np.float32)))
    read.add(path)
  if read != set(flat):
    raise AssertionError(f'entries do not cover the params: {sorted(set(flat) ^ read)[:4]}')
  return state


def linear(prefix: str, flax_path: Tuple[str, ...], bias: bool = True):
  """Entries of one nn.Linear `prefix` (weight, bias) as Flax Dense `flax_path`."""
  out = [(flax_path + ('kernel',), prefix + '.weight', 'linear')]
  if bias:
    out.append((flax_path + ('bias',), prefix + '.bias', 'copy'))
  return out


def norm(prefix: str, flax_path: Tuple[str, ...]):
  """Entries of one nn.LayerNorm `prefix` as Flax LayerNorm `flax_path`."""
  return [(flax_path + ('scale',), prefix + '.weight', 'copy'),
          (flax_path + ('bias',), prefix + '.bias', 'copy')]


def embedding(prefix: str, flax_path: Tuple[str, ...]):
  """Entries of one nn.Embedding `prefix` as Flax Embed `flax_path`."""
  return [(flax_path + ('embedding',), prefix + '.weight', 'copy')]


# ------------------------------------------------------------------------------------ layers


def activation(name: str):
  """The function a Hugging Face `hidden_act` names.

  'gelu' is the exact erf GELU (BERT, OpenCLIP-trained CLIPs); 'quick_gelu' is OpenAI CLIP's
  x * sigmoid(1.702 x); 'gelu_new' / 'gelu_pytorch_tanh' are the tanh approximation.
  """
  table = {
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),
      'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
      'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
      'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
      'relu': jax.nn.relu,
  }
  if name not in table:
    raise ValueError(f'unsupported hidden_act {name!r}; known: {sorted(table)}')
  return table[name]


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
  """nn.Dense in float32 at HIGHEST precision (torch nn.Linear)."""
  return nn.Dense(features, use_bias=use_bias, precision=PRECISION, name=name)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  """nn.LayerNorm with torch's two-pass variance (E[(x - mean)^2], not E[x^2] - mean^2)."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
              bias: jax.Array = None) -> jax.Array:
  """Scaled dot-product attention over heads split from the feature axis.

  Args:
    q, k, v: [B, L, D] projected queries, keys, values (D divisible by num_heads).
    num_heads: heads; each attends with width D / num_heads and scale (D / num_heads)^-0.5.
    bias: additive logits bias broadcastable to [B, heads, L, L] (0 = attend, a large negative
      number = ignore), or None.

  Returns:
    [B, L, D] float32, the heads concatenated back in order.
  """
  b, l, d = q.shape
  split = lambda x: x.reshape(b, x.shape[1], num_heads, d // num_heads)
  q, k, v = split(q), split(k), split(v)
  logits = jnp.einsum('bqhc,bkhc->bhqk', q * (d // num_heads) ** -0.5, k, precision=PRECISION)
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhc->bqhc', weights, v, precision=PRECISION).reshape(b, l, d)


def count_params(tree: Any) -> int:
  """Scalars in a params tree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def encode_batch(tokenizer: Any, prompts: Iterable[str]) -> Tuple[np.ndarray, np.ndarray]:
  """Runs a `tokenizers.Tokenizer` (truncation and padding already enabled) on prompts.

  Returns:
    (input_ids int32 [B, L], attention_mask bool [B, L]), L as the tokenizer's padding sets.
  """
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise TypeError(f'expected a non-empty list of str prompts, got {prompts!r:.80}')
  encodings = tokenizer.encode_batch(prompts)
  ids = np.asarray([e.ids for e in encodings], np.int32)
  mask = np.asarray([e.attention_mask for e in encodings], bool)
  return ids, mask
