"""Forward process, posterior and prediction conversions: closed forms (float64) and diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers_reference as ref
from diffusion import process, schedules


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _data(shape, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, shape), rng.standard_normal(shape)


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_q_posterior_is_the_gaussian_product(x64, name):
  """q(x_{t-1} | x_t, x0) from Bayes with q(x_{t-1} | x0) and q(x_t | x_{t-1})."""
  s = schedules.get_schedule(name, 100, dtype=jnp.float64)
  t = np.array([1, 2, 37, 99])
  x0, x_t = _data((4, 3, 2))
  mean, var, log_var = process.q_posterior(s, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t))
  abar = np.asarray(s.alphas_cumprod)
  a_prev, a_t = abar[t - 1], abar[t]
  alpha = a_t / a_prev
  beta = 1 - alpha
  # Prior N(sqrt(a_prev) x0, 1 - a_prev) on x_{t-1}; likelihood N(sqrt(alpha) x_{t-1}, beta) of x_t.
  precision = 1 / (1 - a_prev) + alpha / beta
  exp_var = 1 / precision
  b = lambda v: v[:, None, None]
  exp_mean = b(exp_var) * (b(np.sqrt(a_prev) / (1 - a_prev)) * x0 + b(np.sqrt(alpha) / beta) * x_t)
  np.testing.assert_allclose(np.asarray(mean), exp_mean, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.asarray(var), np.broadcast_to(b(exp_var), x0.shape), rtol=1e-10)
  np.testing.assert_allclose(np.asarray(log_var), np.log(np.asarray(var)), rtol=1e-10)


def test_q_posterior_at_t0_is_x0(x64):
  s = schedules.get_schedule('linear', 100, dtype=jnp.float64)
  x0, x_t = _data((2, 5))
  mean, var, log_var = process.q_posterior(s, jnp.asarray(x0), jnp.asarray(x_t), 0)
  np.testing.assert_allclose(np.asarray(mean), x0, rtol=1e-12)
  assert np.all(np.asarray(var) == 0)
  np.testing.assert_allclose(np.asarray(log_var), np.log(float(s.posterior_variance[1])))


@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_prediction_round_trip(x64, prediction):
  s = schedules.get_schedule('cosine', 1000, dtype=jnp.float64)
  x0, eps = map(jnp.asarray, _data((5, 4, 4, 2), seed=1))
  t = jnp.array([0, 1, 500, 990, 999])
  x_t = process.q_sample(s, x0, t, eps)
  out = process.to_prediction(s, x0, eps, t, prediction)
  x0_hat, eps_hat = process.predict_x0_eps(s, x_t, t, out, prediction)
  # Recovering x0 from eps at t = 999 divides by sqrt(abar) ~ 5e-5: allow for that in float64.
  np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), rtol=1e-9, atol=1e-9)


def test_velocity_identities(x64):
  s = schedules.get_schedule('linear', 1000, dtype=jnp.float64)
  x0, eps = map(jnp.asarray, _data((3, 7), seed=2))
  t = jnp.array([0, 400, 999])
  a = np.asarray(s.alphas_cumprod)[np.asarray(t)][:, None]
  v = process.velocity(s, x0, eps, t)
  np.testing.assert_allclose(np.asarray(v), np.sqrt(a) * eps - np.sqrt(1 - a) * x0, rtol=1e-12)
  x_t = process.q_sample(s, x0, t, eps)
  # x0 = sqrt(a) x_t - sqrt(1 - a) v and eps = sqrt(a) v + sqrt(1 - a) x_t (rotation by phi).
  np.testing.assert_allclose(np.asarray(np.sqrt(a) * x_t - np.sqrt(1 - a) * v), x0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(np.sqrt(a) * v + np.sqrt(1 - a) * x_t), eps, atol=1e-12)
  # ||x_t||^2 + ||v||^2 = ||x0||^2 + ||eps||^2 elementwise pairs.
  np.testing.assert_allclose(np.asarray(x_t ** 2 + v ** 2), np.asarray(x0 ** 2 + eps ** 2),
                             rtol=1e-12)


def test_q_sample_statistics():
  s = schedules.get_schedule('linear', 1000)
  n = 200_000
  x0 = jnp.full((n,), 0.7)
  for t in (0, 250, 999):
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), t), (n,))
    x_t = np.asarray(process.q_sample(s, x0, t, noise), dtype=np.float64)
    a = float(s.alphas_cumprod[t])
    se_mean = np.sqrt((1 - a) / n)
    assert abs(x_t.mean() - np.sqrt(a) * 0.7) < 5 * se_mean + 1e-6
    assert abs(x_t.var() - (1 - a)) < 5 * (1 - a) * np.sqrt(2 / n)


def test_clean_end_and_broadcasting():
  s = schedules.get_schedule('cosine', 100)
  x0, eps = map(lambda a: jnp.asarray(a, jnp.float32), _data((3, 4, 4, 1)))
  # t = -1 is the clean end (abar = 1), not the last timestep (Python-style wrap-around).
  np.testing.assert_array_equal(np.asarray(process.q_sample(s, x0, -1, eps)), np.asarray(x0))
  assert float(process.gather(s.alphas_cumprod, -1)) == 1.0
  per_example = process.q_sample(s, x0, jnp.array([5, 50, 99]), eps)
  for i, t in enumerate([5, 50, 99]):
    np.testing.assert_allclose(np.asarray(per_example[i]),
                               np.asarray(process.q_sample(s, x0[i:i + 1], t, eps[i:i + 1]))[0],
                               rtol=1e-6)
  assert per_example.shape == x0.shape and per_example.dtype == jnp.float32


def test_bad_prediction_raises():
  s = schedules.get_schedule('linear', 10)
  with pytest.raises(ValueError, match='prediction'):
    process.predict_x0_eps(s, jnp.zeros((1, 2)), 0, jnp.zeros((1, 2)), 'score')


@pytest.mark.parametrize('name,diffusers_name', [('linear', 'linear'),
                                                 ('cosine', 'squaredcos_cap_v2')])
def test_matches_diffusers(name, diffusers_name):
  """add_noise, get_velocity, and the posterior through DDPMScheduler.step (x0 model, no clip)."""
  s = schedules.get_schedule(name, 1000)
  x0, eps = map(lambda a: np.asarray(a, np.float32), _data((4, 3, 5), seed=3))
  t = np.array([0, 1, 500, 999])
  r = ref.DDPM(beta_schedule=diffusers_name)
  jx0, jeps, jt = jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)
  np.testing.assert_allclose(np.asarray(process.q_sample(s, jx0, jt, jeps)),
                             r.add_noise(x0, eps, t), rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(process.velocity(s, jx0, jeps, jt)),
                             r.get_velocity(x0, eps, t), rtol=1e-5, atol=2e-6)
  # With the same alphas_cumprod, the step's mean is the posterior mean of a perfect x0 model.
  r = ref.DDPM(beta_schedule=diffusers_name, prediction_type='sample', clip_sample=False,
               alphas_cumprod=np.asarray(s.alphas_cumprod))
  x_t = np.asarray(process.q_sample(s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps)))
  mean, var, _ = process.q_posterior(s, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t))
  for i, ti in enumerate(t):
    ref_mean = r.step(x0[i], int(ti), x_t[i], noise=np.zeros_like(x0[i]))
    # diffusers forms beta_t = 1 - abar_t / abar_{t-1} in float32, which cancels at small t (5e-4
    # relative at t = 1); our posterior coefficients come from float64.
    atol = 1e-4 if ti < 20 else 2e-6
    np.testing.assert_allclose(np.asarray(mean[i]), ref_mean, rtol=0, atol=atol)
    if ti > 0:
      a, a_prev = r.alphas_cumprod[ti], r.alphas_cumprod[ti - 1]
      ref_var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
      np.testing.assert_allclose(np.asarray(var[i]), ref_var, rtol=1e-3 if ti < 20 else 2e-5)
