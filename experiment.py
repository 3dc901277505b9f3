"""What a config names, built: the noise schedule, the model, its conditions, a run's params.

Training, sampling and evaluation all start here, so that a config means the same thing to each
of them.
"""

import os

from absl import logging
import jax

import checkpoints
import conditioning
import config_lib
import models
import sharding
from diffusion import schedules
from models import sd_unet


def schedule(config) -> schedules.Schedule:
  """The noise schedule of config.diffusion."""
  d = config.diffusion
  if d.schedule in ('linear', 'scaled_linear'):
    kwargs = {'beta_start': d.beta_start, 'beta_end': d.beta_end}
  else:
    kwargs = {'s': d.cosine_s}
  return schedules.get_schedule(d.schedule, d.num_timesteps, **kwargs)


def model(config):
  """The network config.model names (models.create_model)."""
  return models.create_model(config)


def conditioner(config, text_null=None) -> conditioning.Conditioner:
  """The conditions the model takes (conditioning.build)."""
  return conditioning.build(config, text_null)


def params_shapes(config, module):
  """The params pytree's ShapeDtypeStructs (no computation)."""
  return jax.eval_shape(lambda: models.init_params(module, config, jax.random.PRNGKey(0)))


def restore_params(config, workdir, *, step=-1, use_ema=True, module=None, mesh=None):
  """A run's params (EMA by default) from its newest readable checkpoint, or at `step`.

  Returns:
    (step, params) replicated over `mesh` (default: all devices).
  """
  module = module or model(config)
  mesh = mesh or sharding.make_mesh()
  return checkpoints.restore_params(workdir, params_shapes(config, module), mesh, step=step,
                                    use_ema=use_ema)


def pretrained_params(config, module=None, mesh=None):
  """The float32 U-Net params of config.model.pretrained's unet/ folder, replicated over `mesh`
  (default: all devices), loaded into the config's model (models.load_diffusers_unet(module=)).

  Raises:
    FileNotFoundError: no unet/config.json or weights.
    config_lib.ConfigError: a config.sd_unet that differs from unet/config.json (each field,
      both values; config_lib.apply_pretrained makes them equal, so the config was changed or
      the folder rewritten after the fill).
    ValueError: a tensor of the wrong shape (named); KeyError: a missing tensor (named).
  """
  module = module or model(config)
  folder = os.path.join(config.model.pretrained, 'unet')
  try:
    _, params = models.load_diffusers_unet(folder, module=module)
  except sd_unet.ArchitectureMismatch as e:
    raise config_lib.ConfigError(
        f'config.model.pretrained: config.sd_unet differs from {e.config_path} (config vs '
        f'folder): {"; ".join(e.differences)}') from e
  return jax.device_put(params, sharding.replicated(mesh or sharding.make_mesh()))


def checkpoint_steps(workdir):
  """The steps of the run's committed checkpoints (empty when there is none)."""
  mngr = checkpoints.manager(workdir, read_only=True)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def sampling_params(config, workdir, *, step=-1, use_ema=True, module=None, mesh=None):
  """The params --mode sample and eval use: the run's checkpoint (`restore_params`), or, for a
  config.model.pretrained config whose workdir holds no checkpoint, the folder's U-Net.

  Checkpoints win over the folder (they are its fine-tuned weights); which one is used is
  logged. An explicit `step` always means a checkpoint.

  Returns:
    (step, params): step None for the folder's weights.
  """
  pretrained = config.model.get('pretrained', '')
  if pretrained and step < 0 and not checkpoint_steps(workdir):
    logging.info('no checkpoint in %s: using the pretrained U-Net of %s (model.pretrained)',
                 checkpoints.directory(workdir), os.path.join(pretrained, 'unet'))
    return None, pretrained_params(config, module, mesh)
  step, params = restore_params(config, workdir, step=step, use_ema=use_ema, module=module,
                                mesh=mesh)
  if pretrained:
    logging.info('using the checkpoint at step %d in %s (fine-tuned from model.pretrained=%s, '
                 'whose unet/ weights are not read)', step, checkpoints.directory(workdir),
                 pretrained)
  return step, params
