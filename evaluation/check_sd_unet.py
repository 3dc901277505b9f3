"""Proves the Flax SD U-Net and its diffusers loader against diffusers' UNet2DConditionModel.

Two halves, two Python environments (torch is never a dependency of this repo):

* `torch` stage (a venv with torch + diffusers): for each small config in SMALL_CONFIGS builds
  diffusers.UNet2DConditionModel at random init, perturbs every tensor of its state dict (so
  that zero-initialised layers, GroupNorm / LayerNorm scales, biases and every transpose
  matter), rounds it to float16 values (so that the test reference can store the weights in
  half the bytes and still be exact), `save_pretrained`s it (safetensors) and runs it on fixed
  (x, t, encoder_hidden_states[, encoder_attention_mask]). It also builds SD 1.5's U-Net (the
  SD15 config.json below) on the meta device (no memory) and records its config, parameter
  count and every (name, shape) of its state dict. With --sd-forward it also builds SD 1.5's
  U-Net for real (random init, 3.4 GB in float32), saves it and runs one forward.
* `jax` stage (this repo's venv): `models.load_diffusers_unet` on each saved folder, the same
  forward, max |jax - torch| / max |torch|; `sd_unet.check_shapes` on SD's (name, shape) list
  against our SD-size Flax tree (jax.eval_shape), which maps every name and checks every shape,
  both ways; the parameter count.

One command runs both (the torch half in a subprocess):

  python -m evaluation.check_sd_unet --torch-python /work/torchvenv/bin/python [--sd-forward]

`--write-reference tests/data/sd_unet_reference.npz` also stores config 0's weights (float16,
exact), config.json, inputs and outputs and SD's (name, shape) list for the test suite, which
then checks without torch. Only numpy is imported at module level so that the torch venv can run
this file as a script.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CROSS_DOWN, PLAIN_DOWN = 'CrossAttnDownBlock2D', 'DownBlock2D'
CROSS_UP, PLAIN_UP = 'CrossAttnUpBlock2D', 'UpBlock2D'

# Small diffusers configs; the first is the stored test reference. Each exercises every block
# type (cross-attention and plain down / up blocks, the cross-attention mid block, down- and
# upsamplers, conv_shortcut resnets). Non-square inputs catch H / W swaps.
#   0: SD 1.x's layout (3 cross-attn down + 1 plain, plain up + 3 cross-attn up), 1x1-conv
#      projections, 2 heads, one resnet per block.
#   1: SD 2.x's traits: linear projections, heads per block (attention_head_dim a list),
#      2 resnets per block, 2 transformer layers per Transformer2D, and a context mask
#      (padding, holes). A row with no real token is left out: diffusers adds -10000 to every
#      logit there, and its float32 rounding (~1e-3 per logit) alone moves the output ~1.5e-4;
#      tests/test_sd_unet.py checks that case (= no mask) on our side.
#   2: the shapes_sd_tiny layout (plain block last down, first up) with the other time
#      embedding (flip_sin_to_cos False, freq_shift 1) and downsample_padding 0.
SMALL_CONFIGS = (
    dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
         attention_head_dim=2, cross_attention_dim=24,
         image=(16, 8), tokens=5, mask=False),
    dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16,
         attention_head_dim=(2, 4, 4), transformer_layers_per_block=2, cross_attention_dim=40,
         use_linear_projection=True, down_block_types=(CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
         up_block_types=(PLAIN_UP, CROSS_UP, CROSS_UP),
         image=(8, 16), tokens=7, mask=True),
    dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
         attention_head_dim=2, cross_attention_dim=48, down_block_types=(CROSS_DOWN, PLAIN_DOWN),
         up_block_types=(PLAIN_UP, CROSS_UP), flip_sin_to_cos=False, freq_shift=1,
         downsample_padding=0, image=(8, 12), tokens=3, mask=False),
)
# SD 1.5's unet/config.json, as models/sd_unet.py's SD15 (this file cannot import it: the torch
# venv has no jax); the jax stage checks that the two agree.
SD15 = {
    '_class_name': 'UNet2DConditionModel', 'act_fn': 'silu', 'attention_head_dim': 8,
    'block_out_channels': [320, 640, 1280, 1280], 'center_input_sample': False,
    'cross_attention_dim': 768, 'down_block_types': [CROSS_DOWN] * 3 + [PLAIN_DOWN],
    'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 4,
    'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-05,
    'norm_num_groups': 32, 'out_channels': 4, 'sample_size': 64,
    'up_block_types': [PLAIN_UP] + [CROSS_UP] * 3,
}
SD15_PARAMS = 859_520_964
IN_CHANNELS = 4
BATCH = 2
TIMESTEPS = (10, 981)
SD_FORWARD = dict(image=(32, 32), tokens=77, t=500)  # --sd-forward's one example


def _diffusers_kwargs(cfg):
  kwargs = {k: v for k, v in cfg.items() if k not in ('image', 'tokens', 'mask')}
  kwargs.setdefault('in_channels', IN_CHANNELS)
  kwargs.setdefault('out_channels', IN_CHANNELS)
  return kwargs


def _inputs(seed, cfg, batch=BATCH):
  """x NHWC ~ N(0, 1), t int [B], context ~ N(0, 1) [B, L, D] and a mask (or None)."""
  rng = np.random.default_rng(seed)
  h, w = cfg['image']
  x = rng.standard_normal((batch, h, w, cfg.get('in_channels', IN_CHANNELS))).astype(np.float32)
  t = np.asarray(cfg.get('t', TIMESTEPS[:batch]), np.int64).reshape(-1)
  t = np.broadcast_to(t, (batch,)).copy()
  ctx = rng.standard_normal((batch, cfg['tokens'], cfg['cross_attention_dim'])).astype(np.float32)
  mask = None
  if cfg.get('mask'):
    mask = np.ones((batch, cfg['tokens']), bool)
    mask[0, cfg['tokens'] // 2:] = False  # padding after the first half
    mask[-1, 1::2] = False  # holes
  return x, t, ctx, mask


def _perturb(model, torch, fp16=True):
  """Noise on every tensor (norm scales start at 1, biases and some projections at 0); q / k get
  larger weights so that the softmax is far from uniform; optionally round to float16 values."""
  with torch.no_grad():
    for name, p in model.state_dict().items():
      spread = 0.1 if p.ndim == 1 else 0.5 * float(p.std()) + 1e-3
      p.add_(torch.randn_like(p) * spread)
      if name.endswith(('to_q.weight', 'to_k.weight')):
        p.mul_(3.0)
      if fp16:
        p.copy_(p.half().float())


def _run_torch(model, torch, x, t, ctx, mask):
  kwargs = {}
  if mask is not None:
    kwargs['encoder_attention_mask'] = torch.from_numpy(mask.astype(np.float32))
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                encoder_hidden_states=torch.from_numpy(ctx), **kwargs).sample
  return out.numpy().transpose(0, 2, 3, 1)


def torch_stage(out_dir, seed, sd_forward=False):
  """Writes <out_dir>/model_<i>/ (diffusers folders), torch.npz and sd_keys.json (and sd15/ with
  sd_forward)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  arrays = {}
  for i, cfg in enumerate(SMALL_CONFIGS):
    unet = UNet2DConditionModel(**_diffusers_kwargs(cfg)).eval()
    _perturb(unet, torch)
    unet.save_pretrained(os.path.join(out_dir, f'model_{i}'), safe_serialization=True)
    x, t, ctx, mask = _inputs(seed + i, cfg)
    arrays.update({f'x_{i}': x, f't_{i}': t, f'context_{i}': ctx,
                   f'out_{i}': _run_torch(unet, torch, x, t, ctx, mask)})
    if mask is not None:
      arrays[f'mask_{i}'] = mask
    arrays[f'params_{i}'] = np.array(sum(p.numel() for p in unet.parameters()))
  arrays['torch_version'] = np.array(torch.__version__)
  arrays['diffusers_version'] = np.array(diffusers.__version__)

  with torch.device('meta'):  # shapes only: SD's 3.4 GB of float32 is never allocated
    sd = UNet2DConditionModel(**{k: v for k, v in SD15.items() if not k.startswith('_')})
  state = sd.state_dict()
  count = sum(p.numel() for p in sd.parameters())
  assert count == SD15_PARAMS, count
  # Private entries (_use_default_values is an unordered set) would make the file differ run to
  # run; the config fields proper are all the jax stage reads.
  sd_keys = {'config': {k: v for k, v in sd.config.items() if not k.startswith('_')},
             'params': count, 'shapes': {k: list(v.shape) for k, v in state.items()}}
  sd_keys['config']['_class_name'] = 'UNet2DConditionModel'
  with open(os.path.join(out_dir, 'sd_keys.json'), 'w') as f:
    json.dump(sd_keys, f, default=list, sort_keys=True)

  if sd_forward:
    del sd
    unet = UNet2DConditionModel(**{k: v for k, v in SD15.items() if not k.startswith('_')})
    unet.eval()
    _perturb(unet, torch, fp16=False)
    unet.save_pretrained(os.path.join(out_dir, 'sd15'), safe_serialization=True)
    cfg = dict(SD_FORWARD, cross_attention_dim=768)
    x, t, ctx, _ = _inputs(seed + 100, cfg, batch=1)
    arrays.update({'x_sd': x, 't_sd': t, 'context_sd': ctx,
                   'out_sd': _run_torch(unet, torch, x, t, ctx, None)})
  np.savez(os.path.join(out_dir, 'torch.npz'), **arrays)


def relative_error(ours, ref):
  """max |ours - ref| / max |ref| over the whole array."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _jax_imports():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  from models import sd_unet  # pylint: disable=g-import-not-at-top
  return jax, sd_unet


def forward(module, params, x, t, context, mask=None):
  """Our U-Net's output (float32 NHWC) at HIGHEST matmul precision (accelerators would
  otherwise multiply float32 in tf32 / bf16)."""
  jax, _ = _jax_imports()
  kwargs = {} if mask is None else {'context_mask': mask}
  with jax.default_matmul_precision('highest'):
    fn = jax.jit(lambda p, x, t, c, kw: module.apply({'params': p}, x, t, context=c, **kw))
    return np.asarray(fn(params, x, t, context, kwargs))


def check_sd_mapping(sd_keys):
  """check_shapes on SD's (name, shape) list against our SD-size Flax tree (eval_shape); raises
  on any unmapped name or wrong shape. Returns (tensors matched, our parameter count)."""
  jax, sd_unet = _jax_imports()
  from models import count_params  # pylint: disable=g-import-not-at-top
  module = sd_unet.create(sd_unet.config_from_diffusers(sd_keys['config']))
  n = sd_unet.check_shapes(sd_keys['shapes'], module, 'SD 1.5 (meta device)')
  return n, count_params(sd_unet.param_shapes(module))


def jax_stage(out_dir):
  """Loads each saved folder with load_diffusers_unet and compares; returns {label: error}."""
  _, sd_unet = _jax_imports()
  assert sd_unet.SD15 == SD15 and sd_unet.SD15_PARAMS == SD15_PARAMS, 'SD15 copies differ'
  report = {}
  with np.load(os.path.join(out_dir, 'torch.npz')) as ref:
    ref = {k: ref[k] for k in ref.files}
  print(f'torch {ref["torch_version"]}, diffusers {ref["diffusers_version"]} vs jax, '
        'max |jax - torch| / max |torch|:')
  for i, cfg in enumerate(SMALL_CONFIGS):
    module, params = sd_unet.load_diffusers_unet(os.path.join(out_dir, f'model_{i}'))
    out = forward(module, params, ref[f'x_{i}'], ref[f't_{i}'], ref[f'context_{i}'],
                  ref.get(f'mask_{i}'))
    label = (f'config {i} {cfg["block_out_channels"]} ({int(ref[f"params_{i}"]):,} params'
             f'{", masked" if cfg.get("mask") else ""})')
    report[label] = relative_error(out, ref[f'out_{i}'])
    print(f'  {label}: {report[label]:.3e}  (max |torch| {np.abs(ref[f"out_{i}"]).max():.3g})')
  with open(os.path.join(out_dir, 'sd_keys.json')) as f:
    sd_keys = json.load(f)
  n, count = check_sd_mapping(sd_keys)
  assert count == sd_keys['params'] == SD15_PARAMS, (count, sd_keys['params'])
  print(f'  SD 1.5 U-Net: all {n} diffusers tensors map to the Flax tree with matching shapes; '
        f'{count:,} parameters in both')
  if 'out_sd' in ref:
    module, params = sd_unet.load_diffusers_unet(os.path.join(out_dir, 'sd15'))
    out = forward(module, params, ref['x_sd'], ref['t_sd'], ref['context_sd'])
    label = f'SD 1.5 at random init, {ref["x_sd"].shape} latents, 77 tokens'
    report[label] = relative_error(out, ref['out_sd'])
    print(f'  {label}: {report[label]:.3e}')
  return report


def write_reference(out_dir, out):
  """Stores config 0's weights (diffusers names, torch layout, float16: exact, the torch stage
  rounded them), its config.json, inputs and output, and SD's (name, shape) list, compressed."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  folder = os.path.join(out_dir, 'model_0')
  state = safetensors.numpy.load_file(os.path.join(folder, 'diffusion_pytorch_model.safetensors'))
  arrays = {}
  for k, v in state.items():
    half = v.astype(np.float16)
    assert np.array_equal(half.astype(np.float32), v), f'{k} is not float16-exact'
    arrays[f'weight/{k}'] = half
  with open(os.path.join(folder, 'config.json')) as f:
    config = {k: v for k, v in json.load(f).items() if not k.startswith('_') or
              k == '_class_name'}
  with open(os.path.join(out_dir, 'sd_keys.json')) as f:
    sd_keys = f.read()
  with np.load(os.path.join(out_dir, 'torch.npz')) as ref:
    for k in ('x', 't', 'context', 'out'):
      arrays[k] = ref[f'{k}_0']
    arrays['versions'] = np.array(f'torch {ref["torch_version"]}, diffusers '
                                  f'{ref["diffusers_version"]}')
  np.savez_compressed(out, config_json=np.array(json.dumps(config, sort_keys=True)),
                      sd_keys_json=np.array(sd_keys), **arrays)
  print(f'wrote {out} ({os.path.getsize(out)} bytes)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', nargs='?', default='both', choices=('both', 'torch', 'jax'))
  parser.add_argument('--torch-python', default='/work/torchvenv/bin/python',
                      help='python of the venv with torch + diffusers')
  parser.add_argument('--dir', default='', help='folder the torch stage writes (and jax reads)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--sd-forward', action='store_true',
                      help='also compare one forward of SD 1.5 at full size (~3.4 GB per side)')
  parser.add_argument('--write-reference', default='', help='also store the small test reference')
  parser.add_argument('--tol', type=float, default=1e-4)
  args = parser.parse_args(argv)

  if args.stage == 'torch':
    os.makedirs(args.dir, exist_ok=True)
    torch_stage(args.dir, args.seed, args.sd_forward)
    return
  out_dir = args.dir
  if args.stage == 'both':
    out_dir = out_dir or tempfile.mkdtemp(prefix='check_sd_unet_')
    print(f'seed {args.seed}; torch stage with {args.torch_python} into {out_dir}')
    cmd = [args.torch_python, os.path.abspath(__file__), 'torch', '--dir', out_dir,
           '--seed', str(args.seed)] + (['--sd-forward'] if args.sd_forward else [])
    subprocess.run(cmd, check=True)
  report = jax_stage(out_dir)
  if args.write_reference:
    write_reference(out_dir, args.write_reference)
  worst = max(report.values())
  print(f'worst {worst:.3e} (tolerance {args.tol:g})')
  if worst > args.tol:
    sys.exit(1)


if __name__ == '__main__':
  main()
