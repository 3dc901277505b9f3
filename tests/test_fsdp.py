"""training.fsdp: params, EMA and optimizer state sharded over the 8 devices' 'data' axis.

The step is the replicated one to float32 round-off, each device holds 1/8 of every sharded
leaf, and an FSDP run resumes bit for bit and its checkpoint restores (replicated) for
sampling. The step tests use a one-level U-Net (16 channels, so its convolutions are large
enough to be sharded) to keep their two compiles short; the memory test the tiny config.
"""

import os

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

import checkpoints
import experiment
import models
import sharding
import train_lib
from tests.test_train_lib import _batch
from tests.tiny import tiny_config

# One level, 16 channels; no warm-up, so that the first step moves the params.
SMALL = {'model.ch_mult': (1,), 'model.attn_resolutions': (), 'optim.warmup_steps': 0,
         'training.num_steps': 4, 'training.checkpoint_every': 2, 'training.log_every': 2}


def _config(fsdp, **overrides):
  return tiny_config(**{**SMALL, 'training.fsdp': fsdp, **overrides})


def _state_leaves(state):
  return jax.tree.leaves((state.params, state.ema_params, state.opt_state))


def test_rule_shards_the_largest_divisible_axis_and_replicates_small_or_indivisible_leaves():
  mesh = sharding.make_mesh()
  spec = lambda shape: tuple(sharding.fsdp_sharding(shape, mesh).spec)
  assert spec((3, 3, 16, 32)) == (None, None, None, 'data')
  assert spec((3, 3, 32, 32)) == (None, None, None, 'data')  # ties: the last axis
  assert spec((1000, 24)) == ('data',)  # 1000 = 8 * 125
  assert spec((7, 2048)) == (None, 'data')
  assert spec((7, 9, 33)) == ()  # no axis divisible by 8
  assert spec((3, 3, 1, 16)) == ()  # 144 elements < FSDP_MIN_SIZE
  assert spec((64,)) == () and spec(()) == ()
  assert spec(jax.ShapeDtypeStruct((16, 64), np.float32)) == (None, 'data')
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  assert sharding.fsdp_sharding((1024, 1024), one).is_fully_replicated


def test_fsdp_step_equals_the_replicated_step():
  """One step from the same init on the same batch. The math is the same; the partitioner may
  order a sum differently (the per-shard pieces of the global norm, a gradient's partial sums),
  so the two agree to float32 round-off of those sums: each leaf within 1e-5 of its largest
  magnitude (~100 ulps; a relative bound per element would fail on gradients that cancel to
  near 0). Measured: bitwise equal here; on the two-level tiny U-Net only conv_out's gradient
  (Adam's mu) differs, by 2.8e-9 at most."""
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  out = {}
  for fsdp in (False, True):
    config = _config(fsdp)
    model, tx = models.create_model(config), train_lib.make_optimizer(config)
    step_fn, rows = train_lib.compile_train_step(config, model, experiment.schedule(config), tx,
                                                 mesh)
    state = train_lib.create_state(config, model, tx, mesh)
    state, metrics = step_fn(state, sharding.from_process_rows(_batch(config), rows))
    assert any(not x.sharding.is_fully_replicated for x in _state_leaves(state)) == fsdp
    out[fsdp] = jax.device_get((state, metrics))
  (rep, m_rep), (fs, m_fs) = out[False], out[True]
  np.testing.assert_allclose(m_fs['loss'], m_rep['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_fs['grad_norm'], m_rep['grad_norm'], rtol=1e-5)
  assert int(fs.step) == int(rep.step) == 1
  np.testing.assert_array_equal(fs.rng, rep.rng)
  for a, b in zip(_state_leaves(fs), _state_leaves(rep)):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())
  # The step moved the params (else the comparison proves nothing).
  init = train_lib.init_state(config, model, tx)
  assert max(float(np.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(init.params), jax.tree.leaves(fs.params))) > 1e-4


def test_each_device_holds_an_eighth_of_the_sharded_state():
  """Measured from the arrays: per device, the bytes of its shards of params, ema_params and
  opt_state. Sharded leaves contribute total / 8; the replicated rest (biases, norms, the
  1-channel input and output convolutions, Adam's step count) is small."""
  config = tiny_config(**{'training.fsdp': True})
  model, tx = models.create_model(config), train_lib.make_optimizer(config)
  state = train_lib.create_state(config, model, tx, sharding.make_mesh())
  report = []
  for name in ('params', 'ema_params', 'opt_state'):
    per_device = {d: 0 for d in jax.devices()}
    total = sharded = 0
    for x in jax.tree.leaves(getattr(state, name)):
      total += x.nbytes
      shards = x.addressable_shards
      assert sorted(s.device.id for s in shards) == list(range(8))
      for s in shards:
        per_device[s.device] += s.data.nbytes
      if not x.sharding.is_fully_replicated:
        sharded += x.nbytes
        assert all(s.data.nbytes * 8 == x.nbytes for s in shards)
    replicated = total - sharded
    assert set(per_device.values()) == {sharded // 8 + replicated}, per_device
    report.append((name, total, sharded, replicated))
  for name, total, sharded, replicated in report:
    print(f'{name}: {total:,} B in all, {sharded:,} B sharded ({sharded // 8:,} B per device), '
          f'{replicated:,} B replicated ({replicated / total:.1%}); per device '
          f'{(sharded // 8 + replicated) / total:.1%} of the total')
  total = sum(r[1] for r in report)
  replicated = sum(r[3] for r in report)
  per_device = sum(r[2] // 8 + r[3] for r in report)
  print(f'state: per device {per_device:,} of {total:,} B ({per_device / total:.1%}; '
        f'1/8 = 12.5%), replicated {replicated / total:.1%}')
  assert replicated < 0.05 * total  # 2.7% at this config
  assert per_device < (1 / 8 + 0.05) * total
  # step, rng and the non-finite counters stay replicated.
  for x in (state.step, state.rng, state.nonfinite_streak, state.nonfinite_total):
    assert x.sharding.is_fully_replicated


class _RecordEma:
  """A training hook that records the EMA it is given (as a sampling hook would use it)."""
  name, every = 'record_ema', 2

  def __init__(self):
    self.seen = {}

  def __call__(self, step, ema_params, stop=None):
    replicated = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(ema_params))
    self.seen[step] = (replicated, jax.device_get(ema_params))


@pytest.mark.slow
def test_fsdp_run_resumes_bit_for_bit_and_restores_for_sampling(tmp_path):
  config = _config(True)
  hook = _RecordEma()
  full = train_lib.train(config, str(tmp_path / 'full'), hooks=[hook])
  train_lib.train(config, str(tmp_path / 'split'), stop_after=3)
  assert sorted(os.listdir(tmp_path / 'split' / 'checkpoints'))[-1] == '3'
  resumed = train_lib.train(config, str(tmp_path / 'split'))
  assert int(resumed.step) == int(full.step) == 4
  assert any(not x.sharding.is_fully_replicated for x in _state_leaves(resumed))
  for a, b in zip(jax.tree.leaves(jax.device_get(full)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)
  # Hooks got the EMA gathered (replicated), with the state's values.
  assert sorted(hook.seen) == [2, 4] and all(rep for rep, _ in hook.seen.values())
  for a, b in zip(jax.tree.leaves(hook.seen[4][1]), jax.tree.leaves(full.ema_params)):
    np.testing.assert_array_equal(a, b)
  # The checkpoint resumes in either layout on another device count (Orbax reshards).
  mngr = checkpoints.manager(str(tmp_path / 'split'), read_only=True)
  try:
    for fsdp, n in ((True, 4), (False, 2)):
      c = _config(fsdp)
      mesh = Mesh(np.asarray(jax.devices()[:n]), ('data',))
      target = train_lib.abstract_state(c, models.create_model(c), train_lib.make_optimizer(c),
                                        mesh)
      step, state, _, _ = checkpoints.restore_train_state(mngr, target)
      assert step == 4
      assert any(not x.sharding.is_fully_replicated for x in _state_leaves(state)) == fsdp
      for a, b in zip(jax.tree.leaves(jax.device_get(state)),
                      jax.tree.leaves(jax.device_get(resumed))):
        np.testing.assert_array_equal(a, b)
  finally:
    mngr.close()
  # Sampling restores the EMA of the FSDP checkpoint replicated, as the run left it.
  step, params = experiment.sampling_params(config, str(tmp_path / 'split'))
  assert step == 4
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed.ema_params)):
    assert a.sharding.is_fully_replicated
    np.testing.assert_array_equal(a, b)
