"""Entry point: python main.py --config configs/X.py --workdir DIR [--mode MODE] [--config.a.b=v]

Modes:
  train       train (or resume) the run in --workdir                         (default)
  sample      restore a checkpoint and write a grid + .npz of samples
  eval        restore a checkpoint, generate eval.num_samples, print FID / KID (/ IS)
              (both: with config.model.pretrained, a Stable Diffusion folder, and no checkpoint
              in --workdir yet, its unet/ weights; `train` starts from them)
  fid_stats   compute and cache the Inception statistics of the dataset
  cache_latents  latent diffusion with fixed data: encode the training split once into
              WORKDIR/latent_cache (posterior moments); --config.latent.cache=true trains from it
  prepare     download and prepare a tfds dataset (needs internet and TensorFlow)

Any config field can be overridden: --config.optim.lr=1e-4. A mistyped field, a bad value or a
combination that cannot work stops the launch at once, before jax is imported or anything is
compiled, with a one-line `error: config.FIELD: ...` on stderr and exit status 2.

Preemption and restarts. Rerunning the same command resumes from the newest checkpoint that
restores (a damaged one is skipped with a warning), bit for bit as if never interrupted on the
same device count; another device count also resumes. SIGTERM or SIGINT: the current step
finishes, a checkpoint is written at it, and the program exits with status 0. A workdir that
holds a run with another config is refused (the differing fields are listed) unless
--allow_config_change. To make restarts cheap, keep compiled programs across them:
  export JAX_COMPILATION_CACHE_DIR=$HOME/.cache/jax JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

Multi-host. jax.distributed.initialize() runs when --multihost is given, or when the
environment is a multi-task SLURM job (SLURM_NTASKS > 1) or sets JAX_COORDINATOR_ADDRESS (then
also JAX_NUM_PROCESSES and JAX_PROCESS_ID, unless a cluster jax detects provides them).
Every process runs the same command; each reads its own shard of the data; process 0 alone
writes config.json, metrics.jsonl, TensorBoard files and images; all processes write the
(shared) Orbax checkpoints together, so the workdir must be on a file system every host sees
(NFS, Lustre, or gs://...). Other processes log warnings only.

  SLURM, 2 nodes x 8 GPUs (one process per GPU; jax reads the SLURM variables):
    srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 --kill-on-bad-exit=1 \
      python main.py --config configs/cifar10_ddpm.py --workdir /shared/runs/cifar10
    (or one process per node with --ntasks-per-node=1 --gpus-per-node=8; add
    `#SBATCH --signal=TERM@120` so that SLURM sends SIGTERM two minutes before the end)

  Cloud TPU pod slice (e.g. v4-32), the same command on every worker:
    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
      "cd repo && python main.py --config configs/cifar10_ddpm.py \
       --workdir gs://BUCKET/runs/cifar10 --multihost"

  Any other launcher (here two processes on one machine, 2 CPU devices each, as tested):
    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$I \
    JAX_NUM_CPU_DEVICES=2 JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
      python main.py --config configs/digits.py --workdir runs/mh        # for I in 0 1

The global batch is the concatenation of the processes' batches (process 0's rows first).
Each process shuffles its own shard of the data, so a P-process run sees other batches than
a one-process run; given the same global batches it computes the same steps
(tests/test_multihost.py).
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
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'fid_stats', 'cache_latents',
                                     'prepare'],
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
    line = str(e).splitlines()[0]
    _fail(f'{line} (see configs/default.py for the fields and their types)'
          if '--config.' in line else line)


def _maybe_initialize_distributed():
  """jax.distributed.initialize() when asked for or when the launcher's environment says so."""
  want = FLAGS.multihost
  if want is None:
    want = ('JAX_COORDINATOR_ADDRESS' in os.environ or
            int(os.environ.get('SLURM_NTASKS', '1') or '1') > 1)
  if not want:
    return
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  for key, env in (('num_processes', 'JAX_NUM_PROCESSES'), ('process_id', 'JAX_PROCESS_ID')):
    if os.environ.get(env):
      try:
        kwargs[key] = int(os.environ[env])
      except ValueError:
        _fail(f'{env}={os.environ[env]!r} must be an integer')
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    _fail(f'jax.distributed.initialize() failed: {str(e).splitlines()[0]} (set '
          'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM)')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; flags look like --config.optim.lr=1e-4')
  if FLAGS.workdir is None:
    _fail('--workdir is required (where checkpoints, samples and metrics go)')
  config = _CONFIG.value
  try:  # everything that does not depend on the devices, before jax is even imported
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    _fail(str(e))
  _quiet_library_logs()
  _maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  try:
    config_lib.validate(config, num_devices=jax.device_count(),
                        process_count=jax.process_count())
  except config_lib.ConfigError as e:
    _fail(str(e))
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('JAX %s: %d process(es), %d device(s) (%s)', jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)

  # Imported here so that a bad launch fails before these heavy imports.
  import data as data_lib  # pylint: disable=g-import-not-at-top
  import progress  # pylint: disable=g-import-not-at-top
  # Long modes other than train stop at their next batch on SIGTERM / SIGINT (train installs
  # its own handler, which saves a checkpoint first).
  stop = None
  if (FLAGS.mode in ('sample', 'eval', 'fid_stats', 'cache_latents') and
      jax.process_count() == 1):
    stop = progress.StopRequest()
  try:
    if config.model.name == 'autoencoder' and FLAGS.mode in ('sample', 'eval'):
      import autoencoder_lib  # pylint: disable=g-import-not-at-top
      run = (autoencoder_lib.run_sample_mode if FLAGS.mode == 'sample' else
             autoencoder_lib.run_eval_mode)
      run(config, FLAGS.workdir, stop=stop)
    elif FLAGS.mode == 'train':
      import eval_lib  # pylint: disable=g-import-not-at-top
      import latent_space  # pylint: disable=g-import-not-at-top
      import train_lib  # pylint: disable=g-import-not-at-top
      # Read once, shared by the trainer and its hooks; latent.scale_by_std's scale is the
      # workdir's, or fitted to the first batch now (a fresh run) so that the hooks have it too.
      latent = latent_space.for_run(config, FLAGS.workdir)
      if config.model.name == 'autoencoder':
        import autoencoder_lib  # pylint: disable=g-import-not-at-top
        hooks = autoencoder_lib.training_hooks(config, FLAGS.workdir)
      else:
        hooks = eval_lib.training_hooks(config, FLAGS.workdir, latent)
      train_lib.train(config, FLAGS.workdir, latent=latent, hooks=hooks,
                      allow_config_change=FLAGS.allow_config_change)
    elif FLAGS.mode == 'sample':
      import sample_lib  # pylint: disable=g-import-not-at-top
      sample_lib.run_sample_mode(config, FLAGS.workdir, stop=stop)
    elif FLAGS.mode == 'eval':
      import eval_lib  # pylint: disable=g-import-not-at-top
      eval_lib.run_eval_mode(config, FLAGS.workdir, stop=stop)
    elif FLAGS.mode == 'fid_stats':
      import eval_lib  # pylint: disable=g-import-not-at-top
      eval_lib.reference_stats(config, recompute=True, stop=stop)
    elif FLAGS.mode == 'cache_latents':
      import latent_cache  # pylint: disable=g-import-not-at-top
      print(latent_cache.build(config, FLAGS.workdir, stop=stop))
    elif FLAGS.mode == 'prepare':
      print(data_lib.prepare(config))
  except progress.Interrupted as e:
    print(f'stopped by {stop.signal if stop else "a signal"}: {e}; nothing of this {FLAGS.mode} '
          'was written. Rerun the same command to do it again.', file=sys.stderr)
    sys.exit(1)
  except (config_lib.ConfigError, FileNotFoundError, FloatingPointError) as e:
    _fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
