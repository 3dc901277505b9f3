"""The embedded default: DDPM on scikit-learn's 1,797 handwritten digits at 16x16, on CPU.

Command (2 CPU cores, no GPU, no download; the README's first command):
  python main.py --config configs/digits.py --workdir runs/digits

Leaves checkpoints/ and samples/ in the workdir; samples/ holds a PNG grid of digits.

The recipe (2026-12-03, issue 17; bench/RESULTS.md "Digits recipe search"): v-prediction on the
cosine schedule, a cosine learning-rate decay to 0 and an EMA of 0.999 with LitEma's warm-up. At
the same 1,500 steps it took the fast samplers' pixel-space Frechet distance to the real digits
from 0.374 to 0.169 (DDIM 50) and from 0.740 to 0.261 (DPM-Solver++ 20), and their confidently
classified share from 0.56 / 0.57 to 0.60 / 0.61 (1,000 samples each; real digits 0.80).
`eps_linear` restores the earlier recipe for the configs whose measurements were made with it.
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

  config.diffusion.schedule = 'cosine'
  config.diffusion.cosine_s = 0.008
  config.diffusion.prediction = 'v'

  config.optim.lr = 2e-3
  config.optim.warmup_steps = 100
  config.optim.lr_schedule = 'cosine'

  config.training.batch_size = 64
  config.training.num_steps = 1500
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.training.sample_every = 1500
  config.training.ema_rate = 0.999
  config.training.ema_warmup = True

  config.sampling.sampler = 'ddpm'
  config.sampling.num_steps = 1000
  config.sampling.num_samples = 64
  config.sampling.batch_size = 64

  config.eval.num_samples = 1797
  return config


def eps_linear(config):
  """The digits recipe before 2026-12-03 (eps on the linear schedule, constant lr, EMA 0.995
  without warm-up), kept by the configs and tests whose measured results were made with it."""
  config.diffusion.schedule = 'linear'
  config.diffusion.prediction = 'eps'
  config.optim.lr_schedule = 'constant'
  config.training.ema_rate = 0.995
  config.training.ema_warmup = False
  return config
