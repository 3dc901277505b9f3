"""Denoising networks; `create_model(config)` builds the one `config.model.name` names.

Adding an architecture: write a builder `(config) -> nn.Module` and name it in `_BUILDERS`.
Every model is called as `model.apply(variables, x, t, train=False, y=None, cond=None)` (a text
U-Net also takes context=, context_mask=) and returns a float32 prediction with x's shape.
'sd_unet' is Stable Diffusion's U-Net (models/sd_unet.py, config.sd_unet); 'autoencoder' is not a
denoiser but the KL autoencoder of latent diffusion (models/autoencoder.py, config.autoencoder),
trained by the same trainer with its own objective (models/autoencoder_loss.py);
`load_diffusers_unet(folder) -> (module, params)` reads a diffusers UNet2DConditionModel folder;
`save_diffusers_unet(folder, module, params)` writes one.
"""

from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import autoencoder
from models import autoencoder_loss
from models import dit
from models import sd_unet
from models.sd_unet import load_diffusers_unet, save_diffusers_unet  # noqa: F401  (public API)
from models.layers import timestep_embedding  # noqa: F401  (re-exported)
from models.unet import UNet


def _build_unet(config) -> nn.Module:
  m = config.model
  return UNet(
      ch=m.ch,
      out_ch=input_shape(config)[-1],
      ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions),
      num_heads=m.num_heads,
      dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv,
      num_classes=m.num_classes,
      cond_channels=m.cond_channels,
      dtype=m.dtype,
      remat=m.remat,
      num_groups=m.num_groups,
      conv_algorithm=m.conv_algorithm,
      context_dim=m.context_dim,
  )


def _build_dit(config) -> nn.Module:
  return dit.build(config, in_channels=input_shape(config)[-1])


def _build_sd_unet(config) -> nn.Module:
  return sd_unet.build(config, in_channels=input_shape(config)[-1])


_BUILDERS: Dict[str, Callable[[Any], nn.Module]] = {
    'unet': _build_unet, 'dit': _build_dit, 'sd_unet': _build_sd_unet,
    'autoencoder': autoencoder.create_autoencoder}


def create_model(config) -> nn.Module:
  """Builds the model named by `config.model.name` from config.model.* and config.data.

  Args:
    config: the experiment ConfigDict (see configs/default.py).

  Returns:
    An unbound flax.linen.Module.

  Raises:
    ValueError: for an unknown model name (the message lists the known ones).
  """
  name = config.model.name
  if name not in _BUILDERS:
    raise ValueError(f'Unknown config.model.name={name!r}; known models: {sorted(_BUILDERS)}.')
  return _BUILDERS[name](config)


def input_shape(config) -> tuple:
  """(height, width, channels) of what the model denoises: the images, or with
  config.latent.autoencoder their latents, whose geometry the config declares (latent.factor,
  latent.channels; config_lib checks them against the folder), so that a model's shapes and
  parameter count follow from the config alone. A config.model.pretrained (Stable Diffusion)
  model denoises latents too, before validation has filled latent.autoencoder from it."""
  size, channels = config.data.image_size, config.data.num_channels
  lat = config.get('latent')
  if config.model.name == 'autoencoder':  # it maps images to images
    return size, size, channels
  if lat is not None and (lat.autoencoder or config.model.get('pretrained', '')):
    return size // lat.factor, size // lat.factor, lat.channels
  return size, size, channels


def prediction(config, out):
  """The diffusion target from a model output: a DiT with learned sigma returns 2C channels, the
  target first and IDDPM's variance interpolation after (not trained here: see models/dit.py)."""
  return out[..., :input_shape(config)[-1]]


def dummy_inputs(config, batch_size: int = 1) -> Dict[str, jax.Array]:
  """Zero inputs with the shapes a model built from `config` takes (for init / shape tracing).

  Returns:
    dict with 'x' float32 [B, S, S, C], 't' int32 [B], and 'y' int32 [B] if
    config.model.num_classes > 0, 'cond' float32 [B, s, s, cond_channels] if
    config.model.cond_channels > 0 (s = config.data.low_res_size if > 0, else S), and
    'context' float32 [B, L, D] with 'context_mask' bool [B, L] (all real) if
    config.model.context_dim = D > 0 (L = config.model.context_len).
  """
  size = config.data.image_size
  inputs = {'x': jnp.zeros((batch_size,) + tuple(input_shape(config)), jnp.float32),
            't': jnp.zeros((batch_size,), jnp.int32)}
  if config.model.num_classes > 0:
    inputs['y'] = jnp.zeros((batch_size,), jnp.int32)
  if config.model.cond_channels > 0:
    low = config.data.get('low_res_size', 0) or size
    inputs['cond'] = jnp.zeros((batch_size, low, low, config.model.cond_channels), jnp.float32)
  if config.model.get('context_dim', 0) > 0:
    shape = (batch_size, config.model.context_len)
    inputs['context'] = jnp.zeros(shape + (config.model.context_dim,), jnp.float32)
    inputs['context_mask'] = jnp.ones(shape, bool)
  return inputs


def init_params(model: nn.Module, config, rng: jax.Array) -> Any:
  """Initialises the parameters of `model` for inputs shaped as `config` describes.

  Args:
    model: a module from `create_model(config)`.
    config: the experiment ConfigDict.
    rng: a PRNG key.

  Returns:
    The float32 params pytree (the 'params' collection); an autoencoder run's holds the
    autoencoder and its discriminator (autoencoder_loss.init_train_params).
  """
  if config.model.name == 'autoencoder':
    return autoencoder_loss.init_train_params(model, config, rng)
  inputs = dummy_inputs(config)
  x, t = inputs.pop('x'), inputs.pop('t')
  init = jax.jit(lambda rng: model.init({'params': rng}, x, t, train=False, **inputs)['params'])
  # XLA:CPU compiles each partitionable-threefry draw very slowly (measured on 2 cores: 10 kernel
  # draws 27 s vs. 7 s unpartitionable; the tiny test U-Net's init 48 s vs. 14 s). Init runs once
  # and is tiny next to training, so the unpartitionable variant costs nothing that matters; the
  # numbers remain a deterministic function of `rng`.
  with jax.threefry_partitionable(False):
    return init(rng)


def count_params(params: Any) -> int:
  """Total number of scalars in a params pytree (works on arrays and ShapeDtypeStructs)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
