"""Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`) in Flax Linen, NHWC throughout.

Layout (diffusers semantics, every GroupNorm with eps 1e-6, SiLU activations):

  encoder: x -> conv_in 3x3 (C_0)
    -> per level i: layers_per_block x ResnetBlock(C_i), then a 3x3 stride-2 conv with (0, 1)
       padding (all levels but the last)
    -> mid block: ResnetBlock, single-head self-attention (+ residual), ResnetBlock
    -> GroupNorm -> SiLU -> conv_out 3x3 (2 * latent_channels)
  quant_conv 1x1 -> (mean, logvar) split on channels, logvar clipped to [-30, 20]
  post_quant_conv 1x1 -> decoder: conv_in 3x3 (C_last) -> mid block
    -> per level (reversed channels): (layers_per_block + 1) x ResnetBlock, then nearest 2x upsample
       + 3x3 conv (all levels but the last) -> GroupNorm -> SiLU -> conv_out 3x3 (out_channels)

SD 1.5's VAE (`sd_config()`: channels (128, 256, 512, 512), 2 layers per block, 4 latent channels,
32 groups) has 83,653,863 parameters: encoder 34,163,592 and decoder 49,490,179, both without
quant_conv (72) and post_quant_conv (20). Images of H x W pixels give latents of
H / 2**(L-1) x W / 2**(L-1) with L = len(block_out_channels) (8x down for SD).

`encode`/`decode` are diffusers' `encode(x).latent_dist` and `decode(z)`: neither applies
`scaling_factor`; a latent diffusion model trains on `(z - shift_factor) * scaling_factor`.

Parameter names mirror diffusers' state dict with '.N' list indices written '_N' (Flax names
cannot hold dots): `encoder.down_blocks.0.resnets.1.conv1.weight` is
params['encoder']['down_blocks_0']['resnets_1']['conv1']['kernel']. `load_diffusers` reads a
diffusers folder (config.json + diffusion_pytorch_model.safetensors) into that tree.

Mixed precision: `dtype` is the compute dtype of convs, dense layers and activations; parameters
are float32, GroupNorm statistics are float32, and every output is float32.
"""

import json
import os
import re
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import layers
from models.layers import default_init

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' / LDM's clamp of the posterior log-variance
NORM_EPS = 1e-6
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
CONFIG_NAME = 'config.json'


# ------------------------------------------------------------------------------------- configs

def sd_config() -> ml_collections.ConfigDict:
  """The `config.autoencoder` group of Stable Diffusion 1.x's VAE (sd-vae-ft-ema / -mse)."""
  c = ml_collections.ConfigDict()
  c.in_channels = 3  # image channels (0 = config.data.num_channels)
  c.out_channels = 3  # reconstructed channels (0 = config.data.num_channels)
  c.block_out_channels = (128, 256, 512, 512)  # channels per level; 2**(levels-1) downsampling
  c.layers_per_block = 2  # resnets per encoder level (the decoder has one more)
  c.latent_channels = 4
  c.norm_num_groups = 32  # GroupNorm groups; must divide every level's channel count
  c.scaling_factor = 0.18215  # latents for diffusion: (z - shift_factor) * scaling_factor
  c.shift_factor = 0.0  # 0 for SD 1.x / 2.x / SDXL; SD3 and FLUX shift
  c.mid_block_add_attention = True  # self-attention in both mid blocks
  c.use_quant_conv = True  # 1x1 conv after the encoder
  c.use_post_quant_conv = True  # 1x1 conv before the decoder
  c.dtype = 'float32'  # compute dtype ('float32' | 'bfloat16'); params stay float32
  return c


def tiny_config() -> ml_collections.ConfigDict:
  """A few-thousand-parameter autoencoder for CPU tests: 2 levels (2x down), 8 groups."""
  c = sd_config()
  c.block_out_channels = (16, 32)
  c.layers_per_block = 1
  c.norm_num_groups = 8
  return c


default_config = sd_config


def create_autoencoder(config) -> 'AutoencoderKL':
  """Builds the autoencoder from `config.autoencoder` (or a bare autoencoder group).

  in_channels / out_channels of 0 (or absent) take config.data.num_channels.
  """
  c = config.autoencoder if 'autoencoder' in config else config
  def channels(name):
    value = c.get(name, 0)
    if not value:
      if 'data' not in config:
        raise ValueError(f'autoencoder.{name} is 0 and there is no config.data.num_channels to '
                         'take it from; set it.')
      value = config.data.num_channels
    return int(value)
  return AutoencoderKL(
      in_channels=channels('in_channels'),
      out_channels=channels('out_channels'),
      block_out_channels=tuple(c.block_out_channels),
      layers_per_block=c.layers_per_block,
      latent_channels=c.latent_channels,
      norm_num_groups=c.norm_num_groups,
      scaling_factor=c.get('scaling_factor', 0.18215),
      shift_factor=c.get('shift_factor', 0.0) or 0.0,
      mid_block_add_attention=c.get('mid_block_add_attention', True),
      use_quant_conv=c.get('use_quant_conv', True),
      use_post_quant_conv=c.get('use_post_quant_conv', True),
      dtype=c.get('dtype', 'float32'))


# ------------------------------------------------------------------------------ the posterior

class DiagonalGaussian(NamedTuple):
  """The encoder's posterior N(mean, exp(logvar)) per latent element (a pytree).

  mean, logvar: float32 [B, h, w, latent_channels]; logvar already clipped to [-30, 20].
  """
  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """z = mean + std * eps, eps ~ N(0, I); float32, mean's shape."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(posterior || N(0, I)) in nats, summed over the non-batch axes: float32 [B]."""
    return gaussian_kl(self.mean, self.logvar)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) in nats summed over all but axis 0 (LDM's `kl()`).

  0.5 * sum(mean^2 + exp(logvar) - 1 - logvar). Args: [B, ...]. Returns float32 [B].
  """
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


def split_moments(moments: jax.Array) -> DiagonalGaussian:
  """[..., 2L] moments -> posterior: the first L channels are the mean, the rest the clipped
  log-variance (diffusers chunks dim 1 of NCHW the same way)."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return DiagonalGaussian(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))


# -------------------------------------------------------------------------------------- layers

def _norm(num_groups: int, name: str) -> nn.GroupNorm:
  # Exactly `num_groups` groups, as diffusers: models.layers.group_norm would silently use fewer
  # groups for narrow layers, a different function from the checkpoint's. Statistics in float32.
  return nn.GroupNorm(num_groups=num_groups, epsilon=NORM_EPS, name=name)


def _conv(features: int, kernel: int, dtype: Any, name: str, *, strides: int = 1,
          padding: Any = 'SAME') -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, kernel_init=default_init(), name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without a time embedding: x + conv(SiLU(GN(conv(SiLU(GN(x)))))).

  A 1x1 `conv_shortcut` projects x when the channel count changes. Output scale 1, no dropout
  (the VAE's is 0).
  """
  out_channels: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C_in]. Returns [B, H, W, out_channels] in the compute dtype."""
    h = nn.silu(_norm(self.num_groups, 'norm1')(x).astype(self.dtype))
    h = _conv(self.out_channels, 3, self.dtype, 'conv1')(h)
    h = nn.silu(_norm(self.num_groups, 'norm2')(h).astype(self.dtype))
    h = _conv(self.out_channels, 3, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, 'conv_shortcut')(x)
    return x.astype(self.dtype) + h


class Attention(nn.Module):
  """Single-head spatial self-attention with a residual (diffusers' VAE `Attention` block).

  GroupNorm, then q/k/v linear projections over channels, softmax(q k^T / sqrt(C)) v over all
  H * W positions, a linear `to_out_0`, plus x.
  """
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]. Returns [B, H, W, C]."""
    b, height, width, c = x.shape
    h = _norm(self.num_groups, 'group_norm')(x).astype(self.dtype)
    h = h.reshape(b, height * width, 1, c)  # [B, T, heads=1, C], dot_product_attention's layout
    def dense(name):
      return nn.Dense(c, dtype=self.dtype, kernel_init=default_init(), name=name)
    q, k, v = dense('to_q')(h), dense('to_k')(h), dense('to_v')(h)
    h = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(C): one head of width C
    h = dense('to_out_0')(h)
    return x.astype(self.dtype) + h.reshape(b, height, width, c)


class Downsample(nn.Module):
  """3x3 stride-2 conv after padding 0 before / 1 after in H and W (diffusers pads (0, 1, 0, 1))."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C], H and W even. Returns [B, H / 2, W / 2, C]."""
    return _conv(x.shape[-1], 3, self.dtype, 'conv', strides=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]. Returns [B, 2H, 2W, C]."""
    b, height, width, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
    return _conv(c, 3, self.dtype, 'conv')(x.reshape(b, 2 * height, 2 * width, c))


class MidBlock(nn.Module):
  """ResnetBlock, Attention (optional), ResnetBlock at constant width."""
  num_groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.num_groups, self.dtype, name='resnets_0')(x)
    if self.add_attention:
      x = Attention(self.num_groups, self.dtype, name='attentions_0')(x)
    return ResnetBlock(c, self.num_groups, self.dtype, name='resnets_1')(x)


class DownEncoderBlock(nn.Module):
  """`num_layers` ResnetBlocks, then (unless last) a stride-2 Downsample (diffusers'
  DownEncoderBlock2D)."""
  out_channels: int
  num_layers: int
  num_groups: int
  add_downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.num_groups, self.dtype, name=f'resnets_{j}')(x)
    if self.add_downsample:
      x = Downsample(self.dtype, name='downsamplers_0')(x)
    return x


class UpDecoderBlock(nn.Module):
  """`num_layers` ResnetBlocks, then (unless last) an Upsample (diffusers' UpDecoderBlock2D)."""
  out_channels: int
  num_layers: int
  num_groups: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.num_groups, self.dtype, name=f'resnets_{j}')(x)
    if self.add_upsample:
      x = Upsample(self.dtype, name='upsamplers_0')(x)
    return x


class Encoder(nn.Module):
  """Image [B, H, W, C_in] -> moments [B, H / f, W / f, 2 * latent_channels], f = 2**(L-1)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  num_groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.block_out_channels[0], 3, self.dtype, 'conv_in')(x.astype(self.dtype))
    last = len(self.block_out_channels) - 1
    for i, ch in enumerate(self.block_out_channels):
      h = DownEncoderBlock(ch, self.layers_per_block, self.num_groups, i != last, self.dtype,
                           name=f'down_blocks_{i}')(h)
    h = MidBlock(self.num_groups, self.add_attention, self.dtype, name='mid_block')(h)
    h = nn.silu(_norm(self.num_groups, 'conv_norm_out')(h).astype(self.dtype))
    return _conv(2 * self.latent_channels, 3, self.dtype, 'conv_out')(h)


class Decoder(nn.Module):
  """Latent [B, h, w, latent_channels] -> image [B, h * f, w * f, out_channels], f = 2**(L-1)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  num_groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    channels = tuple(reversed(self.block_out_channels))
    h = _conv(channels[0], 3, self.dtype, 'conv_in')(z.astype(self.dtype))
    h = MidBlock(self.num_groups, self.add_attention, self.dtype, name='mid_block')(h)
    last = len(channels) - 1
    for i, ch in enumerate(channels):
      h = UpDecoderBlock(ch, self.layers_per_block + 1, self.num_groups, i != last, self.dtype,
                         name=f'up_blocks_{i}')(h)
    h = nn.silu(_norm(self.num_groups, 'conv_norm_out')(h).astype(self.dtype))
    # conv_out's kernel is the "last layer" of LDM's adaptive GAN weight (see LAST_LAYER).
    return _conv(self.out_channels, 3, self.dtype, 'conv_out')(h)


# Path of the decoder's final conv kernel in the params tree (LDM's `get_last_layer()`).
LAST_LAYER = ('decoder', 'conv_out', 'kernel')


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL (see the module docstring). Images NHWC, nominally in [-1, 1].

  Attributes:
    in_channels, out_channels: image channels in and out.
    block_out_channels: channels per level; the latent is 2**(len - 1) times smaller.
    layers_per_block: resnets per encoder level (decoder levels have one more).
    latent_channels: latent channels L.
    norm_num_groups: GroupNorm groups, exactly (must divide every channel count).
    scaling_factor, shift_factor: carried for the diffusion side ((z - shift) * scale); not
      applied by encode/decode.
    mid_block_add_attention: self-attention in the mid blocks.
    use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent.
    dtype: compute dtype, 'float32' or 'bfloat16'.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: Any = 'float32'

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def _compute_dtype(self):
    return layers.compute_dtype(self.dtype, 'autoencoder.dtype')

  def setup(self):
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f'autoencoder.norm_num_groups={self.norm_num_groups} must divide every '
                       f'channel count of block_out_channels={tuple(self.block_out_channels)} '
                       f'(not {bad}).')
    dtype = self._compute_dtype()
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, num_groups=self.norm_num_groups,
                  add_attention=self.mid_block_add_attention, dtype=dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, 1, dtype, None)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, dtype, None)

  def _check_image(self, x):
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'encode takes NHWC images with {self.in_channels} channels '
                       f'(autoencoder.in_channels); got shape {x.shape}.')
    f = self.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'image size {x.shape[1]}x{x.shape[2]} is not divisible by the '
                       f'autoencoder\'s downsampling factor {f} (2**(len(block_out_channels)-1)).')

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Image -> posterior.

    Args:
      x: float [B, H, W, in_channels] in [-1, 1]; H, W divisible by `downsample_factor`.

    Returns:
      DiagonalGaussian(mean, logvar), each float32 [B, H / f, W / f, latent_channels] (a
      (mean, logvar) tuple; diffusers' latent_dist.mean / .logvar).
    """
    self._check_image(x)
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    return split_moments(moments)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent -> image.

    Args:
      z: float [B, h, w, latent_channels] (unscaled: divide diffusion latents by scaling_factor
        and add shift_factor first).

    Returns:
      float32 [B, h * f, w * f, out_channels], nominally in [-1, 1] (not clipped).
    """
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f'decode takes NHWC latents with {self.latent_channels} channels '
                       f'(autoencoder.latent_channels); got shape {z.shape}.')
    z = z.astype(self._compute_dtype())
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None,
               sample_posterior: bool = True) -> Tuple[jax.Array, DiagonalGaussian]:
    """Encode, sample (or take the mean), decode: the training forward pass.

    Args:
      x: float [B, H, W, in_channels] in [-1, 1].
      rng: PRNG key for z ~ posterior; None (or sample_posterior=False) decodes the mean.
      sample_posterior: draw z from the posterior instead of using its mean.

    Returns:
      (reconstruction float32 [B, H, W, out_channels], posterior DiagonalGaussian).
    """
    posterior = self.encode(x)
    z = posterior.sample(rng) if (sample_posterior and rng is not None) else posterior.mode()
    return self.decode(z), posterior


def param_shapes(module: AutoencoderKL) -> Dict[str, Any]:
  """The module's params tree as ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
  f = module.downsample_factor
  x = jnp.zeros((1, f, f, module.in_channels), jnp.float32)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), x)['params'])


def init_params(module: AutoencoderKL, rng: jax.Array) -> Dict[str, Any]:
  """Fresh float32 params (the smallest valid image traces the same tree as any size)."""
  f = module.downsample_factor
  x = jnp.zeros((1, f, f, module.in_channels), jnp.float32)
  # As models.init_params: XLA:CPU compiles partitionable-threefry draws slowly (the tiny
  # autoencoder's init 20 s vs. 6.5 s on 2 cores); init runs once, so the sharding-friendly
  # variant buys nothing here. Still a deterministic function of rng.
  with jax.threefry_partitionable(False):
    return jax.jit(lambda rng: module.init(rng, x)['params'])(rng)


# ---------------------------------------------------------------------- diffusers checkpoints

# Old diffusers (< 0.14, e.g. the sd-vae-ft-ema upload) named the attention projections
# query / key / value / proj_attn; diffusers renames them on load, and so does this.
_OLD_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def diffusers_name(path: Sequence[str]) -> str:
  """Flax params path -> diffusers state-dict key.

  Each '<name>_<N>' module (a list entry) becomes '<name>.<N>'; 'kernel' and GroupNorm's
  'scale' become 'weight'. ('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel') ->
  'encoder.down_blocks.0.resnets.1.conv1.weight'.
  """
  *modules, leaf = path
  parts = [re.sub(r'_(\d+)$', r'.\1', m) for m in modules]
  return '.'.join(parts + ['weight' if leaf in ('kernel', 'scale') else leaf])


def canonical_name(key: str) -> str:
  """A diffusers key with old-style attention names (query, key, value, proj_attn) renamed."""
  parts = key.split('.')
  if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION_NAMES:
    parts[-2:-1] = _OLD_ATTENTION_NAMES[parts[-2]].split('.')
  return '.'.join(parts)


def flax_shape(torch_shape: Sequence[int], leaf: str, target_ndim: int) -> Tuple[int, ...]:
  """The Flax shape a torch tensor of `torch_shape` becomes (see `to_flax`)."""
  shape = tuple(int(s) for s in torch_shape)
  if leaf != 'kernel':
    return shape
  if len(shape) == 4 and target_ndim == 2 and shape[2:] == (1, 1):
    shape = shape[:2]  # a linear layer stored as a 1x1 conv (some converted checkpoints)
  if len(shape) == 4:
    o, i, kh, kw = shape
    return (kh, kw, i, o)
  if len(shape) == 2:
    return shape[::-1]
  return shape


def to_flax(value: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
  """torch tensor -> Flax array: conv weight (O, I, kH, kW) -> kernel (kH, kW, I, O); linear
  weight (O, I) -> kernel (I, O); norm weight -> scale and biases unchanged. float32."""
  value = np.asarray(value, np.float32)
  if leaf != 'kernel':
    return value
  if value.ndim == 4 and target_ndim == 2 and value.shape[2:] == (1, 1):
    value = value[:, :, 0, 0]
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if value.ndim == 2:
    return np.ascontiguousarray(value.T)
  return value


def match_state_dict(shapes: Dict[str, Sequence[int]], abstract_params: Any
                     ) -> Dict[str, Tuple[str, ...]]:
  """Maps every diffusers key to a Flax path, checking names and shapes both ways.

  Args:
    shapes: diffusers key -> torch shape, for every tensor of a state dict.
    abstract_params: the Flax params tree (arrays or ShapeDtypeStructs, e.g. from eval_shape).

  Returns:
    diffusers key (as given) -> Flax path tuple, covering every leaf of abstract_params.

  Raises:
    KeyError: naming the first (sorted) key that has no Flax leaf (extra) or the first Flax
      leaf no key fills (missing, under its diffusers name).
    ValueError: naming the first key whose shape, after the layout change, differs from the
      Flax leaf's; both shapes are in the message.
  """
  flat = {tuple(p.key for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  by_name = {diffusers_name(path): path for path in flat}
  mapping = {}
  for key in sorted(shapes):
    name = canonical_name(key)
    if name not in by_name:
      raise KeyError(f'checkpoint key {key!r} (shape {tuple(shapes[key])}) has no counterpart in '
                     'the Flax autoencoder: extra key, or the checkpoint has a different '
                     'architecture than its config.json says.')
    path = by_name[name]
    if path in mapping.values():
      raise KeyError(f'checkpoint key {key!r} maps to {name!r}, which another key filled already.')
    want = tuple(flat[path].shape)
    got = flax_shape(shapes[key], path[-1], len(want))
    if got != want:
      raise ValueError(f'checkpoint key {key!r}: torch shape {tuple(shapes[key])} becomes {got} '
                       f'in Flax, but {"/".join(path)} has shape {want}.')
    mapping[key] = path
  covered = set(mapping.values())
  missing = sorted(diffusers_name(p) for p in flat if p not in covered)
  if missing:
    raise KeyError(f'checkpoint lacks {missing[0]!r} (Flax shape '
                   f'{tuple(flat[by_name[missing[0]]].shape)}; {len(missing)} missing in all).')
  return mapping


def convert_state_dict(state: Dict[str, np.ndarray], abstract_params: Any) -> Dict[str, Any]:
  """diffusers state dict (numpy arrays) -> Flax params (float32 numpy), checked by
  `match_state_dict`."""
  mapping = match_state_dict({k: v.shape for k, v in state.items()}, abstract_params)
  params = {}
  for key, path in mapping.items():
    node, target = params, abstract_params
    for p in path[:-1]:
      node, target = node.setdefault(p, {}), target[p]
    node[path[-1]] = to_flax(state[key], path[-1], len(target[path[-1]].shape))
  return params


_DIFFUSERS_FIELDS = ('in_channels', 'out_channels', 'block_out_channels', 'layers_per_block',
                     'latent_channels', 'norm_num_groups', 'scaling_factor', 'shift_factor',
                     'mid_block_add_attention', 'use_quant_conv', 'use_post_quant_conv')


def config_from_diffusers(cfg: Dict[str, Any]) -> ml_collections.ConfigDict:
  """A diffusers AutoencoderKL config.json dict -> an autoencoder config group.

  Raises:
    ValueError: for a class, block type or activation this port does not implement.
  """
  if cfg.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
    raise ValueError(f'config.json is for {cfg["_class_name"]}, not AutoencoderKL.')
  if cfg.get('act_fn', 'silu') != 'silu':
    raise ValueError(f'act_fn={cfg["act_fn"]!r}: only silu is implemented.')
  for field, want in (('down_block_types', 'DownEncoderBlock2D'),
                      ('up_block_types', 'UpDecoderBlock2D')):
    types = cfg.get(field, [want])
    if any(t != want for t in types):
      raise ValueError(f'{field}={types}: only {want} is implemented.')
    if len(types) != len(cfg['block_out_channels']):
      raise ValueError(f'{field} has {len(types)} entries but block_out_channels '
                       f'{cfg["block_out_channels"]} has {len(cfg["block_out_channels"])}.')
  c = sd_config()
  for field in _DIFFUSERS_FIELDS:
    if cfg.get(field) is not None:
      value = cfg[field]
      c[field] = tuple(value) if isinstance(value, list) else value
  return c


def load_diffusers(folder: str, dtype: str = 'float32') -> Tuple[AutoencoderKL, Dict[str, Any]]:
  """Loads a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).

  Args:
    folder: e.g. a download of stabilityai/sd-vae-ft-ema (or its vae/ subfolder of a pipeline).
    dtype: compute dtype of the returned module; params are float32 whatever the file holds.

  Returns:
    (module, params): `module.apply({'params': params}, x, method='encode')` etc.

  Raises:
    FileNotFoundError: naming the missing file.
    KeyError / ValueError: see `match_state_dict` and `config_from_diffusers`.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top  (only the loader needs it)
  config_path = os.path.join(folder, CONFIG_NAME)
  weights_path = os.path.join(folder, WEIGHTS_NAME)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found: load_diffusers needs a diffusers AutoencoderKL '
                              f'folder with {CONFIG_NAME} and {WEIGHTS_NAME}.')
  with open(config_path) as f:
    config = config_from_diffusers(json.load(f))
  config.dtype = dtype
  module = create_autoencoder(config)
  abstract = param_shapes(module)
  state = safetensors.numpy.load_file(weights_path)
  params = convert_state_dict(state, abstract)
  return module, jax.tree_util.tree_map(jnp.asarray, params)


def to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  """The inverse of `to_flax`: kernel (kH, kW, I, O) -> (O, I, kH, kW), (I, O) -> (O, I)."""
  value = np.asarray(value, np.float32)
  if leaf == 'kernel' and value.ndim == 4:
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if leaf == 'kernel' and value.ndim == 2:
    return np.ascontiguousarray(value.T)
  return value


def save_diffusers(folder: str, module: AutoencoderKL, params: Any) -> None:
  """Writes `params` as a diffusers AutoencoderKL folder (config.json +
  diffusion_pytorch_model.safetensors) that `load_diffusers` and diffusers' from_pretrained
  read: an autoencoder trained here can serve a latent diffusion run or leave for PyTorch."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    keys = tuple(p.key for p in path)
    state[diffusers_name(keys)] = to_torch_layout(leaf, keys[-1])
  cfg = {'_class_name': 'AutoencoderKL', 'act_fn': 'silu',
         'down_block_types': ['DownEncoderBlock2D'] * len(module.block_out_channels),
         'up_block_types': ['UpDecoderBlock2D'] * len(module.block_out_channels)}
  for field in _DIFFUSERS_FIELDS:
    value = getattr(module, field)
    cfg[field] = list(value) if isinstance(value, tuple) else value
  with open(os.path.join(folder, CONFIG_NAME), 'w') as f:
    json.dump(cfg, f, indent=2)
  safetensors.numpy.save_file(state, os.path.join(folder, WEIGHTS_NAME))

