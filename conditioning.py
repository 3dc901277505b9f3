"""Conditions: what a batch carries besides the image, its null value, dropout for classifier-free
guidance, and guidance itself.

A model takes its conditions as keyword arguments, `model.apply(v, x, t, train=..., **conds)`;
which ones follows from the config, one `Condition` per kind:

  kind        model keywords              from the batch      guided   config
  label       y int32 [B]                 'label'             yes      model.num_classes > 0
  low_res     cond float32 [B, h, w, C]   'low_res'           no       model.cond_channels > 0
  text        context float32 [B, L, D],  'context',          yes      model.context_dim > 0
              context_mask bool [B, L]    'context_mask'

A guided condition is dropped to its null value with probability training.cond_dropout in
training (one coin per example for all of them, so the model also learns the unconditional
case) and replaced by it in the unconditional pass of classifier-free guidance. An unguided one
(the upsampler's low-resolution image) is part of the task and passes through unchanged.

Adding a kind of condition: write a `Condition` subclass here and name it in `build`, teach the
model the keyword, and have the data pipeline put its arrays in the batch. Neither the trainer
nor the samplers change: they only see the dict.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import null_label

Conds = dict  # model keyword -> array [B, ...]


class Condition:
  """One kind of condition. Subclasses set `keys` and `guided`, and may override the rest."""
  keys: tuple = ()  # the model keywords it supplies
  guided: bool = False

  def from_batch(self, batch: dict) -> Conds:
    """The model keywords from a data batch (default: the batch keys of the same names)."""
    return {k: batch[k] for k in self.keys}

  def null(self, conds: Conds) -> Conds:
    """The null condition, same shapes (unguided kinds return theirs unchanged)."""
    return {k: conds[k] for k in self.keys}


@dataclasses.dataclass(frozen=True)
class Label(Condition):
  """A class label; the null label is index num_classes (models.layers.null_label)."""
  num_classes: int
  keys = ('y',)
  guided = True

  def from_batch(self, batch):
    return {'y': batch['label']}

  def null(self, conds):
    return {'y': jnp.full_like(conds['y'], null_label(self.num_classes))}


@dataclasses.dataclass(frozen=True)
class LowRes(Condition):
  """The low-resolution image an upsampler refines (part of the task: never dropped)."""
  keys = ('cond',)
  guided = False

  def from_batch(self, batch):
    return {'cond': batch['low_res']}


@dataclasses.dataclass(frozen=True, eq=False)
class Text(Condition):
  """Token states of a frozen text encoder and their mask; the null is the empty prompt's.

  Attributes:
    null_states: float32 [L, D], the encoding of '' padded to the cache's length L.
    null_mask: bool [L].
  """
  null_states: Any
  null_mask: Any
  keys = ('context', 'context_mask')
  guided = True

  def null(self, conds):
    b = conds['context'].shape[0]
    states = jnp.broadcast_to(jnp.asarray(self.null_states, conds['context'].dtype),
                              (b,) + tuple(np.shape(self.null_states)))
    mask = jnp.broadcast_to(jnp.asarray(self.null_mask, bool), (b,) + tuple(np.shape(self.null_mask)))
    return {'context': states, 'context_mask': mask}


@dataclasses.dataclass(frozen=True, eq=False)
class Conditioner:
  """The conditions of one model, in a fixed order."""
  conditions: tuple = ()

  @property
  def keys(self) -> tuple:
    return tuple(k for c in self.conditions for k in c.keys)

  @property
  def guided(self) -> bool:
    """Whether classifier-free guidance has anything to act on."""
    return any(c.guided for c in self.conditions)

  def from_batch(self, batch: dict) -> Conds:
    out = {}
    for c in self.conditions:
      out.update(c.from_batch(batch))
    return out

  def null(self, conds: Conds) -> Conds:
    """Every guided condition replaced by its null value."""
    out = {}
    for c in self.conditions:
      out.update(c.null(conds) if c.guided else {k: conds[k] for k in c.keys})
    return out

  def drop(self, conds: Conds, rng: jax.Array, rate: float) -> Conds:
    """Classifier-free guidance's training dropout: each example's guided conditions are
    replaced by their null value together, with probability `rate` (one coin per example)."""
    if rate <= 0 or not self.guided:
      return conds
    batch = next(iter(conds.values())).shape[0]
    dropped = jax.random.uniform(rng, (batch,)) < rate
    null = self.null(conds)
    out = {}
    for k, v in conds.items():
      coin = dropped.reshape((batch,) + (1,) * (v.ndim - 1))
      out[k] = jnp.where(coin, null[k], v)
    return out


def build(config, text_null: Optional[tuple] = None) -> Conditioner:
  """The Conditioner of the model `config` describes.

  Args:
    config: the experiment config (model.num_classes, model.cond_channels, model.context_dim).
    text_null: (states float32 [L, D], mask bool [L]) of the empty prompt, for text models
      (from the caption cache or the text encoder).
  """
  m = config.model
  conditions = []
  if m.num_classes > 0:
    conditions.append(Label(m.num_classes))
  if m.cond_channels > 0:
    conditions.append(LowRes())
  if m.get('context_dim', 0) > 0:
    if text_null is None:
      raise ValueError('a text-conditional model (model.context_dim > 0) needs the empty '
                       "prompt's encoding (text_null)")
    conditions.append(Text(*text_null))
  return Conditioner(tuple(conditions))


def guided_model_fn(apply: Callable, conditioner: Conditioner, conds: Conds,
                    guidance_scale: float, null_conds: Optional[Conds] = None):
  """model_fn(x_t, t) for the samplers, with classifier-free guidance on any condition dict.

  out = out_null + w * (out_cond - out_null): w = 1 is the plain conditional model, w = 0 the
  unconditional one, w > 1 strengthens the condition. Guidance combines the raw network
  outputs, whatever prediction type they are: at fixed x_t and t, x0 and v are affine functions
  of eps and the weights (1 - w, w) sum to 1, so guiding 'eps', 'x0' or 'v' outputs gives the
  same implied eps and x0. For w not in {0, 1} the two passes run as one batch of twice the size.

  Args:
    apply: (x_t, t, **conds) -> network output.
    conditioner: the model's Conditioner.
    conds: the conditions, [B, ...] each.
    guidance_scale: w.
    null_conds: the "unconditional" side (default conditioner.null(conds)); a negative prompt
      is a text condition here in place of the empty one.
  """
  if not conditioner.guided or guidance_scale == 1.0:
    return lambda x_t, t: apply(x_t, t, **conds)
  null = conditioner.null(conds) if null_conds is None else null_conds
  if guidance_scale == 0.0:
    return lambda x_t, t: apply(x_t, t, **null)

  def model_fn(x_t, t):
    both = {k: jnp.concatenate([v, null[k]]) for k, v in conds.items()}
    out = apply(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), **both)
    cond, uncond = jnp.split(out, 2)
    return uncond + guidance_scale * (cond - uncond)
  return model_fn


def sampling_labels(config, n: int, offset: int = 0) -> np.ndarray:
  """Labels to generate: config.sampling.class_label, or every class in turn when -1."""
  if config.sampling.class_label >= 0:
    return np.full((n,), config.sampling.class_label, np.int32)
  return (np.arange(offset, offset + n) % config.model.num_classes).astype(np.int32)
