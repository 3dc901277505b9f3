"""Classifier-free guidance on the digits: does the sample show the digit that was asked for?

Trains (or resumes, or reuses) a class-conditional digits model in --workdir, fits a logistic
regression classifier on the real 16x16 digits (held-out accuracy reported), generates
--per_class samples of every digit at each guidance scale and prints the fraction that the
classifier labels as the requested digit.

  python -m bench.guidance_accuracy --workdir runs/digits_cond
  python -m bench.guidance_accuracy --workdir runs/digits_cond --train_steps 1000 \
      --scales 0,1,2,4 --per_class 50 --sampler ddim --num_steps 50

w = 0 is the unconditional model (accuracy near the 10% of chance if the model ignores labels, or
the share of each digit among the unconditional samples), w = 1 the plain conditional model,
w > 1 guided. The table also goes to WORKDIR/guidance_accuracy_SAMPLERSTEPS.json, and a grid of
the first 10 samples of each digit per scale to WORKDIR/samples/guidance_SAMPLERSTEPS_wW.png.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging

from bench.common import fit_classifier
from bench.common import real_digits


flags.DEFINE_string('config', 'configs/digits_cond.py', 'a class-conditional digits config file')
flags.DEFINE_string('workdir', None, 'run directory (trained here unless finished already)')
flags.DEFINE_integer('train_steps', None, 'training.num_steps (default: the config\'s)')
flags.DEFINE_string('scales', '0,1,2,4', 'comma-separated guidance scales')
flags.DEFINE_integer('per_class', 50, 'samples per digit and scale')
flags.DEFINE_string('sampler', 'ddim', 'sampler name (diffusion.samplers.SAMPLERS)')
flags.DEFINE_integer('num_steps', 50, 'sampler steps')
flags.DEFINE_bool('use_clipped_model_output', False, 'ddim: recompute eps from the clipped x0')
flags.DEFINE_integer('seed', 0, 'sampling seed (the same noise at every scale)')
flags.DEFINE_float('test_fraction', 0.25, 'share of the real digits held out from the classifier')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import config_lib  # pylint: disable=g-import-not-at-top
  import experiment  # pylint: disable=g-import-not-at-top
  import image_io  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import sample_lib  # pylint: disable=g-import-not-at-top
  import train_lib  # pylint: disable=g-import-not-at-top
  from diffusion import samplers  # pylint: disable=g-import-not-at-top

  if FLAGS.workdir is None:
    raise app.UsageError('--workdir is required')
  config = config_lib.load_config_file(FLAGS.config)
  if config.model.num_classes == 0:
    raise app.UsageError(f'{FLAGS.config} is not class-conditional (model.num_classes = 0)')
  if FLAGS.train_steps is not None:
    config.training.num_steps = FLAGS.train_steps
  config.sampling.sampler = FLAGS.sampler
  config.sampling.num_steps = FLAGS.num_steps
  config.sampling.class_label = -1  # sample i asks for digit i % num_classes
  config.sampling.use_clipped_model_output = FLAGS.use_clipped_model_output
  config_lib.validate(config, num_devices=jax.device_count())

  t0 = time.time()
  train_lib.train(config, FLAGS.workdir)
  train_s = time.time() - t0

  images, labels = real_digits(config)
  clf, held_out = fit_classifier(images, labels, FLAGS.test_fraction)
  print(f'classifier: logistic regression on {images.shape[1]}x{images.shape[2]} pixels, '
        f'held-out accuracy {held_out:.3f} ({FLAGS.test_fraction:.0%} of {len(images)} real '
        'digits held out)')

  model = models.create_model(config)
  schedule = experiment.schedule(config)
  step, params = experiment.restore_params(config, FLAGS.workdir, module=model)
  k = config.model.num_classes
  n = FLAGS.per_class * k
  asked = np.arange(n) % k
  rows = []
  tag = '_clipped_eps' if FLAGS.use_clipped_model_output else ''
  for w in [float(s) for s in FLAGS.scales.split(',')]:
    t1 = time.time()
    out = sample_lib.sample_images(config, model, schedule, params, n, seed=FLAGS.seed,
                              guidance_scale=w)
    seconds = time.time() - t1
    # The first 10 of each digit, one digit per column, for a person to look at.
    rows_idx = np.stack([np.flatnonzero(asked == c)[:10] for c in range(k)], axis=1).reshape(-1)
    image_io.write_grid(os.path.join(FLAGS.workdir, 'samples', f'guidance_{FLAGS.sampler}'
                                       f'{FLAGS.num_steps}{tag}_w{w:g}.png'), out[rows_idx], ncol=k)
    pred = clf.predict(out.reshape(n, -1) / 255.0)
    per_class = [float(np.mean(pred[asked == c] == c)) for c in range(k)]
    evals = samplers.num_model_evals(FLAGS.sampler, schedule, FLAGS.num_steps)
    rows.append({'guidance_scale': w, 'accuracy': float(np.mean(pred == asked)),
                 'per_class': per_class, 'num_samples': n,
                 'network_evals_per_sample': evals * (1 if w in (0.0, 1.0) else 2),
                 'seconds': seconds})
    logging.info('w=%g: accuracy %.3f (%.0f s)', w, rows[-1]['accuracy'], seconds)

  print(f'\ncheckpoint step {step}, {FLAGS.sampler} {FLAGS.num_steps} steps{tag}, {n} samples per '
        f'scale ({FLAGS.per_class} per digit), classifier held-out accuracy {held_out:.3f}\n')
  print('| guidance scale w | accuracy of the requested digit | worst digit | '
        'U-Net evals / sample |')
  print('|---|---|---|---|')
  for r in rows:
    worst = int(np.argmin(r['per_class']))
    print(f"| {r['guidance_scale']:g} | {r['accuracy']:.3f} | {worst} "
          f"({r['per_class'][worst]:.2f}) | {r['network_evals_per_sample']} |")
  record = {'config': FLAGS.config, 'checkpoint_step': step, 'train_seconds': train_s,
            'classifier_held_out_accuracy': held_out, 'sampler': FLAGS.sampler,
            'num_steps': FLAGS.num_steps,
            'use_clipped_model_output': FLAGS.use_clipped_model_output, 'rows': rows}
  name = f'guidance_accuracy_{FLAGS.sampler}{FLAGS.num_steps}{tag}.json'
  with open(os.path.join(FLAGS.workdir, name), 'w') as f:
    json.dump(record, f, indent=1)


if __name__ == '__main__':
  app.run(main)
