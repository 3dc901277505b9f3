"""Winograd F(m x m, 3x3) convolution: a CPU speed device for the U-Net's 3x3 convs.

XLA:CPU's direct convolutions reach a fraction of its matmul speed on these machines; Winograd's
algorithm turns a 3x3 conv into (m+2)^2 channel matmuls on transformed tiles, which XLA runs at
matmul speed. `Conv3x3` has nn.Conv's parameters, so a model can switch algorithm without
changing its checkpoints; `winograd_tile` is the rule that picks one per layer
(config.model.conv_algorithm).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def conv3x3(x, features, dtype, kernel_init, algorithm, name):
  """A Conv3x3 (named `name`, inside the calling compact module) whose algorithm `winograd_tile`
  picks from the layer's shape."""
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
