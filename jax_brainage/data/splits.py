"""Seeded train / validation / test splits (80/10/10 at random, as in the study).

`split_subjects(n, seed)` permutes the subjects with `np.random.default_rng(seed)` and cuts the
permutation into parts whose sizes are the fractions' largest-remainder apportionment of n.

With `ages`, the split is age-stratified: subjects are ordered by age (ties in random order)
and each part receives its members at evenly spaced, randomly jittered quantiles of that order,
so every part spans the whole age range with the cohort's age distribution (a test set of 10%
gets one subject from each age decile-of-deciles, rather than whatever a random cut gives).

Parts are disjoint, together cover all subjects, have exactly the apportioned sizes, and are the
same for the same (n, seed, fractions, ages). With `groups` (the participant id of each row, for
datasets with several sessions per subject) every participant's rows go to one part.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage import fileio
from jax_brainage.errors import ConfigError, DataError

STUDY_FRACTIONS = (0.8, 0.1, 0.1)
NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Row numbers (int64, sorted) of each part."""

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in NAMES:
      raise ConfigError(f"unknown split {name!r}; choose {', '.join(NAMES)}")
    return getattr(self, name)

  def sizes(self) -> dict[str, int]:
    return {name: len(self[name]) for name in NAMES}

  def to_dict(self, subject_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON-ready: rows per part, and subject ids when given (checked again on load)."""
    d: dict[str, Any] = {name: self[name].tolist() for name in NAMES}
    if subject_ids is not None:
      d["subject_ids"] = {name: [subject_ids[i] for i in self[name]] for name in NAMES}
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], subject_ids: Sequence[str] | None = None) -> Split:
    """Inverse of `to_dict`; with subject_ids, checks the rows still name the same subjects."""
    try:
      parts = {name: np.asarray(d[name], np.int64) for name in NAMES}
    except KeyError as e:
      raise DataError(f"split record has no {e.args[0]!r} part") from None
    if subject_ids is not None and "subject_ids" in d:
      for name in NAMES:
        if len(parts[name]) and parts[name].max() >= len(subject_ids):
          raise DataError(f"split {name}: row {parts[name].max()} beyond the "
                          f"{len(subject_ids)} subjects")
        now = [subject_ids[i] for i in parts[name]]
        if now != list(d["subject_ids"][name]):
          bad = next(a for a, b in zip(d["subject_ids"][name], now) if a != b)
          raise DataError(f"split {name}: subject {bad!r} is no longer at its row; the data "
                          "changed since the split was made")
    split = cls(**{k: np.sort(v) for k, v in parts.items()})
    _check_disjoint(split)
    return split


def _check_disjoint(split: Split) -> None:
  seen: dict[int, str] = {}
  for name in NAMES:
    for i in split[name].tolist():
      if i in seen:
        raise DataError(f"split: row {i} is in both {seen[i]} and {name}")
      seen[i] = name


def apportion(n: int, fractions: Sequence[float]) -> np.ndarray:
  """Largest-remainder (Hamilton) apportionment of n into parts [len(fractions)] (int64).

  Every part with a positive fraction gets at least one subject when n allows it.
  """
  f = np.asarray(fractions, np.float64)
  quota = f * n
  sizes = np.floor(quota).astype(np.int64)
  # Ties in the remainders go to the earlier part (train before val before test).
  order = np.lexsort((np.arange(len(f)), -(quota - sizes)))
  sizes[order[: n - sizes.sum()]] += 1
  if n >= np.count_nonzero(f):
    for k in np.flatnonzero((f > 0) & (sizes == 0)):
      sizes[np.argmax(sizes)] -= 1
      sizes[k] = 1
  return sizes


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
  f = np.asarray(fractions, np.float64)
  if f.shape != (3,) or np.any(~np.isfinite(f)) or np.any(f < 0) or abs(f.sum() - 1) > 1e-6:
    raise ConfigError(f"split fractions {tuple(fractions)} must be 3 non-negative numbers "
                      "(train, val, test) summing to 1")
  return f / f.sum()


def split_subjects(n: int, seed: int, fractions: Sequence[float] = STUDY_FRACTIONS,
                   ages: np.ndarray | None = None, groups: Sequence[str] | None = None
                   ) -> Split:
  """Random train / val / test split of n subjects.

  Args:
    n: number of rows (0..n-1 of the cache or cohort).
    seed: the split's seed (keep it apart from the training seed so that retraining ensemble
      members with new seeds keeps the same test set).
    fractions: (train, val, test), summing to 1.
    ages: float [n] (years); when given, the split is stratified by age.
    groups: [n] participant id of each row: rows of one participant (its sessions) go to the same
      part. The parts' sizes are then apportioned over participants (stratified by each one's
      mean age). With every id distinct, the split is exactly that of `groups=None`.

  Returns:
    Split with sorted row numbers of each part.
  """
  if groups is not None:
    groups = list(groups)
    if len(groups) != n:
      raise DataError(f"split: {len(groups)} group ids for {n} rows")
    names, of_row = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    if len(names) < n:
      # Participants in first-seen order, so the split does not depend on how ids sort.
      first = np.full(len(names), n)
      np.minimum.at(first, of_row, np.arange(n))
      rank = np.empty(len(names), np.int64)
      rank[np.argsort(first)] = np.arange(len(names))
      of_row = rank[of_row]
      group_ages = None
      if ages is not None:
        ages = np.asarray(ages, np.float64)
        if ages.shape != (n,):
          raise DataError(f"split: ages has shape {ages.shape}, expected ({n},)")
        group_ages = np.bincount(of_row, ages, len(names)) / np.bincount(of_row)
      by_group = split_subjects(len(names), seed, fractions, group_ages)
      return Split(*(np.flatnonzero(np.isin(of_row, by_group[name])) for name in NAMES))
  f = _check_fractions(fractions)
  if n < 1:
    raise DataError("split: no subjects to split")
  sizes = apportion(n, f)
  rng = np.random.default_rng(seed)
  labels = np.empty(n, np.int64)
  if ages is None:
    perm = rng.permutation(n)
    labels[perm] = np.repeat(np.arange(3), sizes)
  else:
    ages = np.asarray(ages, np.float64)
    if ages.shape != (n,):
      raise DataError(f"split: ages has shape {ages.shape}, expected ({n},)")
    bad = np.flatnonzero(~np.isfinite(ages))
    if bad.size:
      raise DataError(f"split: age of row {bad[0]} is not a finite number")
    by_age = np.lexsort((rng.random(n), ages))  # random order among equal ages
    # Member j of part k sits at quantile (j + u) / size_k; sorting all quantiles interleaves
    # the parts evenly along the age order.
    part = np.repeat(np.arange(3), sizes)
    j = np.concatenate([np.arange(s) for s in sizes])
    quantile = (j + rng.random(n)) / np.maximum(np.repeat(sizes, sizes), 1)
    labels[by_age] = part[np.lexsort((rng.random(n), quantile))]
  return Split(*(np.flatnonzero(labels == k) for k in range(3)))


def save_split(path: str | os.PathLike, split: Split,
               subject_ids: Sequence[str] | None = None, **meta: Any) -> None:
  """Writes the split as JSON atomically (with subject ids and e.g. seed, fractions)."""
  fileio.write_json(path, {**meta, **split.to_dict(subject_ids)})


def load_split(path: str | os.PathLike, subject_ids: Sequence[str] | None = None) -> Split:
  """Reads a split written by `save_split`, checking subject ids when given."""
  import json

  try:
    with open(path, encoding="utf-8") as fh:
      d = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: cannot read split ({type(e).__name__}: {e})") from None
  return Split.from_dict(d, subject_ids)


SPLIT_FILE = "split.json"  # in a training workdir


def subject_parts(workdir: str | os.PathLike) -> dict[str, str]:
  """{participant id: "train" | "val" | "test"} of a training workdir's recorded split
  (W/split.json); {} when the workdir records none (e.g. an imported model).

  Subjects are matched by participant id: the ids the model was trained and validated on."""
  import json

  path = os.path.join(os.fspath(workdir), SPLIT_FILE)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as fh:
      ids = json.load(fh)["subject_ids"]
    return {str(s): name for name in NAMES for s in ids[name]}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: unreadable split record ({type(e).__name__})") from None
