"""Split strings of the sources without a split of their own: 'train' and slices of it."""

import re


def split_range(split, n, what):
  """[start, stop) of `split` ('train', 'train[a:b]', a and b ints or percents) over n items."""
  m = re.fullmatch(r'train(?:\[(-?\d+%?)?:(-?\d+%?)?\])?', split)
  if m is None:
    raise ValueError(f'{what} has one split, train; config.data.split={split!r} must be '
                     "'train' or a slice such as 'train[:90%]', 'train[1000:]'")

  def bound(text, default):
    if text is None:
      return default
    value = round(n * int(text[:-1]) / 100) if text.endswith('%') else int(text)
    return min(max(value + n if value < 0 else value, 0), n)

  return bound(m.group(1), 0), bound(m.group(2), n)
