"""Stable Diffusion 1.5: its U-Net (859,520,964 parameters), VAE and latent / noise settings.

The model part of SD 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5), for fine-tuning or
sampling its weights:
  config.sd_unet      the U-Net, diffusers' unet/config.json in our fields (models/sd_unet.py);
                      models.create_model(config) builds it, models.load_diffusers_unet(folder)
                      loads a unet/ folder's weights into the same tree
  config.autoencoder  the VAE (models/autoencoder.py's sd_config(): (128, 256, 512, 512), 4 latent
                      channels, 83,653,863 parameters); config.latent points at its vae/ folder
  config.latent       scale 0.18215, 8x down, 4 channels: 512x512 images are 64x64x4 latents
  config.diffusion    scaled-linear betas 0.00085 -> 0.012 (sqrt-spaced, squared), T = 1000, eps
  config.model        context_dim 768 (CLIP ViT-L/14's text states), 77 tokens
config.model.pretrained names the pipeline folder (diffusers' layout: unet/, vae/,
text_encoder/, tokenizer/): it is where the U-Net's weights start (training) or come from
(sampling, while the workdir has no checkpoint), and latent.autoencoder / text.encoder are its
vae/ and text_encoder/. weights/stable-diffusion-v1-5 is where a download is expected; set
another on the command line (nothing can be downloaded here):
  python main.py --config configs/sd15.py --workdir runs/sd15 --mode sample \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.sampling.prompt="a photo of an astronaut riding a horse" \
      --config.sampling.guidance_scale=7.5 --config.sampling.sampler=dpm_solver_pp_2m \
      --config.sampling.num_steps=25 --config.sampling.num_samples=4 \
      --config.sampling.batch_size=4 --config.model.dtype=bfloat16
  python main.py --config configs/sd15.py --workdir runs/sd15_ft \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.dataset=folder:/path/to/images --config.training.batch_size=8 \
      --config.optim.lr=1e-5 --config.optim.warmup_steps=500 --config.optim.optimizer=adafactor \
      --config.model.dtype=bfloat16 --config.model.remat=true
(fine-tuning, on images with a same-named .txt caption beside each: the U-Net trains from the
folder's weights, the VAE and text encoder stay frozen; sampling the same workdir afterwards
uses the fine-tuned checkpoint. Neither command has run here: no SD weights, no GPU; the path
is tested on a tiny random SD folder, tests/test_sd_pipeline.py). The folder's unet/config.json defines the
U-Net (config_lib.apply_pretrained): for SD 1.5 it is config.sd_unet below.

Data, training and sampling settings are not SD's recipe (LAION, 256 A100s); set them per
experiment. Measured here: the U-Net matches diffusers 0.42.1's UNet2DConditionModel to ~1e-6
relative at random init (python -m evaluation.check_sd_unet; tests/test_sd_unet.py).
"""

import ml_collections

from configs import default


def get_config():
  config = default.get_config()
  # A captioned dataset for fine-tuning / evaluation (COCO captions, SD's usual benchmark; set
  # your own): the recipe's data is the experiment's, not part of SD's model.
  config.data.dataset = 'tfds:coco_captions'
  config.data.caption_key = 'captions/text'
  config.data.label_key = ''
  config.data.crop = 'center'
  config.data.image_size = 512  # pixels; the U-Net sees 64x64x4 latents
  config.data.num_channels = 3
  config.data.num_classes = 0

  config.model.name = 'sd_unet'
  config.model.context_dim = 768  # CLIP ViT-L/14 text states
  config.model.context_len = 77  # CLIP's padded length; SD attends to all 77 states
  config.model.dropout = 0.0
  config.model.num_classes = 0
  # A diffusers StableDiffusionPipeline folder (configs/default.py: model.pretrained).
  config.model.pretrained = 'weights/stable-diffusion-v1-5'

  u = config.sd_unet  # SD 1.5's unet/config.json (models.sd_unet.SD15)
  u.in_channels = 4
  u.out_channels = 4
  u.sample_size = 64
  u.block_out_channels = (320, 640, 1280, 1280)
  u.layers_per_block = 2
  u.down_block_types = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)
  u.up_block_types = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3
  u.attention_head_dim = 8  # = 8 heads (diffusers' naming)
  u.transformer_layers_per_block = 1
  u.cross_attention_dim = 768
  u.use_linear_projection = False
  u.norm_num_groups = 32
  u.norm_eps = 1e-5
  u.flip_sin_to_cos = True
  u.freq_shift = 0
  u.downsample_padding = 1
  u.dropout = 0.0

  # SD's VAE, as models.autoencoder.sd_config() (a config file does not import jax-side code;
  # tests/test_sd_unet.py keeps the two equal).
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.in_channels = 3
  ae.out_channels = 3
  ae.block_out_channels = (128, 256, 512, 512)
  ae.layers_per_block = 2
  ae.latent_channels = 4
  ae.norm_num_groups = 32
  ae.scaling_factor = 0.18215
  ae.shift_factor = 0.0
  ae.mid_block_add_attention = True
  ae.use_quant_conv = True
  ae.use_post_quant_conv = True
  ae.dtype = 'float32'

  config.latent.autoencoder = ''  # '' = model.pretrained's vae/ (a diffusers AutoencoderKL folder)
  config.latent.scale_factor = 0.18215
  config.latent.shift_factor = 0.0
  config.latent.factor = 8
  config.latent.channels = 4

  config.text.encoder = ''  # '' = model.pretrained's text_encoder/ (CLIP ViT-L/14's text model)

  config.diffusion.schedule = 'scaled_linear'
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 0.00085
  config.diffusion.beta_end = 0.012
  config.diffusion.prediction = 'eps'

  config.sampling.clip_x0 = False  # latents are not bounded to [-1, 1]
  return config
