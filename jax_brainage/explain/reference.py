"""Maps of the brain-age gap: relevance against age-matched reference brains.

A relevance map of the predicted age (`--target age`) explains f(x) against an all-zero input,
so most of it says "this is an adult brain". What a clinician asks is why THIS subject's estimate
differs from what is expected at their chronological age. `--target gap` answers against a
reference set of the model's TRAINING scans (training split of W/split.json; every cached scan
when the workdir records none) of about the subject's age (+-`WINDOW` years of the whole-year
age), read from the training cache:

- `--reference nearest` (default): the `NEAREST` age-matched scans most similar to the subject
  (Pearson correlation of the block-averaged cubes, every channel; `similarity_features`), so
  that head size, folding and ventricles of other people cancel better than in a mean over all
  peers; the subject itself is never its own reference.
- `--reference age`: every age-matched scan (at least `MIN_SCANS`, at most `MAX_SCANS`, the
  nearest in age), their mean maps computed once per whole-year age.

- `--reference expected` ("peer paths to the expected age", integrated gradients only): the
  gap is g = f(x) - E(a), E(a) the estimate expected at the chronological age a (the model's
  bias-correction line a + bias(a) where the workdir has one, else the mean estimate of up to
  `EXPECTED_SCANS` age-matched training scans: `References.expected`). From x towards each of
  the `NEAREST` scans x_k (d_k = f(x) - f(x_k)) the path walks only until the estimate has
  dropped by g: t_k = clip(g / d_k, 0, 1) where g and d_k have the same sign, else no path
  (`path_fractions`), refined by `REFINE_STEPS` regula-falsi steps on f along the path
  (`regula_falsi`: a blend of two brains is read as older, so the drop is not linear in t);
  the map is the mean over the walked paths of the integrated gradients along
  [x + t_k (x_k - x), x], sums to about g (not to f(x) - mean f(x_k)), and is all zero for a
  subject whose estimate is the expected one. On the simulated cohort null subjects' mass falls
  to 0.68 of risk subjects' (default 0.99) with the default's lesion and frontal shares, but
  is not small: the model's own error, not the latent gap, sets g (benchmarks/RESULTS.md,
  session 12). An option, not the default.
- `--reference ageing`: one path from the subject's own image x to x - 4 g dm/da, dm/da the
  voxel-wise least-squares slope of intensity on age over the age-matched training scans
  (`References.ageing_direction`: the derivative of the cohort's mean image), cut the same
  way: no one else's anatomy in the difference and mass proportional to |g|, but the subject's
  lesions are not on that direction and the frontal share drops (session 12). An option.

For most methods the gap map is the subject's map less the mean map of the set (through the one
relevance path, `maps.ensemble_maps`, so it is defined for every method and level):

    R_gap(x) = R(x) - mean_j R(x_j),   sum_i R_gap_i ~= f(x) - mean_j f(x_j)  (conservative)

A method that explains against reference inputs (`maps.Method.references`: integrated
gradients) instead integrates the gradient along the straight paths from each reference scan to
x and averages (expected gradients over the set, Erion et al. 2021): with `--reference nearest`
its map sums to f(x) - mean_j f(x_j) up to the midpoint rule's error, and a voxel gets relevance
only where the subject differs from its references. The set's mean prediction is reported beside
the map (explain.json).

Why not the map of a mean brain (DeepLIFT-style single reference input): the voxel-wise mean of
misaligned brains is blurred (partial volume everywhere), which the network reads as atrophy: on
the cpu preset it was predicted OLDER than the subjects with risk factors it should explain
(benchmarks/RESULTS.md, session 10). Why not relevance of the corrected gap through the head: the
bias correction is an affine function of age added after the network, so that map is the age
map plus a constant no voxel owns. Which design is the default was chosen on the simulated
cohort (benchmarks/bench_gap_maps.py; README, "Maps of the gap").
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jax_brainage.data import intensity, splits
from jax_brainage.errors import ConfigError, DataError

TARGETS = ("age", "gap")
# How the age-matched reference set is chosen (`--reference`): "nearest", the k age-matched
# training scans most similar to the subject (image correlation), or "age", every age-matched
# scan up to MAX_SCANS (the nearest in age).
# "expected": paths from the subject towards its nearest scans that stop where the estimate has
# dropped by the gap to the estimate expected at its age (`path_fractions`).
# "ageing": one path from the subject's own image back along the training cohort's ageing
# direction (`References.ageing_direction`), cut the same way.
DESIGNS = ("nearest", "age", "expected", "ageing")
PATH_DESIGNS = ("expected", "ageing")  # designs that cut paths at E(a): integrated gradients
DEFAULT_DESIGN = "nearest"
# `brainage explain --target gap`'s default method: paths from the nearest reference scans
# (README, "Maps of the gap": chosen on the simulated cohort).
DEFAULT_GAP_METHOD = "integrated_gradients"
WINDOW = 2.0     # years either side of the subject's (whole-year) age
MIN_SCANS = 5
MAX_SCANS = 16   # design "age": reference maps cost one relevance pass per scan
NEAREST = 8      # design "nearest": k most similar age-matched scans
EXPECTED_SCANS = 64  # design "expected" without a bias correction: E(a) from this many scans
AGEING_SCANS = 512   # design "ageing": age-matched scans of the local-linear fit (at most)
AGEING_REACH = 4.0   # design "ageing": the path runs to x - 4 g dm/da (the model moves 0.36-0.59
# years per year of the cohort's ageing: measured, session 12), cut where f has dropped by g
REFINE_STEPS = 3     # designs "expected", "ageing": regula-falsi steps on f along each path
SIMILARITY_VOXELS = 50_000  # cubes are block-averaged to about this many voxels to compare


def pool_factor(shape: Sequence[int], voxels: int = SIMILARITY_VOXELS) -> int:
  """Block size (voxels per side) that brings a cube `[X, Y, Z]` to at most ~`voxels` voxels."""
  n = float(np.prod([int(d) for d in shape[:3]]))
  return max(1, int(np.ceil((n / float(voxels)) ** (1.0 / 3.0) - 1e-9)))


def similarity_features(cubes: np.ndarray, pool: int) -> np.ndarray:
  """Unit-norm, zero-mean features of cubes `[m, X, Y, Z, C]` (as stored or network inputs):
  block means over `pool`^3 voxels (edges cropped to whole blocks), every channel, float32
  `[m, D]`; the dot product of two rows is the Pearson correlation of the pooled images."""
  x = np.asarray(cubes)
  x = x.astype(np.float32) if x.dtype != np.uint8 else x.astype(np.float32) / 255.0
  m, c = x.shape[0], x.shape[-1]
  X, Y, Z = (d // pool * pool for d in x.shape[1:4])
  x = x[:, :X, :Y, :Z]
  x = x.reshape(m, X // pool, pool, Y // pool, pool, Z // pool, pool, c).mean(axis=(2, 4, 6))
  f = x.reshape(m, -1)
  f = f - f.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(f, axis=1, keepdims=True)
  return f / np.where(norm > 0, norm, 1.0)


def nearest(subject: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
  """Indices `[min(k, m)]` of the `k` rows of candidate features `[m, D]` most correlated with
  the subject's features `[D]` (`similarity_features`), most similar first (ties: lower index);
  identical images (correlation 1: the subject itself among training scans) come last."""
  corr = np.asarray(candidates, np.float64) @ np.asarray(subject, np.float64)
  order = np.argsort(-corr, kind="stable")
  # A training subject explained against its own cohort is not its own reference.
  other = order[corr[order] < 1.0 - 1e-6]
  return (other if len(other) >= min(int(k), len(corr)) else order)[:min(int(k), len(corr))]


class References:
  """Age-matched training scans per sub-ensemble input: which rows serve a subject.

  Args:
    ensemble: the model (`artifact.load`); views, of_sub: `predict.model_inputs`' (the training
      caches and each sub-ensemble's view key and channels).
    design: "nearest" (the `k` age-matched scans most correlated with the subject, per
      sub-ensemble input), "age" (every age-matched scan, at most `max_scans`) or "expected"
      (the nearest `k`, each path cut where the estimate reaches E(a): `expected`,
      `regula_falsi` with `refine_steps` evaluations of the model per path).
  """

  def __init__(self, ensemble, views: Mapping[str, Any],
               of_sub: Mapping[str, tuple[str, Sequence[int] | None]], *,
               design: str = DEFAULT_DESIGN, k: int = NEAREST, window: float = WINDOW,
               min_scans: int = MIN_SCANS, max_scans: int = MAX_SCANS,
               refine_steps: int = REFINE_STEPS):
    if design not in DESIGNS:
      raise ConfigError(f"--reference {design}: choose one of {', '.join(DESIGNS)}")
    self.design, self.k, self.refine_steps = design, int(k), int(refine_steps)
    self.ensemble = ensemble
    self._expected: dict[int, float] = {}  # whole-year age -> mean estimate of its scans
    self._direction: dict[tuple[str, int], np.ndarray] = {}  # design "ageing": dm/da
    self.window, self.min_scans, self.max_scans = float(window), int(min_scans), int(max_scans)
    parts = splits.subject_parts(ensemble.workdir) if ensemble.workdir else {}
    self.maps: dict[int, Any] = {}  # design "age": whole-year age -> mean maps (Target fills)
    self._features: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
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

  def age_matched(self, name: str, age: float, at_most: int, at_least: int = 0) -> np.ndarray:
    """Training cache rows `[k]` of sub-ensemble `name` within +-window years of the whole-year
    `age` (at least `max(min_scans, at_least)`: the nearest in age when the window holds fewer;
    at most `at_most`, the nearest in age), in row order."""
    _, _, rows, ages = self._source[name]
    distance = np.abs(ages - float(self.key(age)))
    order = np.argsort(distance, kind="stable")
    inside = int(np.sum(distance <= self.window))
    k = min(max(inside, self.min_scans, at_least), at_most, len(rows))
    return np.sort(rows[order[:k]])

  def rows_for(self, name: str, age: float, cube: np.ndarray | None = None) -> np.ndarray:
    """Cache rows `[k]` of the reference set of sub-ensemble `name` for a subject of `age`
    (years) whose input is `cube` `[X, Y, Z, C]` (as stored; design "nearest" needs it): most
    similar first for "nearest", row order for "age"."""
    if self.design == "age":
      return self.age_matched(name, age, self.max_scans)
    if cube is None:
      raise ValueError("design 'nearest' needs the subject's cube")
    rows, features = self._candidates(name, age)
    pool = pool_factor(np.shape(cube))
    mine = similarity_features(np.asarray(cube)[None], pool)[0]
    return rows[nearest(mine, features, self.k)]

  def size(self) -> int:
    """Reference scans per subject under design "nearest" (the same for every sub-ensemble)."""
    return min([self.k] + [len(self._source[n][2]) for n in self._source])

  def _candidates(self, name: str, age: float) -> tuple[np.ndarray, np.ndarray]:
    """(age-matched rows `[m]`, their similarity features `[m, D]`), kept for 8 ages."""
    key = (name, self.key(age))
    if key not in self._features:
      while len(self._features) >= 8:  # bounded memory: features of ~300 scans per age
        del self._features[next(iter(self._features))]
      cache, channels, _, _ = self._source[name]
      # k + 1: k remain when the subject itself is among them (`nearest`)
      rows = self.age_matched(name, age, len(self._source[name][2]), self.k + 1)
      pool = pool_factor(cache.volumes.shape[1:4])
      feats = [similarity_features(np.asarray(cache.volumes[rows[i:i + 64]])[..., channels],
                                   pool) for i in range(0, len(rows), 64)]
      self._features[key] = (rows, np.concatenate(feats))
    return self._features[key]

  def volumes(self, name: str, rows: np.ndarray) -> np.ndarray:
    """Training scans `[k, X, Y, Z, C]` of sub-ensemble `name` at cache `rows`, as stored."""
    cache, channels, _, _ = self._source[name]
    return np.asarray(cache.volumes[np.asarray(rows)])[..., channels]

  def inputs(self, age: float) -> dict[str, np.ndarray]:
    """Design "age": {sub name: the reference scans `[k, X, Y, Z, C]` as stored} at whole-year
    `age`."""
    return {name: self.volumes(name, self.rows_for(name, age)) for name in self._source}


  def expected(self, ages: Sequence[float]) -> np.ndarray:
    """E(a) `[n]` (years): the estimate expected at each chronological age. The model's bias
    correction where it has one (corrected = f - bias(a), so E(a) = a + bias(a)); else the
    mean ensemble estimate of up to `EXPECTED_SCANS` age-matched training scans (+-window of
    the whole-year age, the nearest in age), computed once per whole-year age."""
    ages = np.asarray(ages, np.float64)
    correction = self.ensemble.correction
    if correction.kind != "none":
      return ages + correction.bias(ages)
    for key in dict.fromkeys(self.key(a) for a in ages):
      if key not in self._expected:
        inputs = {name: self.volumes(name, self.age_matched(name, key, EXPECTED_SCANS))
                  for name in self._source}
        self._expected[key] = float(np.mean(self.ensemble.predict(inputs).ensemble))
    return np.array([self._expected[self.key(a)] for a in ages])


  def ageing_direction(self, name: str, age: float) -> np.ndarray:
    """dm/da float32 `[X, Y, Z, C]` (network-input units per year): the slope of the
    least-squares line of every voxel's intensity on age over the age-matched training scans of
    sub-ensemble `name` (+-window of the whole-year `age`, at most `AGEING_SCANS`, the nearest
    in age): the derivative of the cohort's mean image at that age. Kept for 8 ages."""
    key = (name, self.key(age))
    if key not in self._direction:
      while len(self._direction) >= 8:
        del self._direction[next(iter(self._direction))]
      _, _, rows, ages = self._source[name]
      chosen = self.age_matched(name, age, AGEING_SCANS)
      a = ages[np.searchsorted(rows, chosen)]  # rows are sorted (np.flatnonzero)
      c = a - a.mean()
      total = None
      for i in range(0, len(chosen), 64):  # sum_i c_i x_i in chunks: bounded memory
        x = intensity.to_unit_float(self.volumes(name, chosen[i:i + 64])).astype(np.float64)
        part = np.tensordot(c[i:i + 64], x, axes=1)
        total = part if total is None else total + part
      self._direction[key] = (total / max(float(np.sum(c * c)), 1e-12)).astype(np.float32)
    return self._direction[key]

  def ageing_end(self, name: str, ages: Sequence[float], cubes: np.ndarray,
                 gap: np.ndarray) -> np.ndarray:
    """Design "ageing": path ends float32 `[n, X, Y, Z, C]` (network inputs): each subject's
    cube `[n, X, Y, Z, C]` (as stored) moved back `AGEING_REACH` x its gap g `[n]` (years)
    along the ageing direction at its age, x - 4 g dm/da; x itself where g = 0."""
    x = intensity.to_unit_float(np.asarray(cubes))
    out = [xi - np.float32(AGEING_REACH * g) * self.ageing_direction(name, a)
           for xi, a, g in zip(x, ages, np.asarray(gap, np.float64))]
    return np.stack(out).astype(np.float32)


def path_fractions(gap: np.ndarray, differences: np.ndarray) -> np.ndarray:
  """How far along the path from a subject x to each reference x_k the estimate has dropped by
  the gap, to first order: t_k = clip(g / d_k, 0, 1) where g and d_k have the same sign, else 0
  (that reference gives no path).

  Args:
    gap: g `[n]` = f(x) - E(a) (years): the estimate less the one expected at the subject's age.
    differences: d `[n, k]` = f(x) - f(x_k) (years).
  Returns:
    float32 `[n, k]` in [0, 1]; all 0 for a subject with g = 0.
  """
  g = np.asarray(gap, np.float64)[:, None]
  d = np.asarray(differences, np.float64)
  same = (np.sign(g) == np.sign(d)) & (g != 0)
  t = np.where(same, g / np.where(d != 0, d, 1.0), 0.0)
  return np.clip(t, 0.0, 1.0).astype(np.float32)


def regula_falsi(drop: Callable[[np.ndarray], np.ndarray], gap: np.ndarray,
                 differences: np.ndarray, steps: int) -> np.ndarray:
  """Fractions t `[n, k]` where the drop of the estimate along each path, h(t) = f(x) -
  f(x + t (x_k - x)), equals the gap g: `steps` regula-falsi steps from `path_fractions` (itself
  the first step on the bracket [0, 1], h(0) = 0, h(1) = d). Each step evaluates h at the
  current t and keeps the sub-interval over which h - g changes sign, so t stays inside a
  bracket of a root even where h is not monotone (blends of two brains read as older: measured
  in benchmarks/RESULTS.md, session 12). Paths with no bracket (t = 0: no path; t = 1: |d| <=
  |g|, the whole path) are kept.

  Args:
    drop: `h(t [n, k]) -> [n, k]` (years); gap: g `[n]`; differences: d = h(1) `[n, k]`.
    steps: evaluations of `drop` (0: the first-order fractions).
  Returns:
    float32 `[n, k]` in [0, 1].
  """
  t = path_fractions(gap, differences).astype(np.float64)
  g = np.broadcast_to(np.asarray(gap, np.float64)[:, None], t.shape)
  d = np.asarray(differences, np.float64)
  active = (t > 0) & (t < 1)
  lo_t, lo_h = np.zeros_like(t), np.zeros_like(t)
  hi_t, hi_h = np.ones_like(t), d.copy()
  for _ in range(int(steps)):
    if not active.any():
      break
    h = np.asarray(drop(t.astype(np.float32)), np.float64)
    hit = active & (h == g)
    # the end whose h - g has the sign of h(t) - g moves to t
    low_side = np.sign(h - g) == np.sign(lo_h - g)
    lo_t, lo_h = np.where(active & low_side, t, lo_t), np.where(active & low_side, h, lo_h)
    hi_t, hi_h = np.where(active & ~low_side, t, hi_t), np.where(active & ~low_side, h, hi_h)
    with np.errstate(divide="ignore", invalid="ignore"):
      new = lo_t + (hi_t - lo_t) * (g - lo_h) / (hi_h - lo_h)
    t = np.where(active & ~hit & np.isfinite(new), new, t)
    active = active & ~hit
  return np.clip(t, 0.0, 1.0).astype(np.float32)


def path_starts(cubes: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray],
                fractions: np.ndarray) -> dict[str, np.ndarray]:
  """{sub name: float32 network inputs `[n * k, X, Y, Z, C]`}: x + t_k (x_k - x) of subjects
  `[n, X, Y, Z, C]` and references `[n, k, X, Y, Z, C]` (as stored) at fractions `[n, k]`."""
  out = {}
  for name, x in cubes.items():
    x = intensity.to_unit_float(np.asarray(x))[:, None]
    r = intensity.to_unit_float(np.asarray(references[name]))
    t = np.asarray(fractions, np.float32).reshape(fractions.shape + (1,) * (x.ndim - 2))
    out[name] = (x + t * (r - x)).reshape(-1, *x.shape[2:]).astype(np.float32)
  return out


def ages_of(subjects: Sequence[Any]) -> list[float]:
  """Chronological ages (years) of subjects to explain against a reference; a one-line
  DataError naming the first subject without one."""
  for s in subjects:
    if s.age is None or not np.isfinite(float(s.age)):
      raise DataError(f"{s.subject_id}: --target gap needs the chronological age "
                      "(participants.tsv)")
  return [float(s.age) for s in subjects]
