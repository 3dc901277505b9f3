"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") in Flax Linen.

Layout (NHWC in and out; names follow the released checkpoints, facebookresearch/DiT):

  x [B, S, S, C] -> x_embedder: conv p x p, stride p (hidden) -> tokens [B, N, hidden],
                    N = (S / p)^2 in row-major patch order
                 -> + fixed 2-D sin-cos position table (`pos_embed_table`, a constant, no param)
  t [B]          -> t_embedder: sinusoidal (256, cos before sin, f_i = 10000^(-i / 128))
                    -> Dense(hidden) -> SiLU -> Dense(hidden)
  y [B]          -> y_embedder: table of num_classes + 1 rows (row num_classes = the null label)
  c = t_emb + y_emb
  depth x DiTBlock (adaLN-Zero): SiLU(c) -> Dense(6 hidden) = shift/scale/gate for attention and
    MLP; x += gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa)), likewise with the MLP
    (tanh-GELU, mlp_ratio * hidden wide); LN has no affine, eps 1e-6; modulate(h) =
    h * (1 + scale) + shift
  final_layer: SiLU(c) -> Dense(2 hidden) = shift/scale; modulate(LN(x)) -> Dense(p p out) ->
    unpatchify -> [B, S, S, out], out = 2C with learn_sigma, else C

Initialisation as the paper: xavier-uniform Linear kernels (the patch conv as a Linear on its
flattened p p C inputs), zero biases, normal(0.02) for the label table and the timestep MLP, and
zeros for every adaLN modulation and for the final linear layer, so that every block starts as the
identity and a fresh DiT outputs exactly zero.

Learned sigma (`learn_sigma`, the released models): the output has 2C channels. out[..., :C] is
the prediction (eps for the released models); out[..., C:] is v in [-1, 1] of IDDPM's
LEARNED_RANGE variance, log Sigma_t = (v + 1) / 2 * log beta_t + (1 - v) / 2 * log beta~_t
(beta~_t the posterior variance, clipped at t = 0). The reference trains it with
loss = MSE(eps) + L_vlb, the VLB term computed with the mean's input stop-gradiented (only v gets
its gradient; no rescaling, `loss_type` MSE). A trainer without variance learning uses
out[..., :C] only (then v is untrained and must be ignored); fixed-variance samplers (DDIM,
DPM-Solver, DDPM with beta_t) ignore it too.

Classifier-free guidance. The reference's `DiT.forward_with_cfg` runs the batch [x, x] with labels
[y, null], then guides only channels 0..2 of the output: eps_g = eps_u + s (eps_c - eps_u) on
those three channels, while channel 3 of eps and all variance channels keep each half's own
(conditional / unconditional) values; sample.py keeps the first (conditional) half. The comment
there calls this a reproducibility choice and notes the standard form guides all eps channels.
This codebase guides all C eps channels (sample_lib.guided_model_fn, same scale convention: w = 1
plain conditional); with learn_sigma the sampler should guide out[..., :C] and take the variance
half from the conditional pass. Samples therefore differ slightly from the reference's at the same
scale (the 4th latent channel is guided here).

Mixed precision: `dtype` is the compute dtype of every dense layer and of the residual stream;
params are float32; LayerNorm statistics and the attention softmax are float32; output float32.
"""

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import layers
from models.layers import null_label, timestep_embedding


# Model sizes of the paper (Table 1): name -> (hidden_size, depth, num_heads).
SIZES = {
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'XL': (1152, 28, 16),
}
PATCH_SIZES = (2, 4, 8)

FREQUENCY_SIZE = 256  # width of the sinusoidal timestep features
LAYER_NORM_EPS = 1e-6


def dit_config(size: str = 'XL', patch: int = 2) -> ml_collections.ConfigDict:
  """The `config.dit` group of DiT-{size}/{patch}.

  Fields: patch_size (pixels of the input per token side), hidden_size, depth (blocks), num_heads,
  mlp_ratio (MLP width / hidden_size), learn_sigma (output 2C channels, see the module docstring).
  Class-label dropout is the trainer's (config.training.cond_dropout; DiT used 0.1); the class
  count is config.model.num_classes.
  """
  if size not in SIZES:
    raise ValueError(f'Unknown DiT size {size!r}; known sizes: {sorted(SIZES)}.')
  if patch not in PATCH_SIZES:
    raise ValueError(f'DiT patch size {patch} is not one of the paper\'s {PATCH_SIZES}.')
  hidden, depth, heads = SIZES[size]
  return ml_collections.ConfigDict(dict(patch_size=patch, hidden_size=hidden, depth=depth,
                                        num_heads=heads, mlp_ratio=4.0, learn_sigma=True))


# ------------------------------------------------------------------------------ embeddings

def pos_embed_table(hidden_size: int, grid_h: int, grid_w: Optional[int] = None) -> np.ndarray:
  """DiT's fixed 2-D sin-cos position table (MAE's get_2d_sincos_pos_embed), float32.

  Token n = i * grid_w + j is the patch in row i, column j. With D = hidden_size, q = D / 4 and
  omega_k = 10000 ** (-k / q) (k < q), its row is
    [sin(j omega), cos(j omega), sin(i omega), cos(i omega)]   (each block q wide).
  The first half encodes the column: the reference builds its grid with np.meshgrid(w, h), whose
  first output (the one its code calls `emb_h`) varies along w. Computed in float64, as the
  reference does, then rounded to float32.

  Args:
    hidden_size: D, a multiple of 4.
    grid_h: patch rows (S / p).
    grid_w: patch columns (default grid_h).

  Returns:
    float32 [grid_h * grid_w, hidden_size].
  """
  grid_w = grid_h if grid_w is None else grid_w
  if hidden_size % 4:
    raise ValueError(f'dit.hidden_size={hidden_size} must be a multiple of 4 (the 2-D sin-cos '
                     'position table splits it into four blocks).')
  quarter = hidden_size // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing='ij')

  def sincos(pos):
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([sincos(cols), sincos(rows)], axis=1).astype(np.float32)


def _layer_norm(name: str) -> nn.LayerNorm:
  """LayerNorm without scale or bias, eps 1e-6, two-pass variance (torch's) in float32."""
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_bias=False, use_scale=False,
                      use_fast_variance=False, name=name)


def _modulate(h: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """h [B, N, D] * (1 + scale) + shift, with shift/scale [B, 1, D]."""
  return h * (1 + scale) + shift


_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_normal002 = nn.initializers.normal(0.02)
# The patch conv's kernel [p, p, C, hidden] initialised as the Linear [p p C -> hidden] it is:
# fan_in = p p C, fan_out = hidden (a conv initialiser would multiply fan_out by p p too).
_patch_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2),
                                               out_axis=-1)


class TimestepEmbedder(nn.Module):
  """t [B] -> sinusoidal [B, 256] (cos first, freq shift 0) -> Dense -> SiLU -> Dense [B, D]."""
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    freqs = timestep_embedding(t, FREQUENCY_SIZE, flip_sin_to_cos=True, freq_shift=0.0)
    h = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_normal002, name='mlp_0')(freqs)
    return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_normal002,
                    name='mlp_2')(nn.silu(h))


class Attention(nn.Module):
  """Multi-head self-attention with a fused, biased q/k/v projection (timm's Attention).

  The qkv kernel [D, 3D] has output columns ordered (q|k|v, head, head_dim), as the reference's
  [3D, D] weight rows, so a checkpoint loads with one transpose. Logits scaled by head_dim^-0.5.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, N, D]. Returns [B, N, D]."""
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_xavier, name='qkv')(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return nn.Dense(d, dtype=self.dtype, kernel_init=_xavier, name='proj')(h.reshape(b, n, d))


class Mlp(nn.Module):
  """Dense(hidden) -> tanh-approximate GELU -> Dense(D) (timm's Mlp with GELU(approximate='tanh'))."""
  hidden_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, N, D]. Returns [B, N, D]."""
    h = nn.Dense(self.hidden_features, dtype=self.dtype, kernel_init=_xavier, name='fc1')(x)
    h = nn.gelu(h, approximate=True)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_xavier, name='fc2')(h)


class DiTBlock(nn.Module):
  """A transformer block with adaLN-Zero conditioning.

  Attributes:
    num_heads: attention heads (must divide D).
    mlp_ratio: MLP width / D.
    dtype: compute dtype.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Args: x [B, N, D] tokens; c [B, D] condition. Returns [B, N, D]."""
    d = x.shape[-1]
    # Zero-initialised: all gates start at 0, so the block starts as the identity.
    mod = nn.Dense(6 * d, dtype=self.dtype, kernel_init=_zeros,
                   name='adaLN_modulation')(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
        mod[:, None, :], 6, axis=-1)
    h = _modulate(_layer_norm('norm1')(x), shift_msa, scale_msa)
    x = x + gate_msa * Attention(self.num_heads, self.dtype, name='attn')(h)
    h = _modulate(_layer_norm('norm2')(x), shift_mlp, scale_mlp)
    return x + gate_mlp * Mlp(int(d * self.mlp_ratio), self.dtype, name='mlp')(h)


class FinalLayer(nn.Module):
  """adaLN (shift, scale) + LayerNorm + Dense to p p out_channels per token, all zero-initialised."""
  patch_size: int
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Args: x [B, N, D]; c [B, D]. Returns [B, N, p * p * out_channels]."""
    d = x.shape[-1]
    mod = nn.Dense(2 * d, dtype=self.dtype, kernel_init=_zeros,
                   name='adaLN_modulation')(nn.silu(c))
    shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
    h = _modulate(_layer_norm('norm_final')(x), shift, scale)
    return nn.Dense(self.patch_size ** 2 * self.out_channels, dtype=self.dtype,
                    kernel_init=_zeros, name='linear')(h)


# ------------------------------------------------------------------------------ the model

class DiT(nn.Module):
  """Diffusion Transformer; called like the U-Net: model.apply(v, x, t, y=labels, train=False).

  Attributes:
    in_channels: C, channels of x (4 for SD-VAE latents).
    patch_size: p; the image size must be divisible by it.
    hidden_size: token width D (a multiple of 4 and of num_heads).
    depth: number of DiT blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / D.
    learn_sigma: output 2C channels (prediction, then the variance interpolation v; see the module
      docstring) instead of C.
    num_classes: > 0: class-conditional with a (num_classes + 1)-row label table whose row
      num_classes is the null label (`models.layers.null_label`); 0: unconditional (c = t_emb).
    dtype: compute dtype, 'float32' or 'bfloat16'.
    remat: rematerialise each block in the backward pass (activation memory of one block instead
      of depth blocks, ~1 more forward of compute).
  """
  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  learn_sigma: bool = True
  num_classes: int = 1000
  dtype: Any = 'float32'
  remat: bool = False

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def _compute_dtype(self):
    return layers.compute_dtype(self.dtype, 'model.dtype')

  def _validate(self, x, t, y, cond):
    """Raises ValueError, naming the config field to change, for inputs this model cannot take."""
    if x.ndim != 4:
      raise ValueError(f'x must be NHWC [B, H, W, C]; got shape {x.shape}.')
    b, height, width, c = x.shape
    if c != self.in_channels:
      raise ValueError(f'x has {c} channels but the DiT was built for {self.in_channels} '
                       '(config.data.num_channels).')
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f'image size {height}x{width} is not divisible by dit.patch_size='
                       f'{self.patch_size}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'dit.num_heads={self.num_heads} must divide dit.hidden_size='
                       f'{self.hidden_size}.')
    if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != b):
      raise ValueError(f't must have shape [B]=[{b}] (or be a scalar); got {jnp.shape(t)}.')
    if self.num_classes > 0:
      if y is None:
        raise ValueError(f'model.num_classes={self.num_classes}: the DiT is class-conditional and '
                         f'needs y (int [B]; y={null_label(self.num_classes)} is the null label).')
      if jnp.shape(y) != (b,):
        raise ValueError(f'y must have shape [B]=[{b}]; got {jnp.shape(y)}.')
    elif y is not None:
      raise ValueError('y was given but model.num_classes=0 (unconditional); set '
                       'model.num_classes or drop y.')
    if cond is not None:
      raise ValueError('DiT takes no image condition (cond); set model.cond_channels=0.')

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False, *,
               y: Optional[jax.Array] = None, cond: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the diffusion target (and with learn_sigma the variance interpolation).

    Args:
      x: float [B, H, W, C] noisy inputs (images or latents).
      t: int [B] diffusion steps (a scalar is broadcast to [B]).
      train: unused (DiT has no dropout; label dropout is the trainer's); kept for the common
        model signature.
      y: int32 [B] class labels in [0, num_classes] (num_classes = null label).
      cond: must be None (kept for the common signature).

    Returns:
      float32 [B, H, W, out_channels].
    """
    del train
    dtype = self._compute_dtype()
    self._validate(x, t, y, cond)
    b, height, width, _ = x.shape
    p = self.patch_size
    gh, gw = height // p, width // p
    t = jnp.broadcast_to(jnp.asarray(t), (b,))

    h = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=dtype,
                kernel_init=_patch_init, name='x_embedder')(x.astype(dtype))
    # A trace-time constant: the table is fixed (the reference stores it as a frozen parameter).
    pos = jnp.asarray(pos_embed_table(self.hidden_size, gh, gw), dtype)
    h = h.reshape(b, gh * gw, self.hidden_size) + pos[None]

    c = TimestepEmbedder(self.hidden_size, dtype, name='t_embedder')(t)
    if self.num_classes > 0:
      table = nn.Embed(null_label(self.num_classes) + 1, self.hidden_size, dtype=dtype,
                       embedding_init=_normal002, name='y_embedder')
      c = c + table(y)

    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(self.depth):
      h = block_cls(self.num_heads, self.mlp_ratio, dtype, name=f'blocks_{i}')(h, c)
    h = FinalLayer(p, self.out_channels, dtype, name='final_layer')(h, c)

    # unpatchify: token (i, j) holds its patch as (p_row, p_col, channel).
    h = h.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, self.out_channels).astype(jnp.float32)


def build(config, in_channels: Optional[int] = None) -> DiT:
  """Builds the DiT of config.dit (see `dit_config`), config.model and config.data.

  Reads config.dit.{patch_size, hidden_size, depth, num_heads, mlp_ratio, learn_sigma},
  config.model.{num_classes, dtype, remat}; in_channels defaults to config.data.num_channels
  (models.create_model passes the latent channels of a latent diffusion config).
  """
  if 'dit' not in config:
    raise ValueError("config.model.name='dit' needs a config.dit group; set "
                     "config.dit = models.dit.dit_config('XL', 2) (or configs/dit_xl2.py).")
  d = config.dit
  in_channels = config.data.num_channels if in_channels is None else in_channels
  return DiT(in_channels=in_channels, patch_size=d.patch_size,
             hidden_size=d.hidden_size, depth=d.depth, num_heads=d.num_heads,
             mlp_ratio=d.mlp_ratio, learn_sigma=d.learn_sigma,
             num_classes=config.model.num_classes, dtype=config.model.get('dtype', 'float32'),
             remat=config.model.get('remat', False))


def param_shapes(config) -> Dict[str, Any]:
  """The params pytree of `build(config)` as ShapeDtypeStructs (traced, nothing computed)."""
  model = build(config)
  size, channels = config.data.image_size, config.data.num_channels
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  kwargs = {'y': jax.ShapeDtypeStruct((1,), jnp.int32)} if config.model.num_classes > 0 else {}
  return jax.eval_shape(
      lambda x, t, kw: model.init(jax.random.key(0), x, t, **kw)['params'], x, t, kwargs)


# ------------------------------------------------------------------------------ checkpoints

# How a torch parameter becomes a Flax one: 'linear' weight [out, in] -> kernel [in, out];
# 'conv' weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; 'embed' weight -> embedding as is.
_KINDS = {'linear': ('kernel', lambda w: w.T),
          'conv': ('kernel', lambda w: w.transpose(2, 3, 1, 0)),
          'embed': ('embedding', lambda w: w)}


def reference_layout(depth: int, num_classes: int) -> List[Tuple[str, Tuple[str, ...], str]]:
  """The explicit torch-module -> Flax-module table of facebookresearch/DiT's state dict.

  Returns:
    [(torch module name, Flax module path, kind)], in the reference's order; each module has
    `.weight` (and for 'linear'/'conv' `.bias`). pos_embed (the fixed table) is not listed.
  """
  table = [('x_embedder.proj', ('x_embedder',), 'conv'),
           ('t_embedder.mlp.0', ('t_embedder', 'mlp_0'), 'linear'),
           ('t_embedder.mlp.2', ('t_embedder', 'mlp_2'), 'linear')]
  if num_classes > 0:
    table.append(('y_embedder.embedding_table', ('y_embedder',), 'embed'))
  for i in range(depth):
    block = f'blocks_{i}'
    table += [(f'blocks.{i}.attn.qkv', (block, 'attn', 'qkv'), 'linear'),
              (f'blocks.{i}.attn.proj', (block, 'attn', 'proj'), 'linear'),
              (f'blocks.{i}.mlp.fc1', (block, 'mlp', 'fc1'), 'linear'),
              (f'blocks.{i}.mlp.fc2', (block, 'mlp', 'fc2'), 'linear'),
              (f'blocks.{i}.adaLN_modulation.1', (block, 'adaLN_modulation'), 'linear')]
  table += [('final_layer.linear', ('final_layer', 'linear'), 'linear'),
            ('final_layer.adaLN_modulation.1', ('final_layer', 'adaLN_modulation'), 'linear')]
  return table


def _read_state_dict(source) -> Dict[str, np.ndarray]:
  """name -> array from a mapping, a torch .pt/.pth/.bin, a .npz or a .safetensors file."""
  if isinstance(source, Mapping):
    state = dict(source)
  else:
    path = str(source)
    if path.endswith('.npz'):
      with np.load(path) as f:
        state = {k: f[k] for k in f.files}
    elif path.endswith('.safetensors'):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      state = load_file(path)
    else:
      from models import torch_pickle  # pylint: disable=g-import-not-at-top
      state = torch_pickle.load(path)
  # A train.py checkpoint is {'model', 'ema', 'opt', 'args'}; like the reference's find_model, use
  # the EMA weights.
  for key in ('ema', 'model', 'state_dict'):
    if isinstance(state.get(key), Mapping):
      state = dict(state[key])
      break
  return {k: np.asarray(v) for k, v in state.items()}


def load_dit_checkpoint(path_or_state_dict: Union[str, Mapping[str, Any]], config, *,
                        pos_embed_tol: float = 1e-5) -> Dict[str, Any]:
  """Converts a facebookresearch/DiT state dict to the params of `build(config)`.

  Accepts the released `DiT-XL-2-256x256.pt` (a torch.save'd state dict, read without torch by
  `models.torch_pickle`), a train.py checkpoint (its 'ema' weights are used), a .npz or
  .safetensors export with the same key names, or a dict of arrays. The key names are the
  reference's (x_embedder.proj.weight, blocks.N.attn.qkv.weight, ...; `reference_layout`).

  Args:
    path_or_state_dict: a file path or a mapping name -> array.
    config: the experiment config whose DiT the weights are for (config.dit, config.model,
      config.data.image_size / num_channels).
    pos_embed_tol: largest |stored pos_embed - pos_embed_table| accepted.

  Returns:
    float32 params pytree ({'x_embedder': {'kernel', 'bias'}, ...}) for model.apply.

  Raises:
    ValueError: naming the first missing, unexpected or wrongly shaped key, or a stored pos_embed
      that differs from the fixed table by more than pos_embed_tol.
  """
  state = _read_state_dict(path_or_state_dict)
  d = config.dit
  shapes = param_shapes(config)
  layout = reference_layout(d.depth, config.model.num_classes)

  expected = []  # (torch key, flax path, convert)
  for module, path, kind in layout:
    leaf, convert = _KINDS[kind]
    expected.append((f'{module}.weight', path + (leaf,), convert))
    if kind != 'embed':
      expected.append((f'{module}.bias', path + ('bias',), lambda b: b))
  for key, _, _ in expected:
    if key not in state:
      raise ValueError(f'DiT checkpoint: missing key {key!r} (config.dit.depth={d.depth}, '
                       f'model.num_classes={config.model.num_classes}); {len(state)} keys stored.')
  known = {key for key, _, _ in expected} | {'pos_embed'}
  extra = [k for k in state if k not in known]
  if extra:
    raise ValueError(f'DiT checkpoint: unexpected key {extra[0]!r} ({len(extra)} unexpected in '
                     'all); does config.dit.depth match the checkpoint?')

  params: Dict[str, Any] = {}
  for key, path, convert in expected:
    value = convert(np.asarray(state[key], np.float32))
    want = shapes
    for name in path:
      want = want[name]
    if value.shape != tuple(want.shape):
      raise ValueError(f'DiT checkpoint: {key!r} has shape {state[key].shape}, which converts to '
                       f'{value.shape} but {"/".join(path)} of the configured model is '
                       f'{tuple(want.shape)}; check config.dit, model.num_classes (the label table '
                       'has num_classes + 1 rows) and data.num_channels.')
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value)

  if 'pos_embed' in state:
    stored = np.asarray(state['pos_embed'], np.float64).reshape(-1, d.hidden_size)
    grid = config.data.image_size // d.patch_size
    if stored.shape[0] != grid * grid:
      raise ValueError(f'DiT checkpoint: pos_embed has {stored.shape[0]} tokens but '
                       f'data.image_size={config.data.image_size} / patch {d.patch_size} gives '
                       f'{grid * grid}; set data.image_size to the latent size it was trained at.')
    diff = float(np.abs(stored - pos_embed_table(d.hidden_size, grid)).max())
    logging.info('DiT checkpoint: max |stored pos_embed - fixed table| = %.3g', diff)
    if diff > pos_embed_tol:
      raise ValueError(f'DiT checkpoint: stored pos_embed differs from the fixed sin-cos table by '
                       f'{diff:.3g} (> {pos_embed_tol:g}); this is not a standard DiT.')
  return jax.tree_util.tree_map(jnp.asarray, params)


def pos_embed_max_difference(path_or_state_dict, hidden_size: int) -> float:
  """max |stored pos_embed - pos_embed_table| of a checkpoint (square grid), for reports."""
  state = _read_state_dict(path_or_state_dict)
  stored = np.asarray(state['pos_embed'], np.float64).reshape(-1, hidden_size)
  grid = int(round(np.sqrt(stored.shape[0])))
  return float(np.abs(stored - pos_embed_table(hidden_size, grid)).max())

