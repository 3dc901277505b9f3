"""Sampling: restore a checkpoint's (EMA) params, generate images sharded over the devices,
write PNG grids and uint8 .npz arrays.

Generation is one jitted call per batch shape: the whole sampler loop (diffusion.samplers.sample)
runs inside it, so a sampler and step count compile once.
"""

import math
import os

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

import models
from diffusion import samplers
from evaluation.fid import to_uint8


def make_grid(images, ncol=None, pad=2, min_tile=64):
  """uint8 [N, H, W, C] -> one uint8 [rows*(H'+pad)+pad, cols*(W'+pad)+pad, C] grid image.

  Tiles smaller than `min_tile` pixels are enlarged (nearest) so that a person can see them.
  """
  images = np.asarray(images)
  n, h, w, c = images.shape
  scale = max(1, math.ceil(min_tile / max(h, w)))
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  ncol = ncol or math.ceil(math.sqrt(n))
  nrow = math.ceil(n / ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = (
        images[i])
  return grid


def write_grid(path, images, **kwargs):
  grid = make_grid(images, **kwargs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def guided_model_fn(model, params, config, kwargs, guidance_scale):
  """model_fn(x_t, t) for the sampler, with classifier-free guidance for labelled models.

  out = out_uncond + w * (out_cond - out_uncond): w = 1 is the plain conditional model,
  w = 0 the unconditional one (null label), w > 1 strengthens the condition.
  """
  def apply(x_t, t, **kw):
    return model.apply({'params': params}, x_t, t, train=False, **kw)

  num_classes = config.model.num_classes
  if num_classes == 0 or 'y' not in kwargs or guidance_scale == 1.0:
    return lambda x_t, t: apply(x_t, t, **kwargs)
  null = dict(kwargs, y=jnp.full_like(kwargs['y'], num_classes))
  if guidance_scale == 0.0:
    return lambda x_t, t: apply(x_t, t, **null)

  def model_fn(x_t, t):
    both = {k: jnp.concatenate([v, null[k]]) for k, v in kwargs.items()}
    out = apply(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), **both)
    cond, uncond = jnp.split(out, 2)
    return uncond + guidance_scale * (cond - uncond)
  return model_fn


def sampler_options(config, **overrides):
  s = config.sampling
  opts = dict(sampler=s.sampler, num_steps=s.num_steps, spacing=s.spacing, eta=s.eta,
              clip_x0=s.clip_x0, guidance_scale=s.guidance_scale)
  opts.update({k: v for k, v in overrides.items() if v is not None})
  return opts


def make_generate_fn(config, model, schedule, mesh, *, sampler, num_steps, spacing, eta,
                     clip_x0, guidance_scale):
  """A jitted (params, rng, kwargs) -> images in [-1, 1], batch sharded on 'data'."""
  size, ch = config.data.image_size, config.data.num_channels
  batch_sharding = NamedSharding(mesh, P('data'))

  def generate(params, rng, kwargs, batch_size):
    init_rng, loop_rng = jax.random.split(rng)
    x_init = jax.random.normal(init_rng, (batch_size, size, size, ch), jnp.float32)
    x_init = jax.lax.with_sharding_constraint(x_init, batch_sharding)
    model_fn = guided_model_fn(model, params, config, kwargs, guidance_scale)
    return samplers.sample(schedule, model_fn, x_init, loop_rng, sampler=sampler,
                           num_steps=num_steps, spacing=spacing, eta=eta,
                           prediction=config.diffusion.prediction, clip_x0=clip_x0)

  return jax.jit(generate, static_argnums=3, out_shardings=batch_sharding)


def class_labels(config, n, offset=0):
  """Labels to generate: config.sampling.class_label, or all classes in turn when -1."""
  if config.sampling.class_label >= 0:
    return np.full((n,), config.sampling.class_label, np.int32)
  return (np.arange(offset, offset + n) % config.model.num_classes).astype(np.int32)


def generate(config, model, schedule, params, num_samples, *, seed, mesh=None, cond=None,
             **overrides):
  """Generates `num_samples` uint8 images [N, H, W, C] (identical on every process).

  Batches of config.sampling.batch_size are sharded over the mesh; batch i uses the key
  fold_in(PRNGKey(seed), i), so results do not depend on how many batches run.
  cond: for image-conditional models, float32 [N, h, w, C'] condition images in [-1, 1].
  """
  from train_lib import make_mesh  # pylint: disable=g-import-not-at-top
  mesh = mesh or make_mesh()
  opts = sampler_options(config, **overrides)
  gen = make_generate_fn(config, model, schedule, mesh, **opts)
  bs = config.sampling.batch_size
  rng = jax.random.PRNGKey(seed)
  out = []
  for i in range(math.ceil(num_samples / bs)):
    kwargs = {}
    if config.model.num_classes > 0:
      kwargs['y'] = class_labels(config, bs, i * bs)
    if config.model.cond_channels > 0:
      if cond is None:
        raise ValueError('an image-conditional model (config.model.cond_channels > 0) needs '
                         'condition images')
      c = np.asarray(cond[i * bs:(i + 1) * bs])
      if len(c) < bs:  # pad the last batch; the padding's samples are dropped below
        c = np.concatenate([c, np.repeat(c[-1:], bs - len(c), 0)])
      kwargs['cond'] = c
    sharding = NamedSharding(mesh, P('data'))
    kwargs = {k: jax.make_array_from_process_local_data(sharding, v) if jax.process_count() > 1
              else jax.device_put(v, sharding) for k, v in kwargs.items()}
    x = gen(params, jax.random.fold_in(rng, i), kwargs, bs)
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    out.append(to_uint8(jax.device_get(x)))
  return np.concatenate(out)[:num_samples]


def write_training_grid(config, model, schedule, params, workdir, step):
  """A grid of config.training.num_grid_samples EMA samples at `step` (process 0 writes)."""
  n = config.training.num_grid_samples
  cond = None
  if config.model.cond_channels > 0:
    import data as data_lib  # pylint: disable=g-import-not-at-top
    batch = next(data_lib.get_dataset(config, batch_size=n, process_index=0, process_count=1,
                                      shuffle=False))
    cond = batch['low_res']
  images = generate(config, model, schedule, params, n, seed=config.sampling.seed, cond=cond)
  if jax.process_index() == 0:
    path = write_grid(os.path.join(workdir, 'samples', f'train_step_{step:07d}.png'), images)
    logging.info('wrote %s', path)


# ----------------------------------------------------------------------------- --mode sample


def restore_params(config, workdir, *, step=-1, use_ema=True, model=None):
  """Reads one checkpoint's params (EMA by default) without the optimizer state.

  Falls back from a checkpoint that cannot be read to the previous one, with a warning.
  Returns (step, params).
  """
  from train_lib import make_mesh  # pylint: disable=g-import-not-at-top
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}: train first with --mode train '
                            'and the same --workdir')
  if step >= 0:
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint at step {step} in {directory}; '
                              f'available steps: {sorted(steps)}')
    steps = [step]
  model = model or models.create_model(config)
  shapes = jax.eval_shape(lambda: models.init_params(model, config, jax.random.PRNGKey(0)))
  replicated = NamedSharding(make_mesh(), P())
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        shapes)
  key = 'ema_params' if use_ema else 'params'
  for s in steps:
    try:
      restored = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={key: target}, partial_restore=True)))
      params = restored['state'][key]
      mngr.close()
      return s, params
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint at step %d cannot be read (%s: %s); trying an older one', s,
                      type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
  mngr.close()
  raise FileNotFoundError(f'no readable checkpoint in {directory} (tried steps {steps})')


def run_sample_mode(config, workdir):
  """--mode sample: restore, generate config.sampling.num_samples, write a grid and an .npz."""
  from train_lib import get_schedule  # pylint: disable=g-import-not-at-top
  s = config.sampling
  model = models.create_model(config)
  step, params = restore_params(config, workdir, step=s.checkpoint_step, use_ema=s.use_ema,
                                model=model)
  cond = None
  if config.model.cond_channels > 0:
    import data as data_lib  # pylint: disable=g-import-not-at-top
    batch = next(data_lib.get_dataset(config, batch_size=s.num_samples, process_index=0,
                                      process_count=1, shuffle=False))
    cond = batch['low_res']
  images = generate(config, model, get_schedule(config), params, s.num_samples, seed=s.seed,
                    cond=cond)
  name = f'step_{step:07d}_{s.sampler}_{s.num_steps}steps_eta{s.eta:g}_seed{s.seed}'
  if config.model.num_classes > 0:
    name += f'_w{s.guidance_scale:g}'
  out_dir = os.path.join(workdir, 'samples')
  if jax.process_index() == 0:
    png = write_grid(os.path.join(out_dir, name + '.png'), images)
    npz = os.path.join(out_dir, name + '.npz')
    np.savez_compressed(npz, images=images)
    logging.info('wrote %s and %s (%d images)', png, npz, len(images))
  return images
