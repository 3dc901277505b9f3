"""Sampling: generate images from a run's (EMA) params, sharded over the devices; `--mode sample`;
the training-grid hook.

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
                       (latent diffusion: both in latent space, see compile_sampler; strength 0
                       returns decode(encode(input)), inpainting keeps the known latents)
  super-resolution     image-conditional models: cond_image, or the dataset's low_res images
  text-to-image        text models: prompt, or prompts_file (one per line), or the dataset's
                       captions; guidance_scale, negative_prompt; the grid prints each prompt
                       under its image and the .npz keeps them ('prompts')
  cascade              cascade_base_workdir (+ cascade_base_config): the base model samples, its
                       samples downsampled to data.low_res_size condition this upsampler
Each writes samples/NAME.png (the outputs), samples/NAME.npz (uint8 outputs and inputs) and, where
there are inputs, samples/NAME_compare.png (input | mask | output, or condition | output).
"""

import math
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import captions
import conditioning
import config_lib
import experiment
import image_io
import latent_space
import models
import progress
import sharding
from data import preprocess
from diffusion import edm
from diffusion import samplers

TASKS = ('sample', 'img2img', 'inpaint')


def sampler_options(config, **overrides):
  """The sampler's options from config.sampling, with `overrides` (None = keep) applied."""
  s = config.sampling
  opts = dict(sampler=s.sampler, num_steps=s.num_steps, spacing=s.spacing, eta=s.eta,
              clip_x0=s.clip_x0, guidance_scale=s.guidance_scale, strength=s.strength,
              resample=s.resample, use_clipped_model_output=s.use_clipped_model_output,
              churn=samplers.Churn(s.s_churn, s.s_tmin, s.s_tmax, s.s_noise))
  opts.update({k: v for k, v in overrides.items() if v is not None})
  return opts


def compile_sampler(config, model, schedule, conditioner, mesh, *, sampler, num_steps, spacing,
                    eta, clip_x0, guidance_scale, task='sample', strength=None, resample=1,
                    use_clipped_model_output=False, churn=samplers.Churn(), latent=None):
  """A jitted (params, rng, conds, batch_size, images, mask) -> images in [-1, 1].

  With `latent` (latent_space.LatentSpace) the sampler runs on latents and the result is decoded;
  the autoencoder's params enter the compiled program as an argument, not as constants. The
  inputs stay pixels (`images` [B, H, W, C], `mask` [B, H, W, 1 or C]): img2img and inpainting
  encode `images` to their posterior mean (latent_space.LatentSpace.encode_mean) and inpainting
  keeps the latent cells that latent_space.latent_mask (min-pool) calls known; the known pixels
  come back through the decoder, close to the input but not equal to it.

  task 'sample' starts from N(0, I) and ignores images, mask, strength and resample;
  'img2img' starts from `images` noised to `strength` (SDEdit); 'inpaint' starts from noise and
  keeps `images` where mask = 1 (RePaint resampling when resample > 1). The batch is sharded on
  'data'; batch_size is static. `conds` is the model's condition dict (conditioning.py); with
  guidance_scale != 1 its guided conditions are guided, against `null_conds` when given (a
  negative prompt) or their null values.
  """
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}')
  shape = tuple(models.input_shape(config))
  rows = sharding.batch_sharding(mesh)

  def generate_batch(params, ae_params, rng, conds, batch_size, images=None, mask=None,
                     null_conds=None):
    init_rng, loop_rng = jax.random.split(rng)
    apply = lambda x, t, **c: models.prediction(
        config, model.apply({'params': params}, x, t, train=False, **c))
    model_fn = conditioning.guided_model_fn(apply, conditioner, conds, guidance_scale,
                                            null_conds)
    extra = {}
    if latent is not None and task != 'sample':
      images = latent.encode_mean(ae_params, images)  # [B, h, w, L]
      if task == 'inpaint':
        mask = latent_space.latent_mask(mask, config.latent.factor)  # [B, h, w, 1]
    if task == 'img2img':
      x_init = images
      extra['strength'] = strength
    else:
      x_init = jax.random.normal(init_rng, (batch_size,) + shape, jnp.float32)
      if task == 'inpaint':
        extra.update(inpaint=(images, mask), resample=resample)
    x_init = jax.lax.with_sharding_constraint(x_init, rows)
    # Either formulation on any sampler: an EDM model reaches samplers.py's through the VP
    # bridge, and sampler 'edm' (EDM's Heun) takes a DDPM model through it the other way.
    d, s = config.diffusion, config.sampling
    x = edm.sample_model(schedule, model_fn, x_init, loop_rng, formulation=d.formulation,
                         sampler=sampler, num_steps=num_steps, spacing=spacing, eta=eta,
                         prediction=d.prediction, clip_x0=clip_x0,
                         use_clipped_model_output=use_clipped_model_output, churn=churn,
                         sigma_data=d.sigma_data, sigma_min=s.sigma_min, sigma_max=s.sigma_max,
                         rho=s.rho, **extra)
    return x if latent is None else latent.decode(ae_params, x)

  gen = jax.jit(generate_batch, static_argnums=4, out_shardings=rows)
  ae_params = None if latent is None else jax.device_put(latent.params,
                                                          sharding.replicated(mesh))

  def generate(params, rng, conds, batch_size, images=None, mask=None, null_conds=None):
    return gen(params, ae_params, rng, conds, batch_size, images, mask, null_conds)
  # For ahead-of-time lowering (bench/sampling.py): the jitted function and its ae_params.
  generate.jitted, generate.ae_params = gen, ae_params
  return generate


def _cycle(a, n):
  """Rows of `a` repeated cyclically to n rows."""
  return a[np.arange(n) % len(a)]


def _batch_rows(a, i, bs):
  """Rows [i*bs, (i+1)*bs) of `a`, the last batch padded with copies of its last row."""
  return sharding.pad_rows(a[i * bs:(i + 1) * bs], bs)  # the caller drops the padding


def default_conds(config, n, *, cond=None, labels=None):
  """The host-side condition arrays for n samples, by model keyword ({} for unconditional).

  Labels default to `conditioning.sampling_labels`; an image-conditional model needs `cond`.
  """
  out = {}
  if config.model.num_classes > 0:
    out['y'] = conditioning.sampling_labels(config, n) if labels is None else np.asarray(
        labels, np.int32)
    if len(out['y']) != n:
      raise ValueError(f'{len(out["y"])} labels for {n} samples')
  if config.model.cond_channels > 0:
    if cond is None:
      raise ValueError('an image-conditional model (config.model.cond_channels > 0) needs '
                       'condition images')
    out['cond'] = cond
  return out


def text_conditions(config, n, prompts=None):
  """A text model's conditions for n samples: (prompts, conds, conditioner, null_conds).

  prompts default to captions.sampling_prompts (sampling.prompt / prompts_file / the dataset's
  captions); conds holds their token states; null_conds is the negative prompt's
  (config.sampling.negative_prompt) or None for the empty prompt's.
  """
  encoder = captions.load_encoder(config)
  prompts = list(prompts) if prompts is not None else captions.sampling_prompts(config, n)
  if len(prompts) != n:
    raise ValueError(f'{len(prompts)} prompts for {n} samples')
  conds = default_conds(config, n)
  conds.update(captions.conds(config, encoder, prompts))
  conditioner = experiment.conditioner(config, captions.null(config, encoder))
  null_conds = None
  negative = config.sampling.negative_prompt
  if negative:
    null_conds = conditioner.null(conds)  # labels etc. at their null values
    null_conds.update(captions.conds(config, encoder, [negative] * n))
  return prompts, conds, conditioner, null_conds


def is_text_model(config):
  return config.model.get('context_dim', 0) > 0


def sample_images(config, model, schedule, params, num_samples, *, seed, mesh=None, cond=None,
                  labels=None, conds=None, conditioner=None, init_images=None, mask=None,
                  stop=None, what='sampling', latent=None, prompts=None, null_conds=None,
                  **overrides):
  """Generates `num_samples` uint8 images [N, H, W, C] (identical on every process).

  Batches of config.sampling.batch_size are sharded over the mesh; batch i uses the key
  fold_in(PRNGKey(seed), i), so results do not depend on how many batches run. A progress line
  (done/total, rate, ETA) is logged at least every 30 s; `stop()` is asked between batches.

  Args:
    config: the experiment config (model, data, diffusion and sampling groups).
    model, schedule, params: the network, its noise schedule and its params.
    num_samples: N.
    seed: sampling seed.
    mesh: device mesh with axis 'data' (default: all devices).
    cond: image-conditional models: float32 [N, h, w, C'] condition images in [-1, 1].
    labels: class-conditional models: int [N] labels (default: `conditioning.sampling_labels`).
    conds: the whole condition dict {model keyword: host array [N, ...]} (instead of cond and
      labels), e.g. text states.
    conditioner: the model's Conditioner (default: from the config).
    prompts: text models: N prompts (default: `text_conditions`'s), encoded here unless conds
      is given.
    null_conds: the unconditional side of guidance (default: the null conditions), e.g. a
      negative prompt's states.
    init_images: float32 [M, H, W, C] in [-1, 1], cycled to N rows: img2img (SDEdit) at
      config.sampling.strength, or with `mask` the known image of inpainting.
    mask: float32 [M', H, W, 1 or C], 1 = known, cycled to N rows: inpainting.
    stop: () -> bool, asked between batches; True raises progress.Interrupted.
    what: the progress line's label.
    latent: the LatentSpace of a latent diffusion model (default: loaded from config.latent).
    **overrides: sampler options replacing config.sampling's (sampler, num_steps, spacing, eta,
      clip_x0, use_clipped_model_output, guidance_scale, strength, resample).

  Returns:
    uint8 [N, H, W, C].
  """
  mesh = mesh or sharding.make_mesh()
  if is_text_model(config) and conds is None:
    _, conds, text_conditioner, text_null = text_conditions(config, num_samples, prompts)
    conditioner = conditioner or text_conditioner
    null_conds = text_null if null_conds is None else null_conds
  conditioner = conditioner or experiment.conditioner(config)
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
      raise config_lib.ConfigError(f'config.sampling.init_image: input images of shape '
                                   f'{init_images.shape[1:]} do not match the model\'s images '
                                   f'({size}, {size}, {ch}) (data.image_size, num_channels)')
    init_images = _cycle(init_images, num_samples)
  if mask is not None:
    mask = np.asarray(mask, np.float32)
    if mask.ndim != 4 or mask.shape[1:3] != (size, size) or mask.shape[3] not in (1, ch):
      raise config_lib.ConfigError(f'config.sampling.mask: mask of shape {mask.shape} does not '
                                   f'match the images [N, {size}, {size}, 1 or {ch}]')
    mask = _cycle(mask, num_samples)
  if conds is None:
    conds = default_conds(config, num_samples, cond=cond, labels=labels)
  if latent is None and config.latent.autoencoder:
    latent = latent_space.load(config)
  gen = compile_sampler(config, model, schedule, conditioner, mesh, task=task, latent=latent,
                        **opts)
  bs = config.sampling.batch_size
  rng = jax.random.PRNGKey(seed)
  tracker = progress.Progress(what, num_samples, stop=stop)
  tracker.check_stop()
  out = []
  for i in range(math.ceil(num_samples / bs)):
    batch_conds = {k: sharding.from_global_rows(mesh, _batch_rows(v, i, bs))
                   for k, v in conds.items()}
    images = (None if init_images is None else
              sharding.from_global_rows(mesh, _batch_rows(init_images, i, bs)))
    m = None if mask is None else sharding.from_global_rows(mesh, _batch_rows(mask, i, bs))
    batch_null = None if null_conds is None else {
        k: sharding.from_global_rows(mesh, _batch_rows(v, i, bs)) for k, v in null_conds.items()}
    x = gen(params, jax.random.fold_in(rng, i), batch_conds, bs, images, m, batch_null)
    out.append(preprocess.to_uint8(sharding.to_host(x)))
    tracker.update(min(bs, num_samples - i * bs))
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
                   seed, mesh=None, stop=None, **overrides):
  """Cascaded generation: the base model samples, then the upsampler refines them.

  The base samples (uint8, at base_config.data.image_size) are downsampled to the upsampler's
  config.data.low_res_size as in training and condition the upsampler. Both stages use `seed`.

  Args:
    base_config, base_model, base_params: the base model (its own sampling group applies).
    config, model, params: the image-conditional upsampler (config.model.cond_channels > 0).
    num_samples: N.
    seed: sampling seed.
    mesh: device mesh (default: all devices).
    stop: see `sample_images`.
    **overrides: sampler options for the upsampler (see `sample_images`).

  Returns:
    (base uint8 [N, h, w, C], upsampled uint8 [N, H, W, C]) with H = config.data.image_size.
  """
  config_lib.check_cascade(base_config, config)
  base = sample_images(base_config, base_model, experiment.schedule(base_config), base_params,
                       num_samples, seed=seed, mesh=mesh, stop=stop, what='cascade base')
  out = sample_images(config, model, experiment.schedule(config), params, num_samples, seed=seed,
                      mesh=mesh, cond=low_res_of(base, config), stop=stop,
                      what='cascade upsampler', **overrides)
  return base, out


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
      base = config_lib.load_run_config(s.cascade_base_workdir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'config.sampling.cascade_base_workdir: {e}; or set '
                              'config.sampling.cascade_base_config') from e
  for field in ('num_samples', 'batch_size', 'seed', 'class_label'):
    base.sampling[field] = s[field]
  return base


class GridHook:
  """Training hook: a grid of training.num_grid_samples EMA samples every training.sample_every
  steps (and at the end), written to WORKDIR/samples/train_step_STEP.png by process 0 and
  returned for TensorBoard."""

  name = 'sample_grid'

  def __init__(self, config, workdir, latent=None):
    self.config, self.workdir = config, workdir
    self.every = config.training.sample_every
    self._model = experiment.model(config)
    self._schedule = experiment.schedule(config)
    # Loaded once, not at every grid (or given by training_hooks, shared with the FID hook).
    self._latent = latent if latent is not None else latent_space.for_run(config, workdir)
    self._prompt_list = None

  def _prompts(self):
    """A text model's grid prompts (the same at every step), None otherwise."""
    if not is_text_model(self.config):
      return None
    if self._prompt_list is None:
      self._prompt_list = captions.sampling_prompts(self.config,
                                                    self.config.training.num_grid_samples)
    return self._prompt_list

  def __call__(self, step, ema_params, stop=None):
    config = self.config
    n = config.training.num_grid_samples
    cond = dataset_condition(config, n) if config.model.cond_channels > 0 else None
    prompts = self._prompts()
    images = sample_images(config, self._model, self._schedule, ema_params, n,
                           seed=config.sampling.seed, cond=cond, stop=stop,
                           what=f'sample grid at step {step}', latent=self._latent,
                           prompts=prompts)
    grid = (image_io.make_grid(images) if prompts is None else
            image_io.make_captioned_grid(images, prompts))
    name = os.path.join('samples', f'train_step_{step:07d}.png')
    if jax.process_index() == 0:
      path = image_io.save_png(os.path.join(self.workdir, name), grid)
      logging.info('wrote %s', path)
    return {'samples': (grid, name)}


# ----------------------------------------------------------------------------- --mode sample


def output_name(config, step):
  """The file name stem of --mode sample's outputs: every setting that changes the images.
  step None: the weights of config.model.pretrained ('pretrained_...')."""
  s = config.sampling
  name = 'pretrained' if step is None else f'step_{step:07d}'
  name += f'_{s.sampler}_{s.num_steps}steps_eta{s.eta:g}_seed{s.seed}'
  if s.spacing != 'auto':
    name += f'_{s.spacing}'
  # Non-default clipping changes the samples: keep such runs from overwriting the default's files.
  if not s.clip_x0:
    name += '_noclip'
  if s.use_clipped_model_output:
    name += '_clippedeps'
  if config.model.num_classes > 0 or is_text_model(config):
    name += f'_w{s.guidance_scale:g}'
  if config.model.num_classes > 0 and s.class_label >= 0:
    name += f'_class{s.class_label}'
  if is_text_model(config):
    name += _prompt_tag(s)
  return name


def _slug(text, limit=40):
  """File-name-safe form of a prompt: words joined by '-', at most `limit` characters."""
  words = ''.join(c.lower() if c.isalnum() else ' ' for c in text).split()
  return '-'.join(words)[:limit] or 'empty'


def _prompt_tag(s):
  """The prompts' part of an output name: the prompt itself, or the prompts file's name, with a
  short hash so that two prompts sharing their first words do not share a file."""
  import hashlib  # pylint: disable=g-import-not-at-top
  if s.prompt:
    text, tag = s.prompt, '_' + _slug(s.prompt)
  elif s.prompts_file:
    text = s.prompts_file
    tag = '_' + _slug(os.path.splitext(os.path.basename(s.prompts_file))[0])
  else:
    return '_captions' + (f'_neg-{_slug(s.negative_prompt, 20)}' if s.negative_prompt else '')
  if s.negative_prompt:
    text += '\0' + s.negative_prompt
    tag += f'_neg-{_slug(s.negative_prompt, 20)}'
  return tag + '_' + hashlib.sha1(text.encode()).hexdigest()[:6]


def run_sample_mode(config, workdir, stop=None):
  """--mode sample: restore, generate config.sampling.num_samples, write grids and an .npz.

  The params are the workdir's newest checkpoint (or sampling.checkpoint_step's); with
  config.model.pretrained and no checkpoint yet, the folder's U-Net (experiment.sampling_params).

  Returns the uint8 samples [num_samples, H, W, C].
  """
  s = config.sampling
  n = s.num_samples
  model = experiment.model(config)
  step, params = experiment.sampling_params(config, workdir, step=s.checkpoint_step,
                                            use_ema=s.use_ema, module=model)
  name = output_name(config, step)
  arrays, columns = {}, []  # inputs saved in the .npz, and shown left of the outputs

  if s.cascade_base_workdir:
    base_config = cascade_base_config(config)
    base_model = experiment.model(base_config)
    _, base_params = experiment.restore_params(base_config, s.cascade_base_workdir,
                                               use_ema=base_config.sampling.use_ema,
                                               module=base_model)
    base, images = sample_cascade(base_config, base_model, base_params, config, model, params, n,
                                  seed=s.seed, stop=stop)
    arrays['base'] = base
    columns.append(base)
    name += '_cascade'
  else:
    kwargs = {}
    if config.model.cond_channels > 0:
      low = config.data.low_res_size or config.data.image_size
      if s.cond_image:
        cond_u8 = _cycle(image_io.load_images(s.cond_image, low, config.model.cond_channels,
                                              'cond_image'), n)
        cond = preprocess.to_float(cond_u8)
      else:
        cond = dataset_condition(config, n)
        cond_u8 = preprocess.to_uint8(cond)
      kwargs['cond'] = cond
      arrays['cond'] = cond_u8
      columns.append(cond_u8)
    if s.init_image:
      inputs = image_io.load_images(s.init_image, config.data.image_size,
                                    config.data.num_channels)
      mask = image_io.load_mask(s.mask, config.data.image_size) if s.mask else None
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
    if is_text_model(config):
      kwargs['prompts'] = captions.sampling_prompts(config, n)
      arrays['prompts'] = np.asarray(kwargs['prompts'])
      if s.negative_prompt:
        arrays['negative_prompt'] = np.asarray(s.negative_prompt)
    # The workdir's own latent space: with latent.scale_by_std, the scale that run saved.
    images = sample_images(config, model, experiment.schedule(config), params, n, seed=s.seed,
                           stop=stop, latent=latent_space.load(config, workdir), **kwargs)

  if config.model.num_classes > 0:
    arrays['labels'] = conditioning.sampling_labels(config, n)
  out_dir = os.path.join(workdir, 'samples')
  if jax.process_index() == 0:
    if 'prompts' in arrays:  # each image with its prompt under it
      png = image_io.write_captioned_grid(os.path.join(out_dir, name + '.png'), images,
                                          list(arrays['prompts']))
    else:
      png = image_io.write_grid(os.path.join(out_dir, name + '.png'), images)
    npz = os.path.join(out_dir, name + '.npz')
    np.savez_compressed(npz, images=images, **arrays)
    logging.info('wrote %s and %s (%d images)', png, npz, len(images))
    if columns:
      cmp_png = image_io.write_comparison(os.path.join(out_dir, name + '_compare.png'),
                                          columns + [images])
      logging.info('wrote %s (inputs left of the outputs)', cmp_png)
  return images
