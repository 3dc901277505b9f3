"""DiT-XL/2 on ImageNet 256x256 in SD's VAE latent space: the paper's setting, 674,834,720
trained parameters; everything but the size is configs/dit_s2.py's `imagenet_latent` (read its
docstring for the recipe, the learned-sigma note and the command).

  python main.py --config configs/dit_xl2.py --workdir runs/dit_xl2 \
      --config.latent.autoencoder=/path/to/sd-vae-ft-ema
"""

import ml_collections

from configs.dit_s2 import imagenet_latent


def dit_group():
  return ml_collections.ConfigDict(dict(
      patch_size=2,  # input pixels per token side
      hidden_size=1152,  # token width
      depth=28,  # DiT blocks
      num_heads=16,  # attention heads
      mlp_ratio=4.0,  # MLP width / hidden_size
      learn_sigma=True,  # 2C output channels: prediction, then the variance interpolation
  ))


def get_config():
  return imagenet_latent(dit_group())
