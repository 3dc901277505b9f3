"""The DDPM CIFAR-10 model trained with the cosine schedule and v-prediction.

Same U-Net (35.7M parameters), optimizer and 800k steps as configs/cifar10_ddpm.py; only the
diffusion group differs: cosine schedule (Nichol & Dhariwal 2021, s = 0.008) and v-prediction
(Salimans & Ho 2022).

Command (an accelerator; the DDPM paper's TPU v3-8 took 10.6 h for 800k steps at batch 128):
  python main.py --config configs/cifar10_v_cosine.py --workdir runs/cifar10_v_cosine
  python main.py --config configs/cifar10_v_cosine.py --workdir runs/cifar10_v_cosine --mode eval \
      --config.sampling.sampler=dpm_solver_pp_2m --config.sampling.num_steps=20

Expected: not measured here (no CIFAR-10 and no accelerator on the development machine). Improved
DDPM reports that the cosine schedule helps mostly log-likelihood on CIFAR-10 (its FIDs with
L_simple are close to the linear schedule's, about 3 at 4,000 steps); expect an FID of the same
order as configs/cifar10_ddpm.py.
"""

from configs import cifar10_ddpm


def get_config():
  config = cifar10_ddpm.get_config()
  config.diffusion.schedule = 'cosine'
  config.diffusion.cosine_s = 0.008
  config.diffusion.prediction = 'v'
  return config
