"""Maps of the brain-age gap: relevance against an age-matched reference brain.

A relevance map of the predicted age (`--target age`) explains f(x) against an all-zero input,
so most of it says "this is an adult brain". What a clinician asks is why THIS subject's estimate
differs from what is expected at their chronological age. `--target gap` answers with the
subject's map less the mean map of age-matched training subjects:

    R_gap(x) = R(x) - mean_j R(x_j),   x_j: training scans within +-WINDOW years of the age
    sum_i R_gap_i ~= f(x) - mean_j f(x_j)   (conservative methods; ~ the bias-corrected gap)

The reference set is the model's TRAINING scans (training split of W/split.json; every cached
scan when the workdir records none) within +-`WINDOW` years of the subject's age rounded to whole
years (at least `MIN_SCANS`, the nearest in age when the window holds fewer; at most `MAX_SCANS`,
the nearest), read from the training cache; its mean maps are computed once per whole-year age
through the one relevance path (`maps.ensemble_maps`) with the same method, so the gap map is
defined for every method and level (members, sub-ensembles, the ensemble). The reference set's
mean prediction is reported beside it.

Why the mean of maps and not the map of a mean brain (DeepLIFT-style reference input): the
voxel-wise mean of misaligned brains is blurred (partial volume everywhere), which the network
reads as atrophy: on the cpu preset it was predicted OLDER than the subjects with risk factors it
should explain (mean gap-map sum -7.5 years for subjects whose latent gap exceeds +4 years;
benchmarks/RESULTS.md, session 10). And why not relevance of the corrected gap through the head:
the bias correction is an affine function of age added after the network, so that map is the age
map plus a constant no voxel owns.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage.data import splits
from jax_brainage.errors import DataError

TARGETS = ("age", "gap")
WINDOW = 2.0     # years either side of the subject's (whole-year) age
MIN_SCANS = 5
MAX_SCANS = 16   # reference maps cost one relevance pass per scan, once per whole-year age


class References:
  """Age-matched training scans per sub-ensemble input, and their mean maps.

  Args:
    ensemble: the model (`artifact.load`); views, of_sub: `predict.model_inputs`' (the training
      caches and each sub-ensemble's view key and channels).
  """

  def __init__(self, ensemble, views: Mapping[str, Any],
               of_sub: Mapping[str, tuple[str, Sequence[int] | None]], *,
               window: float = WINDOW, min_scans: int = MIN_SCANS, max_scans: int = MAX_SCANS):
    self.window, self.min_scans, self.max_scans = float(window), int(min_scans), int(max_scans)
    parts = splits.subject_parts(ensemble.workdir) if ensemble.workdir else {}
    self.maps: dict[int, Any] = {}  # whole-year age -> mean maps (filled by the Target)
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
        raise DataError(f"{cache.path}: no training scan with an age to build a reference")
      self._source[sub.name] = (cache, channels, rows, ages[rows])

  @staticmethod
  def key(age: float) -> int:
    """The whole-year age whose reference set serves a subject of `age` (years)."""
    return int(round(float(age)))

  def rows_for(self, name: str, age: float) -> np.ndarray:
    """Cache rows `[k]` of the reference set of sub-ensemble `name` at whole-year `age`."""
    _, _, rows, ages = self._source[name]
    distance = np.abs(ages - float(self.key(age)))
    order = np.argsort(distance, kind="stable")
    inside = int(np.sum(distance <= self.window))
    k = min(max(inside, self.min_scans), self.max_scans, len(rows))
    return np.sort(rows[order[:k]])

  def inputs(self, age: float) -> dict[str, np.ndarray]:
    """{sub name: the reference scans `[k, X, Y, Z, C]` as stored} at whole-year `age`."""
    out = {}
    for name, (cache, channels, _, _) in self._source.items():
      rows = self.rows_for(name, age)
      out[name] = np.asarray(cache.volumes[rows])[..., channels]
    return out


def ages_of(subjects: Sequence[Any]) -> list[float]:
  """Chronological ages (years) of subjects to explain against a reference; a one-line
  DataError naming the first subject without one."""
  for s in subjects:
    if s.age is None or not np.isfinite(float(s.age)):
      raise DataError(f"{s.subject_id}: --target gap needs the chronological age "
                      "(participants.tsv)")
  return [float(s.age) for s in subjects]
