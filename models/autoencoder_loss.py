"""Training objective of the KL autoencoder (LDM's `LPIPSWithDiscriminator`, without LPIPS).

Generator (autoencoder) loss, LDM's sum reductions (sum over pixels / latents, mean over batch):

  rec     = sum |x - x_rec| (or squared) / B
  kl      = sum KL(q(z | x) || N(0, I)) / B                        (nats)
  g_loss  = -mean D(x_rec)                                         (PatchGAN logits)
  d_weight = clip(|grad_L rec| / (|grad_L g_loss| + 1e-4), 0, 1e4) * disc_weight,
             L = the decoder's conv_out kernel, no gradient through d_weight
  loss    = rec + kl_weight * kl + d_weight * disc_factor(step) * g_loss

Discriminator loss: disc_factor(step) * hinge (or vanilla) on D(x) vs D(stop_grad(x_rec)).
disc_factor(step) is `disc_factor` from step >= disc_start, else 0.

Left out on purpose: LPIPS (LDM adds a VGG perceptual term to rec; no VGG weights are available
offline here) and LDM's learned scalar output log-variance (fixed at 0, where LDM starts it, so
rec is the plain sum). The discriminator uses GroupNorm ('group') or no normalisation ('none')
instead of LDM's BatchNorm, so that its loss is a pure function with no batch statistics to thread.

The functions are pure: `generator_loss(params, batch, rng, disc_params, step) -> (loss, metrics)`
and `discriminator_loss(disc_params, batch, rng, params, step) -> (loss, metrics)`, from
`make_loss_fns`; batch['image'] is float [B, H, W, C] in [-1, 1].
"""

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models.autoencoder import LAST_LAYER
from models.layers import group_norm

Metrics = Dict[str, jax.Array]


def loss_config() -> ml_collections.ConfigDict:
  """The `config.autoencoder_loss` group, LDM's kl-f8 defaults (autoencoder_kl_32x32x4.yaml)."""
  c = ml_collections.ConfigDict()
  c.rec_loss = 'l1'  # 'l1' | 'l2': per-pixel reconstruction error, summed
  c.kl_weight = 1e-6  # weight of the summed KL (nats)
  c.disc_start = 50001  # step from which the GAN terms count (0 = from the start)
  c.disc_weight = 0.5  # multiplies the adaptive weight
  c.disc_factor = 1.0  # GAN factor once step >= disc_start (0 = no GAN at all)
  c.disc_loss = 'hinge'  # 'hinge' | 'vanilla' (softplus)
  c.disc_num_layers = 3  # stride-2 convs of the PatchGAN (3: 70x70 receptive field)
  c.disc_channels = 64  # width of the PatchGAN's first conv (doubles per layer, at most 8x)
  c.disc_norm = 'group'  # 'group' | 'none' (LDM: BatchNorm)
  return c


# ----------------------------------------------------------------------------------- metrics

def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio per example, in dB, of images clipped to [-1, 1].

  Args:
    x, y: float [B, ...] images nominally in [-1, 1] (the range is 2, as data_range says).
    data_range: max - min of the valid pixel values.

  Returns:
    float32 [B]: 10 log10(data_range^2 / MSE); +inf for identical images.
  """
  lo, hi = -data_range / 2, data_range / 2
  err = jnp.clip(x.astype(jnp.float32), lo, hi) - jnp.clip(y.astype(jnp.float32), lo, hi)
  mse = jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


# ----------------------------------------------------------------------------- discriminator

class NLayerDiscriminator(nn.Module):
  """pix2pix's PatchGAN as LDM uses it, NHWC: one logit per overlapping patch.

  conv 4x4 s2 (channels) -> LeakyReLU(0.2); for n in 1..num_layers-1: conv 4x4 s2
  (channels * min(2^n, 8)) -> norm -> LeakyReLU; conv 4x4 s1 (channels * min(2^L, 8)) -> norm ->
  LeakyReLU; conv 4x4 s1 (1). All convs pad 1. Weights ~ N(0, 0.02) as LDM's `weights_init`.

  Attributes:
    channels: width of the first conv.
    num_layers: stride-2 convs; the image must be large enough to leave >= 1x1 logits (checked:
      16 pixels for 2 layers, 32 for LDM's 3).
    norm: 'group' (GroupNorm, groups from models.layers.group_count) or 'none'.
  """
  channels: int = 64
  num_layers: int = 3
  norm: str = 'group'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x float [B, H, W, C]. Returns float32 logits [B, h, w, 1] (h ~ H / 2^num_layers - 2).
    """
    if self.norm not in ('group', 'none'):
      raise ValueError(f"autoencoder_loss.disc_norm={self.norm!r}; use 'group' or 'none'.")
    size = min(x.shape[1:3])
    for _ in range(self.num_layers):
      size = (size + 2 - 4) // 2 + 1
    if size - 2 < 1:  # the two stride-1 4x4 convs with padding 1 each take one pixel off
      raise ValueError(f'images of {x.shape[1]}x{x.shape[2]} are too small for a PatchGAN with '
                       f'disc_num_layers={self.num_layers}; use fewer layers.')
    init = nn.initializers.normal(0.02)
    def conv(h, features, stride, name, bias=True):
      return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                     use_bias=bias, kernel_init=init, name=name)(h)
    def norm_act(h, name):
      if self.norm == 'group':
        h = group_norm(h.shape[-1], 32, jnp.float32, name)(h)
      return nn.leaky_relu(h, 0.2)
    h = nn.leaky_relu(conv(x.astype(jnp.float32), self.channels, 2, 'conv_0'), 0.2)
    # A conv followed by a normalisation needs no bias (the norm's own shift replaces it).
    with_bias = self.norm == 'none'
    for n in range(1, self.num_layers):
      h = conv(h, self.channels * min(2 ** n, 8), 2, f'conv_{n}', with_bias)
      h = norm_act(h, f'norm_{n}')
    n = self.num_layers
    h = norm_act(conv(h, self.channels * min(2 ** n, 8), 1, f'conv_{n}', with_bias), f'norm_{n}')
    return conv(h, 1, 1, 'conv_out')


def create_discriminator(config) -> NLayerDiscriminator:
  """From `config.autoencoder_loss` (or a bare loss group)."""
  c = config.autoencoder_loss if 'autoencoder_loss' in config else config
  return NLayerDiscriminator(c.disc_channels, c.disc_num_layers, c.disc_norm)


def init_discriminator(discriminator: NLayerDiscriminator, rng: jax.Array,
                       image_shape: Tuple[int, ...]) -> Dict[str, Any]:
  """Fresh float32 discriminator params for images of `image_shape` ([B, H, W, C])."""
  x = jnp.zeros(image_shape, jnp.float32)
  # Unpartitionable threefry for the same reason as models.init_params: XLA:CPU compiles the
  # partitionable draws several times slower (9.5 s vs. ~2 s for a tiny PatchGAN on 2 cores).
  with jax.threefry_partitionable(False):
    return jax.jit(lambda rng: discriminator.init(rng, x)['params'])(rng)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))), a scalar."""
  return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 (mean softplus(-D(x)) + mean softplus(D(x_rec))), a scalar (the non-saturating GAN)."""
  return 0.5 * (jnp.mean(nn.softplus(-logits_real)) + jnp.mean(nn.softplus(logits_fake)))


_D_LOSSES = {'hinge': hinge_d_loss, 'vanilla': vanilla_d_loss}


def adaptive_weight(rec_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
  """LDM's GAN weight: |rec_grad| / (|g_grad| + 1e-4), clipped to [0, 1e4], times disc_weight.

  Both are gradients with respect to the decoder's last layer; the result carries no gradient.
  """
  w = jnp.linalg.norm(rec_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


# ------------------------------------------------------------------------------------- losses

def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _replace(tree, path, value):
  """A copy of nested dict `tree` with the leaf at `path` replaced (the rest shared)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out


def reconstruction_loss(x: jax.Array, recon: jax.Array, kind: str = 'l1') -> jax.Array:
  """Sum over pixels of |x - recon| ('l1') or (x - recon)^2 ('l2'), mean over batch; a scalar."""
  err = recon.astype(jnp.float32) - x.astype(jnp.float32)
  if kind == 'l1':
    per_pixel = jnp.abs(err)
  elif kind == 'l2':
    per_pixel = jnp.square(err)
  else:
    raise ValueError(f"autoencoder_loss.rec_loss={kind!r}; use 'l1' or 'l2'.")
  return jnp.sum(per_pixel) / x.shape[0]


class LossFns(NamedTuple):
  generator: Callable[..., Tuple[jax.Array, Metrics]]
  discriminator: Callable[..., Tuple[jax.Array, Metrics]]


def make_loss_fns(autoencoder: nn.Module, config,
                  discriminator: Optional[nn.Module] = None) -> LossFns:
  """Builds the generator and discriminator losses.

  Args:
    autoencoder: a models.autoencoder.AutoencoderKL.
    config: `config.autoencoder_loss` (or the whole config holding it), see `loss_config`.
    discriminator: the PatchGAN (`create_discriminator`); None trains rec + KL only (and
      `discriminator_loss` must not be called).

  Returns:
    LossFns(generator, discriminator):
      generator(params, batch, rng, disc_params=None, step=0, return_reconstruction=False) ->
        (loss, metrics), or (loss, (metrics, reconstruction)): differentiate with respect to
        params (the autoencoder's). metrics: loss, rec_loss, kl_loss (per example, nats), psnr
        (dB, batch mean), and with a discriminator g_loss, d_weight, disc_factor.
      discriminator(disc_params, batch, rng, params, step=0, reconstruction=None) ->
        (loss, metrics): differentiate with respect to disc_params; reconstruction (the
        generator's, to skip a second autoencoder pass) defaults to one made with rng.
    rng draws the posterior sample; step may be a traced int.
  """
  c = config.autoencoder_loss if 'autoencoder_loss' in config else config
  if c.disc_loss not in _D_LOSSES:
    raise ValueError(f'autoencoder_loss.disc_loss={c.disc_loss!r}; use one of {sorted(_D_LOSSES)}.')
  d_loss_fn = _D_LOSSES[c.disc_loss]

  def factor(step):
    return jnp.where(jnp.asarray(step) >= c.disc_start, c.disc_factor, 0.0)

  def rec_and_kl(params, x, rng):
    recon, posterior = autoencoder.apply({'params': params}, x, rng)
    return recon, reconstruction_loss(x, recon, c.rec_loss), jnp.mean(posterior.kl())

  def generator(params, batch, rng, disc_params=None, step=0, return_reconstruction=False):
    x = batch['image']
    if discriminator is None or disc_params is None:
      recon, rec, kl = rec_and_kl(params, x, rng)
      loss = rec + c.kl_weight * kl
      metrics = {}
    else:
      # rec and g_loss as functions of the last layer's kernel alone, so that one forward pass
      # serves the loss and both gradients of the adaptive weight (the outer gradient still
      # flows to every parameter through the primal outputs).
      def parts(last):
        recon, rec, kl = rec_and_kl(_replace(params, LAST_LAYER, last), x, rng)
        logits = discriminator.apply({'params': disc_params}, recon)
        return (rec, -jnp.mean(logits)), (recon, kl)
      (rec, g_loss), vjp, (recon, kl) = jax.vjp(parts, _get(params, LAST_LAYER), has_aux=True)
      one, zero = jnp.ones_like(rec), jnp.zeros_like(rec)
      (rec_grad,), (g_grad,) = vjp((one, zero)), vjp((zero, one))
      d_weight = adaptive_weight(rec_grad, g_grad, c.disc_weight)
      disc_factor = factor(step)
      loss = rec + c.kl_weight * kl + d_weight * disc_factor * g_loss
      metrics = {'g_loss': g_loss, 'd_weight': d_weight, 'disc_factor': disc_factor}
    metrics.update(loss=loss, rec_loss=rec, kl_loss=kl,
                   psnr=jnp.mean(psnr(jax.lax.stop_gradient(recon), x)))
    return loss, ((metrics, recon) if return_reconstruction else metrics)

  def disc(disc_params, batch, rng, params, step=0, reconstruction=None):
    if discriminator is None:
      raise ValueError('make_loss_fns was given no discriminator.')
    x = batch['image']
    if reconstruction is None:
      reconstruction = autoencoder.apply({'params': params}, x, rng)[0]
    reconstruction = jax.lax.stop_gradient(reconstruction)
    # One discriminator call on real and fake together (GroupNorm is per example, so batching
    # them changes nothing).
    logits = discriminator.apply({'params': disc_params}, jnp.concatenate([x, reconstruction]))
    logits_real, logits_fake = jnp.split(logits, 2)
    disc_factor = factor(step)
    loss = disc_factor * d_loss_fn(logits_real, logits_fake)
    return loss, {'d_loss': loss, 'logits_real': jnp.mean(logits_real),
                  'logits_fake': jnp.mean(logits_fake), 'disc_factor': disc_factor}

  return LossFns(generator, disc)


# ------------------------------------------------------------------------------ the trainer

AUTOENCODER, DISCRIMINATOR = 'autoencoder', 'discriminator'


def uses_discriminator(config) -> bool:
  """Whether the run trains a PatchGAN: autoencoder_loss.disc_factor > 0."""
  return config.autoencoder_loss.disc_factor > 0


def init_train_params(autoencoder: nn.Module, config, rng: jax.Array) -> Dict[str, Any]:
  """The trained params of an autoencoder run: {'autoencoder': ..., 'discriminator': ...}, the
  discriminator only with `uses_discriminator`. One tree, so that one optimizer, one EMA and one
  checkpoint serve both (Adam is per parameter: one Adam over both equals LDM's two)."""
  from models import autoencoder as ae_lib  # pylint: disable=g-import-not-at-top
  ae_rng, d_rng = jax.random.split(rng)
  params = {AUTOENCODER: ae_lib.init_params(autoencoder, ae_rng)}
  if uses_discriminator(config):
    size, ch = config.data.image_size, config.data.num_channels
    params[DISCRIMINATOR] = init_discriminator(create_discriminator(config), d_rng,
                                               (1, size, size, ch))
  return params


def make_train_objective(autoencoder: nn.Module, config) -> Callable[..., Tuple[Any, ...]]:
  """The autoencoder's part of train_lib's train step.

  Returns:
    objective(params, batch, rng, step) -> (loss, grads, metrics): params as
    `init_train_params`; grads has params' structure: the generator loss's gradient for the
    autoencoder, the discriminator loss's for the discriminator (whose input reconstruction
    carries no gradient), both from one autoencoder forward pass. loss is the generator's;
    metrics add rec_loss, kl_loss, psnr and, with a discriminator, g_loss, d_weight,
    disc_factor, d_loss, logits_real, logits_fake.
  """
  discriminator = create_discriminator(config) if uses_discriminator(config) else None
  fns = make_loss_fns(autoencoder, config, discriminator)

  def objective(params, batch, rng, step):
    disc_params = params.get(DISCRIMINATOR)

    def gen(ae_params):
      return fns.generator(ae_params, batch, rng, disc_params, step, return_reconstruction=True)

    (loss, (metrics, recon)), ae_grads = jax.value_and_grad(gen, has_aux=True)(
        params[AUTOENCODER])
    grads = {AUTOENCODER: ae_grads}
    metrics = dict(metrics)
    if discriminator is not None:
      # The generator's reconstruction (its posterior draw), not a second autoencoder pass.
      (_, d_metrics), d_grads = jax.value_and_grad(fns.discriminator, has_aux=True)(
          disc_params, batch, rng, params[AUTOENCODER], step, reconstruction=recon)
      grads[DISCRIMINATOR] = d_grads
      metrics.update(d_metrics)
    metrics.pop('loss', None)
    return loss, grads, metrics

  return objective
