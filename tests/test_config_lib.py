"""Config checks: every bad launch fails before compilation with a one-line reason naming the field.

Most cases go through the real command line (`python main.py ...` in a subprocess): the check
is that the process exits with status 2, prints one line `error: ...` that names the field, and
shows no traceback. Validation runs before jax is imported, so each case takes well under a
second; the one device-dependent case imports jax.
"""

import json
import os
import subprocess
import sys

import pytest

import config_lib
from configs import default
from tests import sd_folder
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(args, env_extra=None, timeout=120):
  env = dict(os.environ)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env, timeout=timeout,
                        capture_output=True, text=True)


# (override(s), the text the one-line error must contain). Each is a launch that cannot work.
BAD_LAUNCHES = [
    (['--config.optim.lrr=1e-4'], "'optim.lr'"),  # typo: names the close match
    (['--config.optim=1'], 'optim'),  # a group, not a field
    (['--config.training.batch_size=abc'], 'training.batch_size'),  # type
    (['--config.training.batch_size=2.5'], 'training.batch_size'),  # type
    (['--config.training.batch_size=0'], 'training.batch_size'),  # range
    (['--config.optim.lr=-1e-4'], 'optim.lr'),
    (['--config.optim.lr=nan'], 'optim.lr'),
    (['--config.training.ema_rate=1.5'], 'training.ema_rate'),
    (['--config.model.dropout=1.0'], 'model.dropout'),
    (['--config.diffusion.beta_end=0.00001'], 'diffusion.beta_start'),  # beta_start >= beta_end
    (['--config.model.attn_resolutions=(3,)'], 'model.attn_resolutions'),  # never reached
    (['--config.model.ch_mult=(1,2,2,2,2,2)'], 'data.image_size'),  # 16 px cannot go 5 levels
    (['--config.data.image_size=18'], 'data.image_size'),  # not divisible by 4
    (['--config.sampling.sampler=lms'], 'sampling.sampler'),
    (['--config.sampling.s_churn=40'], 'sampling.s_churn'),  # ddpm takes no churn
    (['--config.sampling.sampler=heun', '--config.sampling.s_noise=0'], 'sampling.s_noise'),
    (['--config.data.dataset=mnist'], 'data.dataset'),
    (['--config.data.dataset=folder:/no/such/dir'], 'data.dataset'),
    (['--config.diffusion.schedule=sigmoid'], 'diffusion.schedule'),
    (['--config.diffusion.prediction=score'], 'diffusion.prediction'),
    (['--config.optim.optimizer=sgd'], 'optim.optimizer'),
    (['--config.optim.lr_schedule=exponential'], 'optim.lr_schedule'),
    (['--config.sampling.num_steps=5000'], 'sampling.num_steps'),  # > num_timesteps
    (['--config.model.num_heads=3'], 'model.num_heads'),  # 3 does not divide 64 channels
    (['--config.model.num_classes=7'], 'model.num_classes'),  # != data.num_classes
    (['--config.model.cond_channels=1'], 'model.cond_channels'),  # no low-res images
    (['--config.data.num_channels=2'], 'data.num_channels'),
    (['--config.training.keep_checkpoints=0'], 'training.keep_checkpoints'),
    (['--config.sampling.class_label=10'], 'sampling.class_label'),
    (['--config.data.crop=square'], 'data.crop'),
    (['--mode=fit'], '--mode'),
    (['--config.model.dtype=float16'], 'model.dtype'),
    (['--config.model.conv_algorithm=fft'], 'model.conv_algorithm'),
    (['--config.sampling.spacing=uniform'], 'sampling.spacing'),
    (['--config.sampling.strength=1.5'], 'sampling.strength'),
    (['--config.sampling.resample=0'], 'sampling.resample'),
    (['--config.sampling.mask=m.png'], 'sampling.mask'),  # no init_image
    (['--config.sampling.cond_image=c.png'], 'sampling.cond_image'),  # not image-conditional
    (['--config.sampling.cascade_base_config=configs/digits.py'], 'sampling.cascade_base_config'),
    (['--config.sampling.sampler=dpm_solver_pp_2m', '--config.sampling.num_steps=1000'],
     'sampling.num_steps'),  # the 'dpm' grid skips t = 0
]


def _assert_one_line_failure(result, field):
  out = result.stdout + result.stderr
  assert result.returncode == 2, out
  assert 'Traceback' not in out, out
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, out
  assert lines[0].startswith('error: ') and field in lines[0], lines[0]


@pytest.mark.parametrize('overrides,field', BAD_LAUNCHES,
                         ids=[' '.join(o) for o, _ in BAD_LAUNCHES])
def test_bad_launch_fails_fast_with_one_line(overrides, field, tmp_path):
  result = _run_main(['--config', 'configs/digits.py', '--workdir', str(tmp_path / 'w'),
                      *overrides], timeout=60)
  _assert_one_line_failure(result, field)
  # Nothing was started: the workdir was not even created.
  assert not (tmp_path / 'w').exists()


def test_missing_config_file_and_workdir_fail_with_one_line(tmp_path):
  _assert_one_line_failure(_run_main(['--config', 'configs/nope.py', '--workdir', str(tmp_path)]),
                           'configs/nope.py')
  _assert_one_line_failure(_run_main(['--config', 'configs/digits.py']), '--workdir')


def test_batch_that_does_not_divide_over_the_devices_fails_before_compiling(tmp_path):
  # 8 emulated devices; 60 examples do not split 8 ways. This check needs jax's device count,
  # so it runs after `import jax`, still before any model or data is touched.
  result = _run_main(['--config', 'configs/digits.py', '--workdir', str(tmp_path / 'w'),
                      '--config.training.batch_size=60'],
                     env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
                                'JAX_PLATFORMS': 'cpu'})
  _assert_one_line_failure(result, 'training.batch_size')
  assert '8 devices' in result.stderr
  assert not (tmp_path / 'w').exists()


def _vae_folder(path, factor=8, latent_channels=4, image_channels=3):
  """A diffusers AutoencoderKL folder's config.json (SD's VAE by default) and an empty weights
  file: what validate reads."""
  os.makedirs(path, exist_ok=True)
  blocks = [128 * 2 ** i for i in range(factor.bit_length())]
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'_class_name': 'AutoencoderKL', 'in_channels': image_channels,
               'out_channels': image_channels, 'block_out_channels': blocks,
               'latent_channels': latent_channels}, f)
  open(os.path.join(path, 'diffusion_pytorch_model.safetensors'), 'wb').close()
  return path


def test_every_experiment_config_is_valid_on_one_device(tmp_path, monkeypatch):
  """Latent configs name weights that are not here: they must fail on exactly that, and pass
  once the folder is there."""
  monkeypatch.chdir(tmp_path)  # relative workdirs they name (runs/digits_ae) are not here
  names = [f for f in os.listdir(os.path.join(ROOT, 'configs'))
           if f.endswith('.py') and f != '__init__.py']
  assert 'digits.py' in names and 'default.py' in names
  sd = sd_folder.write_sd15_stub(str(tmp_path / 'sd15'))  # config files, empty weights
  latent = []
  for name in names:
    config = config_lib.load_config_file(os.path.join(ROOT, 'configs', name))
    if config.model.pretrained and not os.path.isdir(config.model.pretrained):
      with pytest.raises(config_lib.ConfigError, match='model.pretrained'):
        config_lib.validate(config)
      config.model.pretrained = sd
      latent.append(name)
    if config.latent.autoencoder and not os.path.isdir(config.latent.autoencoder):
      with pytest.raises(config_lib.ConfigError, match='latent.autoencoder'):
        config_lib.validate(config)
      # An autoencoder of the geometry the config names (test_latent_configs_fit_...: the one
      # its autoencoder config trains).
      lat = config.latent
      config.latent.autoencoder = _vae_folder(str(tmp_path / f'vae_{name}'), lat.factor,
                                              lat.channels, config.data.num_channels)
      latent.append(name)
    config_lib.validate(config)
  assert {'dit_xl2.py', 'sd15.py', 'digits_latent.py', 'shapes_latent_text.py',
          'lsun_churches_ldm_kl8.py'} <= set(latent)


@pytest.mark.parametrize('latent_config,autoencoder_config', [
    ('digits_latent.py', 'digits_autoencoder.py'),
    ('shapes_latent_text.py', 'shapes_autoencoder.py'),
    ('lsun_churches_ldm_kl8.py', 'lsun_churches_autoencoder_kl8.py'),
])
def test_latent_configs_fit_the_autoencoder_their_docstring_trains(latent_config,
                                                                   autoencoder_config):
  """The latent config's default latent.autoencoder is the workdir its autoencoder config's
  command writes, and it names that autoencoder's factor, channels and data."""
  lat_cfg = config_lib.load_config_file(os.path.join(ROOT, 'configs', latent_config))
  ae_cfg = config_lib.load_config_file(os.path.join(ROOT, 'configs', autoencoder_config))
  assert ae_cfg.model.name == 'autoencoder'
  config_lib.validate(ae_cfg)
  ae, lat = ae_cfg.autoencoder, lat_cfg.latent
  assert lat.factor == 2 ** (len(ae.block_out_channels) - 1)
  assert lat.channels == ae.latent_channels
  for field in ('dataset', 'image_size', 'num_channels', 'crop'):
    assert lat_cfg.data[field] == ae_cfg.data[field], field
  with open(os.path.join(ROOT, 'configs', latent_config)) as f:
    doc = f.read()
  assert (f'--config configs/{autoencoder_config} --workdir {lat.autoencoder}\n' in doc), (
      'the docstring trains the autoencoder into the workdir the config names')


@pytest.mark.parametrize('key,value,field', [
    ('seed', 1.5, 'seed'),
    ('training.batch_size', True, 'training.batch_size'),  # a bool is not a count
    ('optim.b2', 1.0, 'optim.b2'),
    ('optim.eps', 0.0, 'optim.eps'),
    ('diffusion.cosine_s', -0.1, 'diffusion.cosine_s'),
    ('data.low_res_size', 16, 'data.low_res_size'),  # not below image_size
    ('sampling.checkpoint_step', -2, 'sampling.checkpoint_step'),
    ('training.sample_every', -1, 'training.sample_every'),
    ('sampling.guidance_scale', 3.0, 'sampling.guidance_scale'),  # unconditional model
    ('model.ch_mult', (), 'model.ch_mult'),
    ('eval.batch_size', 0, 'eval.batch_size'),
])
def test_validate_names_the_field(key, value, field):
  config = tiny_config()
  config.model.num_classes = 0
  with config.unlocked():
    node = config
    *groups, leaf = key.split('.')
    for g in groups:
      node = node[g]
    # Bypass the ConfigDict's type lock: a config *file* can hold any type.
    node._fields[leaf] = value  # pylint: disable=protected-access
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')) as e:
    config_lib.validate(config)
  assert '\n' not in str(e.value)


def test_device_and_process_counts():
  config = tiny_config(**{'training.batch_size': 12, 'sampling.batch_size': 8})
  config_lib.validate(config, num_devices=4, process_count=2)
  with pytest.raises(config_lib.ConfigError, match='training.batch_size.*8 devices'):
    config_lib.validate(config, num_devices=8)
  with pytest.raises(config_lib.ConfigError, match='sampling.batch_size.*3 devices'):
    config_lib.validate(tiny_config(**{'training.batch_size': 12}), num_devices=3)


def test_check_overrides():
  config = default.get_config()
  config_lib.check_overrides(config, ['main.py', '--config.optim.lr=1', '--workdir=x'])
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'training.batch_size'"):
    config_lib.check_overrides(config, ['--config.training.batchsize=3'])
  with pytest.raises(config_lib.ConfigError, match='names a group'):
    config_lib.check_overrides(config, ['--config.model=3'])


def test_set_field_reads_literals_and_rejects_unknown_fields():
  config = default.get_config()
  config_lib.set_field(config, 'optim.lr', '1e-4')
  config_lib.set_field(config, 'model.ch_mult', '(1, 2)')
  config_lib.set_field(config, 'data.dataset', 'folder:/x')
  config_lib.set_field(config, 'seed', 3)
  assert (config.optim.lr, config.model.ch_mult, config.data.dataset, config.seed) == (
      1e-4, (1, 2), 'folder:/x', 3)
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'optim.lr'"):
    config_lib.set_field(config, 'optim.lrr', 1.0)
  with pytest.raises(config_lib.ConfigError, match='Python literal'):
    config_lib.set_field(config, 'optim.lr', 'fast')


def test_diff_ignores_resumable_fields_and_lists_the_others():
  a = config_lib.to_dict(tiny_config())
  b = config_lib.to_dict(tiny_config(**{'training.num_steps': 99, 'sampling.num_steps': 5,
                                        'optim.lr': 0.5, 'model.ch': 32}))
  assert config_lib.diff(a, b) == ['model.ch: 16 -> 32', 'optim.lr: 0.001 -> 0.5']
  assert config_lib.diff(a, json.loads(json.dumps(a))) == []


def test_name_lists_are_the_registries():
  """config_lib reads each registry's names from its source (no jax); they must be the ones the
  imported module registers."""
  import train_lib  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  from data import preprocess  # pylint: disable=g-import-not-at-top
  from diffusion import edm, grids, losses, process, samplers, schedules  # pylint: disable=g-import-not-at-top
  from models import layers, winograd  # pylint: disable=g-import-not-at-top
  imported = {'schedule': schedules._BETAS, 'prediction': process.PREDICTIONS,
              'sampler': samplers.SAMPLERS, 'grid': grids.GRIDS, 'optimizer': train_lib.OPTIMIZERS,
              'lr_schedule': train_lib.LR_SCHEDULES,
              'model': models._BUILDERS, 'dtype': layers.SUPPORTED_DTYPES,
              'conv_algorithm': winograd.CONV_ALGORITHMS, 'crop': preprocess.CROPS,
              'formulation': edm.FORMULATIONS, 'edm_sampler': edm.SAMPLERS,
              'loss_type': losses.LOSS_TYPES}
  assert set(imported) == set(config_lib.REGISTRIES)
  for kind, registry in imported.items():
    assert config_lib.choices(kind) == tuple(registry), kind
  assert config_lib.default_grids() == {k: v.default_grid for k, v in samplers.SAMPLERS.items()}


def test_a_saved_config_from_before_a_rename_or_a_new_field_still_resumes():
  current = config_lib.to_dict(tiny_config())
  old = json.loads(json.dumps(current))
  old['training']['label_dropout'] = old['training'].pop('cond_dropout')  # the old name
  del old['model']['conv_algorithm']  # a field added since
  restored = config_lib.to_dict(config_lib.from_dict(old))
  assert config_lib.diff(restored, current) == []
  assert restored['training']['cond_dropout'] == current['training']['cond_dropout']
