"""DDPM model on CelebA 64x64 as trained in the DDIM paper (Song, Meng & Ermon 2021, Appendix D).

Command (the DDIM authors trained on GPUs; this config is meant for 8 GPUs or a TPU v3-8):
  python main.py --config configs/celeba_ddpm.py --workdir runs/celeba_ddpm
Prepare the dataset once on a machine with internet access (needs TensorFlow there):
  python main.py --config configs/celeba_ddpm.py --workdir runs/celeba_ddpm --mode prepare
Sample with DDIM, 50 steps:
  python main.py --config configs/celeba_ddpm.py --workdir runs/celeba_ddpm --mode sample \
      --config.sampling.sampler=ddim --config.sampling.num_steps=50

Published result (DDIM paper, Table 1, eta = 0): FID 9.17 with 50 steps, 6.53 with 100 steps.
Model and preprocessing follow the DDIM code's celeba config: ch 128, mult 1,2,2,2,4, 2 res blocks,
attention at 16x16, dropout 0.1; images center-cropped on the DDIM box then resized (antialiased)
to 64x64, random horizontal flips; Adam lr 2e-4, grad-norm clip 1.0, batch 128, EMA 0.9999,
linear betas 1e-4 to 0.02, T = 1000. The DDIM code uses no learning-rate warm-up.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'tfds:celeb_a'
  config.data.image_size = 64
  config.data.num_channels = 3
  config.data.num_classes = 0
  config.data.label_key = ''
  config.data.random_flip = True
  config.data.crop = 'celeba_ddim'

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2, 4)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1

  config.diffusion.schedule = 'linear'
  config.diffusion.num_timesteps = 1000

  config.optim.lr = 2e-4
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 1.0

  config.training.batch_size = 128
  config.training.num_steps = 500_000
  config.training.ema_rate = 0.9999

  config.sampling.sampler = 'ddim'
  config.sampling.num_steps = 50
  config.sampling.eta = 0.0
  config.sampling.clip_x0 = True
  config.eval.num_samples = 50_000
  return config
