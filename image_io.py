"""Image files in and out: sample grids a person can look at, and the input images and masks
that img2img, inpainting and super-resolution read.

Pure numpy + PIL; images are uint8 [N, H, W, C] (C = 1 or 3) unless a function says otherwise.
"""

import math
import os

import numpy as np
from PIL import Image

from config_lib import ConfigError
from data import preprocess


def make_grid(images, ncol=None, pad=2, min_tile=64):
  """uint8 [N, H, W, C] -> one uint8 [rows*(H'+pad)+pad, cols*(W'+pad)+pad, C] grid image.

  Tiles smaller than `min_tile` pixels are enlarged (nearest) so that a person can see them.
  """
  images = np.asarray(images)
  n, h, w, c = images.shape
  scale = max(1, math.ceil(min_tile / max(h, w)))
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  ncol = ncol or math.ceil(math.sqrt(n))
  nrow = math.ceil(n / ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = (
        images[i])
  return grid


def make_comparison(columns, ncol=None, gap=12, min_tile=64):
  """Grids of several image sets side by side, e.g. [inputs, masks, outputs].

  Args:
    columns: uint8 arrays [N, H_k, W_k, C_k] with the same N; sizes may differ (each set is
      enlarged to tiles of about `min_tile` pixels) and C_k in (1, 3) (grey is repeated to RGB
      when the sets mix).
    ncol: tiles per grid row (default: about sqrt(N)).
    gap: grey pixels between the grids.
    min_tile: see make_grid.

  Returns:
    uint8 [H, W, C] image, image k of every set at the same place in its grid.
  """
  grids = [make_grid(c, ncol=ncol, min_tile=min_tile) for c in columns]
  channels = max(g.shape[-1] for g in grids)
  height = max(g.shape[0] for g in grids)
  parts = []
  for i, g in enumerate(grids):
    g = np.repeat(g, channels // g.shape[-1], axis=-1)
    g = np.pad(g, ((0, height - g.shape[0]), (0, 0), (0, 0)), constant_values=255)
    parts.append(g)
    if i < len(grids) - 1:
      parts.append(np.full((height, gap, channels), 128, np.uint8))
  return np.concatenate(parts, axis=1)


def _wrap(text, width_chars, max_lines):
  """Greedy word wrap to lines of <= width_chars, at most max_lines (the last one cut with ..)."""
  lines, line = [], ''
  for word in text.split():
    candidate = f'{line} {word}'.strip()
    if len(candidate) <= width_chars or not line:
      line = candidate
    else:
      lines.append(line)
      line = word
  lines.append(line)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1][:max(0, width_chars - 2)] + '..'
  return [l[:width_chars] for l in lines]


def make_captioned_grid(images, captions, ncol=None, pad=4, min_tile=96, lines=3):
  """Each image with its caption (prompt) printed under it: uint8 [H, W, 3].

  Args:
    images: uint8 [N, H, W, C], C = 1 or 3.
    captions: N strings (wrapped to the tile's width, at most `lines` lines).
  """
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if len(captions) != len(images):
    raise ValueError(f'{len(captions)} captions for {len(images)} images')
  n, h, w, c = images.shape
  scale = max(1, math.ceil(min_tile / max(h, w)))
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  h, w = h * scale, w * scale
  ncol = ncol or math.ceil(math.sqrt(n))
  nrow = math.ceil(n / ncol)
  line_h, char_w = 11, 6  # PIL's built-in bitmap font
  text_h = lines * line_h + 2
  cell_w, cell_h = w + pad, h + text_h + pad
  canvas = Image.new('RGB', (ncol * cell_w + pad, nrow * cell_h + pad), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, q = divmod(i, ncol)
    x0, y0 = pad + q * cell_w, pad + r * cell_h
    canvas.paste(Image.fromarray(images[i]), (x0, y0))
    for k, line in enumerate(_wrap(str(captions[i]), max(4, w // char_w), lines)):
      draw.text((x0, y0 + h + 1 + k * line_h), line, fill=(0, 0, 0))
  return np.asarray(canvas)


def save_png(path, image):
  """Writes uint8 [H, W, C] (C = 1 or 3) as a PNG, creating the folder; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
  return path


def write_grid(path, images, **kwargs):
  return save_png(path, make_grid(images, **kwargs))


def write_comparison(path, columns, **kwargs):
  return save_png(path, make_comparison(columns, **kwargs))


def write_captioned_grid(path, images, captions, **kwargs):
  return save_png(path, make_captioned_grid(images, captions, **kwargs))


# ----------------------------------------------------------------------------- input images


def _read_arrays(path, field):
  """uint8 images [H, W, C] (C in 1..4) from an image file or an .npz/.npy of images."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'config.sampling.{field}: no file {path!r} (give a PNG/JPEG image or '
                            'an .npz of uint8 images [N, H, W, C])')
  if path.endswith(('.npz', '.npy')):
    loaded = np.load(path)
    if isinstance(loaded, np.ndarray):
      arr = loaded
    else:
      keys = list(loaded.keys())
      if not keys:
        raise ConfigError(f'config.sampling.{field}: {path} holds no array')
      preferred = ('mask', 'masks') if field == 'mask' else ('images', 'image')
      key = next((k for k in preferred if k in keys), keys[0])
      arr = loaded[key]
    if arr.ndim == 2:
      arr = arr[None, :, :, None]
    elif arr.ndim == 3:  # [H, W, C] for a small last axis, else [N, H, W]
      arr = arr[None] if arr.shape[-1] <= 4 else arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] > 4:
      raise ConfigError(f'config.sampling.{field}: {path} has shape {arr.shape}; '
                                   'expected images [N, H, W, C] with C in 1..4')
    if arr.dtype == np.bool_:
      arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
      lo, hi = float(arr.min()), float(arr.max())
      # Floats in [-1, 1] are the model's range; masks may come as {0, 1}.
      arr = (preprocess.to_uint8(arr) if lo < 0 else
             np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8) if hi <= 1.0 else
             np.clip(np.round(arr), 0, 255).astype(np.uint8))
    elif arr.dtype != np.uint8:
      if arr.min() < 0 or arr.max() > 255:
        raise ConfigError(f'config.sampling.{field}: {path} holds {arr.dtype} values '
                                     'outside [0, 255]')
      arr = arr.astype(np.uint8)
    return list(arr)
  try:
    with Image.open(path) as im:
      if im.mode not in ('L', 'LA', 'RGB', 'RGBA'):
        im = im.convert('RGBA' if 'A' in im.getbands() else 'RGB')
      arr = np.asarray(im)
  except OSError as e:
    raise ConfigError(f'config.sampling.{field}: {path} is not a readable image '
                                 f'({e})') from e
  return [arr if arr.ndim == 3 else arr[:, :, None]]


def _fit(image, size, num_channels, resample):
  """Center square crop (non-square inputs only), channel conversion and resize to `size`."""
  crop = 'none' if image.shape[0] == image.shape[1] else 'center'
  image = preprocess.to_channels(preprocess.crop_image(image, crop), num_channels)
  return np.ascontiguousarray(preprocess.resize(image, size, resample=resample))


def load_images(path, size, num_channels, field='init_image'):
  """Reads input images, resized (bilinear, as the data pipeline) to the model's resolution.

  Args:
    path: a PNG/JPEG file (one image) or an .npz/.npy of images: uint8 [N, H, W, C] (or [N, H, W],
      [H, W, C], [H, W]), or floats in [-1, 1]. Non-square images are center-cropped first.
    size: output height and width in pixels.
    num_channels: 1 or 3 (RGB <-> grey converted as the data pipeline does).
    field: the config field named in error messages.

  Returns:
    uint8 [N, size, size, num_channels].

  Raises:
    FileNotFoundError: no such file.
    ConfigError: an unreadable file or an array of an unusable shape.
  """
  return np.stack([_fit(a, size, num_channels, Image.BILINEAR)
                   for a in _read_arrays(path, field)])


def load_mask(path, size):
  """Reads inpainting masks: float32 [M, size, size, 1], 1 = known (kept), 0 = generated.

  A pixel is known where the (grey-converted) mask is >= 128, i.e. white; masks are resized with
  nearest-neighbour sampling so that they stay binary.
  """
  masks = [_fit(a, size, 1, Image.NEAREST) for a in _read_arrays(path, 'mask')]
  return (np.stack(masks) >= 128).astype(np.float32)
