"""What a config names, built: the noise schedule, the model, its conditions, a run's params.

Training, sampling and evaluation all start here, so that a config means the same thing to each
of them.
"""

import jax

import checkpoints
import conditioning
import models
import sharding
from diffusion import schedules


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
