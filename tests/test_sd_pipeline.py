"""Stable Diffusion as a pipeline and a fine-tuning start point: config.model.pretrained.

A random tiny SD folder in diffusers' layout (tests/sd_folder.py, written without torch through
models.save_diffusers_unet and models.autoencoder.save_diffusers) stands in for
stable-diffusion-v1-5: --mode sample through main.py samples its weights with no checkpoint,
training starts from them (params and EMA) and resumes from its own checkpoint, and sampling
that workdir afterwards uses the checkpoint. The config-time fill and checks run without jax
compiling anything.
"""

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

import config_lib
import experiment
import models
import train_lib
from models import sd_unet
from tests import main_runner
from tests import sd_folder

PROMPTS = ('--config.sampling.prompt=a red circle',
           '--config.sampling.negative_prompt=a blue square')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('sd') / 'stable-diffusion-tiny')
  unet, params = sd_folder.write_tiny(path)
  return path, unet, params


@pytest.fixture(scope='module')
def config_file(folder, tmp_path_factory):
  """shapes_sd_tiny at 16x16 pixels (8x8x4 latents) with SD's schedule and the folder."""
  path = tmp_path_factory.mktemp('cfg') / 'sd_tiny_pretrained.py'
  path.write_text(f'''from configs import shapes_sd_tiny


def get_config():
  c = shapes_sd_tiny.get_config()
  c.model.pretrained = {folder[0]!r}
  c.data.image_size = 16
  c.data.split = 'train[:16]'
  c.model.context_len = 77
  c.latent.factor, c.latent.channels = 2, 4
  c.diffusion.schedule, c.diffusion.num_timesteps = 'scaled_linear', 1000
  c.diffusion.beta_start, c.diffusion.beta_end, c.diffusion.prediction = 0.00085, 0.012, 'eps'
  c.optim.warmup_steps = 2  # lr 0 at step 0: the first update leaves the params as loaded
  c.training.batch_size, c.training.num_steps = 8, 2
  c.training.log_every = c.training.checkpoint_every = 1
  c.training.sample_every, c.training.ema_rate = 0, 0.5
  c.sampling.clip_x0 = False
  c.sampling.sampler, c.sampling.num_steps, c.sampling.guidance_scale = 'ddim', 3, 3.0
  c.sampling.num_samples = c.sampling.batch_size = 8
  return c
''')
  return str(path)


def _sample(config, workdir, *overrides):
  """--mode sample through main.py (in-process); the paths of the files it wrote."""
  shutil.rmtree(os.path.join(workdir, 'samples'), ignore_errors=True)
  main_runner.run_main(config, workdir, *overrides, mode='sample')
  return sorted(glob.glob(os.path.join(workdir, 'samples', '*')))


def _group(fields):
  """A config.sd_unet group holding `fields` (config_lib.sd_unet_fields' output)."""
  group = sd_unet.default_group()
  with group.ignore_type():
    group.update(fields)
  return group


def _logged(caplog):
  return '\n'.join(r.getMessage() for r in caplog.records)


def test_the_folder_defines_the_model_at_config_time(folder, config_file, tmp_path):
  path, unet, _ = folder
  config = config_lib.load_config_file(config_file)
  assert (config.sd_unet.cross_attention_dim, config.model.context_dim) == (0, 384)
  changes = config_lib.apply_pretrained(config)
  assert 'model.context_dim: 384 -> 64' in changes and 'sd_unet.in_channels: 0 -> 4' in changes
  assert 'sd_unet.block_out_channels: (32, 64) -> (32,)' in changes  # the folder's U-Net wins
  assert config.latent.autoencoder == os.path.join(path, 'vae')
  assert config.text.encoder == os.path.join(path, 'text_encoder')
  assert config.text.pad_tokens == 'attend'
  config_lib.validate(config)
  assert config_lib.apply_pretrained(config) == []  # idempotent
  assert not sd_unet.architecture_differences(models.create_model(config), unet)
  assert models.input_shape(config) == (8, 8, 4)

  # config_lib's reading of a unet/config.json is models/sd_unet.py's (defaults included).
  for cfg in (sd_unet.diffusers_config(unet), sd_unet.SD15, {'cross_attention_dim': 768},
              {**sd_unet.SD15, 'attention_head_dim': [5, 10, 20, 20],
               'use_linear_projection': True, 'cross_attention_dim': [1024] * 4}):
    mine = sd_unet.create(_group(config_lib.sd_unet_fields(cfg)))
    assert not sd_unet.architecture_differences(
        mine, sd_unet.create(sd_unet.config_from_diffusers(cfg))), cfg

  assert config_lib.UNET_WEIGHTS == (sd_unet.WEIGHTS_NAME,) + sd_unet._OTHER_WEIGHTS

  # The memory options reach the loaded U-Net: bf16 compute and remat, float32 params.
  config.model.dtype, config.model.remat = 'bfloat16', True
  module = models.create_model(config)
  loaded, params = models.load_diffusers_unet(os.path.join(path, 'unet'), module=module)
  assert loaded is module and (module.dtype, module.remat) == ('bfloat16', True)
  assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype('float32')}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), folder[2])
  config.model.dtype, config.model.remat = 'float32', False

  # SD 2.x-style per-block heads and linear projections over the int defaults; the filled config
  # survives its config.json (a resumed run reads it back).
  sd2 = tmp_path / 'sd2'
  shutil.copytree(path, sd2)
  cfg = {**sd_unet.diffusers_config(unet), 'attention_head_dim': [2, 4],
         'block_out_channels': [32, 64], 'down_block_types': [sd_unet.CROSS_DOWN] * 2,
         'up_block_types': [sd_unet.CROSS_UP] * 2, 'use_linear_projection': True}
  (sd2 / 'unet' / 'config.json').write_text(json.dumps(cfg))
  other = config_lib.load_config_file(config_file)
  other.model.pretrained = str(sd2)
  config_lib.validate(other)
  assert other.sd_unet.attention_head_dim == (2, 4) and other.sd_unet.use_linear_projection
  assert other.sd_unet.block_out_channels == (32, 64)
  again = config_lib.from_dict(config_lib.to_dict(other))
  assert config_lib.diff(config_lib.to_dict(again), config_lib.to_dict(other)) == []
  assert models.create_model(other).num_attention_heads == (2, 4)

  # A config.sd_unet changed after the fill: the loader names the field and both values.
  config.sd_unet.layers_per_block = 2
  with pytest.raises(config_lib.ConfigError,
                     match=r'config\.sd_unet differs from .*unet/config\.json \(config vs '
                     r'folder\): sd_unet\.layers_per_block: \(2,\) vs \(1,\)'):
    experiment.pretrained_params(config)


def test_config_errors_name_the_folder_and_the_field(folder, config_file, tmp_path):
  path = folder[0]
  broken = str(tmp_path / 'sd')
  shutil.copytree(path, broken)
  shutil.rmtree(os.path.join(broken, 'text_encoder'))

  def validate(**overrides):
    config = config_lib.load_config_file(config_file)
    for k, v in overrides.items():
      config_lib.set_field(config, k, v)
    config_lib.validate(config)

  with pytest.raises(config_lib.ConfigError, match=r'model\.pretrained.*text_encoder has no '
                     r'config\.json.*unet/, vae/, text_encoder/'):
    validate(**{'model.pretrained': broken})
  validate(**{'model.pretrained': broken, 'text.encoder': os.path.join(path, 'text_encoder')})
  os.remove(os.path.join(broken, 'unet', sd_unet.WEIGHTS_NAME))
  with pytest.raises(config_lib.ConfigError, match='unet has no U-Net weights'):
    validate(**{'model.pretrained': broken})
  with pytest.raises(config_lib.ConfigError, match='is not a folder'):
    validate(**{'model.pretrained': str(tmp_path / 'nowhere')})
  with pytest.raises(config_lib.ConfigError, match="model.pretrained.*model.name='sd_unet'"):
    validate(**{'model.name': 'unet'})
  with pytest.raises(config_lib.ConfigError, match=r"diffusion\.prediction: 'v'.*'epsilon'"):
    validate(**{'diffusion.prediction': 'v'})
  with pytest.raises(config_lib.ConfigError, match='latent.channels'):
    validate(**{'latent.autoencoder': os.path.join(path, 'vae'), 'latent.channels': 8})


def test_sample_the_folder_without_a_checkpoint(folder, config_file, tmp_path, caplog):
  """--mode sample with a prompt and a negative prompt: the folder's three networks, no
  checkpoint (named pretrained_...)."""
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.INFO, logger='absl'):
    files = _sample(config_file, workdir, *PROMPTS)
  assert 'no checkpoint in' in _logged(caplog) and 'pretrained U-Net' in _logged(caplog)
  names = [os.path.basename(f) for f in files]
  npz = [f for f in files if f.endswith('.npz')]
  assert len(npz) == 1 and os.path.basename(npz[0]).startswith('pretrained_ddim_3steps')
  assert os.path.basename(npz[0]).replace('.npz', '.png') in names
  out = np.load(npz[0])
  assert out['images'].shape == (8, 16, 16, 3) and out['images'].dtype == np.uint8
  assert len(np.unique(out['images'])) > 8  # decoded from latents, not a constant
  assert list(out['prompts']) == ['a red circle'] * 8


def test_training_starts_from_the_folder_and_resumes_from_its_checkpoint(folder, config_file,
                                                                        tmp_path, caplog):
  path, _, params = folder
  config = config_lib.load_config_file(config_file)
  workdir = str(tmp_path / 'finetune')
  with caplog.at_level(logging.INFO, logger='absl'):
    state = train_lib.train(config, workdir, stop_after=1)
  assert 'initialised from' in _logged(caplog)
  assert int(state.step) == 1
  # Step 0 ran at lr 0 (the warm-up's start): the params are still exactly the folder's, and the
  # EMA started from them too.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(state.ema_params), params)

  # The resumed run restores its checkpoint: the folder's U-Net, changed meanwhile, is not read.
  weights = os.path.join(path, 'unet', sd_unet.WEIGHTS_NAME)
  original = safetensors.numpy.load_file(weights)
  try:
    safetensors.numpy.save_file({k: v + 1.0 for k, v in original.items()}, weights)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='absl'):
      state = train_lib.train(config, workdir)
    assert 'resumed from' in _logged(caplog) and 'only started it' in _logged(caplog)
  finally:
    safetensors.numpy.save_file(original, weights)
  assert int(state.step) == 2
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(state.params),
                       params)
  assert 0 < max(jax.tree.leaves(moved)) < 0.1

  # Sampling this workdir: the fine-tuned checkpoint wins over the folder, and says so (here
  # with DPM-Solver++ and bfloat16 compute over the float32 params).
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='absl'):
    files = _sample(config_file, workdir, *PROMPTS,
                    '--config.sampling.sampler=dpm_solver_pp_2m', '--config.model.dtype=bfloat16')
  assert 'using the checkpoint at step 2' in _logged(caplog)
  npz = [f for f in files if f.endswith('.npz')]
  assert os.path.basename(npz[0]).startswith('step_0000002_dpm_solver_pp_2m')
  assert np.load(npz[0])['images'].shape == (8, 16, 16, 3)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['model']['pretrained'] == path and saved['model']['context_dim'] == 64
