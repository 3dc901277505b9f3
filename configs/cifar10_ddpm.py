"""DDPM on CIFAR-10 (Ho, Jain & Abbeel 2020, Table 2 and Appendix B).

Command (the paper used a TPU v3-8: 21 steps/s at batch 128, 10.6 h to 800k steps):
  python main.py --config configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm
Prepare the dataset once on a machine with internet access (needs TensorFlow there):
  python main.py --config configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm --mode prepare
Evaluate (50,000 samples, FID against the training set's statistics):
  python main.py --config configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm --mode eval

Published result (L_simple, 1000-step ancestral sampling): FID 3.17, IS 9.46, NLL <= 3.75 bits/dim.
Model: 35,746,307 parameters (ch 128, mult 1,2,2,2, 2 res blocks, attention at 16x16, dropout 0.1).
Training: batch 128, Adam lr 2e-4 with 5,000 linear warm-up steps, grad-norm clip 1.0, EMA 0.9999,
random horizontal flips, 800k steps, linear betas 1e-4 to 0.02, T = 1000.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'tfds:cifar10'
  config.data.image_size = 32
  config.data.num_channels = 3
  config.data.num_classes = 10
  config.data.random_flip = True

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1

  config.diffusion.schedule = 'linear'
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.prediction = 'eps'

  config.optim.lr = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip = 1.0

  config.training.batch_size = 128
  config.training.num_steps = 800_000
  config.training.ema_rate = 0.9999
  config.training.checkpoint_every = 10_000
  config.training.sample_every = 10_000

  config.sampling.sampler = 'ddpm'
  config.sampling.num_steps = 1000
  config.sampling.batch_size = 256
  config.eval.num_samples = 50_000
  return config
