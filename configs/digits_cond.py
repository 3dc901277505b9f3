"""Class-conditional DDPM on the 16x16 digits, with classifier-free guidance, on CPU.

The U-Net adds a learned label embedding to its time embedding (model.num_classes = 10; label 10 is
the 'null' label). Training replaces each label by the null label with probability
training.cond_dropout = 0.1, so one network learns both p(x | y) and p(x) (Ho & Salimans 2022).
At sampling time config.sampling.guidance_scale = w combines the two predictions as
  out = out_uncond + w * (out_cond - out_uncond):
w = 0 samples the unconditional model (labels ignored), w = 1 the plain conditional model, and w > 1
trades diversity for adherence to the label. sampling.class_label picks the digit (-1 cycles 0..9).

Command (2 CPU cores, no GPU, no download):
  python main.py --config configs/digits_cond.py --workdir runs/digits_cond
  python main.py --config configs/digits_cond.py --workdir runs/digits_cond --mode sample \
      --config.sampling.class_label=3 --config.sampling.guidance_scale=2
Guidance accuracy (a classifier trained on the real digits judges the samples):
  python -m bench.guidance_accuracy --workdir runs/digits_cond

Expected: about as long as configs/digits.py (a few minutes to tens of minutes on 2 shared CPU
cores); samples/ holds a grid whose columns cycle through the digits 0..9. The accuracy of the
requested digit rises with the guidance scale; see bench/guidance_accuracy.py and the README for the
measured figures.
"""

from configs import digits


def get_config():
  config = digits.eps_linear(digits.get_config())
  config.model.num_classes = 10
  config.data.num_classes = 10
  config.training.cond_dropout = 0.1

  # Deterministic DDIM with 50 steps: enough for these digits, and 20x cheaper than DDPM's 1,000
  # steps (guidance at w not in {0, 1} doubles each model evaluation).
  config.sampling.sampler = 'ddim'
  config.sampling.num_steps = 50
  config.sampling.guidance_scale = 2.0
  config.sampling.num_samples = 100
  config.sampling.batch_size = 100
  config.training.num_grid_samples = 100
  return config
