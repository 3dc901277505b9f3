"""Evaluation: FID / KID of generated samples against cached dataset statistics, bits/dim, and the
hooks that run periodic work during training.

  --mode fid_stats   Inception statistics of every example of config.data's split, cached
  --mode eval        restore a checkpoint, generate eval.num_samples, FID + KID (+ bits/dim)
  in-loop            training.eval_every > 0: FID/KID of training.eval_num_samples EMA samples
  training_hooks     the periodic work config.training declares (sample grids, in-loop FID),
                     built here and handed to the trainer, which never names them

Text models are sampled from the split's captions in order (one per example, the first) and,
with config.eval.clip_weights set to a CLIP folder, also get the CLIP score of each sample
against its caption (torchmetrics' definition, evaluation/clip.py); without it the record says
that the CLIP score was not computed and why.

The Inception Score needs the classifier head, which the standard FID weights (pool3 only) do
not carry; it is reported only when config.eval.inception_weights points at weights with logits.
"""

import json
import os
import time

from absl import logging
import jax
import numpy as np

import captions
import data as data_lib
import experiment
import latent_space
import models
import progress
import sample_lib
from diffusion import losses
from evaluation import fid as fid_lib
from evaluation import metrics


def stats_path(config):
  d = config.data
  return config.eval.reference_stats or fid_lib.default_stats_path(d.dataset, d.split,
                                                                   d.image_size)


def reference_images(config):
  """Every example of the split once, uint8, in stored order (no dropped last batch)."""
  ds = data_lib.get_dataset(config, batch_size=config.eval.batch_size, process_index=0,
                            process_count=1, shuffle=False, repeat=False, drop_remainder=False,
                            uint8=True)
  return (batch['image'] for batch in ds)


def reference_stats(config, *, recompute=False, params=None, stop=None):
  """Loads (or computes once and caches) the dataset's Inception statistics."""
  path = stats_path(config)
  if recompute and os.path.exists(path):
    os.remove(path)
  if params is None:
    _, params = fid_lib.load_inception(config.eval.inception_weights)
  t0 = time.time()
  if not os.path.exists(path):
    tracker = progress.Progress(f'reference statistics of {config.data.dataset}',
                                data_lib.num_examples(config), stop=stop)
  else:
    tracker = None
  stats = fid_lib.reference_statistics(lambda: reference_images(config), path, params=params,
                                       batch_size=config.eval.batch_size,
                                       on_batch=tracker.update if tracker else None)
  logging.info('reference statistics of %d images (%s) in %s (%.0f s)', stats['num_images'],
               config.data.dataset, path, time.time() - t0)
  return stats


def fid_kid(images_uint8, ref, params, *, batch_size=256, with_logits=False, stop=None):
  """FID and KID of uint8 images [N, H, W, C] against reference stats (from `reference_stats`).

  Returns:
    {'fid', 'kid' (when the reference keeps its features), 'num_samples'} (+ the Inception
    Score with logits).
  """
  tracker = progress.Progress('Inception features of the samples', len(images_uint8), stop=stop)
  out = fid_lib.compute_features_all_processes(params, images_uint8, batch_size,
                                              with_logits=with_logits, on_batch=tracker.update)
  feats, logits = out if with_logits else (out, None)
  mu, sigma = metrics.statistics(feats)
  result = {'fid': metrics.fid(mu, sigma, ref['mu'], ref['sigma']), 'num_samples': len(feats)}
  if 'features' in ref:
    result['kid'] = metrics.kid(feats, ref['features'],
                                subset_size=min(1000, len(feats), len(ref['features'])))
  if logits is not None:
    result['inception_score'], result['inception_score_std'] = metrics.inception_score(logits)
  return result


def bits_per_dim(config, model, schedule, params, num_examples, seed=0, stop=None):
  """DDPM's variational bound (bits/dim, discretized decoder) on the first examples of the split."""
  ds = data_lib.get_dataset(config, batch_size=min(num_examples, config.eval.batch_size),
                            process_index=0, process_count=1, shuffle=False, repeat=False,
                            drop_remainder=False)
  conditioner = experiment.conditioner(config)

  @jax.jit
  def bpd(batch, rng):
    # The true label and the low-res image condition the bound (no dropout).
    conds = conditioner.from_batch(batch)
    model_fn = lambda x_t, t: models.prediction(
        config, model.apply({'params': params}, x_t, t, train=False, **conds))
    return losses.bits_per_dim(schedule, model_fn, batch['image'], rng,
                               prediction=config.diffusion.prediction)

  tracker = progress.Progress('bits/dim', num_examples, unit='examples', stop=stop)
  values, seen = [], 0
  for i, batch in enumerate(ds):
    values.append(np.asarray(bpd(batch, jax.random.fold_in(jax.random.PRNGKey(seed), i))))
    take = min(len(batch['image']), num_examples - seen)
    seen += take
    tracker.update(take)
    if seen >= num_examples:
      break
  return float(np.concatenate(values)[:num_examples].mean())


def eval_prompts(config, n):
  """A text model's n evaluation prompts: the split's captions in order; None otherwise."""
  return captions.dataset_prompts(config, n) if sample_lib.is_text_model(config) else None


def eval_samples(config, model, schedule, params, n, stop=None, latent=None, prompts=None):
  """n uint8 samples; an upsampler is conditioned on the low-res images of the first n examples,
  a text model on `prompts` (default `eval_prompts`)."""
  cond = sample_lib.dataset_condition(config, n) if config.model.cond_channels > 0 else None
  if prompts is None:
    prompts = eval_prompts(config, n)
  return sample_lib.sample_images(config, model, schedule, params, n, seed=config.sampling.seed,
                                  cond=cond, stop=stop, what='eval samples', latent=latent,
                                  prompts=prompts)


CLIP_MISSING = ('not computed: set config.eval.clip_weights to a CLIP folder (Hugging Face '
                'CLIPModel layout, e.g. openai/clip-vit-large-patch14)')


def clip_result(config, images_uint8, prompts, stop=None):
  """The CLIP score with eval.clip_weights, else CLIP_MISSING (logged): what the record holds."""
  if config.eval.clip_weights:
    return clip_score(config, images_uint8, prompts, stop=stop)
  logging.warning('CLIP score %s', CLIP_MISSING)
  return CLIP_MISSING


def clip_score(config, images_uint8, prompts, stop=None):
  """torchmetrics' CLIP score of the samples against their prompts, with eval.clip_weights."""
  from evaluation import clip  # pylint: disable=g-import-not-at-top
  model, params = clip.load(config.eval.clip_weights)
  tok = clip.tokenizer(config.eval.clip_weights)
  images = np.asarray(images_uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  bs = config.eval.batch_size
  tracker = progress.Progress('CLIP embeddings of the samples', len(images), stop=stop)
  img, txt = [], []
  for i in range(0, len(images), bs):
    img.append(np.asarray(clip.image_embeds(model, params, images[i:i + bs])))
    txt.append(np.asarray(clip.text_embeds(model, params, clip.tokenize(tok, prompts[i:i + bs]))))
    tracker.update(len(images[i:i + bs]))
  return clip.clip_score(np.concatenate(img), np.concatenate(txt))


def _append_record(workdir, record):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')


def run_eval_mode(config, workdir, stop=None):
  """--mode eval: samples from a checkpoint (or model.pretrained's U-Net while the workdir has
  none: experiment.sampling_params), scored against the dataset's statistics."""
  s, ev = config.sampling, config.eval
  model, schedule = experiment.model(config), experiment.schedule(config)
  step, params = experiment.sampling_params(config, workdir, step=s.checkpoint_step,
                                            use_ema=s.use_ema, module=model)
  module, inception_params = fid_lib.load_inception(ev.inception_weights)
  ref = reference_stats(config, params=inception_params, stop=stop)
  t0 = time.time()
  prompts = eval_prompts(config, ev.num_samples)
  images = eval_samples(config, model, schedule, params, ev.num_samples, stop=stop,
                        prompts=prompts, latent=latent_space.load(config, workdir))
  gen_s = time.time() - t0
  # Every process embeds its share of the samples; the metrics are computed from all of them.
  result = fid_kid(images, ref, inception_params, batch_size=ev.batch_size,
                   with_logits=module.num_classes > 0, stop=stop)
  if prompts is not None:
    result['clip_score'] = clip_result(config, images, prompts, stop=stop)
  if ev.bpd_num_examples > 0:
    result['bits_per_dim'] = bits_per_dim(config, model, schedule, params, ev.bpd_num_examples,
                                          stop=stop)
  # The folder's weights (step None) are recorded at step 0: metrics.jsonl's steps are numbers.
  record = {'mode': 'eval', 'step': 0 if step is None else step, 'sampler': s.sampler,
            'num_steps': s.num_steps,
            'spacing': s.spacing, 'eta': s.eta, 'seed': s.seed, 'generate_seconds': gen_s,
            **result}
  if config.model.num_classes > 0 or prompts is not None:
    record['guidance_scale'] = s.guidance_scale
  if step is None:
    record['pretrained'] = config.model.pretrained
  _append_record(workdir, record)
  if jax.process_index() == 0:
    print(json.dumps(record))
  return record


class FidHook:
  """Training hook: FID/KID of training.eval_num_samples EMA samples every training.eval_every
  steps (and at the end); loads Inception and the reference statistics once."""

  name = 'fid'

  def __init__(self, config, latent=None):
    self.config = config
    self.every = config.training.eval_every
    _, self.params = fid_lib.load_inception(config.eval.inception_weights)
    self.ref = reference_stats(config, params=self.params)
    self._model = experiment.model(config)
    self._schedule = experiment.schedule(config)
    # Loaded once, not at every evaluation (or given by training_hooks, shared with the grid).
    self._latent = latent if latent is not None else latent_space.load(config)

  def __call__(self, step, ema_params, stop=None):
    n = self.config.training.eval_num_samples
    images = eval_samples(self.config, self._model, self._schedule, ema_params, n, stop=stop,
                          latent=self._latent)
    result = fid_kid(images, self.ref, self.params, batch_size=self.config.eval.batch_size,
                     stop=stop)
    # Labelled with N: FID from few samples is biased upward, comparable only at equal N.
    return {f'fid_n{n}': result['fid'], f'kid_n{n}': result.get('kid', float('nan'))}


def training_hooks(config, workdir, latent=None):
  """The periodic work config.training declares, for train_lib.train(..., hooks=...); `latent`
  (a latent_space.LatentSpace) is shared rather than read again (default: the run's,
  latent_space.for_run, which fits and saves latent.scale_by_std's scale on a fresh run)."""
  hooks = []
  if config.model.name == 'autoencoder':
    # A denoiser's grid or FID would call the autoencoder as a sampler.
    raise ValueError('an autoencoder run has its own hooks: autoencoder_lib.training_hooks')
  if latent is None and (config.training.sample_every > 0 or config.training.eval_every > 0):
    latent = latent_space.for_run(config, workdir)
  if config.training.sample_every > 0:
    hooks.append(sample_lib.GridHook(config, workdir, latent))
  if config.training.eval_every > 0:
    hooks.append(FidHook(config, latent))
  return hooks
