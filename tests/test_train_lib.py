"""The train step and loop: sharding invariance, exact resumption, non-finite guards, logs."""

import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

import experiment
import models
import sharding
import train_lib
from tests.tiny import tiny_config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  s, b = config.data.image_size, config.training.batch_size
  return {'image': rng.uniform(-1, 1, (b, s, s, 1)).astype(np.float32),
          'label': rng.integers(0, 10, (b,)).astype(np.int32)}


def _one_step(config, devices):
  mesh = Mesh(np.asarray(devices), ('data',))
  model = models.create_model(config)
  tx = train_lib.make_optimizer(config)
  step_fn, rows = train_lib.compile_train_step(config, model, experiment.schedule(config),
                                                   tx, mesh)
  state = train_lib.create_state(config, model, tx, mesh)
  for i in range(2):
    state, metrics = step_fn(state, sharding.from_process_rows(_batch(config, i), rows))
  return jax.device_get(state), jax.device_get(metrics)


def test_train_step_same_on_1_and_8_devices():
  assert jax.device_count() == 8
  config = tiny_config()
  s1, m1 = _one_step(config, jax.devices()[:1])
  s8, m8 = _one_step(config, jax.devices())
  np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-5)
  assert int(s1.step) == int(s8.step) == 2
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The step moved the params (else the comparison above proves nothing).
  s0 = train_lib.init_state(config, models.create_model(config), train_lib.make_optimizer(config))
  moved = max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)))
  assert moved > 1e-4


def test_nonfinite_update_is_skipped_and_counted():
  config = tiny_config()
  mesh = sharding.make_mesh()
  model = models.create_model(config)
  tx = train_lib.make_optimizer(config)
  step_fn, rows = train_lib.compile_train_step(config, model, experiment.schedule(config),
                                                   tx, mesh)
  state = train_lib.create_state(config, model, tx, mesh)
  state, _ = step_fn(state, sharding.from_process_rows(_batch(config, 0), rows))
  before = jax.device_get(state)
  bad = _batch(config, 1)
  bad['image'][0, 0, 0, 0] = np.nan
  state, metrics = step_fn(state, sharding.from_process_rows(bad, rows))
  after = jax.device_get(state)
  assert float(metrics['nonfinite']) == 1.0
  assert int(after.nonfinite_total) == 1 and int(after.nonfinite_streak) == 1
  assert int(after.step) == int(before.step) + 1
  for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                  jax.tree.leaves((after.params, after.ema_params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  state, _ = step_fn(state, sharding.from_process_rows(_batch(config, 2), rows))
  assert int(jax.device_get(state).nonfinite_streak) == 0


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.ema_params,
                                                                  state.opt_state)))]


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
  config = tiny_config(**{'training.num_steps': 6, 'training.checkpoint_every': 2})
  full = train_lib.train(config, str(tmp_path / 'full'))
  train_lib.train(config, str(tmp_path / 'split'), stop_after=3)
  assert sorted(os.listdir(tmp_path / 'split' / 'checkpoints'))[-1] == '3'
  resumed = train_lib.train(config, str(tmp_path / 'split'))
  assert int(resumed.step) == int(full.step) == 6
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  records = [json.loads(l) for l in open(tmp_path / 'full' / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 4, 6]
  assert all(np.isfinite(r['loss']) and r['steps_per_sec'] > 0 for r in records)
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'full'))


@pytest.mark.slow
def test_steps_per_dispatch_matches_single_steps(tmp_path):
  config = tiny_config(**{'training.num_steps': 4})
  one = train_lib.train(config, str(tmp_path / 'one'))
  fused = train_lib.train(tiny_config(**{'training.num_steps': 4,
                                         'training.steps_per_dispatch': 2}),
                          str(tmp_path / 'two'))
  for a, b in zip(_params(one), _params(fused)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_multi_step_rolled_and_unrolled_equal_single_steps():
  """2 steps as one loop (unroll=1, the accelerator path) and written out (unroll=2, the CPU
  path) give the state of 2 single steps. A one-level U-Net keeps the three compiles short."""
  config = tiny_config(**{'training.batch_size': 8, 'model.ch_mult': (1,),
                          'model.attn_resolutions': ()})
  model, tx = models.create_model(config), train_lib.make_optimizer(config)
  step = train_lib.make_train_step(config, model, experiment.schedule(config), tx)
  rng = np.random.default_rng(0)
  batches = {'image': rng.uniform(-1, 1, (2, 8, 8, 8, 1)).astype(np.float32),
             'label': rng.integers(0, 10, (2, 8)).astype(np.int32)}
  state = train_lib.init_state(config, model, tx)
  single, jstep = state, jax.jit(step)
  for i in range(2):
    single, _ = jstep(single, {k: v[i] for k, v in batches.items()})
  for unroll in (1, 2):
    fused, metrics = jax.jit(train_lib.make_multi_step(step, 2, unroll))(state, batches)
    assert int(fused.step) == 2 and np.isfinite(float(metrics['loss']))
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(fused.params)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_workdir_with_other_config_is_refused(tmp_path):
  import config_lib
  train_lib.train(tiny_config(**{'training.num_steps': 2}), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match='optim.lr'):
    train_lib.train(tiny_config(**{'training.num_steps': 4, 'optim.lr': 5e-4}), str(tmp_path))
  # Extending the run is not another run.
  state = train_lib.train(tiny_config(**{'training.num_steps': 4}), str(tmp_path))
  assert int(state.step) == 4


@pytest.mark.parametrize('kind', ['constant', 'cosine', 'linear'])
def test_learning_rate_warms_up_then_follows_its_schedule_to_zero(kind):
  config = tiny_config()
  config.optim.lr, config.optim.warmup_steps, config.training.num_steps = 1e-3, 10, 110
  config.optim.lr_schedule = kind
  lr = train_lib.learning_rate(config)
  np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(10))], [0, 5e-4, 1e-3],
                             rtol=1e-6, atol=1e-12)
  frac = 0.5  # halfway through the decay: step 60 of 10 + 100
  want = {'constant': 1e-3, 'cosine': 1e-3 * 0.5 * (1 + np.cos(np.pi * frac)),
          'linear': 1e-3 * (1 - frac)}[kind]
  np.testing.assert_allclose(float(lr(60)), want, rtol=1e-5)
  np.testing.assert_allclose(float(lr(110)), 1e-3 if kind == 'constant' else 0.0, atol=1e-12)


def test_ema_warmup_follows_litema_and_caps_at_the_rate():
  config = tiny_config()
  config.training.ema_rate = 0.99
  assert train_lib.ema_decay(config, 0) == 0.99  # off: the rate from the first step
  config.training.ema_warmup = True
  got = [float(train_lib.ema_decay(config, n)) for n in (0, 8, 10_000)]
  np.testing.assert_allclose(got, [0.1, 0.5, 0.99], rtol=1e-6)


def test_adafactor_trains():
  """optim.optimizer='adafactor' (factored second moments) takes two train steps."""
  config = tiny_config(**{'optim.optimizer': 'adafactor', 'optim.warmup_steps': 0})
  state, metrics = _one_step(config, jax.devices())
  assert int(state.step) == 2 and np.isfinite(metrics['loss']) and metrics['grad_norm'] > 0
