"""An independent numpy rebuild of the "smooth" conformal bounds (jax_brainage.ensemble.conformal)
for the tests: local-linear fits by weighted np.polyfit, one order statistic of |scores|."""

from __future__ import annotations

import math

import numpy as np


def local_linear(x, y, at, h):
  """Weighted straight-line fit of y on x around each point of `at` (Gaussian weights, SD h)."""
  out = []
  for a in np.atleast_1d(at):
    w = np.exp(-0.5 * ((x - a) / h) ** 2)
    slope, intercept = np.polyfit(x - a, y, 1, w=np.sqrt(w))  # polyfit squares its weights
    out.append(intercept)
  return np.array(out)


def smooth_bounds(x, r, at, level, bandwidth=1.0, folds=5, floor=0.2, seed=0):
  """(low, high) residual bounds at `at`: cross-fitted scores in `folds` folds (fold of scan i:
  permutation(n)[i] % folds, numpy's default_rng(seed)), rank ceil((n + 1) level) of |z|."""
  x, r, at = (np.asarray(v, np.float64) for v in (x, r, at))
  n, h = len(x), bandwidth * np.std(x)

  def fit(xs, rs):
    dev = np.abs(rs - local_linear(xs, rs, xs, h))
    lo_x, hi_x = xs.min(), xs.max()
    centre = lambda p: local_linear(xs, rs, np.clip(p, lo_x, hi_x), h)  # noqa: E731
    scale = lambda p: np.maximum(local_linear(xs, dev, np.clip(p, lo_x, hi_x), h),  # noqa: E731
                                 floor * np.median(dev))
    return centre, scale

  fold = np.random.default_rng(seed).permutation(n) % folds
  z = np.empty(n)
  for k in range(folds):
    centre, scale = fit(x[fold != k], r[fold != k])
    t = fold == k
    z[t] = (r[t] - centre(x[t])) / scale(x[t])
  k = math.ceil((n + 1) * level - 1e-9)
  q = np.sort(np.abs(z))[k - 1] if k <= n else math.inf
  centre, scale = fit(x, r)
  return centre(at) - q * scale(at), centre(at) + q * scale(at)
