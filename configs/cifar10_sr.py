"""Super-resolution on CIFAR-10: an image-conditional U-Net from 16x16 to 32x32 (SR3-style).

The condition is the 16x16 bicubic (antialiased) downsample of each training image
(data.low_res_size = 16), resized to 32x32 inside the U-Net and concatenated to x_t on channels
(model.cond_channels = 3). U-Net, optimizer and schedule as configs/cifar10_ddpm.py.

Commands (an accelerator):
  python main.py --config configs/cifar10_sr.py --workdir runs/cifar10_sr
Cascade: a 16x16 base model (configs/cifar10_sr_base.py), then this upsampler:
  python main.py --config configs/cifar10_sr_base.py --workdir runs/cifar10_16
  python main.py --config configs/cifar10_sr.py --workdir runs/cifar10_sr --mode sample \
      --config.sampling.cascade_base_workdir=runs/cifar10_16

Expected: not measured here (no CIFAR-10 and no accelerator on the development machine). A 2x
upsampler conditioned on the true 16x16 images is much easier than unconditional generation: its
samples should be close to the originals (cascaded diffusion, Ho et al. 2021, uses such stages and
conditioning augmentation, which this config does not add).
"""

from configs import cifar10_ddpm


def get_config():
  config = cifar10_ddpm.get_config()
  config.data.low_res_size = 16
  config.model.cond_channels = 3
  config.training.num_steps = 400_000
  config.sampling.sampler = 'ddim'
  config.sampling.num_steps = 100
  return config
