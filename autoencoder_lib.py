"""An autoencoder run's own modes and training hooks (model.name = 'autoencoder'): reconstructions
and their scores.

  --mode sample   samples/step_STEP_reconstructions.png (inputs | reconstructions) and .npz of the
                  first sampling.num_samples examples of config.data.split
  --mode eval     PSNR (dB, mean over examples) and rFID: the FID of the reconstructions of the
                  first eval.num_samples examples against the split's cached Inception
                  statistics (the same reference as a generator's FID, so the two compare)

In training, every training.sample_every steps a grid of the first training.num_grid_samples
examples (inputs | reconstructions, samples/train_step_STEP_reconstructions.png, and
TensorBoard), and every training.eval_every steps PSNR and rFID / rKID of the first
training.eval_num_samples examples (metrics.jsonl, TensorBoard).

Reconstructions decode the posterior mean (LDM's `sample_posterior=False` at evaluation); the
params are the EMA's when sampling.use_ema, as for a denoiser.
"""

import json
import os
import time

from absl import logging
import jax
import numpy as np

import eval_lib
import experiment
import image_io
import progress
import sharding
from data import preprocess
from evaluation import fid as fid_lib
from models import autoencoder_loss


def split_images(config, n):
  """The first n examples of config.data.split, uint8 [n', H, W, C] (n' <= n: the split's size)."""
  out, total = [], 0
  for batch in eval_lib.reference_images(config):
    out.append(batch)
    total += len(batch)
    if total >= n:
      break
  return np.concatenate(out)[:n]


def reconstruct(config, params, images_uint8, *, stop=None, what='reconstructions', mesh=None):
  """uint8 [N, H, W, C] -> their uint8 reconstructions, in batches of eval.batch_size sharded
  over the mesh, with a progress line and stop() asked between batches."""
  mesh = mesh or sharding.make_mesh()
  module = experiment.model(config)
  ae = params[autoencoder_loss.AUTOENCODER]
  run = jax.jit(lambda p, x: module.apply({'params': p}, x, None, sample_posterior=False)[0])
  bs = config.eval.batch_size - config.eval.batch_size % jax.device_count() or jax.device_count()
  tracker = progress.Progress(what, len(images_uint8), stop=stop)
  out = []
  for i in range(0, len(images_uint8), bs):
    chunk = images_uint8[i:i + bs]
    x = np.asarray(preprocess.to_float(sharding.pad_rows(chunk, bs)), np.float32)
    y = sharding.to_host(run(ae, sharding.from_global_rows(mesh, x)))
    out.append(preprocess.to_uint8(y)[:len(chunk)])
    tracker.update(len(chunk))
  return np.concatenate(out)


def psnr_db(a_uint8, b_uint8):
  """Mean PSNR in dB of uint8 image pairs (on [-1, 1], as autoencoder_loss.psnr)."""
  a, b = preprocess.to_float(a_uint8), preprocess.to_float(b_uint8)
  return float(np.mean(np.asarray(autoencoder_loss.psnr(a, b))))


def _params(config, workdir):
  s = config.sampling
  return experiment.restore_params(config, workdir, step=s.checkpoint_step, use_ema=s.use_ema)


def run_sample_mode(config, workdir, stop=None):
  """--mode sample of an autoencoder run: inputs | reconstructions grid and .npz."""
  step, params = _params(config, workdir)
  inputs = split_images(config, config.sampling.num_samples)
  recon = reconstruct(config, params, inputs, stop=stop)
  name = f'step_{step:07d}_reconstructions'
  out_dir = os.path.join(workdir, 'samples')
  if jax.process_index() == 0:
    png = image_io.write_comparison(os.path.join(out_dir, name + '.png'), [inputs, recon])
    npz = os.path.join(out_dir, name + '.npz')
    np.savez_compressed(npz, images=recon, inputs=inputs)
    logging.info('wrote %s and %s (%d images, PSNR %.2f dB)', png, npz, len(recon),
                 psnr_db(inputs, recon))
  return recon


def run_eval_mode(config, workdir, stop=None):
  """--mode eval of an autoencoder run: PSNR and rFID, appended to metrics.jsonl."""
  step, params = _params(config, workdir)
  _, inception = fid_lib.load_inception(config.eval.inception_weights)
  ref = eval_lib.reference_stats(config, params=inception, stop=stop)
  t0 = time.time()
  inputs = split_images(config, config.eval.num_samples)
  recon = reconstruct(config, params, inputs, stop=stop)
  result = eval_lib.fid_kid(recon, ref, inception, batch_size=config.eval.batch_size, stop=stop)
  record = {'mode': 'eval', 'step': step, 'psnr': psnr_db(inputs, recon),
            'rfid': result.pop('fid'), 'rkid': result.pop('kid', float('nan')),
            'num_samples': len(recon), 'split': config.data.split,
            'seconds': time.time() - t0}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')
    print(json.dumps(record))
  return record


# ----------------------------------------------------------------------------- training hooks


class ReconstructionGridHook:
  """Training hook: inputs | EMA reconstructions of the split's first training.num_grid_samples
  examples every training.sample_every steps (and at the end)."""

  name = 'reconstruction_grid'

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir
    self.every = config.training.sample_every
    self._inputs = split_images(config, config.training.num_grid_samples)  # the same every time

  def __call__(self, step, ema_params, stop=None):
    recon = reconstruct(self.config, ema_params, self._inputs, stop=stop,
                        what=f'reconstruction grid at step {step}')
    grid = image_io.make_comparison([self._inputs, recon])
    name = os.path.join('samples', f'train_step_{step:07d}_reconstructions.png')
    if jax.process_index() == 0:
      path = image_io.save_png(os.path.join(self.workdir, name), grid)
      logging.info('wrote %s', path)
    return {'reconstructions': (grid, name)}


class ReconstructionFidHook:
  """Training hook: PSNR (dB) and rFID / rKID of the EMA reconstructions of the split's first
  training.eval_num_samples examples, every training.eval_every steps (and at the end)."""

  name = 'rfid'

  def __init__(self, config):
    self.config = config
    self.every = config.training.eval_every
    _, self._inception = fid_lib.load_inception(config.eval.inception_weights)
    self._ref = eval_lib.reference_stats(config, params=self._inception)
    self._inputs = split_images(config, config.training.eval_num_samples)

  def __call__(self, step, ema_params, stop=None):
    recon = reconstruct(self.config, ema_params, self._inputs, stop=stop,
                        what=f'reconstructions for rFID at step {step}')
    result = eval_lib.fid_kid(recon, self._ref, self._inception,
                              batch_size=self.config.eval.batch_size, stop=stop)
    n = len(recon)  # labelled with N: FID from few samples is biased upward
    return {'psnr_eval': psnr_db(self._inputs, recon), f'rfid_n{n}': result['fid'],
            f'rkid_n{n}': result.get('kid', float('nan'))}


def training_hooks(config, workdir):
  """The periodic work of an autoencoder run, for train_lib.train(..., hooks=...)."""
  hooks = []
  if config.training.sample_every > 0:
    hooks.append(ReconstructionGridHook(config, workdir))
  if config.training.eval_every > 0:
    hooks.append(ReconstructionFidHook(config))
  return hooks
