"""The forward process q(x_t | x_0), its posterior q(x_{t-1} | x_t, x_0), and the conversions
between the three things a network may predict: eps (the noise), x0 (the clean data), v (velocity).

x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps, with eps ~ N(0, I).
v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0 (Salimans & Ho, 2022).

Timesteps `t` are int arrays of shape [B] (one per example; the schedule values are broadcast over
the non-batch axes of x) or scalars (one for the whole batch). t = -1 denotes the clean end
(abar = 1, no noise), which the samplers step to last. Functions here are elementwise over any x
shape and keep x's dtype.
"""

import jax.numpy as jnp

from diffusion.schedules import Schedule

PREDICTIONS = ('eps', 'x0', 'v')


def _check_prediction(prediction: str):
  if prediction not in PREDICTIONS:
    raise ValueError(f'prediction must be one of {PREDICTIONS}, got {prediction!r}')


def gather(values: jnp.ndarray, t, clean_value: float = 1.0) -> jnp.ndarray:
  """values[t] for t in [0, T-1], and clean_value where t == -1 (the clean end).

  Args:
    values: [T] schedule array.
    t: int, scalar or [B].
    clean_value: what t = -1 maps to (1 for abar).

  Returns:
    Array of t's shape and values' dtype.
  """
  t = jnp.asarray(t)
  # jnp indexing would wrap -1 around to the last (noisiest) entry.
  picked = jnp.take(values, jnp.maximum(t, 0), mode='clip')
  return jnp.where(t >= 0, picked, jnp.asarray(clean_value, values.dtype))


def expand(v: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a scalar or [B] array so that it broadcasts over x's non-batch axes."""
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def alpha_bar(schedule: Schedule, t, x: jnp.ndarray) -> jnp.ndarray:
  """abar_t (1 at t = -1), broadcastable against x."""
  return expand(gather(schedule.alphas_cumprod, t), x)


def q_sample(schedule: Schedule, x0: jnp.ndarray, t, noise: jnp.ndarray) -> jnp.ndarray:
  """Draws x_t ~ q(x_t | x_0) with the given standard-normal noise.

  Args:
    schedule: the noise schedule.
    x0: clean data, any shape [B, ...].
    t: int, scalar or [B], in [-1, T-1] (-1 returns x0 exactly).
    noise: N(0, I) draw of x0's shape.

  Returns:
    x_t, x0's shape and dtype.
  """
  a = alpha_bar(schedule, t, x0)
  return (a ** 0.5 * x0 + (1 - a) ** 0.5 * noise).astype(x0.dtype)


def velocity(schedule: Schedule, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
  """v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0, x0's shape and dtype."""
  a = alpha_bar(schedule, t, x0)
  return (a ** 0.5 * noise - (1 - a) ** 0.5 * x0).astype(x0.dtype)


def q_posterior(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t):
  """Mean and variance of the posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7).

  Args:
    schedule: the noise schedule.
    x0: clean data (or a prediction of it), [B, ...].
    x_t: noisy data at step t, x0's shape.
    t: int, scalar or [B], in [0, T-1].

  Returns:
    (mean, variance, log_variance_clipped), each of x_t's shape and dtype. The variance is 0 at
    t = 0; log_variance_clipped there is the t = 1 value (DDPM's convention, keeps it finite).
  """
  coef1 = expand(gather(schedule.posterior_mean_coef1, t), x_t)
  coef2 = expand(gather(schedule.posterior_mean_coef2, t), x_t)
  mean = (coef1 * x0 + coef2 * x_t).astype(x_t.dtype)
  var = expand(gather(schedule.posterior_variance, t), x_t)
  log_var = expand(gather(schedule.posterior_log_variance_clipped, t), x_t)
  var = jnp.broadcast_to(var, x_t.shape).astype(x_t.dtype)
  log_var = jnp.broadcast_to(log_var, x_t.shape).astype(x_t.dtype)
  return mean, var, log_var


def predict_x0_eps(schedule: Schedule, x_t: jnp.ndarray, t, model_out: jnp.ndarray,
                   prediction: str = 'eps'):
  """Converts a network output into the implied (x0, eps) at step t.

  The arithmetic follows diffusers' schedulers, so that float32 results agree to rounding.

  Args:
    schedule: the noise schedule.
    x_t: noisy input of the network, [B, ...].
    t: int, scalar or [B], in [0, T-1].
    model_out: network output, x_t's shape: eps, x0 or v as named by `prediction`.
    prediction: 'eps' | 'x0' | 'v'.

  Returns:
    (x0, eps), each of x_t's shape.
  """
  _check_prediction(prediction)
  a = alpha_bar(schedule, t, x_t)
  b = 1 - a
  if prediction == 'eps':
    eps = model_out
    x0 = (x_t - b ** 0.5 * model_out) / a ** 0.5
  elif prediction == 'x0':
    x0 = model_out
    eps = (x_t - a ** 0.5 * model_out) / b ** 0.5
  else:
    x0 = a ** 0.5 * x_t - b ** 0.5 * model_out
    eps = a ** 0.5 * model_out + b ** 0.5 * x_t
  return x0.astype(x_t.dtype), eps.astype(x_t.dtype)


def to_prediction(schedule: Schedule, x0: jnp.ndarray, eps: jnp.ndarray, t,
                  prediction: str = 'eps') -> jnp.ndarray:
  """What a network of the given prediction type should output for (x0, eps) at step t.

  This is the regression target of the losses, and the inverse of `predict_x0_eps`.

  Args:
    schedule: the noise schedule.
    x0: clean data, [B, ...].
    eps: the noise, x0's shape.
    t: int, scalar or [B], in [0, T-1].
    prediction: 'eps' | 'x0' | 'v'.

  Returns:
    Target of x0's shape and dtype.
  """
  _check_prediction(prediction)
  if prediction == 'eps':
    return eps
  if prediction == 'x0':
    return x0
  return velocity(schedule, x0, eps, t)
