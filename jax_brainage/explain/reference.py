"""Maps of the brain-age gap: relevance against an age-matched reference brain.

A relevance map of the predicted age (`--target age`) explains f(x) against an all-zero input,
so most of it says "this is an adult brain". What a clinician asks is why THIS subject's estimate
differs from what is expected at their chronological age. `--target gap` answers with the
difference-from-reference decomposition (as DeepLIFT's reference, Shrikumar et al. 2017, or the
baseline of integrated gradients):

    R_gap(x) = R(x) - R(x_ref(age)),   sum_i R_gap_i ~= f(x) - f(x_ref)   (conservative methods)

where x_ref(age) is the voxel-wise mean of the model's TRAINING scans within +-`WINDOW` years of
the subject's chronological age (at least `MIN_SCANS`, the nearest in age when the window holds
fewer; at most `MAX_SCANS`, the nearest), read from the training cache (its training split,
W/split.json; every cached scan when the workdir records no split). Both maps come from the one
relevance path (`maps.ensemble_maps`) with the same method, so the gap map is defined for every
method and level (members, sub-ensembles, the ensemble). The reference prediction f(x_ref) is
reported beside it: its distance from f(x) is the part of the gap the map distributes.

Why a reference brain rather than the corrected gap through the head: the bias correction is an
affine function of age added after the network, so relevance of the corrected gap through the
head is the age map plus a constant that no voxel owns; the reference subtracts what an average
brain of that age already contributes, voxel by voxel.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage.data import intensity, splits
from jax_brainage.errors import DataError

TARGETS = ("age", "gap")
WINDOW = 2.0     # years either side of the subject's age
MIN_SCANS = 5
MAX_SCANS = 64


class References:
  """Age-matched mean training cubes per sub-ensemble input.

  Args:
    ensemble: the model (`artifact.load`); views, of_sub: `predict.model_inputs`' (the training
      caches and each sub-ensemble's view key and channels).
  """

  def __init__(self, ensemble, views: Mapping[str, Any],
               of_sub: Mapping[str, tuple[str, Sequence[int] | None]], *,
               window: float = WINDOW, min_scans: int = MIN_SCANS, max_scans: int = MAX_SCANS):
    self.window, self.min_scans, self.max_scans = float(window), int(min_scans), int(max_scans)
    parts = splits.subject_parts(ensemble.workdir) if ensemble.workdir else {}
    self._memo: dict[tuple, np.ndarray] = {}
    self._source: dict[str, tuple[Any, list[int], np.ndarray, np.ndarray]] = {}
    for sub in ensemble.subs:
      key, _ = of_sub[sub.name]
      cache = views[key]
      stored = list(cache.index["sequences"])  # the memory-mapped channels (a view may pick)
      channels = [stored.index(q) for q in sub.sequences]
      ages = np.asarray(cache.ages, np.float64)
      train = np.array([parts.get(s, "train") == "train" for s in cache.subject_ids], bool)
      rows = np.flatnonzero(train & np.isfinite(ages))
      if len(rows) == 0:
        raise DataError(f"{cache.path}: no training scan with an age to build a reference brain")
      self._source[sub.name] = (cache, channels, rows, ages[rows])

  def rows_for(self, name: str, age: float) -> np.ndarray:
    """Cache rows `[k]` of the reference of sub-ensemble `name` at `age` (years)."""
    _, _, rows, ages = self._source[name]
    distance = np.abs(ages - float(age))
    order = np.argsort(distance, kind="stable")
    inside = int(np.sum(distance <= self.window))
    k = min(max(inside, self.min_scans), self.max_scans, len(rows))
    return np.sort(rows[order[:k]])

  def cube(self, name: str, age: float) -> np.ndarray:
    """Mean network input `[X, Y, Z, C]` (float32, as the model reads it) at `age`."""
    key = (name, round(float(age), 2))
    if key not in self._memo:
      cache, channels, _, _ = self._source[name]
      rows = self.rows_for(name, age)
      total = None
      for i in rows:  # one at a time: bounded memory at study-sized cubes
        x = intensity.to_unit_float(np.asarray(cache.volumes[i])[..., channels])
        total = x.astype(np.float64) if total is None else total + x
      self._memo[key] = (total / len(rows)).astype(np.float32)
    return self._memo[key]

  def batch(self, ages: Sequence[float]) -> dict[str, np.ndarray]:
    """{sub name: reference inputs `[n, X, Y, Z, C]`} of subjects of these ages."""
    return {name: np.stack([self.cube(name, a) for a in ages]) for name in self._source}


def ages_of(subjects: Sequence[Any]) -> list[float]:
  """Chronological ages (years) of subjects to explain against a reference; a one-line
  DataError naming the first subject without one."""
  for s in subjects:
    if s.age is None or not np.isfinite(float(s.age)):
      raise DataError(f"{s.subject_id}: --target gap needs the chronological age "
                      "(participants.tsv)")
  return [float(s.age) for s in subjects]


def as_float(cubes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stored cubes as the network reads them (float32), to stack with references."""
  return {k: np.asarray(intensity.to_unit_float(np.asarray(v)), np.float32)
          for k, v in cubes.items()}
