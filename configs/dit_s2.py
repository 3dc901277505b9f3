"""DiT-S/2 on ImageNet 256x256 in SD's VAE latent space (32x32x4), class-conditional: the
paper's setting (Peebles & Xie 2023, Sec. 4 and Table 4), 32,865,056 trained parameters.

`imagenet_latent` here is shared by configs/dit_{s2,b2,l2,xl2}.py: AdamW at 1e-4 without weight
decay or warm-up, batch 256, EMA 0.9999, horizontal flips, the linear schedule 1e-4 to 0.02
over 1,000 steps, class dropout 0.1; sampled with 250 DDPM steps and guidance 1.5 (the paper's
FID setting; its sample.py default of 4.0 makes nicer pictures and a worse FID). 400k steps is
the length of the paper's size/patch comparison (Table 4); DiT-XL/2's FID 2.27 took 7M.

learn_sigma: the output has the released checkpoints' 2C channels so that
models.dit.load_dit_checkpoint fills it; the variance half is not trained here (no VLB term)
and sampling uses DDPM's fixed variance.

Command (accelerators; ImageNet prepared once with --mode prepare, SD's VAE downloaded, e.g.
huggingface.co/stabilityai/sd-vae-ft-ema):
  python main.py --config configs/dit_s2.py --workdir runs/dit_s2 \
      --config.latent.autoencoder=/path/to/sd-vae-ft-ema
Not run here: no accelerator, ImageNet or VAE weights in this environment.
"""

import ml_collections

from configs import default


def imagenet_latent(group, num_steps=400_000):
  """The DiT paper's ImageNet-256 latent-diffusion config around one `config.dit` group."""
  config = default.get_config()
  config.data.dataset = 'tfds:imagenet2012'
  config.data.image_size = 256
  config.data.num_channels = 3
  config.data.num_classes = 1000
  config.data.crop = 'center'  # ADM's center crop
  config.data.random_flip = True

  config.latent.autoencoder = 'weights/sd-vae-ft-ema'  # a diffusers AutoencoderKL folder
  config.latent.factor = 8
  config.latent.channels = 4

  config.model.name = 'dit'
  config.model.num_classes = 1000
  config.dit = group

  config.diffusion.schedule = 'linear'
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.num_timesteps = 1000

  config.optim.optimizer = 'adamw'
  config.optim.lr = 1e-4
  config.optim.weight_decay = 0.0
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0

  config.training.batch_size = 256
  config.training.num_steps = num_steps
  config.training.ema_rate = 0.9999
  config.training.cond_dropout = 0.1
  config.training.checkpoint_every = 10_000
  config.training.sample_every = 50_000

  config.sampling.sampler = 'ddpm'
  config.sampling.num_steps = 250
  config.sampling.guidance_scale = 1.5
  config.sampling.clip_x0 = False
  config.eval.num_samples = 50_000
  return config


def dit_group():
  return ml_collections.ConfigDict(dict(
      patch_size=2,  # input pixels per token side
      hidden_size=384,  # token width
      depth=12,  # DiT blocks
      num_heads=6,  # attention heads
      mlp_ratio=4.0,  # MLP width / hidden_size
      learn_sigma=True,  # 2C output channels: prediction, then the variance interpolation
  ))


def get_config():
  return imagenet_latent(dit_group())
