"""Input-pipeline throughput on CIFAR-10-shaped data: examples per second.

Writes a synthetic CIFAR-10-shaped tfds dataset (32x32x3 PNG-encoded uint8 noise,
10 labels, array_record; no TensorFlow needed) to a temporary folder, then times the
training iterator exactly as train_lib builds it (data.get_dataset with random flips,
float32 output in [-1, 1]): after warm-up batches, `--passes` timed passes of
`--batches` batches each; prints the median (and min/max) examples/s.

  python -m bench.data_throughput                     # defaults: batch 128, 5 passes x 20
  python -m bench.data_throughput --num_workers=2     # with grain worker processes

Noise images are the worst case for PNG decoding (incompressible), so real CIFAR-10
decodes at least as fast.
"""

import os
import statistics
import tempfile
import time

from absl import app
from absl import flags


flags.DEFINE_integer('num_examples', 4096, 'examples in the synthetic dataset')
flags.DEFINE_integer('batch_size', 128, 'batch size (one process)')
flags.DEFINE_integer('batches', 20, 'batches per timed pass')
flags.DEFINE_integer('passes', 5, 'timed passes (the median is reported)')
flags.DEFINE_integer('warmup', 3, 'untimed batches first')
flags.DEFINE_integer('num_workers', 0, 'grain worker processes (config.data.num_workers)')
flags.DEFINE_integer('num_threads', None, 'grain reader threads (default: 2 per core)')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  import data  # pylint: disable=g-import-not-at-top
  from data import synthetic  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (FLAGS.num_examples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, FLAGS.num_examples)
    config = default.get_config()
    config.data.dataset = synthetic.write_tfds(tmp, {'train': (images, labels)})
    config.data.data_dir = tmp
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.random_flip = True
    config.data.num_workers = FLAGS.num_workers
    config.training.batch_size = FLAGS.batch_size

    ds = data.get_dataset(config, process_index=0, process_count=1,
                          num_threads=FLAGS.num_threads)
    for _ in range(FLAGS.warmup):
      batch = next(ds)
    rates = []
    for _ in range(FLAGS.passes):
      start = time.perf_counter()
      for _ in range(FLAGS.batches):
        batch = next(ds)
      rates.append(FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start))
    ds.close()
  assert batch['image'].shape == (FLAGS.batch_size, 32, 32, 3), batch['image'].shape
  print(f'data throughput, CIFAR-10-shaped (32x32x3 PNG, array_record), random flips, '
        f'batch {FLAGS.batch_size}, {os.cpu_count()} cores, num_workers={FLAGS.num_workers}, '
        f'num_threads={FLAGS.num_threads or min(16, 2 * os.cpu_count())}: '
        f'median {statistics.median(rates):.0f} examples/s '
        f'(min {min(rates):.0f}, max {max(rates):.0f}; {FLAGS.passes} passes of '
        f'{FLAGS.batches} batches)')


if __name__ == '__main__':
  app.run(main)
