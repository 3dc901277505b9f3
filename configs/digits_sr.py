"""Super-resolution on the digits: an image-conditional U-Net from 8x8 to 16x16, on CPU.

The condition is the 8x8 (bicubic, antialiased) downsample of each training image (data.low_res_size
= 8). The U-Net resizes it to 16x16 (nearest) and concatenates it to x_t on the channel axis
(model.cond_channels = 1); the rest is DDPM on the 16x16 digits.

Commands (2 CPU cores, no GPU, no download):
  python main.py --config configs/digits_sr.py --workdir runs/digits_sr
Upsample the dataset's own 8x8 digits (the default condition) or your images:
  python main.py --config configs/digits_sr.py --workdir runs/digits_sr --mode sample
  python main.py --config configs/digits_sr.py --workdir runs/digits_sr --mode sample \
      --config.sampling.cond_image=my_digit.png
Cascade: an 8x8 base model (configs/digits_sr_base.py), then this upsampler:
  python main.py --config configs/digits_sr_base.py --workdir runs/digits_8
  python main.py --config configs/digits_sr.py --workdir runs/digits_sr --mode sample \
      --config.sampling.cascade_base_workdir=runs/digits_8
samples/*_compare.png shows the 8x8 conditions (enlarged) beside the 16x16 outputs.

Expected: training takes about as long as configs/digits.py; the outputs are sharp 16x16 digits that
keep the identity and pose of their 8x8 conditions. Not measured with FID.
"""

from configs import digits


def get_config():
  config = digits.eps_linear(digits.get_config())
  config.data.image_size = 16
  config.data.low_res_size = 8
  config.model.cond_channels = 1
  config.model.num_classes = 0

  config.sampling.sampler = 'ddim'
  config.sampling.num_steps = 50
  config.training.sample_every = 2000
  return config
