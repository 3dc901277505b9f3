"""EDM (Karras et al. 2022) beside DDPM: preconditioning, loss, sampler, and the VP bridge.

Notation: sigma is EDM's noise level in x_sigma = x0 + sigma * n, n ~ N(0, I) (data scale, no
signal shrinkage); sd = sigma_data, the data std the preconditioning assumes (0.5 for images in
[-1, 1]). A VP (DDPM) step t is the point sigma_t = sqrt((1 - abar_t) / abar_t) with
x_t = sqrt(abar_t) * x_sigma.

  the network     F(x_in, t_in): any backbone called like the U-Net / DiT (net_fn below)
  the denoiser    D(x, sigma) = c_skip x + c_out F(c_in x, noise_input(sigma))   `denoise`
  training        ln sigma ~ N(p_mean, p_std^2), loss lambda(sigma) |D - x0|^2     `edm_loss`
  the sampler     Heun on the rho = 7 sigma grid, optional churn                   `sample`
  the bridge      a DDPM model as D (`vp_denoiser`), a D as a DDPM model (`vp_model`)
  dispatch        any sampler on a model of either formulation                     `sample_model`

`net_fn(x_in, t_in) -> F` takes x_in [B, ...] and t_in float32 [B] and returns x_in's shape; a
`denoiser(x, sigma) -> D` takes x [B, ...] and sigma a scalar or [B] (float) and returns the
estimate of x0 of x's shape. Everything here is pure and elementwise over the non-batch axes.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import grids
from diffusion import process
from diffusion import samplers
from diffusion.samplers import Churn
from diffusion.schedules import Schedule

# config.diffusion.formulation: what the network is trained as (config_lib reads this by AST).
FORMULATIONS = ('ddpm', 'edm')

# EDM's defaults (Table 1 and its config F for CIFAR-10).
SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, grids.KARRAS_RHO

# t_in = NOISE_SCALE * c_noise = 250 ln(sigma); see `noise_input`.
NOISE_SCALE = 1000.0


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _batch_sigma(sigma, x):
  """sigma (scalar or [B]) as float32 [B]."""
  return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))


# ------------------------------------------------------------------------------ preconditioning

def preconditioning(sigma, sigma_data: float = SIGMA_DATA):
  """EDM's (c_skip, c_out, c_in, c_noise) at sigma (any shape; same shape out).

  c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
  c_noise = ln(s) / 4. c_in gives the network unit-variance inputs; c_skip and c_out make its
  ideal output unit-variance too (see `loss_weight`).
  """
  sigma = jnp.asarray(sigma)
  s2, sd2 = sigma ** 2, sigma_data ** 2
  c_skip = sd2 / (s2 + sd2)
  c_out = sigma * sigma_data / jnp.sqrt(s2 + sd2)
  c_in = 1.0 / jnp.sqrt(s2 + sd2)
  c_noise = jnp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


def noise_input(sigma) -> jnp.ndarray:
  """The time input t_in the backbone sees at sigma: NOISE_SCALE * c_noise = 250 ln(sigma).

  Our U-Net and DiT embed t sinusoidally with frequencies from 1 down to 1e-4 rad per unit, laid
  out for DDPM's t in 0..999. Fed raw, c_noise spans only 2.65 units over the sampler's [0.002,
  80] (-1.55 to 1.10): of a ch-128 U-Net's 64 frequencies all but the top 15 would then turn by
  less than 0.3 rad over the whole range and sit near their t = 0 values. Times 1000 the same
  range spans -1554..1096, the scale the embedding was built for (DDPM's linear schedule puts ~100
  steps per unit of ln sigma; this puts 250), so every frequency band resolves part of it. EDM's
  own DDPM++ feeds the raw ln(s) / 4 into the same embedding and trains well (its MLP amplifies
  the near-linear low channels), so this is a conditioning choice, not a correctness one; but a
  model must be sampled with the scale it was trained with, which is why training (`denoise` in
  `edm_loss`) and every sampler (`denoise` again) go through this one function.

  Args:
    sigma: float, any shape, > 0.

  Returns:
    float32 of sigma's shape.
  """
  return (NOISE_SCALE * preconditioning(jnp.asarray(sigma, jnp.float32))[3]).astype(jnp.float32)


def denoise(net_fn, x: jnp.ndarray, sigma, sigma_data: float = SIGMA_DATA) -> jnp.ndarray:
  """D(x, sigma) = c_skip x + c_out F(c_in x, noise_input(sigma)).

  Args:
    net_fn: (x_in [B, ...], t_in float32 [B]) -> F, x_in's shape.
    x: noisy data x0 + sigma n, [B, ...].
    sigma: scalar or [B], > 0.
    sigma_data: sd.

  Returns:
    The denoised estimate of x0, x's shape and dtype.
  """
  sig = _batch_sigma(sigma, x)
  c_skip, c_out, c_in, _ = (process.expand(c, x) for c in preconditioning(sig, sigma_data))
  f = net_fn((c_in * x).astype(x.dtype), noise_input(sig))
  return (c_skip * x + c_out * f.astype(jnp.float32)).astype(x.dtype)


def denoiser(net_fn, sigma_data: float = SIGMA_DATA):
  """The EDM denoiser (x, sigma) -> D of a backbone net_fn (see `denoise`)."""
  return functools.partial(denoise, net_fn, sigma_data=sigma_data)


# ------------------------------------------------------------------------------------ training

def loss_weight(sigma, sigma_data: float = SIGMA_DATA):
  """lambda(sigma) = (s^2 + sd^2) / (s sd)^2 = 1 / c_out^2.

  With it, lambda |D - x0|^2 = |F - F_target|^2 where F_target = (x0 - c_skip x) / c_out has
  unit variance at every sigma for data of std sd (EDM's derivation, Appendix B.6).
  """
  sigma = jnp.asarray(sigma)
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def training_sigmas(rng: jax.Array, batch: int, p_mean: float = P_MEAN,
                    p_std: float = P_STD) -> jnp.ndarray:
  """sigma = exp(p_mean + p_std z), z ~ N(0, 1): float32 [batch]."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch,), jnp.float32))


def denoising_loss(net_fn, x0: jnp.ndarray, sigma: jnp.ndarray, noise: jnp.ndarray, *,
                   sigma_data: float = SIGMA_DATA) -> jnp.ndarray:
  """lambda(sigma) * mean over pixels of (D(x0 + sigma n, sigma) - x0)^2 at given sigma, noise.

  Args:
    net_fn: (x_in, t_in float32 [B]) -> F.
    x0: clean data [B, ...].
    sigma: float [B], > 0.
    noise: N(0, I) of x0's shape.
    sigma_data: sd.

  Returns:
    float32 [B]. The mean (not EDM's sum) over pixels, as DDPM's simple loss here: a constant
    factor, which Adam's step does not see.
  """
  x = x0 + process.expand(sigma, x0) * noise
  d = denoise(net_fn, x.astype(x0.dtype), sigma, sigma_data)
  err = d.astype(jnp.float32) - x0.astype(jnp.float32)
  return loss_weight(sigma, sigma_data) * _mean_flat(err ** 2)


def edm_loss(net_fn, x0: jnp.ndarray, rng: jax.Array, *, sigma_data: float = SIGMA_DATA,
             p_mean: float = P_MEAN, p_std: float = P_STD) -> jnp.ndarray:
  """EDM's training loss with sigma from the log-normal and n ~ N(0, I) drawn from rng.

  Args:
    net_fn: (x_in [B, ...], t_in float32 [B]) -> F, x_in's shape (the raw backbone).
    x0: clean data [B, ...] in [-1, 1].
    rng: PRNG key.
    sigma_data, p_mean, p_std: EDM's sd, P_mean, P_std.

  Returns:
    float32 [B] per-example loss.
  """
  sigma_key, noise_key = jax.random.split(rng)
  sigma = training_sigmas(sigma_key, x0.shape[0], p_mean, p_std)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  return denoising_loss(net_fn, x0, sigma, noise, sigma_data=sigma_data)


# ------------------------------------------------------------------------------------- sampler

def sigma_steps(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                rho: float = RHO, round_sigma: Optional[Callable] = None) -> np.ndarray:
  """EDM's time steps: the rho grid (grids.karras_sigmas) of num_steps points, then 0.

  Args:
    num_steps: N, the grid points (N - 1 Heun steps and a last Euler step: 2N - 1 evaluations).
    sigma_min, sigma_max, rho: the grid.
    round_sigma: numpy sigma -> the nearest noise level a discrete model knows (`vp_round`), or
      None for a continuous model. Neighbours that round to the same level are merged.

  Returns:
    float64 [k + 1], descending, last entry 0 (k = N unless merged).
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  s = grids.karras_sigmas(num_steps, sigma_min, sigma_max, rho)
  if round_sigma is not None:
    s = round_sigma(s)
    s = s[np.append(True, np.diff(s) != 0)]
  return np.append(s, 0.0)


def num_evals(sigmas) -> int:
  """Denoiser evaluations of `sample` on these steps: 2k - 1 for k steps (35 for EDM's N = 18)."""
  return 2 * (len(sigmas) - 1) - 1


def churn_sigmas(sigmas, churn: Churn = Churn(), round_sigma: Optional[Callable] = None):
  """sigma_hat_i = sigma_i (1 + gamma_i) of each step (EDM Algorithm 2), float64 numpy [k].

  gamma_i = min(S_churn / k, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax (samplers.churn_gamma,
  the rule the discrete 'heun' / 'euler' use); rounded by round_sigma, never below sigma_i.
  """
  s = np.asarray(sigmas, np.float64)[:-1]
  s_hat = s * (1.0 + samplers.churn_gamma(Churn(*churn), s, len(s)))
  if round_sigma is not None:
    s_hat = round_sigma(s_hat)
  return np.maximum(s_hat, s)


def sample(denoiser_fn, x_init: jnp.ndarray, rng: jax.Array, *, sigmas,
           churn: Churn = Churn(), round_sigma: Optional[Callable] = None,
           clip_denoised: bool = False) -> jnp.ndarray:
  """EDM's sampler (Karras et al. 2022, Algorithms 1 and 2): Heun on every step but the last.

  From x = x_init * sigmas[0], each step i from sigma_i to sigma_{i+1}:
    churn   sigma_hat = sigma_i (1 + gamma_i), x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise z
    Euler   d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat, x' = x_hat + (sigma_{i+1} - sigma_hat) d
    Heun    x' = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2, d' = (x' - D(x', sigma_{i+1}))
            / sigma_{i+1}, on every step but the last, whose sigma_{i+1} = 0.
  The time steps are numpy constants worked out in float64 (as EDM does) before tracing; the
  steps run in one lax.scan plus the last Euler step. This is the continuous-sigma twin of
  diffusion/samplers.py's 'heun', which is tied to a schedule's discrete steps and rescales by
  sqrt(abar); the churn rule (`Churn`, `churn_gamma`) and the rho grid (grids.karras_sigmas) are
  shared with it.

  Args:
    denoiser_fn: (x [B, ...], sigma float32 scalar) -> D, x's shape.
    x_init: N(0, I) [B, ...].
    rng: PRNG key (used only with churn).
    sigmas: descending time steps ending with 0, e.g. `sigma_steps(...)`.
    churn: EDM's S_churn, S_tmin, S_tmax, S_noise (samplers.Churn); off by default.
    round_sigma: a discrete model's rounding of sigma_hat (`vp_round`); None = continuous.
    clip_denoised: clip each D to [-1, 1] (config.sampling.clip_x0; EDM does not clip).

  Returns:
    Samples, x_init's shape and dtype.
  """
  sigmas = np.asarray(sigmas, np.float64)
  if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0):
    raise ValueError(f'sigmas must descend strictly to a last 0, got {sigmas}')
  churn = Churn(*churn)
  stochastic = churn.s_churn != 0
  s_hat = churn_sigmas(sigmas, churn, round_sigma) if stochastic else sigmas[:-1]
  s_noise = churn.s_noise if stochastic else 0.0
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  s_cur, s_next = sigmas[:-1], sigmas[1:]
  # The added noise's std per step, sqrt(sigma_hat^2 - sigma^2) S_noise, in float64.
  add_std = np.sqrt(np.maximum(s_hat ** 2 - s_cur ** 2, 0.0)) * s_noise

  def den(x, s):
    d = denoiser_fn(x, s)
    return jnp.clip(d, -1.0, 1.0) if clip_denoised else d

  def euler(x, i, hat, std, nxt):
    """Churn, then an Euler step from sigma_hat: (x_hat, d, x_next)."""
    if s_noise:
      x = x + std * jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    d = (x - den(x, hat)) / hat
    return x, d, (x + (nxt - hat) * d).astype(x.dtype)

  def heun(x, step_in):
    i, hat, std, nxt = step_in
    x_hat, d, x_next = euler(x, i, hat, std, nxt)
    d2 = (x_next - den(x_next, nxt)) / nxt
    return (x_hat + (nxt - hat) * 0.5 * (d + d2)).astype(x.dtype), None

  x = (x_init * f32(sigmas[0])).astype(x_init.dtype)
  k = len(s_cur)
  if k > 1:
    steps_in = (np.arange(k - 1, dtype=np.int32), f32(s_hat[:-1]), f32(add_std[:-1]),
                f32(s_next[:-1]))
    x, _ = jax.lax.scan(heun, x, steps_in)
  # The last step, into sigma = 0, is Euler only: x_next = D(x_hat, sigma_hat).
  _, _, x = euler(x, k - 1, f32(s_hat[-1]), f32(add_std[-1]), f32(0.0))
  return x


# -------------------------------------------------------------------------- the VP <-> EDM bridge

def vp_round(schedule: Schedule):
  """numpy sigma -> the schedule's sigma_t nearest in log sigma (EDM's `round_sigma` for its
  discrete iDDPM models; the rule of samplers.py's churn and of the 'karras' grid)."""
  sig = grids.sigmas(schedule)
  log_sig = np.log(sig)

  def round_sigma(sigma):
    sigma = np.asarray(sigma, np.float64)
    return sig[np.argmin(np.abs(np.log(sigma)[..., None] - log_sig), axis=-1)]
  return round_sigma


def vp_timestep(schedule: Schedule, sigma) -> jnp.ndarray:
  """int32 t whose sigma_t is nearest sigma in log sigma (traceable; sigma any shape)."""
  log_sig = jnp.asarray(np.log(grids.sigmas(schedule)), jnp.float32)
  log_s = jnp.log(jnp.asarray(sigma, jnp.float32))
  return jnp.argmin(jnp.abs(log_s[..., None] - log_sig), axis=-1).astype(jnp.int32)


def vp_denoiser(schedule: Schedule, model_fn, prediction: str = 'eps'):
  """A DDPM-trained network as an EDM denoiser (x_sigma, sigma) -> D.

  The network sees x_sigma * sqrt(abar) = x_sigma / sqrt(1 + sigma^2) at the step t whose sigma_t
  is nearest sigma (in log sigma), and its eps / x0 / v output becomes D with abar = 1 / (1 +
  sigma^2): eps: D = x_sigma - sigma eps; x0: D = x0; v: D = sqrt(abar) (x_vp - sigma v).

  t is rounded, not interpolated: a DDPM network was trained at the T integer steps only, and
  between them it would see time embeddings it never met (the top frequency turns by 1 rad from
  one step to the next, so a half step is 0.5 rad from both). EDM does the same for its discrete
  (iDDPM) models, and `sample_model` also rounds the sampler's grid and churn to the schedule's
  levels (`vp_round`), so every evaluation falls on a trained step, where this wrapper is exact.

  Args:
    schedule: the training schedule.
    model_fn: (x_t [B, ...], t int32 [B]) -> eps / x0 / v.
    prediction: what model_fn predicts.

  Returns:
    denoiser(x [B, ...], sigma scalar or [B]) -> D, x's shape.
  """
  if prediction not in process.PREDICTIONS:
    raise ValueError(f'prediction must be one of {process.PREDICTIONS}, got {prediction!r}')

  def denoiser_fn(x, sigma):
    sig = _batch_sigma(sigma, x)
    t = vp_timestep(schedule, sig)
    s = process.expand(sig, x)
    c_in = 1.0 / jnp.sqrt(1.0 + s ** 2)  # sqrt(abar)
    x_vp = (c_in * x).astype(x.dtype)
    out = model_fn(x_vp, t).astype(jnp.float32)
    if prediction == 'eps':
      d = x - s * out
    elif prediction == 'x0':
      d = out
    else:
      d = c_in * (x_vp - s * out)
    return d.astype(x.dtype)
  return denoiser_fn


def vp_model(denoiser_fn, schedule: Schedule, prediction: str = 'x0'):
  """An EDM denoiser as a DDPM model (x_t, t) -> x0 (or eps / v) at the schedule's integer t.

  x_sigma = x_t / sqrt(abar_t) at sigma_t = sqrt((1 - abar_t) / abar_t); x0 = D(x_sigma, sigma_t)
  and eps = (x_sigma - x0) / sigma_t. x0 (the default) keeps D's precision at small sigma, where
  eps divides a small difference by a small sigma. With it every sampler of diffusion/samplers.py
  runs an EDM-trained model (prediction='x0').

  Args:
    denoiser_fn: (x [B, ...], sigma [B]) -> D.
    schedule: the schedule whose steps the samplers walk.
    prediction: what the returned model outputs: 'x0' | 'eps' | 'v'.

  Returns:
    model_fn(x_t [B, ...], t int32 [B], t >= 0) -> prediction, x_t's shape.
  """
  def model_fn(x_t, t):
    a = process.gather(schedule.alphas_cumprod, jnp.broadcast_to(t, (x_t.shape[0],)))
    sigma = jnp.sqrt((1.0 - a) / a)
    x = x_t / process.expand(jnp.sqrt(a), x_t)
    x0 = denoiser_fn(x.astype(x_t.dtype), sigma)
    if prediction == 'x0':
      return x0
    eps = (x - x0) / process.expand(sigma, x_t)
    return process.to_prediction(schedule, x0, eps.astype(x_t.dtype), t, prediction)
  return model_fn


# ------------------------------------------------------------------------------------ dispatch

def sampler_grid(schedule: Schedule, formulation: str, num_steps: int,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
  """The time steps EDM's sampler walks in `sample_model`, and its rounding of sigma.

  'edm' models: the rho grid as asked, continuous (round_sigma None). 'ddpm' models: the grid
  clamped to the schedule's [sigma_0, sigma_{T-1}] and rounded to its steps (`vp_round`), merged
  points dropped, so it may hold fewer than num_steps points; `num_evals(sigmas)` counts the
  evaluations either way.

  Returns:
    (sigmas float64 [k + 1] ending with 0, round_sigma or None).
  """
  if formulation == 'edm':
    return sigma_steps(num_steps, sigma_min, sigma_max, rho), None
  round_sigma = vp_round(schedule)
  sig = grids.sigmas(schedule)
  sigma_min, sigma_max = max(sigma_min, sig[0]), min(sigma_max, sig[-1])
  return sigma_steps(num_steps, sigma_min, sigma_max, rho, round_sigma), round_sigma


# EDM's own samplers (config.sampling.sampler), beside diffusion/samplers.py's SAMPLERS; config_lib
# reads the names by AST. 'edm' is Algorithm 2 (deterministic Algorithm 1 when S_churn = 0).
SAMPLERS = {'edm': sample}


def sample_model(schedule: Schedule, model_fn, x_init: jnp.ndarray, rng: jax.Array, *,
                 formulation: str = 'ddpm', sampler: str = 'ddpm', num_steps: int = 1000,
                 prediction: str = 'eps', clip_x0: bool = True, churn: Churn = Churn(),
                 sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, rho: float = RHO, spacing: str = 'auto',
                 strength=None, inpaint=None, resample: int = 1, **kwargs) -> jnp.ndarray:
  """Any sampler (samplers.SAMPLERS or EDM's) on a network of either formulation.

    formulation  sampler            what runs
    'ddpm'       samplers.SAMPLERS  samplers.sample on model_fn as it is
    'edm'        samplers.SAMPLERS  samplers.sample on vp_model(denoiser(model_fn)), x0 output
    'ddpm'       'edm'              `sample` on vp_denoiser(model_fn), its rho grid clamped to the
                                    schedule's [sigma_0, sigma_{T-1}] and rounded to its steps
    'edm'        'edm'              `sample` on denoiser(model_fn) in continuous sigma
  x_init is N(0, I) in every case (the samplers of samplers.py start at x_T, EDM's at
  x_init * sigma_max).

  Args:
    schedule: the training schedule ('edm' models: the one the bridge walks).
    model_fn: 'ddpm': (x_t, t int32 [B]) -> prediction; 'edm': the backbone
      (x_in, t_in float32 [B]) -> F.
    x_init, rng: as samplers.sample (x_init: the clean image with `strength`).
    formulation: 'ddpm' | 'edm'.
    sampler: a name in samplers.SAMPLERS or SAMPLERS here.
    num_steps: sampler steps (EDM's: the N of its grid).
    prediction: a 'ddpm' model's output type.
    clip_x0: clip each predicted x0 / D to [-1, 1].
    churn: EDM's stochastic churn (for 'heun', 'euler' and 'edm').
    sigma_data: an 'edm' model's sd.
    sigma_min, sigma_max, rho: EDM's sampler grid.
    spacing, strength, inpaint, resample, **kwargs: samplers.sample's (eta, ...); EDM's sampler
      takes none of spacing (other than 'auto'), strength, inpaint, resample.

  Returns:
    Samples, x_init's shape and dtype.
  """
  if formulation not in FORMULATIONS:
    raise ValueError(f'formulation must be one of {FORMULATIONS}, got {formulation!r}')
  if sampler in SAMPLERS:
    if spacing != 'auto' or strength is not None or inpaint is not None or resample != 1:
      raise ValueError(f"the {sampler!r} sampler runs its own rho grid from noise: it takes no "
                       'spacing, strength (img2img), inpaint or resample')
    den = (denoiser(model_fn, sigma_data) if formulation == 'edm' else
           vp_denoiser(schedule, model_fn, prediction))
    sigmas, round_sigma = sampler_grid(schedule, formulation, num_steps, sigma_min, sigma_max,
                                       rho)
    return sample(den, x_init, rng, sigmas=sigmas, churn=churn, round_sigma=round_sigma,
                  clip_denoised=clip_x0)
  if formulation == 'edm':
    model_fn, prediction = vp_model(denoiser(model_fn, sigma_data), schedule, 'x0'), 'x0'
  return samplers.sample(schedule, model_fn, x_init, rng, sampler=sampler, num_steps=num_steps,
                         prediction=prediction, clip_x0=clip_x0, churn=churn, spacing=spacing,
                         strength=strength, inpaint=inpaint, resample=resample, **kwargs)

