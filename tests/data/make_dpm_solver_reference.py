"""Writes tests/data/dpm_solver_reference.npz: diffusers' DPM-Solver++(2M) chains, ODE and SDE.

Two stages, because jax and torch live in different venvs here:

  python tests/data/make_dpm_solver_reference.py noise /tmp/dpm_noise.npz
  /work/torchvenv/bin/python tests/data/make_dpm_solver_reference.py diffusers \
      /tmp/dpm_noise.npz tests/data/dpm_solver_reference.npz

Stage 1 draws x_T and, with our sampling loop's key derivation (`samplers.sample` with
jax.random.PRNGKey(0)), the noise each step of 'dpm_solver_pp_2m_sde' uses. Stage 2 runs
diffusers' DPMSolverMultistepScheduler (order 2, midpoint, linear betas, float32) with
algorithm_type 'dpmsolver++' and 'sde-dpmsolver++', 'trailing' and 'leading' spacing, on that
x_T and per-step noise (`variance_noise`), with the stand-in network
eps(x, t) = tanh(x) t / 1000 + 0.1 cos(3x). Keys: x_T, timesteps_{spacing}_{n},
{ode|sde}_{spacing}_{n} (the final samples), diffusers_version.
"""

import sys

import numpy as np

STEPS = (20, 7)
SPACINGS = ('trailing', 'leading')


def noise_stage(out):
  import jax  # pylint: disable=g-import-not-at-top
  x_t = np.random.default_rng(0).standard_normal((4, 8, 8, 1)).astype(np.float32)
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
    for spacing in SPACINGS:
      for kind, algorithm in (('ode', 'dpmsolver++'), ('sde', 'sde-dpmsolver++')):
        sched = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
            algorithm_type=algorithm, solver_order=2, timestep_spacing=spacing)
        sched.set_timesteps(n)
        x = torch.from_numpy(data['x_T'])
        for i, t in enumerate(sched.timesteps):
          eps = torch.tanh(x) * (float(t) / 1000) + 0.1 * torch.cos(3 * x)
          noise = torch.from_numpy(data[f'noise_{n}'][i]) if kind == 'sde' else None
          x = sched.step(eps, t, x, variance_noise=noise).prev_sample
        arrays[f'timesteps_{spacing}_{n}'] = sched.timesteps.numpy()
        arrays[f'{kind}_{spacing}_{n}'] = x.numpy()
  np.savez(out, **arrays)


if __name__ == '__main__':
  if sys.argv[1] == 'noise':
    noise_stage(sys.argv[2])
  else:
    diffusers_stage(sys.argv[2], sys.argv[3])
