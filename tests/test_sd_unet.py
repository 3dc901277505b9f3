"""The Flax SD U-Net (models/sd_unet.py), its diffusers loader and its configs.

tests/data/sd_unet_reference.npz (written by evaluation/check_sd_unet.py under torch 2.13 /
diffusers 0.42.1) holds a small diffusers UNet2DConditionModel in SD 1.x's layout with every
weight perturbed (float16 values, exact), its output on fixed (x, t, context), and the config and
(name, shape) list of SD 1.5's U-Net, so these tests check parity and the SD-size mapping
without torch (and without allocating SD's weights: eval_shape only).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_lib
import models
from evaluation import check_sd_unet
from models import autoencoder as ae
from models import count_params
from tests import diffusers_folders
from models import sd_unet
from tests import sd_folder

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'sd_unet_reference.npz')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


@pytest.fixture(scope='module')
def reference():
  return diffusers_folders.load_reference(REFERENCE)


def _write_folder(folder, config, state):
  return diffusers_folders.write_folder(folder, config, state, sd_unet.CONFIG_NAME,
                                        sd_unet.WEIGHTS_NAME)


@pytest.fixture(scope='module')
def loaded(reference, tmp_path_factory):
  folder = _write_folder(str(tmp_path_factory.mktemp('unet')), reference['config'],
                         reference['state'])
  return models.load_diffusers_unet(folder)


@pytest.fixture(scope='module')
def forward(loaded):
  module, _ = loaded
  return jax.jit(lambda p, x, t, c, m: module.apply({'params': p}, x, t, context=c,
                                                    context_mask=m, train=False))


def test_matches_diffusers_reference(reference, loaded, forward):
  """The loaded U-Net reproduces diffusers' output to TOL (measured 1.2e-6); transposing one
  self-attention projection (a plausible porting slip) misses by far more, so the check has
  teeth."""
  module, params = loaded
  assert module.num_attention_heads == (2, 2, 2, 2) and not module.use_linear_projection
  mask = np.ones(reference['context'].shape[:2], bool)
  out = forward(params, reference['x'], reference['t'], reference['context'], mask)
  assert out.shape == reference['out'].shape and out.dtype == jnp.float32
  err = check_sd_unet.relative_error(out, reference['out'])
  assert err < TOL, err

  blk = params['down_blocks_1']['attentions_0']['transformer_blocks_0']
  to_q = blk['attn1']['to_q']
  wrong = jax.tree_util.tree_map(lambda a: a, params)
  wrong['down_blocks_1']['attentions_0']['transformer_blocks_0']['attn1']['to_q'] = {
      'kernel': to_q['kernel'].T}
  bad = forward(wrong, reference['x'], reference['t'], reference['context'], mask)
  assert check_sd_unet.relative_error(bad, reference['out']) > 100 * TOL


def test_context_mask_semantics(reference, loaded, forward):
  """Masked tokens change nothing (any states behind a False mask give the same output); a row
  with no real token attends to every token, as diffusers' -10000 bias does (= no mask,
  exactly). Same shapes as the reference: no new compile."""
  _, params = loaded
  x, t, ctx = reference['x'], reference['t'], reference['context']
  full = forward(params, x, t, ctx, np.ones(ctx.shape[:2], bool))
  none = forward(params, x, t, ctx, np.zeros(ctx.shape[:2], bool))
  np.testing.assert_array_equal(np.asarray(none), np.asarray(full))
  mask = np.ones(ctx.shape[:2], bool)
  mask[:, 3:] = False
  garbage = ctx.copy()
  garbage[:, 3:] = 50.0
  masked = forward(params, x, t, ctx, mask)
  assert check_sd_unet.relative_error(forward(params, x, t, garbage, mask), masked) < 1e-5
  assert check_sd_unet.relative_error(masked, full) > 1e-2  # the mask does hide tokens


def test_bfloat16_compute_stays_close(reference, loaded):
  """dtype='bfloat16' (params float32) returns float32 within bf16 rounding of the float32
  output (measured 2.9e-2 relative on the reference); remat leaves the forward unchanged."""
  module, params = loaded
  bf16 = module.clone(dtype='bfloat16', remat=True)
  out = jax.jit(lambda p: bf16.apply({'params': p}, reference['x'], reference['t'],
                                     context=reference['context']))(params)
  assert out.dtype == jnp.float32
  err = check_sd_unet.relative_error(out, reference['out'])
  assert err < 5e-2, err


def test_sd15_config_counts_exactly(reference):
  """configs/sd15.py's U-Net, built by models.create_model, has SD 1.5's 859,520,964
  parameters (eval_shape: nothing allocated), and its sd_unet group is what diffusers' SD 1.5
  config (stored from diffusers itself) converts to; its VAE group is autoencoder.sd_config()."""
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'sd15.py'))
  module = models.create_model(config)
  assert isinstance(module, sd_unet.SDUNet) and models.input_shape(config) == (64, 64, 4)
  shapes = sd_unet.param_shapes(module)
  assert count_params(shapes) == sd_unet.SD15_PARAMS == 859_520_964
  assert reference['sd_keys']['params'] == sd_unet.SD15_PARAMS

  from_diffusers = sd_unet.config_from_diffusers(reference['sd_keys']['config'])
  mine = config.sd_unet.to_dict()
  assert {k: v for k, v in from_diffusers.to_dict().items()} == mine
  assert sd_unet.config_from_diffusers(sd_unet.SD15).to_dict() == mine
  assert config.autoencoder.to_dict() == ae.sd_config().to_dict()
  from configs import default  # pylint: disable=g-import-not-at-top
  assert default.get_config().sd_unet.to_dict() == sd_unet.default_group().to_dict()
  assert (config.latent.scale_factor, config.latent.factor, config.latent.channels) == (
      0.18215, 8, 4)
  assert (config.diffusion.schedule, config.diffusion.beta_start, config.diffusion.beta_end) == (
      'scaled_linear', 0.00085, 0.012)

  # The SD-size mapping: every name of diffusers' SD 1.5 state dict (stored, with shapes) maps
  # to a Flax leaf of that shape, and every Flax leaf is filled.
  sd = reference['sd_keys']['shapes']
  assert len(sd) == 686 and sum(int(np.prod(s)) for s in sd.values()) == sd_unet.SD15_PARAMS
  assert sd_unet.check_shapes(sd, module) == 686 == len(jax.tree_util.tree_leaves(shapes))
  entries = {key: (path, kind) for path, key, kind in sd_unet.diffusers_entries(module)}
  assert entries['down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight'] == (
      ('down_blocks_1', 'attentions_0', 'transformer_blocks_0', 'attn2', 'to_k', 'kernel'),
      'linear')
  assert entries['up_blocks.3.resnets.0.conv_shortcut.weight'][1] == 'conv'
  # up block 3, resnet 0: 640 (from below) + 320 (skip) -> 320 channels
  assert shapes['up_blocks_3']['resnets_0']['conv_shortcut']['kernel'].shape == (1, 1, 960, 320)
  assert shapes['mid_block']['attentions_0']['proj_in']['kernel'].shape == (1, 1, 1280, 1280)
  ff = shapes['down_blocks_0']['attentions_0']['transformer_blocks_0']['ff']
  assert ff['net_0']['proj']['kernel'].shape == (320, 2560)  # GEGLU: 2 x 4 x 320
  assert entries['conv_norm_out.weight'][0][-1] == 'scale'


def test_loader_errors_name_the_key(reference, tmp_path):
  module = sd_unet.create(sd_unet.config_from_diffusers(reference['config']))
  shapes = {k: v.shape for k, v in reference['state'].items()}
  key = 'up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight'
  assert key in shapes
  with pytest.raises(KeyError, match=key):
    sd_unet.check_shapes({k: v for k, v in shapes.items() if k != key}, module)
  with pytest.raises(ValueError, match='mid_block.extra.weight'):
    sd_unet.check_shapes({**shapes, 'mid_block.extra.weight': (3,)}, module)
  o, i = shapes[key]
  with pytest.raises(ValueError, match=rf"{key}.*\({i}, {o}\).*\({o}, {i}\)"):
    sd_unet.check_shapes({**shapes, key: (i, o)}, module)

  with pytest.raises(FileNotFoundError, match=sd_unet.CONFIG_NAME):
    models.load_diffusers_unet(str(tmp_path))
  with open(tmp_path / sd_unet.CONFIG_NAME, 'w') as f:
    json.dump(reference['config'], f)
  with pytest.raises(FileNotFoundError, match=sd_unet.WEIGHTS_NAME):
    models.load_diffusers_unet(str(tmp_path))
  # load_diffusers_unet runs the same check on the file's tensors.
  state = {k: v for k, v in reference['state'].items() if k != key}
  with pytest.raises(KeyError, match=key):
    models.load_diffusers_unet(_write_folder(str(tmp_path / 'partial'), reference['config'],
                                             state))


def test_config_from_diffusers_refuses_what_is_not_implemented(reference):
  cfg = reference['config']
  for field, value in (('addition_embed_type', 'text_time'), ('class_embed_type', 'timestep'),
                       ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'),
                       ('time_cond_proj_dim', 256)):
    with pytest.raises(ValueError, match=field):
      sd_unet.config_from_diffusers({**cfg, field: value})
  with pytest.raises(ValueError, match='down_block_types'):
    sd_unet.config_from_diffusers({**cfg, 'down_block_types': ['AttnDownBlock2D'] * 4})
  # SD 2.x: heads per block and linear projections are read as such.
  g = sd_unet.config_from_diffusers({**sd_unet.SD15, 'attention_head_dim': [5, 10, 20, 20],
                                     'use_linear_projection': True, 'cross_attention_dim': 1024})
  m = sd_unet.create(g)
  assert m.num_attention_heads == (5, 10, 20, 20) and m.use_linear_projection


def test_tiny_config_builds_and_validates():
  """configs/shapes_sd_tiny.py validates; create_model builds it for its pixels (3 channels) and
  for 4x4x4 latents (in_channels 0 = what the model denoises, cross_attention_dim 0 =
  model.context_dim)."""
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'shapes_sd_tiny.py'))
  config_lib.validate(config)
  module = models.create_model(config)
  assert (module.in_channels, module.out_channels, module.cross_attention_dim) == (3, 3, 384)
  assert module.num_attention_heads == (2, 2) and module.layers_per_block == (1, 1)
  config.latent.autoencoder = 'unused-here'  # input_shape follows latent.factor / channels
  config.data.image_size, config.latent.factor = 16, 4
  module = models.create_model(config)
  assert module.in_channels == 4 and models.input_shape(config) == (4, 4, 4)
  shapes = sd_unet.param_shapes(module)
  assert shapes['down_blocks_0']['attentions_0']['transformer_blocks_0']['attn2']['to_k'][
      'kernel'].shape == (384, 32)
  assert 'attentions_0' not in shapes['down_blocks_1'] and 'attentions_0' in shapes['up_blocks_1']
  config.sd_unet.cross_attention_dim = 768
  with pytest.raises(ValueError, match='cross_attention_dim'):
    models.create_model(config)


def test_input_checks_name_the_field(loaded):
  module, params = loaded
  ctx = jnp.zeros((1, 3, 24))
  with pytest.raises(ValueError, match='in_channels'):
    module.apply({'params': params}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), int), context=ctx)
  with pytest.raises(ValueError, match='divisible'):
    module.apply({'params': params}, jnp.zeros((1, 12, 8, 4)), jnp.zeros((1,), int), context=ctx)
  with pytest.raises(ValueError, match='cross_attention_dim'):
    module.apply({'params': params}, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), int),
                 context=jnp.zeros((1, 3, 16)))
  with pytest.raises(ValueError, match='needs context'):
    module.apply({'params': params}, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), int))


def test_sd15_validates_once_its_schedule_exists(tmp_path):
  """configs/sd15.py passes config_lib.validate given an SD 1.5 folder (its config files:
  model.pretrained), once diffusion/schedules.py registers 'scaled_linear'; until then
  validation names the schedule."""
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'sd15.py'))
  config.model.pretrained = sd_folder.write_sd15_stub(str(tmp_path / 'sd15'))
  if 'scaled_linear' not in config_lib.choices('schedule'):
    with pytest.raises(config_lib.ConfigError, match='scaled_linear'):
      config_lib.validate(config)
  else:
    config_lib.validate(config)
  assert config.latent.autoencoder == os.path.join(config.model.pretrained, 'vae')
  config.latent.channels = 3  # the folder's U-Net takes 4
  with pytest.raises(config_lib.ConfigError, match='latent.channels'):
    config_lib.validate(config)
  config.latent.channels = 4
  config.model.pretrained = ''  # latent.autoencoder and text.encoder stay as it filled them
  config.sd_unet.in_channels = 3
  with pytest.raises(config_lib.ConfigError, match='sd_unet.in_channels'):
    config_lib.validate(config)
