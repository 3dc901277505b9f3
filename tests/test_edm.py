"""EDM (diffusion/edm.py): preconditioning, loss, sampler, VP bridge; Min-SNR; config; train step.

The toy: data x0 ~ N(MU, S0^2) independently per dimension. Its ideal denoiser in sigma space is
D(x, sigma) = MU + S0^2 / (S0^2 + sigma^2) (x - MU), and the probability-flow ODE takes x at
sigma_start to x0 = MU + S0 / sqrt(S0^2 + sigma_start^2) (x - MU), so deterministic samplers are
checked per sample. S0 differs from sigma_data so that the ideal network output F is not 0.
Networks here are closed forms (no U-Net sampling compiles) and keys are 'rbg' (fast to compile).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_lib
import experiment
import models
import sample_lib
import sharding
import train_lib
from diffusion import edm, grids, losses, process, samplers, schedules
from tests.tiny import tiny_config

MU, S0, SD = 0.2, 0.3, 0.5


def key(seed):
  return jax.random.key(seed, impl='rbg')


def normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def ideal_d(x, sigma):
  s = process.expand(jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],)), x)
  return MU + S0 ** 2 / (S0 ** 2 + s ** 2) * (x - MU)


def ideal_net(x_in, t_in):
  """The backbone F whose preconditioned D is `ideal_d`: it reads sigma back from t_in."""
  sigma = jnp.exp(t_in / (edm.NOISE_SCALE / 4.0))
  c_skip, c_out, c_in, _ = (process.expand(c, x_in) for c in edm.preconditioning(sigma, SD))
  x = x_in / c_in
  return (ideal_d(x, sigma) - c_skip * x) / c_out


def flow(x_start, sigma_start):
  """Where the probability-flow ODE takes x (at sigma_start) at sigma = 0; float64 numpy."""
  x = np.asarray(x_start, np.float64)
  return MU + S0 / np.sqrt(S0 ** 2 + sigma_start ** 2) * (x - MU)


def vp_oracle(schedule, prediction):
  """The toy's exact DDPM network (x_t, t) -> eps / x0 / v."""
  def model_fn(x_t, t):
    a = process.alpha_bar(schedule, t, x_t)
    sig = ((1 - a) / a) ** 0.5
    x = x_t / a ** 0.5
    x0 = MU + S0 ** 2 / (S0 ** 2 + sig ** 2) * (x - MU)
    eps = (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5
    return process.to_prediction(schedule, x0, eps, t, prediction)
  return model_fn


# ------------------------------------------------------------------------------ preconditioning

def test_preconditioning_closed_forms():
  s = np.array([0.002, 0.05, 0.5, 1.0, 7.0, 80.0])
  with jax.enable_x64(True):
    c_skip, c_out, c_in, c_noise = (np.asarray(c) for c in edm.preconditioning(jnp.asarray(s), SD))
  np.testing.assert_allclose(c_skip, SD ** 2 / (s ** 2 + SD ** 2), rtol=1e-14)
  np.testing.assert_allclose(c_out, s * SD / np.sqrt(s ** 2 + SD ** 2), rtol=1e-14)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(s ** 2 + SD ** 2), rtol=1e-14)
  np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-14)
  # The time input the backbone sees: 1000 c_noise = 250 ln sigma, float32.
  t_in = edm.noise_input(jnp.asarray(s, jnp.float32))
  assert t_in.dtype == jnp.float32
  np.testing.assert_allclose(t_in, 250 * np.log(s), rtol=1e-6)


def test_denoise_is_exact_for_the_gaussian_toys_ideal_network():
  x = normal(0, (6, 4, 4, 1)) * 3.0
  sigma = jnp.asarray([0.002, 0.03, 0.4, 2.0, 20.0, 80.0], jnp.float32)
  np.testing.assert_allclose(edm.denoise(ideal_net, x, sigma, SD), ideal_d(x, sigma),
                             rtol=1e-5, atol=1e-5)
  # A scalar sigma broadcasts over the batch, as the sampler calls it.
  np.testing.assert_allclose(edm.denoise(ideal_net, x, 0.7, SD), ideal_d(x, 0.7), atol=1e-5)
  # For data of std sigma_data the ideal F is 0: D = c_skip x.
  zero = lambda x_in, t_in: jnp.zeros_like(x_in)
  c_skip = edm.preconditioning(sigma, SD)[0]
  np.testing.assert_allclose(edm.denoise(zero, x, sigma, SD), c_skip[:, None, None, None] * x,
                             rtol=1e-6)


def test_loss_weight_makes_the_networks_target_unit_variance():
  """EDM's derivation: with F_target = (x0 - c_skip x) / c_out, Var F_target = 1 for data of std
  sd at every sigma, and lambda |D - x0|^2 = |F - F_target|^2 with lambda = 1 / c_out^2."""
  s = np.geomspace(0.002, 80, 9)
  with jax.enable_x64(True):
    c_skip, c_out, _, _ = (np.asarray(c) for c in edm.preconditioning(jnp.asarray(s), SD))
    lam = np.asarray(edm.loss_weight(jnp.asarray(s), SD))
  np.testing.assert_allclose(lam, 1 / c_out ** 2, rtol=1e-13)
  var = ((1 - c_skip) ** 2 * SD ** 2 + c_skip ** 2 * s ** 2) / c_out ** 2
  np.testing.assert_allclose(var, 1.0, rtol=1e-13)
  # Monte Carlo: the loss of F = 0 on N(0, sd^2) data is E|F_target|^2 = 1 at every sigma.
  x0 = normal(1, (9, 4096)) * SD
  noise = normal(2, (9, 4096))
  zero = lambda x_in, t_in: jnp.zeros_like(x_in)
  loss = edm.denoising_loss(zero, x0, jnp.asarray(s, jnp.float32), noise, sigma_data=SD)
  np.testing.assert_allclose(loss, 1.0, atol=0.06)
  # ... and for any F the weighted D-loss is F's plain MSE against F_target.
  net = lambda x_in, t_in: jnp.tanh(x_in) + 1e-3 * t_in[:, None]
  sig = jnp.asarray(s, jnp.float32)[:, None]
  x = x0 + sig * noise
  f_target = (x0 - c_skip[:, None] * x) / c_out[:, None]
  f = net(x / jnp.sqrt(sig ** 2 + SD ** 2), edm.noise_input(sig[:, 0]))
  np.testing.assert_allclose(edm.denoising_loss(net, x0, sig[:, 0], noise, sigma_data=SD),
                             jnp.mean((f - f_target) ** 2, axis=1), rtol=2e-4)


def test_edm_loss_draws_log_normal_sigmas():
  ln = np.log(np.asarray(edm.training_sigmas(key(0), 20000, -1.2, 1.2)))
  assert abs(ln.mean() + 1.2) < 0.03 and abs(ln.std() - 1.2) < 0.03


# ------------------------------------------------------------------------------------- sampler

def _counting(denoiser_fn, seen):
  def fn(x, sigma):
    jax.debug.callback(lambda s: seen.append(float(s)), sigma)
    return denoiser_fn(x, sigma)
  return fn


def test_sampler_runs_35_evaluations_for_18_steps_in_heuns_order():
  sigmas = edm.sigma_steps(18, 0.002, 80.0, 7.0)
  assert len(sigmas) == 19 and sigmas[-1] == 0 and edm.num_evals(sigmas) == 35
  np.testing.assert_allclose(sigmas[:-1], grids.karras_sigmas(18, 0.002, 80.0), rtol=1e-15)
  seen = []
  x = edm.sample(_counting(ideal_d, seen), normal(0, (2, 3)), key(0), sigmas=sigmas)
  jax.block_until_ready(x)
  assert len(seen) == 35
  # Step i evaluates at sigma_i, then (Heun) at sigma_{i+1}; the last step only at sigma_17.
  want = [s for i in range(17) for s in (sigmas[i], sigmas[i + 1])] + [sigmas[17]]
  np.testing.assert_allclose(seen, want, rtol=1e-6)


def edm_algorithm1(z, n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """EDM's Algorithm 1 (generate.py's edm_sampler without churn) on the toy, float64 numpy."""
  i = np.arange(n)
  t = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
  t = np.append(t ** rho, 0.0)
  d_of = lambda x, s: MU + S0 ** 2 / (S0 ** 2 + s ** 2) * (x - MU)
  x = np.asarray(z, np.float64) * t[0]
  for k in range(n):
    d = (x - d_of(x, t[k])) / t[k]
    x_next = x + (t[k + 1] - t[k]) * d
    if k < n - 1:
      x_next = x + (t[k + 1] - t[k]) * 0.5 * (d + (x_next - d_of(x_next, t[k + 1])) / t[k + 1])
    x = x_next
  return x


def test_deterministic_sampler_is_edms_algorithm_and_converges_on_the_toy():
  z = normal(1, (256,))
  errors = {}
  for n in (6, 18, 64):
    x = np.asarray(edm.sample(ideal_d, z, key(0), sigmas=edm.sigma_steps(n)))
    np.testing.assert_allclose(x, edm_algorithm1(z, n), atol=2e-4)
    errors[n] = float(np.max(np.abs(x - flow(np.asarray(z) * 80.0, 80.0))))
  # Second order: (64 / 18)^2 = 12.6; measured 0.81, 0.056, 0.0036 (|z| up to 3).
  assert errors[64] < errors[18] / 10 < errors[6] / 100, errors
  assert errors[18] < 0.07 and errors[64] < 5e-3, errors


def test_stochastic_sampler_keeps_the_data_distribution():
  churn = samplers.Churn(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.0)
  sigmas = edm.sigma_steps(18)
  np.testing.assert_allclose(edm.churn_sigmas(sigmas, churn)[3],
                             sigmas[3] * (1 + min(40 / 18, 2 ** 0.5 - 1)), rtol=1e-12)
  assert edm.churn_sigmas(sigmas, churn)[0] == sigmas[0]  # 80 > S_tmax: no churn
  # At 64 steps the discretization is small (the deterministic std is 0.301 there, 0.319 at 18).
  sigmas = edm.sigma_steps(64)
  x = np.asarray(edm.sample(ideal_d, normal(2, (16384,)), key(3), sigmas=sigmas, churn=churn))
  det = np.asarray(edm.sample(ideal_d, normal(2, (16384,)), key(3), sigmas=sigmas))
  assert abs(x.mean() - MU) < 0.01 and abs(x.std() - S0) < 0.01, (x.mean(), x.std())
  assert np.abs(x - det).mean() > 0.1  # the churn did change the samples


def test_sampler_error_stays_bounded_by_the_model_error_as_it_grows_at_small_sigma():
  """A denoiser exact but for a bias delta(sigma) = EPS / (1 + sigma / 0.05), growing to EPS as
  sigma -> 0 (DDPM networks are worst at the clean end; samplers.py's 'heun' note).

  Below sigma ~ S0 the flow carries x almost unchanged, so the ODE itself adds up the bias over
  d ln sigma: its exact response here is ~4.25 EPS (integral of delta d ln sigma from 0.002),
  whatever the sampler. EDM's sampler stays within 2x of that response already at 10 steps (no
  corrector step amplifies the small-sigma error; the last, Euler, step takes it with weight 1)
  and converges to it; measured: 8.0, 5.0, 4.25 EPS at 10, 18, 40 steps.
  """
  eps = 1e-2
  # Row 0 sees the biased model, row 1 the exact one, on the same noise: one run per grid.
  u = np.random.default_rng(4).choice([-1.0, 1.0], 512)
  u = jnp.asarray(np.stack([u, 0 * u]), jnp.float32)
  biased = lambda x, sigma: ideal_d(x, sigma) + eps / (1 + sigma / 0.05) * u
  z = jnp.tile(normal(5, (1, 512)), (2, 1))
  err = {}
  for n in (10, 18, 40, 400):
    x = np.asarray(edm.sample(biased, z, key(0), sigmas=edm.sigma_steps(n)))
    err[n] = float(np.abs(x[0] - x[1]).max())
  ode = err[400]  # the continuous response
  assert 4.0 * eps < ode < 4.5 * eps, err
  assert all(ode * 0.95 < err[n] < 2.0 * ode for n in (10, 18, 40)), err
  assert err[10] > err[18] > err[40], err


# -------------------------------------------------------------------------- the VP <-> EDM bridge

def fake_vp(x, t):
  """A nonlinear 'network' that depends strongly on t (a wrong t shows)."""
  tf = process.expand(t.astype(jnp.float32), x)
  return 0.8 * jnp.tanh(x) + 0.3 * jnp.sin(3 * x + tf / 7.0)


@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_vp_model_wrapped_as_a_denoiser_and_back_is_the_same_model_at_its_steps(prediction):
  s = schedules.get_schedule('cosine', 1000)
  t = jnp.asarray([0, 1, 17, 250, 500, 998, 999], jnp.int32)
  x_t = normal(6, (7, 3, 3, 1))
  want_x0, _ = process.predict_x0_eps(s, x_t, t, fake_vp(x_t, t), prediction)
  back = jax.jit(edm.vp_model(edm.vp_denoiser(s, fake_vp, prediction), s, 'x0'))
  np.testing.assert_allclose(back(x_t, t), want_x0, rtol=2e-4, atol=2e-4)
  same = jax.jit(edm.vp_model(edm.vp_denoiser(s, fake_vp, prediction), s, prediction))
  np.testing.assert_allclose(same(x_t, t), fake_vp(x_t, t), rtol=2e-3, atol=2e-3)
  # Every step's sigma rounds to that step, in numpy and traced.
  sig = grids.sigmas(s)
  np.testing.assert_array_equal(edm.vp_timestep(s, jnp.asarray(sig, jnp.float32)), np.arange(1000))
  np.testing.assert_array_equal(edm.vp_round(s)(sig * 1.0001), sig)
  np.testing.assert_array_equal(edm.vp_round(s)([1e-9, 1e9]), sig[[0, -1]])


def test_edm_model_sampled_with_ddim_through_the_bridge_agrees_with_its_own_heun():
  s = schedules.get_schedule('linear', 1000)
  sig_max = float(grids.sigmas(s)[-1])  # 157.4, where DDIM's trailing grid starts
  z = normal(7, (512,))
  run = lambda sampler, n, **kw: np.asarray(edm.sample_model(
      s, ideal_net, z, key(0), formulation='edm', sampler=sampler, num_steps=n, clip_x0=False,
      sigma_data=SD, **kw))
  exact = flow(np.asarray(z) * sig_max, sig_max)
  heun = run('edm', 64, sigma_max=sig_max)
  ddim = run('ddim', 250, spacing='trailing')
  # DDIM is first order: measured 0.087 / 0.018 from the exact flow at 50 / 250 steps; Heun
  # 0.082 / 0.0053 at 18 / 64.
  assert np.abs(heun - exact).max() < 8e-3
  assert np.abs(ddim - exact).max() < 0.025
  assert np.abs(ddim - heun).max() < 0.03


@pytest.mark.parametrize('prediction', ['x0', 'eps', 'v'])
def test_an_edm_model_through_the_bridge_is_a_ddpm_model_at_every_step(prediction):
  """The toy's ideal denoiser as an EDM network, through vp_model, is the toy's exact DDPM
  network at every one of the T steps: so every sampler of samplers.py sees the same model."""
  s = schedules.get_schedule('linear', 1000)
  t = jnp.arange(1000, dtype=jnp.int32)
  x_t = normal(13, (1000, 4))
  got = jax.jit(edm.vp_model(edm.denoiser(ideal_net, SD), s, prediction))(x_t, t)
  want = vp_oracle(s, prediction)(x_t, t)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 if prediction == 'x0' else 3e-3)


# Deterministic, stochastic, and churned (the bridge is sampler-independent: the model test above
# covers the rest; samplers.py's own tests run every sampler on x0 models).
@pytest.mark.parametrize('sampler', ['ddim', 'dpm_solver_pp_2m_sde', 'heun'])
def test_samplers_run_an_edm_model_as_the_same_denoiser_in_ddpm_form(sampler):
  """The toy's ideal denoiser as an EDM network (through vp_model) and as a DDPM eps network
  take the same path under a sampler and key."""
  s = schedules.get_schedule('linear', 1000)
  z = normal(8, (512,))
  kw = dict(sampler=sampler, num_steps=20, clip_x0=False, churn=samplers.Churn(
      s_churn=10.0 if sampler in samplers.CHURN_SAMPLERS else 0.0))
  x = np.asarray(edm.sample_model(s, ideal_net, z, key(1), formulation='edm', sigma_data=SD,
                                  **kw))
  want = np.asarray(edm.sample_model(s, vp_oracle(s, 'eps'), z, key(1), formulation='ddpm',
                                     prediction='eps', **kw))
  np.testing.assert_allclose(x, want, atol=2e-4)
  assert abs(x.mean() - MU) < 0.03 and 0.2 < x.std() < 0.4, (x.mean(), x.std())


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_ddpm_model_runs_edms_sampler_through_the_bridge(prediction):
  s = schedules.get_schedule('linear', 1000)
  z = normal(9, (512,))
  seen = []
  den = _counting(edm.vp_denoiser(s, vp_oracle(s, prediction), prediction), seen)
  # As sample_model does for a DDPM model: the grid clamped to [sigma_0, sigma_T] and rounded.
  sigmas = edm.sigma_steps(18, max(0.002, grids.sigmas(s)[0]), 80.0, 7.0, edm.vp_round(s))
  x = np.asarray(edm.sample(den, z, key(0), sigmas=sigmas))
  assert set(np.round(seen, 4)) <= set(np.round(grids.sigmas(s), 4))  # only trained steps
  assert len(seen) == edm.num_evals(sigmas) == 35
  # At the trained steps the bridged network is the toy's ideal denoiser itself.
  np.testing.assert_allclose(x, edm.sample(ideal_d, z, key(0), sigmas=sigmas), atol=2e-5)
  via = np.asarray(edm.sample_model(s, vp_oracle(s, prediction), z, key(0), formulation='ddpm',
                                    sampler='edm', num_steps=18, prediction=prediction,
                                    clip_x0=False))
  np.testing.assert_allclose(via, x, atol=1e-6)


def test_sampler_grid_is_the_grid_sample_model_walks():
  s = schedules.get_schedule('linear', 1000)
  sigmas, round_sigma = edm.sampler_grid(s, 'ddpm', 18)
  want = edm.sigma_steps(18, max(0.002, grids.sigmas(s)[0]), 80.0, 7.0, edm.vp_round(s))
  np.testing.assert_array_equal(sigmas, want)
  np.testing.assert_array_equal(round_sigma(sigmas[:-1]), sigmas[:-1])
  sigmas, round_sigma = edm.sampler_grid(s, 'edm', 6, 0.01, 40.0, 5.0)
  assert round_sigma is None
  np.testing.assert_array_equal(sigmas, edm.sigma_steps(6, 0.01, 40.0, 5.0))
  assert edm.num_evals(sigmas) == 11


def test_edms_sampler_takes_no_grid_or_img2img():
  s = schedules.get_schedule('linear', 10)
  with pytest.raises(ValueError, match='own rho grid'):
    edm.sample_model(s, ideal_net, jnp.zeros((2, 1)), key(0), formulation='edm', sampler='edm',
                     num_steps=4, spacing='karras')
  with pytest.raises(ValueError, match='formulation'):
    edm.sample_model(s, ideal_net, jnp.zeros((2, 1)), key(0), formulation='vp')


# ---------------------------------------------------------------------------------- Min-SNR

@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_min_snr_weights_follow_the_formula_and_weight_x0_errors_by_min_snr_gamma(prediction):
  s = schedules.get_schedule('linear', 1000)
  t = jnp.asarray([0, 10, 100, 300, 600, 999], jnp.int32)
  gamma = 5.0
  a = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
  snr = a / (1 - a)
  want = {'eps': np.minimum(snr, gamma) / snr, 'x0': np.minimum(snr, gamma),
          'v': np.minimum(snr, gamma) / (snr + 1)}[prediction]
  np.testing.assert_allclose(losses.min_snr_weight(s, t, prediction, gamma), want, rtol=1e-4)
  # Whatever the target, weight * |output error|^2 = min(SNR, gamma) |implied x0 error|^2.
  x0, noise = normal(10, (6, 8)), normal(11, (6, 8))
  x_t = process.q_sample(s, x0, t, noise)
  target = process.to_prediction(s, x0, noise, t, prediction)
  out = target + 0.01 * normal(12, (6, 8))
  x0_err = process.predict_x0_eps(s, x_t, t, out, prediction)[0] - x0
  lhs = losses.min_snr_weight(s, t, prediction, gamma) * jnp.mean((out - target) ** 2, axis=1)
  np.testing.assert_allclose(lhs, np.minimum(snr, gamma) * np.mean(np.asarray(x0_err) ** 2, 1),
                             rtol=2e-2)
  # diffusion_loss applies it to the same draws.
  model_fn = lambda x, tt: jnp.tanh(x)
  plain = losses.diffusion_loss(s, model_fn, x0, key(3), prediction=prediction)
  weighted = losses.diffusion_loss(s, model_fn, x0, key(3), prediction=prediction,
                                   min_snr_gamma=gamma)
  t_drawn = jax.random.randint(jax.random.split(key(3))[0], (6,), 0, 1000, dtype=jnp.int32)
  np.testing.assert_allclose(weighted, plain * losses.min_snr_weight(s, t_drawn, prediction,
                                                                      gamma), rtol=1e-6)


# --------------------------------------------------------------------------- config and libs

@pytest.mark.parametrize('overrides, field', [
    ({'diffusion.formulation': 'vp'}, 'diffusion.formulation'),
    ({'diffusion.formulation': 'edm', 'diffusion.min_snr_gamma': 5.0}, 'diffusion.min_snr_gamma'),
    ({'diffusion.min_snr_gamma': -1.0}, 'diffusion.min_snr_gamma'),
    ({'diffusion.sigma_data': 0.0}, 'diffusion.sigma_data'),
    ({'diffusion.p_std': -1.0}, 'diffusion.p_std'),
    ({'sampling.sigma_min': 90.0}, 'sampling.sigma_min'),
    ({'sampling.sampler': 'edm', 'sampling.spacing': 'karras'}, 'sampling.spacing'),
    ({'sampling.sampler': 'edm', 'sampling.init_image': 'x.png'}, 'sampling.init_image'),
    ({'diffusion.formulation': 'edm', 'eval.bpd_num_examples': 8}, 'eval.bpd_num_examples'),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=f'config.{field}'):
    config_lib.validate(tiny_config(**overrides))


def test_config_accepts_edm_and_names_the_formulations():
  with pytest.raises(config_lib.ConfigError, match=r"\('ddpm', 'edm'\)"):
    config_lib.validate(tiny_config(**{'diffusion.formulation': 'vp'}))
  # EDM's sampler is not bounded by T (continuous sigma) and takes the churn.
  config_lib.validate(tiny_config(**{'diffusion.formulation': 'edm', 'sampling.sampler': 'edm',
                                     'sampling.num_steps': 200, 'sampling.s_churn': 40.0}))
  config_lib.validate(tiny_config(**{'diffusion.min_snr_gamma': 5.0}))
  for name in ('digits_edm', 'cifar10_edm'):
    config = config_lib.load_config_file(f'configs/{name}.py')
    config_lib.validate(config)
    assert config.diffusion.formulation == 'edm' and config.sampling.sampler == 'edm'


class _FakeNet:
  """A 'backbone' called like the U-Net that is the toy's ideal F (no compile of a network)."""

  def apply(self, variables, x, t, train=False):
    del variables, train
    return ideal_net(x, t)


def test_compile_sampler_runs_an_edm_model_with_ddim_and_with_edms_sampler():
  config = tiny_config(**{'diffusion.formulation': 'edm', 'diffusion.sigma_data': SD,
                          'sampling.clip_x0': False})
  mesh = sharding.make_mesh()
  s = experiment.schedule(config)
  conditioner = experiment.conditioner(config)
  init_rng, loop_rng = jax.random.split(key(0))  # as compile_sampler splits its key
  z = jax.random.normal(init_rng, (8, 8, 8, 1))
  for sampler, steps in (('edm', 18), ('ddim', 10)):
    opts = sample_lib.sampler_options(config, sampler=sampler, num_steps=steps)
    gen = sample_lib.compile_sampler(config, _FakeNet(), s, conditioner, mesh, **opts)
    x = np.asarray(gen({}, key(0), {}, 8))
    if sampler == 'edm':  # EDM's sampler on the toy's ideal denoiser, sigma 80 -> 0.002
      want = edm.sample(ideal_d, z, loop_rng, sigmas=edm.sigma_steps(18))
    else:  # DDIM on the schedule's steps, with the same denoiser as a DDPM eps network
      want = samplers.sample(s, vp_oracle(s, 'eps'), z, loop_rng, sampler='ddim', num_steps=10,
                             prediction='eps', clip_x0=False)
    np.testing.assert_allclose(x, want, atol=1e-4)


class _TinyNet(nn.Module):
  """A two-conv stand-in for the U-Net, called like it: compiles in a second, where the
  smallest U-Net's train step takes ~15 s on these 2 cores."""

  @nn.compact
  def __call__(self, x, t, train=False):
    emb = nn.Dense(8)(models.timestep_embedding(t, 8))
    h = nn.silu(nn.Conv(8, (3, 3))(x) + emb[:, None, None, :])
    return nn.Conv(x.shape[-1], (3, 3))(h)


def test_train_step_with_the_edm_formulation_gives_a_finite_loss():
  config = tiny_config(**{'diffusion.formulation': 'edm', 'training.batch_size': 8})
  schedule, tx = experiment.schedule(config), train_lib.make_optimizer(config)
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, (8,)).astype(np.int32)}
  # The tiny config's U-Net takes EDM's float time input through the whole step (traced only).
  unet = models.create_model(config)
  shapes = jax.eval_shape(train_lib.make_train_step(config, unet, schedule, tx),
                          jax.eval_shape(lambda: train_lib.init_state(config, unet, tx)), batch)
  assert shapes[1]['loss'].shape == () and shapes[1]['loss'].dtype == jnp.float32
  # One compiled step, and a non-finite batch skipped by the shared guard.
  net = _TinyNet()
  step = jax.jit(train_lib.make_train_step(config, net, schedule, tx))
  state, metrics = step(train_lib.init_state(config, net, tx), batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['nonfinite']) == 0.0
  assert int(state.step) == 1
  bad = dict(batch, image=np.where(np.arange(8)[:, None, None, None] == 0, np.nan,
                                   batch['image']).astype(np.float32))
  after, metrics = step(state, bad)
  assert float(metrics['nonfinite']) == 1.0 and int(after.nonfinite_total) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(a, b)
