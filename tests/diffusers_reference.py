"""A small, independent numpy re-implementation of diffusers' DDPMScheduler / DDIMScheduler.

It follows diffusers 0.42's semantics and arithmetic (float32 throughout, one timestep per call,
Python control flow on the timestep) so that the JAX functions can be checked against it to
float32 rounding without installing torch. Only what the tests need: 'linear' and
'squaredcos_cap_v2' betas, set_timesteps ('leading', 'trailing', 'linspace'), add_noise,
get_velocity, and step for prediction types 'epsilon' / 'sample' / 'v_prediction' with clipping.
"""

import math

import numpy as np

F32 = np.float32


def betas(schedule: str, num_train_timesteps: int, beta_start=1e-4, beta_end=0.02) -> np.ndarray:
  """diffusers' betas: float32 linspace, or the Glide cosine computed in Python floats."""
  if schedule == 'linear':
    # torch.linspace in float32 differs from the rounded float64 linspace by 1 ulp in some entries.
    return np.linspace(beta_start, beta_end, num_train_timesteps).astype(F32)
  if schedule == 'squaredcos_cap_v2':
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    out = []
    for i in range(num_train_timesteps):
      t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
      out.append(min(1 - f(t2) / f(t1), 0.999))
    return np.array(out, dtype=F32)
  raise ValueError(schedule)


class _Base:
  """Shared state: betas, alphas, alphas_cumprod in float32 as the torch schedulers hold them."""

  def __init__(self, num_train_timesteps=1000, beta_schedule='linear', prediction_type='epsilon',
               clip_sample=True, timestep_spacing='leading', alphas_cumprod=None):
    """alphas_cumprod, if given, replaces the computed one (to test step arithmetic alone)."""
    self.num_train_timesteps = num_train_timesteps
    self.betas = betas(beta_schedule, num_train_timesteps)
    self.alphas = (F32(1.0) - self.betas).astype(F32)
    # torch's float32 cumprod is within ~4e-7 (relative) of the exact product, closer than a
    # sequential float32 numpy cumprod (~1e-6 off at T=1000); accumulate in float64 like it.
    self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(F32)
    if alphas_cumprod is not None:
      self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=F32)
    self.one = F32(1.0)
    self.prediction_type = prediction_type
    self.clip_sample = clip_sample
    self.timestep_spacing = timestep_spacing
    self.num_inference_steps = None
    self.timesteps = np.arange(num_train_timesteps)[::-1].copy()

  def set_timesteps(self, n):
    big_t = self.num_train_timesteps
    self.num_inference_steps = n
    if self.timestep_spacing == 'linspace':
      ts = np.linspace(0, big_t - 1, n).round()[::-1].copy().astype(np.int64)
    elif self.timestep_spacing == 'leading':
      ratio = big_t // n
      ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
    elif self.timestep_spacing == 'trailing':
      ratio = big_t / n
      ts = np.round(np.arange(big_t, 0, -ratio)).astype(np.int64) - 1
    else:
      raise ValueError(self.timestep_spacing)
    self.timesteps = ts

  def add_noise(self, x0, noise, t):
    a = self.alphas_cumprod[t]
    sa = (a ** F32(0.5)).reshape(-1, *([1] * (x0.ndim - 1)))
    sb = ((F32(1) - a) ** F32(0.5)).reshape(-1, *([1] * (x0.ndim - 1)))
    return sa * x0 + sb * noise

  def get_velocity(self, x0, noise, t):
    a = self.alphas_cumprod[t]
    sa = (a ** F32(0.5)).reshape(-1, *([1] * (x0.ndim - 1)))
    sb = ((F32(1) - a) ** F32(0.5)).reshape(-1, *([1] * (x0.ndim - 1)))
    return sa * noise - sb * x0

  def _x0_eps(self, out, t_abar, sample):
    a = t_abar
    b = F32(1) - a
    if self.prediction_type == 'epsilon':
      return (sample - b ** F32(0.5) * out) / a ** F32(0.5), out
    if self.prediction_type == 'sample':
      return out, (sample - a ** F32(0.5) * out) / b ** F32(0.5)
    if self.prediction_type == 'v_prediction':
      sa, sb = a ** F32(0.5), b ** F32(0.5)
      return sa * sample - sb * out, sa * out + sb * sample
    raise ValueError(self.prediction_type)


class DDPM(_Base):
  """DDPMScheduler with variance_type='fixed_small'."""

  def previous_timestep(self, t):
    if self.num_inference_steps:
      idx = int(np.nonzero(self.timesteps == t)[0][0])
      return -1 if idx == len(self.timesteps) - 1 else int(self.timesteps[idx + 1])
    return t - 1

  def step(self, out, t, sample, noise):
    """One step; `noise` plays the role of diffusers' randn draw (used only when t > 0)."""
    prev_t = self.previous_timestep(t)
    a_t = self.alphas_cumprod[t]
    a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
    b_t = F32(1) - a_t
    b_prev = F32(1) - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = F32(1) - cur_alpha
    x0, _ = self._x0_eps(out, a_t, sample)
    if self.clip_sample:
      x0 = np.clip(x0, F32(-1), F32(1))
    c0 = (a_prev ** F32(0.5) * cur_beta) / b_t
    ct = cur_alpha ** F32(0.5) * b_prev / b_t
    prev = c0 * x0 + ct * sample
    if t > 0:
      var = max((F32(1) - a_prev) / (F32(1) - a_t) * cur_beta, F32(1e-20))
      prev = prev + var ** F32(0.5) * noise
    return prev.astype(F32)


class DDIM(_Base):
  """DDIMScheduler with set_alpha_to_one=True, steps_offset=0."""

  def step(self, out, t, sample, eta=0.0, noise=None, use_clipped_model_output=False):
    prev_t = t - self.num_train_timesteps // self.num_inference_steps
    a_t = self.alphas_cumprod[t]
    a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
    b_t = F32(1) - a_t
    x0, eps = self._x0_eps(out, a_t, sample)
    if self.clip_sample:
      x0 = np.clip(x0, F32(-1), F32(1))
    if use_clipped_model_output:
      eps = (sample - a_t ** F32(0.5) * x0) / b_t ** F32(0.5)
    var = ((F32(1) - a_prev) / b_t) * (F32(1) - a_t / a_prev)
    std = F32(eta) * var ** F32(0.5)
    direction = (F32(1) - a_prev - std ** 2) ** F32(0.5) * eps
    prev = a_prev ** F32(0.5) * x0 + direction
    if eta > 0:
      prev = prev + std * noise
    return prev.astype(F32)
