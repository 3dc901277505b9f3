"""The base of the digits cascade: unconditional DDPM on the digits at 8x8, on CPU.

Commands (2 CPU cores, no GPU, no download):
  python main.py --config configs/digits_sr_base.py --workdir runs/digits_8
  python main.py --config configs/digits_sr.py --workdir runs/digits_sr --mode sample \
      --config.sampling.cascade_base_workdir=runs/digits_8
The second command samples 8x8 digits with this model and upsamples them to 16x16 with the
super-resolution model of configs/digits_sr.py.

Expected: faster than configs/digits.py (a quarter of the pixels); blurry but recognizable 8x8
digits (the dataset's native resolution). Not measured with FID.
"""

from configs import digits


def get_config():
  config = digits.eps_linear(digits.get_config())
  config.data.image_size = 8
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.sampling.sampler = 'ddim'
  config.sampling.num_steps = 50
  return config
