"""DDPM on the 16x16 digits with the cosine schedule and v-prediction, on CPU.

The cosine schedule (Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999) destroys
information more slowly than the linear one at small t; v-prediction (Salimans & Ho 2022,
v = sqrt(abar) eps - sqrt(1 - abar) x0) keeps the regression target of unit scale at both ends of
the chain, where eps-prediction (x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)) is ill-conditioned
near t = T under the cosine schedule. Every sampler reads config.diffusion.prediction.

Command (2 CPU cores, no GPU, no download):
  python main.py --config configs/digits_v_cosine.py --workdir runs/digits_v_cosine
  python main.py --config configs/digits_v_cosine.py --workdir runs/digits_v_cosine --mode sample \
      --config.sampling.sampler=dpm_solver_pp_2m --config.sampling.num_steps=20

Expected: about as long as configs/digits.py; recognizable digits. Compare FIDs with
bench/sampler_quality.py on both workdirs (not measured here).
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.diffusion.schedule = 'cosine'
  config.diffusion.cosine_s = 0.008
  config.diffusion.prediction = 'v'
  return config
