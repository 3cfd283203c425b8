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

Coverage on average is not enough: estimates regress towards the mean age, so a single
calibration over-covers the middle of the age range and under-covers its ends. The calibration is
therefore Mondrian (Vovk 2012): scans are binned by chronological age (quantile bins of the
calibration ages, at least `min_per_bin` scans each) and each bin is calibrated on its own, which
gives the guarantee within every age bin. The age of a new subject is known when the gap is asked
for; a subject of unknown age gets a brain-age interval from bins of the PREDICTED age instead
(valid within predicted-age bins, not within true-age bins) and no gap interval.

Two intervals per subject, from the same calibration:
- brain age: [predicted_age_low, predicted_age_high], residuals of the (uncorrected) predicted
  age; it contains the chronological age of 90% (level) of exchangeable scans.
- corrected gap: [brain_age_gap_low, brain_age_gap_high] around the bias-corrected gap,
  residuals of the corrected prediction (the uncorrected one when the model has no correction).
  It contains 0 for 90% of the calibration population at that age, so `gap_excludes_zero` marks a
  gap outside the normative range of scans like the calibration set (a test at level 1 - level).

With `normalize`, residuals are divided by `scale = spread + median calibration spread` (the
ensemble members' standard deviation, years), so subjects the members disagree on get wider
intervals; the coverage guarantee is unchanged (Papadopoulos et al. 2008). A single model has no
spread and is never normalised.

The quantiles are plain order statistics of numpy arrays (no MAPIE: its estimator API would wrap a
model we already have and adds scikit-learn's fit/predict contract for two sorts).
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
MIN_PER_BIN = 50   # calibration scans per age bin (at least 2 / alpha - 1 = 19 for level 0.9)
MAX_BINS = 10


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


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
  """The labelled calibration scans of a model and how intervals are cut from them.

  Attributes:
    subject_ids: `[n]` calibration subjects (provenance).
    age, predicted, corrected, spread: `[n]` chronological age, predicted age, bias-corrected
      predicted age and members' spread (years; spread 0 for a single model).
    source: where the scans came from ("validation split of W" or a dataset path).
    normalize: divide residuals by spread + median spread (ensembles only).
    min_per_bin, max_bins: the Mondrian age bins.
    model: the model they were predicted with (`artifact.describe`).
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

  def age_edges(self) -> np.ndarray:
    return bin_edges(self.age, self.min_per_bin, self.max_bins)

  def predicted_edges(self) -> np.ndarray:
    return bin_edges(self.predicted, self.min_per_bin, self.max_bins)

  def bin_bounds(self, level: float = LEVEL) -> dict[str, list[dict[str, float]]]:
    """Per bin (JSON-ready): its age range, n and the residual bounds of both intervals."""
    out: dict[str, list[dict[str, float]]] = {}
    scale = self.scale(self.spread)
    for key, by, edges in (("age", self.age, self.age_edges()),
                           ("predicted_age", self.predicted, self.predicted_edges())):
      rows = []
      b = which_bin(edges, by)
      lows = np.concatenate([[-math.inf], edges])
      highs = np.concatenate([edges, [math.inf]])
      for k in range(len(edges) + 1):
        sel = b == k
        lo, hi = residual_bounds((self.predicted - self.age)[sel] / scale[sel], level)
        clo, chi = residual_bounds((self.corrected - self.age)[sel] / scale[sel], level)
        rows.append({"from": lows[k], "to": highs[k], "n": int(sel.sum()), "low": lo,
                     "high": hi, "corrected_low": clo, "corrected_high": chi})
      out[key] = rows
    return out

  def check(self, level: float = LEVEL, where: str = "") -> list[str]:
    """Warnings (also issued as SmallSampleWarning) for bins too small for `level`: their
    intervals are unbounded on one side."""
    notes = []
    for key, rows in self.bin_bounds(level).items():
      for row in rows:
        if not (math.isfinite(row["low"]) and math.isfinite(row["high"])):
          notes.append(f"calibration{where}: the {key} bin [{row['from']:.1f}, {row['to']:.1f}) "
                       f"has {row['n']} scans, too few for {level:.0%} intervals (needs "
                       f"{math.ceil(2 / (1 - level)) - 1}); its intervals are unbounded")
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
      `[m]` years (gap bounds NaN where the age is unknown; +-inf where a bin is too small),
      "gap_excludes_zero": `[m]` float 1/0 (NaN where unknown), "age_bin": `[m]` int (the
      chronological-age bin, -1 where the age is unknown; the predicted-age bin is used then)}.
    """
    predicted = np.asarray(predicted, np.float64).reshape(-1)
    age = np.asarray(age, np.float64).reshape(-1)
    corrected = np.asarray(corrected, np.float64).reshape(-1)
    scale = self.scale(np.asarray(spread, np.float64).reshape(-1))
    m = len(predicted)
    if not (len(age) == len(corrected) == len(scale) == m):
      raise DataError(f"intervals: {m} predictions, {len(age)} ages, {len(corrected)} corrected, "
                      f"{len(scale)} spreads")
    own = self.scale(self.spread)
    residual = (self.predicted - self.age) / own
    residual_c = (self.corrected - self.age) / own
    known = np.isfinite(age)
    lo, hi = np.full(m, np.nan), np.full(m, np.nan)
    clo, chi = np.full(m, np.nan), np.full(m, np.nan)
    age_bin = np.full(m, -1)
    edges = self.age_edges()
    own_bin = which_bin(edges, self.age)
    age_bin[known] = which_bin(edges, age[known])
    for k in range(len(edges) + 1):
      sel = known & (age_bin == k)
      if sel.any():
        lo[sel], hi[sel] = residual_bounds(residual[own_bin == k], level)
        clo[sel], chi[sel] = residual_bounds(residual_c[own_bin == k], level)
    # Unknown age: bins of the predicted age (of the calibration scans and of the new ones).
    p_edges = self.predicted_edges()
    p_own = which_bin(p_edges, self.predicted)
    p_bin = which_bin(p_edges, predicted)
    for k in range(len(p_edges) + 1):
      sel = ~known & (p_bin == k)
      if sel.any():
        lo[sel], hi[sel] = residual_bounds(residual[p_own == k], level)
    with np.errstate(invalid="ignore"):
      gap_c = corrected - age
      out = {"predicted_age_low": predicted - hi * scale,
             "predicted_age_high": predicted - lo * scale,
             "brain_age_gap_low": np.where(known, gap_c - chi * scale, np.nan),
             "brain_age_gap_high": np.where(known, gap_c - clo * scale, np.nan)}
      excludes = (out["brain_age_gap_low"] > 0) | (out["brain_age_gap_high"] < 0)
    out["gap_excludes_zero"] = np.where(known, excludes.astype(np.float64), np.nan)
    out["age_bin"] = age_bin
    return out

  def to_dict(self) -> dict[str, Any]:
    return {"format": 1, "source": self.source, "model": self.model, "n": self.n,
            "normalize": self.normalize, "min_per_bin": self.min_per_bin,
            "max_bins": self.max_bins,
            "bins_at_default_level": self.bin_bounds(LEVEL), "default_level": LEVEL,
            "subjects": {"participant_id": list(self.subject_ids), "age": self.age,
                         "predicted_age": self.predicted,
                         "predicted_age_corrected": self.corrected, "spread": self.spread}}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "calibration") -> "Calibration":
    try:
      s = d["subjects"]
      return cls(tuple(str(x) for x in s["participant_id"]), np.asarray(s["age"], float),
                 np.asarray(s["predicted_age"], float),
                 np.asarray(s["predicted_age_corrected"], float), np.asarray(s["spread"], float),
                 str(d.get("source", "")), bool(d.get("normalize", False)),
                 int(d.get("min_per_bin", MIN_PER_BIN)), int(d.get("max_bins", MAX_BINS)),
                 str(d.get("model", "")))
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{where}: not a calibration record ({e})") from None


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
                          min_per_bin: int = MIN_PER_BIN) -> Calibration:
  """A `Calibration`; warns (SmallSampleWarning) when a bin is too small for the default
  level."""
  cal = Calibration(tuple(subject_ids), age, predicted, corrected, spread, source, normalize,
                    min_per_bin, MAX_BINS, model)
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
