"""LDM-KL-8 on LSUN-Churches 256x256 (Rombach et al. 2022): unconditional latent diffusion on the
32x32x4 latents of a KL-f8 autoencoder. For accelerators (8 GPUs or a TPU slice).

  python main.py --config configs/lsun_churches_autoencoder_kl8.py --workdir runs/churches_ae
  python main.py --config configs/lsun_churches_ldm_kl8.py --workdir runs/churches_ldm
  python main.py --config configs/lsun_churches_ldm_kl8.py --workdir runs/churches_ldm \
      --mode eval   # 50,000 samples, DDIM 400 steps, eta 0, FID in pixel space
With the published first stage instead of one trained here:
  --config.latent.autoencoder=/path/to/sd-vae-ft-ema (a diffusers AutoencoderKL folder)

Published result (CompVis/latent-diffusion README, LDM-KL-8 with 400 DDIM steps, eta = 0):
FID 4.02, precision 0.64, recall 0.52. Hardware: the authors trained on NVIDIA A100s; not run
here (no GPU in this project's sessions so far).

From configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml: T = 1000 on LDM's 'linear' schedule
(sqrt-spaced betas 0.0015 -> 0.0155, our 'scaled_linear'), eps prediction with an L1 loss,
scale_by_std; the U-Net: 192 channels, mult 1,2,2,4,4, 2 res blocks, attention at 32, 16, 8 and
4, 8 heads; AdamW at lr 5e-5 (unscaled, the yaml's comment: --scale_lr False) with 10,000
linear warm-up steps, batch 96, LitEma 0.9999 with its warm-up. Differences of our U-Net (DDPM's,
models/unet.py) from LDM's openaimodel: the time embedding is added rather than applied as
scale-shift (use_scale_shift_norm) and down/upsampling are strided / nearest convs rather than
residual blocks (resblock_updown). The yaml fixes no step count; 500,000 here.
"""

from configs import default
from configs import lsun_churches_autoencoder_kl8


def get_config():
  config = lsun_churches_autoencoder_kl8.churches_data(default.get_config())
  lat = config.latent
  lat.autoencoder = 'runs/churches_ae'
  lat.factor = 8
  lat.channels = 4
  lat.scale_by_std = True

  config.model.ch = 192
  config.model.ch_mult = (1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (32, 16, 8, 4)
  config.model.num_heads = 8
  config.model.dropout = 0.0

  d = config.diffusion
  d.schedule = 'scaled_linear'
  d.num_timesteps = 1000
  d.beta_start, d.beta_end = 0.0015, 0.0155
  d.prediction = 'eps'
  d.loss_type = 'l1'

  o = config.optim
  o.optimizer = 'adamw'
  o.weight_decay = 0.01  # torch.optim.AdamW's default, which LDM uses
  o.lr = 5e-5
  o.warmup_steps = 10_000
  o.lr_schedule = 'constant'
  o.grad_clip = 0.0

  t = config.training
  t.batch_size = 96
  t.num_steps = 500_000
  t.ema_rate = 0.9999
  t.ema_warmup = True
  t.sample_every = 5000

  s = config.sampling
  s.sampler = 'ddim'
  s.num_steps = 400
  s.eta = 0.0
  s.clip_x0 = False
  config.eval.num_samples = 50_000
  return config
