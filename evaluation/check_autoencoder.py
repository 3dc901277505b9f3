"""Proves the Flax AutoencoderKL and its diffusers loader against diffusers itself, run by torch.

Two halves, two Python environments (torch is never a dependency of this repo):

* `torch` stage (a venv with torch + diffusers): for each small config in SMALL_CONFIGS builds
  diffusers.AutoencoderKL, perturbs every tensor of its state dict (so that GroupNorm scales,
  biases and every transpose matter), `save_pretrained`s it (safetensors) and runs encode
  (latent_dist.mean / .logvar) and decode on fixed inputs; it also builds SD 1.5's VAE config on
  the meta device (no memory) and records every (name, shape) of its state dict.
* `jax` stage (this repo's venv): `models.autoencoder.load_diffusers` on each saved folder,
  encode / decode, max |jax - torch| / max |torch| per output; and `match_state_dict` on SD's
  (name, shape) list, which checks that every name maps and every shape agrees, both ways.

One command runs both (the torch half in a subprocess):

  python -m evaluation.check_autoencoder --torch-python /work/torchvenv/bin/python

`--write-reference tests/data/autoencoder_reference.npz` also stores the first small config's
weights, inputs and outputs (~0.7 MB) and SD's (name, shape) list for the test suite, which then
checks without torch. Only numpy is imported at module level so that the torch venv can run this
file as a script.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

# Small diffusers configs (the first is the stored test reference). Non-square images catch H/W
# swaps; (32, 64) and the 3-level one change channels inside blocks (conv_shortcut) and, with
# layers_per_block 2, index resnets beyond 0 / 1.
SMALL_CONFIGS = (
    dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, image=(16, 24)),
    dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, image=(32, 16)),
    dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, image=(16, 16)),
)
SD_CONFIG = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 latent_channels=4, in_channels=3, out_channels=3, sample_size=512,
                 scaling_factor=0.18215)
LATENT_CHANNELS = 4
BATCH = 2


def _diffusers_kwargs(cfg):
  levels = len(cfg['block_out_channels'])
  kwargs = {k: v for k, v in cfg.items() if k != 'image'}
  kwargs.setdefault('latent_channels', LATENT_CHANNELS)
  kwargs.update(down_block_types=('DownEncoderBlock2D',) * levels,
                up_block_types=('UpDecoderBlock2D',) * levels)
  return kwargs


def _inputs(seed, cfg):
  """x NHWC in [-1, 1] and z NHWC ~ N(0, 1) for one config."""
  rng = np.random.default_rng(seed)
  h, w = cfg['image']
  f = 2 ** (len(cfg['block_out_channels']) - 1)
  x = rng.uniform(-1, 1, (BATCH, h, w, 3)).astype(np.float32)
  z = rng.standard_normal((BATCH, h // f, w // f, LATENT_CHANNELS)).astype(np.float32)
  return x, z


def torch_stage(out_dir, seed):
  """Writes <out_dir>/model_<i>/ (diffusers folders), <out_dir>/torch.npz and sd_keys.json."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  arrays = {}
  for i, cfg in enumerate(SMALL_CONFIGS):
    vae = AutoencoderKL(**_diffusers_kwargs(cfg)).eval()
    with torch.no_grad():
      for name, p in vae.state_dict().items():
        # Norm scales start at 1 and biases at 0; noise on everything makes a missed transpose,
        # scale or bias visible. q / k get larger weights so the softmax is far from uniform.
        spread = 0.1 if p.ndim == 1 else 0.5 * float(p.std())
        p.add_(torch.randn_like(p) * spread)
        if name.endswith(('to_q.weight', 'to_k.weight')):
          p.mul_(4.0)
    folder = os.path.join(out_dir, f'model_{i}')
    vae.save_pretrained(folder, safe_serialization=True)
    x, z = _inputs(seed + i, cfg)
    with torch.no_grad():
      dist = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
      recon = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    arrays.update({f'x_{i}': x, f'z_{i}': z, f'mean_{i}': nhwc(dist.mean),
                   f'logvar_{i}': nhwc(dist.logvar), f'decoded_{i}': nhwc(recon)})
  arrays['torch_version'] = np.array(torch.__version__)
  import diffusers  # pylint: disable=g-import-not-at-top
  arrays['diffusers_version'] = np.array(diffusers.__version__)
  np.savez(os.path.join(out_dir, 'torch.npz'), **arrays)

  with torch.device('meta'):  # shapes only: SD's ~335 MB of float32 is never allocated
    sd = AutoencoderKL(**_diffusers_kwargs(SD_CONFIG))
  # Private entries (_use_default_values is an unordered set) would make the file differ run to
  # run; the config fields proper are all the jax stage reads.
  sd_keys = {'config': {k: v for k, v in sd.config.items() if not k.startswith('_')},
             'shapes': {k: list(v.shape) for k, v in sd.state_dict().items()}}
  with open(os.path.join(out_dir, 'sd_keys.json'), 'w') as f:
    json.dump(sd_keys, f, default=list, sort_keys=True)


def relative_error(ours, ref):
  """max |ours - ref| / max |ref| over the whole array."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _jax_imports():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  from models import autoencoder  # pylint: disable=g-import-not-at-top
  return jax, autoencoder


def compare(module, params, x, z, want):
  """{'mean', 'logvar', 'decoded'} -> relative error of our outputs against `want`."""
  jax, _ = _jax_imports()
  mean, logvar = jax.jit(lambda p, x: module.apply({'params': p}, x, method='encode'))(params, x)
  decoded = jax.jit(lambda p, z: module.apply({'params': p}, z, method='decode'))(params, z)
  got = {'mean': mean, 'logvar': logvar, 'decoded': decoded}
  return {k: relative_error(got[k], want[k]) for k in got}


def check_sd_mapping(sd_keys):
  """match_state_dict on SD's (name, shape) list against our SD-size Flax tree (eval_shape);
  raises on any unmapped name or wrong shape. Returns the number of tensors matched."""
  jax, autoencoder = _jax_imports()
  module = autoencoder.create_autoencoder(autoencoder.config_from_diffusers(sd_keys['config']))
  return len(autoencoder.match_state_dict(sd_keys['shapes'], autoencoder.param_shapes(module)))


def jax_stage(out_dir):
  """Loads each saved folder with load_diffusers and compares; returns {label: error}."""
  _, autoencoder = _jax_imports()
  report = {}
  with np.load(os.path.join(out_dir, 'torch.npz')) as ref:
    print(f'torch {ref["torch_version"]}, diffusers {ref["diffusers_version"]} vs jax, '
          'max |jax - torch| / max |torch|:')
    for i, cfg in enumerate(SMALL_CONFIGS):
      module, params = autoencoder.load_diffusers(os.path.join(out_dir, f'model_{i}'))
      want = {k: ref[f'{k}_{i}'] for k in ('mean', 'logvar', 'decoded')}
      for k, err in compare(module, params, ref[f'x_{i}'], ref[f'z_{i}'], want).items():
        label = f'{cfg["block_out_channels"]} lpb {cfg["layers_per_block"]} {k}'
        report[label] = err
        print(f'  {label}: {err:.3e}')
  with open(os.path.join(out_dir, 'sd_keys.json')) as f:
    sd_keys = json.load(f)
  n = check_sd_mapping(sd_keys)
  print(f'  SD 1.5 VAE: all {n} diffusers tensors map to the Flax tree with matching shapes')
  return report


def write_reference(out_dir, out):
  """Stores config 0's weights (diffusers names, torch layout), config.json, inputs and outputs,
  and SD's (name, shape) list as JSON, compressed."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  folder = os.path.join(out_dir, 'model_0')
  state = safetensors.numpy.load_file(os.path.join(folder, 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(folder, 'config.json')) as f:
    config_json = f.read()
  with open(os.path.join(out_dir, 'sd_keys.json')) as f:
    sd_keys = f.read()
  arrays = {f'weight/{k}': v for k, v in state.items()}
  with np.load(os.path.join(out_dir, 'torch.npz')) as ref:
    for k in ('x', 'z', 'mean', 'logvar', 'decoded'):
      arrays[k] = ref[f'{k}_0']
    arrays['versions'] = np.array(f'torch {ref["torch_version"]}, diffusers '
                                  f'{ref["diffusers_version"]}')
  np.savez_compressed(out, config_json=np.array(config_json), sd_keys_json=np.array(sd_keys),
                      **arrays)
  print(f'wrote {out} ({os.path.getsize(out)} bytes)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', nargs='?', default='both', choices=('both', 'torch', 'jax'))
  parser.add_argument('--torch-python', default='/work/torchvenv/bin/python',
                      help='python of the venv with torch + diffusers')
  parser.add_argument('--dir', default='', help='folder the torch stage writes (and jax reads)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--write-reference', default='', help='also store the small test reference')
  parser.add_argument('--tol', type=float, default=1e-4)
  args = parser.parse_args(argv)

  if args.stage == 'torch':
    os.makedirs(args.dir, exist_ok=True)
    torch_stage(args.dir, args.seed)
    return
  out_dir = args.dir
  if args.stage == 'both':
    out_dir = out_dir or tempfile.mkdtemp(prefix='check_autoencoder_')
    print(f'seed {args.seed}; torch stage with {args.torch_python} into {out_dir}')
    subprocess.run([args.torch_python, os.path.abspath(__file__), 'torch', '--dir', out_dir,
                    '--seed', str(args.seed)], check=True)
  report = jax_stage(out_dir)
  if args.write_reference:
    write_reference(out_dir, args.write_reference)
  worst = max(report.values())
  print(f'worst {worst:.3e} (tolerance {args.tol:g})')
  if worst > args.tol:
    sys.exit(1)


if __name__ == '__main__':
  main()
