"""Stable Diffusion 1.x / 2.x's U-Net (diffusers' `UNet2DConditionModel`) in Flax Linen, NHWC.

Layout (diffusers semantics; C_i = block_out_channels[i], E = 4 C_0, S = spatial tokens):

  t -> sinusoidal (C_0 wide; cos first with flip_sin_to_cos, f_i = 10000^(-i / (C_0/2 - shift)))
    -> time_embedding: linear_1 (E) -> SiLU -> linear_2 (E) = temb
  x -> conv_in 3x3 (C_0); skips = [h]
    -> down_blocks_i: layers_per_block x [ResnetBlock2D(C_i) (+ Transformer2D if the block is a
       CrossAttnDownBlock2D)], each output a skip; then (all blocks but the last) a 3x3 stride-2
       conv with padding 1, also a skip
    -> mid_block: ResnetBlock2D, Transformer2D, ResnetBlock2D at C_last
    -> up_blocks_i (channels reversed): (layers_per_block + 1) x [concat(h, skips.pop()),
       ResnetBlock2D (+ Transformer2D for CrossAttnUpBlock2D)]; then (all but the last) nearest
       2x + 3x3 conv
    -> conv_norm_out (GroupNorm) -> SiLU -> conv_out 3x3 (out_channels)

  ResnetBlock2D: GN(32, eps 1e-5) -> SiLU -> conv3x3 -> + time_emb_proj(SiLU(temb)) -> GN ->
    SiLU -> dropout -> conv3x3; + x (a 1x1 conv_shortcut when the channel count changes).
  Transformer2D (diffusers' Transformer2DModel): GN(32, eps 1e-6) -> proj_in (1x1 conv, or a
    linear layer with use_linear_projection) -> transformer_blocks -> proj_out; + the input.
  BasicTransformerBlock: h += attn1(LN(h)) (self); h += attn2(LN(h), context) (cross: q from
    h, k / v from the text states; to_q/k/v without bias, to_out with bias); h += ff(LN(h)) with
    ff = GEGLU: (a, g) = split(Dense_8C(h)), Dense_C(a * gelu_exact(g)). LayerNorm eps 1e-5.

SD 1.x's config writes `attention_head_dim: 8`; in UNet2DConditionModel that is the number of
heads (a naming slip diffusers keeps, issue 2011): SD 1.5 has 8 heads of width C_i / 8 everywhere.
SD 2.x writes one per block, (5, 10, 20, 20), i.e. heads of width 64. SD 1.5 (`SD15`):
859,520,964 parameters.

Parameter names mirror diffusers' state dict with '.N' list indices written '_N':
`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight` is
params['down_blocks_1']['attentions_0']['transformer_blocks_0']['attn2']['to_k']['kernel'].
`diffusers_entries` lists every (Flax path, diffusers key, layout) of a configured U-Net,
written out from diffusers' own construction rules (channel bookkeeping included), and
`load_diffusers_unet` converts a diffusers folder through `models.hf_port.convert`, which checks
every shape against the Flax tree (jax.eval_shape) and names the first missing, unexpected or
mismatched key; given `module=` (the config's U-Net, experiment.pretrained_params) it first
names every architecture field where that module and the folder's config.json differ.
`save_diffusers_unet(folder, module, params)` is the inverse (hf_port.export): a U-Net trained
here written as a diffusers folder (config.json from `diffusers_config`).

Attention runs through `jax.nn.dot_product_attention` ('xla' by default; `attention_impl='cudnn'`
takes cuDNN's fused kernel on NVIDIA GPUs, bf16 / fp16 only). An optional `context_mask`
(bool [B, L], True = real token) hides padding tokens from the cross-attention exactly as
diffusers' `encoder_attention_mask` does, a -10000 logit bias (so a row without a single real
token attends to all of them); SD itself attends to all 77 CLIP states, padding included.

Mixed precision: `dtype` is the compute dtype of convs, dense layers and attention; parameters
are float32; GroupNorm / LayerNorm statistics are float32 (two-pass variance, as torch); the
output is float32. `remat` rematerialises each ResnetBlock2D and Transformer2D in the backward
pass.

Initialisation (training from scratch, e.g. configs/shapes_sd_tiny.py): DDPM's variance scaling
for every kernel, zero biases, and zeros for each resnet's conv2, each Transformer2D's proj_out
and conv_out, so that every block starts as the identity (LDM zero-initialises the same layers).
"""

import json
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import hf_port
from models.autoencoder import Upsample  # diffusers' Upsample2D, shared with the VAE
from models import layers
from models.layers import default_init, timestep_embedding

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
# Read when WEIGHTS_NAME is absent, in this order (sharded safetensors, fp16 variant, torch.save).
_OTHER_WEIGHTS = ('diffusion_pytorch_model.safetensors.index.json',
                  'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.bin')
TRANSFORMER_GROUP_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm (not norm_eps)
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms

CROSS_DOWN, PLAIN_DOWN = 'CrossAttnDownBlock2D', 'DownBlock2D'
CROSS_UP, PLAIN_UP = 'CrossAttnUpBlock2D', 'UpBlock2D'
MID_BLOCK = 'UNetMidBlock2DCrossAttn'

# SD 1.5's unet/config.json (stable-diffusion-v1-5/stable-diffusion-v1-5), the fields that differ
# from or matter beside UNet2DConditionModel's defaults.
SD15 = {
    '_class_name': 'UNet2DConditionModel',
    'act_fn': 'silu',
    'attention_head_dim': 8,
    'block_out_channels': [320, 640, 1280, 1280],
    'center_input_sample': False,
    'cross_attention_dim': 768,
    'down_block_types': [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN],
    'downsample_padding': 1,
    'flip_sin_to_cos': True,
    'freq_shift': 0,
    'in_channels': 4,
    'layers_per_block': 2,
    'mid_block_scale_factor': 1,
    'norm_eps': 1e-05,
    'norm_num_groups': 32,
    'out_channels': 4,
    'sample_size': 64,
    'up_block_types': [PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP],
}
SD15_PARAMS = 859_520_964


# ------------------------------------------------------------------------------------ config

def default_group() -> ml_collections.ConfigDict:
  """The `config.sd_unet` group with SD 1.5's architecture (configs/default.py documents it).

  Fields are diffusers' config.json names; in/out channels and cross_attention_dim of 0 are taken
  from the experiment (the denoised input's channels, config.model.context_dim).
  """
  return ml_collections.ConfigDict(dict(
      in_channels=0, out_channels=0, sample_size=64,
      block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
      down_block_types=(CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
      up_block_types=(PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP),
      attention_head_dim=8, transformer_layers_per_block=1, cross_attention_dim=0,
      use_linear_projection=False, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
      freq_shift=0, downsample_padding=1, dropout=0.0, attention_impl=''))


# diffusers config.json fields and the values this port implements (anything else is refused).
# `upcast_attention` (SD 2.1) is accepted either way: the softmax here runs in float32.
_FIXED = {
    '_class_name': 'UNet2DConditionModel', 'act_fn': 'silu', 'center_input_sample': False,
    'mid_block_type': MID_BLOCK, 'mid_block_scale_factor': 1, 'only_cross_attention': False,
    'dual_cross_attention': False, 'class_embed_type': None, 'addition_embed_type': None,
    'num_class_embeds': None, 'encoder_hid_dim': None, 'encoder_hid_dim_type': None,
    'resnet_time_scale_shift': 'default', 'resnet_skip_time_act': False,
    'resnet_out_scale_factor': 1.0, 'time_embedding_type': 'positional',
    'time_embedding_dim': None, 'time_embedding_act_fn': None, 'timestep_post_act': None,
    'time_cond_proj_dim': None, 'conv_in_kernel': 3, 'conv_out_kernel': 3,
    'attention_type': 'default', 'class_embeddings_concat': False,
    'mid_block_only_cross_attention': None, 'cross_attention_norm': None,
    'num_attention_heads': None, 'reverse_transformer_layers_per_block': None,
}
_COPIED = ('in_channels', 'out_channels', 'sample_size', 'block_out_channels', 'layers_per_block',
           'down_block_types', 'up_block_types', 'attention_head_dim',
           'transformer_layers_per_block', 'cross_attention_dim', 'use_linear_projection',
           'norm_num_groups', 'norm_eps', 'flip_sin_to_cos', 'freq_shift', 'downsample_padding',
           'dropout')


def config_from_diffusers(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A diffusers UNet2DConditionModel config.json dict -> a `config.sd_unet` group.

  Missing fields take UNet2DConditionModel's defaults; list values become tuples.

  Raises:
    ValueError: naming the field, for a feature this port does not implement (class / addition
      embeddings, other block or mid-block types, per-block cross_attention_dim, ...).
  """
  for field, want in _FIXED.items():
    value = cfg.get(field, want)
    if field == 'only_cross_attention' and isinstance(value, (list, tuple)):
      value = any(value)  # one flag per block
    if value != want:  # (1 == 1.0 for the scale factors)
      raise ValueError(f'UNet2DConditionModel config {field}={value!r}: only {want!r} is '
                       'implemented by models/sd_unet.py.')
  values = default_group().to_dict()
  diffusers_defaults = dict(in_channels=4, out_channels=4, sample_size=None,
                            cross_attention_dim=1280, dropout=0.0)
  values.update(diffusers_defaults)
  for field in _COPIED:
    if cfg.get(field) is not None:
      values[field] = cfg[field]
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  if values['sample_size'] is None:
    values['sample_size'] = 0
  if not isinstance(values['cross_attention_dim'], int):
    dims = set(values['cross_attention_dim'])
    if len(dims) != 1:
      raise ValueError(f'cross_attention_dim={values["cross_attention_dim"]}: one width for '
                       'every block is implemented, not one per block.')
    values['cross_attention_dim'] = dims.pop()
  group = ml_collections.ConfigDict(values)
  _per_block(group)  # validates the per-block fields' lengths and the block types
  return group


def _per_block(g) -> Dict[str, Tuple]:
  """A group's int-or-per-block fields as tuples of len(block_out_channels); ValueError on a
  wrong length or block type."""
  n = len(g.block_out_channels)
  out = {}
  for field in ('layers_per_block', 'attention_head_dim', 'transformer_layers_per_block'):
    value = g[field]
    value = (value,) * n if isinstance(value, int) else tuple(value)
    if len(value) != n or not all(isinstance(v, int) and v > 0 for v in value):
      raise ValueError(f'sd_unet.{field}={g[field]!r}: an int > 0 or one per block '
                       f'({n} blocks, block_out_channels={tuple(g.block_out_channels)}).')
    out[field] = value
  for field, known in (('down_block_types', (CROSS_DOWN, PLAIN_DOWN)),
                       ('up_block_types', (CROSS_UP, PLAIN_UP))):
    types = tuple(g[field])
    if len(types) != n or any(t not in known for t in types):
      raise ValueError(f'sd_unet.{field}={types}: {n} entries (one per block_out_channels) from '
                       f'{known}.')
    out[field] = types
  return out


def create(group, *, in_channels: int = 0, out_channels: int = 0, context_dim: int = 0,
           dtype: Any = 'float32', remat: bool = False) -> 'SDUNet':
  """Builds the U-Net of a `config.sd_unet` group.

  Args:
    group: see `default_group` / `config_from_diffusers`.
    in_channels, out_channels, context_dim: used where the group says 0.
    dtype: compute dtype ('float32' | 'bfloat16'); params stay float32.
    remat: rematerialise resnets and transformers in the backward pass.
  """
  blocks = _per_block(group)
  in_ch = group.in_channels or in_channels
  out_ch = group.out_channels or out_channels or in_ch
  ctx = group.cross_attention_dim or context_dim
  for name, value, where in (('in_channels', in_ch, 'the input channels'),
                             ('cross_attention_dim', ctx, 'config.model.context_dim')):
    if not value:
      raise ValueError(f'sd_unet.{name} is 0 and {where} gives no value either; set it.')
  return SDUNet(
      in_channels=in_ch, out_channels=out_ch,
      block_out_channels=tuple(group.block_out_channels),
      down_block_types=blocks['down_block_types'], up_block_types=blocks['up_block_types'],
      layers_per_block=blocks['layers_per_block'],
      num_attention_heads=blocks['attention_head_dim'],
      transformer_layers_per_block=blocks['transformer_layers_per_block'],
      cross_attention_dim=ctx, use_linear_projection=bool(group.use_linear_projection),
      norm_num_groups=group.norm_num_groups, norm_eps=group.norm_eps,
      flip_sin_to_cos=bool(group.flip_sin_to_cos), freq_shift=group.freq_shift,
      downsample_padding=group.downsample_padding, dropout=group.get('dropout', 0.0),
      attention_impl=group.get('attention_impl', '') or None, dtype=dtype, remat=remat)


def build(config, in_channels: int) -> 'SDUNet':
  """models.create_model's builder: config.sd_unet, config.model.{context_dim, dtype, remat};
  in_channels is what the model denoises (models.input_shape: latents or pixels)."""
  if 'sd_unet' not in config:
    raise ValueError("config.model.name='sd_unet' needs a config.sd_unet group (see "
                     'configs/default.py, configs/sd15.py).')
  m = config.model
  g = config.sd_unet
  if g.cross_attention_dim and m.get('context_dim', 0) and g.cross_attention_dim != m.context_dim:
    raise ValueError(f'sd_unet.cross_attention_dim={g.cross_attention_dim} differs from '
                     f'model.context_dim={m.context_dim} (the text states\' width); set one, '
                     'leave sd_unet.cross_attention_dim 0 to take model.context_dim.')
  return create(g, in_channels=in_channels, context_dim=m.get('context_dim', 0),
                dtype=m.get('dtype', 'float32'), remat=m.get('remat', False))


# ------------------------------------------------------------------------------------ layers

def _group_norm(num_groups: int, eps: float, name: str) -> nn.GroupNorm:
  # Exactly num_groups (as diffusers; layers.group_norm would pick fewer for narrow layers),
  # float32 statistics with torch's two-pass variance.
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_fast_variance=False, name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, dtype: Any, name: str, *, strides: int = 1,
          padding: Any = 'SAME', zero: bool = False) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, kernel_init=default_init(0.0 if zero else 1.0), name=name)


def _dense(features: int, dtype: Any, name: str, *, use_bias: bool = True,
           zero: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=default_init(0.0 if zero else 1.0), name=name)


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D ('default' time-embedding norm, output scale 1)."""
  out_channels: int
  num_groups: int
  eps: float
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    """Args: x [B, H, W, C_in]; temb [B, E]; train enables dropout. Returns [B, H, W, C_out]."""
    dt = self.dtype
    h = nn.silu(_group_norm(self.num_groups, self.eps, 'norm1')(x).astype(dt))
    h = _conv(self.out_channels, 3, dt, 'conv1')(h)
    h = h + _dense(self.out_channels, dt, 'time_emb_proj')(nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(self.num_groups, self.eps, 'norm2')(h).astype(dt))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_channels, 3, dt, 'conv2', zero=True)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, dt, 'conv_shortcut')(x)
    return x.astype(dt) + h


class Attention(nn.Module):
  """diffusers' Attention as SD uses it: to_q/k/v without bias, heads of width C / heads, scale
  head_dim^-0.5, to_out_0 with bias. Self-attention when context is None."""
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Args: x [B, S, C]; context [B, L, D] or None; mask bool [B, L] (True = real token) or
    None. Returns [B, S, C]."""
    b, s, c = x.shape
    heads, dt = self.num_heads, self.dtype
    src = x if context is None else context.astype(dt)
    q = _dense(c, dt, 'to_q', use_bias=False)(x).reshape(b, s, heads, c // heads)
    k = _dense(c, dt, 'to_k', use_bias=False)(src).reshape(b, src.shape[1], heads, c // heads)
    v = _dense(c, dt, 'to_v', use_bias=False)(src).reshape(b, src.shape[1], heads, c // heads)
    bias = None
    if mask is not None:
      # diffusers' encoder_attention_mask: (1 - mask) * -10000 added to the logits. Padding gets
      # exp(-10000) = 0 weight; a row with no real token at all attends as if unmasked (softmax
      # is shift-invariant), as in diffusers. Subtracting the row's largest bias keeps that
      # exact: diffusers' logits - 10000 round to float32's ulp at 1e4 (~1e-3) there.
      bias = jnp.where(mask, 0.0, -10000.0)
      bias = (bias - bias.max(axis=-1, keepdims=True)).astype(dt)[:, None, None, :]
      bias = jnp.broadcast_to(bias, (b, heads, s, src.shape[1]))
    h = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=self.attention_impl)
    return _dense(c, dt, 'to_out_0')(h.reshape(b, s, c))


class GEGLU(nn.Module):
  """FeedForward.net[0]: proj to 2 x inner, a * gelu_exact(gate)."""
  inner: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a, gate = jnp.split(_dense(2 * self.inner, self.dtype, 'proj')(x), 2, axis=-1)
    return a * nn.gelu(gate, approximate=False)  # torch's F.gelu is the exact (erf) GELU


class FeedForward(nn.Module):
  """diffusers' FeedForward with GEGLU, inner width 4 C: net_0 (GEGLU), net_2 (Dense C)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    h = GEGLU(4 * c, self.dtype, name='net_0')(x)
    return _dense(c, self.dtype, 'net_2')(h)


class BasicTransformerBlock(nn.Module):
  """LN -> self-attention, LN -> cross-attention to the context, LN -> GEGLU; residual each."""
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, h: jax.Array, context: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    dt = self.dtype
    attn = lambda name: Attention(self.num_heads, dt, self.attention_impl, name=name)
    h = h + attn('attn1')(_layer_norm('norm1')(h).astype(dt))
    h = h + attn('attn2')(_layer_norm('norm2')(h).astype(dt), context, mask)
    return h + FeedForward(dt, name='ff')(_layer_norm('norm3')(h).astype(dt))


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel on continuous NHWC input, residual around the whole."""
  num_heads: int
  num_layers: int
  num_groups: int
  use_linear_projection: bool
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """Args: x [B, H, W, C]; context [B, L, D]; mask bool [B, L] or None. Returns x's shape."""
    b, height, width, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'{self.num_heads} heads (sd_unet.attention_head_dim) do not divide '
                       f'{c} channels.')
    dt = self.dtype
    h = _group_norm(self.num_groups, TRANSFORMER_GROUP_NORM_EPS, 'norm')(x).astype(dt)
    # A 1x1 conv and a linear layer over channels are the same map on NHWC; only the stored
    # kernel's shape differs (1, 1, C, C) vs. (C, C).
    proj = ((lambda name, zero=False: _dense(c, dt, name, zero=zero)) if
            self.use_linear_projection else
            (lambda name, zero=False: _conv(c, 1, dt, name, zero=zero)))
    h = proj('proj_in')(h).reshape(b, height * width, c)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.num_heads, dt, self.attention_impl,
                                name=f'transformer_blocks_{i}')(h, context, mask)
    h = proj('proj_out', zero=True)(h.reshape(b, height, width, c))
    return h + x.astype(dt)


class TimestepEmbedding(nn.Module):
  """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(_dense(self.features, self.dtype, 'linear_1')(x.astype(self.dtype)))
    return _dense(self.features, self.dtype, 'linear_2')(h)


class Downsample2D(nn.Module):
  """3x3 stride-2 conv, padding 1 (diffusers' downsample_padding; 0 pads (0, 1) as diffusers)."""
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
    return _conv(x.shape[-1], 3, self.dtype, 'conv', strides=2, padding=pad)(x)


class Settings(NamedTuple):
  """What every block of one U-Net shares (hashable, so a Linen attribute)."""
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  use_linear_projection: bool = False
  downsample_padding: int = 1
  attention_impl: Optional[str] = None
  dtype: Any = jnp.float32
  remat: bool = False

  def resnet(self, out_channels: int, name: str):
    cls = nn.remat(ResnetBlock2D, static_argnums=(3,)) if self.remat else ResnetBlock2D
    return cls(out_channels, self.norm_num_groups, self.norm_eps, self.dropout, self.dtype,
               name=name)

  def transformer(self, heads: int, depth: int, name: str):
    cls = nn.remat(Transformer2D) if self.remat else Transformer2D
    return cls(heads, depth, self.norm_num_groups, self.use_linear_projection, self.dtype,
               self.attention_impl, name=name)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (cross=True) or DownBlock2D: num_layers x [resnet (+ transformer)],
  then an optional Downsample2D. Returns (h, the skips it adds)."""
  out_channels: int
  num_layers: int
  cross: bool
  heads: int
  depth: int
  add_downsample: bool
  s: Settings

  @nn.compact
  def __call__(self, h, temb, context, mask, train):
    skips = []
    for j in range(self.num_layers):
      h = self.s.resnet(self.out_channels, f'resnets_{j}')(h, temb, train)
      if self.cross:
        h = self.s.transformer(self.heads, self.depth, f'attentions_{j}')(h, context, mask)
      skips.append(h)
    if self.add_downsample:
      h = Downsample2D(self.s.downsample_padding, self.s.dtype, name='downsamplers_0')(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet at constant width."""
  heads: int
  depth: int
  s: Settings

  @nn.compact
  def __call__(self, h, temb, context, mask, train):
    c = h.shape[-1]
    h = self.s.resnet(c, 'resnets_0')(h, temb, train)
    h = self.s.transformer(self.heads, self.depth, 'attentions_0')(h, context, mask)
    return self.s.resnet(c, 'resnets_1')(h, temb, train)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D (cross=True) or UpBlock2D: num_layers x [concat(h, skip), resnet
  (+ transformer)], then an optional Upsample2D. `skips` are consumed last first."""
  out_channels: int
  num_layers: int
  cross: bool
  heads: int
  depth: int
  add_upsample: bool
  s: Settings

  @nn.compact
  def __call__(self, h, skips, temb, context, mask, train):
    skips = list(skips)
    for j in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = self.s.resnet(self.out_channels, f'resnets_{j}')(h, temb, train)
      if self.cross:
        h = self.s.transformer(self.heads, self.depth, f'attentions_{j}')(h, context, mask)
    if self.add_upsample:
      h = Upsample(self.s.dtype, name='upsamplers_0')(h)
    return h


class SDUNet(nn.Module):
  """diffusers' UNet2DConditionModel for SD 1.x / 2.x (see the module docstring).

  Attributes (diffusers' config names where they exist):
    in_channels, out_channels: channels of x and of the prediction.
    block_out_channels: C_i per block; H and W must be divisible by 2**(len - 1).
    down_block_types / up_block_types: CrossAttnDownBlock2D | DownBlock2D per block, and
      UpBlock2D | CrossAttnUpBlock2D per block (up blocks in their own, reversed, order).
    layers_per_block: resnets per down block, per block (up blocks have one more).
    num_attention_heads: heads per (down) block, diffusers' `attention_head_dim` field; the mid
      block uses the last, up blocks the reversed list.
    transformer_layers_per_block: BasicTransformerBlocks per Transformer2D, per block.
    cross_attention_dim: width D of the text states.
    use_linear_projection: proj_in / proj_out linear (SD 2.x) instead of 1x1 convs (SD 1.x).
    norm_num_groups, norm_eps: GroupNorm of the resnets and conv_norm_out.
    flip_sin_to_cos, freq_shift: the sinusoidal timestep features (SD: True, 0).
    downsample_padding: padding of the stride-2 convs (SD: 1).
    dropout: inside each resnet (train=True only).
    attention_impl: jax.nn.dot_product_attention's implementation (None = XLA; 'cudnn').
    dtype: compute dtype ('float32' | 'bfloat16'); remat: rematerialise every resnet and
      transformer in the backward pass.
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  down_block_types: Sequence[str] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
  up_block_types: Sequence[str] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
  layers_per_block: Sequence[int] = (2, 2, 2, 2)
  num_attention_heads: Sequence[int] = (8, 8, 8, 8)
  transformer_layers_per_block: Sequence[int] = (1, 1, 1, 1)
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  downsample_padding: int = 1
  dropout: float = 0.0
  attention_impl: Optional[str] = None
  dtype: Any = 'float32'
  remat: bool = False

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def _validate(self, x, t, context, context_mask, y, cond):
    if y is not None or cond is not None:
      raise ValueError('the SD U-Net takes no class labels (y) or condition image (cond); it '
                       'is conditioned on text through context.')
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'x must be NHWC with {self.in_channels} channels (sd_unet.in_channels; '
                       f'SD: 4-channel latents, config.latent.autoencoder); got {x.shape}.')
    f = self.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'x size {x.shape[1]}x{x.shape[2]} is not divisible by the U-Net\'s '
                       f'downsampling factor {f} (2**(len(block_out_channels) - 1)).')
    b = x.shape[0]
    if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != b):
      raise ValueError(f't must have shape [B]=[{b}] (or be a scalar); got {jnp.shape(t)}.')
    d = self.cross_attention_dim
    if context is None:
      raise ValueError(f'the SD U-Net needs context: text states [B, L, {d}] '
                       '(sd_unet.cross_attention_dim).')
    if jnp.ndim(context) != 3 or jnp.shape(context)[0] != b or jnp.shape(context)[-1] != d:
      raise ValueError(f'context must have shape [B={b}, L, {d}] (sd_unet.cross_attention_dim); '
                       f'got {jnp.shape(context)}.')
    if context_mask is not None and jnp.shape(context_mask) != jnp.shape(context)[:2]:
      raise ValueError(f'context_mask must have shape [B, L]={jnp.shape(context)[:2]}; got '
                       f'{jnp.shape(context_mask)}.')

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False, *,
               context: Optional[jax.Array] = None, context_mask: Optional[jax.Array] = None,
               y: Optional[jax.Array] = None, cond: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the noise (or v: whatever the weights were trained for) from noisy latents.

    Args:
      x: float [B, H, W, in_channels].
      t: int (or float) [B] timesteps in [0, T); a scalar is broadcast.
      train: enables dropout (then apply() needs rngs={'dropout': key}).
      context: float [B, L, cross_attention_dim] text-encoder states.
      context_mask: bool [B, L], True = real token; None = attend to every token (SD).
      y, cond: must be None (accepted for the trainer's uniform call).

    Returns:
      float32 [B, H, W, out_channels].
    """
    self._validate(x, t, context, context_mask, y, cond)
    dt = layers.compute_dtype(self.dtype, 'model.dtype')
    s = Settings(self.norm_num_groups, self.norm_eps, self.dropout, self.use_linear_projection,
                 self.downsample_padding, self.attention_impl, dt, self.remat)
    b = x.shape[0]
    mask = None if context_mask is None else jnp.asarray(context_mask, bool)
    ch = tuple(self.block_out_channels)
    n = len(ch)

    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    temb = timestep_embedding(t, ch[0], flip_sin_to_cos=self.flip_sin_to_cos,
                              freq_shift=self.freq_shift)
    temb = TimestepEmbedding(4 * ch[0], dt, name='time_embedding')(temb)

    h = _conv(ch[0], 3, dt, 'conv_in')(x.astype(dt))
    skips = [h]
    for i, kind in enumerate(self.down_block_types):
      h, new = DownBlock(ch[i], self.layers_per_block[i], kind == CROSS_DOWN,
                         self.num_attention_heads[i], self.transformer_layers_per_block[i],
                         i != n - 1, s, name=f'down_blocks_{i}')(h, temb, context, mask, train)
      skips += new

    h = MidBlock(self.num_attention_heads[-1], self.transformer_layers_per_block[-1], s,
                 name='mid_block')(h, temb, context, mask, train)

    heads = tuple(reversed(self.num_attention_heads))
    depths = tuple(reversed(self.transformer_layers_per_block))
    lpb = tuple(reversed(self.layers_per_block))
    for i, kind in enumerate(self.up_block_types):
      k = lpb[i] + 1
      skips, used = skips[:-k], skips[-k:]
      h = UpBlock(ch[n - 1 - i], k, kind == CROSS_UP, heads[i], depths[i], i != n - 1, s,
                  name=f'up_blocks_{i}')(h, tuple(used), temb, context, mask, train)
    assert not skips, 'skip connections left over'

    h = nn.silu(_group_norm(self.norm_num_groups, self.norm_eps, 'conv_norm_out')(h).astype(dt))
    h = _conv(self.out_channels, 3, dt, 'conv_out', zero=True)(h)
    return h.astype(jnp.float32)


def _abstract_inputs(module: SDUNet, batch: int = 1, tokens: int = 1):
  f = module.downsample_factor
  return (jax.ShapeDtypeStruct((batch, f, f, module.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32),
          jax.ShapeDtypeStruct((batch, tokens, module.cross_attention_dim), jnp.float32))


def param_shapes(module: SDUNet) -> Dict[str, Any]:
  """The params tree as ShapeDtypeStructs (jax.eval_shape: nothing allocated or computed)."""
  x, t, ctx = _abstract_inputs(module)
  return jax.eval_shape(lambda x, t, c: module.init(jax.random.key(0), x, t, context=c)['params'],
                        x, t, ctx)


def init_params(module: SDUNet, rng: jax.Array) -> Dict[str, Any]:
  """Fresh float32 params (the smallest valid input traces the tree of every size)."""
  x, t, ctx = (jnp.zeros(a.shape, a.dtype) for a in _abstract_inputs(module))
  with jax.threefry_partitionable(False):  # as models.init_params: faster to compile on CPU
    return jax.jit(lambda r: module.init(r, x, t, context=ctx)['params'])(rng)


# ---------------------------------------------------------------------- diffusers checkpoints

def _conv_entries(prefix: str, path: Tuple[str, ...]) -> List[hf_port.Entry]:
  """nn.Conv2d `prefix` (weight (O, I, kh, kw), bias) as Flax Conv `path`."""
  return [(path + ('kernel',), prefix + '.weight', 'conv'),
          (path + ('bias',), prefix + '.bias', 'copy')]


def _resnet_entries(t: str, f: Tuple[str, ...], in_ch: int, out_ch: int) -> List[hf_port.Entry]:
  out = (hf_port.norm(t + '.norm1', f + ('norm1',)) + _conv_entries(t + '.conv1', f + ('conv1',)) +
         hf_port.linear(t + '.time_emb_proj', f + ('time_emb_proj',)) +
         hf_port.norm(t + '.norm2', f + ('norm2',)) + _conv_entries(t + '.conv2', f + ('conv2',)))
  if in_ch != out_ch:  # diffusers' use_in_shortcut
    out += _conv_entries(t + '.conv_shortcut', f + ('conv_shortcut',))
  return out


def _transformer_entries(t: str, f: Tuple[str, ...], depth: int,
                         linear: bool) -> List[hf_port.Entry]:
  proj = hf_port.linear if linear else _conv_entries
  out = hf_port.norm(t + '.norm', f + ('norm',)) + proj(t + '.proj_in', f + ('proj_in',))
  for k in range(depth):
    tb, fb = f'{t}.transformer_blocks.{k}', f + (f'transformer_blocks_{k}',)
    for attn in ('attn1', 'attn2'):
      for name in ('to_q', 'to_k', 'to_v'):
        out += hf_port.linear(f'{tb}.{attn}.{name}', fb + (attn, name), bias=False)
      out += hf_port.linear(f'{tb}.{attn}.to_out.0', fb + (attn, 'to_out_0'))
    for norm in ('norm1', 'norm2', 'norm3'):
      out += hf_port.norm(f'{tb}.{norm}', fb + (norm,))
    out += (hf_port.linear(f'{tb}.ff.net.0.proj', fb + ('ff', 'net_0', 'proj')) +
            hf_port.linear(f'{tb}.ff.net.2', fb + ('ff', 'net_2')))
  return out + proj(t + '.proj_out', f + ('proj_out',))


def diffusers_entries(m: SDUNet) -> List[hf_port.Entry]:
  """Every (Flax path, diffusers key, layout) of the U-Net `m`, in diffusers' module order.

  Written from UNet2DConditionModel's constructor (its channel bookkeeping decides which
  resnets have a conv_shortcut: down block i's first resnet goes C_{i-1} -> C_i; up block i's
  resnet j takes prev_output + skip channels), independently of the Flax module, so that
  hf_port.convert's coverage check compares two descriptions of the same network.
  """
  ch, n = tuple(m.block_out_channels), len(m.block_out_channels)
  lin = m.use_linear_projection
  out = (_conv_entries('conv_in', ('conv_in',)) +
         hf_port.linear('time_embedding.linear_1', ('time_embedding', 'linear_1')) +
         hf_port.linear('time_embedding.linear_2', ('time_embedding', 'linear_2')))
  output_channel = ch[0]
  for i, kind in enumerate(m.down_block_types):
    input_channel, output_channel = output_channel, ch[i]
    t, f = f'down_blocks.{i}', (f'down_blocks_{i}',)
    for j in range(m.layers_per_block[i]):
      out += _resnet_entries(f'{t}.resnets.{j}', f + (f'resnets_{j}',),
                             input_channel if j == 0 else output_channel, output_channel)
      if kind == CROSS_DOWN:
        out += _transformer_entries(f'{t}.attentions.{j}', f + (f'attentions_{j}',),
                                    m.transformer_layers_per_block[i], lin)
    if i != n - 1:
      out += _conv_entries(f'{t}.downsamplers.0.conv', f + ('downsamplers_0', 'conv'))
  for j in range(2):
    out += _resnet_entries(f'mid_block.resnets.{j}', ('mid_block', f'resnets_{j}'), ch[-1], ch[-1])
  out += _transformer_entries('mid_block.attentions.0', ('mid_block', 'attentions_0'),
                              m.transformer_layers_per_block[-1], lin)
  rev = ch[::-1]
  depths, lpb = m.transformer_layers_per_block[::-1], m.layers_per_block[::-1]
  output_channel = rev[0]
  for i, kind in enumerate(m.up_block_types):
    prev_output_channel, output_channel = output_channel, rev[i]
    input_channel = rev[min(i + 1, n - 1)]
    t, f = f'up_blocks.{i}', (f'up_blocks_{i}',)
    layers = lpb[i] + 1
    for j in range(layers):
      skip = input_channel if j == layers - 1 else output_channel
      res_in = prev_output_channel if j == 0 else output_channel
      out += _resnet_entries(f'{t}.resnets.{j}', f + (f'resnets_{j}',), res_in + skip,
                             output_channel)
      if kind == CROSS_UP:
        out += _transformer_entries(f'{t}.attentions.{j}', f + (f'attentions_{j}',), depths[i],
                                    lin)
    if i != n - 1:
      out += _conv_entries(f'{t}.upsamplers.0.conv', f + ('upsamplers_0', 'conv'))
  return (out + hf_port.norm('conv_norm_out', ('conv_norm_out',)) +
          _conv_entries('conv_out', ('conv_out',)))


def convert_state_dict(state: Mapping[str, np.ndarray], module: SDUNet,
                       source: str = 'checkpoint', abstract: Any = None) -> Dict[str, Any]:
  """A diffusers UNet2DConditionModel state dict (numpy) -> Flax params of `module` (float32
  numpy), through hf_port.convert: KeyError naming the first missing key, ValueError naming the
  first wrongly shaped or unexpected one."""
  abstract = param_shapes(module) if abstract is None else abstract
  return hf_port.convert(state, diffusers_entries(module), abstract, source)


def check_shapes(shapes: Mapping[str, Sequence[int]], module: SDUNet,
                 source: str = 'checkpoint') -> int:
  """convert_state_dict on names and shapes only: every tensor stands in as a zero-stride
  broadcast view (no memory), so an SD-size state dict is checked in seconds. Returns the number
  of tensors mapped; raises as convert_state_dict."""
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, tuple(s)) for k, s in shapes.items()}
  return len(jax.tree_util.tree_leaves(convert_state_dict(state, module, source)))


def _read_weights(folder: str) -> Dict[str, np.ndarray]:
  """The folder's tensors: diffusion_pytorch_model.safetensors, else its shards (.index.json),
  else the fp16 variant, else diffusion_pytorch_model.bin (read without torch)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, WEIGHTS_NAME)
  if os.path.isfile(path):
    return load_file(path)
  index, fp16, binary = (os.path.join(folder, name) for name in _OTHER_WEIGHTS)
  if os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    state = {}
    for shard in shards:
      state.update(load_file(os.path.join(folder, shard)))
    return state
  if os.path.isfile(fp16):
    return load_file(fp16)
  if os.path.isfile(binary):
    from models import torch_pickle  # pylint: disable=g-import-not-at-top
    return {k: np.asarray(v) for k, v in torch_pickle.load(binary).items()}
  raise FileNotFoundError(f'{path} not found (nor {", ".join(_OTHER_WEIGHTS)}): '
                          'load_diffusers_unet needs a diffusers UNet2DConditionModel folder '
                          f'with {CONFIG_NAME} and {WEIGHTS_NAME}.')


# SDUNet attributes that define the network (and the config.sd_unet field each comes from);
# dropout, attention_impl, dtype and remat are how it runs, not what it is.
ARCHITECTURE = (
    ('in_channels', 'in_channels'), ('out_channels', 'out_channels'),
    ('block_out_channels', 'block_out_channels'), ('down_block_types', 'down_block_types'),
    ('up_block_types', 'up_block_types'), ('layers_per_block', 'layers_per_block'),
    ('num_attention_heads', 'attention_head_dim'),
    ('transformer_layers_per_block', 'transformer_layers_per_block'),
    ('cross_attention_dim', 'cross_attention_dim'),
    ('use_linear_projection', 'use_linear_projection'), ('norm_num_groups', 'norm_num_groups'),
    ('norm_eps', 'norm_eps'), ('flip_sin_to_cos', 'flip_sin_to_cos'),
    ('freq_shift', 'freq_shift'), ('downsample_padding', 'downsample_padding'))


class ArchitectureMismatch(ValueError):
  """load_diffusers_unet(module=...): the module is not the network the folder describes."""

  def __init__(self, config_path: str, differences: List[str]):
    self.config_path, self.differences = config_path, differences
    super().__init__(f'the U-Net to load into differs from {config_path} (its value vs the '
                     f'folder\'s): {"; ".join(differences)}.')


def architecture_differences(a: 'SDUNet', b: 'SDUNet') -> List[str]:
  """'sd_unet.FIELD: A vs B' for every architecture field where the two U-Nets differ."""
  out = []
  for attr, field in ARCHITECTURE:
    va, vb = getattr(a, attr), getattr(b, attr)
    va, vb = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (va, vb))
    if va != vb:
      out.append(f'sd_unet.{field}: {va!r} vs {vb!r}')
  return out


def load_diffusers_unet(folder: str, dtype: str = 'float32', remat: bool = False,
                        attention_impl: str = '',
                        module: Optional['SDUNet'] = None) -> Tuple[SDUNet, Dict[str, Any]]:
  """Loads a diffusers UNet2DConditionModel folder (config.json + safetensors).

  Args:
    folder: e.g. the unet/ subfolder of a Stable Diffusion 1.x / 2.x pipeline download.
    dtype: compute dtype of the module ('float32' | 'bfloat16'); params are float32 whatever the
      file holds.
    remat: rematerialise blocks in the backward pass (fine-tuning).
    attention_impl: '' (XLA) or 'cudnn' (jax.nn.dot_product_attention's fused GPU kernel).
    module: load into this U-Net (e.g. models.create_model(config)'s, with its dtype, remat,
      dropout and attention) instead of one built from the folder's config.json; dtype, remat
      and attention_impl are then the module's. Its architecture must be the folder's.

  Returns:
    (module, params): `module.apply({'params': params}, x_nhwc, t, context=states,
    train=False)` -> float32 NHWC.

  Raises:
    FileNotFoundError: naming the missing file.
    ValueError: an unsupported config (config_from_diffusers), a `module` whose architecture
      differs from the folder's (ArchitectureMismatch: every differing field, both values), or
      a wrongly shaped / unexpected tensor (named); KeyError: a missing tensor (named).
  """
  config_path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} not found: load_diffusers_unet needs a diffusers '
                            f'UNet2DConditionModel folder with {CONFIG_NAME} and {WEIGHTS_NAME}.')
  with open(config_path, encoding='utf-8') as f:
    group = config_from_diffusers(json.load(f))
  group.attention_impl = attention_impl
  own = create(group, dtype=dtype, remat=remat)
  if module is not None:
    differences = architecture_differences(module, own)
    if differences:
      raise ArchitectureMismatch(config_path, differences)
  module = own if module is None else module
  params = convert_state_dict(_read_weights(folder), module, folder)
  return module, jax.tree_util.tree_map(jnp.asarray, params)


def _one_or_per_block(values: Sequence[int]):
  """An int when every block has the same value (as SD's config.json writes), else a list."""
  values = [int(v) for v in values]
  return values[0] if len(set(values)) == 1 else values


def diffusers_config(module: SDUNet, sample_size: int = 0) -> Dict[str, Any]:
  """The UNet2DConditionModel config.json of `module` (config_from_diffusers reads it back as
  the same architecture; diffusers' from_pretrained builds the same network from it)."""
  cfg = {k: v for k, v in _FIXED.items() if v is not None}
  cfg.update(
      in_channels=module.in_channels, out_channels=module.out_channels,
      block_out_channels=[int(c) for c in module.block_out_channels],
      down_block_types=list(module.down_block_types), up_block_types=list(module.up_block_types),
      layers_per_block=_one_or_per_block(module.layers_per_block),
      attention_head_dim=_one_or_per_block(module.num_attention_heads),
      transformer_layers_per_block=_one_or_per_block(module.transformer_layers_per_block),
      cross_attention_dim=int(module.cross_attention_dim),
      use_linear_projection=bool(module.use_linear_projection),
      norm_num_groups=int(module.norm_num_groups), norm_eps=float(module.norm_eps),
      flip_sin_to_cos=bool(module.flip_sin_to_cos), freq_shift=module.freq_shift,
      downsample_padding=int(module.downsample_padding), dropout=float(module.dropout))
  if sample_size:
    cfg['sample_size'] = int(sample_size)
  return cfg


def save_diffusers_unet(folder: str, module: SDUNet, params: Any, sample_size: int = 0) -> str:
  """Writes `params` as a diffusers UNet2DConditionModel folder (config.json +
  diffusion_pytorch_model.safetensors, float32), the inverse of `load_diffusers_unet`: a U-Net
  trained or fine-tuned here becomes the unet/ of a Stable Diffusion folder that this code and
  diffusers' from_pretrained read. Same argument order as models.autoencoder.save_diffusers.

  Returns the folder.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = hf_port.export(params, diffusers_entries(module))
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG_NAME), 'w', encoding='utf-8') as f:
    json.dump(diffusers_config(module, sample_size), f, indent=2)
  save_file(state, os.path.join(folder, WEIGHTS_NAME))
  return folder
