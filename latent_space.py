"""Latent diffusion (Rombach et al. 2022): a frozen KL autoencoder between pixels and the model.

With config.latent.autoencoder set to a diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema) or
the workdir of an autoencoder trained here (model.name = 'autoencoder'), training encodes each
batch's images to z = (posterior sample - shift) * scale before the train step, and sampling
decodes z / scale + shift after the sampler; the diffusion model, its schedule, the trainer and
the samplers see latents only and do not change. The scale is the folder's (or the trained
run's autoencoder.) scaling_factor (SD: 0.18215), or config.latent.scale_factor, or with
config.latent.scale_by_std LDM's 1 / std of the first training batch's latents, fitted once at
the start of a fresh run (`for_run`) and kept in WORKDIR/latent_scale.json for the rest of the
run, its resumptions, and --mode sample / eval of that workdir.

img2img and inpainting run in latent space too: the input is encoded to its posterior mean, and
a pixel mask becomes a latent one by `latent_mask` (min-pool: a latent cell is known only if all
its pixels are).

The encoder runs in every train step, as in LDM: no cache to go stale when the data
augmentation changes. Its params are an argument of the jitted functions, never a constant
folded into them (83M parameters for SD's VAE).
"""

import dataclasses
import json
import os
from typing import Any, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp

import checkpoints
import config_lib
import experiment
from models import autoencoder
from models import autoencoder_loss

# WORKDIR/SCALE_FILE: {"scale": 1 / std, "std": ..., ...}, written by process 0 of a fresh
# scale_by_std run before its first checkpoint. A file beside config.json rather than an Orbax
# item: checkpoints keep their items (old ones restore unchanged), and --mode sample / eval read
# the value without knowing the checkpoint layout.
SCALE_FILE = 'latent_scale.json'


@dataclasses.dataclass(frozen=True, eq=False)
class LatentSpace:
  """A frozen autoencoder and the affine map to the diffusion model's latents.

  Attributes:
    module: the AutoencoderKL.
    params: its float32 params.
    scale, shift: z_model = (z - shift) * scale. scale None: config.latent.scale_by_std's
      value is not known yet (a fresh run before `for_run`); encoding and decoding refuse.
    sample_posterior: encode to a posterior sample (LDM) rather than its mean.
  """
  module: Any
  params: Any
  scale: Optional[float]
  shift: float = 0.0
  sample_posterior: bool = True

  def _scale(self):
    if self.scale is None:
      raise config_lib.ConfigError(
          'config.latent.scale_by_std: the scale of this run is not known yet (it is fitted to '
          f'the first training batch and saved as WORKDIR/{SCALE_FILE}); train first, or pass '
          'the LatentSpace of latent_space.for_run(config, workdir)')
    return self.scale

  def moments(self, params, images):
    """Pure: images float32 [..., H, W, C] in [-1, 1] -> the posterior (mean, logvar), each
    float32 [..., h, w, L], unscaled (logvar clipped as the autoencoder does)."""
    lead = images.shape[:-3]
    x = images.reshape((-1,) + images.shape[-3:])
    post = self.module.apply({'params': params}, x, method='encode')  # a DiagonalGaussian
    return tuple(a.reshape(lead + a.shape[1:]).astype(jnp.float32) for a in post)

  def from_moments(self, mean, logvar, rng):
    """Pure: posterior moments [..., h, w, L] -> model latents (a sample keyed by `rng`, or
    the mean without sample_posterior), shifted and scaled."""
    post = autoencoder.DiagonalGaussian(mean, logvar)
    z = post.sample(rng) if self.sample_posterior else post.mode()
    return ((z - self.shift) * self._scale()).astype(jnp.float32)

  def encode(self, params, images, rng):
    """Pure: images float32 [..., H, W, C] in [-1, 1] -> model latents [..., h, w, L]."""
    return self.from_moments(*self.moments(params, images), rng)

  def encode_mean(self, params, images):
    """Pure: images [..., H, W, C] -> the posterior mean as model latents [..., h, w, L]
    (img2img and inpainting inputs: the encoder's best guess, no posterior noise)."""
    mean, _ = self.moments(params, images)
    return ((mean - self.shift) * self._scale()).astype(jnp.float32)

  def decode(self, params, latents):
    """Pure: model latents [B, h, w, L] -> images float32 [B, H, W, C] (not clipped)."""
    z = latents / self._scale() + self.shift
    return self.module.apply({'params': params}, z, method='decode')

  def with_scale(self, scale):
    return dataclasses.replace(self, scale=float(scale))

def load_autoencoder(path: str, dtype: str = 'float32') -> Tuple[Any, Any]:
  """(module, float32 params) of the autoencoder at `path`: a diffusers AutoencoderKL folder, or
  the workdir of an autoencoder run (its newest checkpoint; the EMA params if that run's
  sampling.use_ema, as its own --mode sample uses)."""
  if not config_lib.autoencoder_run(path):
    return autoencoder.load_diffusers(path, dtype=dtype)
  run = config_lib.load_run_config(path)
  run.autoencoder.dtype = dtype
  module = autoencoder.create_autoencoder(run)
  step, params = experiment.restore_params(run, path, use_ema=run.sampling.use_ema, module=module)
  logging.info('autoencoder: %s at step %d (%s params)', path, step,
               'EMA' if run.sampling.use_ema else 'raw')
  return module, jax.device_get(params[autoencoder_loss.AUTOENCODER])



def latent_mask(mask, factor):
  """Pure: a pixel mask float [B, H, W, 1 or C] (1 = known) -> the latent one [B, H/f, W/f, 1].

  Min-pool over each f x f block and the channels: a latent cell is known (kept at the encoded
  input) only if every pixel it covers is known. A cell over even one unknown pixel is
  generated, so no input content from the hole is pinned into the output; the price is a hole
  grown to whole cells (up to f - 1 pixels at its border), which the sampler fills coherently.
  """
  b, h, w, _ = mask.shape
  m = jnp.min(mask, axis=-1)
  m = m.reshape(b, h // factor, factor, w // factor, factor).min(axis=(2, 4))
  return m[..., None]


def load(config, workdir=None) -> Optional[LatentSpace]:
  """The LatentSpace config.latent names, or None for pixel-space diffusion.

  With config.latent.scale_by_std the scale is the run's saved one (WORKDIR/latent_scale.json),
  or None when there is none yet (see `for_run`).
  """
  lat = config.latent
  if not lat.autoencoder:
    return None
  module, params = load_autoencoder(lat.autoencoder, dtype=lat.dtype)
  if lat.scale_by_std:
    saved = read_scale(workdir) if workdir else None
    scale = None if saved is None else saved['scale']
  else:
    scale = float(lat.scale_factor or module.scaling_factor)
  shift = module.shift_factor if lat.shift_factor is None else lat.shift_factor
  return LatentSpace(module, params, scale, float(shift or 0.0), lat.sample_posterior)


def read_scale(workdir):
  """The saved scale_by_std record of a workdir ({'scale': float, 'std': float, ...}) or None."""
  try:
    with open(os.path.join(workdir, SCALE_FILE)) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f'config.latent.scale_by_std: cannot read '
                                 f'{os.path.join(workdir, SCALE_FILE)} ({e})') from e
  return record


def fit_scale(latent, params, images, rng):
  """Pure: LDM's scale_by_std on one (global) batch: (std, 1 / std), float32 scalars.

  images float32 [B, H, W, C] in [-1, 1]; the std is over every element of the posterior
  samples (or means, without sample_posterior) drawn with `rng`, shift removed (a constant, it
  does not change the std), unbiased (ddof 1) as LDM's torch `z.flatten().std()`.
  """
  z = dataclasses.replace(latent, scale=1.0).encode(params, images, rng)
  std = jnp.std(z, ddof=1)
  return std, 1.0 / std


def for_run(config, workdir, latent=None, *, fresh=None, first_images=None, mesh=None):
  """The LatentSpace of the training run in `workdir` (None in pixel space), its scale resolved.

  Without config.latent.scale_by_std this is `load(config)`. With it: the value saved in
  WORKDIR/latent_scale.json; or, for a fresh run (no checkpoint yet), fitted now on the first
  training batch with step 0's posterior noise (the latents step 0 trains on), logged, and
  written atomically by process 0 before any checkpoint exists. Every process computes it from
  the same global batch (a jitted reduction over the sharded batch), so all agree.

  Args:
    config: the experiment config.
    workdir: the run directory.
    latent: a LatentSpace already loaded (its scale, if set, is kept).
    fresh: whether the run has no checkpoint (default: WORKDIR/checkpoints has no step).
    first_images: the first global batch's images (a jax.Array [B, H, W, C]); default: read
      from a fresh data stream (data.get_dataset, which starts where a fresh run does).
    mesh: the device mesh (default: every device).

  Raises:
    config_lib.ConfigError: a run with checkpoints but no saved scale (from before
      scale_by_std was set): it cannot be resumed with the value it trained on.
  """
  if latent is None:
    latent = load(config, workdir)
  if latent is None or latent.scale is not None:
    return latent
  saved = read_scale(workdir)
  if saved is not None:
    return latent.with_scale(saved['scale'])
  fresh = (not config_lib.has_checkpoint(workdir)) if fresh is None else fresh
  path = os.path.join(workdir, SCALE_FILE)
  if not fresh:
    raise config_lib.ConfigError(
        f'config.latent.scale_by_std: {path} is missing but {workdir} holds checkpoints (a run '
        'started without scale_by_std?); resume it with its own scale: '
        '--config.latent.scale_by_std=false --config.latent.scale_factor=VALUE')
  import sharding  # pylint: disable=g-import-not-at-top  (jax-side helpers, training only)
  mesh = mesh or sharding.make_mesh()
  if first_images is None:
    import data as data_lib  # pylint: disable=g-import-not-at-top
    ds = data_lib.get_dataset(config)  # a fresh stream: its first batch is a fresh run's
    try:
      local = next(ds)['image']
    finally:
      ds.close()
    first_images = sharding.from_process_rows({'image': local},
                                              sharding.batch_sharding(mesh))['image']
  params = jax.device_put(latent.params, sharding.replicated(mesh))
  rng = jax.random.fold_in(encoder_key(config), 0)  # step 0's posterior noise
  std, scale = jax.jit(lambda p, x: fit_scale(latent, p, x, rng))(params, first_images)
  std, scale = float(std), float(scale)
  if not scale > 0 or scale == float('inf'):
    raise config_lib.ConfigError(f'config.latent.scale_by_std: the first batch\'s latents have '
                                 f'std {std}; set latent.scale_factor instead')
  record = {'scale': scale, 'std': std, 'num_images': int(first_images.shape[0]),
            'autoencoder': str(config.latent.autoencoder), 'shift': latent.shift,
            'rule': '1 / std (ddof 1) of the first training batch\'s latents at step 0'}
  logging.info('latent.scale_by_std: the latents of the first batch (%d images) have std %.6g: '
               'scale %.6g '
               '(saved in %s)', first_images.shape[0], std, scale, path)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    checkpoints.write_atomically(path, json.dumps(record, indent=2))
  return latent.with_scale(scale)


def encoder_key(config) -> jax.Array:
  """The root key of the posterior samples; step s uses fold_in(key, s), so a resumed run draws
  the same latents as the uninterrupted one."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x1a7e)
