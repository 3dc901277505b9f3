"""Noise schedules of discrete-time diffusion (DDPM): betas and everything derived from them.

A `Schedule` is a pytree of [T] arrays, so it can be passed to jitted functions as an argument
(no recompilation when only the values change). Index t runs over 0..T-1; t = 0 is the least noisy
step. Schedules are computed in float64 numpy and cast once, so that a float32 schedule is the
correctly rounded float64 one.

Add a schedule by writing a function `(num_timesteps, **kwargs) -> betas (float64 [T])` and naming
it in `_BETAS`.
"""

import math
from typing import Callable

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  """Discrete noise schedule; every field has shape [T].

  Attributes:
    betas: beta_t, the per-step noise variance of q(x_t | x_{t-1}).
    alphas_cumprod: abar_t = prod_{s<=t} (1 - beta_s), the signal fraction of q(x_t | x_0).
    alphas_cumprod_prev: abar_{t-1}, with abar_{-1} = 1 (the clean end).
    posterior_variance: variance of q(x_{t-1} | x_t, x_0); 0 at t = 0.
    posterior_log_variance_clipped: log of posterior_variance with the t = 0 entry (log 0) replaced
      by the t = 1 entry, as in DDPM.
    posterior_mean_coef1: coefficient of x_0 in the posterior mean.
    posterior_mean_coef2: coefficient of x_t in the posterior mean.
  """
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    """T, static (from the array shape)."""
    return self.betas.shape[0]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM's linear schedule: betas evenly spaced from beta_start to beta_end. float64 [T]."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021) cosine schedule, float64 [T].

  With abar(u) = cos^2((u + s) / (1 + s) * pi / 2) for u in [0, 1], beta_t =
  1 - abar((t+1)/T) / abar(t/T), clipped at max_beta so that the last step does not destroy the
  signal in one jump (beta = 1).
  """
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
  """Stable Diffusion's (LDM's) schedule: sqrt(beta) evenly spaced, squared. float64 [T]."""
  return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2


_BETAS: dict[str, Callable[..., np.ndarray]] = {
    'linear': linear_betas,
    'cosine': cosine_betas,
    'scaled_linear': scaled_linear_betas,
}


def from_betas(betas: np.ndarray, dtype=jnp.float32) -> Schedule:
  """Builds a Schedule from betas (any float array [T]); derived arrays are computed in float64.

  Args:
    betas: [T] values in (0, 1).
    dtype: dtype of the returned arrays.

  Returns:
    Schedule with [T] arrays of `dtype`.
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f'betas must have shape [T] with T >= 2, got {betas.shape}')
  if not np.all((betas > 0) & (betas <= 1)):
    raise ValueError('betas must lie in (0, 1]')
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # posterior_variance[0] is 0; DDPM takes the log of the t = 1 entry there instead.
  log_var_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
  cast = lambda a: jnp.asarray(a, dtype=dtype)
  return Schedule(
      betas=cast(betas),
      alphas_cumprod=cast(alphas_cumprod),
      alphas_cumprod_prev=cast(alphas_cumprod_prev),
      posterior_variance=cast(posterior_variance),
      posterior_log_variance_clipped=cast(log_var_clipped),
      posterior_mean_coef1=cast(coef1),
      posterior_mean_coef2=cast(coef2),
  )


def get_schedule(name: str, num_timesteps: int, *, dtype=jnp.float32, **kwargs) -> Schedule:
  """Returns the named schedule with T = num_timesteps.

  Args:
    name: 'linear' (kwargs beta_start=1e-4, beta_end=0.02) or 'cosine' (kwargs s=0.008,
      max_beta=0.999).
    num_timesteps: T.
    dtype: dtype of the arrays (computed in float64, then cast).
    **kwargs: schedule parameters, see above.

  Returns:
    Schedule with [T] arrays.
  """
  if name not in _BETAS:
    raise ValueError(f'unknown schedule {name!r}; known: {sorted(_BETAS)}')
  return from_betas(_BETAS[name](num_timesteps, **kwargs), dtype=dtype)
