"""Schedules against their closed forms (float64) and against diffusers' (float32)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers_reference as ref
from diffusion import schedules


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def test_linear_alphas_cumprod_closed_form(x64):
  s = schedules.get_schedule('linear', 1000, dtype=jnp.float64)
  betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
  expected = np.exp(np.cumsum(np.log1p(-betas)))
  np.testing.assert_allclose(np.asarray(s.betas), betas, rtol=1e-13)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), expected, rtol=1e-11)
  assert s.alphas_cumprod.dtype == jnp.float64


def test_linear_kwargs(x64):
  s = schedules.get_schedule('linear', 10, dtype=jnp.float64, beta_start=0.1, beta_end=0.2)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [0.1, 0.2], rtol=1e-14)


def test_cosine_alphas_cumprod_closed_form(x64):
  big_t, s0 = 1000, 0.008
  s = schedules.get_schedule('cosine', big_t, dtype=jnp.float64)
  f = lambda u: math.cos((u + s0) / (1 + s0) * math.pi / 2) ** 2
  betas = np.asarray(s.betas)
  # Without clipping the product telescopes: abar_t = f((t+1)/T) / f(0).
  unclipped = np.cumprod(betas < 0.999).astype(bool)
  assert unclipped.sum() >= big_t - 2  # clipping only touches the very last steps
  t = np.arange(big_t)[unclipped]
  expected = np.array([f((i + 1) / big_t) / f(0) for i in t])
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[t], expected, rtol=1e-10)
  assert betas.max() == pytest.approx(0.999)  # the last beta is clipped
  assert betas[-1] == pytest.approx(0.999)


def test_float32_is_rounded_float64(x64):
  for name in ('linear', 'cosine'):
    s64 = schedules.get_schedule(name, 100, dtype=jnp.float64)
    s32 = schedules.get_schedule(name, 100)
    assert s32.alphas_cumprod.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(s32), jax.tree.leaves(s64)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float32))


def test_derived_arrays(x64):
  s = schedules.get_schedule('cosine', 50, dtype=jnp.float64)
  b = np.asarray(s.betas)
  a = np.asarray(s.alphas_cumprod)
  a_prev = np.asarray(s.alphas_cumprod_prev)
  np.testing.assert_allclose(a_prev, np.append(1.0, a[:-1]))
  var = np.asarray(s.posterior_variance)
  assert var[0] == 0.0
  np.testing.assert_allclose(var[1:], b[1:] * (1 - a[:-1]) / (1 - a[1:]), rtol=1e-12)
  log_var = np.asarray(s.posterior_log_variance_clipped)
  assert log_var[0] == log_var[1]
  np.testing.assert_allclose(log_var[1:], np.log(var[1:]), rtol=1e-12)
  assert s.num_timesteps == 50


def test_schedule_is_a_jit_argument():
  s = schedules.get_schedule('linear', 20)
  traces = []

  @jax.jit
  def total(sched):
    traces.append(1)
    return sched.alphas_cumprod.sum()

  np.testing.assert_allclose(total(s), np.asarray(s.alphas_cumprod).sum(), rtol=1e-6)
  other = schedules.get_schedule('cosine', 20)
  np.testing.assert_allclose(total(other), np.asarray(other.alphas_cumprod).sum(), rtol=1e-6)
  assert len(traces) == 1  # same shapes: no retrace
  assert len(jax.tree.leaves(s)) == 7


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match='unknown schedule'):
    schedules.get_schedule('quadratic', 10)


@pytest.mark.parametrize('name,diffusers_name', [('linear', 'linear'),
                                                 ('cosine', 'squaredcos_cap_v2')])
def test_matches_diffusers(name, diffusers_name):
  """diffusers keeps float32 betas; our float64-then-rounded schedule agrees to a few ulps."""
  s = schedules.get_schedule(name, 1000)
  r = ref.DDPM(beta_schedule=diffusers_name)
  # torch.linspace is off by 1 ulp in some entries; the cosine betas are rounded alike.
  np.testing.assert_allclose(np.asarray(s.betas), r.betas, rtol=2e-7, atol=0)
  # diffusers rounds alphas = 1 - betas to float32 before the product: up to ~4e-7 relative...
  ours = np.asarray(s.alphas_cumprod)
  np.testing.assert_allclose(ours[:-1], r.alphas_cumprod[:-1], rtol=1e-6, atol=0)
  # ...except where beta is clipped at 0.999: float32(1 - float32(0.999)) is 1.3e-5 off 0.001.
  np.testing.assert_allclose(ours[-1], r.alphas_cumprod[-1], rtol=2e-5, atol=0)


def test_scaled_linear_is_stable_diffusions_schedule():
  # Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 1):
  # SD's schedule ends at sqrt(abar_T) = 0.068265, a terminal SNR of 0.0047, not zero.
  betas = schedules.scaled_linear_betas(1000)
  assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)
  assert np.all(np.diff(np.sqrt(betas)) > 0)
  np.testing.assert_allclose(np.diff(np.sqrt(betas)), np.diff(np.sqrt(betas))[0], rtol=1e-9)
  assert np.sqrt(np.prod(1 - betas)) == pytest.approx(0.068265, abs=1e-6)
