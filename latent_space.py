"""Latent diffusion (Rombach et al. 2022): a frozen KL autoencoder between pixels and the model.

With config.latent.autoencoder set to a diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema) or
the workdir of an autoencoder trained here (model.name = 'autoencoder'), training encodes each batch's images to z = (posterior sample - shift) * scale before the train
step, and sampling decodes z / scale + shift after the sampler; the diffusion model, its
schedule, the trainer and the samplers see latents only and do not change. The scale is the
folder's (or the run's autoencoder.) scaling_factor (SD: 0.18215) unless config.latent.scale_factor
sets one; LDM's
scale_by_std (1 / std of the first batch's latents) is not implemented.

The encoder runs in every train step, as in LDM: no cache to go stale when the data
augmentation changes. Its params are an argument of the jitted functions, never a constant
folded into them (83M parameters for SD's VAE).
"""

import dataclasses
from typing import Any, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp

import config_lib
import experiment
from models import autoencoder
from models import autoencoder_loss


@dataclasses.dataclass(frozen=True, eq=False)
class LatentSpace:
  """A frozen autoencoder and the affine map to the diffusion model's latents.

  Attributes:
    module: the AutoencoderKL.
    params: its float32 params.
    scale, shift: z_model = (z - shift) * scale.
    sample_posterior: encode to a posterior sample (LDM) rather than its mean.
  """
  module: Any
  params: Any
  scale: float
  shift: float = 0.0
  sample_posterior: bool = True

  def encode(self, params, images, rng):
    """Pure: images float32 [..., H, W, C] in [-1, 1] -> model latents [..., h, w, L]."""
    lead = images.shape[:-3]
    x = images.reshape((-1,) + images.shape[-3:])
    post = self.module.apply({'params': params}, x, method='encode')  # a DiagonalGaussian
    z = post.sample(rng) if self.sample_posterior else post.mode()
    z = (z - self.shift) * self.scale
    return z.reshape(lead + z.shape[1:]).astype(jnp.float32)

  def decode(self, params, latents):
    """Pure: model latents [B, h, w, L] -> images float32 [B, H, W, C] (not clipped)."""
    z = latents / self.scale + self.shift
    return self.module.apply({'params': params}, z, method='decode')


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


def load(config) -> Optional[LatentSpace]:
  """The LatentSpace config.latent names, or None for pixel-space diffusion."""
  lat = config.latent
  if not lat.autoencoder:
    return None
  module, params = load_autoencoder(lat.autoencoder, dtype=lat.dtype)
  scale = lat.scale_factor or module.scaling_factor
  shift = module.shift_factor if lat.shift_factor is None else lat.shift_factor
  return LatentSpace(module, params, float(scale), float(shift or 0.0), lat.sample_posterior)


def encoder_key(config) -> jax.Array:
  """The root key of the posterior samples; step s uses fold_in(key, s), so a resumed run draws
  the same latents as the uninterrupted one."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x1a7e)
