"""Winograd F(2x2, 3x3) convolution in models/unet.py: equal to the direct conv (float64 to
1e-12, float32 to rounding), same parameters as nn.Conv, and the layer-choice rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import unet


def _direct(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('shape', [(2, 8, 8, 3, 5), (1, 4, 6, 4, 2), (1, 2, 2, 1, 1)])
def test_winograd_equals_direct_conv_in_float64(shape):
  b, h, w, c_in, c_out = shape
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((b, h, w, c_in)), jnp.float64)
    k = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)), jnp.float64)
    got, want = unet.winograd_conv3x3(x, k), _direct(x, k)
    assert got.shape == want.shape == (b, h, w, c_out) and got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_winograd_gradients_equal_direct_conv_gradients():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 4, 6)) / 6, jnp.float32)
  cot = jnp.asarray(rng.standard_normal((2, 8, 8, 6)), jnp.float32)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * cot)
  gw = jax.grad(loss(unet.winograd_conv3x3), (0, 1))(x, k)
  gd = jax.grad(loss(_direct), (0, 1))(x, k)
  for a, b in zip(gw, gd):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_conv3x3_has_nn_conv_parameters_and_output():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 4, 3)), jnp.float32)
  key = jax.random.key(0)
  ref = nn.Conv(5, (3, 3), padding=1)
  ref_params = ref.init(key, x)['params']
  for winograd in (False, True):
    conv = unet.Conv3x3(5, winograd=winograd)
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
         for alg in ('direct', 'winograd')}
  scale = float(jnp.abs(out['direct']).max())
  assert scale > 0.1
  np.testing.assert_allclose(out['winograd'], out['direct'], rtol=0, atol=1e-5 * scale)


def test_use_winograd_rules():
  f32, bf16 = jnp.float32, jnp.bfloat16
  cpu = jax.default_backend() == 'cpu'
  assert unet.use_winograd('auto', f32, 32, 32, 128, 128) == cpu
  assert not unet.use_winograd('auto', bf16, 32, 32, 128, 128)  # transforms would round in bf16
  assert not unet.use_winograd('auto', f32, 8, 8, 256, 256)  # measured slower below 16x16
  assert not unet.use_winograd('auto', f32, 32, 32, 3, 128)  # conv_in: too few channels
  assert unet.use_winograd('winograd', f32, 4, 4, 3, 3)
  assert not unet.use_winograd('winograd', f32, 5, 4, 3, 3)  # odd sizes cannot be tiled by 2
  assert not unet.use_winograd('direct', f32, 32, 32, 128, 128)
  with pytest.raises(ValueError, match='conv_algorithm'):
    unet.use_winograd('fft', f32, 32, 32, 128, 128)
