"""sample_lib: guidance arithmetic, input loading, grids, and the exactness of inpainting, SDEdit
at strength 0 and the cascade's resolution through `generate` (untrained tiny U-Nets), and a
checkpoint of the code before the structure change sampling the same images."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import conditioning
import config_lib
import experiment
import image_io
import models
import sample_lib
from data import preprocess
from tests.tiny import tiny_config


class _FakeModel:
  """out = x + f(t) + g(y): a stand-in whose conditional and unconditional outputs differ."""

  def __init__(self):
    self.batch_sizes = []

  def apply(self, variables, x, t, train=False, y=None):
    del variables
    assert not train
    self.batch_sizes.append(x.shape[0])
    out = x + 0.01 * t[:, None, None, None].astype(jnp.float32)
    if y is not None:
      out = out + (3.0 * y.astype(jnp.float32) - 7.0)[:, None, None, None]
    return out


def _fake_inputs(num_classes=10):
  config = tiny_config(**{'model.num_classes': num_classes})
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  t = jnp.asarray([0, 5, 50, 99], jnp.int32)
  y = jnp.asarray([0, 3, 9, 3], jnp.int32)
  return config, x, t, y


def _guided(model, config, conds, w):
  apply = lambda x, t, **c: model.apply({}, x, t, train=False, **c)
  return conditioning.guided_model_fn(apply, conditioning.build(config), conds, w)


@pytest.mark.parametrize('w', [0.0, 1.0, 2.5, 7.0])
def test_guidance_combines_conditional_and_unconditional(w):
  config, x, t, y = _fake_inputs()
  fake = _FakeModel()
  out = _guided(fake, config, {'y': y}, w)(x, t)
  base = np.asarray(x) + 0.01 * np.asarray(t, np.float64)[:, None, None, None]
  cond = base + (3.0 * np.asarray(y) - 7.0)[:, None, None, None]
  uncond = base + (3.0 * 10 - 7.0)  # the null label is num_classes = 10
  np.testing.assert_allclose(out, uncond + w * (cond - uncond), rtol=1e-5, atol=1e-4)
  if w == 0.0:
    np.testing.assert_allclose(out, uncond, rtol=1e-6, atol=1e-5)
  if w == 1.0:
    np.testing.assert_allclose(out, cond, rtol=1e-6, atol=1e-5)
  # w = 0 and w = 1 need one pass; other scales one pass over the doubled batch.
  assert fake.batch_sizes == ([4] if w in (0.0, 1.0) else [8])


def test_guidance_is_the_same_in_eps_x0_and_v():
  # The docstring's claim: guiding any parametrization implies the same eps (float64).
  from diffusion import process, schedules  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    schedule = schedules.get_schedule('cosine', 100)
  rng = np.random.default_rng(0)
  x_t, eps_c, eps_u = (rng.normal(size=(3, 4, 4, 1)) for _ in range(3))
  t, w = np.array([3, 50, 97]), 3.0
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
  as_x0 = lambda e: (x_t - np.sqrt(1 - a) * e) / np.sqrt(a)
  as_v = lambda e: np.sqrt(a) * e - np.sqrt(1 - a) * as_x0(e)
  want = eps_u + w * (eps_c - eps_u)
  for pred, f in (('x0', as_x0), ('v', as_v)):
    guided = f(eps_u) + w * (f(eps_c) - f(eps_u))
    with jax.enable_x64(True):
      _, eps = process.predict_x0_eps(schedule, x_t, t, guided, pred)
    assert np.asarray(eps).dtype == np.float64
    np.testing.assert_allclose(eps, want, rtol=1e-6, atol=1e-6)  # float32 schedule values


def test_guidance_ignored_by_unconditional_model():
  config, x, t, _ = _fake_inputs(num_classes=0)
  out = _guided(_FakeModel(), config, {}, 3.0)(x, t)
  np.testing.assert_allclose(out, np.asarray(x) + 0.01 * np.asarray(t)[:, None, None, None],
                             rtol=1e-6, atol=1e-6)


def test_load_images_png_npz_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)  # non-square: center-cropped to 12x12
  Image.fromarray(rgb).save(tmp_path / 'a.png')
  got = image_io.load_images(str(tmp_path / 'a.png'), 8, 1)
  want = preprocess.resize(preprocess.to_channels(rgb[4:16], 1), 8)
  assert got.shape == (1, 8, 8, 1) and got.dtype == np.uint8
  np.testing.assert_array_equal(got[0], want)

  stack = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / 'b.npz', images=stack)
  np.testing.assert_array_equal(image_io.load_images(str(tmp_path / 'b.npz'), 8, 1), stack)
  # Floats are read as the model's [-1, 1] range.
  np.savez(tmp_path / 'c.npz', images=preprocess.to_float(stack))
  np.testing.assert_array_equal(image_io.load_images(str(tmp_path / 'c.npz'), 8, 1), stack)

  with pytest.raises(FileNotFoundError, match='init_image'):
    image_io.load_images(str(tmp_path / 'missing.png'), 8, 1)
  (tmp_path / 'junk.png').write_bytes(b'not an image')
  with pytest.raises(config_lib.ConfigError, match='not a readable image'):
    image_io.load_images(str(tmp_path / 'junk.png'), 8, 1)


def test_load_mask_is_binary_white_known(tmp_path):
  mask = np.zeros((16, 16), np.uint8)
  mask[:, :8] = 255  # left half known
  mask[0, 15] = 127  # just below the threshold: unknown
  Image.fromarray(mask).save(tmp_path / 'm.png')
  got = image_io.load_mask(str(tmp_path / 'm.png'), 8)
  assert got.shape == (1, 8, 8, 1) and set(np.unique(got)) == {0.0, 1.0}
  np.testing.assert_array_equal(got[0, :, :4, 0], 1.0)
  np.testing.assert_array_equal(got[0, :, 4:, 0], 0.0)


def test_make_comparison_aligns_sets_of_different_sizes():
  small = np.zeros((4, 8, 8, 1), np.uint8)
  big = np.full((4, 16, 16, 3), 200, np.uint8)
  image = image_io.make_comparison([small, big], gap=12)
  grid_small, grid_big = image_io.make_grid(small), image_io.make_grid(big)
  # Both enlarged to 64-pixel tiles: equal grids, side by side with a grey gap.
  assert grid_small.shape[:2] == grid_big.shape[:2]
  assert image.shape == (grid_big.shape[0], 2 * grid_big.shape[1] + 12, 3)
  w = grid_small.shape[1]
  np.testing.assert_array_equal(image[:, w:w + 12], 128)
  np.testing.assert_array_equal(image[:, :w, 0], grid_small[..., 0])
  np.testing.assert_array_equal(image[:, w + 12:], grid_big)


# ------------------------------------------------------------------ generate with a tiny U-Net


@pytest.fixture(scope='module')
def tiny_model():
  # One level, no attention: the smallest graph, so that the sampler loop compiles fast.
  config = tiny_config(**{'sampling.num_steps': 4, 'sampling.sampler': 'ddpm',
                          'model.ch_mult': (1,), 'model.attn_resolutions': ()})
  model = models.create_model(config)
  params = models.init_params(model, config, jax.random.PRNGKey(1))
  return config, model, params, experiment.schedule(config)


def _digits_like(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_inpainting_keeps_known_pixels_exactly(tiny_model):
  config, model, params, schedule = tiny_model
  known = _digits_like(3)
  mask = np.zeros((1, 8, 8, 1), np.float32)
  mask[:, 2:6, 1:7] = 1.0
  # RePaint resampling (config.sampling.resample) is covered in tests/test_conditional.py.
  out = sample_lib.sample_images(config, model, schedule, params, 10, seed=0,
                            init_images=preprocess.to_float(known), mask=mask)
  assert out.shape == (10, 8, 8, 1) and out.dtype == np.uint8
  expected = known[np.arange(10) % 3]  # inputs and masks are cycled to num_samples
  keep = np.broadcast_to(mask, out.shape) == 1
  np.testing.assert_array_equal(out[keep], expected[keep])
  assert np.any(out[~keep] != expected[~keep])  # the unknown pixels were generated


def test_sdedit_strength_zero_returns_the_input(tiny_model):
  config, model, params, schedule = tiny_model
  x = _digits_like(8, seed=1)
  out = sample_lib.sample_images(config, model, schedule, params, 8, seed=0,
                            init_images=preprocess.to_float(x), strength=0.0)
  np.testing.assert_array_equal(out, x)
  # A positive strength does change it (so the equality above is not vacuous).
  out = sample_lib.sample_images(config, model, schedule, params, 8, seed=0,
                            init_images=preprocess.to_float(x), strength=0.5)
  assert np.any(out != x)


def test_generate_rejects_mismatched_inputs(tiny_model):
  config, model, params, schedule = tiny_model
  with pytest.raises(config_lib.ConfigError, match='do not match'):
    sample_lib.sample_images(config, model, schedule, params, 8, seed=0,
                        init_images=np.zeros((2, 16, 16, 1), np.float32))
  with pytest.raises(config_lib.ConfigError, match='mask of shape'):
    sample_lib.sample_images(config, model, schedule, params, 8, seed=0,
                        init_images=np.zeros((2, 8, 8, 1), np.float32),
                        mask=np.ones((1, 4, 4, 1), np.float32))


def test_cascade_output_has_the_upsamplers_resolution(tiny_model, monkeypatch):
  base_config, base_model, base_params, _ = tiny_model
  config = tiny_config(**{'data.image_size': 16, 'data.low_res_size': 4,
                          'model.cond_channels': 1, 'model.attn_resolutions': (),
                          'model.ch_mult': (1,), 'sampling.num_steps': 3})
  model = models.create_model(config)
  params = models.init_params(model, config, jax.random.PRNGKey(2))
  calls = []
  real_generate = sample_lib.sample_images

  def spy(*args, **kwargs):
    calls.append(kwargs.get('cond'))
    return real_generate(*args, **kwargs)
  monkeypatch.setattr(sample_lib, 'sample_images', spy)
  base, out = sample_lib.sample_cascade(base_config, base_model, base_params, config, model,
                                        params, 8, seed=0)
  assert base.shape == (8, 8, 8, 1)
  assert out.shape == (8, 16, 16, 1) and out.dtype == np.uint8
  # The upsampler was conditioned on the base samples, downsampled to data.low_res_size as the
  # data pipeline makes training's low_res images.
  assert calls[0] is None and calls[1].shape == (8, 4, 4, 1)
  want = preprocess.to_float(np.stack([preprocess.downsample(b, 4) for b in base]))
  np.testing.assert_array_equal(calls[1], want)


def test_cascade_rejects_an_unconditional_upsampler(tiny_model):
  config, _, _, _ = tiny_model
  with pytest.raises(config_lib.ConfigError, match='not image-conditional'):
    sample_lib.sample_cascade(config, None, None, config, None, None, 8, seed=0)


OLD_RUN = os.path.join(os.path.dirname(__file__), 'data', 'run_2026-12-02')


def test_a_checkpoint_written_before_the_restructure_samples_the_same_images(tmp_path):
  """tests/data/run_2026-12-02 was trained and sampled by the code of commit 5d0d3d1 (before
  the structure change, with the old field name training.label_dropout in its config.json):
  a class-conditional micro U-Net, 3 steps, then DDIM 5 steps at guidance 2. Today's code must
  restore it and write the same uint8 images, bit for bit."""
  run = str(tmp_path / 'run')
  shutil.copytree(OLD_RUN, run)
  config = config_lib.load_run_config(run)  # migrates the renamed field
  config.sampling.sampler, config.sampling.num_steps = 'ddim', 5
  config.sampling.guidance_scale = 2.0
  images = sample_lib.run_sample_mode(config, run)
  with np.load(os.path.join(OLD_RUN, 'expected_ddim5_w2.npz')) as want:
    np.testing.assert_array_equal(images, want['images'])
  assert len(np.unique(images)) > 8
