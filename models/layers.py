"""Layers every backbone shares: initializers, the sinusoidal timestep embedding, GroupNorm
sizing and the class-label table with its null label.

Nothing here knows about a particular architecture; the U-Net, the Stable Diffusion U-Net, the
KL autoencoder and DiT build on these so that a convention (which index is the null label, how
t becomes a vector) is written once.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """DDPM's kernel initialiser: variance scaling, fan_avg, uniform; exact zeros for scale 0."""
  if scale == 0.0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, *,
                       flip_sin_to_cos: bool = False, freq_shift: float = 1.0) -> jax.Array:
  """Sinusoidal timestep embedding (diffusers' `get_timestep_embedding` semantics).

  With half = dim // 2 and f_i = max_period ** (-i / (half - freq_shift)), the embedding is
  [sin(t f_i), cos(t f_i)] (or [cos, sin] with flip_sin_to_cos); an odd `dim` gets a zero last
  column. The conventions of the models here:
    DDPM U-Net        freq_shift 1 (f_i = max_period ** (-i / (half - 1))), sin first
    Stable Diffusion  freq_shift 0, cos first (flip_sin_to_cos)
    DiT               freq_shift 0, cos first

  Args:
    t: [B] timesteps (int or float; converted to float32).
    dim: embedding width (>= 4).
    max_period: the longest wavelength, 10000 in all of the above.
    flip_sin_to_cos: put the cosines first.
    freq_shift: the frequency exponent's denominator is half - freq_shift.

  Returns:
    float32 [B, dim].
  """
  if dim < 4:
    raise ValueError(f'timestep_embedding needs dim >= 4, got {dim} (raise model.ch).')
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) / (half - freq_shift) *
                  jnp.arange(half, dtype=jnp.float32))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_count(channels: int, max_groups: int) -> int:
  """GroupNorm groups for a layer: max_groups, or fewer for narrow layers.

  DDPM's GroupNorm uses 32 groups; narrower layers get the largest divisor of `channels` that is
  <= max_groups and leaves >= 2 channels per group. Every paper config (channels a multiple of 32,
  >= 64) gets exactly max_groups. The >= 2 rule matters for tiny models: with one channel per
  group, GroupNorm removes any per-channel constant, which is exactly how the time (and class)
  embedding enters a residual block, so the network would ignore t.
  """
  groups = max(1, min(max_groups, channels // 2))
  while channels % groups:
    groups -= 1
  return groups


def group_norm(channels: int, num_groups: int, dtype: Any, name: str,
               epsilon: float = 1e-6) -> nn.GroupNorm:
  """nn.GroupNorm with `group_count(channels, num_groups)` groups (statistics in float32)."""
  return nn.GroupNorm(num_groups=group_count(channels, num_groups), epsilon=epsilon, dtype=dtype,
                      name=name)


# ------------------------------------------------------------------------------ class labels

def null_label(num_classes: int) -> int:
  """The label index that means "no class" (classifier-free guidance's unconditional input).

  Label tables have num_classes + 1 rows; row num_classes is learned as the null condition.
  """
  return num_classes


def label_embedding(num_classes: int, features: int, dtype: Any, name: str) -> nn.Embed:
  """The class-label table of a class-conditional model: num_classes + 1 rows (the last is
  `null_label`), `features` wide. Create it inside a compact module."""
  return nn.Embed(num_classes + 1, features, dtype=dtype, name=name)


# Compute dtypes every backbone takes (params stay float32); config_lib reads this registry.
SUPPORTED_DTYPES = ('float32', 'bfloat16')


def compute_dtype(dtype: Any, field: str = 'model.dtype') -> jnp.dtype:
  """The jnp dtype of a config's dtype name, or ValueError naming `field` and the choices."""
  name = jnp.dtype(dtype).name
  if name not in SUPPORTED_DTYPES:
    raise ValueError(f'{field}={dtype!r} is not supported; use one of {SUPPORTED_DTYPES}.')
  return jnp.dtype(name)
