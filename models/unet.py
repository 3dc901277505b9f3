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

import functools
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


# Winograd F(m x m, 3x3) (Lavin & Gray 2016): a 3x3 conv on (m+2)x(m+2) input tiles (stride m) as
# (m+2)^2 independent channel matmuls: 2.25x fewer multiply-adds than the direct conv for m = 2,
# 4x fewer for m = 4. In exact arithmetic it equals the direct conv; in float32 the results differ
# by a few ulps of the output scale for m = 2 and by ~10x that for m = 4 (larger transform
# coefficients). The matrices are Lavin & Gray's: out = A^T [(G g G^T) * (B^T d B)] A.
_WINOGRAD = {
    2: dict(
        bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        g=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        at=((1, 1, 1, 0), (0, 1, -1, -1))),
    4: dict(
        bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        g=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}


def _combine(matrix, terms):
  """[sum_j matrix[i][j] * terms[j] for each row i], skipping zero entries: the transforms are
  sparse with small integer or fractional entries, and written out this way XLA fuses them into a
  few elementwise passes instead of dense matmuls."""
  out = []
  for row in matrix:
    acc = None
    for coef, term in zip(row, terms):
      if coef == 0:
        continue
      term = term if coef == 1 else -term if coef == -1 else coef * term
      acc = term if acc is None else acc + term
    out.append(acc)
  return out


def _input_transform(x: jax.Array, tile: int) -> jax.Array:
  """B^T d B for every (tile+2)^2 input tile at once, on strided views (no tile gather).

  x: [B, H, W, C] (H, W divisible by tile). Returns [(tile+2)^2, B * H/tile * W/tile, C]."""
  b, height, width, c = x.shape
  n, bt = tile + 2, _WINOGRAD[tile]['bt']
  th, tw = height // tile, width // tile
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = _combine(bt, [xp[:, u:u + tile * th:tile] for u in range(n)])
  v = [q for r in rows for q in _combine(bt, [r[:, :, u:u + tile * tw:tile] for u in range(n)])]
  return jnp.stack(v).reshape(n * n, b * th * tw, c)


def _kernel_transform(kernel: jax.Array, tile: int) -> jax.Array:
  """G g G^T per channel pair. kernel: [3, 3, C_in, C_out]. Returns [(tile+2)^2, C_in, C_out]."""
  n = tile + 2
  g = jnp.asarray(_WINOGRAD[tile]['g'], kernel.dtype)
  return jnp.einsum('ai,bj,ijco->abco', g, g, kernel).reshape(n * n, *kernel.shape[2:])


def _output_transform(m: jax.Array, shape: tuple[int, ...], tile: int) -> jax.Array:
  """A^T m A, then the output tiles interleaved. m: [(tile+2)^2, P, C]. Returns [B, H, W, C]."""
  b, height, width, c = shape
  n, at = tile + 2, _WINOGRAD[tile]['at']
  m = m.reshape(n, n, b, height // tile, width // tile, c)
  y = [_combine(at, list(q)) for q in _combine(at, list(m))]
  # y[r][s]: output pixel (tile*i + r, tile*j + s), [B, H/tile, W/tile, C]
  y = jnp.stack([jnp.stack(ys, axis=3) for ys in y], axis=2)  # [B, th, tile, tw, tile, C]
  return y.reshape(shape)


def _output_transform_transposed(dy: jax.Array, tile: int) -> jax.Array:
  """The adjoint of `_output_transform`: dy [B, H, W, C] -> [(tile+2)^2, P, C]."""
  b, height, width, c = dy.shape
  n, a = tile + 2, list(zip(*_WINOGRAD[tile]['at']))
  d = dy.reshape(b, height // tile, tile, width // tile, tile, c)
  rows = _combine(a, [d[:, :, r] for r in range(tile)])  # [B, th, tw, tile, C] each
  dm = [q for row in rows for q in _combine(a, [row[:, :, :, s] for s in range(tile)])]
  return jnp.stack(dm).reshape(n * n, -1, c)


def _check_tile(x: jax.Array, tile: int):
  if tile not in _WINOGRAD:
    raise ValueError(f'Winograd tile must be one of {sorted(_WINOGRAD)}; got {tile}.')
  if x.shape[1] % tile or x.shape[2] % tile:
    raise ValueError(f'Winograd F({tile}x{tile}, 3x3) needs H and W divisible by {tile}; '
                     f'got {x.shape[1]}x{x.shape[2]}.')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv3x3(x: jax.Array, kernel: jax.Array, tile: int = 2) -> jax.Array:
  """3x3 stride-1 convolution with zero padding 1 (NHWC, HWIO), computed by Winograd F(m x m, 3x3).

  The backward pass is hand-written: the input gradient is the same convolution of the output
  gradient with the kernel rotated by 180 degrees (again by Winograd), and the kernel gradient
  reuses the forward's transformed input (kept as a residual: (m+2)^2 / m^2 times the input's
  size). Autodiff of the forward instead scatters through the strided views; on the CPU that made
  F(4x4)'s backward slower than F(2x2)'s (bench/RESULTS.md).

  Args:
    x: [B, H, W, C_in] with H and W divisible by `tile`.
    kernel: [3, 3, C_in, C_out], same dtype as x.
    tile: m, the output tile size: 2 or 4.

  Returns:
    [B, H, W, C_out], equal to `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))`
    up to float rounding.
  """
  return _winograd_fwd(x, kernel, tile)[0]


def _winograd_fwd(x, kernel, tile):
  _check_tile(x, tile)
  v = _input_transform(x, tile)
  m = jnp.einsum('kpc,kco->kpo', v, _kernel_transform(kernel, tile))
  return _output_transform(m, (*x.shape[:3], kernel.shape[-1]), tile), (v, kernel)


def _winograd_bwd(tile, residuals, dy):
  v, kernel = residuals
  n = tile + 2
  dm = _output_transform_transposed(dy, tile)
  du = jnp.einsum('kpc,kpo->kco', v, dm).reshape(n, n, *kernel.shape[2:])
  g = jnp.asarray(_WINOGRAD[tile]['g'], kernel.dtype)
  dkernel = jnp.einsum('ai,bj,abco->ijco', g, g, du)
  dx = winograd_conv3x3(dy, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)), tile)
  return dx, dkernel


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


class Conv3x3(nn.Module):
  """3x3 stride-1 'SAME' conv with nn.Conv's parameters ('kernel' [3, 3, C_in, C_out], 'bias'),
  so checkpoints and initial values are those of `nn.Conv(features, (3, 3), padding=1)`.

  Attributes:
    features: output channels.
    dtype: compute dtype.
    kernel_init: kernel initialiser.
    winograd: 0 = the direct conv; 2 or 4 = Winograd F(2x2, 3x3) or F(4x4, 3x3) (H and W must be
      divisible by it).
  """
  features: int
  dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  winograd: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, H, W, C_in]. Returns [B, H, W, features] in dtype."""
    kernel = self.param('kernel', self.kernel_init, (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    if self.winograd:
      y = winograd_conv3x3(x, kernel, self.winograd)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias


def _conv3x3(x, features, dtype, kernel_init, algorithm, name):
  """A Conv3x3 whose algorithm `winograd_tile` picks from the layer's shape."""
  return Conv3x3(features, dtype, kernel_init,
                 winograd_tile(algorithm, dtype, x.shape, features), name=name)(x)


CONV_ALGORITHMS = ('auto', 'direct', 'winograd', 'winograd4')


def winograd_tile(algorithm: str, dtype: Any, x_shape: Sequence[int], c_out: int) -> int:
  """The Winograd output tile a 3x3 conv layer runs with: 0 (direct), 2 or 4.

  'direct' always 0; 'winograd' 2 and 'winograd4' 4 wherever H and W are divisible by it (else
  direct). 'auto' only where it measured faster (bench/RESULTS.md, single-layer table): float32
  on the CPU backend (GPU libraries pick their own conv algorithms) with >= 64 channels in and
  out and feature maps of at least 16x16 (smaller tiles leave the transforms dominant); then
  F(4x4) when the channel matmuls get >= 256 rows (B * H * W / 16), else F(2x2).

  Args:
    algorithm: one of CONV_ALGORITHMS.
    dtype: compute dtype.
    x_shape: the layer's input shape [B, H, W, C_in].
    c_out: output channels.
  """
  if algorithm not in CONV_ALGORITHMS:
    raise ValueError(f'conv_algorithm must be one of {CONV_ALGORITHMS}; got {algorithm!r}.')
  batch, height, width, c_in = x_shape
  fits = lambda tile: height % tile == 0 and width % tile == 0
  if algorithm == 'direct':
    return 0
  if algorithm in ('winograd', 'winograd4'):
    tile = 2 if algorithm == 'winograd' else 4
    return tile if fits(tile) else 0
  if not (jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == 'cpu'
          and min(height, width) >= 16 and min(c_in, c_out) >= 64):
    return 0
  if fits(4) and batch * height * width // 16 >= 256:
    return 4
  return 2 if fits(2) else 0


class ResBlock(nn.Module):
  """DDPM residual block with a timestep-embedding projection.

  Attributes:
    out_ch: output channels.
    dropout: dropout rate before the second conv (active only when train=True).
    num_groups: GroupNorm groups (see `_group_count`).
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
    conv_algorithm: 3x3 convs of residual blocks and upsampling: 'auto' (Winograd F(2x2, 3x3) or
      F(4x4, 3x3) where it measured faster, see `winograd_tile`), 'direct', 'winograd' (F(2x2))
      or 'winograd4' (F(4x4)). Same parameters and, up to float rounding, the same function.
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
