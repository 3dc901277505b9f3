"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions in models/winograd.py: equal to the direct conv
(float64 to 1e-12, float32 to rounding), hand-written gradients equal to the direct conv's, same
parameters as nn.Conv, and the layer-choice rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import unet, winograd


def _direct(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('tile,shape', [
    (2, (2, 8, 8, 3, 5)), (2, (1, 4, 6, 4, 2)), (2, (1, 2, 2, 1, 1)),
    (4, (2, 8, 8, 3, 5)), (4, (1, 4, 12, 4, 2)), (4, (1, 4, 4, 1, 1))])
def test_winograd_and_its_gradients_equal_direct_conv_in_float64(tile, shape):
  b, h, w, c_in, c_out = shape
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((b, h, w, c_in)), jnp.float64)
    k = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)), jnp.float64)
    got, want = winograd.winograd_conv3x3(x, k, tile), _direct(x, k)
    assert got.shape == want.shape == (b, h, w, c_out) and got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # The backward pass is hand-written (custom_vjp), so check it against autodiff of lax.conv.
    cot = jnp.asarray(rng.standard_normal((b, h, w, c_out)), jnp.float64)
    loss = lambda f: lambda x, k: jnp.sum(f(x, k) * cot)
    got = jax.grad(loss(lambda x, k: winograd.winograd_conv3x3(x, k, tile)), (0, 1))(x, k)
    want = jax.grad(loss(_direct), (0, 1))(x, k)
    for g, d in zip(got, want):
      np.testing.assert_allclose(g, d, rtol=0, atol=1e-12)


@pytest.mark.parametrize('tile,rtol', [(2, 1e-5), (4, 1e-4)])
def test_winograd_float32_error_is_small(tile, rtol):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 64, 32)) / 24, jnp.float32)
  cot = jnp.asarray(rng.standard_normal((2, 16, 16, 32)), jnp.float32)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * cot)
  f = lambda x, k: winograd.winograd_conv3x3(x, k, tile)
  for a, b in zip((f(x, k), *jax.grad(loss(f), (0, 1))(x, k)),
                  (_direct(x, k), *jax.grad(loss(_direct), (0, 1))(x, k))):
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * float(jnp.abs(b).max()))


def test_winograd_rejects_bad_tiles():
  x, k = jnp.zeros((1, 6, 6, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ValueError, match='divisible by 4'):
    winograd.winograd_conv3x3(x, k, 4)
  with pytest.raises(ValueError, match='tile must be one of'):
    winograd.winograd_conv3x3(x, k, 3)


def test_conv3x3_has_nn_conv_parameters_and_output():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 4, 3)), jnp.float32)
  key = jax.random.key(0)
  ref = nn.Conv(5, (3, 3), padding=1)
  ref_params = ref.init(key, x)['params']
  for tile in (0, 2, 4):
    conv = winograd.Conv3x3(5, winograd=tile)
    params = conv.init(key, x)['params']
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    np.testing.assert_array_equal(params['kernel'], ref_params['kernel'])
    bias = jnp.arange(5, dtype=jnp.float32)
    p = {'kernel': ref_params['kernel'], 'bias': bias}
    np.testing.assert_allclose(conv.apply({'params': p}, x), ref.apply({'params': p}, x),
                               rtol=1e-5, atol=1e-5)


def test_unet_winograd_and_direct_agree():
  kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
            num_groups=4)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  t = jnp.array([1, 500])
  shapes = jax.eval_shape(lambda: unet.UNet(**kw).init(jax.random.key(0), x, t)['params'])
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
                        shapes)
  out = {alg: unet.UNet(**kw, conv_algorithm=alg).apply({'params': params}, x, t)
         for alg in ('direct', 'winograd', 'winograd4')}
  scale = float(jnp.abs(out['direct']).max())
  assert scale > 0.1
  np.testing.assert_allclose(out['winograd'], out['direct'], rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(out['winograd4'], out['direct'], rtol=0, atol=1e-4 * scale)


def test_winograd_tile_rules():
  f32, bf16 = jnp.float32, jnp.bfloat16
  cpu = jax.default_backend() == 'cpu'
  tile = winograd.winograd_tile
  assert tile('auto', f32, (8, 32, 32, 128), 128) == (4 if cpu else 0)  # 512 rows per matmul
  assert tile('auto', f32, (8, 16, 16, 256), 256) == (2 if cpu else 0)  # 128 rows: F(2x2)
  assert tile('auto', f32, (32, 16, 16, 256), 256) == (4 if cpu else 0)
  assert tile('auto', bf16, (8, 32, 32, 128), 128) == 0  # transforms would round in bf16
  assert tile('auto', f32, (64, 8, 8, 256), 256) == 0  # measured slower below 16x16
  assert tile('auto', f32, (8, 32, 32, 3), 128) == 0  # conv_in: too few channels
  assert tile('winograd', f32, (1, 4, 4, 3), 3) == 2
  assert tile('winograd4', f32, (1, 4, 4, 3), 3) == 4
  assert tile('winograd', f32, (1, 5, 4, 3), 3) == 0  # odd sizes cannot be tiled by 2
  assert tile('winograd4', f32, (1, 6, 6, 3), 3) == 0
  assert tile('direct', f32, (8, 32, 32, 128), 128) == 0
  with pytest.raises(ValueError, match='conv_algorithm'):
    tile('fft', f32, (8, 32, 32, 128), 128)
