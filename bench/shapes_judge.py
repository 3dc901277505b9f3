"""A judge of prompt following on the captioned shapes (data/shapes.py), trained here.

Two small classifiers, fitted on images drawn by the generator with its per-pixel
ground truth (fit_judge), then a fixed reading of their output:
  1. pixels: an MLP on RGB / 255 labels every pixel background or one of the COLORS
     (trained on clean, noisy and blurred copies, so that imperfect samples still read), read
     through a table of its answers on 4-unit RGB bins (fast on millions of pixels);
  2. objects: the connected regions of each color (8-connected, at least
     MIN_AREA * (S / 32)^2 pixels) are the detected objects; their center is the
     center of their bounding box;
  3. shapes: a logistic regression on the region's mask cropped to its box and
     resized to 10x10, plus fill ratio and aspect, names circle / square / triangle.
A prompt is then checked against the detected objects (score): 'color', 'shape', 'object'
(distinct detected objects carry the asked colors / shapes / both), 'position' (the
objects the prompt names are where it asks: the center in the named half, or the
relation along its dominant axis, as data/shapes.py defines it), 'all' (object and,
if asked, position) and 'count' (exactly as many objects as named).

  python -m bench.shapes_judge                  # held-out accuracy and chance level
  python -m bench.shapes_judge --workdir runs/shapes_text --scales 1,3   # a trained text run

Measured (2 CPU cores, 2026-12-03; fit 7-17 s, depending on load): on the 1,000 test
images against their own captions color 1.000, shape 0.999, object 0.999, position 0.998
(586 prompts ask one), all 0.999, count 1.000; the same with noise std 16: all 1.000;
blurred (Gaussian, 1 px): object 0.990. Chance (the test captions shuffled): color 0.240,
shape 0.324, object 0.082, position 0.034, all 0.064, count 0.598.
"""

import argparse
import dataclasses
import itertools
import json
import os
import pickle
import time
import warnings

import numpy as np
from PIL import Image

from data import shapes

MIN_AREA = 10  # pixels at S=32; the smallest object (an 8 px triangle) covers ~30
LUT_SHIFT = 2  # the pixel classifier is tabulated on (256 / 4)^3 RGB bins: 4 uint8 units wide
CROP = 10  # side of the resized region mask the shape classifier sees
# Training copies of the data: (Gaussian noise std in uint8 units, blur std in pixels),
# so that noisy or soft samples still read.
AUGMENT = ((0.0, 0.0), (8.0, 0.0), (24.0, 0.0), (8.0, 0.8))
METRICS = ('color', 'shape', 'object', 'position', 'all', 'count')


@dataclasses.dataclass
class Judge:
  """The fitted classifiers (fit_judge); picklable."""
  pixel_classifier: object  # sklearn, [P, 3] RGB / 255 -> 0 background, 1 + COLORS index
  pixel_table: np.ndarray  # uint8 [(256 >> LUT_SHIFT)^3]: pixel_classifier on a grid
  shape_classifier: object  # sklearn, [K, CROP * CROP + 3] region features -> SHAPES index
  image_size: int


def _regions(labels):
  """Connected regions of each color in per-pixel labels int [N, S, S].

  Returns:
    per image, a list of (color index, mask bool [h, w] cropped to the region's box,
    box (x0, y0, x1, y1) in pixels, end exclusive).
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  n, s = labels.shape[:2]
  min_area = MIN_AREA * (s / 32.0) ** 2
  # 8-connected within an image, never across images: one label() call per color.
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = True
  out = [[] for _ in range(n)]
  for c in range(1, len(shapes.COLORS) + 1):
    comp, _ = ndimage.label(labels == c, structure=structure)
    for k, sl in enumerate(ndimage.find_objects(comp), 1):
      mask = comp[sl][0] == k
      if mask.sum() >= min_area:
        box = (sl[2].start, sl[1].start, sl[2].stop, sl[1].stop)
        out[sl[0].start].append((c - 1, mask, box))
  return out


def _shape_features(mask, box, s):
  """float32 [CROP * CROP + 3]: the cropped mask resized, fill ratio, width / height, height / s."""
  small = Image.fromarray(mask.astype(np.float32)).resize((CROP, CROP), Image.BILINEAR)
  h, w = mask.shape
  return np.concatenate([np.asarray(small, np.float32).ravel(),
                         [mask.sum() / (w * h), w / h, h / s]])


def _pixel_labels(judge, images):
  """uint8 [N, S, S, 3] -> int [N, S, S] (0 background, 1 + color index)."""
  q = (images >> LUT_SHIFT).astype(np.int32)
  bins = 256 >> LUT_SHIFT
  return judge.pixel_table[(q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]]


def _tabulate(pixel_classifier):
  """The pixel classifier at the center of every RGB bin: uint8 [bins^3] (a lookup table)."""
  bins = 256 >> LUT_SHIFT
  centers = (np.arange(bins) << LUT_SHIFT) + (1 << LUT_SHIFT) / 2 - 0.5
  grid = np.stack(np.meshgrid(centers, centers, centers, indexing='ij'), -1).reshape(-1, 3)
  return pixel_classifier.predict((grid / 255.0).astype(np.float32)).astype(np.uint8)


def detect(judge, images):
  """Objects in each image: a list (per image) of {'color', 'shape', 'center', 'bbox'}."""
  images = np.asarray(images)
  s = judge.image_size
  if images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 [N, {s}, {s}, 3], got {images.dtype} {images.shape}')
  regions = _regions(_pixel_labels(judge, images))
  flat = [r for rs in regions for r in rs]
  kinds = iter(judge.shape_classifier.predict(np.stack([_shape_features(m, b, s)
                                                        for _, m, b in flat])) if flat else [])
  colors = list(shapes.COLORS)
  return [[{'color': colors[c], 'shape': shapes.SHAPES[next(kinds)],
            'bbox': tuple(int(v) for v in b), 'center': ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)}
           for c, _, b in rs] for rs in regions]


def _augmented(images, rng):
  """One copy of the images per AUGMENT entry, blurred then noised: uint8 [K * N, S, S, 3]."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  out = []
  for noise, blur in AUGMENT:
    x = ndimage.gaussian_filter(images.astype(np.float32), (0, blur, blur, 0)) if blur else images
    x = x + rng.normal(0, noise, images.shape) if noise else x
    out.append(np.clip(np.rint(x), 0, 255).astype(np.uint8))
  return np.concatenate(out)


def fit_judge(num_train=2000, seed=2, image_size=32, path=None, max_pixels=100_000):
  """Trains a Judge on num_train generated images (seed apart from the splits' 0 and 1).

  path: an optional pickle file; read if it exists (same arguments assumed), else written.
  max_pixels: pixels sampled for the pixel classifier (half background, half objects).
  """
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  if path and os.path.exists(path):
    with open(path, 'rb') as f:
      return pickle.load(f)
  rng = np.random.default_rng(seed)
  truth = shapes.scenes(num_train, seed, image_size)
  images, maps = shapes.render(truth, image_size)
  # Per-pixel color truth: 0 background, 1 + color index of the covering object.
  table = np.zeros((num_train, 3), np.int64)
  for i, sc in enumerate(truth):
    for j, o in enumerate(sc['objects']):
      table[i, j + 1] = list(shapes.COLORS).index(o['color']) + 1
  pixel_truth = np.take_along_axis(table, maps.reshape(num_train, -1).astype(np.int64), 1)
  copies = _augmented(images, rng)
  y = np.tile(pixel_truth.ravel(), len(AUGMENT))
  # Background dominates (~85%); balance it against objects so edges are learned.
  bg, fg = np.flatnonzero(y == 0), np.flatnonzero(y > 0)
  take = np.concatenate([rng.choice(bg, min(len(bg), max_pixels // 2), replace=False),
                         rng.choice(fg, min(len(fg), max_pixels // 2), replace=False)])
  x = copies.reshape(-1, 3)[take].astype(np.float32) / 255.0
  with warnings.catch_warnings():  # a few epochs suffice for 3 inputs; no convergence talk
    warnings.simplefilter('ignore', ConvergenceWarning)
    pixel_clf = MLPClassifier((32,), batch_size=500, max_iter=15, random_state=seed)
    pixel_clf.fit(x, y[take])
  judge = Judge(pixel_clf, _tabulate(pixel_clf), None, image_size)
  # Shape classifier on the regions the pixel classifier finds, labelled by the object
  # covering most of each, so that it sees what it will see at test time.
  feats, kinds = [], []
  for i, rs in enumerate(_regions(_pixel_labels(judge, copies))):
    sc, m = truth[i % num_train], maps[i % num_train]
    for _, mask, (x0, y0, x1, y1) in rs:
      owner = np.bincount(m[y0:y1, x0:x1][mask], minlength=3)
      if owner[1:].max() > owner[0]:
        feats.append(_shape_features(mask, (x0, y0, x1, y1), image_size))
        kinds.append(shapes.SHAPES.index(sc['objects'][int(owner[1:].argmax())]['shape']))
  judge.shape_classifier = LogisticRegression(max_iter=1000).fit(np.stack(feats), kinds)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
      pickle.dump(judge, f)
  return judge


def _where(obj, position, s):
  """One detected object is in the named half of an image of side s."""
  x, y = obj['center']
  return {'left': x < s / 2, 'right': x > s / 2, 'top': y < s / 2, 'bottom': y > s / 2}[position]


def _related(a, b, relation):
  """Detected object a stands in `relation` to b along the dominant axis of their offset."""
  dx = a['center'][0] - b['center'][0]
  dy = a['center'][1] - b['center'][1]
  return {'above': dy < 0 and -dy >= abs(dx), 'below': dy > 0 and dy >= abs(dx),
          'left_of': dx < 0 and -dx >= abs(dy), 'right_of': dx > 0 and dx >= abs(dy)}[relation]


def check(scene, found, image_size):
  """One parsed prompt against one image's detections -> {metric: bool} (METRICS)."""
  objs = scene['objects']
  assignments = list(itertools.permutations(found, len(objs)))  # distinct detections
  has = lambda keys: any(all(all(d[k] == o[k] for k in keys) for d, o in zip(a, objs))
                         for a in assignments)
  r = {'color': has(('color',)), 'shape': has(('shape',)), 'object': has(('color', 'shape'))}
  matches = [a for a in assignments
             if all(d['color'] == o['color'] and d['shape'] == o['shape'] for d, o in zip(a, objs))]
  if scene['relation']:
    r['position'] = any(_related(a[0], a[1], scene['relation']) for a in matches)
  elif scene['position']:
    r['position'] = any(_where(a[0], scene['position'], image_size) for a in matches)
  else:
    r['position'] = True  # nothing asked
  r['all'] = r['object'] and r['position']
  r['count'] = len(found) == len(objs)
  return r


def score(judge, images, prompts):
  """Scores images uint8 [N, S, S, 3] against prompts (N strings of data/shapes.py's grammar).

  Returns:
    {'color', 'shape', 'object', 'all', 'count': mean over the N prompts (a prompt counts
     when every object it names is found, on distinct detections); 'position': mean over
     the prompts that ask a position or relation (nan if none); 'num_position': how many;
     'per_prompt': {metric: bool [N]} ('position' True where none is asked);
     'asks_position': bool [N]; 'detections': detect()'s output}.

  Raises:
    ValueError: a prompt outside the grammar, or images of the wrong shape / count.
  """
  prompts = list(prompts)
  if len(prompts) != len(images):
    raise ValueError(f'{len(images)} images but {len(prompts)} prompts')
  parsed = [shapes.parse_prompt(p) for p in prompts]
  found = detect(judge, images)
  rows = [check(sc, f, judge.image_size) for sc, f in zip(parsed, found)]
  per = {m: np.array([r[m] for r in rows], bool) for m in METRICS}
  asks = np.array([bool(sc['position'] or sc['relation']) for sc in parsed], bool)
  out = {m: float(per[m].mean()) if len(rows) else float('nan') for m in METRICS}
  out['position'] = float(per['position'][asks].mean()) if asks.any() else float('nan')
  out.update(num_position=int(asks.sum()), per_prompt=per, asks_position=asks, detections=found)
  return out


def _summary(result):
  return {m: round(result[m], 4) for m in METRICS}


def heldout_accuracy(judge, split='test', noise=0.0, seed=0):
  """score() of the ShapesSource `split` (default the 1,000 test images) against its captions.

  noise: std (uint8 units) of Gaussian noise added to the images first (seeded by seed).
  """
  images, captions = _split(split, judge.image_size)
  if noise:
    rng = np.random.default_rng(seed)
    images = np.clip(images + rng.normal(0, noise, images.shape), 0, 255).astype(np.uint8)
  return score(judge, images, captions)


def chance_accuracy(judge, split='test', seed=0):
  """score() of the split's images against its captions shuffled (seeded): the chance level."""
  images, captions = _split(split, judge.image_size)
  order = np.random.default_rng(seed).permutation(len(captions))
  return score(judge, images, [captions[i] for i in order])


def _split(split, image_size):
  """The split's images as a model trained at image_size sees them: drawn at 32x32 and resized
  by the data pipeline's own preprocessing (antialiased) when image_size differs."""
  from data import preprocess  # pylint: disable=g-import-not-at-top
  source = shapes.ShapesSource(split)
  items = [source[i] for i in range(len(source))]
  images = np.stack([x['image'] for x in items])
  if image_size != images.shape[1]:
    images = np.stack([preprocess.preprocess(im, crop='none', image_size=image_size,
                                             num_channels=3) for im in images])
  return images, [x['caption'] for x in items]


def prompt_sets(num_captions, split='test'):
  """{name: prompts}: 'objects', every color x shape as "a red circle" (in distribution: ~40% of
  the training captions have that form), and 'captions', the split's first num_captions
  captions (every form: positions, relations)."""
  objects = [f'a {c} {s}' for c in shapes.COLORS for s in shapes.SHAPES]
  captions = [shapes.ShapesSource(split)[i]['caption'] for i in range(num_captions)]
  return {'objects': objects, 'captions': captions}


def judge_run(workdir, judge, scales, *, per_prompt=4, num_captions=96, sampler='ddim',
              num_steps=50, seed=0, overrides=()):
  """Samples a trained text run's EMA params at each guidance scale and scores the images.

  Returns rows {'scale', 'set', 'num_images', color, shape, object, position, all, count};
  writes each scale's grid of the 'objects' set to WORKDIR/samples/judge_wW.png.
  """
  import config_lib  # pylint: disable=g-import-not-at-top
  import experiment  # pylint: disable=g-import-not-at-top
  import image_io  # pylint: disable=g-import-not-at-top
  import sample_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_run_config(workdir)
  config.sampling.sampler, config.sampling.num_steps = sampler, num_steps
  for item in overrides:  # 'sampling.use_clipped_model_output=True'
    key, value = item.split('=', 1)
    config_lib.set_field(config, key, value)
  model, schedule = experiment.model(config), experiment.schedule(config)
  step, params = experiment.restore_params(config, workdir, module=model)
  sets = prompt_sets(num_captions)
  rows = []
  for scale in scales:
    for name, prompts in sets.items():
      prompts = [p for p in prompts for _ in range(per_prompt if name == 'objects' else 1)]
      images = sample_lib.sample_images(config, model, schedule, params, len(prompts),
                                        seed=seed, prompts=prompts, guidance_scale=scale,
                                        what=f'judge {name} w={scale:g}')
      result = score(judge, images, prompts)
      rows.append({'step': step, 'scale': scale, 'set': name, 'num_images': len(prompts),
                   'num_position': result['num_position'], **_summary(result)})
      print(json.dumps(rows[-1]), flush=True)
      if name == 'objects':
        image_io.write_captioned_grid(os.path.join(workdir, 'samples', f'judge_w{scale:g}.png'),
                                      images[::per_prompt], prompts[::per_prompt], ncol=6)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_train', type=int, default=2000, help='generated training images')
  parser.add_argument('--seed', type=int, default=2, help='seed of the training images')
  parser.add_argument('--split', default='test', help='held-out ShapesSource split')
  parser.add_argument('--noise', type=float, default=16.0,
                      help='also score the held-out images with this Gaussian noise std (uint8)')
  parser.add_argument('--cache', default='', help='pickle the judge here (read if present)')
  parser.add_argument('--workdir', default='', help='a trained text run (configs/shapes_text.py) '
                      'to sample and judge at each --scales')
  parser.add_argument('--scales', default='1,3', help='guidance scales, comma-separated')
  parser.add_argument('--per_prompt', type=int, default=4, help='samples per one-object prompt')
  parser.add_argument('--num_captions', type=int, default=96,
                      help='test-split captions sampled once each')
  parser.add_argument('--sampler', default='ddim')
  parser.add_argument('--num_steps', type=int, default=50)
  parser.add_argument('--set', nargs='*', default=[], help='sampling overrides: FIELD=VALUE')
  parser.add_argument('--image_size', type=int, default=0,
                      help="the judge's resolution (default: the run's data.image_size, else 32)")
  args = parser.parse_args(argv)
  size = args.image_size
  if not size:
    if args.workdir:
      import config_lib  # pylint: disable=g-import-not-at-top
      size = config_lib.load_run_config(args.workdir).data.image_size
    else:
      size = 32
  t0 = time.time()
  judge = fit_judge(args.num_train, args.seed, image_size=size, path=args.cache or None)
  print(json.dumps({'fit_seconds': round(time.time() - t0, 1), 'num_train': args.num_train,
                    'image_size': size}))
  rows = {'heldout': heldout_accuracy(judge, args.split),
          f'heldout_noise{args.noise:g}': heldout_accuracy(judge, args.split, noise=args.noise),
          'chance_shuffled_prompts': chance_accuracy(judge, args.split)}
  for name, r in rows.items():
    print(json.dumps({'eval': name, 'split': args.split, 'num_position': r['num_position'],
                      **_summary(r)}), flush=True)
  if args.workdir:
    t0 = time.time()
    table = judge_run(args.workdir, judge, [float(x) for x in args.scales.split(',')],
                      per_prompt=args.per_prompt, num_captions=args.num_captions,
                      sampler=args.sampler, num_steps=args.num_steps, overrides=args.set)
    tag = ''.join('_' + item.split('.')[-1] for item in args.set)
    out = os.path.join(args.workdir,
                       f'prompt_accuracy_{args.sampler}{args.num_steps}{tag}.json')
    with open(out, 'w') as f:
      json.dump({'rows': table, 'seconds': round(time.time() - t0, 1)}, f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
  main()
