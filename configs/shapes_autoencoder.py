"""A small KL autoencoder on the embedded captioned shapes (16x16x3 -> 8x8x4 latents), CPU-sized:
the first stage of configs/shapes_latent_text.py, the small Stable Diffusion.

  python main.py --config configs/shapes_autoencoder.py --workdir runs/shapes_ae
  python main.py --config configs/shapes_autoencoder.py --workdir runs/shapes_ae --mode eval

configs/digits_autoencoder.py's architecture and loss (AutoencoderKL at toy width: levels
(16, 32), one resnet per level; L1 + 1e-6 KL, the PatchGAN from step 500) with SD's 4 latent
channels for the 3 color channels. The shapes are drawn at 32x32 and trained at 16x16, as
configs/shapes_text.py does (antialiased downsampling).
"""

from configs import digits_autoencoder
from configs import shapes_text


def get_config():
  config = digits_autoencoder.get_config()
  shapes = shapes_text.get_config()
  config.data = shapes.data
  config.autoencoder.latent_channels = 4
  config.eval.num_samples = 1000
  return config
