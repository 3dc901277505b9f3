"""A tiny SD-shaped U-Net (models/sd_unet.py, diffusers' UNet2DConditionModel layout) for the
embedded captioned shapes: SD 1.x's architecture at toy widths, so that the SD code path trains
on CPU.

Model part only (data, text encoder and training are configs/shapes_text.py's): channels
(32, 64), one resnet per block, a cross-attention down block at full resolution then a plain
one, the cross-attention mid block at half resolution, plain then cross-attention up blocks;
2 heads everywhere, 8 GroupNorm groups (4 or 8 channels per group: with one channel per group
GroupNorm would erase the time embedding, see models/layers.group_count), cross-attention to
MiniLM's 384-d token states. In pixels (32x32x3) the full-resolution blocks attend over 1,024
tokens; with config.latent set, over the 4x4x4 latents' 16.

  python main.py --config configs/shapes_sd_tiny.py --workdir runs/shapes_sd_tiny
"""

from configs import shapes_text


def get_config():
  config = shapes_text.get_config()
  config.model.name = 'sd_unet'
  config.model.context_dim = 384  # MiniLM's width (shapes_text's text encoder)

  u = config.sd_unet
  u.in_channels = 0  # = what the model denoises: 3 pixel channels, or the latents' 4
  u.out_channels = 0
  u.sample_size = config.data.image_size
  u.block_out_channels = (32, 64)
  u.layers_per_block = 1
  u.down_block_types = ('CrossAttnDownBlock2D', 'DownBlock2D')
  u.up_block_types = ('UpBlock2D', 'CrossAttnUpBlock2D')
  u.attention_head_dim = 2  # heads (diffusers' naming)
  u.transformer_layers_per_block = 1
  u.cross_attention_dim = 0  # = model.context_dim
  u.use_linear_projection = False
  u.norm_num_groups = 8
  u.dropout = 0.0
  return config
