"""Sampling: restore a checkpoint's (EMA) params, generate images sharded over the devices,
write PNG grids and uint8 .npz arrays.

Generation is one jitted call per batch shape: the whole sampler loop (diffusion.samplers.sample)
runs inside it, so a sampler and step count compile once.

`--mode sample` (run_sample_mode) does, from config.sampling fields:
  plain sampling       sampler, num_steps, eta, spacing, seed, num_samples
  class conditioning   class_label (-1 cycles through the classes) and guidance_scale w (classifier-
                       free guidance: 0 = unconditional, 1 = plain conditional, > 1 stronger)
  img2img (SDEdit)     init_image + strength: the input noised to the last int(strength * num_steps)
                       steps of the chain, then denoised; strength 0 returns the input
  inpainting           init_image + mask (white = known): the known pixels are replaced by their
                       forward-noised version after every step and kept exactly in the output;
                       resample > 1 adds RePaint's resampling
  super-resolution     image-conditional models: cond_image, or the dataset's low_res images
  cascade              cascade_base_workdir (+ cascade_base_config): the base model samples, its
                       samples downsampled to data.low_res_size condition this upsampler
Each writes samples/NAME.png (the outputs), samples/NAME.npz (uint8 outputs and inputs) and, where
there are inputs, samples/NAME_compare.png (input | mask | output, or condition | output).
"""

import json
import math
import os

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

import config_lib
from configs import default as default_config
import models
from data import preprocess
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


def make_comparison(columns, ncol=None, gap=12, min_tile=64):
  """Grids of several image sets side by side, e.g. [inputs, masks, outputs].

  Args:
    columns: uint8 arrays [N, H_k, W_k, C_k] with the same N; sizes may differ (each set is
      enlarged to tiles of about `min_tile` pixels) and C_k in (1, 3) (grey is repeated to RGB
      when the sets mix).
    ncol: tiles per grid row (default: about sqrt(N)).
    gap: grey pixels between the grids.
    min_tile: see make_grid.

  Returns:
    uint8 [H, W, C] image, image k of every set at the same place in its grid.
  """
  grids = [make_grid(c, ncol=ncol, min_tile=min_tile) for c in columns]
  channels = max(g.shape[-1] for g in grids)
  height = max(g.shape[0] for g in grids)
  parts = []
  for i, g in enumerate(grids):
    g = np.repeat(g, channels // g.shape[-1], axis=-1)
    g = np.pad(g, ((0, height - g.shape[0]), (0, 0), (0, 0)), constant_values=255)
    parts.append(g)
    if i < len(grids) - 1:
      parts.append(np.full((height, gap, channels), 128, np.uint8))
  return np.concatenate(parts, axis=1)


def _save_png(path, image):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
  return path


def write_grid(path, images, **kwargs):
  return _save_png(path, make_grid(images, **kwargs))


def write_comparison(path, columns, **kwargs):
  return _save_png(path, make_comparison(columns, **kwargs))


# ----------------------------------------------------------------------------- input images


def _read_arrays(path, field):
  """uint8 images [H, W, C] (C in 1..4) from an image file or an .npz/.npy of images."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'config.sampling.{field}: no file {path!r} (give a PNG/JPEG image or '
                            'an .npz of uint8 images [N, H, W, C])')
  if path.endswith(('.npz', '.npy')):
    loaded = np.load(path)
    if isinstance(loaded, np.ndarray):
      arr = loaded
    else:
      keys = list(loaded.keys())
      if not keys:
        raise config_lib.ConfigError(f'config.sampling.{field}: {path} holds no array')
      preferred = ('mask', 'masks') if field == 'mask' else ('images', 'image')
      key = next((k for k in preferred if k in keys), keys[0])
      arr = loaded[key]
    if arr.ndim == 2:
      arr = arr[None, :, :, None]
    elif arr.ndim == 3:  # [H, W, C] for a small last axis, else [N, H, W]
      arr = arr[None] if arr.shape[-1] <= 4 else arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] > 4:
      raise config_lib.ConfigError(f'config.sampling.{field}: {path} has shape {arr.shape}; '
                                   'expected images [N, H, W, C] with C in 1..4')
    if arr.dtype == np.bool_:
      arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
      lo, hi = float(arr.min()), float(arr.max())
      # Floats in [-1, 1] are the model's range; masks may come as {0, 1}.
      arr = (to_uint8(arr) if lo < 0 else
             np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8) if hi <= 1.0 else
             np.clip(np.round(arr), 0, 255).astype(np.uint8))
    elif arr.dtype != np.uint8:
      if arr.min() < 0 or arr.max() > 255:
        raise config_lib.ConfigError(f'config.sampling.{field}: {path} holds {arr.dtype} values '
                                     'outside [0, 255]')
      arr = arr.astype(np.uint8)
    return list(arr)
  try:
    with Image.open(path) as im:
      if im.mode not in ('L', 'LA', 'RGB', 'RGBA'):
        im = im.convert('RGBA' if 'A' in im.getbands() else 'RGB')
      arr = np.asarray(im)
  except OSError as e:
    raise config_lib.ConfigError(f'config.sampling.{field}: {path} is not a readable image '
                                 f'({e})') from e
  return [arr if arr.ndim == 3 else arr[:, :, None]]


def _fit(image, size, num_channels, resample):
  """Center square crop (non-square inputs only), channel conversion and resize to `size`."""
  crop = 'none' if image.shape[0] == image.shape[1] else 'center'
  image = preprocess.to_channels(preprocess.crop_image(image, crop), num_channels)
  return np.ascontiguousarray(preprocess.resize(image, size, resample=resample))


def load_images(path, size, num_channels, field='init_image'):
  """Reads input images, resized (bilinear, as the data pipeline) to the model's resolution.

  Args:
    path: a PNG/JPEG file (one image) or an .npz/.npy of images: uint8 [N, H, W, C] (or [N, H, W],
      [H, W, C], [H, W]), or floats in [-1, 1]. Non-square images are center-cropped first.
    size: output height and width in pixels.
    num_channels: 1 or 3 (RGB <-> grey converted as the data pipeline does).
    field: the config field named in error messages.

  Returns:
    uint8 [N, size, size, num_channels].

  Raises:
    FileNotFoundError: no such file.
    config_lib.ConfigError: an unreadable file or an array of an unusable shape.
  """
  return np.stack([_fit(a, size, num_channels, Image.BILINEAR)
                   for a in _read_arrays(path, field)])


def load_mask(path, size):
  """Reads inpainting masks: float32 [M, size, size, 1], 1 = known (kept), 0 = generated.

  A pixel is known where the (grey-converted) mask is >= 128, i.e. white; masks are resized with
  nearest-neighbour sampling so that they stay binary.
  """
  masks = [_fit(a, size, 1, Image.NEAREST) for a in _read_arrays(path, 'mask')]
  return (np.stack(masks) >= 128).astype(np.float32)


def _cycle(a, n):
  """Rows of `a` repeated cyclically to n rows."""
  return a[np.arange(n) % len(a)]


# ----------------------------------------------------------------------------- generation


def guided_model_fn(model, params, config, kwargs, guidance_scale):
  """model_fn(x_t, t) for the sampler, with classifier-free guidance for labelled models.

  out = out_uncond + w * (out_cond - out_uncond): w = 1 is the plain conditional model,
  w = 0 the unconditional one (null label), w > 1 strengthens the condition. Guidance combines
  the raw network outputs, whatever config.diffusion.prediction they are: at fixed x_t and t,
  x0 and v are affine functions of eps, and the weights (1 - w, w) sum to 1, so guiding 'eps',
  'x0' or 'v' outputs gives the same implied eps and x0.
  For w not in {0, 1} the conditional and unconditional passes run as one batch of twice the size.
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
              clip_x0=s.clip_x0, guidance_scale=s.guidance_scale, strength=s.strength,
              resample=s.resample,
              # Absent from configs saved before the field existed.
              use_clipped_model_output=s.get('use_clipped_model_output', False))
  opts.update({k: v for k, v in overrides.items() if v is not None})
  return opts


TASKS = ('sample', 'img2img', 'inpaint')


def make_generate_fn(config, model, schedule, mesh, *, sampler, num_steps, spacing, eta,
                     clip_x0, guidance_scale, task='sample', strength=None, resample=1,
                     use_clipped_model_output=False):
  """A jitted (params, rng, kwargs, batch_size, images, mask) -> images in [-1, 1].

  task 'sample' starts from N(0, I) and ignores images, mask, strength and resample;
  'img2img' starts from `images` noised to `strength` (SDEdit); 'inpaint' starts from noise and
  keeps `images` where mask = 1 (RePaint resampling when resample > 1). The batch is sharded on
  'data'; batch_size is static.
  """
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}')
  size, ch = config.data.image_size, config.data.num_channels
  batch_sharding = NamedSharding(mesh, P('data'))

  def generate(params, rng, kwargs, batch_size, images=None, mask=None):
    init_rng, loop_rng = jax.random.split(rng)
    model_fn = guided_model_fn(model, params, config, kwargs, guidance_scale)
    extra = {}
    if task == 'img2img':
      x_init = images
      extra['strength'] = strength
    else:
      x_init = jax.random.normal(init_rng, (batch_size, size, size, ch), jnp.float32)
      if task == 'inpaint':
        extra.update(inpaint=(images, mask), resample=resample)
    x_init = jax.lax.with_sharding_constraint(x_init, batch_sharding)
    return samplers.sample(schedule, model_fn, x_init, loop_rng, sampler=sampler,
                           num_steps=num_steps, spacing=spacing, eta=eta,
                           prediction=config.diffusion.prediction, clip_x0=clip_x0,
                           use_clipped_model_output=use_clipped_model_output, **extra)

  return jax.jit(generate, static_argnums=3, out_shardings=batch_sharding)


def class_labels(config, n, offset=0):
  """Labels to generate: config.sampling.class_label, or all classes in turn when -1."""
  if config.sampling.class_label >= 0:
    return np.full((n,), config.sampling.class_label, np.int32)
  return (np.arange(offset, offset + n) % config.model.num_classes).astype(np.int32)


def _put(mesh, value):
  """A host array holding the whole global batch -> a jax.Array sharded on 'data'."""
  sharding = NamedSharding(mesh, P('data'))
  if jax.process_count() > 1:  # every process holds the whole batch; each keeps its own rows
    return jax.make_array_from_process_local_data(sharding, value, value.shape)
  return jax.device_put(value, sharding)


def _batch_rows(a, i, bs):
  """Rows [i*bs, (i+1)*bs) of `a`, the last batch padded with copies of its last row."""
  c = np.asarray(a[i * bs:(i + 1) * bs])
  if len(c) < bs:  # the padding's samples are dropped by the caller
    c = np.concatenate([c, np.repeat(c[-1:], bs - len(c), 0)])
  return c


def generate(config, model, schedule, params, num_samples, *, seed, mesh=None, cond=None,
             labels=None, init_images=None, mask=None, **overrides):
  """Generates `num_samples` uint8 images [N, H, W, C] (identical on every process).

  Batches of config.sampling.batch_size are sharded over the mesh; batch i uses the key
  fold_in(PRNGKey(seed), i), so results do not depend on how many batches run.

  Args:
    config: the experiment config (model, data, diffusion and sampling groups).
    model, schedule, params: the network, its noise schedule and its params.
    num_samples: N.
    seed: sampling seed.
    mesh: device mesh with axis 'data' (default: all devices).
    cond: image-conditional models: float32 [N, h, w, C'] condition images in [-1, 1].
    labels: class-conditional models: int [N] labels (default: `class_labels(config, N)`).
    init_images: float32 [M, H, W, C] in [-1, 1], cycled to N rows: img2img (SDEdit) at
      config.sampling.strength, or with `mask` the known image of inpainting.
    mask: float32 [M', H, W, 1 or C], 1 = known, cycled to N rows: inpainting.
    **overrides: sampler options replacing config.sampling's (sampler, num_steps, spacing, eta,
      clip_x0, use_clipped_model_output, guidance_scale, strength, resample).

  Returns:
    uint8 [N, H, W, C].
  """
  from train_lib import make_mesh  # pylint: disable=g-import-not-at-top
  mesh = mesh or make_mesh()
  opts = sampler_options(config, **overrides)
  size, ch = config.data.image_size, config.data.num_channels
  task = 'sample'
  if mask is not None:
    if init_images is None:
      raise config_lib.ConfigError('inpainting (a mask) needs the known image: set '
                                   'config.sampling.init_image')
    task = 'inpaint'
  elif init_images is not None:
    task = 'img2img'
  if init_images is not None:
    init_images = np.asarray(init_images, np.float32)
    if init_images.shape[1:] != (size, size, ch):
      raise config_lib.ConfigError(f'input images of shape {init_images.shape[1:]} do not match '
                                   f'the model\'s images ({size}, {size}, {ch})')
    init_images = _cycle(init_images, num_samples)
  if mask is not None:
    mask = np.asarray(mask, np.float32)
    if mask.ndim != 4 or mask.shape[1:3] != (size, size) or mask.shape[3] not in (1, ch):
      raise config_lib.ConfigError(f'mask of shape {mask.shape} does not match the images '
                                   f'[N, {size}, {size}, 1 or {ch}]')
    mask = _cycle(mask, num_samples)
  if config.model.cond_channels > 0 and cond is None:
    raise ValueError('an image-conditional model (config.model.cond_channels > 0) needs '
                     'condition images')
  if labels is not None and len(labels) != num_samples:
    raise ValueError(f'{len(labels)} labels for {num_samples} samples')
  gen = make_generate_fn(config, model, schedule, mesh, task=task, **opts)
  bs = config.sampling.batch_size
  rng = jax.random.PRNGKey(seed)
  out = []
  for i in range(math.ceil(num_samples / bs)):
    kwargs = {}
    if config.model.num_classes > 0:
      kwargs['y'] = (class_labels(config, bs, i * bs) if labels is None else
                     _batch_rows(np.asarray(labels, np.int32), i, bs))
    if config.model.cond_channels > 0:
      kwargs['cond'] = _batch_rows(cond, i, bs)
    kwargs = {k: _put(mesh, v) for k, v in kwargs.items()}
    images = None if init_images is None else _put(mesh, _batch_rows(init_images, i, bs))
    m = None if mask is None else _put(mesh, _batch_rows(mask, i, bs))
    x = gen(params, jax.random.fold_in(rng, i), kwargs, bs, images, m)
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    out.append(to_uint8(jax.device_get(x)))
  return np.concatenate(out)[:num_samples]


def dataset_condition(config, n):
  """The low_res images of the first n examples of the dataset (float32 [n, s, s, C])."""
  import data as data_lib  # pylint: disable=g-import-not-at-top
  batch = next(data_lib.get_dataset(config, batch_size=n, process_index=0, process_count=1,
                                    shuffle=False))
  return batch['low_res']


def low_res_of(images_uint8, config):
  """Condition images for an upsampler from uint8 samples [N, H, W, C]: float32 [N, s, s, C].

  Downsampled (bicubic, antialiased) to config.data.low_res_size exactly as the data pipeline
  makes training's low_res images; images already at that size pass unchanged.
  """
  s = config.data.low_res_size or config.data.image_size
  return preprocess.to_float(np.stack([preprocess.downsample(im, s) for im in images_uint8]))


def sample_cascade(base_config, base_model, base_params, config, model, params, num_samples, *,
                   seed, mesh=None, **overrides):
  """Cascaded generation: the base model samples, then the upsampler refines them.

  The base samples (uint8, at base_config.data.image_size) are downsampled to the upsampler's
  config.data.low_res_size as in training and condition the upsampler. Both stages use `seed`.

  Args:
    base_config, base_model, base_params: the base model (its own sampling group applies).
    config, model, params: the image-conditional upsampler (config.model.cond_channels > 0).
    num_samples: N.
    seed: sampling seed.
    mesh: device mesh (default: all devices).
    **overrides: sampler options for the upsampler (see `generate`).

  Returns:
    (base uint8 [N, h, w, C], upsampled uint8 [N, H, W, C]) with H = config.data.image_size.
  """
  from train_lib import get_schedule  # pylint: disable=g-import-not-at-top
  _check_cascade(base_config, config)
  base = generate(base_config, base_model, get_schedule(base_config), base_params, num_samples,
                  seed=seed, mesh=mesh)
  out = generate(config, model, get_schedule(config), params, num_samples, seed=seed, mesh=mesh,
                 cond=low_res_of(base, config), **overrides)
  return base, out


def _check_cascade(base_config, config):
  if config.model.cond_channels == 0:
    raise config_lib.ConfigError('config.sampling.cascade_base_workdir is set but this model is '
                                 'not image-conditional (model.cond_channels = 0); use an '
                                 'upsampler config such as configs/digits_sr.py')
  if base_config.model.cond_channels > 0:
    raise config_lib.ConfigError('the cascade\'s base model is itself image-conditional; give an '
                                 'unconditional or class-conditional base')
  if base_config.data.num_channels != config.model.cond_channels:
    raise config_lib.ConfigError(
        f'the cascade\'s base makes {base_config.data.num_channels}-channel images but the '
        f'upsampler takes model.cond_channels = {config.model.cond_channels}')


def write_training_grid(config, model, schedule, params, workdir, step):
  """A grid of config.training.num_grid_samples EMA samples at `step` (process 0 writes)."""
  n = config.training.num_grid_samples
  cond = dataset_condition(config, n) if config.model.cond_channels > 0 else None
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
      # Explicit restore_args: without them Orbax takes the shardings recorded at save time,
      # which fail on another device count (e.g. trained on 8 devices, sampled on 1).
      restored = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={key: target}, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args({key: target}))))
      params = restored['state'][key]
      mngr.close()
      return s, params
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint at step %d cannot be read (%s: %s); trying an older one', s,
                      type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
  mngr.close()
  raise FileNotFoundError(f'no readable checkpoint in {directory} (tried steps {steps})')


def _config_from_dict(saved):
  """A run's saved config.json -> ConfigDict, on top of configs/default.py's fields.

  Fields added to default.py after the run was saved keep their defaults; JSON lists become the
  tuples the config declares.
  """
  config = default_config.get_config()

  def fill(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
        fill(node[key], value)
      else:
        node[key] = tuple(value) if isinstance(value, list) else value
  fill(config, saved)
  return config


def load_run_config(workdir):
  """The config a run was trained with, from WORKDIR/config.json (train_lib writes it)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no {path}: not a training workdir, or give the config file')
  with open(path) as f:
    return _config_from_dict(json.load(f))


def cascade_base_config(config):
  """The base model's config: config.sampling.cascade_base_config, else the base workdir's own.

  The base keeps its own sampling group except num_samples, batch_size, seed and class_label,
  which follow this (the upsampler's) config.
  """
  s = config.sampling
  if s.cascade_base_config:
    base = config_lib.load_config_file(s.cascade_base_config)
  else:
    try:
      base = load_run_config(s.cascade_base_workdir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'config.sampling.cascade_base_workdir: {e}; or set '
                              'config.sampling.cascade_base_config') from e
  for field in ('num_samples', 'batch_size', 'seed', 'class_label'):
    base.sampling[field] = s[field]
  return base


def _check_sampling_fields(config):
  s = config.sampling
  if not 0.0 <= s.strength <= 1.0:
    raise config_lib.ConfigError(f'config.sampling.strength: must be in [0, 1], got {s.strength}')
  if s.resample < 1:
    raise config_lib.ConfigError(f'config.sampling.resample: must be >= 1, got {s.resample}')
  if s.mask and not s.init_image:
    raise config_lib.ConfigError('config.sampling.mask needs config.sampling.init_image (the '
                                 'image whose white-masked pixels are kept)')
  if s.cascade_base_workdir and (s.init_image or s.cond_image):
    raise config_lib.ConfigError('config.sampling.cascade_base_workdir makes its own condition '
                                 'images; leave sampling.init_image and sampling.cond_image empty')
  if s.cascade_base_config and not s.cascade_base_workdir:
    raise config_lib.ConfigError('config.sampling.cascade_base_config needs '
                                 'config.sampling.cascade_base_workdir (the base\'s checkpoints)')
  if s.cond_image and config.model.cond_channels == 0:
    raise config_lib.ConfigError('config.sampling.cond_image is set but the model is not '
                                 'image-conditional (model.cond_channels = 0)')


def run_sample_mode(config, workdir):
  """--mode sample: restore, generate config.sampling.num_samples, write grids and an .npz.

  Returns the uint8 samples [num_samples, H, W, C].
  """
  from train_lib import get_schedule  # pylint: disable=g-import-not-at-top
  s = config.sampling
  _check_sampling_fields(config)
  n = s.num_samples
  model = models.create_model(config)
  step, params = restore_params(config, workdir, step=s.checkpoint_step, use_ema=s.use_ema,
                                model=model)
  name = f'step_{step:07d}_{s.sampler}_{s.num_steps}steps_eta{s.eta:g}_seed{s.seed}'
  # Non-default clipping changes the samples: keep such runs from overwriting the default's files.
  if not s.clip_x0:
    name += '_noclip'
  if sampler_options(config)['use_clipped_model_output']:
    name += '_clippedeps'
  if config.model.num_classes > 0:
    name += f'_w{s.guidance_scale:g}'
    if s.class_label >= 0:
      name += f'_class{s.class_label}'
  arrays, columns = {}, []  # inputs saved in the .npz, and shown left of the outputs

  if s.cascade_base_workdir:
    base_config = cascade_base_config(config)
    base_model = models.create_model(base_config)
    _, base_params = restore_params(base_config, s.cascade_base_workdir,
                                    use_ema=base_config.sampling.use_ema, model=base_model)
    base, images = sample_cascade(base_config, base_model, base_params, config, model, params, n,
                                  seed=s.seed)
    arrays['base'] = base
    columns.append(base)
    name += '_cascade'
  else:
    kwargs = {}
    if config.model.cond_channels > 0:
      low = config.data.low_res_size or config.data.image_size
      if s.cond_image:
        cond_u8 = _cycle(load_images(s.cond_image, low, config.model.cond_channels, 'cond_image'),
                         n)
        cond = preprocess.to_float(cond_u8)
      else:
        cond = dataset_condition(config, n)
        cond_u8 = to_uint8(cond)
      kwargs['cond'] = cond
      arrays['cond'] = cond_u8
      columns.append(cond_u8)
    if s.init_image:
      inputs = load_images(s.init_image, config.data.image_size, config.data.num_channels)
      mask = load_mask(s.mask, config.data.image_size) if s.mask else None
      if mask is not None and len(mask) not in (1, len(inputs)):
        raise config_lib.ConfigError(f'config.sampling.mask holds {len(mask)} masks for the '
                                     f'{len(inputs)} input images; give one mask or one each')
      inputs = _cycle(inputs, n)
      kwargs['init_images'] = preprocess.to_float(inputs)
      arrays['inputs'] = inputs
      columns.append(inputs)
      if mask is not None:
        kwargs['mask'] = _cycle(mask, n)
        arrays['mask'] = (kwargs['mask'] * 255).astype(np.uint8)
        columns.append(arrays['mask'])
        name += '_inpaint' + (f'_resample{s.resample}' if s.resample > 1 else '')
      else:
        name += f'_img2img_strength{s.strength:g}'
    images = generate(config, model, get_schedule(config), params, n, seed=s.seed, **kwargs)

  if config.model.num_classes > 0:
    arrays['labels'] = class_labels(config, n)
  out_dir = os.path.join(workdir, 'samples')
  if jax.process_index() == 0:
    png = write_grid(os.path.join(out_dir, name + '.png'), images)
    npz = os.path.join(out_dir, name + '.npz')
    np.savez_compressed(npz, images=images, **arrays)
    logging.info('wrote %s and %s (%d images)', png, npz, len(images))
    if columns:
      cmp_png = write_comparison(os.path.join(out_dir, name + '_compare.png'),
                                 columns + [images])
      logging.info('wrote %s (inputs left of the outputs)', cmp_png)
  return images
