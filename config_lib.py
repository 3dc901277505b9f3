"""Config checks that run before anything is compiled: overrides, values, combinations.

Every problem is a `ConfigError` whose one-line message names the field and the fix;
main.py prints it without a traceback.
"""

import ast
import difflib
import importlib.util
import json
import os
import re

from absl import logging
import ml_collections


class ConfigError(ValueError):
  """A config or command-line problem that the user must fix."""


_ROOT = os.path.dirname(os.path.abspath(__file__))


def registry_names(module_path, name):
  """The names a registry defines: the string keys of the dict (or the items of the tuple)
  assigned to `name` at the top level of the project file `module_path`.

  Read from the source with `ast`, not imported: the registries live in modules that import jax,
  and a bad launch must fail before jax is touched. So a registry stays the one place that names
  its entries (tests/test_config_lib.py holds each list equal to the imported registry).
  """
  with open(os.path.join(_ROOT, module_path)) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    targets = (node.targets if isinstance(node, ast.Assign) else
               [node.target] if isinstance(node, ast.AnnAssign) else [])
    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
      value = node.value
      items = value.keys if isinstance(value, ast.Dict) else getattr(value, 'elts', None)
      if items is None or not all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                  for k in items):
        raise TypeError(f'{module_path}:{name} must be a literal dict or tuple of string keys')
      return tuple(k.value for k in items)
  raise LookupError(f'{module_path} defines no top-level {name}')


def default_grids():
  """sampler name -> its default grid, read from diffusion/samplers.py's SAMPLERS entries
  (`Sampler(step, grid, ...)`, 'leading' when not given) without importing it."""
  with open(os.path.join(_ROOT, 'diffusion/samplers.py')) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.AnnAssign) and getattr(node.target, 'id', '') == 'SAMPLERS':
      out = {}
      for k, v in zip(node.value.keys, node.value.values):
        grid = [a.value for a in v.args[1:2]] + [w.value.value for w in v.keywords
                                                  if w.arg == 'default_grid']
        out[k.value] = grid[0] if grid else 'leading'
      return out
  raise LookupError('diffusion/samplers.py defines no top-level SAMPLERS')


# Where each choice a config names is registered (file, name): one place per registry.
REGISTRIES = {
    'schedule': ('diffusion/schedules.py', '_BETAS'),
    'prediction': ('diffusion/process.py', 'PREDICTIONS'),
    'sampler': ('diffusion/samplers.py', 'SAMPLERS'),
    'grid': ('diffusion/grids.py', 'GRIDS'),
    'optimizer': ('train_lib.py', 'OPTIMIZERS'),
    'lr_schedule': ('train_lib.py', 'LR_SCHEDULES'),
    'model': ('models/__init__.py', '_BUILDERS'),
    'dtype': ('models/layers.py', 'SUPPORTED_DTYPES'),
    'conv_algorithm': ('models/winograd.py', 'CONV_ALGORITHMS'),
    'crop': ('data/preprocess.py', 'CROPS'),
    'formulation': ('diffusion/edm.py', 'FORMULATIONS'),
    'loss_type': ('diffusion/losses.py', 'LOSS_TYPES'),
    'edm_sampler': ('diffusion/edm.py', 'SAMPLERS'),  # EDM's own, beside 'sampler'
}


def choices(kind):
  """The registered names of one kind of choice (see REGISTRIES)."""
  return registry_names(*REGISTRIES[kind])

# Renamed fields: (old dotted path, new dotted path). A run's saved config.json is read through
# `migrate`, so that runs written before a rename still resume and sample.
RENAMED = (('training.label_dropout', 'training.cond_dropout'),)

# Fields that may change between a run and its resumption without it being another run.
RESUMABLE_CHANGES = ('training.num_steps', 'training.log_every', 'training.checkpoint_every',
                     'training.sample_every', 'training.eval_every', 'training.eval_num_samples',
                     'training.keep_checkpoints', 'training.max_nonfinite_steps',
                     'training.num_grid_samples', 'training.fsdp', 'data.data_dir')
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


def _did_you_mean(path, known):
  close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
  return f" Did you mean '{close[0]}'?" if close else ''


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
    raise ConfigError(f"unknown config field '{path}' (from {arg!r}).{_did_you_mean(path, known)} "
                      f'Every field is listed, with its meaning, in configs/default.py.')


def set_field(config, path, value):
  """Sets the field at dotted `path` ('optim.lr') to `value`; ConfigError if it does not exist.

  A string `value` for a non-string field is read as a Python literal ('1e-4', '(1, 2)', 'True'),
  as `--config.optim.lr=1e-4` would be.
  """
  known = _leaf_paths(config)
  if path not in known:
    raise ConfigError(f"unknown config field '{path}'.{_did_you_mean(path, known)}")
  group, _, leaf = path.rpartition('.')
  node = _get(config, group) if group else config
  # get_type: a placeholder(str) field holds None but still takes a string as it is.
  if isinstance(value, str) and node.get_type(leaf) is not str:
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      raise ConfigError(f'config.{path}: cannot read {value!r} as a Python literal') from e
  node[leaf] = value


def _check(ok, field, message):
  if not ok:
    raise ConfigError(f'config.{field}: {message}')


def _positive_int(config, field):
  value = _get(config, field)
  _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
         f'must be a positive integer, got {value!r}')


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(config, field, low):
  value = _get(config, field)
  _check(_is_int(value) and value >= low, field, f'must be an integer >= {low}, got {value!r}')


def _number_in(config, field, low, high, *, low_open=False, high_open=True):
  """A real number in the interval [low, high) (or open/closed as asked); None = unbounded."""
  value = _get(config, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  left = '(' if low_open else '['
  right = ')' if high_open else ']'
  interval = f'{left}{"-inf" if low is None else low}, {"inf" if high is None else high}{right}'
  _check(ok, field, f'must be a number in {interval}, got {value!r}')


def _one_of(config, field, kind, extra=()):
  value = _get(config, field)
  known = choices(kind) + tuple(extra)
  _check(value in known, field, f'unknown {kind} {value!r}; one of {known}')


def _check_sampling_inputs(config):
  """img2img, inpainting, super-resolution and cascade fields, and their combinations."""
  s = config.sampling
  _number_in(config, 'sampling.strength', 0.0, 1.0, high_open=False)
  _positive_int(config, 'sampling.resample')
  _check(not s.mask or s.init_image, 'sampling.mask',
         'needs config.sampling.init_image (the image whose white-masked pixels are kept)')
  _check(not (s.cascade_base_workdir and (s.init_image or s.cond_image)),
         'sampling.cascade_base_workdir', 'makes its own condition images; leave '
         'sampling.init_image and sampling.cond_image empty')
  _check(not s.cascade_base_config or s.cascade_base_workdir, 'sampling.cascade_base_config',
         "needs config.sampling.cascade_base_workdir (the base's checkpoints)")
  _check(not s.cond_image or config.model.cond_channels > 0, 'sampling.cond_image',
         'is set but the model is not image-conditional (model.cond_channels = 0)')
  _check(not s.cascade_base_workdir or config.model.cond_channels > 0,
         'sampling.cascade_base_workdir', 'is set but this model is not image-conditional '
         '(model.cond_channels = 0); use an upsampler config such as configs/digits_sr.py')


def check_cascade(base_config, config):
  """The base and the upsampler of a cascade fit together (ConfigError naming both)."""
  if config.model.cond_channels == 0:
    raise ConfigError('config.sampling.cascade_base_workdir is set but this model is not '
                      'image-conditional (model.cond_channels = 0); use an upsampler config such '
                      'as configs/digits_sr.py')
  if base_config.model.cond_channels > 0:
    raise ConfigError("the cascade's base model is itself image-conditional; give an "
                      'unconditional or class-conditional base')
  if base_config.data.num_channels != config.model.cond_channels:
    raise ConfigError(f"the cascade's base makes {base_config.data.num_channels}-channel images "
                      f'but the upsampler takes model.cond_channels = '
                      f'{config.model.cond_channels}')


def has_checkpoint(workdir):
  """Whether WORKDIR/checkpoints holds a step folder (plain os: no Orbax, no jax)."""
  ckpt = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def autoencoder_run(path):
  """Whether `path` is the workdir of an autoencoder trained here (model.name 'autoencoder' in
  its config.json), rather than a diffusers AutoencoderKL folder."""
  run_config = os.path.join(path, 'config.json')
  if not os.path.isfile(run_config) or os.path.isfile(
      os.path.join(path, 'diffusion_pytorch_model.safetensors')):
    return False
  try:
    with open(run_config) as f:
      return json.load(f).get('model', {}).get('name') == 'autoencoder'
  except (OSError, ValueError):
    return False


def _autoencoder_geometry(path):
  """(downsampling factor, latent channels, image channels, description) of the autoencoder at
  `path` (a trained run's workdir or a diffusers folder), checking that it is one."""
  if autoencoder_run(path):
    run = load_run_config(path)
    _check(has_checkpoint(path), 'latent.autoencoder', f'the autoencoder run {path} has no '
           f'checkpoint yet: train it first (python main.py --config CONFIG --workdir {path})')
    ae = run.autoencoder
    return (2 ** (len(ae.block_out_channels) - 1), ae.latent_channels,
            ae.in_channels or run.data.num_channels, f'the autoencoder run {path}')
  for name in ('config.json', 'diffusion_pytorch_model.safetensors'):
    _check(os.path.isfile(os.path.join(path, name)), 'latent.autoencoder',
           f'{os.path.join(path, name)} not found: give the workdir of an autoencoder trained '
           'here (model.name=autoencoder), a diffusers AutoencoderKL folder (e.g. a download of '
           "stabilityai/sd-vae-ft-ema), or '' for pixel space")
  with open(os.path.join(path, 'config.json')) as f:
    cfg = json.load(f)
  return (2 ** (len(cfg.get('block_out_channels', (0,))) - 1), cfg.get('latent_channels', 4),
          cfg.get('in_channels', 3), path)


def _check_autoencoder(config):
  """model.name = 'autoencoder': its architecture and loss fit the data; nothing of a denoiser's
  conditioning is asked of it."""
  ae, al, d, m = config.autoencoder, config.autoencoder_loss, config.data, config.model
  blocks = ae.block_out_channels
  _check(len(blocks) > 0 and all(isinstance(c, int) and c > 0 for c in blocks),
         'autoencoder.block_out_channels', f'must be a non-empty tuple of positive ints, got '
         f'{blocks!r}')
  _positive_int(config, 'autoencoder.layers_per_block')
  _positive_int(config, 'autoencoder.latent_channels')
  _positive_int(config, 'autoencoder.norm_num_groups')
  bad = [c for c in blocks if c % ae.norm_num_groups]
  _check(not bad, 'autoencoder.norm_num_groups', f'{ae.norm_num_groups} does not divide the '
         f'channels {bad} of autoencoder.block_out_channels')
  factor = 2 ** (len(blocks) - 1)
  _check(d.image_size % factor == 0, 'data.image_size', f'{d.image_size} is not divisible by the '
         f"autoencoder's downsampling 2**(len(autoencoder.block_out_channels)-1) = {factor}")
  for f in ('in_channels', 'out_channels'):
    _check(ae[f] in (0, d.num_channels), f'autoencoder.{f}',
           f'{ae[f]} differs from data.num_channels = {d.num_channels}; use 0 (= the data\'s)')
  _one_of(config, 'autoencoder.dtype', 'dtype')
  _check(al.rec_loss in ('l1', 'l2'), 'autoencoder_loss.rec_loss', f"{al.rec_loss!r}: 'l1' or 'l2'")
  _check(al.disc_loss in ('hinge', 'vanilla'), 'autoencoder_loss.disc_loss',
         f"{al.disc_loss!r}: 'hinge' or 'vanilla'")
  _check(al.disc_norm in ('group', 'none'), 'autoencoder_loss.disc_norm',
         f"{al.disc_norm!r}: 'group' or 'none'")
  _positive_int(config, 'autoencoder_loss.disc_num_layers')
  _positive_int(config, 'autoencoder_loss.disc_channels')
  _int_at_least(config, 'autoencoder_loss.disc_start', 0)
  for f in ('autoencoder_loss.kl_weight', 'autoencoder_loss.disc_weight',
            'autoencoder_loss.disc_factor'):
    _number_in(config, f, 0.0, None)
  if al.disc_factor > 0:
    _check(d.image_size >= 2 ** (al.disc_num_layers + 2), 'autoencoder_loss.disc_num_layers',
           f'{al.disc_num_layers} stride-2 layers leave no patch of a {d.image_size}-pixel '
           'image; use fewer')
  for field, value in (('latent.autoencoder', config.latent.autoencoder),
                       ('model.num_classes', m.num_classes),
                       ('model.cond_channels', m.cond_channels),
                       ('model.context_dim', m.context_dim), ('model.pretrained', m.pretrained),
                       ('data.low_res_size', d.low_res_size),
                       ('eval.bpd_num_examples', config.eval.bpd_num_examples),
                       ('sampling.init_image', config.sampling.init_image)):
    _check(not value, field, 'does not apply to an autoencoder run (model.name=autoencoder); '
           'leave it unset')


def _check_latent(config):
  """config.latent: the autoencoder (a trained run's workdir or a diffusers folder) is there
  and fits; returns the side of what the model denoises (data.image_size, or its latent's)."""
  lat, d = config.latent, config.data
  if not lat.autoencoder:
    return d.image_size
  factor, channels, in_channels, what = _autoencoder_geometry(lat.autoencoder)
  _check(factor == lat.factor, 'latent.factor', f"{lat.factor} differs from the autoencoder's "
         f'downsampling factor {factor} (2**(len(block_out_channels) - 1) of {what})')
  _check(channels == lat.channels, 'latent.channels',
         f"{lat.channels} differs from the latent_channels = {channels} of {what}")
  _check(d.image_size % factor == 0, 'data.image_size',
         f"{d.image_size} is not divisible by the downsampling factor {factor} of {what}")
  _check(in_channels == d.num_channels, 'data.num_channels',
         f"{d.num_channels} differs from the in_channels = {in_channels} of {what}")
  _number_in(config, 'latent.scale_factor', 0.0, None)
  _check(not (lat.scale_by_std and lat.scale_factor), 'latent.scale_by_std',
         f'fits the scale to the first batch, latent.scale_factor = {lat.scale_factor} sets it: '
         'set one of them (latent.scale_factor=0 with scale_by_std)')
  _one_of(config, 'latent.dtype', 'dtype')
  _check(not (lat.cache and d.random_flip), 'data.random_flip',
         'flipped images are not the cached ones: a latent cache (latent.cache) needs fixed data; '
         'set --config.data.random_flip=false, or latent.cache=false to encode every step')
  s = config.sampling
  _check(not s.clip_x0, 'sampling.clip_x0', 'must be false with latent diffusion: latents are '
         'not bounded to [-1, 1] (set --config.sampling.clip_x0=false)')
  # img2img and inpainting (sampling.init_image, mask) work in latent space (sample_lib); these
  # do not yet: the condition image would need encoding, and the bound is over pixels.
  for field, value in (('sampling.cond_image', s.cond_image),
                       ('sampling.cascade_base_workdir', s.cascade_base_workdir),
                       ('model.cond_channels', config.model.cond_channels),
                       ('eval.bpd_num_examples', config.eval.bpd_num_examples)):
    _check(not value, field, 'is not supported with latent diffusion (config.latent.autoencoder) '
           'yet; leave it unset')
  return d.image_size // factor


def _check_formulation(config):
  """config.diffusion.formulation, EDM's fields, and what makes no sense with each."""
  df, s = config.diffusion, config.sampling
  _one_of(config, 'diffusion.formulation', 'formulation')
  _one_of(config, 'diffusion.loss_type', 'loss_type')
  _number_in(config, 'diffusion.min_snr_gamma', 0.0, None)
  for f in ('diffusion.sigma_data', 'diffusion.p_std', 'sampling.sigma_min', 'sampling.sigma_max',
            'sampling.rho'):
    _number_in(config, f, 0.0, None, low_open=True)
  _number_in(config, 'diffusion.p_mean', None, None)
  _check(s.sigma_min < s.sigma_max, 'sampling.sigma_min',
         f'{s.sigma_min} must be below sampling.sigma_max = {s.sigma_max}')
  if df.formulation == 'edm':
    _check(df.min_snr_gamma == 0, 'diffusion.min_snr_gamma',
           "is the ddpm formulation's loss weighting; the edm formulation weights by EDM's "
           '(sigma^2 + sigma_data^2) / (sigma sigma_data)^2: set it to 0')
    _check(df.loss_type == 'l2', 'diffusion.loss_type',
           f"{df.loss_type!r} is the ddpm formulation's; EDM's loss is its weighted squared "
           "error: set 'l2'")
    _check(config.eval.bpd_num_examples == 0, 'eval.bpd_num_examples',
           "DDPM's discrete variational bound is not defined for the edm formulation; set 0")
  if s.sampler in choices('edm_sampler'):
    _check(s.spacing == 'auto', 'sampling.spacing',
           f"{s.spacing!r}: the {s.sampler!r} sampler runs its own rho grid (sampling.sigma_min, "
           "sigma_max, rho); leave it 'auto'")
    _check(not s.init_image and not s.resample > 1, 'sampling.init_image',
           f"img2img and inpainting are not supported by the {s.sampler!r} sampler; choose "
           "another (e.g. 'ddim' or 'heun')")


def _check_sd_unet(config, size):
  """config.sd_unet (models/sd_unet.py) against the data, the latent space and the text."""
  g, m = config.sd_unet, config.model
  ch = tuple(g.block_out_channels)
  _check(len(ch) > 0 and all(_is_int(c) and c > 0 for c in ch), 'sd_unet.block_out_channels',
         f'must be a non-empty tuple of positive ints, got {g.block_out_channels!r}')
  _check(all(c % g.norm_num_groups == 0 for c in ch), 'sd_unet.norm_num_groups',
         f'{g.norm_num_groups} groups must divide every channel count of {ch}')
  heads = g.attention_head_dim
  heads = (heads,) * len(ch) if _is_int(heads) else tuple(heads)
  _check(len(heads) == len(ch) and all(_is_int(h) and h > 0 and c % h == 0
                                       for h, c in zip(heads, ch)), 'sd_unet.attention_head_dim',
         f'{g.attention_head_dim!r} (heads, an int or one per block) must divide each of {ch}')
  for f in ('down_block_types', 'up_block_types'):
    _check(len(g[f]) == len(ch), f'sd_unet.{f}', f'needs one entry per block ({len(ch)})')
  factor = 2 ** (len(ch) - 1)
  _check(size % factor == 0, 'data.image_size', f'the model input side {size} is not divisible '
         f'by 2**(len(sd_unet.block_out_channels)-1) = {factor}')
  channels = config.latent.channels if config.latent.autoencoder else config.data.num_channels
  _check(g.in_channels in (0, channels), 'sd_unet.in_channels',
         f'{g.in_channels} differs from the {channels} channels the model denoises '
         '(latent.channels with latent.autoencoder, else data.num_channels); SD needs its VAE: set '
         'latent.autoencoder, or sd_unet.in_channels=0')
  _check(g.out_channels in (0, channels), 'sd_unet.out_channels',
         f'{g.out_channels} differs from the {channels} channels the model denoises')
  _check(m.context_dim > 0, 'model.context_dim', 'the SD U-Net is text-conditional: set the '
         "text encoder's width (768 for CLIP ViT-L/14, 384 for MiniLM)")
  _check(g.cross_attention_dim in (0, m.context_dim), 'sd_unet.cross_attention_dim',
         f'{g.cross_attention_dim} differs from model.context_dim = {m.context_dim} (0 = take it)')
  _check(m.num_classes == 0 and m.cond_channels == 0, 'model.num_classes',
         'the SD U-Net takes no class labels or condition image; set model.num_classes and '
         'model.cond_channels to 0')
  _check(g.attention_impl in ('', 'xla', 'cudnn'), 'sd_unet.attention_impl',
         f"{g.attention_impl!r}: '' (XLA) or 'cudnn'")


# ----------------------------------------------------------------------- model.pretrained

# UNet2DConditionModel's defaults for config.sd_unet's architecture fields, which a diffusers
# unet/config.json may leave out (models/sd_unet.config_from_diffusers, which builds the network,
# reads the same; tests/test_sd_pipeline.py holds the two equal). sd_unet.dropout and
# sd_unet.attention_impl are not the folder's: they stay the config's.
SD_UNET_DEFAULTS = {
    'in_channels': 4, 'out_channels': 4, 'sample_size': 0,
    'block_out_channels': (320, 640, 1280, 1280), 'layers_per_block': 2,
    'down_block_types': ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    'up_block_types': ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
    'attention_head_dim': 8, 'transformer_layers_per_block': 1, 'cross_attention_dim': 1280,
    'use_linear_projection': False, 'norm_num_groups': 32, 'norm_eps': 1e-5,
    'flip_sin_to_cos': True, 'freq_shift': 0, 'downsample_padding': 1,
}
_PER_BLOCK = ('layers_per_block', 'attention_head_dim', 'transformer_layers_per_block')
# The weight files models/sd_unet.py reads from a unet/ folder (any one of them).
UNET_WEIGHTS = ('diffusion_pytorch_model.safetensors',
                'diffusion_pytorch_model.safetensors.index.json',
                'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.bin')
# diffusers' scheduler prediction_type -> diffusion.prediction
PREDICTION_TYPES = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}
_LAYOUT = ('a Stable Diffusion folder in the diffusers layout has unet/, vae/, text_encoder/ '
           'and tokenizer/ sub-folders (model_index.json and scheduler/ optional)')
_warned = set()


def sd_unet_fields(unet_config):
  """config.sd_unet's architecture fields from a diffusers unet/config.json dict (missing
  fields: UNet2DConditionModel's defaults; lists as tuples, a per-block field whose blocks all
  agree as an int)."""
  out = {}
  for field, default in SD_UNET_DEFAULTS.items():
    value = unet_config.get(field)
    value = default if value is None else value
    value = tuple(value) if isinstance(value, list) else value
    if field in _PER_BLOCK and isinstance(value, tuple) and len(set(value)) == 1:
      value = value[0]
    out[field] = value
  width = out['cross_attention_dim']
  if isinstance(width, tuple):
    _check(len(set(width)) == 1, 'model.pretrained', f'unet/config.json gives one '
           f'cross_attention_dim per block {width}: one width for every block is implemented')
    out['cross_attention_dim'] = width[0]
  return out


def _read_json(path, field):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'config.{field}: cannot read {path} ({e})') from e


def _same(old, new):
  old = tuple(old) if isinstance(old, list) else old
  if isinstance(old, tuple) and not isinstance(new, tuple):  # (8, 8, 8, 8) is 8 per block
    return len(set(old)) == 1 and old[0] == new
  return old == new


def _warn_once(message):
  if message not in _warned:  # validate runs more than once per launch
    _warned.add(message)
    logging.warning('%s', message)


def apply_pretrained(config):
  """Fills, in place, what config.model.pretrained's Stable Diffusion folder defines.

  The folder's unet/config.json defines the U-Net: it overwrites config.sd_unet's architecture
  fields (SD_UNET_DEFAULTS' names) and model.context_dim (= its cross_attention_dim), whatever
  the config file says; sd_unet.dropout and sd_unet.attention_impl stay. latent.autoencoder ''
  becomes FOLDER/vae; text.encoder 'minilm' (the default) or '' becomes FOLDER/text_encoder
  (its tokenizer in FOLDER/tokenizer); text.pad_tokens 'auto' becomes 'attend' (SD attends to
  all 77 CLIP states). A scheduler/scheduler_config.json, if there, must have
  diffusion.prediction's prediction_type; other schedule differences are warned about.

  validate calls it first; idempotent. Each change is logged once ('field: old -> new').

  Returns:
    The changes made, as 'field: old -> new' strings ([] without model.pretrained).

  Raises:
    ConfigError: model.name is not 'sd_unet', the folder or a sub-folder / file it needs is
      missing (named), or the folder's U-Net cannot serve this config (named, both values).
  """
  m = config.model
  folder = m.get('pretrained', '')
  _check(isinstance(folder, str), 'model.pretrained', f'must be a folder path, got {folder!r}')
  if not folder:
    return []
  _check(m.name == 'sd_unet', 'model.pretrained',
         f"is a Stable Diffusion folder, for model.name='sd_unet', not {m.name!r}")
  _check(os.path.isdir(folder), 'model.pretrained', f'{folder!r} is not a folder: {_LAYOUT} '
         '(e.g. a download of stable-diffusion-v1-5/stable-diffusion-v1-5)')

  def need(sub, names, what):
    d = os.path.join(folder, sub)
    _check(any(os.path.isfile(os.path.join(d, n)) for n in names), 'model.pretrained',
           f'{d} has no {what} ({" or ".join(names)}); {_LAYOUT}')
    return d

  need('unet', ('config.json',), 'config.json')
  need('unet', UNET_WEIGHTS, 'U-Net weights')
  unet_json = os.path.join(folder, 'unet', 'config.json')
  unet = _read_json(unet_json, 'model.pretrained')
  _check(unet.get('_class_name', 'UNet2DConditionModel') == 'UNet2DConditionModel',
         'model.pretrained', f'{unet_json} is a {unet.get("_class_name")}, not the '
         'UNet2DConditionModel of Stable Diffusion 1.x / 2.x')
  changes = []

  def put(node, path, value):
    leaf = path.rpartition('.')[2]
    if _same(node[leaf], value):
      return
    changes.append(f'{path}: {node[leaf]!r} -> {value!r}')
    with node.ignore_type():  # e.g. SD 2.x's per-block heads over the int default
      node[leaf] = value

  for field, value in sd_unet_fields(unet).items():
    put(config.sd_unet, f'sd_unet.{field}', value)
  put(m, 'model.context_dim', config.sd_unet.cross_attention_dim)
  if not config.latent.autoencoder:
    put(config.latent, 'latent.autoencoder', need('vae', ('config.json',), 'config.json'))
  if config.text.encoder in ('', 'minilm'):
    text = need('text_encoder', ('config.json',), 'config.json')
    tokenizer = [os.path.join(d, n) for d in (text, os.path.join(folder, 'tokenizer'))
                 for n in ('tokenizer.json', 'vocab.json')]
    _check(any(os.path.isfile(p) for p in tokenizer), 'model.pretrained',
           f'no CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt) in '
           f'{os.path.join(folder, "tokenizer")} or {text}; {_LAYOUT}')
    put(config.text, 'text.encoder', text)
  if config.text.get('pad_tokens', 'auto') == 'auto':
    put(config.text, 'text.pad_tokens', 'attend')
  channels = config.latent.channels
  _check(unet.get('in_channels', 4) == channels, 'model.pretrained',
         f'{unet_json} takes in_channels={unet.get("in_channels", 4)} but the model denoises '
         f'latent.channels={channels} (U-Nets with extra input channels, as SD inpainting\'s, '
         'are not supported)')

  scheduler = os.path.join(folder, 'scheduler', 'scheduler_config.json')
  if os.path.isfile(scheduler):
    sch, df = _read_json(scheduler, 'model.pretrained'), config.diffusion
    kind = sch.get('prediction_type', 'epsilon')
    _check(PREDICTION_TYPES.get(kind) == df.prediction, 'diffusion.prediction',
           f'{df.prediction!r}, but {scheduler} has prediction_type {kind!r} '
           f'(= {PREDICTION_TYPES.get(kind)!r}): the U-Net was trained on that target')
    theirs = {'diffusion.schedule': sch.get('beta_schedule'),
              'diffusion.beta_start': sch.get('beta_start'),
              'diffusion.beta_end': sch.get('beta_end'),
              'diffusion.num_timesteps': sch.get('num_train_timesteps')}
    differing = [f'{k}={_get(config, k)!r} (theirs {v!r})' for k, v in theirs.items()
                 if v is not None and v != _get(config, k)]
    if differing:
      _warn_once(f'config.model.pretrained: the diffusion schedule differs from {scheduler}, '
                 f'the one the U-Net was trained with: {", ".join(differing)}')
  if changes:
    logging.info('config.model.pretrained=%s defines the model (%s overrides the config file): '
                 '%s', folder, unet_json, '; '.join(changes))
  return changes


def _get(config, path):
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def validate(config, *, num_devices=1, process_count=1):
  """Checks types, ranges and combinations; raises ConfigError naming the field.

  First fills, in place, what config.model.pretrained defines (`apply_pretrained`).
  """
  apply_pretrained(config)
  d, m, df, tr, s = (config.data, config.model, config.diffusion, config.training,
                     config.sampling)
  _check(_is_int(config.seed), 'seed', f'must be an integer, got {config.seed!r}')
  ds = d.dataset
  _check(ds in ('digits', 'shapes') or (
      isinstance(ds, str) and (ds.startswith('tfds:') and len(ds) > 5
                               or ds.startswith('folder:') and len(ds) > 7)),
         'data.dataset',
         f"unknown dataset {ds!r}; use 'digits', 'shapes', 'tfds:NAME' or 'folder:/path'")
  for f in ('data.image_size', 'model.ch', 'model.num_res_blocks', 'diffusion.num_timesteps',
            'training.batch_size', 'training.num_steps', 'training.log_every',
            'training.checkpoint_every', 'training.keep_checkpoints', 'training.steps_per_dispatch',
            'training.max_nonfinite_steps', 'sampling.num_steps', 'sampling.num_samples',
            'sampling.batch_size', 'model.num_heads', 'model.num_groups', 'model.context_len'):
    _positive_int(config, f)
  for f in ('data.num_workers', 'data.low_res_size', 'model.cond_channels', 'model.context_dim',
            'optim.warmup_steps', 'training.sample_every', 'training.eval_every',
            'eval.bpd_num_examples'):
    _int_at_least(config, f, 0)
  for f in ('training.num_grid_samples', 'training.eval_num_samples', 'eval.num_samples',
            'eval.batch_size'):
    _positive_int(config, f)
  _int_at_least(config, 'sampling.checkpoint_step', -1)
  _check(_is_int(s.seed), 'sampling.seed', f'must be an integer, got {s.seed!r}')
  if ds.startswith('folder:'):
    _check(os.path.isdir(ds[7:]), 'data.dataset', f'{ds[7:]!r} is not a directory')
  _check(isinstance(d.split, str) and d.split != '', 'data.split',
         f'must be a non-empty split name, got {d.split!r}')
  _check(d.num_channels in (1, 3), 'data.num_channels', f'must be 1 or 3, got {d.num_channels!r}')
  _one_of(config, 'data.crop', 'crop')
  _one_of(config, 'model.name', 'model')
  size = _check_latent(config)  # the side of what the model denoises
  if m.name == 'unet':
    _check(len(m.ch_mult) > 0 and all(isinstance(c, int) and c > 0 for c in m.ch_mult),
           'model.ch_mult', f'must be a non-empty tuple of positive ints, got {m.ch_mult!r}')
    levels = len(m.ch_mult)
    factor = 2 ** (levels - 1)
    what = ('data.image_size' if size == d.image_size else
            f'the latent size {size} of data.image_size')
    _check(size % factor == 0, 'data.image_size',
           f'{what} is not divisible by 2**(len(model.ch_mult)-1) = {factor}; '
           f'use a multiple of {factor} or fewer levels in model.ch_mult')
    reached = [size // 2 ** i for i in range(levels)]
    for r in m.attn_resolutions:
      _check(r in reached, 'model.attn_resolutions',
             f'resolution {r} is never reached by the model (feature-map sizes: {reached})')
    for level, r in enumerate(reached):
      c = m.ch * m.ch_mult[level]
      _check(r not in m.attn_resolutions or c % m.num_heads == 0, 'model.num_heads',
             f'{m.num_heads} heads do not divide the {c} channels at attention resolution {r}')
  if m.name == 'dit':
    g = config.dit
    for f in ('dit.patch_size', 'dit.hidden_size', 'dit.depth', 'dit.num_heads'):
      _positive_int(config, f)
    _check(size % g.patch_size == 0, 'dit.patch_size',
           f'{g.patch_size} does not divide the model input side {size}')
    _check(g.hidden_size % g.num_heads == 0 and g.hidden_size % 4 == 0, 'dit.num_heads',
           f'{g.num_heads} heads must divide dit.hidden_size = {g.hidden_size} (a multiple of 4)')
    _check(m.cond_channels == 0, 'model.cond_channels', 'DiT takes no image condition; set 0')
    _check(m.context_dim == 0, 'model.context_dim', 'DiT takes no text condition; set 0')
  if m.name == 'sd_unet':
    _check_sd_unet(config, size)
  if m.name == 'autoencoder':
    _check_autoencoder(config)
  _check(d.low_res_size < d.image_size, 'data.low_res_size',
         f'{d.low_res_size} must be smaller than data.image_size = {d.image_size} (0 = off)')
  _check(m.cond_channels == 0 or d.low_res_size > 0, 'model.cond_channels',
         f'an image-conditional model ({m.cond_channels} channels) needs data.low_res_size > 0')
  _check(m.cond_channels == 0 or m.cond_channels == d.num_channels, 'model.cond_channels',
         f'{m.cond_channels} differs from data.num_channels = {d.num_channels} (the condition '
         'is the low-resolution image)')
  _number_in(config, 'model.dropout', 0.0, 1.0)
  _one_of(config, 'model.dtype', 'dtype')
  _one_of(config, 'model.conv_algorithm', 'conv_algorithm')
  _int_at_least(config, 'model.num_classes', 0)
  _int_at_least(config, 'data.num_classes', 0)
  if m.num_classes > 0:
    _check(d.num_classes == m.num_classes, 'model.num_classes',
           f'{m.num_classes} differs from config.data.num_classes = {d.num_classes}')
    _check(d.label_key != '', 'data.label_key',
           'a class-conditional model (model.num_classes > 0) needs labels')
  _one_of(config, 'diffusion.schedule', 'schedule')
  _one_of(config, 'diffusion.prediction', 'prediction')
  _check_formulation(config)
  _number_in(config, 'diffusion.beta_start', 0.0, 1.0, low_open=True)
  _number_in(config, 'diffusion.beta_end', 0.0, 1.0, low_open=True)
  _number_in(config, 'diffusion.cosine_s', 0.0, None, low_open=True)
  _check(0 < df.beta_start < df.beta_end < 1, 'diffusion.beta_start',
         f'need 0 < beta_start < beta_end < 1, got {df.beta_start}, {df.beta_end}')
  _one_of(config, 'optim.optimizer', 'optimizer')
  _one_of(config, 'optim.lr_schedule', 'lr_schedule')
  _check(isinstance(tr.ema_warmup, bool), 'training.ema_warmup',
         f'must be true or false, got {tr.ema_warmup!r}')
  _check(isinstance(tr.fsdp, bool), 'training.fsdp', f'must be true or false, got {tr.fsdp!r}')
  _number_in(config, 'optim.lr', 0.0, None, low_open=True)
  _number_in(config, 'optim.grad_clip', 0.0, None)
  _number_in(config, 'optim.b1', 0.0, 1.0)
  _number_in(config, 'optim.b2', 0.0, 1.0)
  _number_in(config, 'optim.eps', 0.0, None, low_open=True)
  _number_in(config, 'optim.weight_decay', 0.0, None)
  _number_in(config, 'training.ema_rate', 0.0, 1.0)
  _number_in(config, 'training.cond_dropout', 0.0, 1.0)
  _check(tr.batch_size % num_devices == 0, 'training.batch_size',
         f'{tr.batch_size} does not divide over {num_devices} devices; use a multiple of '
         f'{num_devices}')
  _check(tr.batch_size % process_count == 0, 'training.batch_size',
         f'{tr.batch_size} does not divide over {process_count} processes')
  _check(s.batch_size % num_devices == 0, 'sampling.batch_size',
         f'{s.batch_size} does not divide over {num_devices} devices; use a multiple of '
         f'{num_devices}')
  edm_sampler = s.sampler in choices('edm_sampler')  # continuous sigma: no T bound, own grid
  _one_of(config, 'sampling.sampler', 'sampler', extra=choices('edm_sampler'))
  _one_of(config, 'sampling.spacing', 'grid', extra=('auto',))
  _check(edm_sampler or s.num_steps <= df.num_timesteps, 'sampling.num_steps',
         f'{s.num_steps} exceeds diffusion.num_timesteps = {df.num_timesteps}')
  grid = s.spacing
  if grid == 'auto' and not edm_sampler:
    grid = default_grids()[s.sampler]
  _check(grid != 'dpm' or s.num_steps < df.num_timesteps, 'sampling.num_steps',
         f"{s.num_steps} steps on the 'dpm' grid need fewer than diffusion.num_timesteps = "
         f'{df.num_timesteps} (it skips t = 0)')
  _number_in(config, 'sampling.eta', 0.0, None)
  for f in ('sampling.s_churn', 'sampling.s_tmin', 'sampling.s_tmax'):
    _number_in(config, f, 0.0, None)
  _number_in(config, 'sampling.s_noise', 0.0, None, low_open=True)
  _check(s.s_tmin <= s.s_tmax, 'sampling.s_tmin', f'{s.s_tmin} exceeds sampling.s_tmax = {s.s_tmax}')
  _check(s.s_churn == 0 or s.sampler in ('heun', 'euler') or edm_sampler, 'sampling.s_churn',
         f"EDM's churn applies to the samplers 'heun', 'euler' and 'edm', not {s.sampler!r}; "
         'set it to 0 or choose one of them')
  _number_in(config, 'sampling.guidance_scale', 0.0, None)
  guided = m.num_classes > 0 or m.get('context_dim', 0) > 0
  _check(s.guidance_scale == 1.0 or guided, 'sampling.guidance_scale',
         f'{s.guidance_scale} needs a class- or text-conditional model (model.num_classes > 0 '
         'or model.context_dim > 0)')
  _check(_is_int(s.class_label) and -1 <= s.class_label < max(m.num_classes, 1),
         'sampling.class_label', f'{s.class_label!r} is not -1 (all) or a class in '
         f'[0, {m.num_classes})')
  _check_text(config)
  _check_sampling_inputs(config)


def _check_text(config):
  """A text model's data, encoder and prompts; prompts on a model without text."""
  d, m, s = config.data, config.model, config.sampling
  text = m.get('context_dim', 0) > 0
  for f in ('sampling.prompt', 'sampling.prompts_file', 'sampling.negative_prompt',
            'eval.clip_weights', 'text.encoder', 'data.caption_key'):
    _check(isinstance(_get(config, f), str), f, f'must be a string, got {_get(config, f)!r}')
  if not text:
    for f in ('sampling.prompt', 'sampling.prompts_file', 'sampling.negative_prompt'):
      _check(not _get(config, f), f, 'needs a text-conditional model (model.context_dim > 0)')
    return
  _check(d.dataset != 'digits', 'data.dataset',
         "a text model (model.context_dim > 0) needs captioned data; 'digits' has none: use "
         "'shapes', a tfds dataset with a text feature or a folder with .txt captions")
  _check(not d.dataset.startswith('tfds:') or d.caption_key != '', 'data.caption_key',
         "a text model on a tfds dataset needs its text feature, e.g. 'captions/text'")
  _check(config.text.encoder != '', 'text.encoder', "name an encoder: 'minilm' or a CLIP folder")
  _check(config.text.get('pad_tokens', 'auto') in ('auto', 'mask', 'attend'), 'text.pad_tokens',
         f"{config.text.get('pad_tokens')!r}: 'auto', 'mask' or 'attend'")
  _check(not (s.prompt and s.prompts_file), 'sampling.prompt',
         'set sampling.prompt or sampling.prompts_file, not both')
  _check(not s.prompts_file or os.path.isfile(os.path.expanduser(s.prompts_file)),
         'sampling.prompts_file', f'{s.prompts_file!r} is not a file')
  _check(config.eval.bpd_num_examples == 0, 'eval.bpd_num_examples',
         'bits/dim is not implemented for text models; set it to 0')
  _positive_int(config, 'text.batch_size')


def to_dict(config):
  """A JSON-able dict (tuples become lists)."""
  return json.loads(config.to_json())


def migrate(saved):
  """A saved config dict (config.json) with renamed fields (RENAMED) under their new names."""
  saved = json.loads(json.dumps(saved))  # a deep copy
  for old, new in RENAMED:
    og, _, ok = old.rpartition('.')
    ng, _, nk = new.rpartition('.')
    src = saved.get(og, {}) if og else saved
    if ok in src:
      (saved.setdefault(ng, {}) if ng else saved)[nk] = src.pop(ok)
  return saved


def from_dict(saved):
  """A run's saved config dict -> ConfigDict, on top of configs/default.py's fields.

  Renamed fields are migrated; fields added to default.py after the run was saved keep their
  defaults; JSON lists become the tuples the config declares.
  """
  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()

  def fill(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
        fill(node[key], value)
      else:
        value = tuple(value) if isinstance(value, list) else value
        try:
          node[key] = value
        except TypeError:  # e.g. SD 2.x's per-block heads (apply_pretrained) over the int default
          with node.ignore_type():
            node[key] = value
  fill(config, migrate(saved))
  return config


def load_run_config(workdir):
  """The config a run was trained with, from WORKDIR/config.json (train_lib writes it)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no {path}: not a training workdir, or give the config file')
  with open(path) as f:
    return from_dict(json.load(f))


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
