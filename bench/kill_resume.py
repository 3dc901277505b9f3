"""SIGKILL training at random moments, restart it with the same command, compare with a clean run.

  python -m bench.kill_resume [--trials 10] [--seed 0] [--size tiny|micro]

One uninterrupted `python main.py` run gives the reference parameters and its wall time T.
Then each trial starts a fresh workdir and runs the same command until it completes, killing
it with SIGKILL 1 to 3 times, each time at one of these moments (chosen at random):
  random     a delay drawn uniformly from [0, T] after launch (start-up, compilation,
             restore, training or a save: whatever is running then),
  mid_write  as soon as Orbax's temporary checkpoint folder appears, plus 0-50 ms (the
             save is being written),
  after_save right after a new checkpoint is committed (Orbax is finalizing it and
             deleting the older one).
The config checkpoints every step and keeps one checkpoint (the harshest setting for "the last
good checkpoint is never deleted before a newer one is complete"). After every kill the bench
checks that the newest committed checkpoint did not go backwards; at the end of each trial,
that the final parameters, EMA parameters, optimizer state, rng and step equal the
reference's bit for bit. Exit status 1 if any trial differs.

The model is tests/tiny.py's (2-level, 16-channel U-Net, 8x8 digits, 8 emulated CPU
devices); --size micro uses the tests' one-level U-Net. Compiled programs are cached in a
temporary directory, so each restart costs start-up and tracing, not compilation.
"""

import argparse
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from tests import test_reliability as rel  # noqa: E402  (the helpers the pytest version uses)
from tests.tiny import tiny_config  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--trials', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--size', choices=['tiny', 'micro'], default='tiny')
  parser.add_argument('--num_steps', type=int, default=8)
  args = parser.parse_args()

  overrides = {'training.num_steps': args.num_steps, 'training.checkpoint_every': 1,
               'training.keep_checkpoints': 1, 'training.log_every': 1}
  if args.size == 'micro':
    overrides = {**rel.MICRO, **overrides}
  config = tiny_config(**overrides)
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix='kill_resume_')
  cache = os.path.join(root, 'jax_cache')
  env = rel.main_env(cache)
  config_file = rel.write_config_file(os.path.join(root, 'cfg.py'), overrides)
  print(f'workdirs under {root}; {args.size} config, {args.num_steps} steps, checkpoint every '
        'step, keep 1, 8 CPU devices', flush=True)

  # A first run fills the compilation cache; the second, timed, is the reference.
  for name in ('warmup', 'reference'):
    t0 = time.time()
    proc = rel.spawn_main(config_file, os.path.join(root, name), env)
    out, err = proc.communicate()
    if proc.returncode != 0:
      sys.exit(f'{name} run failed:\n{out}{err}')
    duration = time.time() - t0
    print(f'{name} run: {duration:.1f}s', flush=True)
  ref_step, ref_state = rel.restore(os.path.join(root, 'reference'), config)
  assert ref_step == args.num_steps

  failures, modes, t_start = 0, {}, time.time()
  for trial in range(args.trials):
    workdir = os.path.join(root, f'trial{trial}')
    kills = rng.randint(1, 3)
    log = []
    t0 = time.time()
    try:
      rel.kill_resume_trial(config_file, workdir, env, rng, kills, log, max_delay=duration)
      step, state = rel.restore(workdir, config)
      assert step == args.num_steps, f'final checkpoint at step {step}'
      rel.assert_bitwise_equal(state, ref_state)
      verdict = 'equal bit for bit'
    except AssertionError as e:
      failures += 1
      verdict = f'FAILED: {str(e).splitlines()[0][:300]}'
    for line in log:
      if line.startswith('kill'):
        modes[line.split()[2]] = modes.get(line.split()[2], 0) + 1
    print(f'trial {trial}: {kills} kill(s) in {time.time() - t0:.0f}s -> {verdict}')
    for line in log:
      print(f'    {line}')
    sys.stdout.flush()
  total_kills = sum(modes.values())
  print(f'summary: {args.trials - failures}/{args.trials} trials equal the uninterrupted run '
        f'bit for bit; {total_kills} SIGKILLs ({", ".join(f"{k} {v}" for k, v in modes.items())}); '
        f'{time.time() - t_start:.0f}s')
  sys.exit(1 if failures else 0)


if __name__ == '__main__':
  main()
