"""A small KL autoencoder on the embedded digits (16x16x1 -> 8x8x2 latents), CPU-sized.

  python main.py --config configs/digits_autoencoder.py --workdir runs/digits_ae
  python main.py --config configs/digits_autoencoder.py --workdir runs/digits_ae --mode sample
  python main.py --config configs/digits_autoencoder.py --workdir runs/digits_ae --mode eval

The architecture is AutoencoderKL's at toy width: levels (32, 64) (2x downsampling), one resnet
per level, 2 latent channels, 8 GroupNorm groups. LDM's loss: L1 + 1e-6 KL, the PatchGAN (2
layers, hinge, adaptive weight) from step 1,000. A latent diffusion config uses it with
--config.latent.autoencoder=runs/digits_ae --config.latent.factor=2 --config.latent.channels=2.
Not yet measured: its PSNR / rFID and training time.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.name = 'autoencoder'
  config.model.num_classes = 0
  ae = config.autoencoder
  ae.block_out_channels = (32, 64)
  ae.layers_per_block = 1
  ae.latent_channels = 2
  ae.norm_num_groups = 8
  al = config.autoencoder_loss
  al.disc_start = 1000
  al.disc_num_layers = 2
  al.disc_channels = 32
  config.optim.b1, config.optim.b2 = 0.5, 0.9
  config.optim.warmup_steps = 0
  config.optim.lr_schedule = 'constant'
  config.optim.grad_clip = 0.0
  config.training.batch_size = 64
  # LDM scales 4.5e-6 by the batch size (its Adam: b1 0.5, b2 0.9)
  config.optim.lr = 4.5e-6 * config.training.batch_size
  config.training.num_steps = 2000
  config.training.sample_every = 0
  config.training.eval_every = 0
  config.training.ema_rate = 0.999
  config.eval.num_samples = 1797
  return config
