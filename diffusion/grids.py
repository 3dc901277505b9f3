"""Time grids: which training timesteps a sampler visits, apart from the sampler itself.

As in k-diffusion, where `sigmas` are computed once and handed to any sampler, a grid here is a
descending list of integer training timesteps t_0 > t_1 > ... > t_{k-1}; a sampler steps
t_0 -> t_1 -> ... -> t_{k-1} -> -1 (the clean end, abar = 1). Any sampler runs on any grid.

Grids (`GRIDS`, config.sampling.spacing):
  'leading'   arange(n) * (T // n), reversed: 980, 960, ..., 0 for T = 1000, n = 50 (DDIM's,
              diffusers' 'leading' with steps_offset 0).
  'trailing'  round(T - i T / n) - 1: 999, 979, ..., 19 (diffusers' 'trailing'; starts at the
              last training step, where x_T is pure noise).
  'linspace'  round(linspace(0, T - 1, n)), reversed.
  'dpm'       the 'leading' grid for n + 1 steps without its last point, t = 0: multiples of
              T // (n + 1) (diffusers' DPMSolverMultistepScheduler). A second-order multistep
              step into t = 0 (sigma ~ 0.01) extrapolates the x0 trend by h / h_prev ~ 4.
  'karras'    Karras et al. (2022)'s rho = 7 grid between the schedule's own sigma_max and
              sigma_min (sigma = sqrt((1 - abar) / abar), at t = T - 1 and t = 0), each sigma
              mapped to the training timestep nearest in log sigma (diffusers'
              use_karras_sigmas, EDM's sampler grid). Neighbouring sigmas that map to the same
              timestep are merged, so very fine grids have fewer than n points.
A sampler's default grid (config.sampling.spacing = 'auto') is its registry entry's
`default_grid` in diffusion/samplers.py.
"""

from typing import Callable, Optional

import numpy as np

from diffusion.schedules import Schedule

KARRAS_RHO = 7.0


def timesteps(num_train_timesteps: int, num_steps: int, spacing: str = 'leading') -> np.ndarray:
  """Descending training timesteps of the T-independent grids, diffusers' `set_timesteps`.

  For 'trailing', diffusers builds the list with a float `arange(T, 0, -T/n)`, which for some n
  (e.g. T=1000, n=61) overshoots by one element and appends a timestep -1; this function returns
  exactly n entries, equal to diffusers' first n.

  Args:
    num_train_timesteps: T.
    num_steps: n, 1 <= n <= T.
    spacing: 'leading' | 'trailing' | 'linspace'.

  Returns:
    int64 [n], strictly descending for 'leading' and 'trailing', entries in [0, T-1].
  """
  big_t, n = num_train_timesteps, num_steps
  if not 1 <= n <= big_t:
    raise ValueError(f'num_steps must be in [1, {big_t}], got {n}')
  if spacing == 'leading':
    return (np.arange(n) * (big_t // n))[::-1].astype(np.int64)
  if spacing == 'trailing':
    # The same float arange as diffusers (its rounding decides ties), cut to n entries.
    return np.round(np.arange(big_t, 0, -big_t / n)[:n]).astype(np.int64) - 1
  if spacing == 'linspace':
    return np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
  raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")


def sigmas(schedule: Schedule) -> np.ndarray:
  """EDM's sigma_t = sqrt((1 - abar_t) / abar_t) of every training step, float64 [T]."""
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  return np.sqrt((1.0 - abar) / abar)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float,
                  rho: float = KARRAS_RHO) -> np.ndarray:
  """Karras et al.'s grid: (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, [n].

  Descending from sigma_max to sigma_min (float64); n = 1 gives [sigma_max].
  """
  ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def _leading(schedule, n):
  return timesteps(schedule.num_timesteps, n, 'leading')


def _trailing(schedule, n):
  return timesteps(schedule.num_timesteps, n, 'trailing')


def _linspace(schedule, n):
  return timesteps(schedule.num_timesteps, n, 'linspace')


def _dpm(schedule, n):
  big_t = schedule.num_timesteps
  if not 1 <= n < big_t:
    raise ValueError(f"num_steps must be in [1, {big_t - 1}] for the 'dpm' grid, got {n}")
  return timesteps(big_t, n + 1, 'leading')[:-1]


def _karras(schedule, n):
  big_t = schedule.num_timesteps
  if not 1 <= n <= big_t:
    raise ValueError(f'num_steps must be in [1, {big_t}], got {n}')
  sig = sigmas(schedule)  # increasing in t
  wanted = karras_sigmas(n, sig[0], sig[-1])
  t = np.round(np.interp(np.log(wanted), np.log(sig), np.arange(big_t))).astype(np.int64)
  # Merge neighbours that round to the same step; the list stays descending.
  return t[np.append(True, np.diff(t) != 0)]


GRIDS: dict[str, Callable[[Schedule, int], np.ndarray]] = {
    'leading': _leading,
    'trailing': _trailing,
    'linspace': _linspace,
    'dpm': _dpm,
    'karras': _karras,
}


def grid(name: str, schedule: Schedule, num_steps: int) -> np.ndarray:
  """The descending training timesteps of grid `name` with (up to) num_steps points, int64."""
  if name not in GRIDS:
    raise ValueError(f'unknown grid {name!r}; known: {sorted(GRIDS)}')
  return GRIDS[name](schedule, num_steps)


def steps_run(num_points: int, strength: Optional[float]) -> int:
  """How many of a grid's steps SDEdit runs at a strength, as diffusers' img2img: int(n * s)."""
  if strength is None:
    return num_points
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f'strength must be in [0, 1], got {strength}')
  return min(int(num_points * strength), num_points)


def step_pairs(name: str, schedule: Schedule, num_steps: int,
               strength: Optional[float] = None):
  """The (t, t_prev) pairs a sampler runs on grid `name`: int32 numpy [k] each.

  t_prev is the next grid point, -1 after the last. With `strength` (SDEdit), only the last
  int(k * strength) steps.
  """
  ts = grid(name, schedule, num_steps)
  prev = np.append(ts[1:], -1)
  k = steps_run(len(ts), strength)
  return ts[len(ts) - k:].astype(np.int32), prev[len(ts) - k:].astype(np.int32)
