"""Sample quality against the number of model evaluations, for every sampler, on one checkpoint.

For each (sampler, steps) of --grid: generate --num_samples images with the same seed, score FID
(and KID) against the dataset's cached Inception statistics (eval_lib.reference_stats) and print a
markdown table. The README's sampler table is this script's output:

  python -m bench.sampler_quality --workdir runs/digits --num_samples 500

FID from N samples is biased upward by roughly a constant for a fixed N, so compare rows of one
table only (all rows share N and the seed), not with FIDs at other N. Inception runs on CPU at
only a few images per second here: 500 samples per row keep a 12-row table to about an hour on 2
cores; pass --num_samples 50000 on an accelerator for paper-comparable numbers.
Smoke run (tiny N, reference statistics of the first few images; the numbers mean nothing):
  python -m bench.sampler_quality --workdir WORKDIR --num_samples 16 --reference_images 16 \
      --grid 'ddpm:10;ddim:5;dpm_solver_pp_2m:5;heun:3'
"""

import json
import os
import time

from absl import app
from absl import flags

from bench.common import fid_reference
from bench.common import parse_grid


flags.DEFINE_string('workdir', None, 'training workdir (checkpoints/ and config.json)')
flags.DEFINE_string('config', '', 'config file (default: the workdir\'s config.json)')
flags.DEFINE_string('grid', 'ddpm:1000,100,20;ddim:100,20,10;dpm_solver_pp_2m:20,10,5;'
                    'heun:20,10,5', "'sampler:steps,steps;sampler:steps' rows to run")
flags.DEFINE_integer('num_samples', 500, 'samples per row')
flags.DEFINE_integer('seed', 0, 'sampling seed (the same for every row)')
flags.DEFINE_string('spacing', '', "timestep spacing for every row ('' = the config's)")
flags.DEFINE_integer('checkpoint_step', -1, 'checkpoint to sample (-1 = latest)')
flags.DEFINE_integer('reference_images', 0, 'use only the first N dataset images as the FID '
                     'reference (smoke runs; 0 = the whole split, cached once)')
flags.DEFINE_string('out', '', 'also write the markdown table to this file')
flags.DEFINE_bool('use_clipped_model_output', False, 'ddim rows: recompute eps from the '
                  'clipped x0 (the other samplers do not use eps)')
flags.DEFINE_enum('clip_x0', '', ['', 'true', 'false'], "clip predicted x0 to [-1, 1] ('' = "
                  "the config's sampling.clip_x0)")
flags.DEFINE_bool('real_row', True, 'add a row scoring --num_samples real images drawn from the '
                  'dataset (shuffled): the FID a perfect sampler would get at this N')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import config_lib  # pylint: disable=g-import-not-at-top
  import data as data_lib  # pylint: disable=g-import-not-at-top
  import eval_lib  # pylint: disable=g-import-not-at-top
  import experiment  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import sample_lib  # pylint: disable=g-import-not-at-top
  from diffusion import samplers  # pylint: disable=g-import-not-at-top
  from evaluation import fid as fid_lib  # pylint: disable=g-import-not-at-top

  if FLAGS.workdir is None:
    raise app.UsageError('--workdir is required')
  config = (config_lib.load_config_file(FLAGS.config) if FLAGS.config else
            config_lib.load_run_config(FLAGS.workdir))
  grid = parse_grid(FLAGS.grid)
  for name, steps in grid:
    if name not in samplers.SAMPLERS:
      raise app.UsageError(f'unknown sampler {name!r}; known: {sorted(samplers.SAMPLERS)}')
    if not 1 <= steps <= config.diffusion.num_timesteps:
      raise app.UsageError(f'{name}:{steps}: steps must be in '
                           f'[1, {config.diffusion.num_timesteps}]')
  if config.model.cond_channels > 0:
    raise app.UsageError('image-conditional models need condition images; not supported here')
  spacing = FLAGS.spacing or config.sampling.spacing
  clip_x0 = config.sampling.clip_x0 if not FLAGS.clip_x0 else FLAGS.clip_x0 == 'true'

  model = models.create_model(config)
  schedule = experiment.schedule(config)
  step, params = experiment.restore_params(config, FLAGS.workdir, step=FLAGS.checkpoint_step,
                                           use_ema=config.sampling.use_ema, module=model)
  _, inception_params = fid_lib.load_inception(config.eval.inception_weights)
  ref, ibs, _ = fid_reference(config, inception_params, FLAGS.reference_images,
                              FLAGS.num_samples, FLAGS.workdir)

  guided = config.model.num_classes > 0 and config.sampling.guidance_scale not in (0.0, 1.0)
  rows = []
  if FLAGS.real_row:
    real = next(data_lib.get_dataset(config, batch_size=FLAGS.num_samples, process_index=0,
                                     process_count=1, shuffle=True, repeat=True,
                                     seed=FLAGS.seed, uint8=True, augment=False))['image']
    result = eval_lib.fid_kid(real, ref, inception_params, batch_size=ibs)
    rows.append({'sampler': 'real data', 'steps': 0, 'model_evals': 0,
                 'fid': float(result['fid']), 'kid': float(result.get('kid', float('nan'))),
                 'num_samples': FLAGS.num_samples, 'generate_seconds': 0.0})
    print(json.dumps(rows[-1]), flush=True)
  for name, steps in grid:
    t0 = time.time()
    images = sample_lib.sample_images(config, model, schedule, params, FLAGS.num_samples,
                                 seed=FLAGS.seed, sampler=name, num_steps=steps, spacing=spacing,
                                 use_clipped_model_output=FLAGS.use_clipped_model_output,
                                 clip_x0=clip_x0)
    gen_s = time.time() - t0
    result = eval_lib.fid_kid(images, ref, inception_params, batch_size=ibs)
    row = {'sampler': name, 'steps': steps,
           'model_evals': (samplers.num_model_evals(name, schedule, steps, spacing=spacing)
                           * (2 if guided else 1)),
           'fid': float(result['fid']), 'kid': float(result.get('kid', float('nan'))),
           'num_samples': FLAGS.num_samples, 'generate_seconds': gen_s,
           'checkpoint_step': step, 'spacing': spacing, 'seed': FLAGS.seed,
           'use_clipped_model_output': FLAGS.use_clipped_model_output, 'clip_x0': clip_x0}
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(FLAGS.workdir, 'sampler_quality.jsonl'), 'a') as f:
      f.write(json.dumps(row) + '\n')

  ref_desc = (f'the first {FLAGS.reference_images} images' if FLAGS.reference_images > 0 else
              f"all {ref.get('num_images', '?')} images")
  lines = [f'Checkpoint step {step} of {FLAGS.workdir}; {FLAGS.num_samples} samples per row '
           f'(seed {FLAGS.seed}, {spacing} spacing); FID/KID against {ref_desc} of '
           f'{config.data.dataset} ({config.data.split}).', '',
           '| sampler | steps | model evaluations | FID | KID | seconds to generate |',
           '|---|---|---|---|---|---|']
  for r in rows:
    if r['sampler'] == 'real data':
      lines.append(f"| real images (no sampler; the floor at this N) | - | - | {r['fid']:.2f} | "
                   f"{r['kid']:.4f} | - |")
      continue
    lines.append(f"| {r['sampler']} | {r['steps']} | {r['model_evals']} | {r['fid']:.2f} | "
                 f"{r['kid']:.4f} | {r['generate_seconds']:.0f} |")
  by_key = {(r['sampler'], r['steps']): r['fid'] for r in rows}
  for solver, desc in (('dpm_solver_pp_2m', 'DPM-Solver++(2M)'),
                       ('dpm_solver_pp_2m_sde', 'DPM-Solver++(2M) SDE')):
    if ('ddpm', 1000) in by_key and (solver, 20) in by_key:
      ratio = by_key[(solver, 20)] / by_key[('ddpm', 1000)]
      lines += ['', f'{desc} at 20 evaluations / DDPM at 1,000 steps: FID ratio {ratio:.3f} '
                    f'(target <= 1.10)']
  table = '\n'.join(lines)
  print('\n' + table)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
