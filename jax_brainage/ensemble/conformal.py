"""Calibrated prediction intervals for brain age and the brain-age gap (split conformal).

A brain-age estimate is read one person at a time, so each gets an interval whose coverage is
guaranteed by construction rather than by a model's own spread. Split-conformal prediction
(Vovk et al. 2005; Lei et al. 2018) needs only held-out labelled scans exchangeable with the new
ones (the validation split, or a user's calibration set):

    residual  r_i = (predicted_i - age_i) / scale_i      on the n calibration scans
    interval  [predicted - r_(k_hi) * scale, predicted - r_(k_lo) * scale]
    k_lo = floor((n + 1) * alpha / 2),  k_hi = ceil((n + 1) * (1 - alpha / 2))   (order statistics)

covers the chronological age of a new exchangeable scan with probability exactly
(k_hi - k_lo) / (n + 1), which lies in [level, level + 2 / (n + 1)) (`expected_coverage`); an
order statistic beyond 1..n makes that side unbounded (too few calibration scans for the level).
The two tails are cut separately, so a residual distribution skewed by regression towards the
mean is not forced symmetric.

Coverage on average is not enough: estimates regress towards the mean age and their error grows
with age, so one pooled calibration over-covers some ages and under-covers others. Two ways of
making coverage hold across the age range (`method`):

- "smooth" (the default): the residuals are centred and scaled by smooth functions of age,
      z_i = (r_i - m(age_i)) / s(age_i),
  m a local-linear (Gaussian kernel) fit of r on age and s one of |r - m| on age (bandwidth
  `bandwidth` x the SD of the calibration ages, floored at `SCALE_FLOOR` x the median |r - m|),
  and ONE conformal quantile q = |z|_(k), k = ceil((n + 1) level), over all n scans gives
  [m(age) - q s(age), m(age) + q s(age)]. m and s are cross-fitted (K = `folds` random folds,
  as in cross-conformal prediction, Vovk 2015): each calibration scan's z comes from m, s fitted
  without its fold, so its score is out-of-sample like a new scan's; new scans use m, s fitted
  on all n. With m, s known the coverage would be exactly k / (n + 1); fitted, it is that plus
  O(1 / n) on exchangeable scans (measured: +0.009 at n = 99, +0.003 at 199; never below), where
  m, s fitted on the scans they calibrate would fall below the level. The whole calibration set
  sets one quantile, which is barely conservative (rank ceil((n + 1) level) of n, not of n /
  bins) and little noisy, while m and s carry the age dependence.
- "mondrian" (Vovk 2012; the default until session 11): scans are binned by chronological age
  (quantile bins of >= `min_per_bin` scans, at most `max_bins`) and each bin is calibrated on its
  own, two tails cut separately: the guarantee holds within every bin exactly, but each bin's
  quantile is conservative (bins of 50 scans cover 47/51 = 92.2% at level 0.9) and noisy.

benchmarks/bench_intervals.py compares them (and symmetric Mondrian, fewer bins, split-fitted
and two-tailed smooth scores, conformalised quantile regression) by repeated 50/50 splits of
the validation split; benchmarks/RESULTS.md (session 11) has the evidence for the default. The
age of a new subject is known when the gap is asked for; a subject of unknown age gets a
brain-age interval calibrated on the PREDICTED age instead (smooth functions or bins of the
predicted age: valid given the predicted age, not given the true age) and no gap interval.

Two intervals per subject, from the same calibration:
- brain age: [predicted_age_low, predicted_age_high], residuals of the (uncorrected) predicted
  age; it contains the chronological age of 90% (level) of exchangeable scans.
- corrected gap: [brain_age_gap_low, brain_age_gap_high] around the bias-corrected gap,
  residuals of the corrected prediction (the uncorrected one when the model has no correction).
  It contains 0 for 90% of the calibration population at that age, so `gap_excludes_zero` marks a
  gap outside the normative range of scans like the calibration set (a test at level 1 - level).

With `normalize`, residuals are first divided by `scale = spread + median calibration spread`
(the ensemble members' standard deviation, years), so subjects the members disagree on get wider
intervals; the coverage guarantee is unchanged (Papadopoulos et al. 2008). A single model has no
spread and is never normalised.

W/calibration.json keeps the calibration scans' ages and predictions, not the bounds, so the level
is chosen when predicting. Records of format 1 (before session 11) hold no method: they load as
"mondrian", the method they were made with (`brainage calibrate` again gives the default).

The quantiles are plain order statistics of numpy arrays and the local-linear fits a few lines of
numpy (no MAPIE: its estimator API would wrap a model we already have in scikit-learn's
fit/predict contract; statsmodels' lowess is tricube-weighted and robustified, not a plain
kernel fit, and predicts new points only by interpolation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage import fileio
from jax_brainage.errors import DataError, SmallSampleWarning

LEVEL = 0.9        # default interval level
METHODS = ("smooth", "mondrian")
METHOD = "smooth"  # the default (evidence: benchmarks/RESULTS.md, session 11)
BANDWIDTH = 1.0    # smooth: kernel SD as a multiple of the SD of the calibration ages
FOLDS = 5          # smooth: cross-fitting folds
SCALE_FLOOR = 0.2  # smooth: s(age) >= this x the median |r - m|
FOLD_SEED = 0      # smooth: the random fold assignment
MIN_PER_BIN = 50   # mondrian: calibration scans per age bin (>= 2 / alpha - 1 = 19 at 0.9)
MAX_BINS = 10
FORMAT = 2         # calibration.json; 1: before session 11 (no method: mondrian)


def order_statistics(n: int, level: float) -> tuple[int, int]:
  """1-based ranks (k_lo, k_hi) of the calibration residuals that bound a two-sided interval of
  `level` from n scans; k_lo = 0 or k_hi = n + 1 mean that side is unbounded."""
  if not 0.0 < level < 1.0:
    raise DataError(f"interval level {level} must lie strictly between 0 and 1")
  alpha = 1.0 - level
  # The small epsilon keeps (n + 1) * alpha / 2 = 5.0000000001 from flooring past an integer.
  k_lo = int(math.floor((n + 1) * alpha / 2 + 1e-9))
  k_hi = int(math.ceil((n + 1) * (1 - alpha / 2) - 1e-9))
  return max(k_lo, 0), min(k_hi, n + 1)


def expected_coverage(n: int, level: float) -> float:
  """Exact coverage (k_hi - k_lo) / (n + 1) of a two-sided split-conformal interval from n
  exchangeable calibration scans (continuous residuals); in [level, level + 2 / (n + 1))."""
  k_lo, k_hi = order_statistics(n, level)
  return (k_hi - k_lo) / (n + 1)


def residual_bounds(residuals: Any, level: float) -> tuple[float, float]:
  """(lower, upper) residual quantiles of `level` with the finite-sample (n + 1) correction;
  -inf / +inf where the calibration set is too small for that tail."""
  r = np.sort(np.asarray(residuals, np.float64).reshape(-1))
  k_lo, k_hi = order_statistics(len(r), level)
  lo = r[k_lo - 1] if k_lo >= 1 else -math.inf
  hi = r[k_hi - 1] if k_hi <= len(r) else math.inf
  return float(lo), float(hi)


def symmetric_rank(n: int, level: float) -> int:
  """1-based rank k = ceil((n + 1) level) of the calibration |scores| that bounds a symmetric
  interval of `level` from n scans; k = n + 1: too few scans (unbounded)."""
  if not 0.0 < level < 1.0:
    raise DataError(f"interval level {level} must lie strictly between 0 and 1")
  return min(int(math.ceil((n + 1) * level - 1e-9)), n + 1)


def expected_symmetric_coverage(n: int, level: float) -> float:
  """Exact coverage k / (n + 1) of the symmetric interval from n exchangeable scores
  (continuous); in [level, level + 1 / (n + 1))."""
  return symmetric_rank(n, level) / (n + 1)


def local_linear(x: Any, y: Any, at: Any, bandwidth: float) -> np.ndarray:
  """Local-linear regression of y on x (Gaussian kernel of SD `bandwidth`, x's units) evaluated
  `[m]` at `at`; where the weighted x have no spread (one distinct x near a point) the kernel
  mean. x, y: `[n]`; at: `[m]`."""
  x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
  at = np.asarray(at, np.float64).reshape(-1)
  out = np.empty(len(at))
  for start in range(0, len(at), 2048):  # [chunk, n] weights at a time
    d = x[None, :] - at[start:start + 2048, None]
    u = (d / bandwidth) ** 2
    w = np.exp(-0.5 * (u - u.min(axis=1, keepdims=True)))  # the nearest scan weighs 1: no 0/0
    s0, s1, s2 = w.sum(1), (w * d).sum(1), (w * d * d).sum(1)
    t0, t1 = (w * y).sum(1), (w * d * y).sum(1)
    det = s0 * s2 - s1 * s1
    ok = det > 1e-9 * s0 * np.maximum(s2, 1e-300)
    out[start:start + 2048] = np.where(ok, (s2 * t0 - s1 * t1) / np.where(ok, det, 1.0), t0 / s0)
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothScale:
  """Centre m(x) and scale s(x) of residuals r as smooth functions of a covariate x (age, years):
  m the local-linear fit of r on x, s that of |r - m(x)| on x, floored at `SCALE_FLOOR` x the
  median |r - m|. New x are clipped to the fitted range (constant beyond it).

  Attributes:
    x, r: `[n]` the scans it was fitted on; bandwidth: kernel SD (x's units).
  """

  x: np.ndarray
  r: np.ndarray
  bandwidth: float

  def centre(self, at: Any) -> np.ndarray:
    return local_linear(self.x, self.r, self._clip(at), self.bandwidth)

  def scale(self, at: Any) -> np.ndarray:
    dev = np.abs(self.r - local_linear(self.x, self.r, self.x, self.bandwidth))
    floor = max(SCALE_FLOOR * float(np.median(dev)), 1e-12)
    return np.maximum(local_linear(self.x, dev, self._clip(at), self.bandwidth), floor)

  def scores(self, x: Any, r: Any) -> np.ndarray:
    """Normalised residuals (r - m(x)) / s(x) `[k]`."""
    return (np.asarray(r, np.float64) - self.centre(x)) / self.scale(x)

  def _clip(self, at: Any) -> np.ndarray:
    return np.clip(np.asarray(at, np.float64).reshape(-1), self.x.min(), self.x.max())


def smooth_bandwidth(x: Any, bandwidth: float = BANDWIDTH) -> float:
  """Kernel SD (x's units): `bandwidth` x the SD of the calibration covariate (1 if constant)."""
  sd = float(np.std(np.asarray(x, np.float64)))
  return bandwidth * sd if sd > 0 else 1.0


def smooth_scores(x: Any, r: Any, bandwidth: float = BANDWIDTH, folds: int = FOLDS,
                  seed: int = FOLD_SEED) -> np.ndarray:
  """Cross-fitted scores `[n]` of n calibration scans: scan i's (r_i - m(x_i)) / s(x_i) with m,
  s fitted (`SmoothScale`) on the scans outside its fold (min(folds, n) random folds)."""
  x, r = np.asarray(x, np.float64).reshape(-1), np.asarray(r, np.float64).reshape(-1)
  n, h = len(x), smooth_bandwidth(x, bandwidth)
  fold = np.random.default_rng(seed).permutation(n) % max(1, min(int(folds), n))
  z = np.empty(n)
  for k in np.unique(fold):
    out = fold == k
    z[out] = SmoothScale(x[~out], r[~out], h).scores(x[out], r[out]) if (~out).any() else 0.0
  return z


def smooth_bounds(x: Any, r: Any, at: Any, level: float, bandwidth: float = BANDWIDTH,
                  folds: int = FOLDS) -> tuple[np.ndarray, np.ndarray]:
  """Residual bounds (lower, upper) `[m]` at covariate values `at` of a symmetric interval of
  `level`: m(at) -+ q s(at), q the k-th smallest cross-fitted |score| (`symmetric_rank`), m, s
  fitted on all n scans; +-inf where n is too small for the level."""
  x, r = np.asarray(x, np.float64).reshape(-1), np.asarray(r, np.float64).reshape(-1)
  k = symmetric_rank(len(x), level)
  z = np.sort(np.abs(smooth_scores(x, r, bandwidth, folds)))
  q = z[k - 1] if k <= len(z) else math.inf
  fit = SmoothScale(x, r, smooth_bandwidth(x, bandwidth))
  centre, scale = fit.centre(at), fit.scale(at)
  return centre - q * scale, centre + q * scale


def bin_edges(values: Any, min_per_bin: int = MIN_PER_BIN, max_bins: int = MAX_BINS
              ) -> np.ndarray:
  """Interior edges `[b - 1]` of quantile bins of `values` (years) with at least about
  `min_per_bin` values each (one bin when there are fewer than 2 * min_per_bin)."""
  values = np.asarray(values, np.float64).reshape(-1)
  bins = int(np.clip(len(values) // max(1, int(min_per_bin)), 1, max(1, int(max_bins))))
  edges = np.quantile(values, np.arange(1, bins) / bins) if bins > 1 else np.zeros(0)
  return np.unique(edges)


def which_bin(edges: np.ndarray, values: Any) -> np.ndarray:
  """Bin index `[n]` of each value (bins [edge_k-1, edge_k), outer ones open)."""
  return np.searchsorted(np.asarray(edges, np.float64), np.asarray(values, np.float64),
                         side="right")


def mondrian_bounds(x: Any, r: Any, at: Any, level: float, min_per_bin: int = MIN_PER_BIN,
                    max_bins: int = MAX_BINS) -> tuple[np.ndarray, np.ndarray]:
  """Residual bounds (lower, upper) `[m]` at covariate values `at`: the two-tailed order
  statistics (`residual_bounds`) of the calibration residuals in the same quantile bin of x."""
  x, r = np.asarray(x, np.float64).reshape(-1), np.asarray(r, np.float64).reshape(-1)
  at = np.asarray(at, np.float64).reshape(-1)
  edges = bin_edges(x, min_per_bin, max_bins)
  own, new = which_bin(edges, x), which_bin(edges, at)
  lo, hi = np.empty(len(at)), np.empty(len(at))
  for k in np.unique(new):
    lo[new == k], hi[new == k] = residual_bounds(r[own == k], level)
  return lo, hi


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
  """The labelled calibration scans of a model and how intervals are cut from them.

  Attributes:
    subject_ids: `[n]` calibration subjects (provenance).
    age, predicted, corrected, spread: `[n]` chronological age, predicted age, bias-corrected
      predicted age and members' spread (years; spread 0 for a single model).
    source: where the scans came from ("validation split of W" or a dataset path).
    normalize: divide residuals by spread + median spread (ensembles only).
    min_per_bin, max_bins: the Mondrian age bins (method "mondrian"; also the rows of
      `bin_bounds` for "smooth").
    model: the model they were predicted with (`artifact.describe`).
    method: "smooth" (default) or "mondrian" (module docstring); bandwidth, folds: "smooth"'s.
    pose_average: the test-time augmentation the calibration scans were predicted with
      (`augment.PoseAverage.describe()`; "" for none): intervals hold for predictions made
      the same way.
  """

  subject_ids: tuple[str, ...]
  age: np.ndarray
  predicted: np.ndarray
  corrected: np.ndarray
  spread: np.ndarray
  source: str = ""
  normalize: bool = False
  min_per_bin: int = MIN_PER_BIN
  max_bins: int = MAX_BINS
  model: str = ""
  method: str = METHOD
  bandwidth: float = BANDWIDTH
  folds: int = FOLDS
  pose_average: str = ""

  def __post_init__(self):
    n = len(self.subject_ids)
    for name in ("age", "predicted", "corrected", "spread"):
      a = np.asarray(getattr(self, name), np.float64).reshape(-1)
      if len(a) != n:
        raise DataError(f"calibration ({self.source}): {len(a)} values of {name} for {n} "
                        "subjects")
      if not np.all(np.isfinite(a)):
        raise DataError(f"calibration ({self.source}): {name} is not finite for subject "
                        f"{self.subject_ids[int(np.flatnonzero(~np.isfinite(a))[0])]}")
      object.__setattr__(self, name, a)
    if n < 2:
      raise DataError(f"calibration ({self.source}): needs labelled scans, got {n}")
    if self.method not in METHODS:
      raise DataError(f"calibration ({self.source}): unknown method {self.method!r} (one of "
                      f"{', '.join(METHODS)})")
    if not (self.bandwidth > 0 and self.folds >= 2):
      raise DataError(f"calibration ({self.source}): bandwidth {self.bandwidth} must be > 0 and "
                      f"folds {self.folds} >= 2")
    if self.normalize and not np.any(self.spread > 0):
      object.__setattr__(self, "normalize", False)  # a single model: nothing to normalise by

  @property
  def n(self) -> int:
    return len(self.subject_ids)

  def scale(self, spread: Any) -> np.ndarray:
    """Residual scale `[m]` (years, or 1 when not normalised) of subjects with this spread."""
    spread = np.asarray(spread, np.float64)
    if not self.normalize:
      return np.ones_like(spread)
    return spread + float(np.median(self.spread))

  def bounds(self, at: Any, level: float = LEVEL, *, by: str = "age",
             corrected: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Residual bounds (lower, upper) `[m]` (years, x scale when normalised) for new scans whose
    chronological age (`by="age"`) or predicted age (`by="predicted_age"`) is `at` (years):
    of predicted - age, or of corrected - age (`corrected`)."""
    residual = ((self.corrected if corrected else self.predicted) - self.age)
    residual = residual / self.scale(self.spread)
    x = self.age if by == "age" else self.predicted
    if self.method == "mondrian":
      return mondrian_bounds(x, residual, at, level, self.min_per_bin, self.max_bins)
    return smooth_bounds(x, residual, at, level, self.bandwidth, self.folds)

  def bin_bounds(self, level: float = LEVEL) -> dict[str, list[dict[str, float]]]:
    """Per quantile bin of the calibration ages and of their predicted ages (JSON-ready): its
    range, n and the residual bounds of both intervals (for "smooth", at the bin's median)."""
    out: dict[str, list[dict[str, float]]] = {}
    for key, by, x in (("age", "age", self.age),
                       ("predicted_age", "predicted_age", self.predicted)):
      edges = bin_edges(x, self.min_per_bin, self.max_bins)
      b = which_bin(edges, x)
      at = np.array([np.median(x[b == k]) for k in range(len(edges) + 1)])
      lo, hi = self.bounds(at, level, by=by)
      clo, chi = self.bounds(at, level, by=by, corrected=True)
      lows = np.concatenate([[-math.inf], edges])
      highs = np.concatenate([edges, [math.inf]])
      out[key] = [{"from": lows[k], "to": highs[k], "n": int(np.sum(b == k)), "at": at[k],
                   "low": lo[k], "high": hi[k], "corrected_low": clo[k], "corrected_high": chi[k]}
                  for k in range(len(edges) + 1)]
    return out

  def check(self, level: float = LEVEL, where: str = "") -> list[str]:
    """Warnings (also issued as SmallSampleWarning) where the calibration is too small for
    `level`: those intervals are unbounded."""
    notes = []
    if self.method == "smooth":
      if symmetric_rank(self.n, level) > self.n:
        notes.append(f"calibration{where}: {self.n} scans are too few for {level:.0%} intervals "
                     f"(needs {math.ceil(level / (1 - level))}); the intervals are unbounded")
    else:
      for key, rows in self.bin_bounds(level).items():
        for row in rows:
          if not (math.isfinite(row["low"]) and math.isfinite(row["high"])):
            notes.append(f"calibration{where}: the {key} bin [{row['from']:.1f}, "
                         f"{row['to']:.1f}) has {row['n']} scans, too few for {level:.0%} "
                         f"intervals (needs {math.ceil(2 / (1 - level)) - 1}); its intervals are "
                         "unbounded")
    for note in notes:
      warnings.warn(note, SmallSampleWarning, stacklevel=2)
    return notes

  def intervals(self, predicted: Any, age: Any, corrected: Any, spread: Any,
                level: float = LEVEL) -> dict[str, np.ndarray]:
    """Intervals of m new subjects at `level`.

    Args:
      predicted, corrected, spread: `[m]` predicted and bias-corrected predicted age and members'
        spread (years); age: `[m]` chronological age, NaN where unknown (corrected is then
        ignored).
    Returns:
      {"predicted_age_low", "predicted_age_high", "brain_age_gap_low", "brain_age_gap_high":
      `[m]` years (gap bounds NaN where the age is unknown; +-inf where the calibration is too
      small), "gap_excludes_zero": `[m]` float 1/0 (NaN where unknown)}. The brain-age interval
      of a subject of unknown age is calibrated on the predicted age.
    """
    predicted = np.asarray(predicted, np.float64).reshape(-1)
    age = np.asarray(age, np.float64).reshape(-1)
    corrected = np.asarray(corrected, np.float64).reshape(-1)
    scale = self.scale(np.asarray(spread, np.float64).reshape(-1))
    m = len(predicted)
    if not (len(age) == len(corrected) == len(scale) == m):
      raise DataError(f"intervals: {m} predictions, {len(age)} ages, {len(corrected)} corrected, "
                      f"{len(scale)} spreads")
    known = np.isfinite(age)
    lo, hi = np.full(m, np.nan), np.full(m, np.nan)
    clo, chi = np.full(m, np.nan), np.full(m, np.nan)
    if known.any():
      lo[known], hi[known] = self.bounds(age[known], level)
      clo[known], chi[known] = self.bounds(age[known], level, corrected=True)
    if (~known).any():
      lo[~known], hi[~known] = self.bounds(predicted[~known], level, by="predicted_age")
    with np.errstate(invalid="ignore"):
      gap_c = corrected - age
      out = {"predicted_age_low": predicted - hi * scale,
             "predicted_age_high": predicted - lo * scale,
             "brain_age_gap_low": np.where(known, gap_c - chi * scale, np.nan),
             "brain_age_gap_high": np.where(known, gap_c - clo * scale, np.nan)}
      excludes = (out["brain_age_gap_low"] > 0) | (out["brain_age_gap_high"] < 0)
    out["gap_excludes_zero"] = np.where(known, excludes.astype(np.float64), np.nan)
    return out

  def to_dict(self) -> dict[str, Any]:
    return {"format": FORMAT, "source": self.source, "model": self.model, "n": self.n,
            "method": self.method, "bandwidth": self.bandwidth, "folds": self.folds,
            "normalize": self.normalize, "min_per_bin": self.min_per_bin,
            "max_bins": self.max_bins, "pose_average": self.pose_average,
            "bins_at_default_level": self.bin_bounds(LEVEL), "default_level": LEVEL,
            "subjects": {"participant_id": list(self.subject_ids), "age": self.age,
                         "predicted_age": self.predicted,
                         "predicted_age_corrected": self.corrected, "spread": self.spread}}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "calibration") -> "Calibration":
    """The record of `to_dict`; format 1 (no method) loads as "mondrian", as it was made."""
    try:
      version = int(d.get("format", 1))
      if version > FORMAT:
        raise DataError(f"{where}: calibration format {version} is newer than this version "
                        f"reads ({FORMAT}); run brainage calibrate again")
      method = str(d.get("method", "mondrian"))
      if method not in METHODS:
        raise DataError(f"{where}: unknown interval method {method!r} (one of "
                        f"{', '.join(METHODS)}); run brainage calibrate again")
      s = d["subjects"]
      return cls(tuple(str(x) for x in s["participant_id"]), np.asarray(s["age"], float),
                 np.asarray(s["predicted_age"], float),
                 np.asarray(s["predicted_age_corrected"], float), np.asarray(s["spread"], float),
                 str(d.get("source", "")), bool(d.get("normalize", False)),
                 int(d.get("min_per_bin", MIN_PER_BIN)), int(d.get("max_bins", MAX_BINS)),
                 str(d.get("model", "")), method,
                 float(d.get("bandwidth", BANDWIDTH)), int(d.get("folds", FOLDS)),
                 str(d.get("pose_average", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise DataError(f"{where}: not a calibration record ({e}); run brainage calibrate "
                      "again") from None


def coverage(low: Any, high: Any, truth: Any) -> float:
  """Share of `truth` inside [low, high] (all `[n]`, years)."""
  low, high, truth = (np.asarray(a, np.float64) for a in (low, high, truth))
  return float(np.mean((truth >= low) & (truth <= high))) if len(truth) else math.nan


def coverage_by_bin(low: Any, high: Any, truth: Any, by: Any, bins: int = 10
                    ) -> list[dict[str, float]]:
  """Coverage and mean width within quantile bins (deciles by default) of `by` (years)."""
  by = np.asarray(by, np.float64)
  low, high, truth = (np.asarray(a, np.float64) for a in (low, high, truth))
  edges = np.quantile(by, np.arange(1, bins) / bins)
  b = which_bin(edges, by)
  rows = []
  for k in range(bins):
    sel = b == k
    if sel.any():
      rows.append({"from": float(by[sel].min()), "to": float(by[sel].max()), "n": int(sel.sum()),
                   "coverage": coverage(low[sel], high[sel], truth[sel]),
                   "width": float(np.mean(high[sel] - low[sel]))})
  return rows


def calibration_from_rows(subject_ids: Sequence[str], age: Any, predicted: Any, corrected: Any,
                          spread: Any, *, source: str, normalize: bool, model: str = "",
                          min_per_bin: int = MIN_PER_BIN, method: str = METHOD,
                          pose_average: str = "") -> Calibration:
  """A `Calibration`; warns (SmallSampleWarning) when it is too small for the default level."""
  cal = Calibration(tuple(subject_ids), age, predicted, corrected, spread, source, normalize,
                    min_per_bin, MAX_BINS, model, method, pose_average=pose_average)
  cal.check(LEVEL, f" ({source})")
  return cal


CALIBRATION_FILE = "calibration.json"  # in a trained workdir (`brainage calibrate`)


def calibration_path(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / CALIBRATION_FILE


def save_calibration(path: str | os.PathLike, calibration: Calibration) -> None:
  """Writes the calibration record atomically (JSON)."""
  fileio.write_json(path, fileio.jsonable(calibration.to_dict()))


def load_calibration(path: str | os.PathLike) -> Calibration:
  """Reads a calibration record; a one-line DataError naming the file when it is damaged."""
  try:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable calibration record ({type(e).__name__})") from None
  return Calibration.from_dict(d, str(path))
