"""evaluation/clip.py against transformers' CLIPModel + CLIPImageProcessor outputs stored in
tests/data/clip_reference.npz (a small random CLIP; see evaluation/check_text_encoders.py)."""

import os

import numpy as np
import pytest

import clip_reference
from evaluation import clip
from models import clip as clip_modules
from models import hf_port

TOL = 1e-4  # max |ours - torch| / max |torch|; measured < 1e-6


def rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope='module')
def ref():
  return clip_reference.load()


@pytest.fixture(scope='module')
def loaded(ref, tmp_path_factory):
  folder = clip_reference.write_clip_model(ref, str(tmp_path_factory.mktemp('clip')))
  return (folder,) + clip.load(folder)


def test_embeds_match_transformers(ref, loaded):
  _, model, params = loaded
  text = np.asarray(clip.text_embeds(model, params, ref['ids']))
  assert rel(text, ref['text_embeds']) < TOL
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, atol=1e-5)
  # the network alone, on transformers' own pixel_values
  assert rel(clip.pixel_embeds(model, params, ref['pixels']), ref['image_embeds']) < TOL
  # end to end from uint8: already 32x32 (no resampling), and 40x48 (bicubic down, crop)
  assert rel(clip.image_embeds(model, params, ref['images_same']), ref['image_embeds_same']) < TOL
  assert rel(clip.image_embeds(model, params, ref['images']), ref['image_embeds']) < 1e-3


def test_preprocess_matches_clip_image_processor(ref):
  for images, pixels in ((ref['images'], ref['pixels']), (ref['images_same'], ref['pixels_same'])):
    got = np.asarray(clip.preprocess(images, 32))
    assert got.shape == pixels.shape == (len(images), 32, 32, 3)
    levels = np.abs(got - pixels) * np.asarray(clip.STD) * 255  # in uint8 steps
    assert levels.max() <= 1.0 + 1e-3 and (levels > 0.01).mean() < 0.01


def test_resized_shape_is_shortest_side():
  assert clip.resized_shape(40, 48, 32) == (32, 38)
  assert clip.resized_shape(97, 31, 32) == (100, 32)
  assert clip.resized_shape(224, 224, 224) == (224, 224)


def test_tokenizer_and_text_tower_shared_with_text_encoder(ref, loaded):
  folder, model, params = loaded
  ids = clip.tokenize(clip.tokenizer(folder), [str(t) for t in ref['texts']])
  np.testing.assert_array_equal(ids, ref['ids'])
  from models import text_encoders  # pylint: disable=g-import-not-at-top
  enc = text_encoders.load(folder)
  projected = np.asarray(enc.embed_ids(ids))
  np.testing.assert_allclose(clip.text_embeds(model, params, ids),
                             projected / np.linalg.norm(projected, axis=-1, keepdims=True),
                             atol=1e-6)


def test_clip_score_is_torchmetrics_formula(ref):
  img = np.asarray(ref['image_embeds'])  # 2 unit vectors
  txt = np.asarray(ref['text_embeds'])[:2]
  want = 100 * np.mean(np.sum(img * txt, axis=-1))
  assert clip.clip_score(img, txt) == pytest.approx(max(want, 0.0), abs=1e-4)
  assert clip.clip_score(img, img) == pytest.approx(100.0, abs=1e-3)
  assert clip.clip_score(img, -img) == 0.0  # clamped at zero
  assert clip.clip_score(3 * img, img) == pytest.approx(100.0, abs=1e-3)  # normalizes again


def test_vit_b32_param_count():
  text = clip_modules.TextConfig.from_hf({})  # transformers' defaults are ViT-B/32's
  vision = clip_modules.VisionConfig.from_hf({'image_size': 224, 'patch_size': 32})
  shapes = clip_modules.clip_shapes(text, vision, 512)
  assert hf_port.count_params(shapes) == 151_277_313


def test_text_only_folder_and_missing_vision_key(ref, tmp_path):
  with pytest.raises(ValueError, match='text-only'):
    clip.load(clip_reference.write_clip_text(ref, str(tmp_path / 'text')))
  state = clip_reference.weights(ref)
  del state['vision_model.pre_layrnorm.weight']
  folder = clip_reference.write_clip_model(ref, str(tmp_path / 'broken'), state)
  with pytest.raises(KeyError, match=r"'vision_model\.pre_layrnorm\.weight' \(shape \(64,\)"):
    clip.load(folder)
  os.remove(os.path.join(folder, 'model.safetensors'))
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    clip.load(folder)


def test_rejects_non_uint8_images(loaded):
  _, model, params = loaded
  with pytest.raises(ValueError, match='uint8'):
    clip.image_embeds(model, params, np.zeros((1, 32, 32, 3), np.float32))
