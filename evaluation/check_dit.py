"""Proves the Flax DiT (models/dit.py) and its checkpoint loader against diffusers' DiT, run by torch.

Two halves, two Python environments (torch is never a dependency of this repo):

* `torch` stage (a venv with torch + diffusers): builds a small DiTTransformer2DModel
  (`SMALL`: 8x8x4 inputs, patch 2, 2 blocks, 2 heads x 16, learned sigma, 10 classes), adds
  noise to EVERY parameter (a fresh DiT's zero-initialised layers would make the output 0 and
  hide most of the network), runs it on fixed x, t, y, converts its state dict to the
  facebookresearch/DiT key names (`DIFFUSERS_TO_REFERENCE`) and torch.save's that; writes inputs,
  outputs and the .pt bytes to an .npz.
* `jax` stage (this repo's venv): reads the .pt with `models.dit.load_dit_checkpoint` (no
  torch), runs `models.dit.DiT` and reports max |jax - torch| / max |torch|.

diffusers vs the reference (found reading diffusers 0.42.1; the torch stage compensates so that
the torch model computes the reference's function):
  * timestep features: diffusers' CombinedTimestepLabelEmbeddings uses Timesteps(256,
    flip_sin_to_cos=True, downscale_freq_shift=1), i.e. f_i = 10000^(-i / 127); the reference
    (and this repo) uses f_i = 10000^(-i / 128) (shift 0). The torch stage sets the shift to 0 and
    also records diffusers' unpatched output, to report how much the two differ.
  * per-block embedders: every diffusers block has its own copy of the timestep MLP and label
    table (its AdaLayerNormZero embeds t and y itself; the final layer uses block 0's); the
    reference has one. The torch stage ties the copies to block 0's after perturbing.
  * norm2/norm3 of a diffusers block use `norm_eps` (default 1e-5); the reference's LayerNorms
    all use 1e-6. SMALL passes norm_eps=1e-6.
  * q, k, v are separate Linears (to_q/to_k/to_v) vs the reference's fused qkv (rows q|k|v);
    the MLP is ff.net.0.proj / ff.net.2 vs mlp.fc1 / mlp.fc2.
  * the position table is a non-persistent buffer (not in diffusers' state dict); its values
    equal the reference's (same meshgrid(w, h) ordering, sin before cos), max difference to
    `models.dit.pos_embed_table` reported.
  * label table: num_classes + 1 rows with the null class last (class_dropout_prob 0.1 > 0), as
    the reference's.

One command runs both (the torch half in a subprocess):

  python -m evaluation.check_dit --torch-python /work/torchvenv/bin/python

`--write-reference tests/data/dit_reference.npz` also stores the small reference (weights as .pt
bytes, inputs, outputs) that tests/test_dit.py checks without torch. Only numpy is imported at
module level so that the torch venv can run this file as a script.
"""

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

# The small diffusers model; hidden = 2 x 16 = 32.
SMALL = dict(sample_size=8, patch_size=2, num_layers=2, num_attention_heads=2,
             attention_head_dim=16, in_channels=4, out_channels=8, num_embeds_ada_norm=10,
             norm_eps=1e-6)
BATCH_T = (0, 1, 500, 999)  # both ends of the 1000-step range
BATCH_Y = (0, 3, 9, 10)  # 10 = the null label

# diffusers DiTTransformer2DModel name -> facebookresearch/DiT name ({n} = block index). Per-block
# embedder copies (transformer_blocks.{n}.norm1.emb.*, n > 0) are dropped after a check that they
# equal block 0's; to_q/to_k/to_v are concatenated (rows) into qkv.
DIFFUSERS_TO_REFERENCE = (
    (r'pos_embed\.proj\.(weight|bias)', r'x_embedder.proj.\1'),
    (r'transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.linear_1\.(weight|bias)',
     r't_embedder.mlp.0.\1'),
    (r'transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.linear_2\.(weight|bias)',
     r't_embedder.mlp.2.\1'),
    (r'transformer_blocks\.0\.norm1\.emb\.class_embedder\.embedding_table\.weight',
     r'y_embedder.embedding_table.weight'),
    (r'transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)', r'blocks.\1.adaLN_modulation.1.\2'),
    (r'transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)', r'blocks.\1.attn.proj.\2'),
    (r'transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)', r'blocks.\1.mlp.fc1.\2'),
    (r'transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)', r'blocks.\1.mlp.fc2.\2'),
    (r'proj_out_1\.(weight|bias)', r'final_layer.adaLN_modulation.1.\1'),
    (r'proj_out_2\.(weight|bias)', r'final_layer.linear.\1'),
)
_QKV = re.compile(r'transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)')
_EMB_COPY = re.compile(r'transformer_blocks\.(\d+)\.norm1\.emb\.(.*)')


def diffusers_to_reference(state):
  """Renames a diffusers DiT state dict (numpy arrays) to facebookresearch/DiT's key names.

  Args:
    state: {diffusers name: array}; may also hold 'pos_embed' (the reference's [1, N, D] table).

  Returns:
    {reference name: array}.

  Raises:
    ValueError: a key no rule maps, or a block's embedder copy that differs from block 0's (the
      reference layout has one embedder, so such a model has no reference equivalent).
  """
  out, qkv = {}, {}
  for key, value in state.items():
    if key == 'pos_embed':
      out[key] = value
      continue
    match = _QKV.fullmatch(key)
    if match:
      block, which, kind = match.groups()
      qkv.setdefault((block, kind), {})[which] = value
      continue
    match = _EMB_COPY.fullmatch(key)
    if match and match.group(1) != '0':
      first = state[f'transformer_blocks.0.norm1.emb.{match.group(2)}']
      if not np.array_equal(first, value):
        raise ValueError(f'{key} differs from block 0\'s copy; the reference DiT has one '
                         'timestep/label embedder')
      continue
    for pattern, target in DIFFUSERS_TO_REFERENCE:
      if re.fullmatch(pattern, key):
        out[re.sub(pattern, target, key)] = value
        break
    else:
      raise ValueError(f'no reference name for diffusers key {key!r}')
  for (block, kind), parts in qkv.items():
    out[f'blocks.{block}.attn.qkv.{kind}'] = np.concatenate([parts[w] for w in 'qkv'], axis=0)
  return out


def _inputs(seed):
  rng = np.random.default_rng(seed)
  size, channels = SMALL['sample_size'], SMALL['in_channels']
  x = rng.standard_normal((len(BATCH_T), size, size, channels)).astype(np.float32)  # NHWC
  return x, np.array(BATCH_T, np.int32), np.array(BATCH_Y, np.int32)


def torch_stage(out, seed):
  """Builds, perturbs and runs the small diffusers DiT; writes inputs, outputs and weights."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(**SMALL).eval()
  with torch.no_grad():
    for _, param in model.named_parameters():
      # Noise of a Linear-init size on weights (std 1/sqrt(fan_in)), 0.1 on biases: every layer,
      # including those diffusers or the reference zero-initialise, shapes the output.
      fan_in = int(np.prod(param.shape[1:])) if param.ndim > 1 else 0
      std = fan_in ** -0.5 if fan_in else 0.1
      param.add_(std * torch.randn(param.shape, generator=gen))
    blocks = model.transformer_blocks
    for block in blocks[1:]:
      block.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())

    x, t, y = _inputs(seed)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    t_torch, y_torch = torch.from_numpy(t).long(), torch.from_numpy(y).long()

    def run():
      sample = model(x_nchw, timestep=t_torch, class_labels=y_torch).sample
      return sample.numpy().transpose(0, 2, 3, 1).copy()  # NCHW -> NHWC

    out_diffusers = run()  # diffusers as shipped: timestep frequencies with shift 1
    for block in blocks:
      block.norm1.emb.time_proj.downscale_freq_shift = 0  # the reference's frequencies
    out_reference = run()

  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  state['pos_embed'] = model.pos_embed.pos_embed.numpy()
  reference = diffusers_to_reference(state)
  buf = io.BytesIO()
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reference.items()}, buf)
  np.savez(out, x=x, t=t, y=y, out=out_reference, out_diffusers_shift1=out_diffusers,
           state_dict_pt=np.frombuffer(buf.getvalue(), np.uint8),
           torch_version=np.array(torch.__version__),
           diffusers_version=np.array(diffusers.__version__))


def small_config():
  """The fields models.create_model reads, for the SMALL model (the jax stage only; a bare
  ConfigDict, since evaluation/ sits below configs/ in the import layering)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      name='dit', num_classes=SMALL['num_embeds_ada_norm'], cond_channels=0, dtype='float32',
      remat=False))
  config.data = ml_collections.ConfigDict(dict(image_size=SMALL['sample_size'],
                                               num_channels=SMALL['in_channels']))
  config.dit = ml_collections.ConfigDict(dict(
      patch_size=SMALL['patch_size'],
      hidden_size=SMALL['num_attention_heads'] * SMALL['attention_head_dim'],
      depth=SMALL['num_layers'], num_heads=SMALL['num_attention_heads'], mlp_ratio=4.0,
      learn_sigma=SMALL['out_channels'] == 2 * SMALL['in_channels']))
  return config


def relative_error(ours, ref):
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def jax_stage(ref_path):
  """Loads the torch-written .pt with the repo's loader, runs the Flax DiT; returns errors."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import models  # pylint: disable=g-import-not-at-top
  from models import dit  # pylint: disable=g-import-not-at-top
  config = small_config()
  with np.load(ref_path) as ref:
    ref = {k: ref[k] for k in ref.files}
  with tempfile.TemporaryDirectory() as tmp:
    pt = os.path.join(tmp, 'dit_small.pt')
    with open(pt, 'wb') as f:
      f.write(ref['state_dict_pt'].tobytes())
    params = dit.load_dit_checkpoint(pt, config)
    pos_diff = dit.pos_embed_max_difference(pt, config.dit.hidden_size)
  model = models.create_model(config)
  got = np.asarray(model.apply({'params': params}, ref['x'], ref['t'], y=ref['y'], train=False))
  report = {
      'output vs torch (reference frequencies)': relative_error(got, ref['out']),
      'output vs diffusers as shipped (freq shift 1)': relative_error(got, ref['out_diffusers_shift1']),
      'pos_embed max abs difference': pos_diff,
  }
  print(f'torch {ref["torch_version"]}, diffusers {ref["diffusers_version"]} vs jax; output '
        f'shape {got.shape}, max |torch| {np.abs(ref["out"]).max():.3g}:')
  for name, value in report.items():
    print(f'  {name}: {value:.3e}')
  return report


def write_reference(ref_path, out):
  with np.load(ref_path) as ref:
    np.savez_compressed(out, **{k: ref[k] for k in ref.files})
  print(f'wrote {out} ({os.path.getsize(out)} bytes)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', nargs='?', default='both', choices=('both', 'torch', 'jax'))
  parser.add_argument('--torch-python', default='/work/torchvenv/bin/python',
                      help='python of the venv with torch + diffusers')
  parser.add_argument('--ref', default='', help='torch results .npz (written or read)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--write-reference', default='', help='also store the small test reference')
  parser.add_argument('--tol', type=float, default=1e-4)
  args = parser.parse_args(argv)

  if args.stage == 'torch':
    torch_stage(args.ref, args.seed)
    return
  ref = args.ref
  if args.stage == 'both':
    ref = ref or os.path.join(tempfile.mkdtemp(), 'dit_torch.npz')
    print(f'seed {args.seed}; torch stage with {args.torch_python}')
    subprocess.run([args.torch_python, os.path.abspath(__file__), 'torch', '--ref', ref,
                    '--seed', str(args.seed)], check=True)
  report = jax_stage(ref)
  if args.write_reference:
    write_reference(ref, args.write_reference)
  worst = report['output vs torch (reference frequencies)']
  print(f'worst {worst:.3e} (tolerance {args.tol:g})')
  if worst > args.tol or report['pos_embed max abs difference'] > 1e-6:
    sys.exit(1)


if __name__ == '__main__':
  main()
