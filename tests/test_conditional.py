"""Conditional generation end to end: a tiny class- and image-conditional U-Net trained for two
steps with train_lib.train, then every sampling mode through `main.py --mode sample`."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

import checkpoints
import config_lib
import models
import sharding
import train_lib
from tests.main_runner import run_main
from tests.tiny import tiny_config

# One trained model serves every mode (compiles dominate the time here): 16x16 digits, labelled
# (classifier-free guidance) and conditioned on 8x8 low-resolution images (super-resolution).
_MODEL = {'data.image_size': 16, 'data.low_res_size': 8, 'model.cond_channels': 1,
          'model.num_classes': 10, 'model.ch_mult': (1,), 'model.attn_resolutions': (),
          'training.num_steps': 2, 'sampling.num_steps': 3}
# The cascade's base: unconditional 8x8 (an initial checkpoint; its quality does not matter here).
_BASE = {'model.ch_mult': (1,), 'model.attn_resolutions': (), 'sampling.num_steps': 3}


def _config_file(path, overrides):
  path.write_text('from tests.tiny import tiny_config\n\n\n'
                  f'def get_config():\n  return tiny_config(**{overrides!r})\n')
  return str(path)


def _save_initial_checkpoint(config, workdir):
  """A step-0 checkpoint in train_lib's layout, without compiling a train step."""
  model, tx = models.create_model(config), train_lib.make_optimizer(config)
  state = train_lib.create_state(config, model, tx, sharding.make_mesh())
  mngr = checkpoints.manager(workdir, keep=config.training.keep_checkpoints)
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       data=ocp.args.JsonSave({})), force=True)
  mngr.wait_until_finished()
  mngr.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:  # as train_lib.train writes it
    json.dump(config_lib.to_dict(config), f)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  train_lib.train(tiny_config(**_MODEL), str(root / 'model'))
  _save_initial_checkpoint(tiny_config(**_BASE), str(root / 'base'))
  return {'model': (_config_file(root / 'model_config.py', _MODEL), str(root / 'model')),
          'base': (_config_file(root / 'base_config.py', _BASE), str(root / 'base'))}


def _sample(config, workdir, *overrides, mode='sample'):
  shutil.rmtree(os.path.join(workdir, 'samples'), ignore_errors=True)  # only this call's files
  run_main(config, workdir, *overrides, mode=mode)
  return {os.path.basename(p): p for p in glob.glob(os.path.join(workdir, 'samples', '*'))}


def _find(files, suffix):
  names = [n for n in files if n.endswith(suffix)]
  assert len(names) == 1, (suffix, sorted(files))
  return files[names[0]]


def _load(files, suffix):
  path = _find(files, suffix)
  return os.path.basename(path), np.load(path)


def test_class_conditional_with_guidance(runs):
  config, workdir = runs['model']
  files = _sample(config, workdir, '--config.sampling.guidance_scale=3',
                  '--config.sampling.class_label=7')
  name, npz = _load(files, '_w3_class7.npz')
  assert npz['images'].shape == (8, 16, 16, 1)
  assert npz['cond'].shape == (8, 8, 8, 1)  # the dataset's low_res images by default
  np.testing.assert_array_equal(npz['labels'], 7)
  assert name.replace('.npz', '.png') in files


def test_img2img_strength_zero_returns_the_input(runs, tmp_path):
  config, workdir = runs['model']
  image = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'in.png')
  files = _sample(config, workdir, f'--config.sampling.init_image={tmp_path / "in.png"}',
                  '--config.sampling.strength=0.0')
  _, npz = _load(files, '_img2img_strength0.npz')
  np.testing.assert_array_equal(npz['images'], np.broadcast_to(image[None, :, :, None],
                                                               (8, 16, 16, 1)))
  assert any(n.endswith('_img2img_strength0_compare.png') for n in files)


def test_inpainting_with_resampling_keeps_known_pixels(runs, tmp_path):
  config, workdir = runs['model']
  images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
  np.savez(tmp_path / 'in.npz', images=images)
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, :] = 255  # resized to 16x16: rows 4..11 known
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  files = _sample(config, workdir, f'--config.sampling.init_image={tmp_path / "in.npz"}',
                  f'--config.sampling.mask={tmp_path / "mask.png"}',
                  '--config.sampling.resample=2')
  _, npz = _load(files, '_inpaint_resample2.npz')
  out, inputs = npz['images'], images[np.arange(8) % 2]
  np.testing.assert_array_equal(out[:, 4:12], inputs[:, 4:12])
  assert np.any(out[:, :4] != inputs[:, :4])
  np.testing.assert_array_equal(npz['mask'][:, 4:12], 255)
  np.testing.assert_array_equal(npz['mask'][:, :4], 0)
  compare = np.asarray(Image.open(_find(files, '_inpaint_resample2_compare.png')))
  grid = np.asarray(Image.open(_find(files, '_inpaint_resample2.png')))
  assert compare.shape[1] > 3 * grid.shape[1]  # input | mask | output


def test_super_resolution_from_a_condition_image(runs, tmp_path):
  config, workdir = runs['model']
  Image.fromarray(np.full((5, 5), 200, np.uint8)).save(tmp_path / 'low.png')
  files = _sample(config, workdir, f'--config.sampling.cond_image={tmp_path / "low.png"}')
  _, npz = _load(files, '_w1.npz')
  assert npz['images'].shape == (8, 16, 16, 1)
  assert npz['cond'].shape == (8, 8, 8, 1)  # resized to data.low_res_size
  np.testing.assert_array_equal(npz['cond'], 200)


def test_cascade_base_then_upsampler(runs):
  config, workdir = runs['model']
  _, base_workdir = runs['base']
  # No cascade_base_config: the base's config is read from its workdir's config.json.
  files = _sample(config, workdir, f'--config.sampling.cascade_base_workdir={base_workdir}',
                  '--config.sampling.class_label=3')
  _, npz = _load(files, '_cascade.npz')
  assert npz['base'].shape == (8, 8, 8, 1)  # the base model's resolution
  assert npz['images'].shape == (8, 16, 16, 1)  # the upsampler's: data.image_size
  np.testing.assert_array_equal(npz['labels'], 3)


def test_eval_mode_on_the_upsampler(runs, tmp_path):
  """--mode eval on a class- and image-conditional model: samples conditioned on the dataset's
  low-res images, FID/KID against statistics of 4 real images, bits/dim, one metrics.jsonl row."""
  import data as data_lib  # pylint: disable=g-import-not-at-top
  from evaluation import fid  # pylint: disable=g-import-not-at-top
  config, workdir = runs['model']
  real = next(data_lib.get_dataset(tiny_config(**_MODEL), batch_size=4, process_index=0,
                                   process_count=1, shuffle=False, uint8=True))['image']
  stats = str(tmp_path / 'stats.npz')
  fid.reference_statistics(lambda: [real], stats, batch_size=8)
  _sample(config, workdir, '--config.eval.num_samples=4', '--config.eval.batch_size=8',
          f'--config.eval.reference_stats={stats}', '--config.eval.bpd_num_examples=4',
          mode='eval')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    record = [json.loads(line) for line in f if '"mode": "eval"' in line][-1]
  assert record['num_samples'] == 4 and record['guidance_scale'] == 1.0
  assert np.isfinite(record['fid']) and record['fid'] > 0
  assert np.isfinite(record['kid'])
  assert 0 < record['bits_per_dim'] < 20


def test_non_default_clipping_gets_its_own_file_names(runs):
  config, workdir = runs['model']
  files = _sample(config, workdir, '--config.sampling.clip_x0=False')
  assert any('_noclip' in name for name in files), files
  files = _sample(config, workdir, '--config.sampling.use_clipped_model_output=True')
  assert any('_clippedeps' in name for name in files), files


def test_missing_input_file_is_a_one_line_error(runs, tmp_path, capsys):
  config, workdir = runs['model']
  with pytest.raises(SystemExit) as e:
    _sample(config, workdir, f'--config.sampling.init_image={tmp_path / "nope.png"}')
  assert e.value.code == 2
  assert 'config.sampling.init_image' in capsys.readouterr().err


def test_checkpoint_from_8_devices_samples_on_1(runs):
  # A run trained on several accelerators must be restorable for sampling on one.
  _, base_workdir = runs['base']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import jax, config_lib, experiment\n'
          f'config = config_lib.load_run_config({base_workdir!r})\n'
          f'step, params = experiment.restore_params(config, {base_workdir!r})\n'
          'print(jax.device_count(), step, sum(x.size for x in jax.tree.leaves(params)))\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  assert out[:2] == ['1', '0'] and int(out[2]) > 1000
