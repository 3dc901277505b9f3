"""Pieces several benches share (no flags here: each bench defines its own)."""

from absl import app


def parse_grid(text):
  """'ddpm:1000,100;ddim:50' -> [('ddpm', 1000), ('ddpm', 100), ('ddim', 50)]."""
  rows = []
  for part in filter(None, (p.strip() for p in text.split(';'))):
    name, _, steps = part.partition(':')
    if not steps:
      raise app.UsageError(f'--grid entry {part!r} needs steps: sampler:n1,n2')
    rows += [(name.strip(), int(n)) for n in steps.split(',') if n.strip()]
  return rows


def real_digits(config):
  """Every real digit at the config's resolution: uint8 [N, H, W, C] and int labels [N]."""
  import data as data_lib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  ds = data_lib.get_dataset(config, batch_size=256, process_index=0, process_count=1,
                            shuffle=False, repeat=False, drop_remainder=False, uint8=True)
  images, labels = [], []
  for batch in ds:
    images.append(batch['image'])
    labels.append(batch['label'])
  return np.concatenate(images), np.concatenate(labels)


def fit_classifier(images, labels, test_fraction, seed=0):
  """Logistic regression on pixels / 255; returns (classifier, held-out accuracy)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  x = images.reshape(len(images), -1) / 255.0
  x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=test_fraction,
                                            random_state=seed, stratify=labels)
  clf = LogisticRegression(max_iter=5000, C=1.0)
  clf.fit(x_tr, y_tr)
  return clf, float(clf.score(x_te, y_te))


def fid_reference(config, inception_params, reference_images, num_samples, out_dir):
  """The FID reference a bench scores against, and the Inception batch size to use.

  Args:
    config: the run's config (data, eval groups).
    inception_params: the FID network's params.
    reference_images: > 0: the statistics of the split's first so many images (cached as
      OUT_DIR/fid_stats_firstN.npz); 0: the dataset's cached statistics (eval_lib).
    num_samples: images per scored row.
    out_dir: where a first-N reference is cached.

  Returns:
    (ref, inception batch size, a description of the reference for the table's caption).
  """
  import os  # pylint: disable=g-import-not-at-top
  import data as data_lib  # pylint: disable=g-import-not-at-top
  import eval_lib  # pylint: disable=g-import-not-at-top
  from evaluation import fid as fid_lib  # pylint: disable=g-import-not-at-top
  # Inception pads every call to its batch size: no bigger than needed for tiny smoke runs.
  ibs = min(config.eval.batch_size, max(num_samples, reference_images))
  if reference_images > 0:
    imgs = next(data_lib.get_dataset(config, batch_size=reference_images, process_index=0,
                                     process_count=1, shuffle=False, repeat=False,
                                     drop_remainder=False, uint8=True))['image']
    ref = fid_lib.reference_statistics(
        imgs, os.path.join(out_dir, f'fid_stats_first{len(imgs)}.npz'),
        params=inception_params, batch_size=ibs)
    return ref, ibs, f'the first {len(imgs)} images of {config.data.dataset}'
  ref = eval_lib.reference_stats(config, params=inception_params)
  return ref, ibs, (f"all {ref.get('num_images', '?')} images of {config.data.dataset} "
                    f'({eval_lib.stats_path(config)})')
