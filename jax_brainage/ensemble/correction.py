"""Bias correction of the brain-age gap and the metrics that always report it.

Brain-age estimates regress towards the mean age: the gap (predicted - chronological age, years)
is negative for the old and positive for the young, which confounds any study of the gap. The
standard remedy (Beheshti et al. 2019; Smith et al. 2019; Le et al. 2018) fits that dependence on
validation data and removes it:

    gap = predicted - age;  fit gap ~ f(age) on validation subjects;
    corrected predicted age = predicted - f(age);  corrected gap = gap - f(age)

with f linear (`a + b * age`, "linear") or, as in the source study's follow-up code, a
polynomial of degree 3 ("poly3"). The correction needs the chronological age, so it applies to
subjects whose age is known (research use: the corrected gap is the quantity analysed).
Polynomials are fit in a standardised age `t = (age - center) / scale` (center and scale from the
fitting data) so that the degree-3 design is well conditioned.

`gap_metrics` always reports uncorrected and corrected MAE and the Spearman correlation of the
gap with age (uncorrected and corrected).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping

import numpy as np

from jax_brainage.errors import ConfigError, DataError, SmallSampleWarning

CORRECTIONS = {"none": -1, "linear": 1, "poly3": 3}  # kind -> polynomial degree
MIN_SUBJECTS = 30  # fewer validation scans than this: the fitted age dependence is noise-prone


@dataclasses.dataclass(frozen=True)
class Correction:
  """A fitted bias correction of the gap.

  Attributes:
    kind: "none", "linear" or "poly3".
    coefficients: polynomial coefficients of f in `t`, lowest degree first (years); () for none.
    center, scale: `t = (age - center) / scale` (years).
  """

  kind: str = "none"
  coefficients: tuple[float, ...] = ()
  center: float = 0.0
  scale: float = 1.0

  def __post_init__(self):
    if self.kind not in CORRECTIONS:
      raise ConfigError(f"config.ensemble.correction: unknown correction {self.kind!r} (choose "
                        f"one of {', '.join(CORRECTIONS)})")
    coefficients = tuple(float(c) for c in self.coefficients)
    if len(coefficients) != CORRECTIONS[self.kind] + 1:
      raise ConfigError(f"correction {self.kind}: needs {CORRECTIONS[self.kind] + 1} "
                        f"coefficients, got {len(coefficients)}")
    object.__setattr__(self, "coefficients", coefficients)

  def bias(self, age: Any) -> np.ndarray:
    """f(age) `[n]` (years): the expected gap at these ages."""
    age = np.asarray(age, np.float64)
    if self.kind == "none":
      return np.zeros_like(age)
    t = (age - self.center) / self.scale
    return np.polynomial.polynomial.polyval(t, self.coefficients)

  def apply(self, predicted: Any, age: Any) -> np.ndarray:
    """Corrected predicted age `[n]` (years) of predictions `[n]` at chronological ages `[n]`."""
    predicted = np.asarray(predicted, np.float64)
    age = np.asarray(age, np.float64)
    if predicted.shape != age.shape:
      raise DataError(f"correction: {predicted.shape} predictions for {age.shape} ages")
    return predicted - self.bias(age)

  def corrected_gap(self, predicted: Any, age: Any) -> np.ndarray:
    """Corrected brain-age gap `[n]` (years)."""
    return self.apply(predicted, age) - np.asarray(age, np.float64)

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "coefficients": list(self.coefficients), "center": self.center,
            "scale": self.scale, "variable": "(age - center) / scale, years",
            "fits": "brain_age_gap ~ polynomial (lowest degree first)"}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Correction":
    return cls(str(d["kind"]), tuple(d.get("coefficients", ())), float(d.get("center", 0.0)),
               float(d.get("scale", 1.0)))


def fit_correction(kind: str, age: Any, predicted: Any) -> Correction:
  """Fits `kind` ("none", "linear", "poly3") on validation ages and predictions `[n]` (years).

  Least squares of the gap on a polynomial in age; needs more subjects than coefficients and
  more distinct ages than the degree; warns (SmallSampleWarning) below `MIN_SUBJECTS` scans,
  where the correction's own error is a sizeable part of every corrected gap.
  """
  if kind not in CORRECTIONS:
    raise ConfigError(f"config.ensemble.correction: unknown correction {kind!r} (choose one of "
                      f"{', '.join(CORRECTIONS)})")
  if kind == "none":
    return Correction("none")
  age = np.asarray(age, np.float64).reshape(-1)
  predicted = np.asarray(predicted, np.float64).reshape(-1)
  if age.shape != predicted.shape:
    raise DataError(f"correction: {predicted.shape[0]} predictions for {age.shape[0]} ages")
  if not (np.all(np.isfinite(age)) and np.all(np.isfinite(predicted))):
    raise DataError("correction: ages or predictions are not finite")
  degree = CORRECTIONS[kind]
  if len(age) <= degree or len(np.unique(age)) <= degree:
    raise DataError(f"correction {kind}: {len(np.unique(age))} distinct validation age(s), "
                    f"a degree-{degree} fit needs at least {degree + 1}")
  if len(age) < MIN_SUBJECTS:
    warnings.warn(f"correction {kind}: fit on {len(age)} validation scans (fewer than "
                  f"{MIN_SUBJECTS}); corrected gaps carry its estimation error",
                  SmallSampleWarning, stacklevel=2)
  center = float(np.mean(age))
  scale = float(np.std(age)) or 1.0
  t = (age - center) / scale
  design = np.vander(t, degree + 1, increasing=True)
  coefficients = np.linalg.lstsq(design, predicted - age, rcond=None)[0]
  return Correction(kind, tuple(coefficients), center, scale)


def spearman(a: Any, b: Any) -> float:
  """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
  from scipy.stats import rankdata

  a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
  if len(a) < 2:
    return math.nan
  ra, rb = rankdata(a), rankdata(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  den = math.sqrt(float(ra @ ra) * float(rb @ rb))
  return float(ra @ rb) / den if den > 0 else math.nan


def gap_metrics(age: Any, predicted: Any, corrected: Any) -> dict[str, float]:
  """Uncorrected and corrected errors and age dependence of the gap (ages in years).

  Returns:
    mae, mae_corrected (years), spearman_gap_age, spearman_gap_age_corrected (rank correlation
    of the gap with chronological age), mean_gap, mean_gap_corrected (years), n.
  """
  age = np.asarray(age, np.float64).reshape(-1)
  predicted = np.asarray(predicted, np.float64).reshape(-1)
  corrected = np.asarray(corrected, np.float64).reshape(-1)
  if not (age.shape == predicted.shape == corrected.shape):
    raise DataError(f"gap metrics: {age.shape[0]} ages, {predicted.shape[0]} predictions, "
                    f"{corrected.shape[0]} corrected predictions")
  gap, gap_c = predicted - age, corrected - age
  n = len(age)
  return {"mae": float(np.mean(np.abs(gap))) if n else math.nan,
          "mae_corrected": float(np.mean(np.abs(gap_c))) if n else math.nan,
          "spearman_gap_age": spearman(gap, age),
          "spearman_gap_age_corrected": spearman(gap_c, age),
          "mean_gap": float(np.mean(gap)) if n else math.nan,
          "mean_gap_corrected": float(np.mean(gap_c)) if n else math.nan,
          "n": int(n)}
