"""Training: the train state, the one train step, the loop and its logs.

The whole step is `train_step` below: noise a batch at uniform t (or at EDM's log-normal sigma,
config.diffusion.formulation = 'edm'), regress the network's prediction, clip and apply Adam,
update the EMA. It is compiled once with `jax.jit` over a mesh of every device (batch sharded
on 'data', state replicated, or with config.training.fsdp its params, EMA and optimizer state
sharded over 'data' (sharding.fsdp_sharding), and donated). Per-step randomness is `fold_in(state.rng,
state.step)`, so a resumed run draws the same numbers as an uninterrupted one.

Periodic work other than checkpoints (sample grids, in-loop FID) reaches the loop as hooks
built by the caller (eval_lib.training_hooks): this module names no evaluator.
"""

import json
import os
import time

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax
import orbax.checkpoint as ocp

import captions
import checkpoints
import config_lib
import data as data_lib
import experiment
import latent_cache
import latent_space
import models
import progress
import sharding
from diffusion import edm
from diffusion import losses
from models import autoencoder_loss


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


OPTIMIZERS = {
    'adam': lambda lr, o: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps),
    'adamw': lambda lr, o: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                       weight_decay=o.weight_decay),
    # Shazeer & Stern 2018: factored second moments, no first moment (memory for fine-tuning
    # large models); lr absolute as Adam's (no parameter-scale multiplier), optax's defaults
    # otherwise (decay 0.8, update clipping at RMS 1, factoring of dims >= 128).
    'adafactor': lambda lr, o: optax.adafactor(lr, multiply_by_parameter_scale=False),
}


# After the warm-up: step count d = num_steps - warmup_steps -> the decay's schedule.
LR_SCHEDULES = {
    'constant': lambda lr, d: optax.constant_schedule(lr),
    'cosine': lambda lr, d: optax.cosine_decay_schedule(lr, max(d, 1), alpha=0.0),
    'linear': lambda lr, d: optax.linear_schedule(lr, 0.0, max(d, 1)),
}


def learning_rate(config):
  """The learning-rate schedule: step -> lr. A linear warm-up from 0 to optim.lr over
  optim.warmup_steps, then optim.lr_schedule (LR_SCHEDULES): constant, or a cosine or linear
  decay that reaches 0 at training.num_steps (so a resumed run with a longer num_steps
  follows a stretched schedule from its step on)."""
  o = config.optim
  after = LR_SCHEDULES[o.lr_schedule](o.lr, config.training.num_steps - o.warmup_steps)
  if o.warmup_steps == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), after],
                              [o.warmup_steps])


def ema_decay(config, step):
  """The EMA decay at `step` (before the update): training.ema_rate, or with
  training.ema_warmup min(ema_rate, (1 + step) / (10 + step)) (LDM's LitEma), so the average
  forgets the random init within the first hundreds of steps instead of ~1 / (1 - rate)."""
  rate = config.training.ema_rate
  if not config.training.ema_warmup:
    return rate
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(rate, (1.0 + n) / (10.0 + n))


def make_optimizer(config):
  """optim.optimizer (OPTIMIZERS) on `learning_rate`, after global-norm clipping."""
  o = config.optim
  opt = OPTIMIZERS[o.optimizer](learning_rate(config), o)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt


def init_state(config, model, tx, params=None):
  """A fresh TrainState from config.seed (pure: usable under jax.eval_shape); `params` (e.g. a
  pretrained U-Net's) replace the random init, as the EMA's start too."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  if params is None:
    params = models.init_params(model, config, init_rng)
  zero = lambda: jnp.zeros((), jnp.int32)
  # Copies, not aliases: the state is donated and one buffer cannot be donated twice.
  return TrainState(step=zero(), params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=state_rng, nonfinite_streak=zero(),
                    nonfinite_total=zero())


def abstract_state(config, model, tx, mesh):
  """Shapes, dtypes and shardings of the state (replicated, or with training.fsdp
  sharding.state_shardings' FSDP layout): the restore target, and the train step's."""
  shapes = jax.eval_shape(lambda: init_state(config, model, tx))
  return checkpoints.sharded_target(
      shapes, sharding.state_shardings(shapes, mesh, config.training.fsdp))


def create_state(config, model, tx, mesh, params=None):
  """init_state, compiled, with every leaf laid out as `abstract_state` says; from `params` (a
  tree of the model's shapes, e.g. experiment.pretrained_params) instead of the random init if
  given."""
  target = abstract_state(config, model, tx, mesh)
  shardings = jax.tree.map(lambda s: s.sharding, target)
  if params is None:
    return jax.jit(lambda: init_state(config, model, tx), out_shardings=shardings)()
  return jax.jit(lambda p: init_state(config, model, tx, p), out_shardings=shardings)(params)


def diffusion_objective(config, model, schedule, conditioner=None):
  """The denoising objective: objective(params, batch, rng, step) -> (loss, grads, metrics).

  Noise the batch at uniform t (or EDM's log-normal sigma), regress the network's prediction;
  conditions (labels, text) are dropped to their null with training.cond_dropout.
  """
  d = config.diffusion
  cond_dropout = config.training.cond_dropout
  conditioner = conditioner or experiment.conditioner(config)

  def objective(params, batch, rng, step):
    del step  # the noise comes from rng, which the train step folds the step into
    loss_rng, drop_rng, cond_rng = jax.random.split(rng, 3)
    conds = conditioner.drop(conditioner.from_batch(batch), cond_rng, cond_dropout)

    def loss_fn(params):
      def model_fn(x_t, t):
        return models.prediction(config, model.apply(
            {'params': params}, x_t, t, train=True, rngs={'dropout': drop_rng}, **conds))
      if d.formulation == 'edm':  # model_fn is EDM's F(c_in x, t_in): edm.denoise wraps it
        return edm.edm_loss(model_fn, batch['image'], loss_rng, sigma_data=d.sigma_data,
                            p_mean=d.p_mean, p_std=d.p_std).mean()
      return losses.diffusion_loss(schedule, model_fn, batch['image'], loss_rng,
                                   prediction=d.prediction, min_snr_gamma=d.min_snr_gamma,
                                   loss_type=d.loss_type).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, grads, {}

  return objective


def objective(config, model, schedule, conditioner=None):
  """What the run trains: an autoencoder's reconstruction (+ KL, + GAN) objective for
  model.name = 'autoencoder' (models/autoencoder_loss.py), else the denoising one."""
  if config.model.name == 'autoencoder':
    return autoencoder_loss.make_train_objective(model, config)
  return diffusion_objective(config, model, schedule, conditioner)


def make_train_step(config, model, schedule, tx, conditioner=None):
  """Returns the pure train_step(state, batch) -> (state, metrics): the objective's loss and
  gradients, then the same update for every objective (clip, optimizer, EMA, non-finite skip)."""
  loss_and_grads = objective(config, model, schedule, conditioner)

  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads, extra = loss_and_grads(state.params, batch, rng, state.step)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rate = ema_decay(config, state.step)
    ema = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, state.ema_params, params)
    # A non-finite loss or gradient skips the update (params, EMA and Adam moments unchanged).
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params), opt_state=keep(opt_state, state.opt_state),
        nonfinite_streak=streak, nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
    metrics = {**extra, 'loss': loss, 'grad_norm': grad_norm,
               'nonfinite': (~ok).astype(jnp.float32), 'nonfinite_streak': streak}
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


def compile_train_step(config, model, schedule, tx, mesh, conditioner=None):
  """jit with explicit shardings: state as `abstract_state` lays it out (replicated, or FSDP)
  and donated, batch split on 'data'. Under FSDP no code changes: given the state's shardings,
  XLA's SPMD partitioner all-gathers each weight where the forward and backward use it and
  reduces its gradient to the shards that the optimizer updates (XLA:CPU, measured: an
  all-reduce, then each device's slice, not a reduce-scatter; so a step there still holds one
  whole gradient per device)."""
  k = config.training.steps_per_dispatch
  # XLA:CPU runs this step ~9x slower inside a while loop than outside one (digits U-Net,
  # bench/RESULTS.md; cf. jax-ml/jax#12868), so on the CPU the k steps are written out in full:
  # no loop, at k times the compile time. Accelerators keep the loop.
  unroll = k if jax.default_backend() == 'cpu' else 1
  step = make_multi_step(make_train_step(config, model, schedule, tx, conditioner), k, unroll)
  replicated = sharding.replicated(mesh)
  state = jax.tree.map(lambda s: s.sharding, abstract_state(config, model, tx, mesh))
  rows = sharding.batch_sharding(mesh, leading_axes=0 if k == 1 else 1)
  return jax.jit(step, in_shardings=(state, rows),
                 out_shardings=(state, replicated), donate_argnums=0), rows


# ----------------------------------------------------------------------------- logging


class MetricWriter:
  """metrics.jsonl and TensorBoard event files in the workdir, written by process 0 only.

  `write(step, values)` takes numbers (scalars in both) and images as (uint8 [H, W, C], the path
  of its PNG relative to the workdir): the image goes to TensorBoard, its path to the jsonl, so
  that the jsonl has everything TensorBoard has.
  """

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(logdir=workdir)

  def write(self, step, values):
    if not self.active:
      return
    record = {'step': int(step)}
    for k, v in values.items():
      if isinstance(v, tuple):
        image, path = v
        self._tb.add_image(k, image, int(step), dataformats='HWC')
        record[k] = path
      else:
        record[k] = float(v)
        self._tb.add_scalar(k, float(v), int(step))
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()


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
        # Filled with today's defaults: a field added since the run was saved is not a change.
        saved = config_lib.to_dict(config_lib.from_dict(json.load(f)))
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
    checkpoints.write_atomically(path, json.dumps(current, indent=2))


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
  checkpoints.write_atomically(path, ''.join(kept))


# ----------------------------------------------------------------------------- the loop

# {"step": N, "hooks": [names]}: the hooks a stop interrupted at step N, redone when the run
# resumes from the checkpoint at N (a file beside config.json, written atomically).
PENDING_HOOKS_FILE = 'pending_hooks.json'


def _read_pending(workdir, step):
  path = os.path.join(workdir, PENDING_HOOKS_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return []
  return list(record.get('hooks', [])) if record.get('step') == step else []


def _write_pending(workdir, step, names):
  if jax.process_index() == 0:
    checkpoints.write_atomically(os.path.join(workdir, PENDING_HOOKS_FILE),
                      json.dumps({'step': int(step), 'hooks': list(names)}))


def train(config, workdir, *, hooks=(), allow_config_change=False, stop_after=None,
          latent=None):
  """Trains (or resumes) the run in `workdir`; returns the final TrainState.

  Reliability contract (tests/test_reliability.py, bench/kill_resume.py):
    * Resuming: the newest checkpoint that restores is used (older ones on failure, with a
      warning; the failed newer ones are moved to workdir/unreadable_checkpoints/). The state
      and the data position are restored, so the rest of the run is bit for bit the
      uninterrupted one on the same device count; any other device count also restores.
    * SIGTERM / SIGINT (or a multi-host preemption notice): the current step finishes, a
      checkpoint is written at that step, and train returns. A hook that is running (a sample
      grid, in-loop FID) stops at its next chunk; it is redone when the run resumes.
    * Non-finite loss or gradient: the update is skipped and counted (metric
      'nonfinite_total'); after training.max_nonfinite_steps in a row (detected at most one
      dispatch late), FloatingPointError. Checkpoints only ever hold finite values.
    * A workdir whose config.json differs in a non-resumable field is refused (ConfigError)
      unless allow_config_change.
    * config.model.pretrained: a new run starts its params and EMA from the folder's unet/
      weights (experiment.pretrained_params); a resumed one restores its checkpoint and does
      not read them.

  Args:
    config: the experiment config (validated here again).
    workdir: run directory; checkpoints/, metrics.jsonl, config.json, TensorBoard files.
    hooks: periodic work, each a callable hook(step, ema_params, stop) -> dict of metrics
      (numbers, uint8 images, strings) or None, with attributes `name` and `every` (run when
      step % every == 0 and at the last step; 0 = never); `stop()` is True once a stop is
      requested, and a hook raises progress.Interrupted between its chunks then.
    allow_config_change: resume even though config.json differs.
    stop_after: stop (with a checkpoint) once this many steps are done, as if preempted;
      used by tests of exact resumption.
    latent: the LatentSpace of a latent diffusion config (default: loaded from config.latent);
      with latent.scale_by_std and no scale yet, it is fitted here (latent_space.for_run).

  Raises:
    config_lib.ConfigError: a bad config, a data source that cannot be read, a refused
      workdir, or checkpoints none of which restores.
    FloatingPointError: too many non-finite updates in a row.
  """
  config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  # Installed first: a signal during restore or compilation still ends with a checkpoint.
  stop = progress.StopRequest(install=jax.process_count() == 1)
  workdir = os.path.abspath(workdir)
  mngr = checkpoints.manager(workdir, keep=config.training.keep_checkpoints)
  try:
    _check_workdir_config(workdir, config, allow_config_change or not mngr.all_steps())
    mesh = sharding.make_mesh()
    model = experiment.model(config)
    schedule = experiment.schedule(config)
    tx = make_optimizer(config)
    try:
      # A text model's caption states are encoded once, before the loop (captions.py).
      text_cache = (captions.build_cache(config, workdir)
                    if config.model.get('context_dim', 0) > 0 else None)
      # latent.cache: batches carry each example's index, its row in the latent cache.
      cache = (latent_cache.open_cache(config, workdir)
               if config.latent.autoencoder and config.latent.cache else None)
      ds = data_lib.get_dataset(config, captions=text_cache, index=cache is not None)
    except ValueError as e:
      raise config_lib.ConfigError(str(e).splitlines()[0]) from e
    conditioner = experiment.conditioner(config, text_cache.null if text_cache else None)

    target = abstract_state(config, model, tx, mesh)
    restored = checkpoints.restore_train_state(mngr, target)
    pretrained = config.model.get('pretrained', '')
    if restored is None and mngr.all_steps():
      raise config_lib.ConfigError(
          f'none of the checkpoints {mngr.all_steps()} in {mngr.directory} can be restored (see '
          'the warnings above); move them away to start afresh')
    pending = []
    if restored is not None:
      step, state, data_state, _ = restored
      pending = _read_pending(workdir, step)
      checkpoints.set_aside_newer(mngr, step, workdir)
      try:
        ds.set_state(data_state)
      except ValueError as e:  # e.g. another process count: the stream cannot be re-cut
        logging.warning('the data position cannot be restored (%s); the data stream restarts '
                        'from its beginning', str(e).splitlines()[0])
      logging.info('resumed from %s at step %d%s', mngr.directory, step,
                   f' (the run\'s own weights; model.pretrained={pretrained!r} only started it)'
                   if pretrained else '')
    else:
      # A pretrained U-Net (config.model.pretrained) starts the params and the EMA.
      init = experiment.pretrained_params(config, model, mesh) if pretrained else None
      state = create_state(config, model, tx, mesh, params=init)
      del init
      step = 0
      logging.info('new run in %s: %s parameters%s', workdir,
                   f'{models.count_params(state.params):,}',
                   f', initialised from {os.path.join(pretrained, "unet")}' if pretrained else '')
    _trim_metrics(workdir, step)
    # latent.scale_by_std: the run's saved scale, or (a fresh run) fitted to the first batch and
    # saved before the first checkpoint, so that every resumption encodes with the same value.
    latent = latent_space.for_run(config, workdir, latent, fresh=restored is None, mesh=mesh)
    return _loop(config, workdir, mngr, ds, model, schedule, tx, mesh, state, step, stop,
                 stop_after, list(hooks), pending, latent, conditioner, cache)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    stop.restore()


def _latent_encoder(config, latent, mesh, cache=None):
  """(global batch, step) -> the batch with 'image' the model's latents, for latent diffusion
  (None in pixel space): the frozen autoencoder's encoder, jitted once, its params an argument;
  or with a latent cache, a posterior sample from the batch's cached 'mean' and 'logvar'
  (latent_cache.py). The posterior noise of step s is fold_in(latent_space.encoder_key, s)
  either way, so resumption stays exact and the cache draws what the encoder would."""
  if latent is None:
    return None
  key = latent_space.encoder_key(config)
  if cache is not None:
    sample = jax.jit(latent.from_moments)

    def from_cache(batch, step):
      batch = dict(batch)
      batch['image'] = sample(batch.pop('mean'), batch.pop('logvar'),
                              jax.random.fold_in(key, step))
      return batch
    return from_cache
  params = jax.device_put(latent.params, sharding.replicated(mesh))
  encode = jax.jit(latent.encode)

  def from_images(batch, step):
    return dict(batch, image=encode(params, batch['image'], jax.random.fold_in(key, step)))
  return from_images


def _loop(config, workdir, mngr, ds, model, schedule, tx, mesh, state, step, stop, stop_after,
          hooks, pending, latent=None, conditioner=None, cache=None):
  """The training loop of `train`, from `state` at `step`; returns the last state."""
  tc = config.training
  k = tc.steps_per_dispatch
  step_fn, rows = compile_train_step(config, model, schedule, tx, mesh, conditioner)
  to_latent = _latent_encoder(config, latent, mesh, cache)
  # Hooks sample from the EMA replicated, as --mode sample restores it: under FSDP they get an
  # all-gathered copy (the params alone, not the optimizer state) for as long as they run, and
  # their samples are those of the replicated run.
  gather = (jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh)) if tc.fsdp else
            lambda t: t)
  lr_at = learning_rate(config)
  writer = MetricWriter(workdir)
  end = tc.num_steps if stop_after is None else min(tc.num_steps, stop_after)
  logged_metrics = []  # device metrics since the last log; fetched only at log steps
  last_time, last_step, start_step = time.time(), step, step
  last_saved = step if step in mngr.all_steps() else None
  unchecked = None  # (step, device streak) of the last dispatch, checked one dispatch later
  # Hooks a stop cut short are redone first, at the restored step.
  redo = [h for h in hooks if h.name in pending]

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
    if at_step == last_saved:  # e.g. a stop right after a periodic save
      return
    checkpoints.save(mngr, at_step, state, ds.get_state())
    last_saved = at_step

  def run_hooks(at_step, due):
    """Runs the due hooks; returns the names of those a stop interrupted (and the rest)."""
    stop_fn = stop if jax.process_count() == 1 else progress.never
    ema_params = gather(state.ema_params)
    for i, hook in enumerate(due):
      try:
        values = hook(at_step, ema_params, stop_fn)
      except progress.Interrupted as e:
        names = [h.name for h in due[i:]]
        logging.warning('%s; the checkpoint at step %d records %s, redone when the run resumes',
                        e, at_step, ', '.join(names))
        return names
      if values:
        writer.write(at_step, values)
        scalars = {n: v for n, v in values.items() if not isinstance(v, tuple)}
        if scalars:
          logging.info('step %d  %s', at_step,
                       '  '.join(f'{n} {v:.4g}' for n, v in scalars.items()))
    return []

  def stop_and_save(at_step, interrupted=()):
    if unchecked is not None:
      check_streak(*unchecked)
    save(at_step, state)
    mngr.wait_until_finished()
    if interrupted:
      _write_pending(workdir, at_step, interrupted)
    logging.warning('received %s: saved a checkpoint at step %d in %s; rerun the same '
                    'command to resume', stop.signal or 'a preemption notice', at_step,
                    mngr.directory)

  try:
    if redo:
      logging.info('redoing %s at step %d (interrupted before the last save)',
                   ', '.join(h.name for h in redo), step)
      interrupted = run_hooks(step, redo)
      if interrupted:
        stop_and_save(step, interrupted)
        return state
      _write_pending(workdir, step, [])
    while step < end:
      local = [next(ds) for _ in range(k)]
      local = local[0] if k == 1 else {key: np.stack([b[key] for b in local]) for key in local[0]}
      if cache is not None:  # the cached moments replace the images (not sent to the devices)
        local.pop('image')
        local.update(cache.rows(local.pop('index')))
      batch = sharding.from_process_rows(local, rows)
      if to_latent is not None:
        batch = to_latent(batch, step)
      if step == start_step and jax.process_count() > 1:
        # Compile, then wait for every process: the first cross-process collective gives up
        # if the processes reach it far apart (CPU gloo: 30 s), as uneven compile times can.
        step_fn = step_fn.lower(state, batch).compile()
        ocp.multihost.sync_global_processes('train_step_compiled', timeout=3600)
      state, metrics = step_fn(state, batch)
      step += k
      logged_metrics.append(metrics)
      # The previous dispatch is done (or nearly) by now: reading its streak does not stall
      # the device, which already holds this step's work.
      if unchecked is not None:
        check_streak(*unchecked)
      unchecked = (step, metrics['nonfinite_streak'])

      if step % tc.log_every < k or step >= end:
        fetched = jax.device_get(logged_metrics)
        logged_metrics = []
        logged = {key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}
        logged.pop('nonfinite_streak')
        logged['nonfinite_total'] = float(int(state.nonfinite_total))
        logged['lr'] = float(lr_at(step - 1))  # the rate the last update used
        now = time.time()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        logged['steps_per_sec'] = rate
        writer.write(step, logged)
        if jax.process_index() == 0:
          logging.info('step %d/%d  loss %.5f  grad_norm %.3f  %.2f steps/s  ETA %s%s', step,
                       tc.num_steps, logged['loss'], logged['grad_norm'], rate,
                       progress.fmt_time((tc.num_steps - step) / max(rate, 1e-9)),
                       f'  skipped {int(logged["nonfinite_total"])} non-finite updates'
                       if logged['nonfinite_total'] else '')

      if step % tc.checkpoint_every < k or step >= end:
        check_streak(*unchecked)
        save(step, state)
      due = [h for h in hooks if h.every and (step % h.every < k or step >= tc.num_steps)]
      interrupted = run_hooks(step, due) if due and not stop() else [h.name for h in due]
      # Every process calls the sync point at every step (its contract), hence no short cut.
      preempted = jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step)
      if stop() or preempted:
        stop_and_save(step, interrupted)
        break
    if unchecked is not None:
      check_streak(*unchecked)
    if step > start_step:
      logging.info('done: step %d, checkpoints in %s', step, mngr.directory)
  finally:
    writer.close()
  return state
