"""Writes tests/data/dpm_solver_sde_reference.npz: diffusers' sde-dpmsolver++ on our noise.

Two stages, because jax and torch live in different venvs here:

  python tests/data/make_dpm_solver_sde_reference.py noise /tmp/sde_noise.npz
  /work/torchvenv/bin/python tests/data/make_dpm_solver_sde_reference.py diffusers \
      /tmp/sde_noise.npz tests/data/dpm_solver_sde_reference.npz

Stage 1 draws, with our sampling loop's key derivation (`samplers.sample` with
jax.random.PRNGKey(0)), the noise that each step of 'dpm_solver_pp_2m_sde' uses. Stage 2 runs
diffusers' DPMSolverMultistepScheduler (algorithm_type='sde-dpmsolver++', order 2, trailing
spacing, linear betas) on the same x_T and the same per-step noise (`variance_noise`), with the
stand-in network eps(x, t) = tanh(x) t / 1000 + 0.1 cos(3x) of the ODE reference.
"""

import sys

import numpy as np

STEPS = (20, 7)


def noise_stage(out):
  import jax  # pylint: disable=g-import-not-at-top
  with np.load(__file__.replace('make_dpm_solver_sde_reference.py', 'dpm_solver_reference.npz')
               ) as ode:
    x_t = ode['x_T']
  arrays = {'x_T': x_t}
  _, loop_key = jax.random.split(jax.random.PRNGKey(0))
  for n in STEPS:
    noise = []
    for i in range(n):
      step_key, _ = jax.random.split(jax.random.fold_in(loop_key, i))
      noise.append(np.asarray(jax.random.normal(step_key, x_t.shape, np.float32)))
    arrays[f'noise_{n}'] = np.stack(noise)
  np.savez(out, **arrays)


def diffusers_stage(noise_path, out):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  data = dict(np.load(noise_path))
  arrays = {'x_T': data['x_T'], 'diffusers_version': np.asarray(diffusers.__version__)}
  for n in STEPS:
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
        algorithm_type='sde-dpmsolver++', solver_order=2, timestep_spacing='trailing')
    sched.set_timesteps(n)
    x = torch.from_numpy(data['x_T'])
    for i, t in enumerate(sched.timesteps):
      eps = torch.tanh(x) * (float(t) / 1000) + 0.1 * torch.cos(3 * x)
      x = sched.step(eps, t, x, variance_noise=torch.from_numpy(data[f'noise_{n}'][i])).prev_sample
    arrays[f'timesteps_{n}'] = sched.timesteps.numpy()
    arrays[f'x0_{n}'] = x.numpy()
  np.savez(out, **arrays)


if __name__ == '__main__':
  if sys.argv[1] == 'noise':
    noise_stage(sys.argv[2])
  else:
    diffusers_stage(sys.argv[2], sys.argv[3])
