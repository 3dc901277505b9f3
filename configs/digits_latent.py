"""Latent diffusion on the embedded digits: the default's U-Net on configs/digits_autoencoder.py's
8x8x2 latents, decoded to 16x16 pixels for grids, sampling and FID.

  python main.py --config configs/digits_autoencoder.py --workdir runs/digits_ae
  python main.py --config configs/digits_latent.py --workdir runs/digits_latent
  python main.py --config configs/digits_latent.py --workdir runs/digits_latent --mode eval \
      --config.sampling.sampler=ddim --config.sampling.num_steps=50 --config.eval.num_samples=1000

The autoencoder is named by its workdir (--config.latent.autoencoder=DIR for another one; a
diffusers AutoencoderKL folder works too). The scale is LDM's scale_by_std: 1 / std of the first
training batch's posterior samples, saved in WORKDIR/latent_scale.json so that resumes and
sampling use the same one. Everything else (v-prediction on the cosine schedule, lr decay, EMA
warm-up, 1,500 steps) is configs/digits.py's, so that the two compare at the same recipe;
clip_x0 is off because latents are not bounded by [-1, 1].

Measured 2026-12-04, 2 AMD EPYC cores, nothing else running: 274 s for the second command
(1,500 steps at 8.3-8.9 steps/s on 8x8x2 latents; the pixel model: 509 s at 3.6-3.7 steps/s);
scale 0.258949 (latent std 3.862). FID in pixel space, DDIM 50, 1,000 samples against all 1,797
digits: 30.77 (the pixel model at the same recipe and sampler: 16.19). README "Latent diffusion".
"""

from configs import digits


def get_config():
  config = digits.get_config()
  lat = config.latent
  lat.autoencoder = 'runs/digits_ae'
  lat.factor = 2  # digits_autoencoder's two levels
  lat.channels = 2
  lat.scale_by_std = True
  config.sampling.clip_x0 = False
  return config
