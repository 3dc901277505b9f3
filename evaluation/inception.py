"""InceptionV3 as in the FID network (TF `inception-2015-12-05`, pool3 features), in Flax.

This is the graph FID, KID and the StyleGAN/EDM metrics are defined with, not
torchvision's InceptionV3: batch norm without a scale (gamma), epsilon 1e-3, no
conv bias, average pools that exclude the padding, and a *max* pool in the last
block's pool branch. Layer names follow the TF graph (`mixed_9/tower_1_conv_1`),
which are also the TorchScript export's names, so conversion is a rename.

The input pipeline is the standard one too (`preprocess`): uint8 pixels are
resized to 299x299 with TF1's legacy bilinear resize (source coordinate
`i * in / out`, no half-pixel offset; NVlabs' `nv_bilinear`), in float (no
re-quantization after resizing), then mapped to [-1, 0.9921875] by `x / 128 - 1`.
Resizing or quantizing differently moves FID by whole points.

Usage:
  model, params = fid.load_inception()       # converts the weights on first use
  feats = inception.features(params, images_uint8)  # [B, 2048] float32
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm (no gamma, eps 1e-3, frozen statistics) -> ReLU.

  Params: `kernel` [kh, kw, in, out] (HWIO), `beta`, `mean`, `var` [out]. The
  frozen statistics live in 'params' because this network is never trained.
  Stride-1 SAME convs have odd kernels here, so SAME pads (k - 1) // 2 each side.
  """
  features: int
  kernel_size: tuple
  strides: int = 1
  padding: str = 'SAME'  # 'SAME' | 'VALID'
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    x = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides), self.padding,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=self.precision)
    return nn.relu((x - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def _avg_pool_3x3(x):
  # TF's SAME average pool divides by the number of real (unpadded) pixels.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class _Block(nn.Module):
  """Base of the mixed blocks: `conv(name, features, kernel, x)` builds a named ConvBN."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  def conv(self, name, features, kernel, x, strides=1, padding='SAME'):
    return ConvBN(features, kernel, strides, padding, self.precision, name=name)(x)


class InceptionA(_Block):
  """35x35 block (TF mixed, mixed_1, mixed_2)."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    c = self.conv
    return jnp.concatenate([
        c('conv', 64, (1, 1), x),
        c('tower_conv_1', 64, (5, 5), c('tower_conv', 48, (1, 1), x)),
        c('tower_1_conv_2', 96, (3, 3),
          c('tower_1_conv_1', 96, (3, 3), c('tower_1_conv', 64, (1, 1), x))),
        c('tower_2_conv', self.pool_features, (1, 1), _avg_pool_3x3(x)),
    ], axis=-1)


class InceptionB(_Block):
  """35x35 -> 17x17 reduction (TF mixed_3)."""

  @nn.compact
  def __call__(self, x):
    c = self.conv
    tower = c('tower_conv_1', 96, (3, 3), c('tower_conv', 64, (1, 1), x))
    return jnp.concatenate([
        c('conv', 384, (3, 3), x, strides=2, padding='VALID'),
        c('tower_conv_2', 96, (3, 3), tower, strides=2, padding='VALID'),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionC(_Block):
  """17x17 block with factorized 7x7 convs (TF mixed_4 .. mixed_7)."""
  c7: int = 128

  @nn.compact
  def __call__(self, x):
    c, c7 = self.conv, self.c7
    a = c('tower_conv', c7, (1, 1), x)
    a = c('tower_conv_1', c7, (1, 7), a)
    a = c('tower_conv_2', 192, (7, 1), a)
    b = c('tower_1_conv', c7, (1, 1), x)
    b = c('tower_1_conv_1', c7, (7, 1), b)
    b = c('tower_1_conv_2', c7, (1, 7), b)
    b = c('tower_1_conv_3', c7, (7, 1), b)
    b = c('tower_1_conv_4', 192, (1, 7), b)
    return jnp.concatenate(
        [c('conv', 192, (1, 1), x), a, b, c('tower_2_conv', 192, (1, 1), _avg_pool_3x3(x))],
        axis=-1)


class InceptionD(_Block):
  """17x17 -> 8x8 reduction (TF mixed_8)."""

  @nn.compact
  def __call__(self, x):
    c = self.conv
    a = c('tower_conv_1', 320, (3, 3), c('tower_conv', 192, (1, 1), x), strides=2,
          padding='VALID')
    b = c('tower_1_conv', 192, (1, 1), x)
    b = c('tower_1_conv_1', 192, (1, 7), b)
    b = c('tower_1_conv_2', 192, (7, 1), b)
    b = c('tower_1_conv_3', 192, (3, 3), b, strides=2, padding='VALID')
    return jnp.concatenate([a, b, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """8x8 block with split 1x3 / 3x1 convs (TF mixed_9, mixed_10)."""
  max_pool: bool = False  # the 2015 graph's last block pools with max, not average

  @nn.compact
  def __call__(self, x):
    c = self.conv
    a = c('tower_conv', 384, (1, 1), x)
    b = c('tower_1_conv_1', 384, (3, 3), c('tower_1_conv', 448, (1, 1), x))
    pooled = (nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
              if self.max_pool else _avg_pool_3x3(x))
    return jnp.concatenate([
        c('conv', 320, (1, 1), x),
        c('tower_mixed_conv', 384, (1, 3), a),
        c('tower_mixed_conv_1', 384, (3, 1), a),
        c('tower_1_mixed_conv', 384, (1, 3), b),
        c('tower_1_mixed_conv_1', 384, (3, 1), b),
        c('tower_2_conv', 192, (1, 1), pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """The FID InceptionV3 up to pool3 (and the softmax logits if `num_classes`).

  Call with images already `preprocess`ed: float32 [B, 299, 299, 3] in [-1, 1].
  Returns pool3 features [B, 2048] float32, or (features, logits [B, num_classes])
  when `num_classes` > 0 (the TF graph's head has 1008 classes; the bundled
  TorchScript weights do not carry it, so by default there is none).
  Params: {'conv': {...}, ..., 'mixed_9': {'tower_conv': {kernel, beta, mean, var}}, ...}.
  """
  num_classes: int = 0
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    conv = lambda name, f, k, y, **kw: ConvBN(f, k, precision=p, name=name, **kw)(y)
    x = conv('conv', 32, (3, 3), x, strides=2, padding='VALID')
    x = conv('conv_1', 32, (3, 3), x, padding='VALID')
    x = conv('conv_2', 64, (3, 3), x)
    x = _max_pool_3x3_s2(x)
    x = conv('conv_3', 80, (1, 1), x)
    x = conv('conv_4', 192, (3, 3), x, padding='VALID')
    x = _max_pool_3x3_s2(x)
    x = InceptionA(p, pool_features=32, name='mixed')(x)
    x = InceptionA(p, pool_features=64, name='mixed_1')(x)
    x = InceptionA(p, pool_features=64, name='mixed_2')(x)
    x = InceptionB(p, name='mixed_3')(x)
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = InceptionC(p, c7=c7, name=f'mixed_{4 + i}')(x)
    x = InceptionD(p, name='mixed_8')(x)
    x = InceptionE(p, max_pool=False, name='mixed_9')(x)
    x = InceptionE(p, max_pool=True, name='mixed_10')(x)
    pool3 = jnp.mean(x, axis=(1, 2))  # the graph's 8x8 average pool (8x8 at 299x299 input)
    if not self.num_classes:
      return pool3
    logits = nn.Dense(self.num_classes, precision=p, name='logits')(pool3)
    return pool3, logits


# ----------------------------------------------------------------------------- parameters


@functools.cache
def layer_specs():
  """What the module declares, read off a shape-only trace (nothing is computed).

  Returns:
    (shapes, convs): shapes maps flat names ('mixed_3/tower_conv_2/kernel') to
    parameter shapes (no logits head); convs maps each conv's name
    ('mixed_3/tower_conv_2') to (stride, symmetric padding (ph, pw)).
  """
  convs = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, ConvBN) and context.method_name == '__call__':
      kh, kw = m.kernel_size
      pad = (0, 0) if m.padding == 'VALID' else ((kh - 1) // 2, (kw - 1) // 2)
      convs['/'.join(m.scope.path)] = (m.strides, pad)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    tree = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  shapes = {'/'.join(str(k.key) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree['params'])}
  return shapes, convs


# ----------------------------------------------------------------------------- input pipeline


@functools.cache
def _resize_matrix(in_size, out_size):
  """[out, in] float32 weights of TF1 legacy bilinear resize along one axis.

  Output pixel i samples input coordinate s = i * in / out (align_corners=False,
  no half-pixel centers), between floor(s) and floor(s) + 1, clamped at the border.
  """
  s = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lo = np.floor(s).astype(np.int64)
  frac = s - lo
  hi = np.minimum(lo + 1, in_size - 1)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def preprocess(images):
  """uint8 images -> the FID network's input.

  Args:
    images: uint8 (or integer-valued float) [B, H, W, C], C in {1, 3}, pixels in [0, 255].
      Grayscale is replicated to 3 channels.

  Returns:
    float32 [B, 299, 299, 3] in [-1, 0.9921875]: legacy-TF bilinear resize in
    float (skipped when already 299x299), then `x / 128 - 1`.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected uint8 [B, H, W, 1 or 3], got shape {images.shape}')
  x = jnp.asarray(images).astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  h, w = x.shape[1:3]
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    rh = jnp.asarray(_resize_matrix(h, INPUT_SIZE))
    rw = jnp.asarray(_resize_matrix(w, INPUT_SIZE))
    x = jnp.einsum('ih,bhwc,jw->bijc', rh, x, rw, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(x / 128.0 - 1.0, -1.0, 1.0 - 1.0 / 128.0)


def num_classes_of(params):
  """Classes of the logits head in Inception params (0: the FID weights, pool3 only)."""
  return params['logits']['kernel'].shape[-1] if 'logits' in params else 0


@functools.partial(jax.jit, static_argnames=('with_logits',))
def features(params, images, with_logits=False):
  """Pool3 features (and logits) of uint8 images, the standard FID way.

  Args:
    params: from `load()`.
    images: uint8 [B, H, W, C], C in {1, 3}; any H, W (resized to 299). A batch
      sharded over devices stays sharded (jit propagates it).
    with_logits: also return the classifier logits (needs weights with the head).

  Returns:
    float32 [B, 2048]; with_logits: (that, float32 [B, num_classes]).
  """
  num_classes = num_classes_of(params)
  if with_logits and not num_classes:
    raise ValueError('these Inception weights carry no classifier head (the bundled FID '
                     'network stops at pool3), so there are no logits / Inception Score')
  out = InceptionV3(num_classes=num_classes).apply({'params': params}, preprocess(images))
  if num_classes and not with_logits:
    return out[0]
  return out
