"""Preemption, kills, damaged checkpoints, non-finite updates and workdir checks of train_lib.

Runs through the real entry point (`python main.py` in a subprocess) where signals are the
point; in-process otherwise. A micro config (one U-Net level, 8 channels, 8x8 digits) keeps
compilation short, and one persistent compilation cache is shared by this process and its
subprocesses, so that each restart after a kill does not compile again.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoints
import config_lib
import data as data_lib
import models
import sharding
import train_lib
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One U-Net level without attention: the same code paths, a fraction of the compile time.
MICRO = {'model.ch': 8, 'model.ch_mult': (1,), 'model.attn_resolutions': (),
         'training.num_steps': 6, 'training.checkpoint_every': 2, 'training.log_every': 2}


def micro_config(**overrides):
  return tiny_config(**{**MICRO, **overrides})


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope='session')
def jax_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module', autouse=True)
def _persistent_cache(jax_cache):
  """Compiled programs go to (and come from) `jax_cache` in this process, for this module."""
  old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  compilation_cache.set_cache_dir(jax_cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  compilation_cache.reset_cache()
  yield
  compilation_cache.set_cache_dir(old[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])
  compilation_cache.reset_cache()


def write_config_file(path, overrides):
  """A config file for main.py: tests/tiny.py's tiny_config with `overrides`."""
  with open(path, 'w') as f:
    f.write('from tests.tiny import tiny_config\n\n\n'
            f'def get_config():\n  return tiny_config(**{overrides!r})\n')
  return str(path)


def main_env(jax_cache, num_devices=8):
  env = dict(os.environ)
  env.update({'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': jax_cache,
              'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
              'XLA_FLAGS': f'--xla_force_host_platform_device_count={num_devices}'})
  return env


def spawn_main(config_file, workdir, env, *extra):
  return subprocess.Popen([sys.executable, 'main.py', '--config', config_file, '--workdir',
                           str(workdir), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def committed_steps(workdir):
  """Step folders Orbax has committed (digits only; temporaries carry a suffix)."""
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def restore(workdir, config):
  """(step, TrainState) of the newest checkpoint in `workdir` that restores, on all devices."""
  mngr = checkpoints.manager(workdir, keep=config.training.keep_checkpoints)
  try:
    tx = train_lib.make_optimizer(config)
    target = train_lib.abstract_state(config, models.create_model(config), tx,
                                      sharding.make_mesh())
    step, state, _, _ = checkpoints.restore_train_state(mngr, target)
    return step, jax.device_get(state)
  finally:
    mngr.close()


def restore_step(workdir, config, step):
  """The TrainState of checkpoint `step` (no fallback), on all devices."""
  mngr = checkpoints.manager(workdir, keep=config.training.keep_checkpoints)
  try:
    target = train_lib.abstract_state(config, models.create_model(config),
                                      train_lib.make_optimizer(config), sharding.make_mesh())
    return jax.device_get(mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state'])
  finally:
    mngr.close()


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.ema_params,
                                                  state.opt_state, state.rng, state.step))]


def assert_bitwise_equal(a, b):
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted micro run of 6 steps with checkpoints at 2, 4 and 6: (workdir, state)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  state = jax.device_get(train_lib.train(micro_config(), workdir))
  assert int(state.step) == 6 and committed_steps(workdir) == [2, 4, 6]
  return workdir, state


def copy_run(src, dst, keep_steps):
  shutil.copytree(src, dst)
  for s in committed_steps(dst):
    if s not in keep_steps:
      shutil.rmtree(os.path.join(dst, 'checkpoints', str(s)))
  return str(dst)


class NanBatches:
  """Wraps a data iterator; batch number i (0-based, = step i + 1) gets a NaN pixel if bad(i)."""

  def __init__(self, inner, bad):
    self._inner, self._bad, self._count = inner, bad, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._inner)
    if self._bad(self._count):
      batch = dict(batch, image=batch['image'].copy())
      batch['image'][0, 0, 0, 0] = np.nan
    self._count += 1
    return batch

  def get_state(self):
    return {**self._inner.get_state(), 'test_batches_read': self._count}

  def set_state(self, state):
    state = dict(state)
    self._count = state.pop('test_batches_read')
    self._inner.set_state(state)


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_counted_and_a_streak_stops_the_run(tmp_path, monkeypatch):
  real = data_lib.get_dataset
  workdir = str(tmp_path)
  # Steps 3 and 4 see a NaN: two skipped updates, fewer than the limit of 3.
  monkeypatch.setattr(data_lib, 'get_dataset',
                      lambda config, **kw: NanBatches(real(config, **kw), lambda i: i in (2, 3)))
  config = micro_config(**{'training.max_nonfinite_steps': 3})
  state = train_lib.train(config, workdir)
  assert int(state.step) == 6 and int(state.nonfinite_total) == 2
  records = {r['step']: r for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))}
  assert records[2]['nonfinite_total'] == 0 and records[2]['nonfinite'] == 0
  assert records[4]['nonfinite_total'] == 2 and records[4]['nonfinite'] == 1.0  # both steps
  assert records[6]['nonfinite_total'] == 2 and np.isfinite(records[6]['loss'])
  # The skipped steps changed nothing but the counters: checkpoint 4 holds step 2's params.
  ckpt = {s: restore_step(workdir, config, s) for s in (2, 4)}
  for a, b in zip(jax.tree.leaves((ckpt[2].params, ckpt[2].ema_params, ckpt[2].opt_state)),
                  jax.tree.leaves((ckpt[4].params, ckpt[4].ema_params, ckpt[4].opt_state))):
    np.testing.assert_array_equal(a, b)
  assert int(ckpt[4].nonfinite_total) == 2 and int(ckpt[4].nonfinite_streak) == 2

  # Extending the run: every batch from step 9 on is bad; the 3rd in a row stops it.
  monkeypatch.setattr(data_lib, 'get_dataset',
                      lambda config, **kw: NanBatches(real(config, **kw),
                                                      lambda i: i in (2, 3) or i >= 8))
  with pytest.raises(FloatingPointError, match=r'3 consecutive.*max_nonfinite_steps = 3'):
    train_lib.train(micro_config(**{'training.max_nonfinite_steps': 3,
                                    'training.num_steps': 20}), workdir)
  steps = committed_steps(workdir)
  assert max(steps) <= 12, steps  # stopped within one dispatch of the limit
  step, last = restore(workdir, config)
  assert step == max(steps) and all(np.isfinite(x).all() for x in leaves(last))
  # Whatever was saved during the streak still holds step 8's (good) parameters.
  good = restore_step(workdir, config, 8)
  for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(last.params)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_truncated_checkpoint_is_skipped_and_the_resumed_run_is_exact(reference, tmp_path,
                                                                      caplog):
  ref_dir, ref_state = reference
  workdir = copy_run(ref_dir, tmp_path / 'run', keep_steps=(4, 6))
  # Truncate every file of step 6's state to half its size: a damaged, committed checkpoint.
  truncated = 0
  for dirpath, _, files in os.walk(os.path.join(workdir, 'checkpoints', '6', 'state')):
    for name in files:
      path = os.path.join(dirpath, name)
      size = os.path.getsize(path)
      if size > 1:
        with open(path, 'r+b') as f:
          f.truncate(size // 2)
        truncated += 1
  assert truncated > 0
  config = micro_config()
  step, _ = restore(workdir, config)
  assert step == 4
  assert any('step 6 cannot be restored' in r.getMessage() for r in caplog.records)
  # Training from the previous good checkpoint redoes steps 5 and 6, exactly.
  state = train_lib.train(config, workdir)
  assert_bitwise_equal(jax.device_get(state), ref_state)
  assert committed_steps(workdir) == [4, 6]
  aside = os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))
  assert len(aside) == 1 and aside[0].startswith('6.')
  step, restored = restore(workdir, config)
  assert step == 6
  assert_bitwise_equal(restored, ref_state)


def test_half_written_checkpoint_is_never_listed(reference, tmp_path):
  ref_dir, ref_state = reference
  workdir = copy_run(ref_dir, tmp_path / 'run', keep_steps=(2, 4, 6))
  # What a save killed mid-write leaves: Orbax's temporary folder, never renamed to '8'.
  ckpts = os.path.join(workdir, 'checkpoints')
  shutil.copytree(os.path.join(ckpts, '6'), os.path.join(ckpts, '8.orbax-checkpoint-tmp-123'))
  config = micro_config()
  mngr = checkpoints.manager(workdir, keep=config.training.keep_checkpoints)
  assert list(mngr.all_steps()) == [2, 4, 6]
  mngr.close()
  step, state = restore(workdir, config)
  assert step == 6
  assert_bitwise_equal(state, ref_state)


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(reference, tmp_path):
  ref_dir, _ = reference
  workdir = copy_run(ref_dir, tmp_path / 'run', keep_steps=(6,))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6', 'state'))
  with pytest.raises(config_lib.ConfigError, match=r'none of the checkpoints \[6\]'):
    train_lib.train(micro_config(), workdir)
  assert committed_steps(workdir) == [6]  # nothing was overwritten


# ----------------------------------------------------------------------------- workdir


def test_workdir_with_other_config_is_refused_through_the_cli(reference, tmp_path, jax_cache):
  ref_dir, _ = reference
  workdir = copy_run(ref_dir, tmp_path / 'run', keep_steps=(6,))
  config_file = write_config_file(tmp_path / 'cfg.py', {**MICRO, 'optim.lr': 0.5,
                                                        'model.dropout': 0.0})
  proc = spawn_main(config_file, workdir, main_env(jax_cache))
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, out + err
  lines = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'Traceback' not in out + err, err
  assert 'optim.lr: 0.001 -> 0.5' in lines[0] and 'model.dropout: 0.1 -> 0.0' in lines[0]
  assert '--allow_config_change' in lines[0]
  # Resumable fields (here the step count) are not another run, and the flag lets it through.
  train_lib._check_workdir_config(workdir, micro_config(**{'training.num_steps': 9}), False)
  train_lib._check_workdir_config(workdir, micro_config(**{'optim.lr': 0.5}), True)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optim']['lr'] == 0.5


# ----------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path, jax_cache):
  config_file = write_config_file(tmp_path / 'cfg.py', {
      **MICRO, 'training.num_steps': 100_000, 'training.checkpoint_every': 100_000,
      'training.log_every': 1})
  workdir = tmp_path / 'run'
  proc = spawn_main(config_file, workdir, main_env(jax_cache))
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 400
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, out + err
  assert 'Traceback' not in err
  seen = len(metrics.read_text().splitlines())
  steps = committed_steps(str(workdir))
  assert len(steps) == 1 and 3 <= steps[0] < 100_000, steps
  assert f'received SIGTERM: saved a checkpoint at step {steps[0]}' in err
  assert seen == steps[0]  # log_every=1: the checkpoint is at the last finished step
  step, state = restore(str(workdir), micro_config())
  assert step == steps[0] == int(state.step)


def kill_resume_trial(config_file, workdir, env, rng, kills, log, max_delay=12.0):
  """Runs main.py to completion, SIGKILLing it `kills` times; appends one line per run to `log`.

  Each kill picks one of three moments at random: a delay uniform in [0, max_delay] seconds
  after launch ('random'), 0-50 ms after an Orbax temporary checkpoint folder appears
  ('mid_write'), or as soon as a new checkpoint is committed, while Orbax finalizes it and
  deletes the older one ('after_save'). Asserts after each kill that the newest committed
  checkpoint did not go backwards, and that the last run exits with status 0.
  """
  ckpts = os.path.join(workdir, 'checkpoints')
  for attempt in range(kills + 1):
    before = committed_steps(workdir)
    stale = set(os.listdir(ckpts)) if os.path.isdir(ckpts) else set()
    proc = spawn_main(config_file, workdir, env)
    t0 = time.time()
    if attempt == kills:
      out, err = proc.communicate(timeout=900)
      assert proc.returncode == 0, out + err
      log.append(f'final run from {before[-1] if before else "scratch"}: completed in '
                 f'{time.time() - t0:.1f}s')
      # Temporary folders of killed saves were removed when this run opened the checkpoints.
      assert not [n for n in os.listdir(ckpts) if not n.isdigit()], os.listdir(ckpts)
      return
    mode = rng.choice(['random', 'mid_write', 'after_save'])
    if mode == 'random':
      time.sleep(rng.uniform(0, max_delay))
    else:
      while proc.poll() is None and time.time() - t0 < 600:
        names = set(os.listdir(ckpts)) - stale if os.path.isdir(ckpts) else set()
        if mode == 'mid_write' and any('tmp' in n for n in names):
          time.sleep(rng.uniform(0, 0.05))
          break
        if mode == 'after_save' and committed_steps(workdir)[-1:] > before[-1:]:
          break
        time.sleep(0.005)
    finished = proc.poll() is not None
    proc.kill()
    out, err = proc.communicate()
    after = committed_steps(workdir)
    log.append(f'kill {attempt}: {mode} at {time.time() - t0:.1f}s'
               f'{" (the run had already ended)" if finished else ""}, checkpoints '
               f'{before} -> {after}')
    assert not finished or proc.returncode == 0, out + err
    # A committed checkpoint never disappears unless a newer one is committed.
    if before:
      assert after and after[-1] >= before[-1], log


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_run(reference, tmp_path,
                                                                       jax_cache):
  """Two kill-and-restart cycles; bench/kill_resume.py runs ten and more trials."""
  _, ref_state = reference
  # Checkpoint every step and keep only one: the harshest setting for 'never lose the last one'.
  config_file = write_config_file(tmp_path / 'cfg.py', {
      **MICRO, 'training.checkpoint_every': 1, 'training.keep_checkpoints': 1,
      'training.log_every': 1})
  workdir = str(tmp_path / 'run')
  log = []
  kill_resume_trial(config_file, workdir, main_env(jax_cache), random.Random(0), 2, log)
  step, state = restore(workdir, micro_config())
  assert step == 6, log
  print('\n'.join(log))
  assert_bitwise_equal(state, ref_state)


@pytest.mark.slow
def test_resume_on_another_device_count_trains_on(reference, tmp_path, jax_cache):
  ref_dir, ref_state = reference
  workdir = copy_run(ref_dir, tmp_path / 'run', keep_steps=(2,))
  config_file = write_config_file(tmp_path / 'cfg.py', MICRO)
  proc = spawn_main(config_file, workdir, main_env(jax_cache, num_devices=1))
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, out + err
  assert '1 device(s)' in err and 'resumed from' in err
  assert committed_steps(workdir)[-1] == 6
  step, state = restore(workdir, micro_config())
  assert step == 6
  # The same steps on 1 device instead of 8: equal up to the order of float reductions.
  for a, b in zip(leaves(state)[:-2], leaves(ref_state)[:-2]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert int(state.step) == 6
