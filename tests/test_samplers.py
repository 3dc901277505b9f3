"""Samplers: diffusers' step semantics, the sampling loop, and convergence on a Gaussian toy.

The toy: data x0 ~ N(MU, SD^2) independently per dimension. Its exact denoiser is linear,
E[x0 | x_t] = MU + sqrt(a) SD^2 / (a SD^2 + 1 - a) (x_t - sqrt(a) MU), and the probability-flow
ODE maps y = x_t / sqrt(a) = x0 + sigma eps at sigma_T to
x0 = MU + (y - MU) SD / sqrt(SD^2 + sigma_T^2), so deterministic samplers can be checked per sample.

Compilations are kept few (one jit per test where possible), and most tests hand the samplers
'rbg' keys: threefry's random bits take seconds to compile on these CPUs, rbg's a fraction. The
samplers only split, fold_in and draw from whatever key they are given.
"""

import os
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers_reference as ref
from diffusion import process, samplers, schedules

MU, SD = 0.2, 0.5
T = 1000
PRED_NAMES = {'eps': 'epsilon', 'x0': 'sample', 'v': 'v_prediction'}
SCHED_NAMES = {'linear': 'linear', 'cosine': 'squaredcos_cap_v2'}


def key(seed):
  return jax.random.key(seed, impl='rbg')


def normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def gaussian_oracle(schedule, prediction):
  """The exact network of the Gaussian toy, for any prediction type."""
  def model_fn(x_t, t):
    a = process.alpha_bar(schedule, t, x_t)
    x0 = MU + a ** 0.5 * SD ** 2 / (a * SD ** 2 + 1 - a) * (x_t - a ** 0.5 * MU)
    eps = (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5
    return process.to_prediction(schedule, x0, eps, t, prediction)
  return model_fn


def exact_flow(schedule, x_init, t_start):
  """Where the probability-flow ODE takes x_init (as x at t_start) at t = -1; float64 numpy."""
  a = float(np.asarray(schedule.alphas_cumprod, np.float64)[t_start])
  sigma2 = (1 - a) / a
  y = np.asarray(x_init, np.float64) / np.sqrt(a)
  return MU + (y - MU) * SD / np.sqrt(SD ** 2 + sigma2)


def fake_model(x, t):
  """A fixed nonlinear 'network' for comparing chains step by step."""
  tf = t.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.8 * jnp.tanh(x) + 0.3 * jnp.sin(3 * x + tf / 100.0)


def fake_model_np(x, t):
  out = 0.8 * np.tanh(x) + 0.3 * np.sin(3 * x + np.float32(t) / np.float32(100.0))
  return out.astype(np.float32)


def assert_f32_close(got, want, rel=1e-5):
  """|got - want| <= rel * max(1, |want|): float32 rounding relative to the values' scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
  assert err.max() <= rel, f'max scaled error {err.max():.3g} > {rel}'


# ------------------------------------------------------------------------------------ timesteps

def test_timesteps_examples():
  np.testing.assert_array_equal(samplers.timesteps(10, 5, 'leading'), [8, 6, 4, 2, 0])
  np.testing.assert_array_equal(samplers.timesteps(10, 5, 'trailing'), [9, 7, 5, 3, 1])
  # round half to even: 10 - 2.5 i = 10, 7.5, 5, 2.5 -> 10, 8, 5, 2.
  np.testing.assert_array_equal(samplers.timesteps(10, 4, 'trailing'), [9, 7, 4, 1])
  np.testing.assert_array_equal(samplers.timesteps(10, 3, 'leading'), [6, 3, 0])
  np.testing.assert_array_equal(samplers.timesteps(10, 4, 'linspace'), [9, 6, 3, 0])
  lead = samplers.timesteps(1000, 50, 'leading')
  trail = samplers.timesteps(1000, 50, 'trailing')
  assert (lead[0], lead[1], lead[-1]) == (980, 960, 0)
  assert (trail[0], trail[1], trail[-1]) == (999, 979, 19)
  np.testing.assert_array_equal(samplers.timesteps(1000, 1000, 'leading'), np.arange(1000)[::-1])
  with pytest.raises(ValueError):
    samplers.timesteps(10, 11)
  with pytest.raises(ValueError):
    samplers.timesteps(10, 5, 'uniform')


@pytest.mark.parametrize('big_t', [1000, 100, 17])
@pytest.mark.parametrize('spacing', ['leading', 'trailing', 'linspace'])
def test_timesteps_match_diffusers(big_t, spacing):
  r = ref.DDPM(num_train_timesteps=big_t, timestep_spacing=spacing)
  for n in range(1, big_t + 1):
    ts = samplers.timesteps(big_t, n, spacing)
    r.set_timesteps(n)
    assert len(ts) == n
    np.testing.assert_array_equal(ts, r.timesteps[:n])
    # diffusers' float arange sometimes appends one more timestep, and then it is -1.
    assert np.all(r.timesteps[n:] == -1)
    assert np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() <= big_t - 1


def test_every_sampler_steps_to_the_next_grid_point():
  s = schedules.get_schedule('linear', 1000)
  for name in samplers.SAMPLERS:
    ts, prev = samplers.schedule_steps(name, s, 30, 'trailing')
    np.testing.assert_array_equal(ts, samplers.timesteps(1000, 30, 'trailing'))
    np.testing.assert_array_equal(prev, np.append(ts[1:], -1))
  ts, prev = samplers.schedule_steps('heun', s, 50, 'leading', strength=0.3)
  np.testing.assert_array_equal(ts, np.arange(15)[::-1] * 20)
  # 'auto' is each sampler's own default grid.
  assert [samplers.grid_name(n) for n in ('ddpm', 'ddim', 'dpm_solver_pp_2m', 'heun')] == [
      'leading', 'leading', 'dpm', 'karras']


# ------------------------------------------------------------------ single steps vs diffusers

CHAINS = [('leading', 1000), ('leading', 50), ('trailing', 50), ('trailing', 30)]


def _pick(ts):
  """A few timesteps of a list, always including the first and the last."""
  idx = sorted(set(np.linspace(0, len(ts) - 1, 7).round().astype(int)))
  return ts[idx]


@pytest.mark.parametrize('sched', ['linear', 'cosine'])
@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0'])
@pytest.mark.parametrize('clip', [True, False])
def test_ddpm_step_matches_diffusers(sched, prediction, clip):
  s = schedules.get_schedule(sched, T)
  rng = np.random.default_rng(0)
  for spacing, n in CHAINS:
    r = ref.DDPM(beta_schedule=SCHED_NAMES[sched], prediction_type=PRED_NAMES[prediction],
                 clip_sample=clip, timestep_spacing=spacing,
                 alphas_cumprod=np.asarray(s.alphas_cumprod))
    if n < T:
      r.set_timesteps(n)
    ts = _pick(samplers.timesteps(T, n, spacing))
    prev = np.array([r.previous_timestep(int(t)) for t in ts])
    if n == T:
      np.testing.assert_array_equal(prev, ts - 1)
    shape = (len(ts), 3, 4, 2)
    x = rng.standard_normal(shape).astype(np.float32)
    out = rng.standard_normal(shape).astype(np.float32)
    z = rng.standard_normal(shape).astype(np.float32)
    # One call with per-example t and t_prev arrays [B].
    got = samplers.ddpm_step(s, jnp.asarray(x), jnp.asarray(out), jnp.asarray(ts),
                             jnp.asarray(prev),
                             prediction=prediction, clip_x0=clip, noise=jnp.asarray(z))
    want = np.stack([r.step(out[i], int(t), x[i], z[i]) for i, t in enumerate(ts)])
    assert_f32_close(got, want)


@pytest.mark.parametrize('sched', ['linear', 'cosine'])
@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0'])
@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_ddim_step_matches_diffusers(sched, prediction, eta):
  s = schedules.get_schedule(sched, T)
  rng = np.random.default_rng(1)
  for clip, recompute in ((True, False), (False, False), (True, True)):
    for spacing, n in CHAINS:
      r = ref.DDIM(beta_schedule=SCHED_NAMES[sched], prediction_type=PRED_NAMES[prediction],
                   clip_sample=clip, timestep_spacing=spacing,
                   alphas_cumprod=np.asarray(s.alphas_cumprod))
      r.set_timesteps(n)
      ts = _pick(r.timesteps)
      prev = ts - T // n  # diffusers' DDIM rule; below 0 means the clean end
      prev = np.maximum(prev, -1)
      shape = (len(ts), 2, 3)
      x = rng.standard_normal(shape).astype(np.float32)
      out = rng.standard_normal(shape).astype(np.float32)
      z = rng.standard_normal(shape).astype(np.float32)
      got = samplers.ddim_step(s, jnp.asarray(x), jnp.asarray(out), jnp.asarray(ts),
                               jnp.asarray(prev), eta=eta, prediction=prediction, clip_x0=clip,
                               use_clipped_model_output=recompute,
                               noise=jnp.asarray(z) if eta else None)
      want = np.stack([r.step(out[i], int(t), x[i], eta=eta, noise=z[i],
                              use_clipped_model_output=recompute) for i, t in enumerate(ts)])
      assert_f32_close(got, want)


def test_ddim_50_step_chain_matches_diffusers():
  s = schedules.get_schedule('linear', T)
  x_init = np.random.default_rng(2).standard_normal((2, 4, 4, 1)).astype(np.float32)
  configs = [('leading', 'eps', True), ('trailing', 'v', False), ('trailing', 'x0', True)]

  @jax.jit
  def run(x):
    return [samplers.sample(s, fake_model, x, key(0), sampler='ddim', num_steps=50,
                            spacing=sp, prediction=p, clip_x0=c) for sp, p, c in configs]

  results = run(jnp.asarray(x_init))
  for (spacing, prediction, clip), got in zip(configs, results):
    r = ref.DDIM(prediction_type=PRED_NAMES[prediction], clip_sample=clip, timestep_spacing=spacing,
                 alphas_cumprod=np.asarray(s.alphas_cumprod))
    r.set_timesteps(50)
    x = x_init
    for t in r.timesteps:
      x = r.step(fake_model_np(x, t), int(t), x)
    assert_f32_close(got, x, rel=2e-5)


def test_per_example_timesteps_and_clean_end():
  s = schedules.get_schedule('cosine', T)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
  out = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
  t, prev = np.array([999, 500, 10, 0]), np.array([998, 480, -1, -1])
  batched = samplers.ddpm_step(s, x, out, jnp.asarray(t), jnp.asarray(prev), noise=z)
  for i in range(4):
    single = samplers.ddpm_step(s, x[i:i + 1], out[i:i + 1], int(t[i]), int(prev[i]),
                                noise=z[i:i + 1])
    np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single[0]), rtol=1e-6)
  # No noise at t = 0, however large it is.
  at0 = samplers.ddpm_step(s, x, out, 0, -1, noise=1e6 * z)
  mean_only = samplers.ddpm_step(s, x, out, 0, -1, noise=None)
  np.testing.assert_array_equal(np.asarray(at0), np.asarray(mean_only))
  # DDIM to the clean end (abar = 1) lands on the predicted x0.
  x0, _ = process.predict_x0_eps(s, x, 10, out, 'eps')
  np.testing.assert_allclose(np.asarray(samplers.ddim_step(s, x, out, 10, -1)), np.asarray(x0),
                             rtol=1e-6)
  with pytest.raises(ValueError, match='noise'):
    samplers.ddim_step(s, x, out, 10, 5, eta=0.5)


# ---------------------------------------------------------------------------- Gaussian toy

def test_ode_samplers_converge_to_the_exact_flow():
  s = schedules.get_schedule('linear', T)
  x_init = normal(0, (2, 16, 16, 1))
  runs = [('ddim', 25), ('ddim', 50), ('ddim', 100), ('ddim', 1000),
          ('dpm_solver_pp_2m', 25), ('dpm_solver_pp_2m', 50), ('heun', 25), ('heun', 50)]

  @jax.jit
  def run(x):
    return [samplers.sample(s, gaussian_oracle(s, 'eps'), x, key(1), sampler=name,
                            num_steps=n, spacing='trailing', clip_x0=False) for name, n in runs]

  exact = exact_flow(s, x_init, T - 1)  # trailing spacing starts every sampler at t = 999
  results = dict(zip(runs, run(x_init)))
  err = {r: float(np.abs(np.asarray(y) - exact).max()) for r, y in results.items()}
  # DDIM is first order: doubling the steps halves the error.
  assert 0.4 < err['ddim', 50] / err['ddim', 25] < 0.6
  assert 0.4 < err['ddim', 100] / err['ddim', 50] < 0.6
  assert err['ddim', 1000] < 0.01
  # The second-order solvers beat DDIM by far at the same number of steps.
  assert err['dpm_solver_pp_2m', 50] < 0.01 and err['dpm_solver_pp_2m', 50] < err['ddim', 50] / 10
  assert err['heun', 50] < 0.03 and err['heun', 50] < err['ddim', 50] / 3
  assert err['heun', 50] < err['heun', 25] / 2.5  # better than first order
  assert err['dpm_solver_pp_2m', 50] < err['dpm_solver_pp_2m', 25] / 2.5
  # The data's statistics, from 512 samples of a deterministic map of the same noise.
  for name, n in [('ddim', 1000), ('dpm_solver_pp_2m', 50), ('heun', 50)]:
    y = np.asarray(results[name, n])
    assert abs(y.mean() - exact.mean()) < 0.01 and abs(y.var() - exact.var()) < 0.01


def test_all_samplers_accept_eps_x0_and_v_models():
  s = schedules.get_schedule('linear', T)
  x_init = normal(0, (2, 8, 8, 1))
  # ddpm and ddim steps are checked per prediction type against diffusers above.
  names = ['dpm_solver_pp_2m', 'dpm_solver_pp_2m_sde', 'heun']

  @jax.jit
  def run(x):
    return {(name, p): samplers.sample(s, gaussian_oracle(s, p), x, key(1), sampler=name,
                                       num_steps=10, prediction=p, clip_x0=True, eta=0.5)
            for name in names for p in ('eps', 'x0', 'v')}

  out = run(x_init)
  for name in names:
    # The same exact denoiser in three parametrizations: the same samples, up to float32 rounding
    # (x0 from eps at t = 900 divides by sqrt(abar) ~ 0.01).
    np.testing.assert_allclose(np.asarray(out[name, 'x0']), np.asarray(out[name, 'eps']), atol=2e-4)
    np.testing.assert_allclose(np.asarray(out[name, 'v']), np.asarray(out[name, 'eps']), atol=2e-4)
    assert float(jnp.abs(out[name, 'eps'] - x_init).max()) > 0.1  # it did something


# ------------------------------------------------ a network that is wrong where trained ones are

T_ERR = 20  # the wrong network errs at t < T_ERR


def wrong_near_zero(schedule, err, t_err=T_ERR):
  """The Gaussian toy's exact eps-network plus a known error of size `err` at t < t_err, the
  region where trained networks are least accurate (on the digits default the eps error at
  t = 0 is twice that at t = 100). The error is a fixed smooth field of x, as a network's is."""
  oracle = gaussian_oracle(schedule, 'eps')

  def model_fn(x, t):
    near = (t < t_err).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return oracle(x, t) + err * near * jnp.sin(2.0 * x + 1.0)
  return model_fn


def _x0_error_where_evaluated(name, s, err, num_steps, spacing='auto'):
  """The wrong network's own x0 error, sigma_t * err, at the worst t the sampler evaluates it
  (its grid points t >= 0; 0 where it never asks inside t < T_ERR)."""
  t, _ = samplers.schedule_steps(name, s, num_steps, spacing)
  abar = np.asarray(s.alphas_cumprod, np.float64)[t]
  sig = np.sqrt((1 - abar) / abar)
  return float(np.max(np.where(t < T_ERR, err * sig, 0.0)))


def _sampler_deviations(names, s, x_init, err, **kw):
  @jax.jit
  def run(x):
    out = {}
    for name in names:
      exact = samplers.sample(s, gaussian_oracle(s, 'eps'), x, key(3), sampler=name,
                              clip_x0=False, **kw)
      wrong = samplers.sample(s, wrong_near_zero(s, err), x, key(3), sampler=name,
                              clip_x0=False, **kw)
      out[name] = jnp.abs(wrong - exact).max()
    return out
  return {k: float(v) for k, v in run(x_init).items()}


@pytest.mark.parametrize('spacing', ['auto', 'leading', 'karras'])
def test_every_sampler_stays_within_a_few_times_the_networks_error(spacing):
  """Each sampler at 10 steps against the same sampler with the exact network (same noise): the
  deviation must stay within a modest factor of what the wrong network itself gets wrong at the
  points the sampler asks it, its x0 error sigma_t * err there."""
  s = schedules.get_schedule('linear', T)
  x_init = normal(0, (2, 8, 8, 1))
  err = 0.5
  names = list(samplers.SAMPLERS)
  dev = _sampler_deviations(names, s, x_init, err, num_steps=10, spacing=spacing)
  for name, d in dev.items():
    bound = _x0_error_where_evaluated(name, s, err, 10, spacing)
    assert d <= 3 * bound + 1e-6, (name, spacing, d, bound)
  if spacing == 'leading':  # the grid reaches t = 0, so the check is not vacuous
    assert all(_x0_error_where_evaluated(n, s, err, 10, spacing) > 0 for n in names)


def test_the_wrong_network_test_sees_a_corrector_at_t_zero(monkeypatch):
  """The test above has teeth: Heun with its corrector on the step into t = 0 (the old rule)
  weighs the network's eps at t = 0 by (sigma_{T/n} - sigma_0) / 2, 16x DDIM's weight on it."""
  s = schedules.get_schedule('linear', T)
  x_init = normal(0, (2, 8, 8, 1))
  err = 0.5
  bound = _x0_error_where_evaluated('heun', s, err, 10, 'leading')
  monkeypatch.setattr(samplers, '_heun_corrects', lambda t_prev: jnp.asarray(t_prev) >= 0)
  dev = _sampler_deviations(['heun'], s, x_init, err, num_steps=10, spacing='leading')
  assert dev['heun'] > 10 * bound, (dev, bound)


# DDPM at 1000 steps: fixed_small variance leaves a small bias. The standard error of the variance
# of 8192 samples is 0.004.
@pytest.mark.parametrize('name,spacing,steps,final_tol', [
    ('ddpm', 'leading', (10, 50, 1000), 0.02),
    ('dpm_solver_pp_2m_sde', 'trailing', (5, 20, 500), 0.01)])
def test_stochastic_samplers_converge_in_distribution(name, spacing, steps, final_tol):
  s = schedules.get_schedule('linear', T)
  x_init = normal(0, (8, 32, 32, 1))  # 8192 samples

  @jax.jit
  def run(x):
    return [samplers.sample(s, gaussian_oracle(s, 'eps'), x, key(1), sampler=name,
                            num_steps=n, spacing=spacing, clip_x0=False) for n in steps]

  var_err = []
  for n, y in zip(steps, run(x_init)):
    y = np.asarray(y, np.float64)
    var_err.append(abs(y.var() - SD ** 2))
    assert abs(y.mean() - MU) < 0.03, n
  assert var_err[0] > var_err[1] > var_err[2]
  assert var_err[2] < final_tol


@pytest.mark.parametrize('spacing', ['leading', 'trailing'])
def test_ddim_eta1_is_ddpm_on_the_same_steps(spacing):
  """DDIM(eta=1)'s mean and variance are the DDPM posterior's: with the same noise, same samples."""
  s = schedules.get_schedule('cosine', T)
  x_init = normal(0, (4, 16, 16, 1))

  @jax.jit
  def run(x, rng):
    kw = dict(num_steps=50, spacing=spacing, clip_x0=False)
    return (samplers.sample(s, gaussian_oracle(s, 'eps'), x, rng, sampler='ddpm', **kw),
            samplers.sample(s, gaussian_oracle(s, 'eps'), x, rng, sampler='ddim', eta=1.0, **kw))

  ddpm, ddim = run(x_init, key(1))
  np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), atol=1e-4)
  assert float(ddpm.std()) > 0.3  # genuinely random samples, not a degenerate match


def test_euler_is_ddim_and_euler_ancestral_is_ddim_eta1_in_sigma_space():
  """In y = x / sqrt(abar) the probability-flow ODE's Euler step is DDIM's update and the
  Euler-ancestral step (eta 1) has DDPM's posterior mean and variance; with eps recomputed from
  the clipped x0 (use_clipped_model_output) the pairs agree for ANY network, here a nonlinear one
  with clipping that bites, and with the same noise."""
  s = schedules.get_schedule('linear', T)
  x_init = normal(0, (4, 8, 8, 1))
  model = lambda x, t: 3.0 * fake_model(x, t)  # predicted x0 often outside [-1, 1]

  @jax.jit
  def run(x, rng):
    kw = dict(num_steps=20, spacing='leading', clip_x0=True, use_clipped_model_output=True)
    return (samplers.sample(s, model, x, rng, sampler='euler', **kw),
            samplers.sample(s, model, x, rng, sampler='ddim', **kw),
            samplers.sample(s, model, x, rng, sampler='euler_ancestral', **kw),
            samplers.sample(s, model, x, rng, sampler='ddim', eta=1.0, **kw))

  euler, ddim, anc, ddim1 = run(x_init, key(5))
  assert_f32_close(euler, ddim, rel=1e-4)
  assert_f32_close(anc, ddim1, rel=1e-4)
  assert float(jnp.abs(anc - euler).max()) > 0.1  # the ancestral noise is really there


def test_churn_rounds_sigma_hat_to_a_noise_level_the_network_knows():
  s = schedules.get_schedule('linear', T)
  x = normal(0, (2, 4, 4, 1))
  sig = np.sqrt((1 - np.asarray(s.alphas_cumprod, np.float64)) / np.asarray(s.alphas_cumprod))
  opts = samplers.StepOptions(churn=samplers.Churn(s_churn=4.0, s_tmin=0.05, s_tmax=50.0),
                              num_steps=10)
  gamma = min(4.0 / 10, 2 ** 0.5 - 1)
  for t in (30, 200, 600):
    x_hat, t_hat = samplers._churn(s, x, jnp.asarray(t, jnp.int32), key(0), opts)
    t_hat = int(t_hat)
    target = np.log(sig[t] * (1 + gamma))
    assert t_hat > t and abs(np.log(sig[t_hat]) - target) <= np.abs(np.log(sig) - target).min()
    # x_hat / sqrt(abar_hat) - x / sqrt(abar) is noise of variance sigma_hat^2 - sigma^2.
    a, a_hat = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t_hat])
    added = np.asarray(x_hat) / a_hat ** 0.5 - np.asarray(x) / a ** 0.5
    assert float(np.abs(added).max()) > 0
  # Outside [s_tmin, s_tmax] (sigma_999 = 157 > 50) nothing changes.
  x_hat, t_hat = samplers._churn(s, x, jnp.asarray(999, jnp.int32), key(0), opts)
  assert int(t_hat) == 999
  np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(x))


def test_heun_with_churn_still_samples_the_data_distribution():
  """EDM's stochastic Heun: the churn adds noise and the next steps remove it, so the samples
  differ from the deterministic ones, and as the steps grow they reach the data's mean and
  variance (8192 samples; the variance's standard error is 0.004). Churn costs accuracy at few
  steps (measured: variance 0.306 at 20 steps against the deterministic 0.275; 0.256 at 100)."""
  s = schedules.get_schedule('linear', T)
  x_init = normal(0, (8, 32, 32, 1))
  churn = samplers.Churn(20.0, 0.05, 50.0, 1.0)

  @jax.jit
  def run(x):
    return [samplers.sample(s, gaussian_oracle(s, 'eps'), x, key(2), sampler='heun',
                            num_steps=n, clip_x0=False, churn=c)
            for n, c in ((100, samplers.Churn()), (20, churn), (100, churn))]

  plain, few, many = (np.asarray(y, np.float64) for y in run(x_init))
  assert np.abs(many - plain).mean() > 0.05
  assert abs(many.var() - SD ** 2) < abs(few.var() - SD ** 2) / 3
  for y in (plain, many):
    assert abs(y.mean() - MU) < 0.01 and abs(y.var() - SD ** 2) < 0.012, (y.mean(), y.var())


def test_churn_is_refused_by_samplers_without_it():
  s = schedules.get_schedule('linear', 10)
  with pytest.raises(ValueError, match='churn'):
    samplers.sample(s, lambda x, t: x, jnp.zeros((1, 2)), key(0), sampler='ddim', num_steps=2,
                    churn=samplers.Churn(1.0))


# --------------------------------------------------------------- model calls, SDEdit, inpainting

def _counting_model(schedule, calls):
  oracle = gaussian_oracle(schedule, 'eps')

  def model_fn(x, t):
    jax.debug.callback(lambda tt: calls.append(int(np.asarray(tt)[0])), t)
    return oracle(x, t)
  return model_fn


@pytest.mark.parametrize('name', list(samplers.SAMPLERS))
def test_num_model_evals_counts_real_calls(name):
  s = schedules.get_schedule('linear', 100)
  x = jnp.zeros((1, 2))
  cases = [dict(num_steps=4), dict(num_steps=10, strength=0.5), dict(num_steps=3, resample=2)]
  counts = [[] for _ in cases]

  @jax.jit
  def run(x):
    return [samplers.sample(s, _counting_model(s, c), x, jax.random.key(0), sampler=name,
                            clip_x0=False, **kw) for c, kw in zip(counts, cases)]

  jax.block_until_ready(run(x))
  for calls, kw in zip(counts, cases):
    assert len(calls) == samplers.num_model_evals(name, s, **kw), (kw, calls)
  # SDEdit at strength 0.5 visits the last int(10 * 0.5) = 5 listed timesteps.
  ts, _ = samplers.schedule_steps(name, s, 10)
  assert set(counts[1]) >= set(ts[5:].tolist())
  assert max(counts[1]) == ts[5]
  ts, prev = samplers.schedule_steps(name, s, 4)
  # Heun corrects every step except those into t = 0 and into the clean end.
  expected = len(ts) + int(np.sum(prev > 0)) if name == 'heun' else len(ts)
  assert samplers.num_model_evals(name, s, 4) == expected
  assert samplers.num_model_evals(name, s, 4, spacing='trailing') == (7 if name == 'heun' else 4)
  if name == 'heun':  # EDM's N = 18 takes 35; here 34: no corrector into sigma_min (t = 0)
    assert samplers.num_model_evals(name, schedules.get_schedule('linear', 1000), 18) == 34


def test_sdedit_strength_zero_returns_the_input():
  s = schedules.get_schedule('linear', 100)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  for name in samplers.SAMPLERS:
    out = samplers.sample(s, gaussian_oracle(s, 'eps'), x, jax.random.key(0), sampler=name,
                          num_steps=20, strength=0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  assert samplers.num_model_evals('heun', s, 20, strength=0.0) == 0


def test_sdedit_low_strength_stays_close_to_the_input():
  s = schedules.get_schedule('linear', T)
  x = jnp.asarray(np.random.default_rng(0).normal(MU, SD, (2, 8, 8, 1)), jnp.float32)

  @jax.jit
  def run(x):
    return [samplers.sample(s, gaussian_oracle(s, 'eps'), x, key(0), sampler='ddim',
                            num_steps=50, strength=st, clip_x0=False) for st in (0.1, 1.0)]

  near, far = run(x)
  d_near = float(jnp.abs(near - x).mean())
  d_far = float(jnp.abs(far - x).mean())
  # 0.1: noised to t = 80 (sigma ~ 0.27) and denoised; 1.0: an independent fresh sample, for which
  # E|x' - x| = 2 SD / sqrt(pi) ~ 0.56.
  assert d_near < 0.3 and d_near < d_far / 2 and abs(d_far - 2 * SD / np.sqrt(np.pi)) < 0.1


def test_inpainting_keeps_known_pixels_exactly():
  s = schedules.get_schedule('cosine', T)
  rng = np.random.default_rng(0)
  known = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
  mask = jnp.asarray(np.arange(8)[None, :, None, None] < 4, jnp.float32) * jnp.ones_like(known)
  x_init = normal(0, known.shape)
  cases = [('ddpm', {}), ('ddim', {}), ('dpm_solver_pp_2m', {}), ('heun', {}),
           ('ddpm', {'resample': 3}), ('ddim', {'strength': 0.5})]

  @jax.jit
  def run(x):
    return [samplers.sample(s, gaussian_oracle(s, 'eps'), x, key(1), sampler=name,
                            num_steps=10, inpaint=(known, mask), **kw) for name, kw in cases]

  for (name, kw), out in zip(cases, run(x_init)):
    out = np.asarray(out)
    m = np.asarray(mask) == 1
    np.testing.assert_array_equal(out[m], np.asarray(known)[m], err_msg=f'{name} {kw}')
    assert np.all(np.isfinite(out)) and np.abs(out[~m] - np.asarray(known)[~m]).max() > 0.05


def test_unknown_sampler_raises():
  with pytest.raises(ValueError, match='unknown sampler'):
    samplers.num_model_evals('lms', schedules.get_schedule('linear', 10), 10)


@pytest.mark.parametrize('spacing', ['trailing', 'leading'])
def test_dpm_solver_pp_2m_ode_and_sde_match_stored_diffusers_runs(spacing):
  """Whole chains against diffusers 0.42.1's DPMSolverMultistepScheduler (order 2, float32), ODE
  ('dpmsolver++') and SDE ('sde-dpmsolver++', fed the per-step noise our loop draws from
  PRNGKey(0)), on the stand-in network eps(x, t) = tanh(x) t / 1000 + 0.1 cos(3x); stored in
  tests/data/dpm_solver_reference.npz by tests/data/make_dpm_solver_reference.py."""
  path = os.path.join(os.path.dirname(__file__), 'data', 'dpm_solver_reference.npz')
  s = schedules.get_schedule('linear', 1000)
  fn = lambda x, t: jnp.tanh(x) * (t[:, None, None, None] / 1000) + 0.1 * jnp.cos(3 * x)
  grid = {'trailing': 'trailing', 'leading': 'dpm'}[spacing]  # diffusers' 'leading' DPM grid
  with np.load(path) as ref:
    for n in (20, 7):  # 7 does not divide 1000: uneven steps
      for kind, name in (('ode', 'dpm_solver_pp_2m'), ('sde', 'dpm_solver_pp_2m_sde')):
        ts, _ = samplers.schedule_steps(name, s, n, grid)
        np.testing.assert_array_equal(ts, ref[f'timesteps_{spacing}_{n}'])
        got = samplers.sample(s, fn, jnp.asarray(ref['x_T']), jax.random.PRNGKey(0),
                              sampler=name, num_steps=n, spacing=grid, clip_x0=False)
        want = ref[f'{kind}_{spacing}_{n}']
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max(), err_msg=f'{kind} {n}')
      # The SDE's noise matters: its chain ends far from the ODE's.
      assert np.abs(ref[f'ode_{spacing}_{n}'] - ref[f'sde_{spacing}_{n}']).max() > 0.1


def test_dpm_solver_on_its_default_grid_converges_to_the_exact_flow():
  """The multistep solver's default grid is diffusers' DPM grid (no t = 0 point): a
  second-order step into t = 0 extrapolated the x0 trend ~4x and made it worse than DDIM."""
  s = schedules.get_schedule('linear', T)
  x_init = normal(0, (2, 16, 16, 1))
  ts, _ = samplers.schedule_steps('dpm_solver_pp_2m', s, 20)
  np.testing.assert_array_equal(ts, np.arange(20, 0, -1) * (T // 21))
  run = jax.jit(lambda x, name: samplers.sample(s, gaussian_oracle(s, 'eps'), x, key(1),
                                                sampler=name, num_steps=20, clip_x0=False),
                static_argnums=1)
  dpm = float(np.abs(np.asarray(run(x_init, 'dpm_solver_pp_2m'))
                     - exact_flow(s, x_init, int(ts[0]))).max())
  ddim_ts, _ = samplers.schedule_steps('ddim', s, 20)
  ddim = float(np.abs(np.asarray(run(x_init, 'ddim'))
                      - exact_flow(s, x_init, int(ddim_ts[0]))).max())
  assert dpm < 0.1 and dpm < ddim / 2, (dpm, ddim)
