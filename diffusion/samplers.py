"""Samplers for discrete-time diffusion models: one pure step function each, and one loop.

Every sampler walks a grid of training timesteps t_0 > t_1 > ... > t_{k-1} (diffusion/grids.py:
the grid is chosen apart from the sampler, as k-diffusion separates `sigmas` from its samplers)
and ends at the clean end t = -1 (abar = 1). The network is a pure function
`model_fn(x_t, t) -> model_out` with t int32 [B] and model_out of x_t's shape, predicting 'eps',
'x0' or 'v'.

Samplers (`SAMPLERS`), with their default grid (config.sampling.spacing = 'auto'):
  'ddpm'             ancestral sampling (Ho et al. 2020), respaced when num_steps < T. leading
  'ddim'             DDIM(eta) (Song et al. 2021); eta = 1 is DDPM on the same steps.  leading
  'dpm_solver_pp_2m' DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep.    dpm
  'dpm_solver_pp_2m_sde'  its stochastic form (diffusers' 'sde-dpmsolver++'): same steps, fresh
                     noise at each, like the ancestral sampler.                         dpm
  'heun'             EDM's second-order Heun ODE solver (Karras et al. 2022).           karras
  'euler'            k-diffusion's Euler step in sigma space; with the exact network and no
                     churn it equals DDIM(eta 0) with use_clipped_model_output.         karras
  'euler_ancestral'  k-diffusion's Euler-ancestral (eta 1): DDPM's posterior noise, so it
                     equals DDIM(eta 1) with use_clipped_model_output.                  karras

'heun' and 'euler' take EDM's stochastic churn (`Churn`: S_churn, S_tmin, S_tmax, S_noise): before
a step at sigma in [S_tmin, S_tmax] the sample is noised up to sigma_hat = sigma (1 + gamma),
gamma = min(S_churn / n, sqrt(2) - 1), and the step starts from sigma_hat. A DDPM network only
knows its T discrete noise levels, so sigma_hat is rounded to the nearest of them, as EDM's
`round_sigma` does for its discrete (iDDPM) models.

`ddpm_step` and `ddim_step` reproduce diffusers' DDPMScheduler.step (variance_type='fixed_small')
and DDIMScheduler.step (set_alpha_to_one=True, use_clipped_model_output=False) to float32
rounding. To add a sampler, write a function with the signature of `_ddpm` below and name it in
`SAMPLERS`; `sample` runs any of them, on any grid, in one lax.scan.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import grids
from diffusion import process
from diffusion.grids import timesteps  # noqa: F401  (public: diffusion.samplers.timesteps)
from diffusion.schedules import Schedule

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# ------------------------------------------------------------------------------------ the steps

def _abar(schedule: Schedule, t, x):
  return process.alpha_bar(schedule, t, x)


def _maybe_clip(x0, clip_x0: bool):
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def _step_terms(schedule, x_t, model_out, t, t_prev, prediction, clip_x0):
  """abar_t, abar_{t_prev}, the (clipped) x0 and the eps implied by the raw model output."""
  x0, eps = process.predict_x0_eps(schedule, x_t, t, model_out, prediction)
  return _abar(schedule, t, x_t), _abar(schedule, t_prev, x_t), _maybe_clip(x0, clip_x0), eps


def ddpm_step(schedule: Schedule, x_t: jnp.ndarray, model_out: jnp.ndarray, t, t_prev, *,
              prediction: str = 'eps', clip_x0: bool = True, noise) -> jnp.ndarray:
  """One ancestral step x_t -> x_{t_prev} (diffusers' DDPMScheduler.step, 'fixed_small').

  With abar = abar_t, abar' = abar_{t_prev} (1 at t_prev = -1) and beta = 1 - abar / abar':
  mean = sqrt(abar') beta / (1 - abar) * x0 + sqrt(abar / abar') (1 - abar') / (1 - abar) * x_t,
  variance = max((1 - abar') / (1 - abar) * beta, 1e-20); noise is added only where t > 0. With
  t_prev = t - 1 this is the posterior q(x_{t-1} | x_t, x0_pred); with an earlier t_prev it is the
  respaced chain's posterior.

  Args:
    schedule: the noise schedule.
    x_t: current sample, [B, ...].
    model_out: network output at (x_t, t), x_t's shape.
    t: int, scalar or [B], in [0, T-1].
    t_prev: int, scalar or [B], in [-1, t-1].
    prediction: what model_out is: 'eps' | 'x0' | 'v'.
    clip_x0: clip the predicted x0 to [-1, 1].
    noise: N(0, I) of x_t's shape, or None for the mean alone.

  Returns:
    x_{t_prev}, x_t's shape and dtype.
  """
  a_t, a_prev, x0, _ = _step_terms(schedule, x_t, model_out, t, t_prev, prediction, clip_x0)
  b_t = 1 - a_t
  b_prev = 1 - a_prev
  cur_alpha = a_t / a_prev
  cur_beta = 1 - cur_alpha
  mean = (a_prev ** 0.5 * cur_beta) / b_t * x0 + cur_alpha ** 0.5 * b_prev / b_t * x_t
  if noise is None:
    return mean.astype(x_t.dtype)
  var = jnp.maximum(b_prev / b_t * cur_beta, 1e-20)
  add = process.expand(jnp.asarray(t) > 0, x_t)
  return jnp.where(add, mean + var ** 0.5 * noise, mean).astype(x_t.dtype)


def ddim_step(schedule: Schedule, x_t: jnp.ndarray, model_out: jnp.ndarray, t, t_prev, *,
              eta: float = 0.0, prediction: str = 'eps', clip_x0: bool = False,
              use_clipped_model_output: bool = False,
              noise: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """One DDIM step x_t -> x_{t_prev} (diffusers' DDIMScheduler.step).

  x_prev = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z, with
  sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'), abar' = 1 at t_prev = -1. By
  default eps is the one implied by the model output, not recomputed from the clipped x0, as in
  diffusers; `use_clipped_model_output` recomputes it, eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar),
  which keeps the step consistent when clipping bites (strong classifier-free guidance).

  Args:
    schedule: the noise schedule.
    x_t: current sample, [B, ...].
    model_out: network output at (x_t, t), x_t's shape.
    t: int, scalar or [B], in [0, T-1].
    t_prev: int, scalar or [B], in [-1, t-1].
    eta: 0 = deterministic (the probability-flow ODE's DDIM discretization); 1 = DDPM's variance.
    prediction: what model_out is: 'eps' | 'x0' | 'v'.
    clip_x0: clip the predicted x0 to [-1, 1].
    use_clipped_model_output: recompute eps from the clipped x0 (diffusers' option of that name).
    noise: N(0, I) of x_t's shape; required when eta > 0.

  Returns:
    x_{t_prev}, x_t's shape and dtype.
  """
  if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
    raise ValueError('ddim_step needs noise when eta != 0')
  a_t, a_prev, x0, eps = _step_terms(schedule, x_t, model_out, t, t_prev, prediction, clip_x0)
  b_t = 1 - a_t
  b_prev = 1 - a_prev
  if use_clipped_model_output:
    eps = (x_t - a_t ** 0.5 * x0) / b_t ** 0.5
  var = (b_prev / b_t) * (1 - a_t / a_prev)
  std = eta * var ** 0.5
  # Rounding can push 1 - abar' - sigma^2 a hair below 0 at eta = 1.
  direction = jnp.maximum(1 - a_prev - std ** 2, 0.0) ** 0.5 * eps
  x_prev = a_prev ** 0.5 * x0 + direction
  if noise is not None:
    x_prev = x_prev + std * noise
  return x_prev.astype(x_t.dtype)


# ------------------------------------------------------------------ samplers for the sample loop

class Churn(NamedTuple):
  """EDM's stochastic churn (Karras et al. 2022, Algorithm 2) for 'heun' and 'euler'.

  s_churn 0 (the default) is the deterministic sampler. EDM's ImageNet-64 setting is
  Churn(40, 0.05, 50, 1.003); its CIFAR-10 VP/VE models sample best deterministically.
  """
  s_churn: float = 0.0  # total added noise over the n steps, as EDM's S_churn
  s_tmin: float = 0.0  # churn only at sigma >= s_tmin ...
  s_tmax: float = float('inf')  # ... and sigma <= s_tmax (sigma_edm = sqrt((1 - abar) / abar))
  s_noise: float = 1.0  # scale of the added noise (EDM: slightly > 1 offsets over-denoising)


class StepOptions(NamedTuple):
  """Static options every sampler step receives."""
  prediction: str = 'eps'
  clip_x0: bool = True
  eta: float = 0.0
  use_clipped_model_output: bool = False
  churn: Churn = Churn()
  num_steps: int = 1  # n, the churn's S_churn / n


def _call(model_fn: ModelFn, x, t):
  """Evaluates the model at a scalar timestep for the whole batch."""
  return model_fn(x, jnp.full((x.shape[0],), t, dtype=jnp.int32))


def _x0_of(schedule, model_fn, x, t, opts: StepOptions):
  x0, _ = process.predict_x0_eps(schedule, x, t, _call(model_fn, x, t), opts.prediction)
  return _maybe_clip(x0, opts.clip_x0)


def _edm_sigma(schedule, t, x):
  """Karras et al.'s sigma = sqrt((1 - abar) / abar), 0 at t = -1.

  x_t / sqrt(abar) = x0 + sigma eps.
  """
  a = _abar(schedule, t, x)
  return ((1 - a) / a) ** 0.5


# Every sampler step has this signature:
#   step(schedule, model_fn, x, t, t_prev, state, key, opts) -> (x_prev, state)
# with t, t_prev int32 scalars (t_prev = -1 at the last step), state a pytree the sampler carries
# between steps (initialised by the registry's init_state(x)), key a PRNG key for this step.

def _ddpm(schedule, model_fn, x, t, t_prev, state, key, opts):
  out = _call(model_fn, x, t)
  noise = jax.random.normal(key, x.shape, x.dtype)
  return ddpm_step(schedule, x, out, t, t_prev, prediction=opts.prediction,
                   clip_x0=opts.clip_x0, noise=noise), state


def _ddim(schedule, model_fn, x, t, t_prev, state, key, opts):
  out = _call(model_fn, x, t)
  noise = jax.random.normal(key, x.shape, x.dtype) if opts.eta != 0 else None
  return ddim_step(schedule, x, out, t, t_prev, eta=opts.eta, prediction=opts.prediction,
                   clip_x0=opts.clip_x0,
                   use_clipped_model_output=opts.use_clipped_model_output, noise=noise), state


def _dpm_solver_pp_2m_init(x):
  # (x0 prediction of the previous step, its timestep); -2 marks "no previous step".
  return (jnp.zeros_like(x), jnp.asarray(-2, jnp.int32))


def _dpm_solver_pp_2m(schedule, model_fn, x, t, t_prev, state, key, opts, sde=False):
  """DPM-Solver++(2M), midpoint form as in diffusers: first order at the first and last step.

  In log-SNR lambda = -log(sigma_edm), one step from s = t to t' = t_prev is
    ODE: x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) (D0 + D1/2),
    SDE: x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) (D0 + D1/2)
              + sigma' sqrt(1 - e^{-2h}) z,  z ~ N(0, I),
  h = lambda' - lambda, with alpha = sqrt(abar), sigma = sqrt(1 - abar), D0 the current x0
  prediction and D1 = (D0 - D_prev) h / h_prev the finite difference with the previous step's one
  (0 on first order steps). The SDE form (diffusers' 'sde-dpmsolver++', k-diffusion's
  'DPM-Solver++(2M) SDE') solves the reverse SDE instead of the probability-flow ODE: like the
  ancestral sampler, it injects fresh noise at every step. e^{-h} = sigma_edm' / sigma_edm stays
  finite when t' is the clean end, where both forms return D0.
  """
  prev_x0, prev_t = state
  x0 = _x0_of(schedule, model_fn, x, t, opts)
  a_t, a_p = _abar(schedule, t, x), _abar(schedule, t_prev, x)
  s_t, s_p = _edm_sigma(schedule, t, x), _edm_sigma(schedule, t_prev, x)
  exp_neg_h = s_p / s_t
  second = (prev_t >= 0) & (t_prev >= 0)
  # Safe stand-ins where the second-order branch is not taken (log 0, division by 0).
  s_p_safe = jnp.where(second, s_p, 1.0)
  s_s1 = jnp.where(second, _edm_sigma(schedule, jnp.maximum(prev_t, 0), x), 2.0)
  h = jnp.log(s_t) - jnp.log(s_p_safe)
  h_prev = jnp.log(s_s1) - jnp.log(s_t)
  d1 = jnp.where(second, (x0 - prev_x0) * (h / jnp.where(second, h_prev, 1.0)), 0.0)
  sigma_ratio = ((1 - a_p) / (1 - a_t)) ** 0.5
  if sde:
    one_minus = 1 - exp_neg_h ** 2
    noise = jax.random.normal(key, x.shape, x.dtype)
    x_next = (sigma_ratio * exp_neg_h * x + a_p ** 0.5 * one_minus * (x0 + 0.5 * d1)
              + (1 - a_p) ** 0.5 * one_minus ** 0.5 * noise)
  else:
    x_next = sigma_ratio * x - a_p ** 0.5 * (exp_neg_h - 1) * (x0 + 0.5 * d1)
  return x_next.astype(x.dtype), (x0, jnp.asarray(t, jnp.int32))


def _dpm_solver_pp_2m_sde(schedule, model_fn, x, t, t_prev, state, key, opts):
  return _dpm_solver_pp_2m(schedule, model_fn, x, t, t_prev, state, key, opts, sde=True)


def churn_gamma(churn: Churn, sigma, num_steps: int):
  """EDM's gamma_i = min(S_churn / n, sqrt(2) - 1) where S_tmin <= sigma <= S_tmax, else 0.

  sigma: numpy or jnp, any shape (diffusion/edm.py's continuous sampler uses the same rule).
  """
  in_range = (sigma >= churn.s_tmin) & (sigma <= churn.s_tmax)
  return in_range * min(churn.s_churn / num_steps, 2 ** 0.5 - 1)


def _churn(schedule, x, t, key, opts: StepOptions):
  """EDM's churn before a step from t: returns (x at t_hat, t_hat), t_hat >= t on the grid of the
  schedule's T noise levels (x, t unchanged when churn is off or sigma_t is outside its range).

  In y = x / sqrt(abar): y_hat = y + sqrt(sigma_hat^2 - sigma^2) * s_noise * z.
  """
  c = opts.churn
  if c.s_churn == 0:
    return x, t
  sig = np.sqrt((1 - np.asarray(schedule.alphas_cumprod, np.float64))
                / np.asarray(schedule.alphas_cumprod, np.float64))
  log_sig = jnp.asarray(np.log(sig), jnp.float32)
  s_t = _edm_sigma(schedule, t, x).reshape(())  # scalar t: every row shares it
  gamma = churn_gamma(c, s_t, opts.num_steps)
  target = jnp.log(s_t * (1 + gamma))
  t_hat = jnp.maximum(jnp.argmin(jnp.abs(log_sig - target)).astype(jnp.int32),
                      jnp.asarray(t, jnp.int32))
  s_hat = _edm_sigma(schedule, t_hat, x)
  y_hat = x / _abar(schedule, t, x) ** 0.5 + jnp.sqrt(jnp.maximum(
      s_hat ** 2 - s_t ** 2, 0.0)) * c.s_noise * jax.random.normal(key, x.shape, x.dtype)
  x_hat = y_hat * _abar(schedule, t_hat, x) ** 0.5
  # No churn where gamma rounds to t itself: x unchanged, not rescaled through y (rounding).
  return jnp.where(t_hat > t, x_hat, x).astype(x.dtype), t_hat


def _heun(schedule, model_fn, x, t, t_prev, state, key, opts, second_order=True):
  """EDM Heun step in y = x / sqrt(abar) = x0 + sigma eps: dy/dsigma = (y - D(y, sigma)) / sigma.

  The Euler predictor goes to sigma' = sigma_edm(t_prev); the trapezoidal corrector evaluates the
  model at t_prev. Steps into t_prev = 0 (the schedule's smallest sigma) and into the clean end
  are Euler only. EDM corrects every step but the last, whose corrector would divide by sigma =
  0; its last corrected step lands on sigma_min, where its preconditioned network is nearly the
  identity. A DDPM network is least accurate at t = 0 (on the digits default its eps error there
  is twice that at t = 100), and the corrector weighs that eps by (sigma' - sigma) / 2, which at
  10 steps is 16.6x the weight DDIM gives it: the images came out speckled. With
  second_order=False this is k-diffusion's Euler step.
  """
  x, t = _churn(schedule, x, t, key, opts)
  a_t, a_p = _abar(schedule, t, x), _abar(schedule, t_prev, x)
  s_t, s_p = _edm_sigma(schedule, t, x), _edm_sigma(schedule, t_prev, x)
  y = x / a_t ** 0.5
  d = (y - _x0_of(schedule, model_fn, x, t, opts)) / s_t
  y_euler = y + (s_p - s_t) * d
  if not second_order:
    return (y_euler * a_p ** 0.5).astype(x.dtype), state

  def correct(_):
    d2 = (y_euler - _x0_of(schedule, model_fn, y_euler * a_p ** 0.5, t_prev, opts)) / s_p
    return y + (s_p - s_t) * 0.5 * (d + d2)

  y_next = jax.lax.cond(_heun_corrects(t_prev), correct, lambda _: y_euler, None)
  return (y_next * a_p ** 0.5).astype(x.dtype), state


def _euler(schedule, model_fn, x, t, t_prev, state, key, opts):
  return _heun(schedule, model_fn, x, t, t_prev, state, key, opts, second_order=False)


def _euler_ancestral(schedule, model_fn, x, t, t_prev, state, key, opts):
  """k-diffusion's Euler-ancestral (eta 1): an Euler step down to sigma_down, then fresh noise of
  std sigma_up, with sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2 and
  sigma_down^2 = sigma'^2 - sigma_up^2; in y = x / sqrt(abar) that is DDPM's posterior."""
  a_t, a_p = _abar(schedule, t, x), _abar(schedule, t_prev, x)
  s_t, s_p = _edm_sigma(schedule, t, x), _edm_sigma(schedule, t_prev, x)
  y = x / a_t ** 0.5
  d = (y - _x0_of(schedule, model_fn, x, t, opts)) / s_t
  s_up = jnp.sqrt(jnp.maximum(s_p ** 2 * (s_t ** 2 - s_p ** 2) / s_t ** 2, 0.0))
  s_down = jnp.sqrt(jnp.maximum(s_p ** 2 - s_up ** 2, 0.0))
  y_next = y + (s_down - s_t) * d + s_up * jax.random.normal(key, x.shape, x.dtype)
  return (y_next * a_p ** 0.5).astype(x.dtype), state


def _heun_corrects(t_prev):
  return jnp.asarray(t_prev) > 0


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registry entry.

  Attributes:
    step: the step function (signature above).
    default_grid: the grid `spacing='auto'` means for this sampler (diffusion/grids.py).
    init_state: x -> the state pytree carried into the first step.
    evals: t_prev -> model evaluations of the step that ends at t_prev (int, numpy).
  """
  step: Callable[..., Any]
  default_grid: str = 'leading'
  init_state: Callable[[jnp.ndarray], Any] = lambda x: ()
  evals: Callable[[np.ndarray], np.ndarray] = lambda t_prev: np.ones_like(t_prev)


SAMPLERS: dict[str, Sampler] = {
    'ddpm': Sampler(_ddpm),
    'ddim': Sampler(_ddim),
    'dpm_solver_pp_2m': Sampler(_dpm_solver_pp_2m, 'dpm', init_state=_dpm_solver_pp_2m_init),
    'dpm_solver_pp_2m_sde': Sampler(_dpm_solver_pp_2m_sde, 'dpm',
                                    init_state=_dpm_solver_pp_2m_init),
    'heun': Sampler(_heun, 'karras', evals=lambda t_prev: np.where(t_prev > 0, 2, 1)),
    'euler': Sampler(_euler, 'karras'),
    'euler_ancestral': Sampler(_euler_ancestral, 'karras'),
}

CHURN_SAMPLERS = ('heun', 'euler')  # the samplers that take `churn`


def _get(sampler: str) -> Sampler:
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}')
  return SAMPLERS[sampler]


def grid_name(sampler: str, spacing: str = 'auto') -> str:
  """The grid a sampler runs on: `spacing`, or its default grid when spacing is 'auto'."""
  return _get(sampler).default_grid if spacing == 'auto' else spacing


def schedule_steps(sampler: str, schedule: Schedule, num_steps: int, spacing: str = 'auto',
                   strength: Optional[float] = None):
  """The (t, t_prev) pairs `sample` runs, as two int32 numpy arrays [k] (k = steps run)."""
  return grids.step_pairs(grid_name(sampler, spacing), schedule, num_steps, strength)


def num_model_evals(sampler: str, schedule: Schedule, num_steps: int, *, spacing: str = 'auto',
                    strength: Optional[float] = None, resample: int = 1) -> int:
  """Model evaluations of one `sample` call (per example batch).

  Args:
    sampler: registry name.
    schedule: the training schedule (the 'karras' grid depends on it).
    num_steps: sampler steps n.
    spacing: the grid (see `grid_name`).
    strength: SDEdit strength (None = full chain).
    resample: RePaint repetitions per step.

  Returns:
    The count; e.g. 'ddpm'/'ddim'/'dpm_solver_pp_2m': the number of steps; 'heun': two per step
    except the steps into t = 0 and into the clean end.
  """
  _, prev = schedule_steps(sampler, schedule, num_steps, spacing, strength)
  return int(resample * np.sum(_get(sampler).evals(prev)))


# ------------------------------------------------------------------------------------ the loop

def sample(schedule: Schedule, model_fn: ModelFn, x_init: jnp.ndarray, rng: jax.Array, *,
           sampler: str = 'ddpm', num_steps: int = 1000, spacing: str = 'auto',
           eta: float = 0.0, prediction: str = 'eps', clip_x0: bool = True,
           use_clipped_model_output: bool = False, strength: Optional[float] = None,
           inpaint: Optional[tuple[jnp.ndarray, jnp.ndarray]] = None,
           resample: int = 1, churn: Churn = Churn()) -> jnp.ndarray:
  """Generates samples with the named sampler in one lax.scan over its steps.

  All keyword arguments are static (Python values); wrap in jax.jit with model_fn closed over (or
  partial'ed) to compile once per sampler and step count. The timestep lists are numpy constants.

  Args:
    schedule: the training noise schedule (T = schedule.num_timesteps).
    model_fn: (x_t [B, ...], t int32 [B]) -> model output of x_t's shape.
    x_init: [B, ...]: N(0, I) noise (x_T); with `strength`, the clean input image in [-1, 1].
    rng: PRNG key for the sampler's noise.
    sampler: name in SAMPLERS.
    num_steps: n sampler steps over the T training steps ('ddpm' with n < T is respaced).
    spacing: the time grid (diffusion/grids.py), or 'auto' for the sampler's default.
    eta: DDIM stochasticity (ddim only).
    prediction: what model_fn predicts: 'eps' | 'x0' | 'v'.
    clip_x0: clip each predicted x0 to [-1, 1].
    use_clipped_model_output: ddim only: recompute eps from the clipped x0 (see ddim_step). The
      other samplers step with x0 alone, so clipping already reaches all of their update.
    strength: SDEdit (img2img): in [0, 1]; run the last int(n * strength) steps starting from
      x_init noised by q_sample to the first of them. 0 returns x_init unchanged.
    inpaint: (known [B, ...], mask of x's shape or broadcastable, 1 = known). After every step the
      known region is replaced by q_sample(known, t_prev) (by `known` itself at the end), so the
      returned sample equals `known` exactly where mask = 1.
    resample: RePaint resampling: every step is repeated `resample` times, jumping back from
      t_prev to t with q(x_t | x_{t_prev}) between repetitions.
    churn: EDM's stochastic churn for 'heun' and 'euler' (`Churn`; off by default).

  Returns:
    x0 samples, x_init's shape and dtype.
  """
  spec = _get(sampler)
  churn = Churn(*churn)
  if churn.s_churn != 0 and sampler not in CHURN_SAMPLERS:
    raise ValueError(f'churn is for the samplers {CHURN_SAMPLERS}, not {sampler!r}')
  ts, ts_prev = schedule_steps(sampler, schedule, num_steps, spacing, strength)
  opts = StepOptions(prediction=prediction, clip_x0=clip_x0, eta=eta,
                     use_clipped_model_output=use_clipped_model_output, churn=churn,
                     num_steps=max(len(ts), 1))
  if len(ts) == 0:
    return x_init
  if resample < 1:
    raise ValueError(f'resample must be >= 1, got {resample}')
  init_key, loop_key = jax.random.split(rng)
  x = x_init
  if strength is not None:
    x = process.q_sample(schedule, x_init, int(ts[0]),
                         jax.random.normal(init_key, x_init.shape, x_init.dtype))
  if inpaint is not None:
    known, mask = inpaint
    mask = jnp.asarray(mask, x.dtype)

  def one_step(x, t, t_prev, state, key):
    step_key, known_key = jax.random.split(key)
    x_prev, state = spec.step(schedule, model_fn, x, t, t_prev, state, step_key, opts)
    if inpaint is not None:
      noisy_known = process.q_sample(schedule, known, t_prev,
                                     jax.random.normal(known_key, known.shape, known.dtype))
      x_prev = mask * noisy_known + (1 - mask) * x_prev
    return x_prev.astype(x.dtype), state

  def body(carry, step_in):
    x, state = carry
    i, t, t_prev = step_in
    key = jax.random.fold_in(loop_key, i)
    if resample == 1:
      return one_step(x, t, t_prev, state, key), None
    a_ratio = _abar(schedule, t, x) / _abar(schedule, t_prev, x)

    def repeat(j, c):
      x_in, _, _ = c
      k_step, k_back = jax.random.split(jax.random.fold_in(key, j))
      x_out, state_out = one_step(x_in, t, t_prev, state, k_step)
      # Jump back to t with q(x_t | x_{t_prev}) for the next repetition (unused after the last).
      back = (a_ratio ** 0.5 * x_out +
              (1 - a_ratio) ** 0.5 * jax.random.normal(k_back, x.shape, x.dtype))
      return back.astype(x.dtype), x_out, state_out

    _, x_out, state_out = jax.lax.fori_loop(0, resample, repeat, (x, x, state))
    return (x_out, state_out), None

  steps_in = (np.arange(len(ts), dtype=np.int32), ts, ts_prev)
  (x, _), _ = jax.lax.scan(body, (x, spec.init_state(x)), steps_in)
  return x
