"""The Flax KL autoencoder, its diffusers loader and its training objective.

tests/data/autoencoder_reference.npz (written by evaluation/check_autoencoder.py under torch
2.13 / diffusers 0.42.1) holds a small diffusers AutoencoderKL with every weight perturbed, its
encode / decode outputs on fixed inputs, and the (name, shape) list of SD 1.5's VAE state dict,
so these tests check parity and the SD-size mapping without torch.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import autoencoder_loss
from evaluation import check_autoencoder
from models import autoencoder as ae
from models import count_params
from tests import diffusers_folders

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'autoencoder_reference.npz')
TOL = 1e-4


@pytest.fixture(scope='module')
def reference():
  return diffusers_folders.load_reference(REFERENCE)


def _write_folder(folder, config, state):
  return diffusers_folders.write_folder(folder, config, state, ae.CONFIG_NAME,
                                        ae.WEIGHTS_NAME)


@pytest.fixture(scope='module')
def loaded(reference, tmp_path_factory):
  folder = _write_folder(str(tmp_path_factory.mktemp('vae')), reference['config'],
                         reference['state'])
  return ae.load_diffusers(folder)


@pytest.fixture(scope='module')
def jitted(loaded):
  module, _ = loaded
  encode = jax.jit(lambda p, x: module.apply({'params': p}, x, method='encode'))
  decode = jax.jit(lambda p, z: module.apply({'params': p}, z, method='decode'))
  return encode, decode


def test_matches_diffusers_reference(reference, loaded, jitted):
  """encode's mean / logvar and decode match diffusers to TOL; transposing one attention
  projection (a plausible porting slip) misses by far more, so the check has teeth."""
  _, params = loaded
  encode, decode = jitted
  mean, logvar = encode(params, reference['x'])
  decoded = decode(params, reference['z'])
  errors = {'mean': check_autoencoder.relative_error(mean, reference['mean']),
            'logvar': check_autoencoder.relative_error(logvar, reference['logvar']),
            'decoded': check_autoencoder.relative_error(decoded, reference['decoded'])}
  assert max(errors.values()) < TOL, errors
  assert mean.shape == reference['mean'].shape and decoded.dtype == jnp.float32

  attn = params['decoder']['mid_block']['attentions_0']
  wrong = {**params, 'decoder': {**params['decoder'], 'mid_block': {
      **params['decoder']['mid_block'],
      'attentions_0': {**attn, 'to_q': {**attn['to_q'], 'kernel': attn['to_q']['kernel'].T}}}}}
  err = check_autoencoder.relative_error(decode(wrong, reference['z']), reference['decoded'])
  assert err > 100 * TOL, err


def test_old_style_attention_names_load_the_same(reference, loaded, tmp_path):
  """query / key / value / proj_attn (diffusers < 0.14 files, e.g. sd-vae-ft-ema's) map onto
  to_q / to_k / to_v / to_out.0."""
  old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  state = {}
  for key, value in reference['state'].items():
    for new_name, old_name in old.items():
      key = key.replace(f'.{new_name}.', f'.{old_name}.')
    state[key] = value
  assert any('.proj_attn.' in k for k in state)
  _, params = ae.load_diffusers(_write_folder(str(tmp_path), reference['config'], state))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded[1])


def test_sd_parameter_count():
  """SD 1.5's VAE: 83,653,863 parameters; diffusers' encoder / decoder counts exclude the 1x1
  quant_conv (8x8 + 8) and post_quant_conv (4x4 + 4)."""
  shapes = ae.param_shapes(ae.create_autoencoder(ae.sd_config()))
  counts = {k: count_params(v) for k, v in shapes.items()}
  assert counts == {'encoder': 34_163_592, 'decoder': 49_490_179, 'quant_conv': 72,
                    'post_quant_conv': 20}
  assert count_params(shapes) == 83_653_863


def test_sd_key_mapping_covers_every_tensor(reference):
  """Every name of diffusers' SD-size AutoencoderKL state dict maps to a Flax leaf of the right
  shape, and every Flax leaf is filled (match_state_dict raises otherwise)."""
  sd = reference['sd_keys']
  assert sum(int(np.prod(s)) for s in sd['shapes'].values()) == 83_653_863
  module = ae.create_autoencoder(ae.config_from_diffusers(sd['config']))
  shapes = ae.param_shapes(module)
  mapping = ae.match_state_dict(sd['shapes'], shapes)
  assert len(mapping) == len(sd['shapes']) == len(jax.tree_util.tree_leaves(shapes)) == 248
  assert mapping['encoder.down_blocks.0.resnets.1.conv1.weight'] == (
      'encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel')
  # Decoder level 3 goes 256 -> 128 channels: its first resnet has the 1x1 shortcut.
  path = mapping['decoder.up_blocks.3.resnets.0.conv_shortcut.weight']
  assert path == ('decoder', 'up_blocks_3', 'resnets_0', 'conv_shortcut', 'kernel')
  assert shapes['decoder']['up_blocks_3']['resnets_0']['conv_shortcut']['kernel'].shape == (
      1, 1, 256, 128)
  assert mapping['encoder.mid_block.attentions.0.to_out.0.weight'][-2:] == ('to_out_0', 'kernel')
  assert mapping['decoder.conv_norm_out.weight'][-1] == 'scale'


def test_loader_errors_name_the_problem(reference, tmp_path):
  with pytest.raises(FileNotFoundError, match=ae.CONFIG_NAME):
    ae.load_diffusers(str(tmp_path))
  with open(tmp_path / ae.CONFIG_NAME, 'w') as f:
    json.dump(reference['config'], f)
  with pytest.raises(FileNotFoundError, match=ae.WEIGHTS_NAME):
    ae.load_diffusers(str(tmp_path))

  shapes = {k: v.shape for k, v in reference['state'].items()}
  target = ae.param_shapes(ae.create_autoencoder(ae.config_from_diffusers(reference['config'])))
  key = 'decoder.up_blocks.1.resnets.0.conv1.weight'
  with pytest.raises(KeyError, match=key):
    ae.match_state_dict({k: v for k, v in shapes.items() if k != key}, target)
  with pytest.raises(KeyError, match='encoder.extra.weight'):
    ae.match_state_dict({**shapes, 'encoder.extra.weight': (3,)}, target)
  bad = dict(shapes)
  bad[key] = (32, 16, 3, 3)  # (O, I) swapped: torch has (16, 32, 3, 3), Flax (3, 3, 32, 16)
  with pytest.raises(ValueError, match=r'\(32, 16, 3, 3\).*\(3, 3, 16, 32\).*\(3, 3, 32, 16\)'):
    ae.match_state_dict(bad, target)

  # load_diffusers runs the same check on the file's tensors.
  state = {k: v for k, v in reference['state'].items() if k != key}
  with pytest.raises(KeyError, match=key):
    ae.load_diffusers(_write_folder(str(tmp_path / 'partial'), reference['config'], state))


def test_shapes_sampling_and_input_checks(reference, loaded, jitted):
  """NHWC in and out at a non-square size (16x24 -> 8x12 latents); sampling adds noise, the mode
  is the mean; wrong inputs fail with a message naming the field. (The reference's shapes reuse
  the compiled encode / decode; __call__ runs in the overfit test.)"""
  module, params = loaded
  encode, decode = jitted
  x = reference['x']
  posterior = encode(params, x)
  assert isinstance(posterior, ae.DiagonalGaussian)
  assert posterior.mean.shape == posterior.logvar.shape == (2, 8, 12, 4)
  assert posterior.mean.dtype == jnp.float32
  z = posterior.sample(jax.random.key(1))
  assert z.shape == posterior.mean.shape
  assert float(jnp.abs(z - posterior.mode()).max()) > 0
  assert decode(params, z).shape == x.shape
  with pytest.raises(ValueError, match='divisible'):
    module.apply({'params': params}, jnp.zeros((1, 9, 8, 3)), method='encode')
  with pytest.raises(ValueError, match='in_channels'):
    module.apply({'params': params}, jnp.zeros((1, 8, 8, 1)), method='encode')
  with pytest.raises(ValueError, match='latent_channels'):
    module.apply({'params': params}, jnp.zeros((1, 4, 4, 3)), method='decode')


def test_logvar_clip_and_kl():
  """logvar is clipped to [-30, 20]; KL is LDM's closed form summed over non-batch axes."""
  moments = jnp.concatenate([jnp.full((1, 2, 2, 4), 0.5), jnp.asarray(
      np.array([-100.0, -30.5, 0.0, 25.0]) * np.ones((1, 2, 2, 4)), jnp.float32)], axis=-1)
  post = ae.split_moments(moments)
  np.testing.assert_array_equal(np.asarray(post.logvar[0, 0, 0]), [-30.0, -30.0, 0.0, 20.0])
  np.testing.assert_array_equal(np.asarray(post.mean), 0.5)
  mean = np.random.default_rng(1).standard_normal((3, 2, 2, 4))
  logvar = np.random.default_rng(2).uniform(-2, 2, (3, 2, 2, 4))
  want = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(ae.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar)), want,
                             rtol=1e-5)
  assert float(ae.gaussian_kl(jnp.zeros((1, 3)), jnp.zeros((1, 3)))[0]) == 0.0


def test_create_autoencoder_from_config_groups():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'autoencoder': ae.tiny_config(),
                                      'data': {'num_channels': 1}})
  config.autoencoder.in_channels = config.autoencoder.out_channels = 0
  module = ae.create_autoencoder(config)
  assert (module.in_channels, module.out_channels, module.downsample_factor) == (1, 1, 2)
  config.autoencoder.norm_num_groups = 6
  with pytest.raises(ValueError, match='norm_num_groups'):
    ae.param_shapes(ae.create_autoencoder(config))


def _smooth_images(n, size):
  """n smooth RGB images in [-1, 1] (plane waves), easy to memorise."""
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  out = []
  for i in range(n):
    a, b, c = np.random.default_rng(i).uniform(-3, 3, 3)
    out.append(np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1))
  return jnp.asarray(np.stack(out), jnp.float32)


@pytest.fixture(scope='module')
def tiny():
  module = ae.create_autoencoder(ae.tiny_config())
  return module, ae.init_params(module, jax.random.key(0))


@pytest.mark.slow
def test_tiny_autoencoder_overfits_one_batch(tiny):
  """L1 + 1e-6 KL with adam: PSNR on one batch of 4 images climbs from ~7 dB by > 10 dB in
  40 steps (measured 6.8 -> ~21 dB)."""
  module, params = tiny
  fns = autoencoder_loss.make_loss_fns(module, autoencoder_loss.loss_config())
  batch = {'image': _smooth_images(4, 16)}
  tx = optax.adam(2e-3)

  @jax.jit
  def step(params, opt_state, rng):
    (_, metrics), grads = jax.value_and_grad(fns.generator, has_aux=True)(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state = tx.init(params)
  history = []
  for i in range(40):
    params, opt_state, metrics = step(params, opt_state, jax.random.key(i))
    history.append({k: float(v) for k, v in metrics.items()})
  assert all(np.isfinite(h['loss']) for h in history)
  assert history[-1]['psnr'] > history[0]['psnr'] + 10.0, (history[0], history[-1])
  assert history[-1]['rec_loss'] < 0.3 * history[0]['rec_loss']


@pytest.mark.slow
def test_gan_terms_adaptive_weight_and_disc_start(tiny):
  """With a PatchGAN: before disc_start the loss is rec + KL exactly; after, d_weight equals
  LDM's formula from gradients computed independently on the full params, the loss adds
  d_weight * g_loss, gradients flow through the whole autoencoder, and the discriminator's hinge
  loss gives it gradients."""
  module, params = tiny
  cfg = autoencoder_loss.loss_config()
  cfg.disc_start, cfg.disc_num_layers, cfg.disc_channels = 5, 2, 8
  disc = autoencoder_loss.create_discriminator(cfg)
  x = _smooth_images(2, 16)
  batch, rng = {'image': x}, jax.random.key(3)
  disc_params = autoencoder_loss.init_discriminator(disc, jax.random.key(1), x.shape)
  fns = autoencoder_loss.make_loss_fns(module, cfg, disc)
  gen = jax.jit(jax.value_and_grad(fns.generator, has_aux=True))
  (before, m_before), _ = gen(params, batch, rng, disc_params, 4)
  (after, m_after), grads = gen(params, batch, rng, disc_params, 5)
  assert float(m_before['disc_factor']) == 0.0 and float(m_after['disc_factor']) == 1.0
  np.testing.assert_allclose(before, m_before['rec_loss'] + 1e-6 * m_before['kl_loss'], rtol=1e-6)
  np.testing.assert_allclose(after, before + m_after['d_weight'] * m_after['g_loss'], rtol=1e-5)
  assert float(jnp.abs(grads['encoder']['conv_in']['kernel']).max()) > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))

  def rec(p):
    return autoencoder_loss.reconstruction_loss(x, module.apply({'params': p}, x, rng)[0])
  def g_loss(p):
    return -jnp.mean(disc.apply({'params': disc_params}, module.apply({'params': p}, x, rng)[0]))
  last = lambda g: g['decoder']['conv_out']['kernel']
  rec_grad, g_grad = jax.jit(lambda p: (last(jax.grad(rec)(p)), last(jax.grad(g_loss)(p))))(
      params)
  want = np.linalg.norm(rec_grad) / (np.linalg.norm(g_grad) + 1e-4) * cfg.disc_weight
  np.testing.assert_allclose(m_after['d_weight'], want, rtol=1e-4)

  # A given reconstruction (as the trainer passes the generator's) skips a second autoencoder
  # pass, and its compile here.
  d_step = jax.jit(jax.value_and_grad(
      lambda d, step: fns.discriminator(d, batch, rng, params, step, reconstruction=0.5 * x),
      has_aux=True))
  (d_loss, d_metrics), d_grads = d_step(disc_params, 5)
  assert d_metrics['logits_real'].shape == () and 0.0 < float(d_loss) < 10.0
  assert float(optax.tree.norm(d_grads)) > 0.0
  (d_zero, _), _ = d_step(disc_params, 4)
  assert float(d_zero) == 0.0
