"""Orbax checkpoints of a run: the manager, the restore target, and restoring the newest readable.

A run's checkpoints live in WORKDIR/checkpoints, one folder per step, each a Composite of
  'state'  the whole TrainState (train_lib.TrainState: params, ema_params, opt_state, step, rng)
  'data'   the input iterator's position (JSON)
  (+ items a run adds, such as the latent scale factor of a latent-diffusion run)
Training restores everything; sampling and evaluation restore the (EMA) params alone. Both go
through `restore_newest`, which skips a checkpoint that cannot be read for the next older one.

Orbax writes each save into a temporary folder and renames it on commit, so a save cut short
(SIGKILL, node failure) never shows up in `all_steps()`; checkpoints beyond `keep` are deleted
only after the new one is committed.
"""

import os
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import sharding as sharding_lib

UNREADABLE_DIR = 'unreadable_checkpoints'


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """The Orbax manager of WORKDIR/checkpoints (async saves, the `keep` newest kept)."""
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory(workdir), options=options)


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: never a torn file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def sharded_target(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `shapes` (a pytree from jax.eval_shape) with `shardings` (a pytree of
  the same structure): the restore target. Explicit shardings let a checkpoint saved on one
  device count, or with another layout (replicated or FSDP), restore on another (Orbax would
  otherwise reuse the shardings recorded at save time)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def replicated_target(shapes: Any, mesh) -> Any:
  """`sharded_target` with every leaf replicated over `mesh`."""
  rep = sharding_lib.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def all_finite(tree: Any) -> bool:
  """True when every float array of `tree` is finite (one small reduction per leaf); other
  leaves (the data position's ints and strings) are not checked."""
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating))


def restore_newest(mngr: ocp.CheckpointManager, restore: Callable[[int], Any], *,
                   steps: Optional[list] = None):
  """Restores the newest checkpoint that reads back; warns about and skips broken ones.

  A checkpoint that raises on restore (truncated or missing files, a shape that does not match
  the target) or that holds a non-finite float is skipped with a warning, and the next older
  one is tried.

  Args:
    mngr: the manager.
    restore: step -> the restored pytree(s); raises on failure.
    steps: the steps to try, newest first (default: all of the manager's).

  Returns:
    (step, restored) of the first that worked, or None.
  """
  steps = sorted(mngr.all_steps(), reverse=True) if steps is None else steps
  for step in steps:
    try:
      restored = restore(step)
      if not all_finite(restored):
        raise ValueError('non-finite values in the checkpoint')
      return step, restored
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint at step %d cannot be restored (%s: %s); trying an older one',
                      step, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
  return None


def restore_train_state(mngr: ocp.CheckpointManager, target: Any, extra: Optional[dict] = None):
  """The newest readable (step, state, data position, extra items) for resuming training.

  Args:
    mngr: the manager.
    target: the abstract TrainState (`sharded_target`: replicated, or FSDP's layout).
    extra: {item name: default} of JSON items a run keeps beside the state (a checkpoint written
      before an item existed restores with the default).

  Returns:
    (step, state, data_state, extra_values) or None when no checkpoint can be read.
  """
  extra = extra or {}

  def restore(step):
    names = set(mngr.item_metadata(step).keys()) if extra else set()
    args = {'state': ocp.args.StandardRestore(target), 'data': ocp.args.JsonRestore()}
    args.update({k: ocp.args.JsonRestore() for k in extra if k in names})
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    values = {k: restored[k] if k in names else default for k, default in extra.items()}
    return restored['state'], restored['data'], values

  found = restore_newest(mngr, restore)
  if found is None:
    return None
  step, (state, data_state, values) = found
  return step, state, data_state, values


def restore_params(workdir: str, params_shapes: Any, mesh, *, step: int = -1,
                   use_ema: bool = True):
  """One checkpoint's params (EMA by default), without the optimizer state.

  Args:
    workdir: the run directory.
    params_shapes: the params pytree's shapes (jax.eval_shape of the model's init).
    mesh: the mesh to place them on (replicated).
    step: the checkpoint step; -1 = the newest readable one.
    use_ema: the EMA params (else the raw ones).

  Returns:
    (step, params).

  Raises:
    FileNotFoundError: no checkpoint, no checkpoint at `step`, or none readable.
  """
  folder = directory(workdir)
  mngr = manager(workdir, read_only=True)
  try:
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {folder}: train first with --mode train and '
                              'the same --workdir')
    if step >= 0:
      if step not in steps:
        raise FileNotFoundError(f'no checkpoint at step {step} in {folder}; available steps: '
                                f'{sorted(steps)}')
      steps = [step]
    key = 'ema_params' if use_ema else 'params'
    target = {key: replicated_target(params_shapes, mesh)}

    def restore(s):
      restored = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
      return restored['state'][key]

    found = restore_newest(mngr, restore, steps=steps)
  finally:
    mngr.close()
  if found is None:
    raise FileNotFoundError(f'no readable checkpoint in {folder} (tried steps {steps})')
  return found


def restore_json_item(workdir: str, step: int, name: str, default=None):
  """A JSON item saved beside the state at `step` (default when the checkpoint lacks it)."""
  mngr = manager(workdir, read_only=True)
  try:
    if name not in mngr.item_metadata(step).keys():
      return default
    return mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]
  finally:
    mngr.close()


def set_aside_newer(mngr: ocp.CheckpointManager, step: Optional[int], workdir: str):
  """Moves checkpoints newer than `step` (the ones that failed to restore) out of the way.

  They are renamed into WORKDIR/unreadable_checkpoints/ (kept for a post-mortem, never deleted)
  so that the resumed run can write its own checkpoints at those steps. Process 0 moves them;
  every process then re-reads the checkpoint list.
  """
  newer = [s for s in mngr.all_steps() if step is None or s > step]
  if not newer:
    return
  if jax.process_index() == 0:
    aside = os.path.join(workdir, UNREADABLE_DIR)
    os.makedirs(aside, exist_ok=True)
    for s in newer:
      dest = os.path.join(aside, f'{s}.{int(time.time())}')
      os.replace(os.path.join(str(mngr.directory), str(s)), dest)
      logging.warning('moved the unreadable checkpoint at step %d to %s', s, dest)
  ocp.multihost.sync_global_processes('set_aside_unreadable_checkpoints')
  mngr.reload()


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         extra: Optional[dict] = None):
  """Saves the state, the data position and `extra` JSON items at `step` (async).

  Raises:
    FloatingPointError: the state holds a non-finite value (then nothing is written, so the
      last good checkpoint stays the newest).
  """
  if not all_finite(state):
    raise FloatingPointError(f'non-finite values in the state at step {step}; not saved')
  args = {'state': ocp.args.StandardSave(state), 'data': ocp.args.JsonSave(data_state)}
  args.update({k: ocp.args.JsonSave(v) for k, v in (extra or {}).items()})
  mngr.save(step, args=ocp.args.Composite(**args), force=True)
