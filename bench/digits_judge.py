"""Cheap judges of digits samples, per sampler, without Inception: what issue 17 checks.

For each (sampler, steps) of --grid, --num_samples images from one checkpoint (same seed), and:
- `confident`: the share a logistic regression trained on 75% of the real digits (pixels / 255)
  classifies with probability >= --confidence; the held-out real digits give the ceiling;
- `pixel_fd`: the Frechet distance between Gaussians fitted to the flattened pixels / 255 of the
  samples and of all real digits; --num_samples real digits drawn at random give the floor.

  python -m bench.digits_judge --workdir runs/digits --num_samples 1000 \
      --grid 'ddpm:1000;ddim:50;dpm_solver_pp_2m:20'
"""

import json
import time

from absl import app
from absl import flags

from bench.common import fit_classifier
from bench.common import parse_grid
from bench.common import real_digits

flags.DEFINE_string('workdir', None, 'training workdir (checkpoints/ and config.json)')
flags.DEFINE_string('grid', 'ddpm:1000;ddim:50;dpm_solver_pp_2m:20', 'sampler:steps rows')
flags.DEFINE_integer('num_samples', 1000, 'samples per row')
flags.DEFINE_integer('seed', 0, 'sampling seed (the same for every row)')
flags.DEFINE_float('confidence', 0.9, 'probability at which a classification counts as confident')
flags.DEFINE_string('out', '', 'append the JSON rows to this file')
FLAGS = flags.FLAGS


def pixel_fd(a, b):
  """Frechet distance of Gaussians fitted to the rows of a [N, D] and b [M, D] (float64)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from evaluation import metrics  # pylint: disable=g-import-not-at-top
  return float(metrics.fid(a.mean(0), np.cov(a, rowvar=False),
                                        b.mean(0), np.cov(b, rowvar=False)))


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  import config_lib  # pylint: disable=g-import-not-at-top
  import experiment  # pylint: disable=g-import-not-at-top
  import sample_lib  # pylint: disable=g-import-not-at-top
  from diffusion import samplers  # pylint: disable=g-import-not-at-top

  if FLAGS.workdir is None:
    raise app.UsageError('--workdir is required')
  config = config_lib.load_run_config(FLAGS.workdir)
  images, labels = real_digits(config)
  clf, _ = fit_classifier(images, labels, 0.25)
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  _, held_out = train_test_split(images.reshape(len(images), -1) / 255.0, test_size=0.25,
                                 random_state=0, stratify=labels)
  real = images.reshape(len(images), -1) / 255.0
  confident = lambda x: float((clf.predict_proba(x).max(1) >= FLAGS.confidence).mean())
  pick = np.random.default_rng(FLAGS.seed).choice(len(real), min(FLAGS.num_samples, len(real)),
                                                  replace=False)
  rows = [{'sampler': 'real digits', 'steps': 0, 'confident': confident(held_out),
           'pixel_fd': pixel_fd(real[pick], real), 'num_samples': len(pick)}]
  print(json.dumps(rows[-1]), flush=True)

  model = experiment.model(config)
  schedule = experiment.schedule(config)
  step, params = experiment.restore_params(config, FLAGS.workdir, module=model,
                                           use_ema=config.sampling.use_ema)
  for name, steps in parse_grid(FLAGS.grid):
    t0 = time.time()
    out = sample_lib.sample_images(config, model, schedule, params, FLAGS.num_samples,
                                   seed=FLAGS.seed, sampler=name, num_steps=steps)
    x = np.asarray(out, np.float64).reshape(len(out), -1) / 255.0
    rows.append({'sampler': name, 'steps': steps,
                 'model_evals': samplers.num_model_evals(name, schedule, steps),
                 'confident': confident(x), 'pixel_fd': pixel_fd(x, real),
                 'num_samples': FLAGS.num_samples, 'seconds': round(time.time() - t0, 1),
                 'checkpoint_step': step, 'workdir': FLAGS.workdir})
    print(json.dumps(rows[-1]), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, 'a') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
