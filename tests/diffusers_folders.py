"""Stored torch references of the diffusers ports (tests/data/*_reference.npz) and the folders
their loaders read, shared by the VAE and SD U-Net tests."""

import json
import os

import numpy as np
import safetensors.numpy


def load_reference(path):
  """The .npz as a dict, plus 'state' (torch key -> array, from the 'weight/' entries), 'config'
  and 'sd_keys' (decoded from their JSON strings)."""
  with np.load(path) as data:
    ref = {k: data[k] for k in data.files}
  ref['state'] = {k[len('weight/'):]: v for k, v in ref.items() if k.startswith('weight/')}
  ref['config'] = json.loads(str(ref['config_json']))
  ref['sd_keys'] = json.loads(str(ref['sd_keys_json']))
  return ref


def write_folder(folder, config, state, config_name, weights_name):
  """A diffusers model folder: config.json and the safetensors weights."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, config_name), 'w') as f:
    json.dump(config, f)
  safetensors.numpy.save_file(state, os.path.join(folder, weights_name))
  return folder
