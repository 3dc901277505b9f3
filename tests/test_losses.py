"""Simple loss targets, Gaussian KL, discretized decoder likelihood, and the variational bound."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion import losses, process, schedules


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize('m1,v1,m2,v2', [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0),
                                         (1.0, 1e-2, 0.9, 3e-2), (-2.0, 4.0, 1.0, 0.25)])
def test_normal_kl_against_integration(x64, m1, v1, m2, v2):
  p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
  lo, hi = m1 - 12 * math.sqrt(v1), m1 + 12 * math.sqrt(v1)
  expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi,
                               epsabs=1e-12, limit=200)
  got = float(losses.normal_kl(m1, math.log(v1), m2, math.log(v2)))
  assert got == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_discretized_log_likelihood_against_scipy(x64):
  grid = np.arange(256) / 127.5 - 1.0
  for mean, std in [(0.0, 0.5), (0.3, 0.01), (-0.95, 0.003), (0.99, 0.2), (0.2, 1e-4)]:
    got = np.asarray(losses.discretized_gaussian_log_likelihood(
        jnp.asarray(grid), jnp.full(256, mean), jnp.full(256, math.log(std))))
    d = stats.norm(mean, std)
    lo = np.where(grid < -0.999, -np.inf, grid - 1 / 255)
    hi = np.where(grid > 0.999, np.inf, grid + 1 / 255)
    # Upper-tail bins from survival functions, where a difference of cdfs near 1 would cancel.
    with np.errstate(divide='ignore'):
      expected = np.log(np.where(lo > mean, d.sf(lo) - d.sf(hi), d.cdf(hi) - d.cdf(lo)))
    finite = expected > -600  # beyond that scipy's difference underflows to 0
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6, atol=1e-9)
    assert np.all(np.isfinite(got)), 'log-space differences keep far tails finite'
    # The 256 bins partition the real line.
    assert np.exp(got).sum() == pytest.approx(1.0, abs=1e-9)


def test_discretized_log_likelihood_far_tail_is_accurate(x64):
  # 30 standard deviations away: log P ~ -450, still a finite, accurate number.
  x, mean, std = 0.0, -0.3, 0.01
  got = float(losses.discretized_gaussian_log_likelihood(jnp.array(x), jnp.array(mean),
                                                         jnp.array(math.log(std))))
  lo, hi = (x - 1 / 255 - mean) / std, (x + 1 / 255 - mean) / std
  log_sf_lo, log_sf_hi = stats.norm.logsf(lo), stats.norm.logsf(hi)
  expected = log_sf_lo + math.log1p(-math.exp(log_sf_hi - log_sf_lo))
  assert got == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_denoising_loss_targets(prediction):
  s = schedules.get_schedule('linear', 100)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 5, 5, 2)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = jnp.array([0, 10, 50, 99], jnp.int32)

  def perfect(x_t, tt):
    # Knows the noise; recovers x0 from its input x_t, so a wrong x_t or t would show.
    a = process.alpha_bar(s, tt, x_t)
    x0_hat = (x_t - (1 - a) ** 0.5 * noise) / a ** 0.5
    return process.to_prediction(s, x0_hat, noise, tt, prediction)

  loss = losses.denoising_loss(s, perfect, x0, t, noise, prediction=prediction)
  assert loss.shape == (4,) and float(loss.max()) < 1e-8
  zero = losses.denoising_loss(s, lambda x, tt: jnp.zeros_like(x), x0, t, noise,
                               prediction=prediction)
  target = {'eps': noise, 'x0': x0, 'v': process.velocity(s, x0, noise, t)}[prediction]
  np.testing.assert_allclose(np.asarray(zero), np.asarray(jnp.mean(target ** 2, axis=(1, 2, 3))),
                             rtol=1e-5)


def test_l1_loss_is_the_mean_absolute_error_of_the_same_draw():
  """loss_type 'l1' (LDM's): per example, the mean |output - target| where 'l2' is its mean
  square, for the same t and noise; an unknown type is named."""
  s = schedules.get_schedule('linear', 100)
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 1)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = jnp.array([0, 40, 99], jnp.int32)
  half = lambda x, tt: 0.5 * x  # wrong everywhere, by an error that differs per element
  err = 0.5 * process.q_sample(s, x0, t, noise) - noise
  l1 = losses.denoising_loss(s, half, x0, t, noise, loss_type='l1')
  l2 = losses.denoising_loss(s, half, x0, t, noise)
  np.testing.assert_allclose(np.asarray(l1), np.abs(np.asarray(err)).mean(axis=(1, 2, 3)),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(l2), (np.asarray(err) ** 2).mean(axis=(1, 2, 3)),
                             rtol=1e-6)
  key = jax.random.key(0)
  a = losses.diffusion_loss(s, half, x0, key, loss_type='l1')
  b = losses.diffusion_loss(s, half, x0, key)
  assert not np.allclose(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="loss_type.*'huber'"):
    losses.denoising_loss(s, half, x0, t, noise, loss_type='huber')


def test_diffusion_loss_draws_t_uniformly():
  big_t, batch = 10, 4000
  s = schedules.get_schedule('linear', big_t)
  x0 = jnp.zeros((batch, 2))
  # An 'x0' model that outputs t: the per-example loss is t^2, revealing the drawn timesteps.
  model = lambda x, t: jnp.broadcast_to(t[:, None].astype(x.dtype), x.shape)
  loss = losses.diffusion_loss(s, model, x0, jax.random.key(3), prediction='x0')
  t = np.sqrt(np.asarray(loss))
  np.testing.assert_allclose(t, np.round(t), atol=1e-4)
  counts = np.bincount(np.round(t).astype(int), minlength=big_t)
  assert len(counts) == big_t and counts.min() > 0
  chi2 = ((counts - batch / big_t) ** 2 / (batch / big_t)).sum()
  assert chi2 < 30  # 9 dof: p ~ 4e-4
  again = losses.diffusion_loss(s, model, x0, jax.random.key(3), prediction='x0')
  np.testing.assert_array_equal(np.asarray(loss), np.asarray(again))


def _one_point_oracle(s, point, prediction):
  """The exact denoiser of a dataset holding one point: E[x0 | x_t] = point."""
  def model(x_t, t):
    x0 = jnp.broadcast_to(point, x_t.shape)
    a = process.alpha_bar(s, t, x_t)
    eps = (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5
    return process.to_prediction(s, x0, eps, t, prediction)
  return model


def test_bits_per_dim_of_a_perfect_model_on_one_point(x64):
  big_t = 50
  # beta_0 = 1e-6 makes the decoder's std (~1e-3) narrow against the bin half-width 1/255.
  s = schedules.get_schedule('linear', big_t, dtype=jnp.float64, beta_start=1e-6, beta_end=0.2)
  point = 51 / 127.5 - 1.0  # on the uint8 grid
  x0 = jnp.full((3, 4, 4, 1), point)

  @jax.jit  # one compilation for all models (threefry compiles slowly on these CPUs)
  def run(rng):
    vbs = {p: losses.vb_terms(s, _one_point_oracle(s, point, p), x0, rng, prediction=p)
           for p in ('eps', 'x0', 'v')}
    total = losses.bits_per_dim(s, _one_point_oracle(s, point, 'eps'), x0, rng)
    wrong = losses.bits_per_dim(s, _one_point_oracle(s, -point, 'x0'), x0, rng, prediction='x0')
    return vbs, total, wrong

  vbs, total, wrong = run(jax.random.key(0))
  std = math.exp(0.5 * float(s.posterior_log_variance_clipped[0]))
  p_bin = stats.norm.cdf(1 / 255 / std) - stats.norm.cdf(-1 / 255 / std)
  a = float(s.alphas_cumprod[-1])
  prior = 0.5 * (-math.log(1 - a) - a + a * point ** 2) / math.log(2)
  for prediction, vb in vbs.items():
    assert vb['terms'].shape == (3, big_t), prediction
    # KL terms vanish: the model's mean is the true posterior mean, and the variances are equal.
    assert float(jnp.abs(vb['terms'][:, 1:]).max()) < 1e-8, prediction
    # Decoder: the mean is the point itself, with the fixed std sqrt(posterior_variance[1]).
    np.testing.assert_allclose(np.asarray(vb['terms'][:, 0]), -math.log2(p_bin), rtol=1e-7)
    # Prior: KL(N(sqrt(a) x0, 1 - a) || N(0, 1)) per dim, in bits.
    np.testing.assert_allclose(np.asarray(vb['prior']), prior, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(total), -math.log2(p_bin) + prior, rtol=1e-7)
  assert float(total.max()) < 0.01  # vs 8 bits/dim for uniform noise
  assert float(wrong.min()) > float(total.max()) + 10  # a model denoising to the wrong point


def test_fixed_large_kl_terms(x64):
  """With the betas as model variance, a perfect mean leaves KL(N(m, v_post) || N(m, beta))."""
  s = schedules.get_schedule('linear', 20, dtype=jnp.float64, beta_end=0.3)
  point = 0.2
  x0 = jnp.full((2, 3), point)
  vb = losses.vb_terms(s, _one_point_oracle(s, point, 'eps'), x0, jax.random.key(0),
                       model_variance='fixed_large')
  v, b = np.asarray(s.posterior_variance)[1:], np.asarray(s.betas)[1:]
  expected = 0.5 * (-1 + np.log(b / v) + v / b) / math.log(2)
  np.testing.assert_allclose(np.asarray(vb['terms'][0, 1:]), expected, rtol=1e-7)
  with pytest.raises(ValueError, match='model_variance'):
    losses.vb_terms(s, _one_point_oracle(s, point, 'eps'), x0, jax.random.key(0),
                    model_variance='learned')
