"""A small class-conditional DiT on the embedded digits (16x16, patch 2: 64 tokens), on CPU.

The transformer counterpart of configs/digits_cond.py, for trying the DiT code path without an
accelerator: 4 blocks of width 64, classifier-free guidance from 10% label dropout.

  python main.py --config configs/digits_dit.py --workdir runs/digits_dit
  python main.py --config configs/digits_dit.py --workdir runs/digits_dit --mode sample \
      --config.sampling.sampler=ddim --config.sampling.num_steps=50 \
      --config.sampling.guidance_scale=2
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.name = 'dit'
  config.model.num_classes = 10
  config.dit.patch_size = 2
  config.dit.hidden_size = 64
  config.dit.depth = 4
  config.dit.num_heads = 4
  config.dit.learn_sigma = False
  config.optim.lr = 1e-3
  config.training.cond_dropout = 0.1
  config.training.num_steps = 3000
  config.training.sample_every = 3000
  return config
