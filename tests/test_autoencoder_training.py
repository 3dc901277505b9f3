"""An autoencoder trained by the trainer (model.name = 'autoencoder') and used by a latent config."""

import json

import jax
import numpy as np
from PIL import Image
import pytest

import config_lib
import experiment
import latent_space
import train_lib
from tests.tiny import tiny_config


def _ae_config(**kw):
  """A 2-level (2x down) autoencoder on 8x8 digits with a 2-layer PatchGAN from step 2."""
  return tiny_config(**{
      'model.name': 'autoencoder', 'autoencoder.block_out_channels': (8, 16),
      'autoencoder.layers_per_block': 1, 'autoencoder.norm_num_groups': 4,
      'autoencoder.latent_channels': 2, 'autoencoder_loss.disc_start': 2,
      'autoencoder_loss.disc_num_layers': 1, 'autoencoder_loss.disc_channels': 8,
      'optim.grad_clip': 0.0, 'training.sample_every': 0, **kw})


def test_autoencoder_trains_and_a_latent_config_loads_its_run(tmp_path):
  config = _ae_config()
  config_lib.validate(config)
  state = train_lib.train(config, str(tmp_path / 'ae'))
  assert sorted(state.params) == ['autoencoder', 'discriminator']
  assert int(state.step) == config.training.num_steps and int(state.nonfinite_total) == 0
  # The discriminator learns only once the GAN terms count (disc_factor 0 before disc_start).
  init = train_lib.init_state(config, experiment.model(config), train_lib.make_optimizer(config))
  assert not np.array_equal(jax.device_get(state.params['discriminator']['conv_0']['kernel']),
                            jax.device_get(init.params['discriminator']['conv_0']['kernel']))

  latent = tiny_config(**{'latent.autoencoder': str(tmp_path / 'ae'), 'latent.factor': 2,
                          'latent.channels': 2, 'latent.scale_factor': 1.0,
                          'sampling.clip_x0': False, 'model.attn_resolutions': ()})
  config_lib.validate(latent)
  space = latent_space.load(latent)
  ema = jax.device_get(state.ema_params['autoencoder'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(space.params), ema)
  images = np.zeros((2, 8, 8, 1), np.float32)
  assert space.encode(space.params, images, jax.random.key(0)).shape == (2, 4, 4, 2)


@pytest.mark.parametrize('override,field', [
    ({'latent.channels': 4}, 'latent.channels'),
    ({'latent.factor': 4}, 'latent.factor'),
])
def test_an_incompatible_autoencoder_run_is_named(tmp_path, override, field):
  config = _ae_config(**{'training.num_steps': 1})
  train_lib.train(config, str(tmp_path / 'ae'))
  latent = tiny_config(**{'latent.autoencoder': str(tmp_path / 'ae'), 'latent.factor': 2,
                          'latent.channels': 2, 'sampling.clip_x0': False, **override})
  with pytest.raises(config_lib.ConfigError, match=field) as e:
    config_lib.validate(latent)
  assert str(tmp_path / 'ae') in str(e.value)


def test_autoencoder_config_errors_name_the_field():
  with pytest.raises(config_lib.ConfigError, match='autoencoder.norm_num_groups'):
    config_lib.validate(_ae_config(**{'autoencoder.norm_num_groups': 3}))
  with pytest.raises(config_lib.ConfigError, match='model.num_classes'):
    config_lib.validate(_ae_config(**{'model.num_classes': 10}))


def test_sample_mode_writes_reconstructions_of_the_split(tmp_path):
  import autoencoder_lib  # pylint: disable=g-import-not-at-top
  config = _ae_config(**{'training.num_steps': 1, 'sampling.num_samples': 10})
  train_lib.train(config, str(tmp_path))
  recon = autoencoder_lib.run_sample_mode(config, str(tmp_path))
  inputs = autoencoder_lib.split_images(config, 10)
  assert recon.shape == inputs.shape == (10, 8, 8, 1) and recon.dtype == np.uint8
  saved = np.load(tmp_path / 'samples' / 'step_0000001_reconstructions.npz')
  np.testing.assert_array_equal(saved['images'], recon)
  assert (tmp_path / 'samples' / 'step_0000001_reconstructions.png').exists()
  # PSNR of identical images is infinite; of these, finite.
  assert np.isfinite(autoencoder_lib.psnr_db(inputs, recon))


def test_training_hooks_write_reconstruction_grids_and_rfid(tmp_path):
  """sample_every / eval_every of an autoencoder run: inputs | reconstructions grids and PSNR,
  rFID, rKID in metrics.jsonl (here against the statistics of the same 4 real images)."""
  import autoencoder_lib  # pylint: disable=g-import-not-at-top
  import eval_lib  # pylint: disable=g-import-not-at-top
  from evaluation import fid  # pylint: disable=g-import-not-at-top
  config = _ae_config(**{'training.num_steps': 2, 'training.sample_every': 2,
                         'training.num_grid_samples': 4, 'training.eval_every': 2,
                         'training.eval_num_samples': 4, 'eval.batch_size': 8})
  real = autoencoder_lib.split_images(config, 4)
  stats = str(tmp_path / 'stats.npz')
  fid.reference_statistics(lambda: [real], stats, batch_size=8)
  config.eval.reference_stats = stats
  config_lib.validate(config)
  workdir = str(tmp_path / 'ae')
  with pytest.raises(ValueError, match='autoencoder_lib.training_hooks'):
    eval_lib.training_hooks(config, workdir)  # a denoiser's grid would sample the autoencoder
  hooks = autoencoder_lib.training_hooks(config, workdir)
  assert [h.name for h in hooks] == ['reconstruction_grid', 'rfid']
  train_lib.train(config, workdir, hooks=hooks)
  grid = np.asarray(Image.open(tmp_path / 'ae' / 'samples' /
                               'train_step_0000002_reconstructions.png'))
  assert grid.ndim >= 2 and grid.shape[1] > 2 * 64  # two columns of tiles of at least 64 px
  with open(tmp_path / 'ae' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f if 'rfid_n4' in line]
  assert len(rows) == 1 and rows[0]['step'] == 2
  assert np.isfinite(rows[0]['rfid_n4']) and rows[0]['rfid_n4'] > 0
  assert np.isfinite(rows[0]['psnr_eval']) and rows[0]['psnr_eval'] > 0
