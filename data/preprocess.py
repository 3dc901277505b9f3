"""Per-image preprocessing: pure functions on uint8 numpy arrays.

Every function takes and returns a uint8 array of shape [H, W, C] (C = 1, 3 or 4)
unless it says otherwise, so that the whole chain can run on raw decoded images and
the float conversion happens once, per batch, at the end (`to_float`).

Crops (config.data.crop):
  'none'         the whole image (a non-square image is resized to a square, not cropped).
  'center'       the largest centered square.
  'celeba_ddim'  the DDIM paper's CelebA box: 128x128 pixels, rows 57..184 and columns
                 25..152 of the 218x178 aligned CelebA image (centre row 121, column 89).
                 ermongroup/ddim, datasets/__init__.py: cx = 89, cy = 121,
                 x1, x2 = cy - 64, cy + 64; y1, y2 = cx - 64, cx + 64;
                 Crop -> F.crop(img, top=x1, left=y1, height=128, width=128),
                 then transforms.Resize(64) (PIL bilinear, antialiased).
  'celeba_140'   NCSN / score_sde's CelebA crop: the central 140x140 square
                 (rows 39..178, columns 19..158 of 218x178), then resize.
Resizing uses PIL's bilinear filter, which is antialiased when shrinking (its kernel
widens with the scale factor), i.e. what torchvision's Resize does on PIL images in
the DDIM code.
"""

import numpy as np
from PIL import Image

CROPS = ('none', 'center', 'celeba_ddim', 'celeba_140')

# (top, left, size) of the DDIM CelebA box, for the 218x178 aligned images.
CELEBA_DDIM_BOX = (121 - 64, 89 - 64, 128)
CELEBA_140_SIZE = 140


def crop_box(crop, height, width):
  """The (top, left, box_height, box_width) that `crop` cuts from a height x width image.

  Args:
    crop: one of CROPS.
    height: image height in pixels.
    width: image width in pixels.

  Returns:
    A tuple of 4 ints; the box lies inside the image.

  Raises:
    ValueError: unknown crop, or an image too small for the box.
  """
  if crop == 'none':
    return 0, 0, height, width
  if crop == 'center':
    size = min(height, width)
    return (height - size) // 2, (width - size) // 2, size, size
  if crop == 'celeba_ddim':
    top, left, size = CELEBA_DDIM_BOX
    if height < top + size or width < left + size:
      raise ValueError(f"config.data.crop='celeba_ddim' expects 218x178 aligned CelebA images; "
                       f'got {height}x{width}, too small for the box rows {top}..{top + size - 1}, '
                       f'columns {left}..{left + size - 1}. Use crop="center" for other images.')
    return top, left, size, size
  if crop == 'celeba_140':
    size = CELEBA_140_SIZE
    if height < size or width < size:
      raise ValueError(f"config.data.crop='celeba_140' needs images of at least {size}x{size}; "
                       f'got {height}x{width}.')
    return (height - size) // 2, (width - size) // 2, size, size
  raise ValueError(f'unknown config.data.crop={crop!r}; accepted: {", ".join(CROPS)}')


def crop_image(image, crop):
  """Cuts `crop`'s box out of a [H, W, C] image (a view, no copy)."""
  top, left, h, w = crop_box(crop, image.shape[0], image.shape[1])
  return image[top:top + h, left:left + w]


def to_channels(image, num_channels):
  """Converts a uint8 [H, W, C] image to [H, W, num_channels].

  RGB -> gray uses ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), as PIL's 'L' mode;
  gray -> RGB repeats the channel; an alpha channel is dropped.

  Args:
    image: uint8 [H, W] or [H, W, C] with C in (1, 2, 3, 4) (2 = gray + alpha).
    num_channels: 1 or 3.

  Returns:
    uint8 [H, W, num_channels].
  """
  if image.ndim == 2:
    image = image[:, :, None]
  c = image.shape[-1]
  if c in (2, 4):  # gray+alpha or RGBA: the alpha channel carries no image content
    image = image[:, :, :c - 1]
    c -= 1
  if c == num_channels:
    return image
  if num_channels == 1:
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]
  if num_channels == 3:
    return np.repeat(image, 3, axis=-1)
  raise ValueError(f'config.data.num_channels must be 1 or 3, got {num_channels}')


def resize(image, size, resample=Image.BILINEAR):
  """Resizes a uint8 [H, W, C] image to [size, size, C] with PIL (antialiased when shrinking).

  Returns the input itself when it already has that size.
  """
  if image.shape[0] == size and image.shape[1] == size:
    return image
  if image.shape[-1] == 1:
    out = Image.fromarray(image[:, :, 0], mode='L').resize((size, size), resample)
    return np.asarray(out)[:, :, None]
  out = Image.fromarray(image, mode='RGB').resize((size, size), resample)
  return np.asarray(out)


def preprocess(image, *, crop, image_size, num_channels):
  """The deterministic part of the pipeline: crop, channel conversion, resize.

  Args:
    image: uint8 [H, W] or [H, W, C], as decoded.
    crop: one of CROPS.
    image_size: output height and width in pixels.
    num_channels: 1 or 3.

  Returns:
    uint8 [image_size, image_size, num_channels], C-contiguous.
  """
  if image.ndim == 2:
    image = image[:, :, None]
  image = crop_image(image, crop)
  image = to_channels(image, num_channels)
  return np.ascontiguousarray(resize(image, image_size))


def downsample(image, size):
  """Antialiased bicubic downsample of a uint8 [H, W, C] image to [size, size, C].

  The low-resolution conditioning input of super-resolution models (SR3, cascaded
  diffusion), made from the already preprocessed (and flipped) image.
  """
  return resize(image, size, resample=Image.BICUBIC)


def maybe_flip(image, rng):
  """Flips a [H, W, C] image left-right with probability 1/2, drawn from `rng`."""
  if rng.random() < 0.5:
    return np.ascontiguousarray(image[:, ::-1])
  return image


def to_float(images):
  """uint8 images in [0, 255] -> float32 in [-1, 1] (0 -> -1, 255 -> 1), any shape."""
  # Division by 127.5 maps 255 to exactly 1.0 (multiplying by 2/255 can overshoot by an ulp).
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images):
  """[-1, 1] float images -> uint8 [0, 255], rounding to the nearest level.

  floor(x * 127.5 + 128) as in EDM/StyleGAN's metrics (truncating (x + 1) * 127.5
  instead would shift every pixel by half a level on average).
  """
  x = np.floor(np.asarray(images, np.float32) * 127.5 + 128.0)
  return np.clip(x, 0, 255).astype(np.uint8)
