"""Training loss (DDPM's simple loss, eps / x0 / v targets, optional Min-SNR-gamma weighting) and
the variational bound in bits/dim. EDM's loss is in diffusion/edm.py.

`model_fn(x_t, t) -> model_out` is a pure function: x_t [B, ...], t int32 [B], output x_t's shape.
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from diffusion import process
from diffusion.schedules import Schedule


# The per-element error of the simple loss: DDPM's squared error, or LDM's absolute one (its
# loss_type: l1, e.g. the LSUN-Churches LDM-KL-8).
LOSS_TYPES = ('l2', 'l1')


def _mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over all but the batch axis: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------- simple loss

def denoising_loss(schedule: Schedule, model_fn, x0: jnp.ndarray, t: jnp.ndarray,
                   noise: jnp.ndarray, *, prediction: str = 'eps',
                   loss_type: str = 'l2') -> jnp.ndarray:
  """Per-example mean error between the model output and its target at given t and noise.

  Args:
    schedule: the noise schedule.
    model_fn: (x_t, t [B]) -> model output.
    x0: clean data [B, ...].
    t: int32 [B] in [0, T-1].
    noise: N(0, I) of x0's shape.
    prediction: 'eps' (target = noise) | 'x0' (target = x0) | 'v' (target = velocity).
    loss_type: 'l2' (squared error) | 'l1' (absolute error).

  Returns:
    float32 [B]: mean over the non-batch axes of the squared (or absolute) error.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'loss_type must be one of {LOSS_TYPES}, got {loss_type!r}')
  x_t = process.q_sample(schedule, x0, t, noise)
  target = process.to_prediction(schedule, x0, noise, t, prediction)
  out = model_fn(x_t, t)
  err = out.astype(jnp.float32) - target.astype(jnp.float32)
  return _mean_flat(err ** 2 if loss_type == 'l2' else jnp.abs(err))


def min_snr_weight(schedule: Schedule, t: jnp.ndarray, prediction: str,
                   gamma: float) -> jnp.ndarray:
  """Min-SNR-gamma (Hang et al. 2023): per-example weights, float32 [B].

  With SNR = abar_t / (1 - abar_t), each target's MSE is weighted so that the loss equals
  min(SNR, gamma) * |x0_pred - x0|^2: eps: min(SNR, gamma) / SNR, x0: min(SNR, gamma),
  v: min(SNR, gamma) / (SNR + 1) (|v err|^2 = (SNR + 1) |x0 err|^2).
  """
  a = process.gather(schedule.alphas_cumprod, t).astype(jnp.float32)
  snr = a / (1.0 - a)
  clipped = jnp.minimum(snr, gamma)
  if prediction == 'eps':
    return clipped / snr
  if prediction == 'x0':
    return clipped
  if prediction == 'v':
    return clipped / (snr + 1.0)
  raise ValueError(f'prediction must be one of {process.PREDICTIONS}, got {prediction!r}')


def diffusion_loss(schedule: Schedule, model_fn, x0: jnp.ndarray, rng: jax.Array, *,
                   prediction: str = 'eps', min_snr_gamma: float = 0.0,
                   loss_type: str = 'l2') -> jnp.ndarray:
  """DDPM's simple loss with t ~ U{0, ..., T-1} and eps ~ N(0, I) drawn from rng.

  Args:
    schedule: the noise schedule.
    model_fn: (x_t, t int32 [B]) -> model output.
    x0: clean data [B, ...] in [-1, 1].
    rng: PRNG key.
    prediction: 'eps' | 'x0' | 'v'.
    min_snr_gamma: > 0: weight each example by `min_snr_weight` (e.g. 5, the paper's);
      0 = the unweighted simple loss.
    loss_type: 'l2' | 'l1' (`denoising_loss`).

  Returns:
    float32 [B] per-example loss (average it, or weight it, outside).
  """
  t_key, noise_key = jax.random.split(rng)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  loss = denoising_loss(schedule, model_fn, x0, t, noise, prediction=prediction,
                        loss_type=loss_type)
  if min_snr_gamma > 0:
    loss = loss * min_snr_weight(schedule, t, prediction, min_snr_gamma)
  return loss


# ------------------------------------------------------------------------ variational bound

def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_diff_ndtr(lo, hi):
  """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails."""
  # In the upper tail use Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): the accurate lower tail.
  upper = lo > 0
  a = jnp.where(upper, -hi, lo)
  b = jnp.where(upper, -lo, hi)
  log_b = log_ndtr(b)
  return log_b + jnp.log1p(-jnp.exp(log_ndtr(a) - log_b))


def discretized_gaussian_log_likelihood(x: jnp.ndarray, mean: jnp.ndarray,
                                        log_scale: jnp.ndarray) -> jnp.ndarray:
  """log P(x) of a Gaussian discretized to the 256 bins of uint8 data scaled to [-1, 1].

  Bin k (x = k / 127.5 - 1) covers [x - 1/255, x + 1/255]; the first and last bins extend to
  -inf / +inf (DDPM's decoder).

  Args:
    x: data on the grid, any shape, in [-1, 1].
    mean: Gaussian means, x's shape.
    log_scale: log standard deviations, broadcastable to x.

  Returns:
    Log probabilities in nats, x's shape.
  """
  inv_s = jnp.exp(-log_scale)
  hi = (x - mean + 1.0 / 255.0) * inv_s
  lo = (x - mean - 1.0 / 255.0) * inv_s
  log_lowest = log_ndtr(hi)
  log_highest = log_ndtr(-lo)
  log_mid = _log_diff_ndtr(lo, hi)
  return jnp.where(x < -0.999, log_lowest, jnp.where(x > 0.999, log_highest, log_mid))


def _model_log_variance(schedule: Schedule, model_variance: str) -> jnp.ndarray:
  """[T] log variance of p(x_{t-1} | x_t)."""
  if model_variance == 'fixed_small':
    return schedule.posterior_log_variance_clipped
  if model_variance == 'fixed_large':
    # betas, except at t = 0 where DDPM uses the t = 1 posterior variance (beta_0 would be too wide
    # for the decoder).
    return jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))
  raise ValueError(f"model_variance must be 'fixed_small' or 'fixed_large', got {model_variance!r}")


def prior_bpd(schedule: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
  """KL(q(x_T | x0) || N(0, I)) in bits/dim, [B]."""
  a = schedule.alphas_cumprod[-1]
  kl = normal_kl(a ** 0.5 * x0, jnp.log1p(-a), 0.0, 0.0)
  return _mean_flat(kl) / math.log(2.0)


def vb_terms(schedule: Schedule, model_fn, x0: jnp.ndarray, rng: jax.Array, *,
             prediction: str = 'eps', clip_x0: bool = True,
             model_variance: str = 'fixed_small') -> dict:
  """All terms of DDPM's variational bound on -log p(x0), in bits per dimension.

  L = L_T + sum_{t>=1} L_t + L_0 with (t 0-based as everywhere here)
    L_T = KL(q(x_T | x0) || N(0, I)),
    L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t >= 1, one x_t ~ q(x_t | x0) each,
    L_0 = -log p(x0 | x_1), DDPM's discretized Gaussian decoder.
  p(x_{t-1} | x_t) has mean q_posterior(x0_pred, x_t, t) and the fixed variance named by
  model_variance. The T terms are computed with one lax.map (T model evaluations).

  Args:
    schedule: the noise schedule.
    model_fn: (x_t, t int32 [B]) -> model output.
    x0: data [B, ...] on the uint8 grid scaled to [-1, 1].
    rng: PRNG key (one x_t draw per term).
    prediction: 'eps' | 'x0' | 'v'.
    clip_x0: clip the predicted x0 to [-1, 1] before forming the mean.
    model_variance: 'fixed_small' (posterior variance) | 'fixed_large' (betas).

  Returns:
    dict with 'total' [B], 'prior' [B] (L_T) and 'terms' [B, T] (entry 0 is L_0), bits/dim.
  """
  big_t = schedule.num_timesteps
  batch = x0.shape[0]
  model_logvar = _model_log_variance(schedule, model_variance)

  def term(t):
    tb = jnp.full((batch,), t, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape, x0.dtype)
    x_t = process.q_sample(schedule, x0, tb, noise)
    true_mean, _, true_logvar = process.q_posterior(schedule, x0, x_t, tb)
    x0_pred, _ = process.predict_x0_eps(schedule, x_t, tb, model_fn(x_t, tb), prediction)
    if clip_x0:
      x0_pred = jnp.clip(x0_pred, -1.0, 1.0)
    model_mean, _, _ = process.q_posterior(schedule, x0_pred, x_t, tb)
    logvar = model_logvar[t]
    kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, logvar))
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * logvar))
    return jnp.where(t == 0, nll, kl) / math.log(2.0)

  terms = jax.lax.map(term, jnp.arange(big_t, dtype=jnp.int32)).T
  prior = prior_bpd(schedule, x0)
  return {'total': terms.sum(axis=1) + prior, 'prior': prior, 'terms': terms}


def bits_per_dim(schedule: Schedule, model_fn, x0: jnp.ndarray, rng: jax.Array, *,
                 prediction: str = 'eps', clip_x0: bool = True,
                 model_variance: str = 'fixed_small') -> jnp.ndarray:
  """DDPM's variational bound (negative ELBO) in bits/dim, [B]; see `vb_terms`."""
  return vb_terms(schedule, model_fn, x0, rng, prediction=prediction, clip_x0=clip_x0,
                  model_variance=model_variance)['total']
