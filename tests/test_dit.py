"""Tests for models/dit.py: parity with diffusers' DiT (stored reference, no torch needed), the
paper's parameter counts, adaLN-Zero init, shapes, the position table, the checkpoint loader."""

import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from evaluation import check_dit
from models import dit, torch_pickle

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'dit_reference.npz')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The stored torch run: inputs, outputs, and its weights as a torch.save .pt on disk."""
  with np.load(REFERENCE) as f:
    ref = {k: f[k] for k in f.files}
  path = tmp_path_factory.mktemp('dit') / 'dit_small.pt'
  path.write_bytes(ref['state_dict_pt'].tobytes())
  ref['pt_path'] = str(path)
  return ref


def _config(**dit_overrides):
  config = check_dit.small_config()
  for key, value in dit_overrides.items():
    setattr(config.dit, key, value)
  return config


def test_matches_stored_diffusers_reference(reference):
  config = _config()
  params = dit.load_dit_checkpoint(reference['pt_path'], config)
  model = models.create_model(config)
  got = model.apply({'params': params}, reference['x'], reference['t'], y=reference['y'],
                    train=False)
  assert got.shape == reference['out'].shape == (4, 8, 8, 8)
  assert check_dit.relative_error(got, reference['out']) < 1e-4
  # diffusers' own timestep frequencies (shift 1) give a visibly different function: the check
  # above would catch a model that used them.
  assert check_dit.relative_error(got, reference['out_diffusers_shift1']) > 1e-2


# The paper's models on 32x32x4 latents, 1000 classes, learned sigma (the reference's
# parameter count minus its frozen [256, hidden] position table).
@pytest.mark.parametrize('size,count', [('XL', 674_834_720), ('L', 457_840_672),
                                        ('B', 130_315_808), ('S', 32_865_056)])
def test_parameter_counts_of_the_paper_sizes(size, count):
  config = check_dit.small_config()
  config.model.num_classes = 1000
  config.data.image_size = 32
  config.dit = dit.dit_config(size, 2)
  assert models.count_params(dit.param_shapes(config)) == count


@pytest.mark.parametrize('name,size', [('dit_s2', 'S'), ('dit_b2', 'B'), ('dit_l2', 'L'),
                                       ('dit_xl2', 'XL')])
def test_config_groups_equal_the_sizes_table(name, size):
  group = importlib.import_module(f'configs.{name}').dit_group()
  assert group.to_dict() == dit.dit_config(size, 2).to_dict()
  assert (group.hidden_size, group.depth, group.num_heads) == dit.SIZES[size]


def test_fresh_model_outputs_exactly_zero_and_inits_like_the_paper():
  config = _config()
  model = models.create_model(config)
  params = models.init_params(model, config, jax.random.key(0))
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  out = jax.jit(lambda p, x: model.apply({'params': p}, x, jnp.array([3, 700]),
                                         y=jnp.array([1, 10])))(params, x)
  assert out.shape == (2, 8, 8, 8)
  assert np.all(np.asarray(out) == 0.0)
  # Zero-init: every adaLN modulation and the final linear; the rest is not zero.
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    zero = 'adaLN_modulation' in name or 'linear' in name or name.endswith("['bias']")
    assert np.all(np.asarray(leaf) == 0) == zero, name
  # The patch conv initialised as a Linear on its p p C = 16 inputs: xavier bound sqrt(6 / 48).
  kernel = np.asarray(params['x_embedder']['kernel'])
  assert math.sqrt(6 / 48) * 0.9 < np.abs(kernel).max() <= math.sqrt(6 / 48)
  assert abs(np.asarray(params['y_embedder']['embedding']).std() - 0.02) < 0.004


@pytest.mark.parametrize('patch,size,learn_sigma', [(2, 8, True), (4, 16, True), (4, 16, False),
                                                    (2, 8, False)])
def test_output_shapes(patch, size, learn_sigma):
  config = _config(patch_size=patch, learn_sigma=learn_sigma)
  config.data.image_size = size
  model = models.create_model(config)
  params = dit.param_shapes(config)
  x = jax.ShapeDtypeStruct((3, size, size, 4), jnp.float32)
  t = y = jax.ShapeDtypeStruct((3,), jnp.int32)
  out = jax.eval_shape(lambda p, x, t, y: model.apply({'params': p}, x, t, y=y), params, x, t, y)
  assert out.shape == (3, size, size, 8 if learn_sigma else 4)
  assert out.dtype == jnp.float32
  assert params['x_embedder']['kernel'].shape == (patch, patch, 4, 32)
  assert params['final_layer']['linear']['kernel'].shape == (
      32, patch * patch * (8 if learn_sigma else 4))


def test_pos_embed_table_against_closed_form():
  hidden, grid_h, grid_w = 16, 3, 5
  table = dit.pos_embed_table(hidden, grid_h, grid_w)
  assert table.shape == (grid_h * grid_w, hidden) and table.dtype == np.float32
  quarter = hidden // 4
  for i in range(grid_h):
    for j in range(grid_w):
      row = table[i * grid_w + j]
      for k in range(quarter):
        omega = 10000.0 ** (-k / quarter)
        # columns first (the reference's meshgrid(w, h)), then rows; sin before cos in each.
        want = [math.sin(j * omega), math.cos(j * omega), math.sin(i * omega), math.cos(i * omega)]
        got = [row[k], row[quarter + k], row[2 * quarter + k], row[3 * quarter + k]]
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_stored_pos_embed_equals_the_fixed_table(reference):
  state = torch_pickle.load(reference['pt_path'])
  assert state['pos_embed'].shape == (1, 16, 32)
  assert dit.pos_embed_max_difference(state, 32) == 0.0


def test_loader_accepts_dicts_npz_and_train_checkpoints(reference, tmp_path):
  config = _config()
  state = torch_pickle.load(reference['pt_path'])
  want = dit.load_dit_checkpoint(state, config)
  np.savez(tmp_path / 'w.npz', **state)
  for source in (str(tmp_path / 'w.npz'), {'ema': state, 'model': {}, 'opt': {}}):
    got = dit.load_dit_checkpoint(source, config)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), got, want))
  # Kernel transposes: qkv [3D, D] -> [D, 3D]; conv OIHW -> HWIO.
  np.testing.assert_array_equal(want['blocks_1']['attn']['qkv']['kernel'],
                                state['blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(want['x_embedder']['kernel'],
                                state['x_embedder.proj.weight'].transpose(2, 3, 1, 0))


def test_loader_names_the_first_mismatched_key(reference):
  config = _config()
  state = torch_pickle.load(reference['pt_path'])

  renamed = dict(state)
  renamed['blocks.0.mlp.fc_1.weight'] = renamed.pop('blocks.0.mlp.fc1.weight')
  with pytest.raises(ValueError, match=r"missing key 'blocks\.0\.mlp\.fc1\.weight'"):
    dit.load_dit_checkpoint(renamed, config)

  extra = dict(state, **{'blocks.2.attn.qkv.weight': state['blocks.1.attn.qkv.weight']})
  with pytest.raises(ValueError, match=r"unexpected key 'blocks\.2\.attn\.qkv\.weight'"):
    dit.load_dit_checkpoint(extra, config)

  no_null = dict(state)
  no_null['y_embedder.embedding_table.weight'] = state['y_embedder.embedding_table.weight'][:10]
  with pytest.raises(ValueError, match=r"'y_embedder\.embedding_table\.weight' has shape"):
    dit.load_dit_checkpoint(no_null, config)

  shifted = dict(state, pos_embed=state['pos_embed'] + 1e-3)
  with pytest.raises(ValueError, match='pos_embed differs'):
    dit.load_dit_checkpoint(shifted, config)


def test_torch_pickle_refuses_foreign_globals(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', b'cos\nsystem\n(S"true"\ntR.')
  with pytest.raises(pickle.UnpicklingError, match='unexpected global os.system'):
    torch_pickle.load(str(path))


def test_remat_and_bfloat16_compute_the_same_function(reference):
  """remat changes only the backward pass (the forward must be the same function); bf16 compute
  stays close to float32. (A remat gradient check would cost two ~10 s CPU compiles here.)"""
  params = dit.load_dit_checkpoint(reference['pt_path'], _config())
  args = (reference['x'], reference['t'])
  outs = {}
  for variant in ('float32', 'remat', 'bfloat16'):
    config = _config()
    config.model.remat = variant == 'remat'
    config.model.dtype = 'bfloat16' if variant == 'bfloat16' else 'float32'
    model = models.create_model(config)
    apply = lambda p, x, t, y, m=model: m.apply({'params': p}, x, t, y=y)
    if variant != 'float32':  # float32 runs eagerly: the parity test compiled its ops already
      apply = jax.jit(apply)
    outs[variant] = np.asarray(apply(params, *args, reference['y']))
  np.testing.assert_allclose(outs['remat'], outs['float32'], rtol=1e-5, atol=1e-5)
  assert outs['bfloat16'].dtype == np.float32
  assert 1e-4 < check_dit.relative_error(outs['bfloat16'], outs['float32']) < 5e-2


def test_input_errors_name_the_field():
  config = _config()
  model = models.create_model(config)
  params = dit.param_shapes(config)

  def trace(x_shape, **kw):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    return jax.eval_shape(lambda p, x: model.apply({'params': p}, x, jnp.zeros(x_shape[:1],
                                                                              jnp.int32), **kw),
                          params, x)

  with pytest.raises(ValueError, match='num_channels'):
    trace((1, 8, 8, 3), y=jnp.zeros(1, jnp.int32))
  with pytest.raises(ValueError, match='patch_size'):
    trace((1, 9, 9, 4), y=jnp.zeros(1, jnp.int32))
  with pytest.raises(ValueError, match='needs y'):
    trace((1, 8, 8, 4))
  with pytest.raises(ValueError, match='config.dit'):
    bare = check_dit.small_config()
    del bare['dit']
    models.create_model(bare)


@pytest.mark.parametrize('name,count', [('dit_xl2', 674_834_720), ('dit_s2', 32_865_056)])
def test_paper_configs_build_the_paper_sizes_through_create_model(name, count):
  """configs/dit_*.py through the same path training takes (latent input shape from the config,
  models.create_model), with no VAE folder needed to count."""
  import config_lib  # pylint: disable=g-import-not-at-top
  import experiment  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config_file(os.path.join(root, 'configs', f'{name}.py'))
  assert models.input_shape(config) == (32, 32, 4)
  shapes = experiment.params_shapes(config, models.create_model(config))
  assert models.count_params(shapes) == count


def test_the_trainer_and_guided_sampler_run_a_dit(tmp_path):
  """configs/digits_dit.py, shrunk: trains through train_lib (label dropout, EMA, checkpoint)
  and samples with classifier-free guidance."""
  import experiment  # pylint: disable=g-import-not-at-top
  import sample_lib  # pylint: disable=g-import-not-at-top
  import train_lib  # pylint: disable=g-import-not-at-top
  from configs import digits_dit  # pylint: disable=g-import-not-at-top
  config = digits_dit.get_config()
  config.data.image_size = 8
  config.dit.hidden_size, config.dit.depth, config.dit.num_heads = 32, 2, 2
  config.diffusion.num_timesteps, config.sampling.num_steps = 50, 50
  config.training.num_steps, config.training.checkpoint_every = 4, 4
  config.training.sample_every, config.training.batch_size = 0, 16
  state = train_lib.train(config, str(tmp_path))
  assert int(state.step) == 4
  assert os.path.isdir(tmp_path / 'checkpoints' / '4')
  out = sample_lib.sample_images(config, models.create_model(config), experiment.schedule(config),
                                 state.ema_params, 8, seed=0, sampler='ddim', num_steps=5,
                                 guidance_scale=2.0)
  assert out.shape == (8, 8, 8, 1) and len(np.unique(out)) > 4
