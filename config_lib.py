"""Config checks that run before anything is compiled: overrides, values, combinations.

Every problem is a `ConfigError` whose one-line message names the field and the fix;
main.py prints it without a traceback.
"""

import difflib
import importlib.util
import json
import os
import re

import ml_collections


class ConfigError(ValueError):
  """A config or command-line problem that the user must fix."""


# Choices the code knows; kept here (not imported from the registries) so that a bad
# launch fails before jax, the model or the data are touched.
SCHEDULES = ('linear', 'cosine')
PREDICTIONS = ('eps', 'x0', 'v')
SAMPLERS = ('ddpm', 'ddim', 'dpm_solver_pp_2m', 'heun')
SPACINGS = ('leading', 'trailing')
OPTIMIZERS = ('adam', 'adamw')
MODELS = ('unet',)
DTYPES = ('float32', 'bfloat16')
CROPS = ('none', 'center', 'celeba_ddim')

# Fields that may change between a run and its resumption without it being another run.
RESUMABLE_CHANGES = ('training.num_steps', 'training.log_every', 'training.checkpoint_every',
                     'training.sample_every', 'training.eval_every', 'training.eval_num_samples',
                     'training.keep_checkpoints', 'training.max_nonfinite_steps',
                     'training.num_grid_samples', 'data.data_dir')
RESUMABLE_GROUPS = ('sampling.', 'eval.')


def load_config_file(path):
  """Imports a config file and returns its `get_config()`."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist; pass --config configs/NAME.py')
  spec = importlib.util.spec_from_file_location('_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _leaf_paths(config, prefix=''):
  out = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaf_paths(value, path + '.')
    else:
      out.append(path)
  return out


def check_overrides(config, argv):
  """Fails on `--config.a.b=...` overrides whose field does not exist in `config`."""
  known = _leaf_paths(config)
  groups = {p.rsplit('.', 1)[0] for p in known if '.' in p}
  for arg in argv:
    m = re.match(r'^--?config\.([^=\s]+)', arg)
    if not m:
      continue
    path = m.group(1)
    if path in known:
      continue
    if path in groups:
      raise ConfigError(f'--config.{path} names a group, not a field; set one of its fields, '
                        f'e.g. --config.{next(p for p in known if p.startswith(path + "."))}=...')
    close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ''
    raise ConfigError(f"unknown config field '{path}' (from {arg!r}).{hint} "
                      f'Every field is listed, with its meaning, in configs/default.py.')


def _check(ok, field, message):
  if not ok:
    raise ConfigError(f'config.{field}: {message}')


def _positive_int(config, field):
  value = _get(config, field)
  _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
         f'must be a positive integer, got {value!r}')


def _get(config, path):
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def validate(config, *, num_devices=1, process_count=1):
  """Checks types, ranges and combinations; raises ConfigError naming the field."""
  d, m, df, o, tr, s = (config.data, config.model, config.diffusion, config.optim,
                        config.training, config.sampling)
  ds = d.dataset
  _check(ds == 'digits' or (isinstance(ds, str) and (ds.startswith('tfds:') and len(ds) > 5
                                                     or ds.startswith('folder:') and len(ds) > 7)),
         'data.dataset', f"unknown dataset {ds!r}; use 'digits', 'tfds:NAME' or 'folder:/path'")
  for f in ('data.image_size', 'model.ch', 'model.num_res_blocks', 'diffusion.num_timesteps',
            'training.batch_size', 'training.num_steps', 'training.log_every',
            'training.checkpoint_every', 'training.keep_checkpoints', 'training.steps_per_dispatch',
            'training.max_nonfinite_steps', 'sampling.num_steps', 'sampling.num_samples',
            'sampling.batch_size', 'model.num_heads'):
    _positive_int(config, f)
  _check(d.num_channels in (1, 3), 'data.num_channels', f'must be 1 or 3, got {d.num_channels!r}')
  _check(d.crop in CROPS, 'data.crop', f'unknown crop {d.crop!r}; one of {CROPS}')
  _check(m.name in MODELS, 'model.name', f'unknown model {m.name!r}; one of {MODELS}')
  _check(len(m.ch_mult) > 0 and all(isinstance(c, int) and c > 0 for c in m.ch_mult),
         'model.ch_mult', f'must be a non-empty tuple of positive ints, got {m.ch_mult!r}')
  levels = len(m.ch_mult)
  factor = 2 ** (levels - 1)
  _check(d.image_size % factor == 0, 'data.image_size',
         f'{d.image_size} is not divisible by 2**(len(model.ch_mult)-1) = {factor}; '
         f'use a multiple of {factor} or fewer levels in model.ch_mult')
  reached = [d.image_size // 2 ** i for i in range(levels)]
  for r in m.attn_resolutions:
    _check(r in reached, 'model.attn_resolutions',
           f'resolution {r} is never reached by the model (feature-map sizes: {reached})')
  _check(0.0 <= m.dropout < 1.0, 'model.dropout', f'must be in [0, 1), got {m.dropout}')
  _check(m.dtype in DTYPES, 'model.dtype', f'unknown dtype {m.dtype!r}; one of {DTYPES}')
  _check(m.num_classes >= 0, 'model.num_classes', 'must be >= 0 (0 = unconditional)')
  if m.num_classes > 0:
    _check(d.num_classes == m.num_classes, 'model.num_classes',
           f'{m.num_classes} differs from config.data.num_classes = {d.num_classes}')
    _check(d.label_key != '', 'data.label_key',
           'a class-conditional model (model.num_classes > 0) needs labels')
  _check(df.schedule in SCHEDULES, 'diffusion.schedule',
         f'unknown schedule {df.schedule!r}; one of {SCHEDULES}')
  _check(df.prediction in PREDICTIONS, 'diffusion.prediction',
         f'unknown prediction {df.prediction!r}; one of {PREDICTIONS}')
  _check(0 < df.beta_start < df.beta_end < 1, 'diffusion.beta_start',
         f'need 0 < beta_start < beta_end < 1, got {df.beta_start}, {df.beta_end}')
  _check(o.optimizer in OPTIMIZERS, 'optim.optimizer',
         f'unknown optimizer {o.optimizer!r}; one of {OPTIMIZERS}')
  _check(o.lr > 0, 'optim.lr', f'must be > 0, got {o.lr}')
  _check(o.warmup_steps >= 0, 'optim.warmup_steps', f'must be >= 0, got {o.warmup_steps}')
  _check(o.grad_clip >= 0, 'optim.grad_clip', f'must be >= 0 (0 = off), got {o.grad_clip}')
  _check(0.0 <= tr.ema_rate < 1.0, 'training.ema_rate', f'must be in [0, 1), got {tr.ema_rate}')
  _check(0.0 <= tr.label_dropout < 1.0, 'training.label_dropout',
         f'must be in [0, 1), got {tr.label_dropout}')
  _check(tr.batch_size % num_devices == 0, 'training.batch_size',
         f'{tr.batch_size} does not divide over {num_devices} devices; use a multiple of '
         f'{num_devices}')
  _check(tr.batch_size % process_count == 0, 'training.batch_size',
         f'{tr.batch_size} does not divide over {process_count} processes')
  _check(s.batch_size % num_devices == 0, 'sampling.batch_size',
         f'{s.batch_size} does not divide over {num_devices} devices; use a multiple of '
         f'{num_devices}')
  _check(s.sampler in SAMPLERS, 'sampling.sampler',
         f'unknown sampler {s.sampler!r}; one of {SAMPLERS}')
  _check(s.spacing in SPACINGS, 'sampling.spacing',
         f'unknown spacing {s.spacing!r}; one of {SPACINGS}')
  _check(s.num_steps <= df.num_timesteps, 'sampling.num_steps',
         f'{s.num_steps} exceeds diffusion.num_timesteps = {df.num_timesteps}')
  _check(s.eta >= 0, 'sampling.eta', f'must be >= 0, got {s.eta}')
  _check(s.guidance_scale >= 0, 'sampling.guidance_scale', f'must be >= 0, got {s.guidance_scale}')


def to_dict(config):
  """A JSON-able dict (tuples become lists)."""
  return json.loads(config.to_json())


def diff(saved, current):
  """Fields that differ between two JSON-able config dicts, ignoring resumable ones."""
  def flat(d, prefix=''):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flat(v, f'{prefix}{k}.'))
      else:
        out[f'{prefix}{k}'] = v
    return out
  a, b = flat(saved), flat(current)
  out = []
  for key in sorted(set(a) | set(b)):
    if key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_GROUPS):
      continue
    if a.get(key) != b.get(key):
      out.append(f'{key}: {a.get(key)!r} -> {b.get(key)!r}')
  return out
