"""Latent diffusion: a frozen autoencoder folder between the pixels and the diffusion model."""

import os

import jax
import numpy as np
import pytest

import config_lib
import experiment
import latent_space
import models
import sample_lib
import train_lib
from models import autoencoder
from tests.tiny import tiny_config


def _vae_folder(path, latent_channels=4):
  """A random 2-level (2x down) autoencoder for 1-channel images, written as diffusers does."""
  c = autoencoder.tiny_config()
  c.in_channels = c.out_channels = 1
  c.latent_channels = latent_channels
  c.scaling_factor = 0.5
  module = autoencoder.create_autoencoder(c)
  params = autoencoder.init_params(module, jax.random.key(0))
  autoencoder.save_diffusers(str(path), module, params)
  return module, params


def test_save_diffusers_then_load_is_the_identity(tmp_path):
  module, params = _vae_folder(tmp_path)
  loaded_module, loaded = autoencoder.load_diffusers(str(tmp_path))
  assert loaded_module.latent_channels == 4 and loaded_module.scaling_factor == 0.5
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))


def _latent_config(folder, **kw):
  return tiny_config(**{'latent.autoencoder': str(folder), 'latent.factor': 2,
                        'sampling.clip_x0': False, 'model.attn_resolutions': (), **kw})


def test_the_model_denoises_latents_and_sampling_decodes_them(tmp_path):
  _vae_folder(tmp_path / 'vae')
  config = _latent_config(tmp_path / 'vae')
  config_lib.validate(config)
  assert models.input_shape(config) == (4, 4, 4)  # 8x8 pixels, 2x down, 4 channels
  latent = latent_space.load(config)
  assert latent.scale == 0.5
  images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  z = latent.encode(latent.params, images, jax.random.key(1))
  assert z.shape == (3, 4, 4, 4)
  # The map is z_model = z * scale: decoding undoes the scale before the decoder.
  post = latent.module.apply({'params': latent.params}, images, method='encode')
  np.testing.assert_allclose(
      np.asarray(latent_space.LatentSpace(latent.module, latent.params, 0.5,
                                          sample_posterior=False).encode(latent.params, images,
                                                                         None)),
      np.asarray(post[0]) * 0.5, rtol=1e-6)
  direct = latent.module.apply({'params': latent.params}, z / 0.5, method='decode')
  np.testing.assert_allclose(np.asarray(latent.decode(latent.params, z)), np.asarray(direct),
                             rtol=1e-6)

  workdir = str(tmp_path / 'run')
  state = train_lib.train(config, workdir)
  assert int(state.step) == config.training.num_steps
  # Killed at step 3 and rerun: the posterior noise is keyed by the step, the scale comes from
  # the folder, so the resumed run ends bit for bit where the uninterrupted one did.
  train_lib.train(config, str(tmp_path / 'split'), stop_after=3)
  resumed = train_lib.train(config, str(tmp_path / 'split'))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
               jax.device_get(state.params))
  model = experiment.model(config)
  out = sample_lib.sample_images(config, model, experiment.schedule(config), state.ema_params, 4,
                                 seed=0)
  assert out.shape == (4, 8, 8, 1) and out.dtype == np.uint8
  assert len(np.unique(out)) > 4  # decoded images, not a constant


@pytest.mark.parametrize('override,field', [
    ({'latent.autoencoder': '/no/such/vae'}, 'latent.autoencoder'),
    ({'sampling.clip_x0': True}, 'sampling.clip_x0'),
    ({'sampling.cond_image': 'x.png'}, 'sampling.cond_image'),
    ({'latent.scale_by_std': True, 'latent.scale_factor': 0.2}, 'latent.scale_by_std'),
    ({'latent.cache': True, 'data.random_flip': True}, 'data.random_flip'),
    ({'data.image_size': 6}, 'data.image_size'),  # 2x down: the latent side 3 has no 2 levels
    ({'latent.factor': 8}, 'latent.factor'),  # the folder's VAE downsamples 2x
    ({'latent.channels': 3}, 'latent.channels'),
])
def test_latent_configs_that_cannot_work_fail_naming_the_field(tmp_path, override, field):
  _vae_folder(tmp_path / 'vae')
  config = _latent_config(tmp_path / 'vae')
  for k, v in override.items():
    config_lib.set_field(config, k, v)
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
    config_lib.validate(config)
  assert os.path.isdir(tmp_path / 'vae')


# ----------------------------------------------------------------- img2img and inpainting


def test_latent_mask_is_known_only_where_all_its_pixels_are():
  mask = np.ones((1, 4, 4, 1), np.float32)
  mask[0, 0, 1] = 0  # one unknown pixel in the top-left 2x2 block
  m = np.asarray(latent_space.latent_mask(mask, 2))
  np.testing.assert_array_equal(m[0, ..., 0], [[0, 1], [1, 1]])
  rgb = np.ones((1, 2, 2, 3), np.float32)
  rgb[0, 1, 1, 2] = 0  # one channel unknown: the cell is generated
  np.testing.assert_array_equal(np.asarray(latent_space.latent_mask(rgb, 2))[..., 0], [[[0]]])


class _NoDecode(latent_space.LatentSpace):
  """The sampler's latents themselves, for checks in latent space."""

  def decode(self, params, latents):
    return latents


def _random_model_setup(tmp_path, **kw):
  _vae_folder(tmp_path / 'vae')
  config = _latent_config(tmp_path / 'vae', **{'sampling.num_steps': 4, **kw})
  config_lib.validate(config)
  model = experiment.model(config)
  params = models.init_params(model, config, jax.random.key(3))
  images = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  return config, model, params, images


def test_latent_img2img_at_strength_0_is_the_autoencoders_reconstruction(tmp_path):
  config, model, params, images = _random_model_setup(tmp_path)
  latent = latent_space.load(config)
  out = sample_lib.sample_images(config, model, experiment.schedule(config), params, 4, seed=0,
                                 init_images=images, strength=0.0, latent=latent)
  recon = latent.decode(latent.params, latent.encode_mean(latent.params, images))
  expected = sample_lib.preprocess.to_uint8(np.asarray(recon))
  assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
  # Half way the sampler changes the latents: the output is no longer the reconstruction.
  half = sample_lib.sample_images(config, model, experiment.schedule(config), params, 4, seed=0,
                                  init_images=images, strength=0.5, latent=latent)
  assert np.abs(half.astype(int) - expected.astype(int)).max() > 1


def test_latent_inpainting_keeps_the_known_latents(tmp_path):
  config, model, params, images = _random_model_setup(tmp_path)
  latent = latent_space.load(config)
  images = np.concatenate([images, images[::-1]])  # 8 rows: one per emulated device
  mask = np.ones((8, 8, 8, 1), np.float32)
  mask[:, 2:5, 3:7] = 0  # a hole that covers latent cells partly and wholly
  gen = sample_lib.compile_sampler(
      config, model, experiment.schedule(config), experiment.conditioner(config),
      sample_lib.sharding.make_mesh(), task='inpaint',
      latent=_NoDecode(latent.module, latent.params, latent.scale, latent.shift),
      **sample_lib.sampler_options(config, resample=2))
  z = np.asarray(gen(params, jax.random.key(0), {}, 8, images, mask))
  known = np.asarray(latent.encode_mean(latent.params, images))
  m = np.asarray(latent_space.latent_mask(mask, 2))[..., 0] > 0  # [8, 4, 4]
  assert m.sum() == 8 * 16 - 8 * 6  # the hole's pixels touch 2 x 3 latent cells
  # Exactly the latents the program encoded; the encoder compiled here apart (unsharded) agrees
  # with the one inside the sampler's program to float32 round-off.
  np.testing.assert_allclose(z[m], known[m], rtol=0, atol=1e-5)
  assert np.abs(z[~m] - known[~m]).max() > 0.1  # the hole is generated


def test_latent_inputs_of_the_wrong_shape_name_the_field(tmp_path):
  config, model, params, images = _random_model_setup(tmp_path)
  schedule = experiment.schedule(config)
  with pytest.raises(config_lib.ConfigError, match=r'sampling\.init_image'):
    sample_lib.sample_images(config, model, schedule, params, 4, seed=0,
                             init_images=images[:, :6, :6])
  with pytest.raises(config_lib.ConfigError, match=r'sampling\.mask'):
    sample_lib.sample_images(config, model, schedule, params, 4, seed=0, init_images=images,
                             mask=np.ones((4, 4, 4, 1), np.float32))


# ----------------------------------------------------------------- scale_by_std


def test_scale_by_std_is_fitted_once_saved_and_used_by_resumes_and_hooks(tmp_path):
  import data as data_lib  # pylint: disable=g-import-not-at-top
  _vae_folder(tmp_path / 'vae')
  config = _latent_config(tmp_path / 'vae', **{
      'latent.scale_by_std': True, 'training.num_steps': 4})
  config_lib.validate(config)
  assert latent_space.load(config).scale is None  # not known before the run
  with pytest.raises(config_lib.ConfigError, match=r'latent\.scale_by_std'):
    latent_space.load(config).decode(None, np.zeros((1, 4, 4, 4), np.float32))

  # What the scale must be: 1 / std of step 0's latents of the first batch.
  latent = latent_space.load(config).with_scale(1.0)
  first = next(data_lib.get_dataset(config))['image']
  z = latent.encode(latent.params, first, jax.random.fold_in(latent_space.encoder_key(config), 0))
  expected = 1 / np.std(np.asarray(z, np.float64), ddof=1)

  full = str(tmp_path / 'full')
  # A training hook built before the run (as main.py does) fits and saves the scale: it has it.
  hook = sample_lib.GridHook(config, full)
  saved = latent_space.read_scale(full)
  np.testing.assert_allclose(saved['scale'], expected, rtol=1e-5)
  assert hook._latent.scale == saved['scale']  # pylint: disable=protected-access
  state = train_lib.train(config, full)
  assert latent_space.read_scale(full) == saved  # not refitted
  assert latent_space.load(config, full).scale == saved['scale']  # --mode sample / eval's

  # Killed after step 2 and resumed: the saved scale, so bit for bit the uninterrupted run.
  split = str(tmp_path / 'split')
  train_lib.train(config, split, stop_after=2)
  assert latent_space.read_scale(split)['scale'] == saved['scale']
  resumed = train_lib.train(config, split)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
               jax.device_get(state.params))

  # A run with checkpoints but no saved scale cannot know the value it trained on.
  os.remove(os.path.join(split, latent_space.SCALE_FILE))
  with pytest.raises(config_lib.ConfigError, match=r'latent\.scale_factor=VALUE'):
    latent_space.for_run(config, split)


# ----------------------------------------------------------------- the latent cache


def test_training_from_the_latent_cache_equals_encoding_every_step(tmp_path):
  import latent_cache  # pylint: disable=g-import-not-at-top
  import progress  # pylint: disable=g-import-not-at-top
  _vae_folder(tmp_path / 'vae')
  config = _latent_config(tmp_path / 'vae', **{'training.num_steps': 3,
                                               'training.checkpoint_every': 3})
  cached = _latent_config(tmp_path / 'vae', **{'training.num_steps': 3,
                                               'training.checkpoint_every': 3,
                                               'latent.cache': True})
  config_lib.validate(cached)
  work = str(tmp_path / 'cached')
  with pytest.raises(config_lib.ConfigError, match='cache_latents'):
    train_lib.train(cached, work)
  # A stop between batches leaves nothing behind.
  with pytest.raises(progress.Interrupted):
    latent_cache.build(cached, work, stop=lambda: True)
  assert not os.listdir(os.path.join(work, 'latent_cache'))
  path = latent_cache.build(cached, work)
  cache = latent_cache.LatentCache(path)
  latent = latent_space.load(config)
  images = next(__import__('data').get_dataset(config, batch_size=4, process_index=0,
                                               process_count=1, shuffle=False))['image']
  mean, logvar = latent.moments(latent.params, images)
  rows = cache.rows(np.arange(4))
  # The encoder at another batch shape (16 rows over 8 devices vs 4 unsharded): round-off.
  np.testing.assert_allclose(rows['mean'], mean, rtol=0, atol=1e-5)
  np.testing.assert_allclose(rows['logvar'], logvar, rtol=0, atol=1e-4)
  # Another preprocessing or autoencoder has another cache.
  other = _latent_config(tmp_path / 'vae', **{'latent.cache': True, 'data.crop': 'center'})
  assert latent_cache.folder(other, work) != path

  on_the_fly = train_lib.train(config, str(tmp_path / 'fly'))
  from_cache = train_lib.train(cached, work)
  # Same posterior draws (the step's key on the same moments): equal to float32 round-off (the
  # encoder ran in two programs of other batch shapes, and the draw alone or fused with it).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               jax.device_get(from_cache.params), jax.device_get(on_the_fly.params))
