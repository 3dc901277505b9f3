"""The DDPM U-Net (Ho et al. 2020) in Flax Linen, NHWC throughout.

The layout follows the official DDPM TensorFlow model (`diffusion_tf/models/unet.py`),
which diffusers' `UNet2DModel` reproduces as `google/ddpm-cifar10-32`:

  t -> sinusoidal embedding (ch) -> Dense(4ch) -> SiLU -> Dense(4ch) = temb
  x -> conv_in 3x3 (ch)
    -> per level i: num_res_blocks x [ResBlock(ch * ch_mult[i]) (+ Attention)], then Downsample
       (all levels but the last)
    -> middle: ResBlock, Attention, ResBlock
    -> per level i (reversed): (num_res_blocks + 1) x [concat skip, ResBlock (+ Attention)], then
       Upsample (all levels but the first)
    -> GroupNorm -> SiLU -> conv_out 3x3 (out_ch)

With image_size=32, out_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
attn_resolutions=(16,) and one head this has exactly 35,746,307 parameters, as in the paper.

Initialisation follows DDPM: variance scaling (fan_avg, uniform) for every kernel, zero biases,
and zeros for the last conv of each residual block, the attention output projection and conv_out,
so that every block starts as the identity and the freshly initialised network outputs zeros.

Mixed precision: `dtype` sets the compute dtype of convs, dense layers and activations; parameters
are always float32; GroupNorm statistics and the attention softmax are computed in float32; the
output is float32.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_SUPPORTED_DTYPES = ('float32', 'bfloat16')


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """DDPM's kernel initialiser: variance scaling, fan_avg, uniform; exact zeros for scale 0."""
  if scale == 0.0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def _qkv_init(key, shape, dtype=jnp.float32):
  """Initialises a fused [C, 3 * C] q/k/v kernel as three independent [C, C] DDPM kernels.

  Flax's DenseGeneral hands its initialiser the flattened kernel; initialising that as one
  [C, 3C] matrix would use fan_avg = 2C instead of DDPM's C per projection.
  """
  fan_in, fan_out = shape
  init = nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform', in_axis=0, out_axis=2, batch_axis=(1,))
  return init(key, (fan_in, 3, fan_out // 3), dtype).reshape(shape)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep embedding of DDPM (`get_timestep_embedding`).

  emb[b, i] = sin(t[b] * f_i) for i < dim // 2 and emb[b, dim // 2 + i] = cos(t[b] * f_i),
  with f_i = max_period ** (-i / (dim // 2 - 1)); an odd `dim` gets a zero last column.

  Args:
    t: [B] timesteps (int or float; converted to float32).
    dim: embedding width (>= 4).
    max_period: the longest wavelength, 10000 in DDPM.

  Returns:
    float32 [B, dim].
  """
  if dim < 4:
    raise ValueError(f'timestep_embedding needs dim >= 4, got {dim} (raise model.ch).')
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_count(channels: int, max_groups: int) -> int:
  """DDPM's GroupNorm uses 32 groups; narrower layers get the largest divisor of `channels` that
  is <= max_groups and leaves >= 2 channels per group.

  Every paper config (channels a multiple of 32, >= 64) gets exactly max_groups. The >= 2 rule
  matters for tiny models: with one channel per group, GroupNorm removes any per-channel constant,
  which is exactly how the time (and class) embedding enters a residual block, so the network
  would ignore t.
  """
  groups = max(1, min(max_groups, channels // 2))
  while channels % groups:
    groups -= 1
  return groups


def _group_norm(channels: int, num_groups: int, dtype: Any, name: str) -> nn.GroupNorm:
  # Flax computes the statistics in float32 even for bfloat16 inputs.
  return nn.GroupNorm(num_groups=_group_count(channels, num_groups), epsilon=1e-6, dtype=dtype,
                      name=name)


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): a 3x3 conv on 4x4 input tiles (stride 2) as 16
# independent channel matmuls, 2.25x fewer multiply-adds than the direct conv. In exact arithmetic
# it equals the direct conv; in float32 the results differ by a few ulps of the output scale.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_rows(r0, r1, r2, r3):
  """B^T applied along one axis to the four shifted views of a tile: entries 0 and +-1 only."""
  return r0 - r2, r1 + r2, r2 - r1, r1 - r3


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 stride-1 convolution with zero padding 1 (NHWC, HWIO), computed by Winograd F(2x2, 3x3).

  Args:
    x: [B, H, W, C_in] with even H and W.
    kernel: [3, 3, C_in, C_out], same dtype as x.

  Returns:
    [B, H, W, C_out], equal to `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))`
    up to float rounding.
  """
  b, height, width, c_in = x.shape
  c_out = kernel.shape[-1]
  th, tw = height // 2, width // 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Input transform B^T d B for every 4x4 tile at once, on strided views (no tile gather).
  rows = _winograd_rows(*[xp[:, u:u + 2 * th:2] for u in range(4)])
  v = [q for r in rows for q in _winograd_rows(*[r[:, :, u:u + 2 * tw:2] for u in range(4)])]
  v = jnp.stack(v).reshape(16, b * th * tw, c_in)
  g = jnp.asarray(_WINOGRAD_G, kernel.dtype)
  u = jnp.einsum('ai,bj,ijco->abco', g, g, kernel).reshape(16, c_in, c_out)
  m = jnp.einsum('kpc,kco->kpo', v, u).reshape(4, 4, b, th, tw, c_out)
  # Output transform A^T m A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], then interleave the 2x2 tiles.
  at = lambda q: (q[0] + q[1] + q[2], q[1] - q[2] - q[3])
  y = [at(q) for q in at(m)]  # y[r][s]: output pixel (2i + r, 2j + s), [B, th, tw, C_out]
  y = jnp.stack([jnp.stack(ys, axis=3) for ys in y], axis=2)  # [B, th, 2, tw, 2, C_out]
  return y.reshape(b, height, width, c_out)


class Conv3x3(nn.Module):
  """3x3 stride-1 'SAME' conv with nn.Conv's parameters ('kernel' [3, 3, C_in, C_out], 'bias'),
  so checkpoints and initial values are those of `nn.Conv(features, (3, 3), padding=1)`.

  Attributes:
    features: output channels.
    dtype: compute dtype.
    kernel_init: kernel initialiser.
    winograd: compute by Winograd F(2x2, 3x3) (needs even H, W) instead of the direct conv.
  """
  features: int
  dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  winograd: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C_in]. Returns [B, H, W, features] in dtype."""
    kernel = self.param('kernel', self.kernel_init, (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    if self.winograd:
      y = winograd_conv3x3(x, kernel)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias


def _conv3x3(x, features, dtype, kernel_init, algorithm, name):
  """A Conv3x3 whose algorithm `use_winograd` picks from the layer's shape."""
  _, height, width, c_in = x.shape
  return Conv3x3(features, dtype, kernel_init,
                 use_winograd(algorithm, dtype, height, width, c_in, features), name=name)(x)


def use_winograd(algorithm: str, dtype: Any, height: int, width: int, c_in: int,
                 c_out: int) -> bool:
  """Whether a 3x3 conv layer runs as Winograd F(2x2, 3x3).

  'direct' never, 'winograd' whenever H and W are even; 'auto' only where it measured faster:
  float32 on the CPU backend (GPU libraries pick their own conv algorithms), feature maps of at
  least 16x16 (smaller tiles leave the transforms dominant) and >= 64 channels in and out.
  """
  if algorithm not in ('auto', 'direct', 'winograd'):
    raise ValueError(f"conv_algorithm must be 'auto', 'direct' or 'winograd'; got {algorithm!r}.")
  if algorithm == 'direct' or height % 2 or width % 2:
    return False
  if algorithm == 'winograd':
    return True
  return (jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == 'cpu'
          and min(height, width) >= 16 and min(c_in, c_out) >= 64)


class ResBlock(nn.Module):
  """DDPM residual block with a timestep-embedding projection.

  Attributes:
    out_ch: output channels.
    dropout: dropout rate before the second conv (active only when train=True).
    num_groups: GroupNorm groups (see `_group_count`).
    dtype: compute dtype.
    conv_algorithm: 'auto' | 'direct' | 'winograd' for the 3x3 convs (see `use_winograd`).
  """
  out_ch: int
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Any = jnp.float32
  conv_algorithm: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    """Args: x [B, H, W, C_in]; temb [B, E]; train enables dropout. Returns [B, H, W, out_ch]."""
    in_ch = x.shape[-1]
    h = nn.silu(_group_norm(in_ch, self.num_groups, self.dtype, 'norm1')(x))
    h = _conv3x3(h, self.out_ch, self.dtype, default_init(), self.conv_algorithm, 'conv1')
    # DDPM projects SiLU(temb), one bias per channel, broadcast over space.
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init(),
                     name='temb_proj')(nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(self.out_ch, self.num_groups, self.dtype, 'norm2')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv3x3(h, self.out_ch, self.dtype, default_init(0.0), self.conv_algorithm, 'conv2')
    if in_ch != self.out_ch:
      # DDPM's 'nin' shortcut: a 1x1 conv, written as a dense layer over channels.
      x = nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init(),
                   name='nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Spatial self-attention with a residual connection (DDPM's `attn_block`, multi-head capable).

  q, k and v come from one fused 1x1 projection whose kernel is laid out [C, 3, heads, C / heads],
  so that they arrive in the [B, HW, heads, head_dim] layout `jax.nn.dot_product_attention` takes
  without a transpose. Logits are scaled by head_dim ** -0.5 (C ** -0.5 with one head, as DDPM).

  Attributes:
    num_heads: attention heads; must divide the channel count.
    num_groups: GroupNorm groups.
    dtype: compute dtype (logits and softmax are float32 regardless).
  """
  num_heads: int = 1
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]. Returns [B, H, W, C]."""
    b, height, width, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must divide the {c} channels of every '
                       'attention layer; pick a divisor of ch * ch_mult[i].')
    head_dim = c // self.num_heads
    h = _group_norm(c, self.num_groups, self.dtype, 'norm')(x)
    h = h.reshape(b, height * width, c)
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, kernel_init=_qkv_init,
                          name='qkv')(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    h = jax.nn.dot_product_attention(q, k, v)
    h = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=default_init(0.0),
                        name='proj_out')(h)
    return x + h.reshape(b, height, width, c)


class Downsample(nn.Module):
  """Halves H and W: 3x3 stride-2 conv with DDPM's padding, or 2x2 average pooling.

  TF's 'SAME' padding for a 3x3 stride-2 conv on an even size pads 0 before and 1 after; diffusers
  reproduces it with an explicit (0, 1) pad. Symmetric padding would shift every feature map by
  half a pixel relative to the paper's model.
  """
  with_conv: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C] with even H, W. Returns [B, H / 2, W / 2, C]."""
    if self.with_conv:
      return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                     dtype=self.dtype, kernel_init=default_init(), name='conv')(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour repeat, then (optionally) a 3x3 conv."""
  with_conv: bool = True
  dtype: Any = jnp.float32
  conv_algorithm: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]. Returns [B, 2H, 2W, C]."""
    b, height, width, c = x.shape
    # One broadcast + reshape: XLA turns this into a single copy, unlike two jnp.repeat calls.
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
    x = x.reshape(b, 2 * height, 2 * width, c)
    if self.with_conv:
      x = _conv3x3(x, c, self.dtype, default_init(), self.conv_algorithm, 'conv')
    return x


class UNet(nn.Module):
  """The DDPM U-Net, optionally class- or image-conditional.

  Attributes:
    ch: base channel count (the time embedding is 4 * ch wide).
    out_ch: channels of the prediction; must equal the channels of x.
    ch_mult: channel multiplier per resolution level; the image size must be divisible by
      2 ** (len(ch_mult) - 1).
    num_res_blocks: residual blocks per level on the down path (the up path has one more).
    attn_resolutions: feature-map heights (pixels) after whose residual blocks self-attention runs.
    num_heads: attention heads.
    dropout: dropout rate inside residual blocks (train=True only).
    resamp_with_conv: learned 3x3 convs in down/upsampling (DDPM) instead of avg-pool / plain
      nearest upsampling.
    num_classes: 0 = unconditional; > 0 adds nn.Embed(num_classes + 1, 4ch)(y) to the time
      embedding, where y == num_classes is the 'null' label of classifier-free guidance.
    cond_channels: 0 = no image condition; > 0 concatenates a condition image with this many
      channels to x (resized bilinearly to x's size first when they differ, for super-resolution).
    dtype: compute dtype, 'float32' or 'bfloat16'.
    remat: rematerialise residual blocks in the backward pass (less activation memory, ~1 more
      forward of compute).
    num_groups: GroupNorm groups (32 in DDPM; layers narrower than 2 * num_groups channels use
      fewer, see `_group_count`).
    conv_algorithm: 3x3 convs of residual blocks and upsampling: 'auto' (Winograd F(2x2, 3x3)
      where it measured faster, see `use_winograd`), 'direct' or 'winograd'. Same parameters and,
      up to float rounding, the same function either way.
  """
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 1
  dropout: float = 0.1
  resamp_with_conv: bool = True
  num_classes: int = 0
  cond_channels: int = 0
  dtype: Any = 'float32'
  remat: bool = False
  num_groups: int = 32
  conv_algorithm: str = 'auto'

  def _compute_dtype(self):
    name = jnp.dtype(self.dtype).name
    if name not in _SUPPORTED_DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} is not supported; use one of "
                       f"{_SUPPORTED_DTYPES}.")
    return jnp.dtype(name)

  def _validate(self, x, t, y, cond):
    """Raises ValueError, naming the config field to change, for inputs this model cannot take."""
    if x.ndim != 4:
      raise ValueError(f'x must be NHWC [B, H, W, C]; got shape {x.shape}.')
    b, height, width, c = x.shape
    if c != self.out_ch:
      raise ValueError(f'x has {c} channels but the model predicts model out_ch={self.out_ch}; '
                       'set config.data.num_channels to the images\' channel count.')
    factor = 2 ** (len(self.ch_mult) - 1)
    if height % factor or width % factor:
      raise ValueError(f'image size {height}x{width} is not divisible by 2**(len(ch_mult)-1)='
                       f'{factor} (model.ch_mult={tuple(self.ch_mult)}); change data.image_size '
                       'or use fewer levels in model.ch_mult.')
    reached = [height // 2 ** i for i in range(len(self.ch_mult))]
    missing = sorted(set(self.attn_resolutions) - set(reached))
    if missing:
      raise ValueError(f'model.attn_resolutions={tuple(self.attn_resolutions)} contains {missing}, '
                       f'which this model never reaches (feature-map sizes: {reached}); use sizes '
                       'from that list.')
    if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != b):
      raise ValueError(f't must have shape [B]=[{b}] (or be a scalar); got {jnp.shape(t)}.')
    if self.num_classes > 0:
      if y is None:
        raise ValueError(f'model.num_classes={self.num_classes}: the model is class-conditional '
                         f'and needs y (int [B]; y={self.num_classes} is the null label); pass y= '
                         'or set model.num_classes=0.')
      if jnp.shape(y) != (b,):
        raise ValueError(f'y must have shape [B]=[{b}]; got {jnp.shape(y)}.')
    elif y is not None:
      raise ValueError('y was given but model.num_classes=0 (unconditional); set '
                       'model.num_classes to the number of classes or drop y.')
    if self.cond_channels > 0:
      if cond is None:
        raise ValueError(f'model.cond_channels={self.cond_channels}: the model is '
                         'image-conditional and needs cond ([B, h, w, cond_channels]); pass cond= '
                         'or set model.cond_channels=0.')
      if cond.ndim != 4 or cond.shape[0] != b or cond.shape[-1] != self.cond_channels:
        raise ValueError(f'cond must have shape [B={b}, h, w, model.cond_channels='
                         f'{self.cond_channels}]; got {cond.shape}. Set model.cond_channels to '
                         'the condition image\'s channel count.')
    elif cond is not None:
      raise ValueError('cond was given but model.cond_channels=0; set model.cond_channels to the '
                       'condition image\'s channel count or drop cond.')

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False, *,
               y: Optional[jax.Array] = None, cond: Optional[jax.Array] = None) -> jax.Array:
    """Predicts eps / x0 / v (whatever it was trained for) from a noisy image.

    Args:
      x: float [B, H, W, out_ch] noisy images, nominally in [-1, 1].
      t: int [B] timesteps (a scalar is broadcast to [B]).
      train: enables dropout (then apply() needs rngs={'dropout': key}).
      y: int32 [B] class labels in [0, num_classes] (num_classes = null label); class-conditional
        models only.
      cond: float [B, h, w, cond_channels] condition image; image-conditional models only.

    Returns:
      float32 [B, H, W, out_ch].
    """
    dtype = self._compute_dtype()
    self._validate(x, t, y, cond)
    b, height, width, _ = x.shape
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

    def res_block(h, out_ch, name):
      return block_cls(out_ch, self.dropout, self.num_groups, dtype, self.conv_algorithm,
                       name=name)(h, temb, train)

    def attn_block(h, name):
      return AttnBlock(self.num_heads, self.num_groups, dtype, name=name)(h)

    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(4 * self.ch, dtype=dtype, kernel_init=default_init(), name='temb_dense0')(temb)
    temb = nn.Dense(4 * self.ch, dtype=dtype, kernel_init=default_init(),
                    name='temb_dense1')(nn.silu(temb))
    if self.num_classes > 0:
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dtype,
                             name='label_embed')(y)

    h = x.astype(dtype)
    if self.cond_channels > 0:
      if cond.shape[1:3] != (height, width):
        cond = jax.image.resize(cond.astype(jnp.float32), (b, height, width, cond.shape[-1]),
                                'bilinear')
      h = jnp.concatenate([h, cond.astype(dtype)], axis=-1)

    # Down path; every intermediate goes on the skip stack.
    hs = [nn.Conv(self.ch, (3, 3), padding=1, dtype=dtype, kernel_init=default_init(),
                  name='conv_in')(h)]
    num_levels = len(self.ch_mult)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_block(hs[-1], self.ch * mult, f'down_{level}_block_{i}')
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(h, f'down_{level}_attn_{i}')
        hs.append(h)
      if level != num_levels - 1:
        hs.append(Downsample(self.resamp_with_conv, dtype, name=f'down_{level}_downsample')(hs[-1]))

    h = hs[-1]
    h = res_block(h, h.shape[-1], 'mid_block_0')
    h = attn_block(h, 'mid_attn')
    h = res_block(h, h.shape[-1], 'mid_block_1')

    # Up path; each block consumes one skip, so the stack empties exactly.
    for level in reversed(range(num_levels)):
      for i in range(self.num_res_blocks + 1):
        h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[level],
                      f'up_{level}_block_{i}')
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(h, f'up_{level}_attn_{i}')
      if level != 0:
        h = Upsample(self.resamp_with_conv, dtype, self.conv_algorithm,
                     name=f'up_{level}_upsample')(h)
    assert not hs, 'skip connections left over'

    h = nn.silu(_group_norm(h.shape[-1], self.num_groups, dtype, 'norm_out')(h))
    h = nn.Conv(self.out_ch, (3, 3), padding=1, dtype=dtype, kernel_init=default_init(0.0),
                name='conv_out')(h)
    return h.astype(jnp.float32)
