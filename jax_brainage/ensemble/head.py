"""Head models: how an ensemble combines its members' predicted ages (years).

As in the study, a linear head model is fit on the base models' validation-set predictions:

- `fit_linear_head`: least squares with an intercept, or non-negative least squares (NNLS on the
  centred data, which with a free intercept is exactly the constrained least-squares problem:
  for any weights the best intercept is mean(y) - mean(P) . w), or "mean" (equal weights).
- `fit_multilevel`: the multi-level ("grand") ensemble. Level 1: one head per sub-ensemble, fit
  on its members' validation predictions. Level 2: a linear head over the sub-ensembles, fit by
  K-fold cross-validation on out-of-fold level-1 predictions (level-1 heads refit without the
  held-out fold), so that level 2 weighs sub-ensembles by how well they predict unseen subjects,
  not by how well their level-1 head fits its own training data. The final level-1 heads are
  refit on all validation subjects.

Every head is linear in the member predictions, so `MultiLevelHead.member_weights` gives each
member's effective weight (level-2 weight x level-1 weight) and the ensemble is
`intercept + sum_m w_m p_m` exactly; ensemble relevance uses the same weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage.errors import ConfigError, DataError

HEADS = ("linear", "nonnegative", "mean")


# ---------------------------------------------------------------------------------------------
# One linear head.


@dataclasses.dataclass(frozen=True)
class LinearHead:
  """prediction = P @ weights + intercept.

  Attributes:
    weights: float64 `[k]`, one per input column (member or sub-ensemble).
    intercept: years.
    kind: how it was fit ("linear", "nonnegative", "mean", "identity").
  """

  weights: np.ndarray
  intercept: float = 0.0
  kind: str = "linear"

  def __post_init__(self):
    object.__setattr__(self, "weights", np.asarray(self.weights, np.float64).reshape(-1))
    object.__setattr__(self, "intercept", float(self.intercept))

  @property
  def k(self) -> int:
    return int(self.weights.shape[0])

  def apply(self, predictions: Any) -> np.ndarray:
    """predictions `[n, k]` (years) -> combined `[n]` (years, float64)."""
    p = np.asarray(predictions, np.float64)
    if p.ndim != 2 or p.shape[1] != self.k:
      raise DataError(f"head: expects predictions [n, {self.k}], got shape {p.shape}")
    return p @ self.weights + self.intercept

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "weights": [float(w) for w in self.weights],
            "intercept": self.intercept}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LinearHead":
    return cls(np.asarray(d["weights"], np.float64), float(d["intercept"]),
               str(d.get("kind", "linear")))


def _check_xy(P: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
  P = np.asarray(P, np.float64)
  y = np.asarray(y, np.float64).reshape(-1)
  if P.ndim != 2 or P.shape[0] != y.shape[0] or P.shape[1] < 1:
    raise DataError(f"{what}: predictions must be [n, k>=1] with n = len(ages), got {P.shape} "
                    f"and {y.shape[0]} ages")
  if P.shape[0] < 1:
    raise DataError(f"{what}: no subjects to fit the head on")
  if not (np.all(np.isfinite(P)) and np.all(np.isfinite(y))):
    raise DataError(f"{what}: predictions or ages are not finite")
  return P, y


def fit_linear_head(P: Any, y: Any, *, nonnegative: bool = False,
                    intercept: bool = True) -> LinearHead:
  """Least-squares head of predictions `P [n, k]` (years) for ages `y [n]` (years).

  Args:
    nonnegative: constrain the weights to be >= 0 (NNLS; a robust choice when members'
      predictions are strongly correlated, where plain least squares may give large weights of
      opposite sign).
    intercept: fit an intercept (years); else it is 0.
  Returns:
    the minimum-norm least-squares solution when the problem is rank deficient (numpy lstsq).
  """
  P, y = _check_xy(P, y, "head")
  if intercept:
    p_mean, y_mean = P.mean(axis=0), y.mean()
    A, b = P - p_mean, y - y_mean
  else:
    A, b = P, y
  if nonnegative:
    from scipy.optimize import nnls

    w, _ = nnls(A, b)
  else:
    w = np.linalg.lstsq(A, b, rcond=None)[0]
  c = float(y_mean - p_mean @ w) if intercept else 0.0
  return LinearHead(w, c, "nonnegative" if nonnegative else "linear")


def mean_head(k: int) -> LinearHead:
  """Equal weights 1/k, no intercept: the plain ensemble average."""
  if k < 1:
    raise ConfigError("mean head: needs at least one prediction to average")
  return LinearHead(np.full(k, 1.0 / k), 0.0, "mean")


def fit_head(kind: str, P: Any, y: Any) -> LinearHead:
  """A head of `kind` ("linear", "nonnegative" or "mean") fit on `P [n, k]`, `y [n]`."""
  if kind == "linear":
    return fit_linear_head(P, y)
  if kind == "nonnegative":
    return fit_linear_head(P, y, nonnegative=True)
  if kind == "mean":
    P, _ = _check_xy(P, y, "head")
    return mean_head(P.shape[1])
  raise ConfigError(f"config.ensemble.head: unknown head {kind!r} (choose one of "
                    f"{', '.join(HEADS)})")


# ---------------------------------------------------------------------------------------------
# The multi-level head.


@dataclasses.dataclass(frozen=True)
class MultiLevelHead:
  """Level-1 heads (one per sub-ensemble, over its members) and a level-2 head over them.

  Attributes:
    level1: sub-ensemble name -> LinearHead over its members `[M_name]`.
    level2: LinearHead over the sub-ensembles, in the order of `names`.
    names: sub-ensemble names (level-2 column order).
    kind: "linear", "nonnegative" or "mean" (both levels).
    folds: cross-validation folds level 2 was fit with (0: not cross-validated, e.g. one
      sub-ensemble or the mean head).
    oof_mae: MAE (years) of level 2 refit without each fold, on the out-of-fold level-1
      predictions of the held-out fold: an estimate of the ensemble's error on unseen subjects
      (None when not cross-validated).
  """

  level1: Mapping[str, LinearHead]
  level2: LinearHead
  names: tuple[str, ...]
  kind: str = "linear"
  folds: int = 0
  oof_mae: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "names", tuple(self.names))
    object.__setattr__(self, "level1", dict(self.level1))
    if set(self.level1) != set(self.names) or self.level2.k != len(self.names):
      raise ConfigError(f"multi-level head: level-1 heads {sorted(self.level1)} and level-2 "
                        f"weights ({self.level2.k}) do not match sub-ensembles {list(self.names)}")

  def _members(self, member_preds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    missing = [n for n in self.names if n not in member_preds]
    if missing:
      raise DataError(f"head: no member predictions for sub-ensemble {missing[0]!r}")
    return {n: np.asarray(member_preds[n], np.float64) for n in self.names}

  def sub_predictions(self, member_preds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{name: `[n, M_name]`} member predictions -> {name: `[n]`} sub-ensemble predictions."""
    preds = self._members(member_preds)
    return {n: self.level1[n].apply(preds[n]) for n in self.names}

  def apply(self, member_preds: Mapping[str, Any]) -> np.ndarray:
    """{name: `[n, M_name]`} member predictions (years) -> ensemble prediction `[n]` (years)."""
    subs = self.sub_predictions(member_preds)
    return self.level2.apply(np.stack([subs[n] for n in self.names], axis=1))

  def member_weights(self) -> dict[str, np.ndarray]:
    """Effective weight of every member: {name: `[M_name]`} = level-2 weight x level-1 weights.

    The ensemble prediction is `intercept() + sum over names and members of w * p`.
    """
    return {n: self.level2.weights[j] * self.level1[n].weights for j, n in enumerate(self.names)}

  def intercept(self) -> float:
    """The ensemble's effective intercept (years): b2 + sum_j w2_j * b1_j."""
    return float(self.level2.intercept + sum(
        self.level2.weights[j] * self.level1[n].intercept for j, n in enumerate(self.names)))

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "names": list(self.names), "folds": int(self.folds),
            "oof_mae": self.oof_mae,
            "level1": {n: self.level1[n].to_dict() for n in self.names},
            "level2": self.level2.to_dict(),
            "member_weights": {n: [float(w) for w in ws]
                               for n, ws in self.member_weights().items()},
            "intercept": self.intercept()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MultiLevelHead":
    names = tuple(d["names"])
    return cls({n: LinearHead.from_dict(d["level1"][n]) for n in names},
               LinearHead.from_dict(d["level2"]), names, str(d.get("kind", "linear")),
               int(d.get("folds", 0)), d.get("oof_mae"))


def fold_indices(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
  """Rows `0..n-1` in `min(folds, n)` disjoint, seeded random folds of near-equal size."""
  if folds < 2:
    raise ConfigError(f"config.ensemble.head_folds={folds}: cross-validation needs at least 2")
  order = np.random.default_rng(seed).permutation(n)
  return [np.sort(f) for f in np.array_split(order, min(folds, n))]


def fit_multilevel(member_preds: Mapping[str, Any], y: Any, *, kind: str = "linear",
                   folds: int = 5, seed: int = 0) -> MultiLevelHead:
  """Fits the multi-level head on validation predictions.

  Args:
    member_preds: sub-ensemble name -> members' predicted ages `[n, M_name]` (years), in the
      order the sub-ensembles are listed (level-2 column order).
    y: the subjects' ages `[n]` (years).
    kind: "linear" (least squares), "nonnegative" (NNLS) or "mean" (equal weights, nothing fit).
    folds: K of the K-fold cross-validation of level 2 (at most n).
    seed: seeds the fold assignment.
  Returns:
    `MultiLevelHead`. With one sub-ensemble, level 2 is the identity (nothing to combine).
  """
  if kind not in HEADS:
    raise ConfigError(f"config.ensemble.head: unknown head {kind!r} (choose one of "
                      f"{', '.join(HEADS)})")
  names = tuple(member_preds)
  if not names:
    raise ConfigError("multi-level head: no sub-ensembles")
  y = np.asarray(y, np.float64).reshape(-1)
  preds = {}
  for n in names:
    p = np.asarray(member_preds[n], np.float64)
    preds[n], _ = _check_xy(p if p.ndim == 2 else p.reshape(len(y), -1), y, f"sub-ensemble {n}")
  level1 = {n: fit_head(kind, preds[n], y) for n in names}
  if len(names) == 1:
    return MultiLevelHead(level1, LinearHead(np.ones(1), 0.0, "identity"), names, kind, 0, None)
  if kind == "mean":
    return MultiLevelHead(level1, mean_head(len(names)), names, kind, 0, None)
  if len(y) < 2:
    raise DataError(f"multi-level head: {len(y)} validation subject(s), cross-validation of "
                    "the level-2 head needs at least 2")
  # Out-of-fold level-1 predictions: each fold's sub-ensemble predictions come from level-1
  # heads that never saw it.
  parts = fold_indices(len(y), folds, seed)
  oof = np.zeros((len(y), len(names)))
  for held in parts:
    train = np.setdiff1d(np.arange(len(y)), held)
    for j, n in enumerate(names):
      oof[held, j] = fit_head(kind, preds[n][train], y[train]).apply(preds[n][held])
  level2 = fit_head(kind, oof, y)
  # Level 2's own cross-validated error (refit without each fold).
  cv = np.zeros(len(y))
  for held in parts:
    train = np.setdiff1d(np.arange(len(y)), held)
    cv[held] = fit_head(kind, oof[train], y[train]).apply(oof[held])
  return MultiLevelHead(level1, level2, names, kind, len(parts), float(np.mean(np.abs(cv - y))))


# ---------------------------------------------------------------------------------------------
# Uncertainty.


def member_spread(member_preds: Mapping[str, Any] | Sequence[Any]) -> np.ndarray:
  """Ensemble spread `[n]` (years): the standard deviation (ddof 1) of all members' predicted
  ages per subject, pooled over sub-ensembles; 0 with a single member."""
  arrays = list(member_preds.values()) if isinstance(member_preds, Mapping) else list(member_preds)
  p = np.concatenate([np.asarray(a, np.float64).reshape(np.shape(a)[0], -1) for a in arrays],
                     axis=1)
  if p.shape[1] < 2:
    return np.zeros(p.shape[0])
  return np.std(p, axis=1, ddof=1)
