"""EDM (Karras et al. 2022) on the embedded digits, on the CPU: configs/digits.py with
config.diffusion.formulation = 'edm' and EDM's own sampler.

Command (2 CPU cores, no GPU, no download; a few minutes):
  python main.py --config configs/digits_edm.py --workdir runs/digits_edm
Sample it with any other sampler through the VP bridge (diffusion/edm.py's vp_model), e.g.:
  python main.py --config configs/digits_edm.py --workdir runs/digits_edm --mode sample \
    --config.sampling.sampler=ddim --config.sampling.num_steps=20

Everything but the formulation and the sampler is the digits default (model, optimizer, EMA,
steps); diffusion.prediction is not read by the edm formulation. sigma_data stays EDM's 0.5
(the digits at 16x16 in [-1, 1]: mean -0.39, std 0.64).

Measured (2026-12-03, 2 shared CPU cores): a 300-step run (--config.training.num_steps=300) took
3 min end to end, loss 0.865 / 0.250 / 0.196 at steps 100 / 200 / 300, and its grid shows
digit-like strokes; DDIM 20 steps through the bridge, from the same seed, draws nearly the same
images as EDM's 18-step sampler (the same ODE). The full 1,500 steps: not yet measured.
"""

from configs import digits


def get_config():
  return to_edm(digits.get_config())


def to_edm(config):
  """What EDM changes in a digits config (configs/digits_dit_edm.py applies it to the DiT)."""
  config.diffusion.formulation = 'edm'
  # Only the VP bridge reads the schedule (ddim, dpm_solver_pp_2m, ... on an EDM model): the
  # linear betas span sigma 0.0100 to 157.4, around EDM's 0.002 to 80 (the cosine one reaches
  # 20,291, far beyond the noise levels EDM trains on).
  config.diffusion.schedule = 'linear'

  config.sampling.sampler = 'edm'
  config.sampling.num_steps = 18  # 35 evaluations
  return config
