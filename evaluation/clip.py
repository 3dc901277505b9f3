"""CLIP score in JAX from a Hugging Face CLIPModel folder (e.g. openai/clip-vit-large-patch14).

  model, params = clip.load('/ckpt/clip-vit-large-patch14')
  tok = clip.tokenizer('/ckpt/clip-vit-large-patch14')
  img = clip.image_embeds(model, params, images_uint8)      # [B, P], unit norm
  txt = clip.text_embeds(model, params, clip.tokenize(tok, captions))
  score = clip.clip_score(img, txt)                           # torchmetrics' CLIPScore

The towers are models/clip.py's (shared with the CLIP text encoder used for conditioning).

Preprocessing (`preprocess`) follows CLIPImageProcessor / OpenAI's transform: resize so the
shortest side is image_size (long side int(image_size * long / short)), bicubic; center crop
(top = (h - S) // 2); x / 255; normalize with CLIP's mean and std. The resize is
`jax.image.resize(..., 'bicubic', antialias=True)` (Keys cubic a = -0.5, kernel widened by the
scale factor when downsampling, weights renormalized at the borders: the same filter as PIL's
BICUBIC), run as PIL runs it: the width first, rounded (half up) and clipped to uint8 levels,
then the height, rounded and clipped again (bicubic overshoots [0, 255], and the clipping between
passes matters). Measured against CLIPImageProcessor (PIL backend) on random noise images of
40x48, 24x20 (upsampled), 257x300 and 97x31 (evaluation/check_text_encoders.py, two seeds):
pixel-identical except <= 0.1% of the values of some images, one level apart (PIL's fixed-point
coefficients), which moved those embeddings by <= 1.3e-4 relative (tolerance 1e-3); images
already at image_size are not resampled and match to 1e-6.
The networks match transformers to < 1e-6 relative.
"""

import functools
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from models import clip as clip_modules
from models import hf_port

# OpenAI CLIP's normalization (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), RGB
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def load(path: str) -> Tuple[clip_modules.CLIP, Any]:
  """(module, params) from a CLIPModel folder (config.json + model.safetensors).

  Raises:
    FileNotFoundError / KeyError / ValueError: missing files, a missing weight or a mismatched
      shape (naming the first such key), or a text-only folder.
  """
  model, params = clip_modules.load_clip(path)
  return model, jax.device_put(params)


def tokenizer(path: str):
  """The folder's CLIP tokenizer, truncating and padding to 77 (see models.clip)."""
  return clip_modules.load_tokenizer(path)


def tokenize(tok, prompts: Sequence[str]) -> np.ndarray:
  """input_ids int32 [B, 77] (truncated at 77, end-of-text token kept last)."""
  return hf_port.encode_batch(tok, prompts)[0]


def resized_shape(height: int, width: int, size: int) -> Tuple[int, int]:
  """(h, w) with the shorter side = size, the longer int(size * long / short), as transformers."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def _to_uint8_levels(x):
  # PIL rounds half up (fixed point: (sum + 2^21) >> 22), hence floor(x + 0.5), not round-even.
  return jnp.clip(jnp.floor(x + 0.5), 0, 255)


@functools.partial(jax.jit, static_argnums=1)
def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """uint8 [B, H, W, 3] -> CLIP input float32 [B, image_size, image_size, 3] (see module doc)."""
  b, h, w, c = images.shape
  nh, nw = resized_shape(h, w, image_size)
  x = jnp.asarray(images, jnp.float32)
  # PIL resamples the width, stores uint8, then the height, and stores uint8 again: the same
  # two passes here, each rounded and clipped (bicubic overshoots [0, 255] at sharp edges, and
  # clipping between the passes changes the second pass's input).
  if nw != w:
    x = _to_uint8_levels(jax.image.resize(x, (b, h, nw, c), 'bicubic', antialias=True))
  if nh != h:
    x = _to_uint8_levels(jax.image.resize(x, (b, nh, nw, c), 'bicubic', antialias=True))
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size] / 255.0
  return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=0)
def _image_embeds(model, params, pixels):
  return _unit(model.apply({'params': params}, pixels, method=model.image_features))


@functools.partial(jax.jit, static_argnums=0)
def _text_embeds(model, params, input_ids):
  return _unit(model.apply({'params': params}, input_ids, method=model.text_features))


def image_embeds(model: clip_modules.CLIP, params: Any, images: np.ndarray) -> jax.Array:
  """uint8 NHWC RGB images [B, H, W, 3] -> L2-normalized image_embeds float32 [B, P]."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'expected uint8 [B, H, W, 3] images, got {images.dtype} {images.shape}')
  return _image_embeds(model, params, preprocess(images, model.vision.image_size))


def pixel_embeds(model: clip_modules.CLIP, params: Any, pixels: jax.Array) -> jax.Array:
  """Already preprocessed float32 [B, S, S, 3] -> L2-normalized image_embeds [B, P]."""
  return _image_embeds(model, params, jnp.asarray(pixels, jnp.float32))


def text_embeds(model: clip_modules.CLIP, params: Any, input_ids: np.ndarray) -> jax.Array:
  """Token ids int [B, L] (L <= 77) -> L2-normalized text_embeds float32 [B, P]."""
  return _text_embeds(model, params, jnp.asarray(np.asarray(input_ids, np.int32)))


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> float:
  """torchmetrics' CLIPScore of matched pairs: 100 * max(mean_i cos(img_i, txt_i), 0).

  Args:
    image_embeds, text_embeds: [N, P], row i of each a pair (normalized here again, so raw
      projections work too).
  """
  cos = jnp.sum(_unit(jnp.asarray(image_embeds)) * _unit(jnp.asarray(text_embeds)), axis=-1)
  return float(jnp.maximum(100.0 * jnp.mean(cos), 0.0))
