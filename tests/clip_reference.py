"""Rebuilds the small CLIP checkpoints of tests/data/clip_reference.npz as Hugging Face folders.

The reference (written by evaluation/check_text_encoders.py --write-reference) holds a small
random CLIPModel's weights as float16 (the values are float16-exact), its config.json, the tiny
vocabulary's vocab.json / merges.txt and transformers' tokenizer.json for it, and inputs with
transformers' outputs.
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file

PATH = os.path.join(os.path.dirname(__file__), 'data', 'clip_reference.npz')


def load():
  """The reference as a dict of numpy arrays (strings as 0-d str arrays)."""
  with np.load(PATH) as f:
    return {k: f[k] for k in f.files}


def weights(ref):
  """torch key -> float32 array of the CLIPModel."""
  return {k[2:]: v.astype(np.float32) for k, v in ref.items() if k.startswith('w/')}


def _write(folder, config, state, files):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config if isinstance(config, str) else json.dumps(config))
  save_file(state, os.path.join(folder, 'model.safetensors'))
  for name, text in files.items():
    with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
      f.write(text)
  return folder


def write_clip_model(ref, folder, state=None):
  """CLIPModel layout: nested config, 'text_model.' / 'vision_model.' keys, vocab + merges."""
  return _write(folder, str(ref['config']), weights(ref) if state is None else state,
                {'vocab.json': str(ref['vocab']), 'merges.txt': str(ref['merges'])})


def write_clip_text(ref, folder, state=None):
  """transformers 5 CLIPTextModel layout: flat config, keys without 'text_model.', no
  projection, tokenizer.json."""
  if state is None:
    state = {k[len('text_model.'):]: v for k, v in weights(ref).items()
             if k.startswith('text_model.')}
  return _write(folder, str(ref['text_config']), state,
                {'tokenizer.json': str(ref['tokenizer_json'])})
