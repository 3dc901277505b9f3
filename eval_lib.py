"""Evaluation: FID / KID of generated samples against cached dataset statistics, and bits/dim.

  --mode fid_stats   Inception statistics of every example of config.data's split, cached
  --mode eval        restore a checkpoint, generate eval.num_samples, FID + KID (+ bits/dim)
  in-loop            training.eval_every > 0: FID/KID of training.eval_num_samples EMA samples

The Inception Score needs the classifier head, which the standard FID weights (pool3 only) do
not carry; it is reported only when config.eval.inception_weights points at weights with logits.
"""

import json
import os
import time

from absl import logging
import jax
import numpy as np

import data as data_lib
import models
import sample_lib
from diffusion import losses
from evaluation import fid as fid_lib
from evaluation import inception
from evaluation import metrics


def stats_path(config):
  d = config.data
  return config.eval.reference_stats or fid_lib.default_stats_path(d.dataset, d.split,
                                                                   d.image_size)


def _reference_images(config):
  """Every example of the split once, uint8, in stored order (no dropped last batch)."""
  ds = data_lib.get_dataset(config, batch_size=config.eval.batch_size, process_index=0,
                            process_count=1, shuffle=False, repeat=False, drop_remainder=False,
                            uint8=True)
  return (batch['image'] for batch in ds)


def reference_stats(config, *, recompute=False, params=None):
  """Loads (or computes once and caches) the dataset's Inception statistics."""
  path = stats_path(config)
  if recompute and os.path.exists(path):
    os.remove(path)
  if params is None:
    _, params = inception.load(config.eval.inception_weights)
  t0 = time.time()
  stats = fid_lib.reference_statistics(lambda: _reference_images(config), path, params=params,
                                       batch_size=config.eval.batch_size)
  logging.info('reference statistics of %d images (%s) in %s (%.0f s)', stats['num_images'],
               config.data.dataset, path, time.time() - t0)
  return stats


def score(images_uint8, ref, params, *, batch_size=256, with_logits=False):
  """FID and KID of uint8 images [N, H, W, C] against reference stats (from `reference_stats`)."""
  out = fid_lib.compute_features_all_processes(params, images_uint8, batch_size,
                                              with_logits=with_logits)
  feats, logits = out if with_logits else (out, None)
  mu, sigma = metrics.statistics(feats)
  result = {'fid': metrics.fid(mu, sigma, ref['mu'], ref['sigma']), 'num_samples': len(feats)}
  if 'features' in ref:
    result['kid'] = metrics.kid(feats, ref['features'],
                                subset_size=min(1000, len(feats), len(ref['features'])))
  if logits is not None:
    result['inception_score'], result['inception_score_std'] = metrics.inception_score(logits)
  return result


def bits_per_dim(config, model, schedule, params, num_examples, seed=0):
  """DDPM's variational bound (bits/dim, discretized decoder) on the first examples of the split."""
  ds = data_lib.get_dataset(config, batch_size=min(num_examples, config.eval.batch_size),
                            process_index=0, process_count=1, shuffle=False, repeat=False,
                            drop_remainder=False)

  from train_lib import model_kwargs  # pylint: disable=g-import-not-at-top

  @jax.jit
  def bpd(batch, rng):
    # The true label and the low-res image condition the bound (no label dropout).
    kwargs = model_kwargs(config, batch, None, train=False)
    model_fn = lambda x_t, t: model.apply({'params': params}, x_t, t, train=False, **kwargs)
    return losses.bits_per_dim(schedule, model_fn, batch['image'], rng,
                               prediction=config.diffusion.prediction)

  values, seen = [], 0
  for i, batch in enumerate(ds):
    values.append(np.asarray(bpd(batch, jax.random.fold_in(jax.random.PRNGKey(seed), i))))
    seen += len(batch['image'])
    if seen >= num_examples:
      break
  return float(np.concatenate(values)[:num_examples].mean())


def _generate(config, model, schedule, params, n):
  """n uint8 samples; an upsampler is conditioned on the low-res images of the first n examples."""
  cond = sample_lib.dataset_condition(config, n) if config.model.cond_channels > 0 else None
  return sample_lib.generate(config, model, schedule, params, n, seed=config.sampling.seed,
                             cond=cond)


def _write(workdir, record):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')


def run_eval_mode(config, workdir):
  """--mode eval: samples from a checkpoint, scored against the dataset's statistics."""
  from train_lib import get_schedule  # pylint: disable=g-import-not-at-top
  s, ev = config.sampling, config.eval
  model, schedule = models.create_model(config), get_schedule(config)
  step, params = sample_lib.restore_params(config, workdir, step=s.checkpoint_step,
                                           use_ema=s.use_ema, model=model)
  module, inception_params = inception.load(ev.inception_weights)
  ref = reference_stats(config, params=inception_params)
  t0 = time.time()
  images = _generate(config, model, schedule, params, ev.num_samples)
  gen_s = time.time() - t0
  # Every process embeds its share of the samples; the metrics are computed from all of them.
  result = score(images, ref, inception_params, batch_size=ev.batch_size,
                 with_logits=module.num_classes > 0)
  if ev.bpd_num_examples > 0:
    result['bits_per_dim'] = bits_per_dim(config, model, schedule, params, ev.bpd_num_examples)
  record = {'mode': 'eval', 'step': step, 'sampler': s.sampler, 'num_steps': s.num_steps,
            'eta': s.eta, 'seed': s.seed, 'generate_seconds': gen_s, **result}
  if config.model.num_classes > 0:
    record['guidance_scale'] = s.guidance_scale
  _write(workdir, record)
  if jax.process_index() == 0:
    print(json.dumps(record))
  return record


class InLoopEvaluator:
  """FID/KID of a small sample during training; loads Inception and reference stats once."""

  def __init__(self, config):
    self.config = config
    _, self.params = inception.load(config.eval.inception_weights)
    self.ref = reference_stats(config, params=self.params)

  def __call__(self, model, schedule, ema_params, step):
    n = self.config.training.eval_num_samples
    images = _generate(self.config, model, schedule, ema_params, n)
    result = score(images, self.ref, self.params, batch_size=self.config.eval.batch_size)
    # Labelled with N: FID from few samples is biased upward, comparable only at equal N.
    return {f'fid_n{n}': result['fid'], f'kid_n{n}': result.get('kid', float('nan'))}
