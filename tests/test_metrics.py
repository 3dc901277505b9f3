"""FID, KID and Inception Score against closed forms and independent computations.

Everything here is float64 numpy on small synthetic features (no network).
"""

import numpy as np
import pytest
import scipy.linalg

from evaluation import fid as fid_lib
from evaluation import metrics


def _random_rotation(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


def _commuting_gaussians(rng, d):
  """Two Gaussians whose covariances share an eigenbasis, and their exact FID.

  With sigma_k = Q diag(l_k) Q^T the cross term is Q diag(sqrt(l1 l2)) Q^T, so
  FID = |mu1 - mu2|^2 + sum_i (sqrt(l1_i) - sqrt(l2_i))^2: no matrix square root.
  """
  q = _random_rotation(rng, d)
  l1, l2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
  exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
  return (mu1, s1, mu2, s2), exact


def test_statistics_float64_unbiased_cov():
  f = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = metrics.statistics(f)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  x = f.astype(np.float64)
  np.testing.assert_allclose(mu, x.sum(0) / 50, rtol=1e-12)
  centered = x - x.mean(0)
  np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-12)


def test_fid_closed_form_commuting_covariances():
  (mu1, s1, mu2, s2), exact = _commuting_gaussians(np.random.default_rng(1), 16)
  assert metrics.fid(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10)
  assert metrics.fid(mu2, s2, mu1, s1) == pytest.approx(exact, rel=1e-10)  # symmetric


def test_fid_of_samples_approaches_closed_form():
  rng = np.random.default_rng(2)
  (mu1, s1, mu2, s2), exact = _commuting_gaussians(rng, 4)
  n = 200_000
  x = rng.multivariate_normal(mu1, s1, size=n)
  y = rng.multivariate_normal(mu2, s2, size=n)
  got = metrics.fid(*metrics.statistics(x), *metrics.statistics(y))
  # Sampling error of the mean/cov estimates is O(1/sqrt(n)) ~ 0.2% of the terms.
  assert got == pytest.approx(exact, rel=0.02)


def test_fid_matches_scipy_sqrtm_formula():
  """Against the reference implementations' route: sqrtm of the (non-symmetric) product."""
  rng = np.random.default_rng(3)
  d = 64
  a, b = rng.normal(size=(3 * d, d)), rng.normal(size=(3 * d, d)) * 1.5 + 0.3
  mu1, s1 = metrics.statistics(a)
  mu2, s2 = metrics.statistics(b)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
  assert metrics.fid(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize('n,d', [(1000, 32), (40, 128)])  # second: singular covariance
def test_fid_of_a_set_with_itself_is_zero(n, d):
  f = np.random.default_rng(4).normal(size=(n, d)) * 3.0
  mu, sigma = metrics.statistics(f)
  value = metrics.fid(mu, sigma, mu, sigma)
  assert abs(value) < 1e-10 * np.trace(sigma)
  # And it is strictly positive as soon as the sets differ.
  mu2, sigma2 = metrics.statistics(f[: n // 2])
  assert metrics.fid(mu, sigma, mu2, sigma2) > 1e-3


def test_mmd2_unbiased_matches_brute_force():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(7, 3)), rng.normal(size=(9, 3)) + 0.5

  def k(a, b):
    return (np.dot(a, b) / 3 + 1) ** 3

  xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
  yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
  xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
  assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_full_subset_is_the_u_statistic():
  """subset_size >= both sets: every subset is a permutation of the whole set."""
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) * 2
  assert metrics.kid(x, y, num_subsets=3, subset_size=100) == pytest.approx(
      metrics.mmd2_unbiased(x, y), rel=1e-12)


def _cubic_features_1d(a):
  """phi with phi(x) . phi(y) = (xy + 1)^3 = 1 + 3xy + 3x^2y^2 + x^3y^3 (1-d inputs)."""
  return np.stack([np.ones_like(a), np.sqrt(3) * a, np.sqrt(3) * a ** 2, a ** 3], axis=1)


def _pool_u_statistic_1d(x, y):
  """Unbiased MMD^2 of whole 1-d pools in O(n) through the explicit feature map."""
  def within(a):
    phi = _cubic_features_1d(a)
    total = phi.sum(0)
    return (total @ total - (phi * phi).sum()) / (len(a) * (len(a) - 1)), total / len(a)
  kxx, mean_x = within(x)
  kyy, mean_y = within(y)
  return kxx + kyy - 2 * mean_x @ mean_y


def test_kid_is_unbiased_for_population_mmd_closed_form():
  """1-d Gaussians, where MMD^2 = |E phi(x) - E phi(y)|^2 has a closed form from the
  raw moments m_k: 3(m1 - m1')^2 + 3(m2 - m2')^2 + (m3 - m3')^2."""
  rng = np.random.default_rng(7)
  (a, sa), (b, sb) = (0.5, 0.5), (0.0, 0.6)

  def moments(mu, s):
    return np.array([mu, mu ** 2 + s ** 2, mu ** 3 + 3 * mu * s ** 2])

  diff = moments(a, sa) - moments(b, sb)
  exact = 3 * diff[0] ** 2 + 3 * diff[1] ** 2 + diff[2] ** 2
  x, y = rng.normal(a, sa, size=20_000), rng.normal(b, sb, size=20_000)
  pool = _pool_u_statistic_1d(x, y)
  # The pools' U-statistic estimates the closed form (its sd here is ~2%, measured).
  assert pool == pytest.approx(exact, rel=0.1)

  # Subsets drawn without replacement: each KID estimate's expectation is exactly the
  # pools' U-statistic, so their mean lands within a few standard errors of it ...
  # Small subsets make the V-statistic's O(1/m) bias show.
  m, count = 30, 1000
  est = metrics.kid_subsets(x[:, None], y[:, None], num_subsets=count, subset_size=m, seed=0)
  stderr = est.std() / np.sqrt(len(est))
  assert abs(est.mean() - pool) < 4 * stderr, (est.mean(), pool, stderr)
  # ... where the biased V-statistic (diagonal kept) on the same subsets does not.
  sub = np.random.default_rng(0)  # replays kid_subsets' draws
  biased = []
  for _ in range(count):
    xs = x[sub.choice(len(x), m, replace=False), None]
    ys = y[sub.choice(len(y), m, replace=False), None]
    k = metrics.polynomial_kernel
    biased.append(k(xs, xs).mean() + k(ys, ys).mean() - 2 * k(xs, ys).mean())
  assert np.mean(biased) - pool > 4 * stderr


def test_kid_of_identically_distributed_sets_averages_zero():
  rng = np.random.default_rng(8)
  x, y = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))
  est = metrics.kid_subsets(x, y, num_subsets=200, subset_size=100, seed=1)
  stderr = est.std() / np.sqrt(len(est))
  assert abs(est.mean()) < 4 * stderr
  assert (est < 0).any()  # unbiased: individual estimates go negative
  # While a shifted set is clearly detected.
  assert metrics.kid(x, y + 0.5, num_subsets=20, subset_size=100) > 10 * stderr


def test_inception_score_closed_forms():
  k = 10
  # Confident and evenly spread over k classes: IS = k.
  onehot = np.eye(k)[np.arange(1000) % k]
  mean, std = metrics.inception_score(onehot, splits=10, probs=True)
  assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
  # Uninformative predictions: IS = 1.
  assert metrics.inception_score(np.zeros((100, k)), splits=5)[0] == pytest.approx(1.0)
  # Logits and probabilities agree; matches the direct formula on one split.
  logits = np.random.default_rng(9).normal(size=(200, k)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  want = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
  assert metrics.inception_score(logits, splits=1)[0] == pytest.approx(want, rel=1e-10)
  assert metrics.inception_score(p, splits=1, probs=True)[0] == pytest.approx(want, rel=1e-10)


# ----------------------------------------------------------------------------- fid.py helpers


def test_rechunk_keeps_every_example_in_order():
  rng = np.random.default_rng(10)
  batches = [rng.integers(0, 256, size=(n, 2, 2, 1), dtype=np.uint8) for n in (3, 5, 1, 4)]
  chunks = list(fid_lib._rechunk(iter(batches), 4))  # pylint: disable=protected-access
  assert [c.shape[0] for c, _ in chunks] == [4, 4, 4, 4] and [r for _, r in chunks] == [4, 4, 4, 1]
  got = np.concatenate([c[:r] for c, r in chunks])
  np.testing.assert_array_equal(got, np.concatenate(batches))
  assert not chunks[-1][0][1:].any()  # the padding is zeros, and dropped by the real count
  floats = [np.zeros((2, 2, 2, 3), np.float32)]
  with pytest.raises(TypeError, match='uint8'):
    list(fid_lib._rechunk(floats, 4))  # pylint: disable=protected-access


def test_save_load_stats_roundtrip(tmp_path):
  rng = np.random.default_rng(11)
  feats = rng.normal(size=(5, 3)).astype(np.float32)
  mu, sigma = metrics.statistics(feats)
  path = str(tmp_path / 'sub' / 's.npz')
  fid_lib.save_stats(path, mu, sigma, features=feats)
  stats = fid_lib.load_stats(path)
  np.testing.assert_array_equal(stats['sigma'], sigma)
  np.testing.assert_array_equal(stats['features'], feats)
  assert stats['num_images'] == 5
  # Statistics made by another pipeline are refused instead of silently compared.
  np.savez(path, mu=mu, sigma=sigma, pipeline=np.array('torchvision-inception/pil-bicubic'))
  with pytest.raises(ValueError, match='pipeline'):
    fid_lib.load_stats(path)


def test_to_uint8_rounds_to_nearest_level():
  x = np.array([-1.0, -1.5, 1.0, 2.0, 0.0, 37.6 / 127.5 - 1, 37.4 / 127.5 - 1])
  np.testing.assert_array_equal(fid_lib.to_uint8(x), [0, 0, 255, 255, 128, 38, 37])
  levels = np.arange(256)
  np.testing.assert_array_equal(fid_lib.to_uint8(levels / 127.5 - 1), levels)
