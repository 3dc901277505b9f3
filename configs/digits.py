"""The embedded default: DDPM on scikit-learn's 1,797 handwritten digits at 16x16, on CPU.

Command (2 CPU cores, no GPU, no download; the README's first command):
  python main.py --config configs/digits.py --workdir runs/digits

Expected: about 6 minutes on 2 CPU cores; leaves checkpoints/ and samples/ in the workdir, and
samples/ holds a PNG grid of recognizable digits. See README for the measured FID table.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'digits'
  config.data.image_size = 16
  config.data.num_channels = 1
  config.data.num_classes = 10

  config.model.ch = 16
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0

  config.optim.lr = 2e-3
  config.optim.warmup_steps = 100

  config.training.batch_size = 64
  config.training.num_steps = 1500
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.training.sample_every = 1500
  config.training.ema_rate = 0.995

  config.sampling.sampler = 'ddpm'
  config.sampling.num_steps = 1000
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64

  config.eval.num_samples = 1797
  return config
