"""DiT-L/2 (Peebles & Xie 2023, Table 1): the `config.dit` group only.

The experiment config sets config.model.name = 'dit' and config.dit = dit_group(); the class
count is config.model.num_classes (1,000 for ImageNet), the input config.data (32x32x4 SD-VAE
latents for 256x256 images). Plain ml_collections, so loading a config does not import jax;
tests/test_dit.py checks it equals models.dit.dit_config('L', 2).
"""

import ml_collections


def dit_group():
  return ml_collections.ConfigDict(dict(
      patch_size=2,  # input pixels per token side
      hidden_size=1024,  # token width
      depth=24,  # DiT blocks
      num_heads=16,  # attention heads
      mlp_ratio=4.0,  # MLP width / hidden_size
      learn_sigma=True,  # 2C output channels: prediction, then the variance interpolation
  ))
