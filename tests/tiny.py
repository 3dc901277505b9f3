"""Tiny configs for tests: 8x8 digits and a U-Net of a few thousand parameters."""

import config_lib
from configs import digits


def tiny_config(**overrides):
  """digits at 8x8 with a 2-level, 16-channel U-Net; `overrides` as {'optim.lr': 1e-3}."""
  config = digits.eps_linear(digits.get_config())
  config.data.image_size = 8
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.1
  config.diffusion.num_timesteps = 100
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 2
  config.training.batch_size = 16
  config.training.num_steps = 6
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.sample_every = 0
  config.training.ema_rate = 0.9
  config.sampling.num_steps = 10
  config.sampling.sampler = 'ddim'
  config.sampling.num_samples = 8
  config.sampling.batch_size = 8
  for key, value in overrides.items():
    config_lib.set_field(config, key, value)
  return config
