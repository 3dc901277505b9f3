"""Tests of the captioned shapes dataset (data/shapes.py) and its judge (bench/shapes_judge.py)."""

import pickle
import re

import numpy as np
import pytest

from bench import shapes_judge
from data import shapes

N = 600  # generated images for the checks on content


@pytest.fixture(scope='module')
def generated():
  return shapes.generate(N, seed=5)


@pytest.fixture(scope='module')
def judge():
  return shapes_judge.fit_judge(num_train=300, seed=3)


def test_deterministic_from_seed():
  a = shapes.generate(40, seed=9)
  b = shapes.generate(40, seed=9)
  c = shapes.generate(40, seed=10)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1] == b[1] and a[2] == b[2]
  assert a[1] != c[1] and not np.array_equal(a[0], c[0])


def test_images_are_rgb_uint8(generated):
  images, captions, truth = generated
  assert images.shape == (N, 32, 32, 3) and images.dtype == np.uint8
  assert len(captions) == len(truth) == N
  assert shapes.generate(3, seed=0, image_size=64)[0].shape == (3, 64, 64, 3)
  assert len({x.tobytes() for x in images}) == N  # jittered, not a few templates


def test_vocabulary_covered(generated):
  _, captions, truth = generated
  assert any(re.fullmatch(r'a \w+ \w+', c) for c in captions)  # "a red circle" style
  objects = [o for sc in truth for o in sc['objects']]
  assert {o['color'] for o in objects} == set(shapes.COLORS)
  assert {o['shape'] for o in objects} == set(shapes.SHAPES)
  assert {sc['position'] for sc in truth} == set(shapes.POSITIONS) | {None}
  assert {sc['relation'] for sc in truth} == set(shapes.RELATIONS) | {None}
  kinds = np.array([2 if sc['relation'] else 1 if sc['position'] else 0 for sc in truth])
  np.testing.assert_allclose(np.bincount(kinds) / N, shapes.MIX, atol=0.07)


def test_caption_agrees_with_pixels(generated):
  images, captions, truth = generated
  palette = np.array(list(shapes.COLORS.values()))
  for image, text, sc in zip(images, captions, truth):
    assert text == shapes.caption(sc)
    for o in sc['objects']:
      x, y = (int(v) for v in o['center'])
      pixel = image[y, x].astype(int)
      np.testing.assert_allclose(pixel, o['rgb'], atol=1)  # the object's color at its center
      nearest = list(shapes.COLORS)[np.abs(palette - pixel).sum(1).argmin()]
      assert nearest == o['color'], text
    (cx, cy) = sc['objects'][0]['center']
    region = {'left': cx < 16, 'right': cx > 16, 'top': cy < 16, 'bottom': cy > 16}
    if sc['position']:
      assert region[sc['position']], (text, sc)
    if sc['relation']:
      a, b = (np.array(o['bbox']) for o in sc['objects'])
      assert shapes._apart(a, b, 2.0), (text, sc)  # no overlap
      (ax, ay), (bx, by) = sc['objects'][0]['center'], sc['objects'][1]['center']
      dx, dy = ax - bx, ay - by
      expect = {'above': dy < -abs(dx), 'below': dy > abs(dx),
                'left_of': dx < -abs(dy), 'right_of': dx > abs(dy)}
      assert expect[sc['relation']], (text, sc)


def test_parse_prompt_round_trips(generated):
  _, captions, truth = generated
  for text, sc in zip(captions, truth):
    parsed = shapes.parse_prompt(text)
    assert parsed['objects'] == [{'color': o['color'], 'shape': o['shape']} for o in sc['objects']]
    assert (parsed['position'], parsed['relation']) == (sc['position'], sc['relation'])
    assert shapes.caption(parsed) == text
  assert shapes.parse_prompt('  A Blue  Square above a yellow triangle.') == {
      'objects': [{'color': 'blue', 'shape': 'square'}, {'color': 'yellow', 'shape': 'triangle'}],
      'position': None, 'relation': 'above'}


@pytest.mark.parametrize('prompt, problem', [
    ('a purple circle', 'purple'), ('a red hexagon', 'hexagon'),
    ('a red circle in the middle', 'grammar'), ('two red circles', 'grammar'),
    ('a red circle above', 'grammar'), ('', 'grammar')])
def test_parse_prompt_rejects_outside_grammar(prompt, problem):
  with pytest.raises(ValueError, match=problem):
    shapes.parse_prompt(prompt)


def test_source_splits_and_slices():
  train, test = shapes.ShapesSource('train'), shapes.ShapesSource('test')
  assert (len(train), len(test)) == (10_000, 1_000)
  assert shapes.SPLITS['train'][1] != shapes.SPLITS['test'][1]
  item = test[3]
  assert set(item) == {'image', 'label', 'caption'}
  assert item['image'].shape == (32, 32, 3) and item['image'].dtype == np.uint8
  images, captions, truth = shapes.generate(1_000, shapes.SPLITS['test'][1])
  np.testing.assert_array_equal(item['image'], images[3])
  assert item['caption'] == captions[3]
  first = truth[3]['objects'][0]
  assert item['label'] == shapes.label_of(first['color'], first['shape'])
  assert 0 <= item['label'] < len(shapes.COLORS) * len(shapes.SHAPES)
  # Disjoint content: no test image appears among the training images.
  train_keys = {train[i]['image'].tobytes() for i in range(len(train))}
  assert not train_keys & {x.tobytes() for x in images}
  # Slices as data/sources.py reads them.
  part = shapes.ShapesSource('train[10:20]')
  assert len(part) == 10 and part[0]['caption'] == train[10]['caption']
  np.testing.assert_array_equal(part[-1]['image'], train[19]['image'])
  assert len(shapes.ShapesSource('test[:10%]')) == 100
  assert len(shapes.ShapesSource('test[-5:]')) == 5
  with pytest.raises(IndexError):
    part[10]
  for bad in ('val', 'train[a:b]', 'test[1:2:3]'):
    with pytest.raises(ValueError, match='shapes'):
      shapes.ShapesSource(bad)
  blob = pickle.dumps(part)
  assert len(blob) < 500  # grain workers get copies
  assert pickle.loads(blob)[5]['caption'] == train[15]['caption']


def test_judge_scores_well_above_chance(judge):
  held = shapes_judge.heldout_accuracy(judge)
  chance = shapes_judge.chance_accuracy(judge)
  for metric in ('color', 'object', 'position', 'all'):
    assert held[metric] > 0.95, (metric, held[metric])
    assert held[metric] > chance[metric] + 0.5, (metric, held[metric], chance[metric])
  assert held['per_prompt']['all'].shape == (1_000,) and held['num_position'] > 0


def test_judge_reads_each_part_of_a_prompt(judge):
  images, captions, truth = shapes.generate(30, seed=11)
  i = next(i for i, sc in enumerate(truth) if sc['relation'])  # a two-object image
  image, sc = images[i:i + 1], truth[i]
  (c1, s1), (c2, s2) = ((o['color'], o['shape']) for o in sc['objects'])
  other = next(c for c in shapes.COLORS if c not in (c1, c2))
  flipped = {'above': 'below', 'below': 'above', 'left_of': 'right_of', 'right_of': 'left_of'}
  rel = lambda r: shapes.RELATIONS[r]

  def result(prompt):
    return {k: bool(v[0]) for k, v in shapes_judge.score(judge, image, [prompt])['per_prompt'].items()}

  assert all(result(captions[i]).values())
  r = result(f'a {c1} {s1} {rel(flipped[sc["relation"]])} a {c2} {s2}')
  assert r['object'] and not r['position'] and not r['all']
  r = result(f'a {other} {s1} {rel(sc["relation"])} a {c2} {s2}')
  assert not r['color'] and not r['object'] and r['shape']
  r = result(f'a {c1} {s1}')
  assert r['object'] and r['all'] and not r['count']
  with pytest.raises(ValueError, match='grammar'):
    shapes_judge.score(judge, image, ['a red circle somewhere'])
