"""Stable Diffusion folders in diffusers' layout, for tests, written without torch.

* `write_tiny(folder)`: a complete, random, tiny pipeline (unet/ a one-level SD U-Net, vae/ as
  models.autoencoder.tiny_config(), text_encoder/ + tokenizer/ as the small CLIP of
  tests/data/clip_reference.npz, scheduler/ and model_index.json as SD 1.5's), from our own Flax
  params through models.save_diffusers_unet and models.autoencoder.save_diffusers.
* `write_sd15_stub(folder)`: SD 1.5's config files with empty weight files: what
  config_lib.validate reads, nothing that loads.
"""

import json
import os

import numpy as np

from tests import clip_reference

# SD 1.5's scheduler/scheduler_config.json (the fields config_lib.apply_pretrained compares).
SCHEDULER = {'_class_name': 'PNDMScheduler', 'beta_schedule': 'scaled_linear',
             'beta_start': 0.00085, 'beta_end': 0.012, 'num_train_timesteps': 1000,
             'prediction_type': 'epsilon', 'set_alpha_to_one': False, 'skip_prk_steps': True,
             'steps_offset': 1}
MODEL_INDEX = {'_class_name': 'StableDiffusionPipeline',
               'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
               'text_encoder': ['transformers', 'CLIPTextModel'],
               'tokenizer': ['transformers', 'CLIPTokenizer'],
               'scheduler': ['diffusers', 'PNDMScheduler']}
TEXT_WIDTH = 64  # the reference CLIP's hidden size: the U-Net's cross_attention_dim


def _json(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f)


def random_params(shapes, seed):
  """Random float32 numpy params for a tree of ShapeDtypeStructs, without compiling an init:
  kernels N(0, 1 / fan_in), biases and embeddings N(0, 0.02^2), norm scales 1 + N(0, 0.02^2).
  Nothing is zero, so every weight matters to the output."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def draw(path, s):
    leaf = path[-1].key
    x = rng.standard_normal(s.shape).astype(np.float32)
    if leaf == 'kernel':
      x = x / np.sqrt(np.prod(s.shape[:-1]))
    else:
      x = (1.0 + 0.02 * x) if leaf == 'scale' else 0.02 * x
    return x.astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_unet(in_channels=4):
  """A one-level SD U-Net (32 channels; cross-attention down, mid and up blocks, 2 heads, 8
  groups) cross-attending to the reference CLIP's states: every kind of SD block, compiled in
  a fraction of configs/shapes_sd_tiny.py's two levels' time on the CPU."""
  from models import sd_unet  # pylint: disable=g-import-not-at-top
  group = sd_unet.default_group()
  group.update(dict(block_out_channels=(32,), layers_per_block=1,
                    down_block_types=(sd_unet.CROSS_DOWN,), up_block_types=(sd_unet.CROSS_UP,),
                    attention_head_dim=2, norm_num_groups=8))
  return sd_unet.create(group, in_channels=in_channels, context_dim=TEXT_WIDTH)


def write_tiny(folder, seed=0):
  """A random tiny Stable Diffusion folder; returns (unet module, its numpy params)."""
  from models import autoencoder  # pylint: disable=g-import-not-at-top
  from models import sd_unet  # pylint: disable=g-import-not-at-top
  unet = tiny_unet()
  params = random_params(sd_unet.param_shapes(unet), seed)
  sd_unet.save_diffusers_unet(os.path.join(folder, 'unet'), unet, params, sample_size=8)

  c = autoencoder.tiny_config()  # 2 levels: 2x down, 4 latent channels, RGB
  c.scaling_factor = 0.5
  vae = autoencoder.create_autoencoder(c)
  autoencoder.save_diffusers(os.path.join(folder, 'vae'), vae,
                             random_params(autoencoder.param_shapes(vae), seed + 1))

  text = clip_reference.write_clip_text(clip_reference.load(), os.path.join(folder, 'text_encoder'))
  os.makedirs(os.path.join(folder, 'tokenizer'), exist_ok=True)  # diffusers' layout: beside it
  os.replace(os.path.join(text, 'tokenizer.json'), os.path.join(folder, 'tokenizer',
                                                                 'tokenizer.json'))
  _json(os.path.join(folder, 'scheduler', 'scheduler_config.json'), SCHEDULER)
  _json(os.path.join(folder, 'model_index.json'), MODEL_INDEX)
  return unet, params


def write_sd15_stub(folder):
  """SD 1.5's config files (UNet2DConditionModel defaults are SD 1.5's but the text width) with
  empty weight files; returns the folder."""
  _json(os.path.join(folder, 'unet', 'config.json'),
        {'_class_name': 'UNet2DConditionModel', 'cross_attention_dim': 768, 'sample_size': 64})
  _json(os.path.join(folder, 'vae', 'config.json'),
        {'_class_name': 'AutoencoderKL', 'in_channels': 3, 'out_channels': 3,
         'block_out_channels': [128, 256, 512, 512], 'latent_channels': 4})
  for sub in ('unet', 'vae'):
    open(os.path.join(folder, sub, 'diffusion_pytorch_model.safetensors'), 'wb').close()
  _json(os.path.join(folder, 'text_encoder', 'config.json'),
        {'model_type': 'clip_text_model', 'hidden_size': 768})
  _json(os.path.join(folder, 'tokenizer', 'tokenizer.json'), {})
  _json(os.path.join(folder, 'scheduler', 'scheduler_config.json'), SCHEDULER)
  return folder
