"""Writes small image datasets in tfds's array_record format, without TensorFlow.

For tests, benchmarks and offline smoke runs: the result is read by the same
`tfds:NAME` code path as a real prepared dataset (array_record files, PNG-encoded
images, tfds metadata), with config.data.dataset = 'tfds:synthetic_images' and
config.data.data_dir = the folder given here.

tfds encodes numpy images with TensorFlow; handing it PNG bytes (encoded with PIL)
skips that, which is what lets this run where TensorFlow is not installed.
"""

import io
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

NAME = 'synthetic_images'


class SyntheticImages(tfds.core.GeneratorBasedBuilder):
  """Images and integer labels given in memory (registered in tfds as 'synthetic_images')."""

  VERSION = tfds.core.Version('1.0.0')
  # tfds locates a builder's source file (to find its checksums) through
  # importlib_resources, which this venv lacks; this builder downloads nothing.
  code_path = None

  CAPTIONS = False  # tfds builds a registered reader from the class defaults: one class each

  def __init__(self, *, splits=None, num_channels=3, **kwargs):
    self._splits = splits or {}
    self._num_channels = num_channels
    self._captions = self.CAPTIONS
    super().__init__(**kwargs)

  def _info(self):
    features = {
        'image': tfds.features.Image(shape=(None, None, self._num_channels)),
        'label': tfds.features.Scalar(dtype=np.int64),
    }
    if self._captions:  # coco_captions' layout: several captions per image
      features['captions'] = tfds.features.Sequence({'text': tfds.features.Text()})
    return tfds.core.DatasetInfo(
        builder=self,
        description='Synthetic images written by data/synthetic.py.',
        features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(*split) for name, split in self._splits.items()}

  def _generate_examples(self, images, labels, captions=None):
    for i, image in enumerate(images):
      buf = io.BytesIO()
      Image.fromarray(np.asarray(image, np.uint8).squeeze(-1) if self._num_channels == 1
                      else np.asarray(image, np.uint8)).save(buf, format='PNG')
      buf.seek(0)
      example = {'image': buf, 'label': int(labels[i])}
      if self._captions:
        example['captions'] = [{'text': c} for c in captions[i]]
      yield i, example


class SyntheticCaptionedImages(SyntheticImages):
  """The same with captions (registered in tfds as 'synthetic_captioned_images')."""

  CAPTIONS = True


def write_tfds(data_dir, splits):
  """Writes `splits` as the tfds dataset 'synthetic_images' under data_dir.

  Args:
    data_dir: tfds data_dir (created if missing; one dataset per data_dir).
    splits: {split name: (images, labels)} or (images, labels, captions), images uint8
      [N, H, W, C] (C = 1 or 3, or a list of differently sized [H, W, C] arrays), labels ints
      [N], captions a list of N lists of strings (stored as coco_captions stores them: feature
      'captions', a sequence of {'text': Text}, so config.data.caption_key = 'captions/text').

  Returns:
    The config.data.dataset string: 'tfds:synthetic_images', or with captions
    'tfds:synthetic_captioned_images'.
  """
  first = next(iter(splits.values()))[0][0]
  os.makedirs(data_dir, exist_ok=True)
  captions = len(next(iter(splits.values()))) == 3
  cls = SyntheticCaptionedImages if captions else SyntheticImages
  builder = cls(splits=splits, num_channels=np.shape(first)[-1], data_dir=data_dir,
                file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False),
      file_format='array_record')
  return f'tfds:{builder.name}'
