"""Training: the train state, the one train step, the loop, checkpoints and logs.

The whole step is `train_step` below: noise a batch at uniform t, regress the network's
prediction, clip and apply Adam, update the EMA. It is compiled once with `jax.jit` over a
mesh of every device (batch sharded on 'data', state replicated and donated). Per-step
randomness is `fold_in(state.rng, state.step)`, so a resumed run draws the same numbers as an
uninterrupted one.
"""

import json
import math
import os
import signal
import time

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

import config_lib
import data as data_lib
import models
import sample_lib
from diffusion import losses, schedules


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: a pytree, saved whole in each checkpoint."""
  step: jnp.ndarray  # int32 [], optimizer steps taken
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jnp.ndarray  # uint32 [2], base key; step keys are fold_in(rng, step)
  nonfinite_streak: jnp.ndarray  # int32 [], consecutive skipped (non-finite) updates
  nonfinite_total: jnp.ndarray  # int32 [], all skipped updates


def get_schedule(config):
  d = config.diffusion
  kwargs = ({'beta_start': d.beta_start, 'beta_end': d.beta_end} if d.schedule == 'linear'
            else {'s': d.cosine_s})
  return schedules.get_schedule(d.schedule, d.num_timesteps, **kwargs)


def make_optimizer(config):
  """Adam(W) with linear warm-up to a constant lr, after global-norm clipping."""
  o = config.optim
  lr = (optax.linear_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps > 0
        else optax.constant_schedule(o.lr))
  if o.optimizer == 'adam':
    opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  else:
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt


def init_state(config, model, tx):
  """A fresh TrainState from config.seed (pure: usable under jax.eval_shape)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  params = models.init_params(model, config, init_rng)
  zero = lambda: jnp.zeros((), jnp.int32)
  # Copies, not aliases: the state is donated and one buffer cannot be donated twice.
  return TrainState(step=zero(), params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=state_rng, nonfinite_streak=zero(),
                    nonfinite_total=zero())


def create_state(config, model, tx, mesh):
  """init_state, compiled, with every leaf replicated over the mesh."""
  target = abstract_state(config, model, tx, mesh)
  return jax.jit(lambda: init_state(config, model, tx),
                 out_shardings=jax.tree.map(lambda s: s.sharding, target))()


def model_kwargs(config, batch, rng, *, train):
  """Conditioning inputs for the model from a batch: labels (with CFG dropout) and images."""
  kwargs = {}
  num_classes = config.model.num_classes
  if num_classes > 0:
    y = batch['label']
    if train and config.training.label_dropout > 0:
      drop = jax.random.uniform(rng, y.shape) < config.training.label_dropout
      y = jnp.where(drop, num_classes, y)  # index num_classes is the 'null' label
    kwargs['y'] = y
  if config.model.cond_channels > 0:
    kwargs['cond'] = batch['low_res']
  return kwargs


def make_train_step(config, model, schedule, tx):
  """Returns the pure train_step(state, batch) -> (state, metrics)."""
  ema_rate = config.training.ema_rate
  prediction = config.diffusion.prediction

  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss_rng, drop_rng, label_rng = jax.random.split(rng, 3)
    kwargs = model_kwargs(config, batch, label_rng, train=True)

    def loss_fn(params):
      def model_fn(x_t, t):
        return model.apply({'params': params}, x_t, t, train=True, rngs={'dropout': drop_rng},
                           **kwargs)
      return losses.diffusion_loss(schedule, model_fn, batch['image'], loss_rng,
                                   prediction=prediction).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state.ema_params, params)
    # A non-finite loss or gradient skips the update (params, EMA and Adam moments unchanged).
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params), opt_state=keep(opt_state, state.opt_state),
        nonfinite_streak=streak, nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'nonfinite': (~ok).astype(jnp.float32),
               'nonfinite_streak': streak}
    return new_state, metrics

  return train_step


def make_multi_step(train_step, k, unroll=1):
  """k train steps in one compiled call: batches carry a leading axis of k.

  `unroll` is lax.scan's: 1 keeps a loop of k iterations, k writes the k steps out in full.
  """
  if k == 1:
    return train_step

  def multi_step(state, batches):
    state, metrics = jax.lax.scan(train_step, state, batches, unroll=unroll)
    streak = metrics['nonfinite_streak'].max()  # worst streak inside the k steps
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics['nonfinite_streak'] = streak
    return state, metrics

  return multi_step


def make_mesh():
  return Mesh(np.asarray(jax.devices()), ('data',))


def compile_train_step(config, model, schedule, tx, mesh):
  """jit with explicit shardings: state replicated and donated, batch split on 'data'."""
  k = config.training.steps_per_dispatch
  # XLA:CPU runs this step ~9x slower inside a while loop than outside one (digits U-Net,
  # bench/RESULTS.md; cf. jax-ml/jax#12868), so on the CPU the k steps are written out in full:
  # no loop, at k times the compile time. Accelerators keep the loop.
  unroll = k if jax.default_backend() == 'cpu' else 1
  step = make_multi_step(make_train_step(config, model, schedule, tx), k, unroll)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data') if k == 1 else P(None, 'data'))
  return jax.jit(step, in_shardings=(replicated, batch_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=0), batch_sharding


def global_batch(local_batch, sharding):
  """Per-process numpy batches -> one global jax.Array per key, sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir, config):
  """Orbax manager of workdir/checkpoints: async saves, keep_checkpoints newest kept.

  Orbax writes a save into a temporary folder and renames it on commit; it deletes the
  checkpoints beyond keep_checkpoints only after the new one is committed. Temporary folders
  left by a killed save are removed when the next manager opens the directory.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=config.training.keep_checkpoints,
                                         create=True, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def abstract_state(config, model, tx, mesh):
  """Shapes, dtypes and (replicated) shardings of the state: the restore target."""
  shapes = jax.eval_shape(lambda: init_state(config, model, tx))
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes)


def restore_latest(mngr, target, *, with_data=True):
  """Restores the newest checkpoint that reads back; warns about and skips broken ones.

  A checkpoint that raises on restore (truncated or missing files, a shape that does not match
  `target`) or that holds a non-finite float is skipped with a warning, and the next older one
  is tried. Orbax writes each checkpoint into a temporary folder and renames it on commit, so a
  save cut short (SIGKILL, node failure) never shows up in `mngr.all_steps()` at all.

  Returns (step, state, data_state) or None when no checkpoint can be read.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      args = {'state': ocp.args.StandardRestore(target)}
      if with_data:
        args['data'] = ocp.args.JsonRestore()
      restored = mngr.restore(step, args=ocp.args.Composite(**args))
      state = restored['state']
      if not _all_finite(state):
        raise ValueError('non-finite values in the checkpoint')
      return step, state, restored.get('data') if with_data else None
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint at step %d cannot be restored (%s: %s); trying an older one',
                      step, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
  return None


def _all_finite(tree):
  """True when every float leaf of `tree` is finite (one small reduction per leaf)."""
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def _set_aside_newer(mngr, step, workdir):
  """Moves checkpoints newer than `step` (the ones that failed to restore) out of the way.

  They are renamed into workdir/unreadable_checkpoints/ (kept for a post-mortem, never deleted)
  so that the resumed run can write its own checkpoints at those steps. Process 0 moves them;
  every process then re-reads the checkpoint list.
  """
  newer = [s for s in mngr.all_steps() if step is None or s > step]
  if not newer:
    return
  if jax.process_index() == 0:
    aside = os.path.join(workdir, 'unreadable_checkpoints')
    os.makedirs(aside, exist_ok=True)
    for s in newer:
      dest = os.path.join(aside, f'{s}.{int(time.time())}')
      os.replace(os.path.join(str(mngr.directory), str(s)), dest)
      logging.warning('moved the unreadable checkpoint at step %d to %s', s, dest)
  ocp.multihost.sync_global_processes('set_aside_unreadable_checkpoints')
  mngr.reload()


# ----------------------------------------------------------------------------- logging


class MetricWriter:
  """metrics.jsonl and TensorBoard event files in the workdir, written by process 0 only."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(logdir=workdir)

  def write(self, step, metrics):
    if not self.active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop reads between steps (single-process runs).

  A second SIGINT (Ctrl-C twice) interrupts at once. In a multi-process run no Python handler
  is installed: jax.distributed's preemption service catches SIGTERM on any process and the
  loop asks `multihost_utils.reached_preemption_sync_point` every step, so that every process
  stops and saves at the same step (a flag set on one process alone would leave the others
  waiting in a collective).
  """

  def __init__(self, install=True):
    self.signal = None
    self._old = {}
    if not install:
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. under some test runners)
        pass

  def _handle(self, signum, frame):
    del frame
    if self.signal == 'SIGINT' and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    logging.warning('received %s: finishing the current step, then saving a checkpoint',
                    self.signal)

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _write_atomically(path, text):
  """Writes `text` to `path` through a temporary file and a rename: never a torn file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _check_workdir_config(workdir, config, allow_config_change):
  """Refuses a workdir whose saved config differs (except resumable fields); records ours.

  Raises:
    config_lib.ConfigError: the differing fields, one line, unless allow_config_change.
  """
  path = os.path.join(workdir, 'config.json')
  current = config_lib.to_dict(config)
  saved = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      logging.warning('cannot read %s (%s); it will be rewritten', path, e)
  if saved is not None:
    differing = config_lib.diff(saved, current)
    if differing and not allow_config_change:
      raise config_lib.ConfigError(
          f'workdir {workdir} holds a run with a different config ({"; ".join(differing)}); '
          'use another --workdir, or pass --allow_config_change to resume it anyway')
    if differing:
      logging.warning('resuming %s with a changed config: %s', workdir, '; '.join(differing))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    _write_atomically(path, json.dumps(current, indent=2))


def _trim_metrics(workdir, step):
  """Drops metrics.jsonl records after `step` (steps that are about to be redone) and a line
  torn by a kill, so that the file reads as one run. Process 0 only."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line).get('step', 0) <= step:
          kept.append(line if line.endswith('\n') else line + '\n')
      except ValueError:
        pass
  _write_atomically(path, ''.join(kept))


def _fmt_time(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


# ----------------------------------------------------------------------------- the loop


def train(config, workdir, *, allow_config_change=False, stop_after=None):
  """Trains (or resumes) the run in `workdir`; returns the final TrainState.

  Reliability contract (tests/test_reliability.py, bench/kill_resume.py):
    * Resuming: the newest checkpoint that restores is used (older ones on failure, with a
      warning; the failed newer ones are moved to workdir/unreadable_checkpoints/). The state
      and the data position are restored, so the rest of the run is bit for bit the
      uninterrupted one on the same device count; any other device count also restores.
    * SIGTERM / SIGINT (or a multi-host preemption notice): the current step finishes, a
      checkpoint is written at that step, and train returns.
    * Non-finite loss or gradient: the update is skipped and counted (metric
      'nonfinite_total'); after training.max_nonfinite_steps in a row (detected at most one
      dispatch late), FloatingPointError. Checkpoints only ever hold finite values.
    * A workdir whose config.json differs in a non-resumable field is refused (ConfigError)
      unless allow_config_change.

  Args:
    config: the experiment config (validated here again).
    workdir: run directory; checkpoints/, metrics.jsonl, config.json, TensorBoard files.
    allow_config_change: resume even though config.json differs.
    stop_after: stop (with a checkpoint) once this many steps are done, as if preempted;
      used by tests of exact resumption.

  Raises:
    config_lib.ConfigError: a bad config, a data source that cannot be read, a refused
      workdir, or checkpoints none of which restores.
    FloatingPointError: too many non-finite updates in a row.
  """
  config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  # Installed first: a signal during restore or compilation still ends with a checkpoint.
  stop = _StopRequest(install=jax.process_count() == 1)
  workdir = os.path.abspath(workdir)
  mngr = checkpoint_manager(workdir, config)
  try:
    _check_workdir_config(workdir, config, allow_config_change or not mngr.all_steps())
    mesh = make_mesh()
    model = models.create_model(config)
    schedule = get_schedule(config)
    tx = make_optimizer(config)
    try:
      ds = data_lib.get_dataset(config)
    except ValueError as e:
      raise config_lib.ConfigError(str(e).splitlines()[0]) from e

    target = abstract_state(config, model, tx, mesh)
    restored = restore_latest(mngr, target)
    if restored is None and mngr.all_steps():
      raise config_lib.ConfigError(
          f'none of the checkpoints {mngr.all_steps()} in {mngr.directory} can be restored (see '
          'the warnings above); move them away to start afresh')
    if restored is not None:
      step, state, data_state = restored
      _set_aside_newer(mngr, step, workdir)
      try:
        ds.set_state(data_state)
      except ValueError as e:  # e.g. another process count: the stream cannot be re-cut
        logging.warning('the data position cannot be restored (%s); the data stream restarts '
                        'from its beginning', str(e).splitlines()[0])
      logging.info('resumed from %s at step %d', mngr.directory, step)
    else:
      state = create_state(config, model, tx, mesh)
      step = 0
      logging.info('new run in %s: %s parameters', workdir,
                   f'{models.count_params(state.params):,}')
    _trim_metrics(workdir, step)
    return _loop(config, workdir, mngr, ds, model, schedule, tx, mesh, state, step, stop,
                 stop_after)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    stop.restore()


def _loop(config, workdir, mngr, ds, model, schedule, tx, mesh, state, step, stop, stop_after):
  """The training loop of `train`, from `state` at `step`; returns the last state."""
  tc = config.training
  k = tc.steps_per_dispatch
  step_fn, batch_sharding = compile_train_step(config, model, schedule, tx, mesh)
  writer = MetricWriter(workdir)
  evaluator = None
  if tc.eval_every > 0:
    import eval_lib  # pylint: disable=g-import-not-at-top
    evaluator = eval_lib.InLoopEvaluator(config)
  end = tc.num_steps if stop_after is None else min(tc.num_steps, stop_after)
  pending = []  # device metrics since the last log; fetched only at log steps
  last_time, last_step, start_step = time.time(), step, step
  last_saved = step if step in mngr.all_steps() else None
  unchecked = None  # (step, device streak) of the last dispatch, checked one dispatch later

  def check_streak(at_step, streak):
    streak = int(streak)
    if streak >= tc.max_nonfinite_steps:
      raise FloatingPointError(
          f'{streak} consecutive non-finite losses or gradients up to step {at_step} '
          f'(limit training.max_nonfinite_steps = {tc.max_nonfinite_steps}); those updates were '
          f'skipped and the last good checkpoint in {mngr.directory} is intact. Lower optim.lr '
          'or check the data.')

  def save(at_step, state):
    nonlocal last_saved
    if at_step == last_saved:  # e.g. a stop signal right after a periodic save
      return
    # Skipped updates keep the state finite; this guard makes it a guarantee.
    if not _all_finite(state):
      raise FloatingPointError(f'non-finite values in the state at step {at_step}; not saved')
    mngr.save(at_step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(ds.get_state())),
              force=True)
    last_saved = at_step

  try:
    while step < end:
      local = [next(ds) for _ in range(k)]
      local = local[0] if k == 1 else {key: np.stack([b[key] for b in local]) for key in local[0]}
      batch = global_batch(local, batch_sharding)
      if step == start_step and jax.process_count() > 1:
        # Compile, then wait for every process: the first cross-process collective gives up
        # if the processes reach it far apart (CPU gloo: 30 s), as uneven compile times can.
        step_fn = step_fn.lower(state, batch).compile()
        ocp.multihost.sync_global_processes('train_step_compiled', timeout=3600)
      state, metrics = step_fn(state, batch)
      step += k
      pending.append(metrics)
      # The previous dispatch is done (or nearly) by now: reading its streak does not stall
      # the device, which already holds this step's work.
      if unchecked is not None:
        check_streak(*unchecked)
      unchecked = (step, metrics['nonfinite_streak'])

      if step % tc.log_every < k or step >= end:
        fetched = jax.device_get(pending)
        pending = []
        logged = {key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}
        logged.pop('nonfinite_streak')
        logged['nonfinite_total'] = float(int(state.nonfinite_total))
        now = time.time()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        logged['steps_per_sec'] = rate
        writer.write(step, logged)
        if jax.process_index() == 0:
          logging.info('step %d/%d  loss %.5f  grad_norm %.3f  %.2f steps/s  ETA %s%s', step,
                       tc.num_steps, logged['loss'], logged['grad_norm'], rate,
                       _fmt_time((tc.num_steps - step) / max(rate, 1e-9)),
                       f'  skipped {int(logged["nonfinite_total"])} non-finite updates'
                       if logged['nonfinite_total'] else '')

      if step % tc.checkpoint_every < k or step >= end:
        check_streak(*unchecked)
        save(step, state)
      if tc.sample_every and (step % tc.sample_every < k or step >= tc.num_steps):
        sample_lib.write_training_grid(config, model, schedule, state.ema_params, workdir, step)
      if evaluator is not None and (step % tc.eval_every < k or step >= tc.num_steps):
        scores = evaluator(model, schedule, state.ema_params, step)
        writer.write(step, scores)
        logging.info('step %d  %s', step,
                     '  '.join(f'{name} {val:.4g}' for name, val in scores.items()))
      # Every process calls the sync point at every step (its contract), hence no short cut.
      preempted = jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step)
      if stop.signal is not None or preempted:
        check_streak(*unchecked)
        save(step, state)
        mngr.wait_until_finished()
        logging.warning('received %s: saved a checkpoint at step %d in %s; rerun the same '
                        'command to resume', stop.signal or 'a preemption notice', step,
                        mngr.directory)
        break
    if unchecked is not None:
      check_streak(*unchecked)
    if step > start_step:
      logging.info('done: step %d, checkpoints in %s', step, mngr.directory)
  finally:
    writer.close()
  return state
