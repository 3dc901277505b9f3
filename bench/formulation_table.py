"""FID against the number of model evaluations, for several trained workdirs (issue 16's check).

For every workdir of --workdirs and every (sampler, steps) of --grid: set config.sampling.sampler
and .num_steps (and eval.num_samples) on the run's saved config, exactly as
`python main.py --mode eval --config.sampling.sampler=S --config.sampling.num_steps=N
--config.eval.num_samples=K` would, generate with eval_lib.eval_samples (same seed for every row)
and score FID / KID against the dataset's cached Inception statistics (eval_lib.reference_stats,
computed once: `--mode fid_stats`). Samplers are those of diffusion/samplers.py and EDM's 'edm';
either runs a model of either formulation (config.diffusion.formulation) through the VP bridge of
diffusion/edm.py. Evaluations are counted on the grid the sampler actually walks (a DDPM
model's EDM grid is rounded to its schedule's steps and may merge points), times 2 under
classifier-free guidance.

Rows are appended to OUT_DIR/rows.jsonl as they finish and a rerun skips the rows already there
(same workdir, checkpoint, sampler, steps, samples and seed), so an interrupted table resumes;
OUT_DIR/table.md gets the markdown tables, OUT_DIR/grids/ a PNG of each row's first 64 samples.

The table of bench/RESULTS.md ("FID against model evaluations, both formulations and both
backbones"): four 600-step digits runs, then 16 rows of 256 samples and a real-digits row (2
shared CPU cores, 2026-12-03: 17 minutes of training, 22 of reference statistics, 40 of rows):

  for c in digits digits_edm digits_dit digits_dit_edm; do
    python main.py --config configs/$c.py --workdir /tmp/table/$c \
        --config.training.num_steps=600 --config.training.sample_every=0 \
        --config.training.checkpoint_every=600
  done
  python main.py --config configs/digits.py --workdir /tmp/table/digits --mode fid_stats
  python -m bench.formulation_table --out_dir /tmp/table/out --num_samples 256 \
      --workdirs /tmp/table/digits,/tmp/table/digits_edm,/tmp/table/digits_dit,/tmp/table/digits_dit_edm \
      --grid_ddpm 'dpm_solver_pp_2m:11,19,35;edm:10' --grid_edm 'edm:6,10,18;dpm_solver_pp_2m:19'

(EDM's sampler at N = 6, 10, 18 takes 11, 19, 35 evaluations, on either formulation's grid here;
DPM-Solver++(2M) one per step.) Add --table_only to reprint the table of the rows done so far.

FID from N samples is biased upward, by about the same amount for every row at one N: compare
rows of one table only. Smoke run (the numbers mean nothing):
  python -m bench.formulation_table --workdirs WORKDIR --out_dir /tmp/ft_smoke --num_samples 16 \\
      --reference_images 16 --grid 'edm:3;dpm_solver_pp_2m:5' --real_row=false
"""

import json
import os
import time

from absl import app
from absl import flags

from bench.common import fid_reference
from bench.common import parse_grid


flags.DEFINE_list('workdirs', None, 'training workdirs (checkpoints/ and config.json), comma '
                  'separated')
flags.DEFINE_string('grid', 'edm:6,10,18;dpm_solver_pp_2m:11,19,35',
                    "'sampler:steps,steps;sampler:steps' rows run on every workdir")
flags.DEFINE_string('grid_ddpm', '', "rows for the workdirs of formulation 'ddpm' instead of "
                    "--grid ('' = --grid)")
flags.DEFINE_string('grid_edm', '', "rows for the workdirs of formulation 'edm' instead of "
                    "--grid ('' = --grid)")
flags.DEFINE_bool('table_only', False, 'run nothing: print the table of the rows already in '
                  'OUT_DIR/rows.jsonl for these workdirs and grids (a partial table)')
flags.DEFINE_integer('num_samples', 500, 'samples per row')
flags.DEFINE_integer('seed', 0, 'sampling seed (config.sampling.seed; the same for every row)')
flags.DEFINE_integer('checkpoint_step', -1, 'checkpoint to sample (-1 = latest)')
flags.DEFINE_string('out_dir', None, 'rows.jsonl, table.md and grids/ go here')
flags.DEFINE_integer('reference_images', 0, 'use only the first N dataset images as the FID '
                     'reference (smoke runs; 0 = the whole split, cached once)')
flags.DEFINE_bool('real_row', True, 'also score --num_samples real images drawn from the '
                  'dataset (shuffled): the FID a perfect model would get at this N')
FLAGS = flags.FLAGS


def model_evals(config, schedule, sampler, steps):
  """Network evaluations per sample of one row (the grid actually walked; x2 with guidance)."""
  from diffusion import edm  # pylint: disable=g-import-not-at-top
  from diffusion import samplers  # pylint: disable=g-import-not-at-top
  s = config.sampling
  if sampler in edm.SAMPLERS:
    sigmas, _ = edm.sampler_grid(schedule, config.diffusion.formulation, steps, s.sigma_min,
                                 s.sigma_max, s.rho)
    n = edm.num_evals(sigmas)
  else:
    n = samplers.num_model_evals(sampler, schedule, steps, spacing=s.spacing)
  guided = config.model.num_classes > 0 and s.guidance_scale not in (0.0, 1.0)
  return n * (2 if guided else 1)


def label(config):
  return f'{config.model.name}-{config.diffusion.formulation}'


def _row_key(r):
  return (r['workdir'], r['checkpoint_step'], r['sampler'], r['steps'], r['num_samples'],
          r['seed'])


def markdown(rows, num_samples, ref_desc):
  """The long table (one line per row) and the pivot: FID per model and sampler at each budget."""
  lines = [f'{num_samples} samples per row (seed {rows[0]["seed"] if rows else 0}); FID / KID '
           f'against {ref_desc}.', '',
           '| model | formulation | sampler | steps | model evaluations | FID | KID | '
           'seconds to generate |', '|---|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    if r['sampler'] == 'real data':
      lines.append(f"| real digits (the floor at this N) | - | - | - | - | {r['fid']:.2f} | "
                   f"{r['kid']:.4f} | - |")
      continue
    lines.append(f"| {r['model']} | {r['formulation']} | {r['sampler']} | {r['steps']} | "
                 f"{r['model_evals']} | {r['fid']:.2f} | {r['kid']:.4f} | "
                 f"{r['generate_seconds']:.0f} |")
  gen = [r for r in rows if r['sampler'] != 'real data']
  budgets = sorted({r['model_evals'] for r in gen})
  pairs = []
  for r in gen:
    if (r['label'], r['sampler']) not in pairs:
      pairs.append((r['label'], r['sampler']))
  if pairs:
    lines += ['', '| model (backbone-formulation) | sampler | ' +
              ' | '.join(f'{b} evals' for b in budgets) + ' |',
              '|---|---|' + '---:|' * len(budgets)]
    for lab, sampler in pairs:
      fid = {r['model_evals']: r['fid'] for r in gen
             if r['label'] == lab and r['sampler'] == sampler}
      cells = [f'{fid[b]:.2f}' if b in fid else '' for b in budgets]
      lines.append(f'| {lab} | {sampler} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  import config_lib  # pylint: disable=g-import-not-at-top
  import data as data_lib  # pylint: disable=g-import-not-at-top
  import eval_lib  # pylint: disable=g-import-not-at-top
  import experiment  # pylint: disable=g-import-not-at-top
  import image_io  # pylint: disable=g-import-not-at-top
  from diffusion import edm  # pylint: disable=g-import-not-at-top
  from diffusion import samplers  # pylint: disable=g-import-not-at-top
  from evaluation import fid as fid_lib  # pylint: disable=g-import-not-at-top

  if not FLAGS.workdirs or not FLAGS.out_dir:
    raise app.UsageError('--workdirs and --out_dir are required')
  grids = {'ddpm': parse_grid(FLAGS.grid_ddpm or FLAGS.grid),
           'edm': parse_grid(FLAGS.grid_edm or FLAGS.grid)}
  for name, _ in grids['ddpm'] + grids['edm']:
    if name not in samplers.SAMPLERS and name not in edm.SAMPLERS:
      raise app.UsageError(f'unknown sampler {name!r}; known: '
                           f'{sorted(samplers.SAMPLERS) + sorted(edm.SAMPLERS)}')
  os.makedirs(os.path.join(FLAGS.out_dir, 'grids'), exist_ok=True)
  rows_path = os.path.join(FLAGS.out_dir, 'rows.jsonl')
  done = {}
  if os.path.exists(rows_path):
    with open(rows_path) as f:
      for line in f:
        r = json.loads(line)
        done[_row_key(r)] = r

  def run_config(workdir, sampler=None, steps=None):
    config = config_lib.load_run_config(workdir)
    config_lib.set_field(config, 'sampling.seed', FLAGS.seed)
    config_lib.set_field(config, 'sampling.checkpoint_step', FLAGS.checkpoint_step)
    config_lib.set_field(config, 'eval.num_samples', FLAGS.num_samples)
    if sampler is not None:
      config_lib.set_field(config, 'sampling.sampler', sampler)
      config_lib.set_field(config, 'sampling.num_steps', steps)
    config_lib.validate(config)
    return config

  first = run_config(FLAGS.workdirs[0])
  _, inception_params = fid_lib.load_inception(first.eval.inception_weights)
  ref, ibs, ref_desc = fid_reference(first, inception_params, FLAGS.reference_images,
                                     FLAGS.num_samples, FLAGS.out_dir)

  rows = []

  def record(row):
    rows.append(row)
    print(json.dumps(row), flush=True)
    if _row_key(row) not in done:
      with open(rows_path, 'a') as f:
        f.write(json.dumps(row) + '\n')
      done[_row_key(row)] = row

  # Every workdir's params first, then the rows interleaved (each workdir's first row, then
  # each one's second, ...), so that a table stopped early still covers every model.
  runs = []
  for workdir in FLAGS.workdirs:
    base = run_config(workdir)
    if base.data.dataset != first.data.dataset or base.data.image_size != first.data.image_size:
      raise app.UsageError(f'{workdir}: {base.data.dataset} at {base.data.image_size}px, not '
                           f'{first.data.dataset} at {first.data.image_size}px as the first')
    model, schedule = experiment.model(base), experiment.schedule(base)
    if FLAGS.table_only:
      step = experiment.checkpoint_steps(workdir)[-1] if FLAGS.checkpoint_step < 0 else (
          FLAGS.checkpoint_step)
      params = None
    else:
      step, params = experiment.sampling_params(base, workdir, step=FLAGS.checkpoint_step,
                                                use_ema=base.sampling.use_ema, module=model)
    runs.append((workdir, model, schedule, step, params, grids[base.diffusion.formulation]))
  for i in range(max(len(g) for *_, g in runs)):
    for workdir, model, schedule, step, params, wgrid in runs:
      if i >= len(wgrid):
        continue
      name, steps = wgrid[i]
      config = run_config(workdir, name, steps)
      row = {'workdir': workdir, 'checkpoint_step': step, 'sampler': name, 'steps': steps,
             'num_samples': FLAGS.num_samples, 'seed': FLAGS.seed}
      if _row_key(row) in done:
        rows.append(done[_row_key(row)])
        continue
      if FLAGS.table_only:
        continue
      t0 = time.time()
      images = eval_lib.eval_samples(config, model, schedule, params, FLAGS.num_samples)
      gen_s = time.time() - t0
      result = eval_lib.fid_kid(images, ref, inception_params, batch_size=ibs)
      tag = f'{os.path.basename(os.path.normpath(workdir))}_{name}_{steps}'
      image_io.write_grid(os.path.join(FLAGS.out_dir, 'grids', f'{tag}.png'), images[:64])
      row.update(label=label(config), model=config.model.name,
                 formulation=config.diffusion.formulation,
                 model_evals=model_evals(config, schedule, name, steps),
                 fid=float(result['fid']), kid=float(result.get('kid', float('nan'))),
                 generate_seconds=gen_s, fid_seconds=time.time() - t0 - gen_s,
                 schedule=config.diffusion.schedule, prediction=config.diffusion.prediction,
                 guidance_scale=config.sampling.guidance_scale)
      record(row)
  # The real-data row last: it does not depend on the models.
  if FLAGS.real_row:
    key = ('real data', -1, 'real data', 0, FLAGS.num_samples, FLAGS.seed)
    if key in done:
      rows.append(done[key])
    elif not FLAGS.table_only:
      real = next(data_lib.get_dataset(first, batch_size=FLAGS.num_samples, process_index=0,
                                       process_count=1, shuffle=True, repeat=True,
                                       seed=FLAGS.seed, uint8=True, augment=False))['image']
      result = eval_lib.fid_kid(real, ref, inception_params, batch_size=ibs)
      record({'workdir': 'real data', 'checkpoint_step': -1, 'sampler': 'real data', 'steps': 0,
              'num_samples': FLAGS.num_samples, 'seed': FLAGS.seed, 'model_evals': 0,
              'fid': float(result['fid']), 'kid': float(result.get('kid', float('nan')))})

  rows.sort(key=lambda r: (r['sampler'] != 'real data', FLAGS.workdirs.index(r['workdir'])
                           if r['workdir'] in FLAGS.workdirs else -1,
                           r['sampler'], r.get('model_evals', 0)))

  table = markdown(rows, FLAGS.num_samples, ref_desc)
  print('\n' + table)
  with open(os.path.join(FLAGS.out_dir, 'table.md'), 'w') as f:
    f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
