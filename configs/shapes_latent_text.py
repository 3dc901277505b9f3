"""The small Stable Diffusion: text-to-image in the latent space of configs/shapes_autoencoder.py,
prompts -> 8x8x4 latents -> 16x16 RGB shapes, on the CPU.

  python main.py --config configs/shapes_autoencoder.py --workdir runs/shapes_ae
  python main.py --config configs/shapes_latent_text.py --workdir runs/shapes_latent_text
  python main.py --config configs/shapes_latent_text.py --workdir runs/shapes_latent_text \
      --mode sample --config.sampling.prompt="a red circle"

configs/shapes_text.py (frozen MiniLM token states, cross-attention, 10% empty prompts for
classifier-free guidance, DDIM 50 at guidance 3) with the frozen autoencoder between pixels and
the U-Net and LDM's scale_by_std; the same U-Net, whose 4x4 attention level is now the middle one
of the 8x8 latents. configs/shapes_sd_tiny.py with the same --config.latent.* fields is this run
with SD's U-Net.
"""

from configs import shapes_text


def get_config():
  config = shapes_text.get_config()
  lat = config.latent
  lat.autoencoder = 'runs/shapes_ae'
  lat.factor = 2
  lat.channels = 4
  lat.scale_by_std = True
  config.sampling.clip_x0 = False
  # clipping x0 is what use_clipped_model_output recomputes eps from; latents have no [-1, 1] box
  config.sampling.use_clipped_model_output = False
  return config
