"""LDM's KL-f8 autoencoder (256x256x3 -> 32x32x4), trained on LSUN-Churches: the first stage of
configs/lsun_churches_ldm_kl8.py. For accelerators (8 GPUs or a TPU slice).

  python main.py --config configs/lsun_churches_autoencoder_kl8.py --workdir runs/churches_ae \
      --mode prepare   # once, on a machine with internet access (needs TensorFlow there)
  python main.py --config configs/lsun_churches_autoencoder_kl8.py --workdir runs/churches_ae
  python main.py --config configs/lsun_churches_autoencoder_kl8.py --workdir runs/churches_ae \
      --mode eval      # PSNR and rFID of the reconstructions

From CompVis/latent-diffusion configs/autoencoder/autoencoder_kl_32x32x4.yaml: ch 128, ch_mult
1,2,4,4, 2 resnets per level, no attention but the mid blocks', 4 latent channels (this is SD's
AutoencoderKL, config.autoencoder's defaults: 83,653,863 parameters); kl_weight 1e-6, the
PatchGAN (3 layers) from step 50,001 with disc_weight 0.5; Adam (0.5, 0.9) at 4.5e-6 scaled by
the batch, as LDM's main.py scales base_learning_rate (batch 12 per GPU, 2 accumulated: 192 on
8 GPUs, in one step here). Images: LDM's LSUN preprocessing (center square, resized to 256,
horizontal flips).

Left out: LPIPS (its VGG weights cannot be downloaded here), so this objective is LDM's without
its perceptual term and will not match the published first stage, kl-f8 (latent-diffusion's
README: rFID 0.90, PSNR 24.19 +/- 4.19, 246,803 steps). To use that published model instead,
bring it in diffusers' layout (e.g. stabilityai/sd-vae-ft-ema, kl-f8 fine-tuned for SD) and name
its folder in configs/lsun_churches_ldm_kl8.py's latent.autoencoder. Not run here (no GPU).
"""

from configs import default
from configs import digits_autoencoder


def churches_data(config):
  """LSUN-Churches (tfds lsun/church_outdoor) at 256x256, as LDM's ldm/data/lsun.py reads it."""
  d = config.data
  d.dataset = 'tfds:lsun/church_outdoor'
  d.image_size = 256
  d.num_channels = 3
  d.num_classes = 0
  d.label_key = ''
  d.crop = 'center'
  d.random_flip = True
  return config


def get_config():
  config = churches_data(default.get_config())
  config.model.name = 'autoencoder'
  config.model.num_classes = 0
  al = config.autoencoder_loss
  al.kl_weight = 1e-6
  al.disc_start = 50001
  al.disc_weight = 0.5
  digits_autoencoder.ldm_optim(config, batch_size=192)
  config.training.num_steps = 250_000
  config.training.ema_rate = 0.9999
  config.training.sample_every = 5000
  config.training.checkpoint_every = 5000
  config.eval.num_samples = 50_000
  return config
