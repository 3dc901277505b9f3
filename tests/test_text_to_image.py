"""Text-to-image end to end (captions.py, data/sources.captions_of, the pipeline's caption states,
prompts in --mode sample, CLIP score in --mode eval).

Captioned data the tests make: data/shapes.py's images written as a tfds array_record dataset in
coco_captions' layout (feature 'captions', a sequence of {'text'}, two captions per image), read
by the same tfds code path as a prepared real dataset; and a folder of PNGs with .txt captions.
Each trains two steps through main.py with a tiny U-Net (8x8, one level) that cross-attends to
MiniLM's states; one of the runs then samples and evaluates.
"""

import glob
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

import captions
import config_lib
from data import pipeline
from data import shapes
from data import sources
from data import synthetic
from tests import clip_reference
from tests.main_runner import run_main
from tests.tiny import tiny_config

N = 16


def _images_and_captions():
  images, caps, _ = shapes.generate(N, seed=5)
  return images, caps


def _text_overrides(dataset, data_dir=None, caption_key='captions/text'):
  out = {'data.dataset': dataset, 'data.caption_key': caption_key, 'data.num_channels': 3,
         'data.num_classes': 0, 'model.context_dim': 384, 'model.context_len': 8,
         'model.ch_mult': (1,), 'model.attn_resolutions': (8,), 'model.num_heads': 2,
         'training.num_steps': 2, 'training.batch_size': 8, 'sampling.num_steps': 3,
         'sampling.num_samples': 8, 'sampling.batch_size': 8}
  if data_dir:
    out['data.data_dir'] = data_dir
  return out


def _config_file(path, overrides):
  path.write_text('from tests.tiny import tiny_config\n\n\n'
                  f'def get_config():\n  return tiny_config(**{overrides!r})\n')
  return str(path)


_main = run_main


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('captioned')
  images, caps = _images_and_captions()
  # Two captions per image, as COCO has five: the pipeline picks one per example and step.
  per_image = [[c, c.replace('a ', 'one ', 1)] for c in caps]
  synthetic.write_tfds(str(root / 'tfds'), {'train': (images, np.zeros(N, np.int64), per_image)})
  folder = root / 'folder'
  folder.mkdir()
  for i, (image, caption) in enumerate(zip(images, caps)):
    Image.fromarray(image).save(folder / f'{i:03d}.png')
    (folder / f'{i:03d}.txt').write_text(caption + '\n')
  return {'tfds': str(root / 'tfds'), 'folder': str(folder), 'captions': caps,
          'per_image': per_image}


def test_captions_of_reads_tfds_folders_and_shapes(data):
  tfds_config = tiny_config(**_text_overrides('tfds:synthetic_captioned_images', data['tfds']))
  got = sources.captions_of(tfds_config)
  # tfds stores the examples in its own (key-hashed) order; the captions stay with their image.
  assert sorted(got) == sorted(tuple(c) for c in data['per_image'])
  folder_config = tiny_config(**_text_overrides(f'folder:{data["folder"]}'))
  assert sources.captions_of(folder_config) == [(c,) for c in data['captions']]
  assert sources.captions_of(folder_config, limit=3) == [(c,) for c in data['captions'][:3]]
  shapes_config = tiny_config(**_text_overrides('shapes'))
  assert sources.captions_of(shapes_config, 'train[:4]') == [
      (shapes.ShapesSource('train')[i]['caption'],) for i in range(4)]


def test_caption_errors_name_the_problem(data, tmp_path):
  wrong = tiny_config(**_text_overrides('tfds:synthetic_captioned_images', data['tfds'], 'caption'))
  with pytest.raises(ValueError, match=r"caption_key='caption' is not a feature.*'captions'"):
    sources.captions_of(wrong)
  nested = tiny_config(**_text_overrides('tfds:synthetic_captioned_images', data['tfds'], 'captions/txt'))
  with pytest.raises(ValueError, match="no 'txt' inside 'captions'"):
    sources.captions_of(nested)
  folder = tmp_path / 'f'
  shutil.copytree(data['folder'], folder)
  os.remove(folder / '003.txt')
  config = tiny_config(**_text_overrides(f'folder:{folder}'))
  with pytest.raises(ValueError, match=r'1 of 16 images have no caption file, e\.g\. .*003\.txt'):
    sources.captions_of(config)
  with pytest.raises(ValueError, match="'digits' has no captions"):
    sources.captions_of(tiny_config())
  with pytest.raises(config_lib.ConfigError, match='data.dataset'):
    config_lib.validate(tiny_config(**{'model.context_dim': 384}))
  with pytest.raises(config_lib.ConfigError, match='sampling.prompt.*text-conditional'):
    config_lib.validate(tiny_config(**{'sampling.prompt': 'a red circle'}))


class _NoEncoder:
  def __getattr__(self, name):
    raise AssertionError('the cache was on disk: nothing should be encoded')


def test_cache_holds_the_encoders_states_and_is_reused(data, tmp_path):
  config = tiny_config(**_text_overrides('tfds:synthetic_captioned_images', data['tfds']))
  encoder = captions.load_encoder(config)
  cache = captions.build_cache(config, str(tmp_path), encoder=encoder)
  distinct = sorted({c for caps in data['per_image'] for c in caps})
  assert cache.captions == ('',) + tuple(distinct)
  assert len(cache) == N and all(len(cache.example_ids(i)) == 2 for i in range(N))
  assert cache.multiple
  # Row r holds caption r's states, padded to context_len with mask False.
  ids = cache.example_ids(3)
  rows = cache.rows(ids)
  direct = captions.encode(config, encoder, [cache.captions[i] for i in ids])
  np.testing.assert_allclose(rows['context'], direct[0], atol=1e-5)
  np.testing.assert_array_equal(rows['context_mask'], direct[1])
  assert rows['context'].shape == (2, 8, 384)
  real = rows['context_mask'].sum(1)
  assert np.all(real >= 3) and not rows['context'][0, real[0]:].any()
  null_states, null_mask = cache.null
  assert null_mask.sum() == 2  # [CLS] [SEP]
  np.testing.assert_allclose(null_states, captions.null(config, encoder)[0], atol=1e-5)
  again = captions.build_cache(config, str(tmp_path), encoder=_NoEncoder())
  assert again.folder == cache.folder


def test_pipeline_batches_carry_one_caption_per_example_and_step(data, tmp_path):
  config = tiny_config(**_text_overrides('tfds:synthetic_captioned_images', data['tfds']))
  cache = captions.build_cache(config, str(tmp_path))

  def stream(state=None, k=6):
    it = pipeline.get_dataset(config, batch_size=8, process_index=0, process_count=1,
                              captions=cache)
    if state is not None:
      it.set_state(state)
    out = [next(it) for _ in range(k)]
    return out, it.get_state()

  batches, _ = stream()
  for b in batches:
    assert b['context'].shape == (8, 8, 384) and b['context_mask'].dtype == bool
    np.testing.assert_array_equal(b['context'], cache.rows(b['caption_id'])['context'])
  picked = np.concatenate([b['caption_id'] for b in batches])
  # Both captions of the images get picked (the second ones are "one red circle", ...).
  first_ids = set(cache.ids[cache.offsets[:-1]].tolist())
  second_ids = set(cache.ids[cache.offsets[:-1] + 1].tolist())
  assert set(picked.tolist()) & first_ids and set(picked.tolist()) & second_ids
  assert set(picked.tolist()) <= first_ids | second_ids
  again, _ = stream()
  np.testing.assert_array_equal(picked, np.concatenate([b['caption_id'] for b in again]))
  first, state = stream(k=3)
  rest, _ = stream(state, k=3)
  np.testing.assert_array_equal(np.concatenate([b['caption_id'] for b in first + rest]), picked)


@pytest.fixture(scope='module')
def text_run(data, tmp_path_factory):
  root = tmp_path_factory.mktemp('text_run')
  overrides = _text_overrides('tfds:synthetic_captioned_images', data['tfds'])
  config = _config_file(root / 'config.py', overrides)
  _main(config, str(root / 'run'))
  return config, str(root / 'run')


def test_tfds_captioned_run_trains_through_main(text_run):
  _, workdir = text_run
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))
  assert glob.glob(os.path.join(workdir, 'text_cache', '*', 'states.npy'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    losses = [json.loads(line)['loss'] for line in f if '"loss"' in line]
  assert losses and np.all(np.isfinite(losses))


def test_caption_folder_trains_through_main_with_a_prompt_grid(data, tmp_path):
  overrides = _text_overrides(f'folder:{data["folder"]}')
  overrides.update({'training.sample_every': 2, 'training.num_grid_samples': 8})
  config = _config_file(tmp_path / 'config.py', overrides)
  _main(config, str(tmp_path / 'run'))
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '2')
  grid = np.asarray(Image.open(tmp_path / 'run' / 'samples' / 'train_step_0000002.png'))
  # A captioned grid: 8 tiles of 96 px (8x8 upscaled 12x) with text rows under each.
  assert grid.shape[0] > 3 * 96 and grid.ndim == 3


def test_sample_mode_with_prompt_and_negative_prompt(text_run):
  config, workdir = text_run
  _main(config, workdir, '--config.sampling.prompt=a red circle',
        '--config.sampling.guidance_scale=3', '--config.sampling.negative_prompt=a blue square',
        mode='sample')
  npz_files = glob.glob(os.path.join(workdir, 'samples', '*_w3_a-red-circle_neg-a-blue-square_*.npz'))
  assert len(npz_files) == 1, os.listdir(os.path.join(workdir, 'samples'))
  with np.load(npz_files[0]) as npz:
    assert npz['images'].shape == (8, 8, 8, 3)
    assert list(npz['prompts']) == ['a red circle'] * 8
    assert str(npz['negative_prompt']) == 'a blue square'
  assert os.path.isfile(npz_files[0].replace('.npz', '.png'))


def test_negative_prompt_replaces_the_empty_prompt_in_guidance(text_run):
  """After two steps the zero-initialised cross-attention outputs still cut the text off, so the
  params are perturbed here to make the text matter."""
  import experiment  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import sample_lib  # pylint: disable=g-import-not-at-top
  _, workdir = text_run
  config = config_lib.load_run_config(workdir)
  config.sampling.guidance_scale = 3.0
  model, schedule = experiment.model(config), experiment.schedule(config)
  _, params = experiment.restore_params(config, workdir, module=model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(np.float32),
                        params)
  prompts = ['a red circle'] * 8
  _, conds, conditioner, none = sample_lib.text_conditions(config, 8, prompts)
  assert none is None  # no negative prompt: guidance uses the empty prompt
  run = lambda null: sample_lib.sample_images(config, model, schedule, params, 8, seed=0,
                                              conds=conds, conditioner=conditioner,
                                              null_conds=null)
  plain = run(None)
  np.testing.assert_array_equal(run(conditioner.null(conds)), plain)  # the same thing, explicit
  config.sampling.negative_prompt = 'a blue square'
  _, _, _, negative = sample_lib.text_conditions(config, 8, prompts)
  encoder = captions.load_encoder(config)
  np.testing.assert_allclose(negative['context'],
                             captions.encode(config, encoder, ['a blue square'] * 8)[0])
  assert not np.array_equal(run(negative), plain)


def test_prompts_file_cycles_over_the_samples(text_run, tmp_path):
  config, workdir = text_run
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a red circle\n\na green triangle on the left\n')
  _main(config, workdir, f'--config.sampling.prompts_file={prompts}', mode='sample')
  npz_files = glob.glob(os.path.join(workdir, 'samples', '*_prompts_*.npz'))
  assert len(npz_files) == 1
  with np.load(npz_files[0]) as npz:
    assert list(npz['prompts']) == ['a red circle', 'a green triangle on the left'] * 4


def test_eval_mode_reports_clip_score_or_says_why_not(data, text_run, tmp_path):
  import eval_lib  # pylint: disable=g-import-not-at-top
  from evaluation import clip  # pylint: disable=g-import-not-at-top
  from evaluation import fid  # pylint: disable=g-import-not-at-top
  config, workdir = text_run
  images, caps = _images_and_captions()
  stats = str(tmp_path / 'stats.npz')
  fid.reference_statistics(lambda: [images[:8]], stats, batch_size=8)
  clip_folder = clip_reference.write_clip_model(clip_reference.load(), str(tmp_path / 'clip'))
  _main(config, workdir, '--config.eval.num_samples=8', '--config.eval.batch_size=8',
        f'--config.eval.reference_stats={stats}', f'--config.eval.clip_weights={clip_folder}',
        mode='eval')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    record = [json.loads(line) for line in f if '"mode": "eval"' in line][-1]
  assert isinstance(record['clip_score'], float) and 0 <= record['clip_score'] <= 100
  assert np.isfinite(record['fid'])
  # The same function on given images and prompts: torchmetrics' formula on the CLIP embeddings.
  run_config = config_lib.load_run_config(workdir)
  run_config.eval.clip_weights = clip_folder
  model, params = clip.load(clip_folder)
  tok = clip.tokenizer(clip_folder)
  cos = np.sum(np.asarray(clip.image_embeds(model, params, images[:4])) *
               np.asarray(clip.text_embeds(model, params, clip.tokenize(tok, caps[:4]))), -1)
  assert eval_lib.clip_result(run_config, images[:4], caps[:4]) == pytest.approx(
      100 * max(cos.mean(), 0), abs=1e-4)
  run_config.eval.clip_weights = ''
  assert eval_lib.clip_result(run_config, images[:4], caps[:4]).startswith(
      'not computed: set config.eval.clip_weights')
