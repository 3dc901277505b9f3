"""Sample-quality metrics from Inception features: FID, KID, Inception Score.

All in numpy float64 on the host: the statistics are small (2048-d), and float32
loses FID digits when the traces (~100s) are differenced down to single digits.
"""

import numpy as np


def statistics(features):
  """Mean and covariance of features, in float64.

  Args:
    features: [N, D] (any float dtype), N >= 2.

  Returns:
    (mu [D], sigma [D, D]) float64; sigma is the unbiased (N - 1) covariance, as in
    the reference FID code.
  """
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'need features [N >= 2, D], got shape {f.shape}')
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a):
  """Symmetric square root of a symmetric PSD matrix (negative round-off clipped to 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def fid(mu1, sigma1, mu2, sigma2):
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

  The last trace is the nuclear norm of sigma1^{1/2} sigma2^{1/2}: with A, C the
  symmetric square roots, (A C)(A C)^T = A sigma2 A is similar to sigma1 sigma2, so
  the eigenvalues of (sigma1 sigma2)^{1/2} are the singular values of A C. Two
  symmetric eigendecompositions and one SVD, all backward stable, give it with real
  arithmetic only: no complex round-off to discard and no eps added to the
  diagonal, which scipy.linalg.sqrtm on the non-symmetric product needs when a
  covariance is singular (fewer samples than 2048 dimensions). Taking singular
  values rather than square roots of eigenvalues of A sigma2 A keeps the null space
  at round-off (eps) instead of sqrt(eps), so FID(x, x) is 0 to ~1e-12 relative.

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] symmetric PSD covariances.

  Returns:
    float, the squared Frechet distance (the number papers report as FID).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}')
  tr_covmean = np.linalg.svd(_sqrt_psd(s1) @ _sqrt_psd(s2), compute_uv=False).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def polynomial_kernel(x, y):
  """KID's kernel k(x, y) = (x . y / d + 1)^3.  x [N, D], y [M, D] -> [N, M] float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y):
  """Unbiased MMD^2 (U-statistic) between samples x [m, D] and y [n, D], cubic kernel.

  mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j).
  """
  m, n = len(x), len(y)
  if m < 2 or n < 2:
    raise ValueError('need at least 2 samples on each side')
  kxx = polynomial_kernel(x, x)
  kyy = polynomial_kernel(y, y)
  kxy = polynomial_kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) +
               (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean())


def kid_subsets(feats1, feats2, num_subsets=100, subset_size=1000, seed=0):
  """Per-subset KID estimates (Binkowski et al. 2018).

  Each subset draws min(subset_size, N1, N2) rows without replacement from each set
  and takes the unbiased MMD^2; each estimate is unbiased for the MMD^2 of the two
  distributions, so their mean is too (and can be negative).

  Args:
    feats1: [N1, D] features.
    feats2: [N2, D] features.
    num_subsets: number of random subsets.
    subset_size: rows per subset (capped at the smaller set).
    seed: numpy seed for the subset draws.

  Returns:
    float64 [num_subsets].
  """
  f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
  m = min(subset_size, len(f1), len(f2))
  rng = np.random.default_rng(seed)
  return np.array([
      mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)],
                    f2[rng.choice(len(f2), m, replace=False)]) for _ in range(num_subsets)
  ])


def kid(feats1, feats2, num_subsets=100, subset_size=1000, seed=0):
  """Kernel Inception Distance: mean of `kid_subsets` (papers often report it x 1e3).

  Returns:
    float, unbiased estimate of MMD^2 with k(x, y) = (x . y / d + 1)^3.
  """
  return float(kid_subsets(feats1, feats2, num_subsets, subset_size, seed).mean())


def inception_score(x, splits=10, *, probs=False):
  """Inception Score exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks.

  Needs the classifier head's outputs. The bundled FID network stops at pool3 (no
  head), so IS is only available with weights that carry one (`logits/kernel`).

  Args:
    x: [N, K] logits (default) or class probabilities (probs=True).
    splits: consecutive chunks, each with its own marginal p(y) (Salimans et al.).
    probs: x holds probabilities rather than logits.

  Returns:
    (mean, std) floats over the splits.
  """
  x = np.asarray(x, np.float64)
  if probs:
    log_p = np.log(np.clip(x, 1e-300, None))  # 0 * log 0 -> 0 below
  else:
    z = x - x.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  scores = []
  for chunk in np.array_split(log_p, splits):
    p = np.exp(chunk)
    log_py = np.log(np.clip(p.mean(axis=0), 1e-300, None))  # unseen class: p = 0 there
    kl = (p * (chunk - log_py)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))
