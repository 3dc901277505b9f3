"""Text cross-attention in the U-Net (models/unet.py's CrossAttnBlock, model.context_dim > 0).

One tiny U-Net (ch 16, ch_mult (1, 2), attention at 4x4, 8x8 input, context [B, 5, 8]) is
initialised once and every forward goes through one jitted function of (params, context, mask),
so the module compiles a single time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.unet import CrossAttnBlock, UNet

B, L, D = 2, 5, 8


def _model():
  return UNet(ch=16, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
              num_heads=2, dropout=0.0, num_groups=8, context_dim=D)


def _inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, 8, 8, 1)), jnp.float32)
  t = jnp.asarray([3, 70], jnp.int32)
  context = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  # Example 0 has 3 real tokens and 2 padding tokens; example 1 is all real.
  mask = jnp.asarray([[True, True, True, False, False], [True] * L])
  return x, t, context, mask


@functools.lru_cache(maxsize=None)
def _setup():
  """(params at init, params with every leaf perturbed, jitted apply(params, context, mask))."""
  model = _model()
  x, t, context, mask = _inputs()
  # The RBG generator: XLA:CPU compiles the init's threefry draws in ~50 s on 2 cores, these in ~9.
  key = jax.random.key(0, impl='unsafe_rbg')
  params = jax.jit(lambda k: model.init(k, x, t, context=context, context_mask=mask)['params'])(
      key)
  # Noise on every leaf moves the zero-initialised output projections off zero, so that the text
  # path actually reaches the output (at init it is cut off by design). NumPy noise: no compile.
  rng = np.random.default_rng(1)
  perturbed = jax.tree_util.tree_map(
      lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
  apply = jax.jit(lambda p, c, m: model.apply({'params': p}, x, t, context=c, context_mask=m))
  return params, perturbed, apply


def test_context_blocks_are_present_at_every_attention():
  params, _, _ = _setup()
  crosses = sorted(k for k in params if k.endswith('_cross'))
  # Attention at 4x4: level 1's down block (1), the middle (1) and level 1's up blocks (2).
  assert crosses == ['down_1_attn_0_cross', 'mid_attn_cross', 'up_1_attn_0_cross',
                     'up_1_attn_1_cross']
  block = params['mid_attn_cross']
  assert 'bias' not in block['to_q'] and 'bias' in block['to_out']
  assert block['ff_in']['kernel'].shape == (32, 8 * 32)  # mid level: C = 32


def test_context_is_ignored_at_init_and_used_after_perturbation():
  params, perturbed, apply = _setup()
  _, _, context, mask = _inputs()
  other = context * 3.0 + 1.0
  np.testing.assert_array_equal(np.asarray(apply(params, context, mask)),
                                np.asarray(apply(params, other, mask)))
  a, b = apply(perturbed, context, mask), apply(perturbed, other, mask)
  assert np.all(np.isfinite(np.asarray(a)))
  assert np.max(np.abs(np.asarray(a - b))) > 1e-3


def test_context_mask_hides_padding_tokens():
  _, perturbed, apply = _setup()
  _, _, context, mask = _inputs()
  base = np.asarray(apply(perturbed, context, mask))
  # Example 0's tokens 3 and 4 are masked out: changing them changes nothing.
  padded = context.at[0, 3:].set(100.0)
  np.testing.assert_allclose(np.asarray(apply(perturbed, padded, mask)), base, rtol=0, atol=1e-6)
  # Its token 1 is real: changing it changes example 0's output and leaves example 1's alone.
  real = np.asarray(apply(perturbed, context.at[0, 1].set(5.0), mask))
  assert np.max(np.abs(real[0] - base[0])) > 1e-3
  np.testing.assert_allclose(real[1], base[1], rtol=0, atol=1e-6)


def test_context_fully_masked_row_is_finite_and_reads_no_text():
  _, perturbed, apply = _setup()
  _, _, context, mask = _inputs()
  empty = mask.at[0].set(False)
  out = np.asarray(apply(perturbed, context, empty))
  assert np.all(np.isfinite(out))
  # With no real token the row reads no text: any context gives the same output.
  np.testing.assert_allclose(np.asarray(apply(perturbed, context * -2.0, empty))[0], out[0],
                             rtol=0, atol=1e-6)


def test_context_fully_masked_row_has_finite_gradient():
  # One CrossAttnBlock alone: the U-Net's backward pass would take ~15 s to compile here.
  block = CrossAttnBlock(num_heads=2)
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.standard_normal((B, 4, 4, 16)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  mask = jnp.asarray([[False] * L, [True, True, False, False, False]])
  params = jax.jit(lambda k: block.init(k, h, context, mask)['params'])(
      jax.random.key(0, impl='unsafe_rbg'))
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
  loss = lambda p, c: jnp.sum(block.apply({'params': p}, h, c, mask) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, context)
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))
  # The all-masked example reads no text, so its context gets no gradient; the other one does.
  assert np.all(np.asarray(grads[1][0]) == 0) and np.any(np.asarray(grads[1][1]) != 0)

def test_context_errors():
  model = _model()
  x, t, context, mask = _inputs()
  params, _, _ = _setup()
  v = {'params': params}
  shape_of = lambda **kw: jax.eval_shape(lambda: model.apply(v, x, t, **kw))
  with pytest.raises(ValueError, match='needs context'):
    shape_of()
  with pytest.raises(ValueError, match='context_dim=8'):
    shape_of(context=jnp.zeros((B, L, D + 1)), context_mask=mask)
  with pytest.raises(ValueError, match='context_mask must have shape'):
    shape_of(context=context, context_mask=mask[:, :3])
  plain = UNet(ch=16, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               num_groups=8)
  with pytest.raises(ValueError, match='model.context_dim=0'):
    jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x, t, context=context))


def test_context_config_fields():
  import config_lib
  import models
  from tests.tiny import tiny_config

  config = tiny_config(**{'model.context_dim': D, 'model.context_len': L, 'data.dataset': 'shapes',
                          'data.num_channels': 3, 'data.num_classes': 0})
  config_lib.validate(config)
  inputs = models.dummy_inputs(config, batch_size=B)
  assert inputs['context'].shape == (B, L, D) and inputs['context_mask'].shape == (B, L)
  assert models.create_model(config).context_dim == D
  for field, value in (('model.context_dim', -1), ('model.context_len', 0)):
    with pytest.raises(config_lib.ConfigError, match=field):
      config_lib.validate(tiny_config(**{field: value}))


def test_context_through_text_guidance():
  """conditioning.Text's null (the empty prompt's states, padded) and classifier-free guidance
  reach the model as the keywords context / context_mask."""
  import conditioning
  _, perturbed, apply = _setup()
  model = _model()
  x, t, context, mask = _inputs()
  null_states = np.zeros((L, D), np.float32)
  null_mask = np.array([True] + [False] * (L - 1))  # '' is one token (BOS) plus padding
  conditioner = conditioning.Conditioner((conditioning.Text(null_states, null_mask),))
  assert conditioner.keys == ('context', 'context_mask')
  conds = {'context': context, 'context_mask': mask}
  null = conditioner.null(conds)
  assert null['context'].shape == (B, L, D) and null['context_mask'].shape == (B, L)

  # w = 3 runs the conditional and null passes as one batch of 2B.
  guided = jax.jit(lambda p: conditioning.guided_model_fn(
      lambda x_t, t_, **kw: model.apply({'params': p}, x_t, t_, **kw), conditioner, conds,
      3.0)(x, t))
  out = guided(perturbed)
  cond = apply(perturbed, context, mask)
  uncond = apply(perturbed, null['context'], null['context_mask'])
  np.testing.assert_allclose(np.asarray(out), np.asarray(uncond + 3.0 * (cond - uncond)),
                             rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(np.asarray(cond - uncond))) > 1e-3
