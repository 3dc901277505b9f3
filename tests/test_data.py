"""Tests of the input pipeline (data/): sources, preprocessing, sharding, resumption, errors."""

import json
import logging
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import default
import data
from data import preprocess
from data import sources
from data import synthetic

N_SYNTH = 30  # examples in the synthetic array_record dataset


def _config(**data_fields):
  config = default.get_config()
  config.training.batch_size = 8
  for key, value in data_fields.items():
    setattr(config.data, key, value)
  return config


def _take(ds, n):
  return [next(ds) for _ in range(n)]


def _keys(images):
  """Byte strings identifying uint8 images (random 32x32x3 images never collide)."""
  return [np.ascontiguousarray(x).tobytes() for x in images]


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
  """A real tfds array_record dataset of N_SYNTH random 32x32x3 images: (dir, images, labels)."""
  data_dir = str(tmp_path_factory.mktemp('synth_tfds'))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N_SYNTH, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(N_SYNTH) % 10
  synthetic.write_tfds(data_dir, {'train': (images, labels)})
  return data_dir, images, labels


def _synth_config(synth, **fields):
  fields = {'dataset': 'tfds:synthetic_images', 'data_dir': synth[0], 'image_size': 32,
            'num_channels': 3, **fields}
  return _config(**fields)


# ------------------------------------------------------------------ digits


def test_digits_batches_are_real_digits():
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  raw = sk_datasets.load_digits()
  config = _config(image_size=16, num_channels=1)
  batch = next(data.get_dataset(config, process_index=0, process_count=1, shuffle=False))
  image = batch['image']
  assert image.shape == (8, 16, 16, 1) and image.dtype == np.float32
  assert image.min() >= -1.0 and image.max() <= 1.0
  assert image.min() == -1.0 and image.max() > 0.9  # black background, near-white strokes
  np.testing.assert_array_equal(batch['label'], raw.target[:8])
  assert batch['label'].dtype == np.int32
  for i in range(8):
    up = np.kron(raw.images[i], np.ones((2, 2)))  # the raw 8x8 digit, upsampled
    corr = np.corrcoef(up.ravel(), image[i, :, :, 0].ravel())[0, 1]
    assert corr > 0.9, (i, corr)
    # and it is not just any digit: a different class correlates less
    other = np.kron(raw.images[(i + 5) % 8 + 8], np.ones((2, 2)))
    assert corr > np.corrcoef(other.ravel(), image[i, :, :, 0].ravel())[0, 1]


def test_digits_rgb_and_split_slices():
  config = _config(image_size=8, num_channels=3)
  image = next(data.get_dataset(config, process_index=0, process_count=1, shuffle=False))['image']
  assert image.shape == (8, 8, 8, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # gray repeated over channels
  assert data.num_examples(config) == 1797
  assert data.num_examples(config, 'train[:100]') == 100
  assert data.num_examples(config, 'train[90%:]') == 1797 - round(1797 * 0.9)
  with pytest.raises(ValueError, match=r"'train' or a slice"):
    data.num_examples(config, 'test')


# ------------------------------------------------------------------ tfds (mock_data)


def test_mock_cifar10_shape_dtype_range_and_flips():
  with tfds.testing.mock_data(num_examples=24):
    config = _config(dataset='tfds:cifar10', image_size=32, num_channels=3, random_flip=True)
    batch = next(data.get_dataset(config, process_index=0, process_count=1))
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
    assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    assert batch['image'].std() > 0.3  # uniform noise in [-1, 1]: std 0.58
    assert batch['label'].dtype == np.int32
    assert ((0 <= batch['label']) & (batch['label'] < 10)).all()

    # Same order without flips (augment=False, uint8): each flipped image is either the
    # original or its mirror, and over 3 epochs both happen.
    flipped = _take(data.get_dataset(config, process_index=0, process_count=1, uint8=True,
                                     augment=True), 9)
    plain = _take(data.get_dataset(config, process_index=0, process_count=1, uint8=True), 9)
    n_flipped = 0
    for f, p in zip(flipped, plain):
      for a, b in zip(f['image'], p['image']):
        same, mirror = np.array_equal(a, b), np.array_equal(a, b[:, ::-1])
        assert same != mirror
        n_flipped += mirror
    assert 10 < n_flipped < 62, n_flipped  # of 72: Binomial(72, 1/2) is inside w.p. 1 - 1e-7


def test_mock_celeb_a_shape_and_ddim_crop():
  with tfds.testing.mock_data(num_examples=6):
    config = _config(dataset='tfds:celeb_a', image_size=16, num_channels=3, crop='celeba_ddim',
                     label_key='', num_classes=0)
    config.training.batch_size = 6
    batch = next(data.get_dataset(config, process_index=0, process_count=1, shuffle=False,
                                  uint8=True))
    assert batch['image'].shape == (6, 16, 16, 3) and batch['image'].dtype == np.uint8
    np.testing.assert_array_equal(batch['label'], np.zeros(6, np.int32))
    raw = tfds.data_source('celeb_a', split='train', download=False)[0]['image']
    assert raw.shape == (218, 178, 3)
    expected = np.asarray(Image.fromarray(raw[57:185, 25:153]).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(batch['image'][0], expected)

    # celeb_a has no 'label' feature: with classes asked for, that is an error naming the keys.
    config.data.label_key, config.data.num_classes = 'label', 10
    with pytest.raises(ValueError, match=r"'label'.*features: \['attributes', 'identity', "
                       r"'image', 'landmarks'\]"):
      data.get_dataset(config, process_index=0, process_count=1)


# ------------------------------------------------------------------ crops


def test_crop_boxes_on_a_coordinate_image():
  rows, cols = np.meshgrid(np.arange(218), np.arange(178), indexing='ij')
  image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)  # pixel = (row, col)
  ddim = preprocess.crop_image(image, 'celeba_ddim')
  assert ddim.shape == (128, 128, 3)
  assert tuple(ddim[0, 0, :2]) == (57, 25) and tuple(ddim[-1, -1, :2]) == (184, 152)
  # centred on row 121, column 89 (the DDIM code's cy, cx)
  assert ddim[:, :, 0].mean() == 120.5 and ddim[:, :, 1].mean() == 88.5
  c140 = preprocess.crop_image(image, 'celeba_140')
  assert tuple(c140[0, 0, :2]) == (39, 19) and tuple(c140[-1, -1, :2]) == (178, 158)
  center = preprocess.crop_image(image, 'center')
  assert center.shape == (178, 178, 3) and tuple(center[0, 0, :2]) == (20, 0)
  with pytest.raises(ValueError, match='218x178'):
    preprocess.crop_image(image[:100], 'celeba_ddim')
  with pytest.raises(ValueError, match="accepted: none, center, celeba_ddim, celeba_140"):
    preprocess.crop_image(image, 'middle')


def test_ddim_crop_through_the_pipeline(tmp_path):
  """A white square exactly on the DDIM box gives an all-white 64x64 image; shifted, it does not."""
  exact = np.zeros((218, 178, 3), np.uint8)
  exact[57:185, 25:153] = 255
  shifted = np.zeros_like(exact)
  shifted[59:187, 25:153] = 255  # two rows lower
  synthetic.write_tfds(str(tmp_path), {'train': ([exact, shifted], [0, 1])})
  config = _config(dataset='tfds:synthetic_images', data_dir=str(tmp_path), image_size=64,
                   num_channels=3, crop='celeba_ddim')
  batch = next(data.get_dataset(config, batch_size=2, process_index=0, process_count=1,
                                shuffle=False))
  assert batch['image'].shape == (2, 64, 64, 3)
  np.testing.assert_array_equal(batch['image'][0], np.ones((64, 64, 3), np.float32))
  # The top output rows see the black rows 57-58 (PIL's antialiased bilinear kernel spans
  # two output pixels when shrinking 2x); from the third row down all is white.
  assert batch['image'][1, 0].max() < 0.0 and batch['image'][1, 1].max() < 1.0
  assert (batch['image'][1, 2:] == 1.0).all()


# ------------------------------------------------------------------ flips, shards, state


def test_flips_are_deterministic_given_the_seed():
  config = _config(image_size=8, num_channels=1, random_flip=True)
  a = _take(data.get_dataset(config, process_index=0, process_count=1, seed=3), 4)
  b = _take(data.get_dataset(config, process_index=0, process_count=1, seed=3), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  # Another seed gives another order and other flips.
  c = _take(data.get_dataset(config, process_index=0, process_count=1, seed=4), 4)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_process_shards_are_disjoint_and_cover_the_split(synth):
  _, images, _ = synth
  config = _synth_config(synth, random_flip=True)
  seen = []
  for index in range(2):
    ds = data.get_dataset(config, batch_size=4, process_index=index, process_count=2,
                          repeat=False, drop_remainder=False, uint8=True)
    seen.append(_keys(np.concatenate([b['image'] for b in ds])))
  assert len(seen[0]) == len(set(seen[0])) == N_SYNTH // 2
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(_keys(images))

  # Repeated: each epoch of a process is a new permutation of the same shard.
  ds = data.get_dataset(config, batch_size=5, process_index=1, process_count=2, uint8=True)
  stream = _keys(np.concatenate([b['image'] for b in _take(ds, 6)]))
  assert set(stream[:15]) == set(stream[15:]) == set(seen[1])
  assert stream[:15] != stream[15:]


def test_global_batch_splits_over_processes(synth):
  config = _synth_config(synth)
  config.training.batch_size = 8
  assert next(data.get_dataset(config, process_index=1, process_count=2))['image'].shape[0] == 4
  # Defaults from jax: one process here, so the whole global batch.
  assert next(data.get_dataset(config))['image'].shape == (8, 32, 32, 3)
  config.training.batch_size = 10
  with pytest.raises(ValueError, match=r'config.training.batch_size=10 does not divide evenly '
                     r'over 4 processes'):
    data.get_dataset(config, process_index=0, process_count=4)


def test_state_resumes_the_exact_batches(synth):
  config = _synth_config(synth, random_flip=True, low_res_size=8)
  ds = data.get_dataset(config, process_index=0, process_count=1)
  _take(ds, 3)
  state = json.loads(json.dumps(ds.get_state()))  # as stored in a checkpoint
  expected = _take(ds, 5)  # 8 batches of 8 > 30 examples: crosses two epoch boundaries
  resumed = data.get_dataset(config, process_index=0, process_count=1)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 5)):
    assert x.keys() == y.keys() == {'image', 'label', 'low_res'}
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  # A state from another batch size cannot give the same batches: refused.
  other = data.get_dataset(config, batch_size=4, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r'batch_size=8, this pipeline has batch_size=4'):
    other.set_state(state)


def test_state_resumes_with_worker_processes(synth):
  config = _synth_config(synth, random_flip=True, num_workers=1)
  ds = data.get_dataset(config, process_index=0, process_count=1)
  _take(ds, 2)
  state = json.loads(json.dumps(ds.get_state()))
  expected = _take(ds, 3)
  ds.close()
  resumed = data.get_dataset(config, process_index=0, process_count=1)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 3)):
    np.testing.assert_array_equal(x['image'], y['image'])
  resumed.close()


def test_uint8_eval_iterator_sees_every_example_once(synth):
  _, images, labels = synth
  config = _synth_config(synth, random_flip=True)
  ds = data.get_dataset(config, batch_size=8, process_index=0, process_count=1, shuffle=False,
                        repeat=False, drop_remainder=False, uint8=True)
  batches = list(ds)
  assert [len(b['label']) for b in batches] == [8, 8, 8, 6]
  assert all(b['image'].dtype == np.uint8 for b in batches)
  # tfds stores a split in its own (hashed) order: compare as multisets, with labels.
  seen = _keys(np.concatenate([b['image'] for b in batches]))
  assert sorted(seen) == sorted(_keys(images))
  label_of = dict(zip(_keys(images), labels))
  assert [label_of[k] for k in seen] == np.concatenate([b['label'] for b in batches]).tolist()


def test_low_res_is_an_antialiased_downsample():
  config = _config(image_size=16, num_channels=1, low_res_size=8)
  batch = next(data.get_dataset(config, process_index=0, process_count=1, shuffle=False))
  low = batch['low_res']
  assert low.shape == (8, 8, 8, 1) and low.dtype == np.float32
  assert -1.0 <= low.min() and low.max() <= 1.0
  pooled = batch['image'].reshape(8, 8, 2, 8, 2, 1).mean(axis=(2, 4))  # 2x2 box average
  for i in range(8):
    assert np.corrcoef(pooled[i].ravel(), low[i].ravel())[0, 1] > 0.95
  # Subsampling without a filter (every other pixel) is further from the box average.
  assert np.abs(low - pooled).mean() < np.abs(batch['image'][:, ::2, ::2] - pooled).mean()


def test_rgb_to_gray_uses_luma():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
  gray = preprocess.to_channels(rgb, 1)
  np.testing.assert_array_equal(
      gray[0, :, 0], np.asarray(Image.fromarray(rgb).convert('L'))[0])


# ------------------------------------------------------------------ folders


def _write_folder(root):
  """2 classes (a/, b/) of PNG, JPEG and gray images; returns {relative path: array}."""
  rng = np.random.default_rng(1)
  written = {}
  for sub, names in (('a', ('0.png', '1.JPG', '2.png')), ('b', ('0.jpeg', '1.png'))):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name in names:
      path = os.path.join(root, sub, name)
      if name == '2.png':
        array = rng.integers(0, 256, (20, 24), dtype=np.uint8)  # grayscale
      else:
        array = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
      Image.fromarray(array).save(path, quality=95)
      written[os.path.join(sub, name)] = array
  return written


def test_folder_source_reads_pngs_and_jpegs(tmp_path):
  written = _write_folder(str(tmp_path))
  (tmp_path / 'notes.txt').write_text('not an image, and not listed')
  config = _config(dataset=f'folder:{tmp_path}', image_size=16, num_channels=3, crop='center')
  assert data.num_examples(config) == 5
  batch = next(data.get_dataset(config, batch_size=5, process_index=0, process_count=1,
                                shuffle=False, uint8=True))
  assert batch['image'].shape == (5, 16, 16, 3)
  # sorted: a/0.png a/1.JPG a/2.png b/0.jpeg b/1.png; label = sub-folder index
  np.testing.assert_array_equal(batch['label'], [0, 0, 0, 1, 1])
  png = written[os.path.join('a', '0.png')]
  np.testing.assert_array_equal(
      batch['image'][0], np.asarray(Image.fromarray(png[:, 2:22]).resize((16, 16), Image.BILINEAR)))
  gray = batch['image'][2]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])


def test_folder_skips_a_corrupt_file_with_a_warning(tmp_path, caplog):
  _write_folder(str(tmp_path))
  (tmp_path / 'a' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  config = _config(dataset=f'folder:{tmp_path}', image_size=8, num_channels=3, crop='center')
  assert data.num_examples(config) == 6  # listed...
  with caplog.at_level(logging.WARNING):
    ds = data.get_dataset(config, batch_size=4, process_index=0, process_count=1, shuffle=False,
                          repeat=False, drop_remainder=False, uint8=True)
    sizes = [len(b['label']) for b in ds]
  assert sizes == [4, 1]  # ...but only the 5 readable images come out
  assert any('broken.png' in r.getMessage() and 'skipping' in r.getMessage()
             for r in caplog.records)


def test_folder_errors(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match=r'holds no images: no file ending in \.png, \.jpg, \.jpeg'):
    data.get_dataset(_config(dataset=f'folder:{empty}'), process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='no such directory'):
    data.get_dataset(_config(dataset=f'folder:{tmp_path}/missing'), process_index=0,
                     process_count=1)
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'x.jpg').write_bytes(b'garbage')
  with pytest.raises(ValueError, match='none of its 1 image files can be decoded'):
    data.get_dataset(_config(dataset=f'folder:{bad}'), process_index=0, process_count=1)


# ------------------------------------------------------------------ other errors


@pytest.mark.parametrize('spec', ['cifar10', 'tfds:', 'hf:cifar10', 'folder:'])
def test_unknown_dataset_spec(spec):
  with pytest.raises(ValueError, match=r"accepted forms: 'digits', 'shapes', 'tfds:NAME'.*'folder:"):
    data.get_dataset(_config(dataset=spec), process_index=0, process_count=1)


def test_unprepared_tfds_dataset_names_the_prepare_command(tmp_path):
  config = _config(dataset='tfds:cifar10', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    data.get_dataset(config, process_index=0, process_count=1)
  message = str(e.value)
  assert 'python main.py --config CONFIG --mode prepare' in message
  assert str(tmp_path) in message and 'not prepared' in message


def test_unknown_tfds_name():
  with pytest.raises(ValueError, match="no dataset named 'no_such_dataset_xyz'"):
    data.num_examples(_config(dataset='tfds:no_such_dataset_xyz'))


def test_wrong_image_key_lists_the_features(synth):
  config = _synth_config(synth, image_key='img')
  with pytest.raises(ValueError, match=r"image_key='img'.*features are \['image', 'label'\]"):
    data.get_dataset(config, process_index=0, process_count=1)


def test_bad_channels_and_crop(synth):
  with pytest.raises(ValueError, match='num_channels must be 1 or 3'):
    data.get_dataset(_synth_config(synth, num_channels=2), process_index=0, process_count=1)
  config = _synth_config(synth)
  config.data.crop = 'middle'
  with pytest.raises(ValueError, match='unknown config.data.crop'):
    data.get_dataset(config, process_index=0, process_count=1)


def test_prepare(monkeypatch):
  assert '1797 examples' in data.prepare(_config())
  monkeypatch.setattr(sources.importlib.util, 'find_spec',
                      lambda name: None if name == 'tensorflow' else object())
  with pytest.raises(ImportError, match='needs TensorFlow.*pip install tensorflow-cpu'):
    data.prepare(_config(dataset='tfds:cifar10'))
