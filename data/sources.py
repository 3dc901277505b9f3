"""Random-access image sources named by config.data.dataset.

A source is a sequence: `len(source)` examples, and `source[i]` returns
`{'image': uint8 [H, W] or [H, W, C], 'label': int}` as stored (no resizing yet),
or None for an unreadable file of a folder source (skipped downstream with a warning).
Sources are cheap to pickle (grain worker processes receive copies).

Accepted config.data.dataset forms:
  'digits'         scikit-learn's load_digits: 1,797 real 8x8 grayscale handwritten digits
                   that ship inside the package (labels 0..9); splits 'train' or 'train[a:b]'.
  'shapes'         the embedded captioned data (data/shapes.py): colored shapes at positions,
                   32x32 RGB, generated from fixed seeds; splits 'train', 'test' and slices.
  'tfds:NAME'      a TensorFlow Datasets dataset prepared in array_record format
                   (`python main.py --config CONFIG --mode prepare`), read with
                   tfds.data_source, without TensorFlow. Any tfds split string works.
  'folder:/path'   PNG and JPEG files under /path, searched recursively in sorted order;
                   images in sub-folders get the sub-folder's index (sorted names) as label.
"""

import dataclasses
import importlib.util
import os

from absl import logging
import numpy as np

from data.splits import split_range

ACCEPTED_FORMS = ("'digits', 'shapes', 'tfds:NAME' (e.g. 'tfds:cifar10', 'tfds:celeb_a'), "
                  "'folder:/path/to/images'")
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
PREPARE_COMMAND = 'python main.py --config CONFIG --mode prepare'


def parse_spec(spec):
  """Splits config.data.dataset into (kind, argument).

  Args:
    spec: 'digits', 'tfds:NAME' or 'folder:PATH'.

  Returns:
    ('digits', ''), ('shapes', ''), ('tfds', NAME) or ('folder', PATH).

  Raises:
    ValueError: any other string, with the accepted forms.
  """
  spec = str(spec)
  if spec in ('digits', 'shapes'):
    return spec, ''
  kind, sep, arg = spec.partition(':')
  if sep and kind in ('tfds', 'folder') and arg:
    return kind, arg
  raise ValueError(f'unknown config.data.dataset={spec!r}; accepted forms: {ACCEPTED_FORMS}')


@dataclasses.dataclass(frozen=True)
class DigitsSource:
  """scikit-learn's 1,797 handwritten digits, 8x8 uint8 (0..16 scaled to 0..255)."""
  images: np.ndarray  # uint8 [N, 8, 8]
  labels: np.ndarray  # int32 [N]

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return {'image': self.images[index], 'label': int(self.labels[index])}


def digits_source(split):
  """The digits of `split` ('train' = all 1,797; 'train[a:b]' a slice of them)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  start, stop = split_range(split, len(digits.target), 'dataset digits')
  # The raw values are counts 0..16 of set pixels in 4x4 blocks of a 32x32 bitmap.
  images = np.rint(digits.images[start:stop] * (255.0 / 16.0)).astype(np.uint8)
  return DigitsSource(images, digits.target[start:stop].astype(np.int32))


@dataclasses.dataclass(frozen=True)
class FolderSource:
  """Image files under a folder. Unreadable files are skipped with a warning.

  Choice: a corrupt file is skipped (logged with its path at WARNING), not fatal,
  because one truncated JPEG among a scraped folder of 200k images should not stop
  a multi-day run, and checking every file up front would take minutes. Consequence:
  an epoch (and the uint8 eval iterator) holds the readable files only. Construction
  fails if no file at all can be read.
  """
  root: str
  paths: tuple  # relative paths, sorted
  labels: tuple  # int per path: index of its top-level sub-folder (0 at the root)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    image = read_image(os.path.join(self.root, self.paths[index]))
    if image is None:
      return None
    return {'image': image, 'label': self.labels[index]}


def read_image(path):
  """Decodes a PNG/JPEG file to uint8 [H, W] or [H, W, C]; None, with a warning, on failure."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode not in ('L', 'LA', 'RGB', 'RGBA'):
        img = img.convert('RGBA' if 'A' in img.getbands() else 'RGB')
      return np.asarray(img)
  except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for corrupt/truncated files
    logging.warning('skipping unreadable image %s: %s', path, e)
    return None


def folder_source(root, split):
  """All PNG/JPEG files under `root` (recursively, sorted), sliced by `split`."""
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'config.data.dataset=folder:{root}: no such directory')
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in filenames:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.relpath(os.path.join(dirpath, name), root))
  paths.sort()
  if not paths:
    raise ValueError(f'config.data.dataset=folder:{root} holds no images: no file ending in '
                     f'{", ".join(IMAGE_EXTENSIONS)} (any case) anywhere under it')
  start, stop = split_range(split, len(paths), f'dataset folder:{root}')
  paths = paths[start:stop]
  classes = sorted({p.split(os.sep)[0] if os.sep in p else '' for p in paths})
  index = {c: i for i, c in enumerate(classes)}
  labels = tuple(index[p.split(os.sep)[0] if os.sep in p else ''] for p in paths)
  source = FolderSource(root, tuple(paths), labels)
  if not any(source[i] is not None for i in range(len(source))):
    raise ValueError(f'config.data.dataset=folder:{root}: none of its {len(paths)} image '
                     'files can be decoded')
  return source


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A tfds array_record data source, reduced to image and label."""
  data_source: object  # tfds ArrayRecordDataSource
  image_key: str
  label_key: str  # '' = no labels (label 0)

  def __len__(self):
    return len(self.data_source)

  def __getitem__(self, index):
    example = self.data_source[index]
    label = int(example[self.label_key]) if self.label_key else 0
    return {'image': np.asarray(example[self.image_key]), 'label': label}


def _tfds_builder(name, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'config.data.dataset=tfds:{name}: tensorflow_datasets has no dataset '
                     f'named {name!r} (see https://www.tensorflow.org/datasets/catalog)') from e


def tfds_source(name, split, *, data_dir, image_key, label_key, num_classes):
  """Opens a prepared tfds dataset for random access, without TensorFlow.

  Args:
    name: tfds name, optionally with config/version ('cifar10', 'celeb_a:2.1.0').
    split: tfds split string ('train', 'test', 'train[:90%]').
    data_dir: tfds data_dir, or None for the tfds default.
    image_key: feature holding the image.
    label_key: feature holding the label; '' for none. A missing label feature is an
      error when num_classes > 0 and means label 0 otherwise (unlabelled data).
    num_classes: config.data.num_classes.

  Returns:
    A TfdsSource.

  Raises:
    FileNotFoundError: the dataset is not prepared (names the prepare command and the
      folder looked in).
    ValueError: unknown dataset, or a wrong image/label key (lists the features).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  builder = _tfds_builder(name, data_dir)
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'config.data.dataset=tfds:{name} is not prepared: nothing in {builder.data_dir}. '
          f'Prepare it once, on a machine with internet access and TensorFlow: '
          f'`{PREPARE_COMMAND}`, or set config.data.data_dir to the tfds data_dir that holds '
          'it.') from e
    if 'TFRECORD' in str(e).upper():
      raise FileNotFoundError(
          f'tfds:{name} in {builder.data_dir} is prepared as tfrecord, which needs TensorFlow '
          f'to read; this pipeline reads array_record. Run `{PREPARE_COMMAND}` with '
          'config.data.data_dir set to an empty folder (it writes array_record).') from e
    raise
  keys = sorted(ds.dataset_info.features.keys())
  if image_key not in keys:
    raise ValueError(f'config.data.image_key={image_key!r} is not a feature of tfds:{name}; '
                     f'its features are {keys}')
  if label_key and label_key not in keys:
    if num_classes > 0:
      raise ValueError(f'config.data.label_key={label_key!r} is not a feature of tfds:{name} '
                       f"(features: {keys}); pick one, or set config.data.label_key='' and "
                       'config.data.num_classes=0 for unlabelled data')
    label_key = ''
  return TfdsSource(ds, image_key, label_key)


def make_source(config, split=None):
  """The source config.data.dataset names, for `split` (default config.data.split)."""
  d = config.data
  split = d.split if split is None else split
  kind, arg = parse_spec(d.dataset)
  if kind == 'digits':
    return digits_source(split)
  if kind == 'shapes':
    from data import shapes  # pylint: disable=g-import-not-at-top
    return shapes.ShapesSource(split)
  if kind == 'folder':
    return folder_source(arg, split)
  return tfds_source(arg, split, data_dir=d.data_dir, image_key=d.image_key,
                     label_key=d.label_key, num_classes=d.num_classes)


def _as_texts(value):
  """A caption feature's value (bytes, str, or an array / list of them) -> tuple of str."""
  if isinstance(value, (bytes, str)):
    value = [value]
  return tuple(v.decode('utf-8') if isinstance(v, bytes) else str(v)
               for v in np.asarray(value, object).reshape(-1))


def caption_path(image_path):
  """The caption file of an image in a folder dataset: the same name with .txt."""
  return os.path.splitext(image_path)[0] + '.txt'


def captions_of(config, split=None, limit=None):
  """Every example's captions, in source order: a list of tuples of str (>= 1 each); with
  `limit`, those of the first `limit` examples only.

  Read without decoding the images. tfds: config.data.caption_key names the text feature, '/'
  for a nested one (coco_captions: 'captions/text', five per image). folder: each image's
  same-named .txt file (`caption_path`), stripped of surrounding whitespace. shapes: its
  generated captions.

  Raises:
    ValueError: digits (no captions), a missing caption feature (lists the features) or, for a
      folder, images without a caption file (names the first and the count).
  """
  d = config.data
  split = d.split if split is None else split
  kind, arg = parse_spec(d.dataset)
  if kind == 'digits':
    raise ValueError("config.data.dataset='digits' has no captions; a text model "
                     "(model.context_dim > 0) needs captioned data: 'shapes', a tfds dataset "
                     'with a text feature (data.caption_key) or a folder with .txt captions')
  if kind == 'shapes':
    source = make_source(config, split)
    return [(source[i]['caption'],) for i in range(min(len(source), limit or len(source)))]
  if kind == 'folder':
    source = make_source(config, split)
    files = [os.path.join(source.root, caption_path(p)) for p in source.paths[:limit]]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise ValueError(f'config.data.dataset=folder:{source.root}: {len(missing)} of '
                       f'{len(files)} images have no caption file, e.g. {missing[0]}; write '
                       'one .txt beside each image (same name) or move the image away')
    out = []
    for f in files:
      with open(f, encoding='utf-8') as fh:
        out.append((fh.read().strip(),))
    return out
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(d.data_dir) if d.data_dir else None
  make_source(config, split)  # the not-prepared / unknown-dataset errors, worded once
  top, _, rest = d.caption_key.partition('/')
  ds = tfds.data_source(arg, split=split, data_dir=data_dir, download=False,
                        decoders={d.image_key: tfds.decode.SkipDecoding()})
  features = ds.dataset_info.features
  if top not in features:
    raise ValueError(f'config.data.caption_key={d.caption_key!r} is not a feature of '
                     f'tfds:{arg}; its features are {sorted(features.keys())}')
  out = []
  for i in range(min(len(ds), limit or len(ds))):
    value = ds[i][top]
    for part in rest.split('/') if rest else ():
      if not isinstance(value, dict) or part not in value:
        raise ValueError(f'config.data.caption_key={d.caption_key!r}: tfds:{arg} has no '
                         f'{part!r} inside {top!r}')
      value = value[part]
    texts = _as_texts(value)
    out.append(texts if texts else ('',))
  return out


def num_examples(config, split=None):
  """Number of examples in the split (all processes together; folder: files found)."""
  return len(make_source(config, split))


def prepare(config):
  """Prepares config.data.dataset for reading; for tfds, downloads and writes array_record.

  Run once on a machine with internet access: `python main.py --config CONFIG --mode prepare`.
  tfds's preparation of real datasets (cifar10, celeb_a) encodes images with TensorFlow,
  so TensorFlow must be installed there (`pip install tensorflow-cpu`); reading the
  prepared array_record files afterwards does not need it. 'digits' ships with
  scikit-learn and folders are read as they are: both only get checked.

  Returns:
    A short description of what is ready and where.

  Raises:
    ImportError: tfds dataset and no TensorFlow installed.
  """
  kind, arg = parse_spec(config.data.dataset)
  if kind != 'tfds':
    n = num_examples(config)
    return f'{config.data.dataset}: nothing to prepare, {n} examples in split {config.data.split!r}'
  if importlib.util.find_spec('tensorflow') is None:
    raise ImportError(
        f'preparing tfds:{arg} needs TensorFlow, which is not installed: run '
        '`pip install tensorflow-cpu` on this machine (it needs internet access too), then '
        f'`{PREPARE_COMMAND}` again. Training reads the prepared array_record files without '
        'TensorFlow.')
  data_dir = os.path.expanduser(config.data.data_dir) if config.data.data_dir else None
  builder = _tfds_builder(arg, data_dir)
  builder.download_and_prepare(file_format='array_record')
  return f'tfds:{arg} prepared in array_record format in {builder.data_dir}'
