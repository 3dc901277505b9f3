"""Entry point: python main.py --config configs/X.py --workdir DIR [--mode MODE] [--config.a.b=v]

Modes:
  train       train (or resume) the run in --workdir                         (default)
  sample      restore a checkpoint and write a grid + .npz of samples
  eval        restore a checkpoint, generate eval.num_samples, print FID / KID (/ IS)
  fid_stats   compute and cache the Inception statistics of the dataset
  prepare     download and prepare a tfds dataset (needs internet and TensorFlow)

Any config field can be overridden: --config.optim.lr=1e-4. A mistyped field, a bad value or a
combination that cannot work stops the launch at once with a one-line reason.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import config_lib

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file',
                                          lock_config=True)
flags.DEFINE_string('workdir', None, 'run directory: checkpoints/, samples/, metrics.jsonl')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'fid_stats', 'prepare'],
                  'what to do')
flags.DEFINE_bool('allow_config_change', False,
                  'resume a workdir whose saved config differs from this one')
flags.DEFINE_bool('multihost', None, 'call jax.distributed.initialize() (default: when the '
                  'environment is a multi-process SLURM job or sets JAX_COORDINATOR_ADDRESS)')


def _quiet_library_logs():
  """Keeps Orbax's per-save INFO lines off the console (warnings still show)."""
  import logging as pylogging  # pylint: disable=g-import-not-at-top

  class _Filter(pylogging.Filter):

    def filter(self, record):
      return record.levelno >= pylogging.WARNING or 'orbax' not in record.pathname

  logging.get_absl_handler().addFilter(_Filter())


def _fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_path(argv):
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv):
  """absl flag parsing, with one-line errors for a missing config or an unknown field."""
  path = _config_path(argv)
  if path is None:
    _fail('--config is required, e.g. --config configs/digits.py')
  try:
    config_lib.check_overrides(config_lib.load_config_file(path), argv)
    return FLAGS(argv)
  except config_lib.ConfigError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(f'{str(e).splitlines()[0]} (see configs/default.py for the fields and their types)')


def _maybe_initialize_distributed():
  want = FLAGS.multihost
  if want is None:
    want = ('JAX_COORDINATOR_ADDRESS' in os.environ or
            int(os.environ.get('SLURM_NTASKS', '1')) > 1)
  if want:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; flags look like --config.optim.lr=1e-4')
  if FLAGS.workdir is None:
    _fail('--workdir is required (where checkpoints, samples and metrics go)')
  config = _CONFIG.value
  _quiet_library_logs()
  _maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  try:
    config_lib.validate(config, num_devices=jax.device_count(),
                        process_count=jax.process_count())
  except config_lib.ConfigError as e:
    _fail(str(e))
  logging.info('JAX %s: %d process(es), %d device(s) (%s)', jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)

  # Imported here so that a bad launch fails before these heavy imports.
  import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.mode == 'train':
      import train_lib  # pylint: disable=g-import-not-at-top
      train_lib.train(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
    elif FLAGS.mode == 'sample':
      import sample_lib  # pylint: disable=g-import-not-at-top
      sample_lib.run_sample_mode(config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      import eval_lib  # pylint: disable=g-import-not-at-top
      eval_lib.run_eval_mode(config, FLAGS.workdir)
    elif FLAGS.mode == 'fid_stats':
      import eval_lib  # pylint: disable=g-import-not-at-top
      eval_lib.reference_stats(config, recompute=True)
    elif FLAGS.mode == 'prepare':
      data_lib.prepare(config)
  except (config_lib.ConfigError, FileNotFoundError, FloatingPointError) as e:
    _fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
