"""The base of the CIFAR-10 cascade: unconditional DDPM on CIFAR-10 at 16x16.

Commands (an accelerator):
  python main.py --config configs/cifar10_sr_base.py --workdir runs/cifar10_16
  python main.py --config configs/cifar10_sr.py --workdir runs/cifar10_sr --mode sample \
      --config.sampling.cascade_base_workdir=runs/cifar10_16

A three-level U-Net (16, 8, 4 pixels; attention at 8) of the DDPM CIFAR-10 widths; the images are
the training set resized (bilinear, antialiased) to 16x16.

Expected: not measured here (no CIFAR-10 and no accelerator on the development machine).
"""

from configs import cifar10_ddpm


def get_config():
  config = cifar10_ddpm.get_config()
  config.data.image_size = 16
  config.model.ch_mult = (1, 2, 2)
  config.model.attn_resolutions = (8,)
  config.training.num_steps = 400_000
  config.sampling.sampler = 'ddim'
  config.sampling.num_steps = 100
  return config
