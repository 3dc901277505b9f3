"""EDM on CIFAR-10, unconditional (Karras et al. 2022, config F with the DDPM++ network).

Command (EDM trained it on 8x V100 in about 2 days: batch 512, 200 Mimg = 390,625 steps):
  python main.py --config configs/cifar10_edm.py --workdir runs/cifar10_edm
Prepare the dataset once on a machine with internet access (needs TensorFlow there):
  python main.py --config configs/cifar10_edm.py --workdir runs/cifar10_edm --mode prepare
Evaluate (50,000 samples, FID against the training set's statistics):
  python main.py --config configs/cifar10_edm.py --workdir runs/cifar10_edm --mode eval

Published result (EDM Table 2, unconditional CIFAR-10, "VP" = DDPM++ architecture with EDM's
preconditioning, loss and sampler): FID 1.97 at 35 evaluations (deterministic Heun, 18 steps),
the minimum over three 50,000-sample FIDs (conditional: 1.79). NOT reproduced here: no CIFAR-10
and no GPU on the machine this was written on; nothing of this config has been trained.

Model: our DDPM U-Net at DDPM++'s sizes, ch 128, mult 2,2,2 (256 channels at 32, 16, 8), 4 res
blocks, attention at 16, dropout 0.13: 53,634,563 parameters (EDM's DDPM++: ~56M). What differs
from DDPM++: our down/upsampling is DDPM's (a 3x3 stride-2 conv; nearest + 3x3 conv), not a
residual block with a [1, 1] filter; attention follows every block at 16 (DDPM++'s decoder has it
on the last block of the level only); no 1/sqrt(2) skip scaling; and EDM's non-leaking augmentation
(p = 0.12, with the augment labels fed to the network) is not implemented: plain random flips stand
in for it. The network's time input is 250 ln(sigma) (diffusion/edm.py's noise_input), not EDM's
raw ln(sigma) / 4. Training: Adam lr 1e-3 (b 0.9 / 0.999, eps 1e-8), linear lr warm-up over 10 Mimg
(19,531 steps), no gradient clipping, EMA half-life 500 kimg (0.5 ** (512 / 500k) = 0.99929 per
step; EDM ramps the half-life up as 0.05 x images seen, LitEma's warm-up stands in), loss mean over
pixels (EDM sums: a constant factor Adam does not see).
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
  config.model.ch_mult = (2, 2, 2)
  config.model.num_res_blocks = 4
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.13

  config.diffusion.formulation = 'edm'
  config.diffusion.sigma_data = 0.5
  config.diffusion.p_mean = -1.2
  config.diffusion.p_std = 1.2
  # Only the VP bridge reads the schedule (sampling an EDM model with ddim, dpm_solver_pp_2m, ...):
  # DDPM's linear betas span sigma 0.0100 to 157.4, around EDM's 0.002 to 80.
  config.diffusion.schedule = 'linear'
  config.diffusion.num_timesteps = 1000

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 19_531
  config.optim.grad_clip = 0.0

  config.training.batch_size = 512
  config.training.num_steps = 390_625
  config.training.ema_rate = 0.99929
  config.training.ema_warmup = True
  config.training.checkpoint_every = 10_000
  config.training.sample_every = 10_000

  config.sampling.sampler = 'edm'
  config.sampling.num_steps = 18  # 35 evaluations
  config.sampling.sigma_min = 0.002
  config.sampling.sigma_max = 80.0
  config.sampling.rho = 7.0
  config.sampling.clip_x0 = False  # EDM does not clip its denoised estimates
  config.sampling.batch_size = 256
  config.eval.num_samples = 50_000
  return config
