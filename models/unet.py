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

With context_dim > 0 the U-Net is text-conditional: a `CrossAttnBlock` (cross-attention on the
text states, then a GEGLU feed-forward, as in Stable Diffusion's transformer block) follows every
attention block; its output projections start at zero, so at init it ignores the text.

Initialisation follows DDPM: variance scaling (fan_avg, uniform) for every kernel, zero biases,
and zeros for the last conv of each residual block, the attention output projection and conv_out,
so that every block starts as the identity and the freshly initialised network outputs zeros.

Mixed precision: `dtype` sets the compute dtype of convs, dense layers and activations; parameters
are always float32; GroupNorm statistics and the attention softmax are computed in float32; the
output is float32.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.layers import default_init, group_norm, label_embedding
from models.layers import timestep_embedding
from models.winograd import conv3x3



def _qkv_init(key, shape, dtype=jnp.float32):
  """Initialises a fused [C, 3 * C] q/k/v kernel as three independent [C, C] DDPM kernels.

  Flax's DenseGeneral hands its initialiser the flattened kernel; initialising that as one
  [C, 3C] matrix would use fan_avg = 2C instead of DDPM's C per projection.
  """
  fan_in, fan_out = shape
  init = nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform', in_axis=0, out_axis=2, batch_axis=(1,))
  return init(key, (fan_in, 3, fan_out // 3), dtype).reshape(shape)


class ResBlock(nn.Module):
  """DDPM residual block with a timestep-embedding projection.

  Attributes:
    out_ch: output channels.
    dropout: dropout rate before the second conv (active only when train=True).
    num_groups: GroupNorm groups (see `models.layers.group_count`).
    dtype: compute dtype.
    conv_algorithm: one of CONV_ALGORITHMS for the 3x3 convs (see `winograd_tile`).
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
    h = nn.silu(group_norm(in_ch, self.num_groups, self.dtype, 'norm1')(x))
    h = conv3x3(h, self.out_ch, self.dtype, default_init(), self.conv_algorithm, 'conv1')
    # DDPM projects SiLU(temb), one bias per channel, broadcast over space.
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init(),
                     name='temb_proj')(nn.silu(temb))[:, None, None, :]
    h = nn.silu(group_norm(self.out_ch, self.num_groups, self.dtype, 'norm2')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv3x3(h, self.out_ch, self.dtype, default_init(0.0), self.conv_algorithm, 'conv2')
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
    h = group_norm(c, self.num_groups, self.dtype, 'norm')(x)
    h = h.reshape(b, height * width, c)
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, kernel_init=_qkv_init,
                          name='qkv')(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    h = jax.nn.dot_product_attention(q, k, v)
    h = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=default_init(0.0),
                        name='proj_out')(h)
    return x + h.reshape(b, height, width, c)


class CrossAttnBlock(nn.Module):
  """Text cross-attention and a GEGLU feed-forward, Stable Diffusion's transformer-block order.

  Runs after an `AttnBlock` (which is the self-attention of SD's block) on the image tokens:

    h = h + to_out(attention(q = to_q(LN(h)), k = to_k(context), v = to_v(context), mask))
    h = h + Dense_C(a * gelu(g)), with (a, g) = split(Dense_8C(LN(h)))

  to_q/to_k/to_v have no bias, as in SD. The two output projections start at zero, so a fresh
  block is the identity and a text model starts as the unconditional DDPM U-Net it extends.

  Attributes:
    num_heads: attention heads; must divide the channel count.
    dtype: compute dtype (LayerNorm statistics and the softmax stay float32).
  """
  num_heads: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C]; context float [B, L, D]; context_mask bool [B, L] (True = real
    token). Returns [B, H, W, C]."""
    b, height, width, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must divide the {c} channels of every '
                       'attention layer; pick a divisor of ch * ch_mult[i].')
    head_dim = c // self.num_heads
    heads = (self.num_heads, head_dim)
    h = x.reshape(b, height * width, c)

    n = nn.LayerNorm(dtype=self.dtype, name='norm_cross')(h)
    q = nn.DenseGeneral(heads, use_bias=False, dtype=self.dtype, kernel_init=default_init(),
                        name='to_q')(n)
    ctx = context.astype(self.dtype)
    k = nn.DenseGeneral(heads, use_bias=False, dtype=self.dtype, kernel_init=default_init(),
                        name='to_k')(ctx)
    v = nn.DenseGeneral(heads, use_bias=False, dtype=self.dtype, kernel_init=default_init(),
                        name='to_v')(ctx)
    mask = jnp.broadcast_to(context_mask[:, None, None, :],
                            (b, self.num_heads, height * width, context.shape[1]))
    a = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, HW, heads, head_dim]
    # A row without a single real token has nothing to attend to: the softmax over an all-masked
    # row is undefined (a uniform average or NaN, depending on the implementation), so such a row
    # reads no text at all. jnp.where keeps the gradient of the other rows intact.
    has_text = jnp.any(context_mask, axis=-1)[:, None, None, None]
    a = jnp.where(has_text, a, jnp.zeros_like(a))
    h = h + nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=default_init(0.0),
                            name='to_out')(a)

    n = nn.LayerNorm(dtype=self.dtype, name='norm_ff')(h)
    # GEGLU (Shazeer 2020) with SD's inner width 4C: one Dense to 8C holds value and gate.
    value, gate = jnp.split(nn.Dense(8 * c, dtype=self.dtype, kernel_init=default_init(),
                                     name='ff_in')(n), 2, axis=-1)
    f = value * nn.gelu(gate, approximate=False)
    h = h + nn.Dense(c, dtype=self.dtype, kernel_init=default_init(0.0), name='ff_out')(f)
    return h.reshape(b, height, width, c)


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
      x = conv3x3(x, c, self.dtype, default_init(), self.conv_algorithm, 'conv')
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
      fewer, see `models.layers.group_count`).
    conv_algorithm: 3x3 convs of residual blocks and upsampling: 'auto' (Winograd F(2x2, 3x3) or
      F(4x4, 3x3) where it measured faster, see `winograd_tile`), 'direct', 'winograd' (F(2x2))
      or 'winograd4' (F(4x4)). Same parameters and, up to float rounding, the same function.
    context_dim: 0 = no text; > 0 = the width D of the text states `context` [B, L, D], read by a
      `CrossAttnBlock` after every self-attention block (down, mid and up).
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
  context_dim: int = 0

  def _compute_dtype(self):
    return layers.compute_dtype(self.dtype, 'model.dtype')

  def _validate(self, x, t, y, cond, context=None, context_mask=None):
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
    if self.context_dim > 0:
      if context is None:
        raise ValueError(f'model.context_dim={self.context_dim}: the model is text-conditional '
                         'and needs context (float [B, L, context_dim] text-encoder states); pass '
                         'context= or set model.context_dim=0.')
      if jnp.ndim(context) != 3 or jnp.shape(context)[0] != b:
        raise ValueError(f'context must have shape [B={b}, L, D]; got {jnp.shape(context)}.')
      if jnp.shape(context)[-1] != self.context_dim:
        raise ValueError(f'context has width {jnp.shape(context)[-1]} but model.context_dim='
                         f'{self.context_dim}; set model.context_dim to the text encoder\'s '
                         'width (e.g. 384 for MiniLM, 768 for CLIP ViT-L/14).')
      if context_mask is not None and jnp.shape(context_mask) != jnp.shape(context)[:2]:
        raise ValueError(f'context_mask must have shape [B, L]={jnp.shape(context)[:2]}; got '
                         f'{jnp.shape(context_mask)}.')
    elif context is not None or context_mask is not None:
      raise ValueError('context was given but model.context_dim=0 (no text conditioning); set '
                       'model.context_dim to the text encoder\'s width or drop context.')

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False, *,
               y: Optional[jax.Array] = None, cond: Optional[jax.Array] = None,
               context: Optional[jax.Array] = None,
               context_mask: Optional[jax.Array] = None) -> jax.Array:
    """Predicts eps / x0 / v (whatever it was trained for) from a noisy image.

    Args:
      x: float [B, H, W, out_ch] noisy images, nominally in [-1, 1].
      t: int [B] timesteps (a scalar is broadcast to [B]).
      train: enables dropout (then apply() needs rngs={'dropout': key}).
      y: int32 [B] class labels in [0, num_classes] (num_classes = null label); class-conditional
        models only.
      cond: float [B, h, w, cond_channels] condition image; image-conditional models only.
      context: float [B, L, context_dim] text-encoder token states; text models only.
      context_mask: bool [B, L], True = real token (None = all real); text models only.

    Returns:
      float32 [B, H, W, out_ch].
    """
    dtype = self._compute_dtype()
    self._validate(x, t, y, cond, context, context_mask)
    if self.context_dim > 0 and context_mask is None:
      context_mask = jnp.ones(jnp.shape(context)[:2], bool)
    b, height, width, _ = x.shape
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

    def res_block(h, out_ch, name):
      return block_cls(out_ch, self.dropout, self.num_groups, dtype, self.conv_algorithm,
                       name=name)(h, temb, train)

    def attn_block(h, name):
      h = AttnBlock(self.num_heads, self.num_groups, dtype, name=name)(h)
      if self.context_dim > 0:
        h = CrossAttnBlock(self.num_heads, dtype, name=name + '_cross')(
            h, context, jnp.asarray(context_mask, bool))
      return h

    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(4 * self.ch, dtype=dtype, kernel_init=default_init(), name='temb_dense0')(temb)
    temb = nn.Dense(4 * self.ch, dtype=dtype, kernel_init=default_init(),
                    name='temb_dense1')(nn.silu(temb))
    if self.num_classes > 0:
      temb = temb + label_embedding(self.num_classes, 4 * self.ch, dtype, 'label_embed')(y)

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

    h = nn.silu(group_norm(h.shape[-1], self.num_groups, dtype, 'norm_out')(h))
    h = nn.Conv(self.out_ch, (3, 3), padding=1, dtype=dtype, kernel_init=default_init(0.0),
                name='conv_out')(h)
    return h.astype(jnp.float32)
